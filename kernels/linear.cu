// Dense fp16 weights (lm_head, or the tied embedding used as the head): w [N, K] row-major fp16,
// the decode GEMV of gemv.cuh with a plain fp16 -> fp32 conversion per weight.
#include "gemv.cuh"

#define LINEAR_ROWS_PER_BLOCK GEMV_ROWS_PER_BLOCK
#define LINEAR_THREADS GEMV_THREADS

namespace zoe {

// K % 8 == 0 and aligned pointers: rows are 16-byte aligned, a chunk is one 128-bit load of 8
// consecutive fp16 weights.
struct F16Vec {
    typedef uint4 Raw;
    static constexpr int U_M1 = 2;
    static constexpr int SUBS = 1;
    const __half* __restrict__ w;
    int K;
    bool x_vec;
    __device__ __forceinline__ int chunks() const { return K >> 3; }
    __device__ __forceinline__ void load(Raw& r, int row, int c) const {
        r = ldg(reinterpret_cast<const uint4*>(w + (size_t)row * K) + c);
    }
    __device__ __forceinline__ void dequant(const Raw& r, int, float (&v)[8]) const {
        const float2 a = h2_bits_to_float2(r.x), b = h2_bits_to_float2(r.y);
        const float2 c = h2_bits_to_float2(r.z), d = h2_bits_to_float2(r.w);
        v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y;
        v[4] = c.x, v[5] = c.y, v[6] = d.x, v[7] = d.y;
    }
    __device__ __forceinline__ int k0(int c, int) const { return c << 3; }
};

// Any K (rows not 16-byte aligned when K % 8 != 0): a chunk is 8 scalar fp16 loads, the inputs
// past K of the last chunk read as 0 (and x there as 0 too, see load_x8).
struct F16Scalar {
    struct Raw {
        __half v[8];
    };
    static constexpr int U_M1 = 1;
    static constexpr int SUBS = 1;
    const __half* __restrict__ w;
    int K;
    bool x_vec;
    __device__ __forceinline__ int chunks() const { return (K + 7) >> 3; }
    __device__ __forceinline__ void load(Raw& r, int row, int c) const {
        const __half* p = w + (size_t)row * K;
        const int k = c << 3;
#pragma unroll
        for (int e = 0; e < 8; ++e) r.v[e] = k + e < K ? ldg(p + k + e) : __ushort_as_half((unsigned short)0);
    }
    __device__ __forceinline__ void dequant(const Raw& r, int, float (&v)[8]) const {
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = __half2float(r.v[e]);
    }
    __device__ __forceinline__ int k0(int c, int) const { return c << 3; }
};

}  // namespace zoe

// out[m*out_stride + col0 + n] = sum_k x[m*K + k] * w[n*K + k] + (bias ? bias[n] : 0), m < M, n < N.
// Grid ceil(N / LINEAR_ROWS_PER_BLOCK), block LINEAR_THREADS. Built for M <= 8 (decode); any M
// works, in passes of 4 token rows that each re-read the weights.
extern "C" __global__ void __launch_bounds__(GEMV_THREADS, GEMV_MIN_BLOCKS)
    linear_f16_f32(const float* __restrict__ x, int M, int K, const __half* __restrict__ w,
                   const float* __restrict__ bias, float* __restrict__ out, int out_stride, int col0, int N) {
    if (N <= 0 || K <= 0 || M <= 0) return;
    const bool x_vec = zoe::aligned16(x);
    if ((K & 7) == 0 && x_vec && zoe::aligned16(w)) {
        const zoe::F16Vec p{w, K, true};
        zoe::gemv_all(p, x, M, bias, out, out_stride, col0, N);
    } else {
        // 128-bit x loads need every row x + m*K 16-byte aligned and the chunk inside K.
        const zoe::F16Scalar p{w, K, x_vec && (K & 7) == 0};
        zoe::gemv_slow(p, x, M, bias, out, out_stride, col0, N);
    }
}
