// AWQ int4 weights in the "row layout" the Rust loader builds from AutoAWQ GEMM tensors
// (src/model/weights/awq.rs, AwqMatrix): for N outputs, K inputs, group size G (K % G == 0,
// G % 8 == 0, K % 8 == 0):
//   qw     uint32 [N, K/8]  word qw[n*(K/8) + j] holds inputs 8j..8j+7, input 8j+i in bits 4i..4i+3
//   scales fp16   [N, K/G]
//   zeros  fp16   [N, K/G]  integers 0..15
//   w[n][k] = fp16((q - z) * s), rounded once (AutoAWQ/torch dequantize_gemm, bit for bit).
//
// Exact fp16 dequantization without float conversions (the FasterTransformer / AutoAWQ trick):
// OR-ing a nibble into the mantissa of fp16 1024.0 (0x6400) gives 1024 + q exactly, two lanes at
// a time; a nibble at bits 4..7 gives 1024 + 16q, which one fma by 1/16 brings back. Subtracting
// 1024 + z (exact) leaves the small integer q - z, and one fp16 multiply by s rounds the exact
// product once, which is precisely f16((q - z) * s). Only the fp16 -> fp32 conversion for the fp32
// FMA remains per weight.
#include "gemv.cuh"

#define AWQ_GEMV_ROWS_PER_BLOCK GEMV_ROWS_PER_BLOCK
#define AWQ_GEMV_THREADS GEMV_THREADS
#define AWQ_DEQUANT_THREADS 256

namespace zoe {

struct AwqGroup {
    __half2 s;     // (s, s)
    __half2 zb;    // (1024 + z) twice
    __half2 zb16;  // -(64 + z) twice
};

__device__ __forceinline__ AwqGroup awq_group(__half s, __half z) {
    const __half2 z2 = __half2half2(z);
    AwqGroup g;
    g.s = __half2half2(s);
    g.zb = __hadd2(z2, h2_splat_bits(0x6400));           // 1024 + z, exact for z in 0..15
    g.zb16 = __hneg2(__hadd2(z2, h2_splat_bits(0x5400)));  // -(64 + z), exact
    return g;
}

// The 8 weights of word w, paired as h[i] = (input i, input i + 4), each f16((q - z) * s).
__device__ __forceinline__ void awq_dequant_word(uint32_t w, const AwqGroup& g, __half2 (&h)[4]) {
    constexpr uint32_t MAGIC = 0x64006400u;  // fp16 1024.0 in both halves
    const __half2 inv16 = h2_splat_bits(0x2C00);  // 1/16
    const uint32_t w8 = w >> 8;
    // Nibbles 0 and 4 sit at bits 0..3 and 16..19; nibbles 1 and 5 at 4..7 and 20..23 (16x).
    h[0] = __hmul2_rn(__hsub2(h2_from_bits((w & 0x000F000Fu) | MAGIC), g.zb), g.s);
    h[1] = __hmul2_rn(__hfma2(h2_from_bits((w & 0x00F000F0u) | MAGIC), inv16, g.zb16), g.s);
    h[2] = __hmul2_rn(__hsub2(h2_from_bits((w8 & 0x000F000Fu) | MAGIC), g.zb), g.s);
    h[3] = __hmul2_rn(__hfma2(h2_from_bits((w8 & 0x00F000F0u) | MAGIC), inv16, g.zb16), g.s);
}

// The 8 weights of word w as fp32, natural input order.
__device__ __forceinline__ void awq_word_to_float(uint32_t word, const AwqGroup& g, float (&w)[8]) {
    __half2 h[4];
    awq_dequant_word(word, g, h);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = __half22float2(h[i]);
        w[i] = f.x;
        w[i + 4] = f.y;
    }
}

// 128-bit path (K % 32 == 0, G % 32 == 0, aligned pointers): a chunk is 4 words = 32 inputs of
// one group, so one scale/zero fetch serves the whole load.
struct AwqVec {
    struct Raw {
        uint4 q;
        __half s, z;
    };
    static constexpr int U_M1 = 2;
    static constexpr int SUBS = 4;
    const uint32_t* __restrict__ qw;
    const __half* __restrict__ scales;
    const __half* __restrict__ zeros;
    int K, G, KW, NG;
    bool x_vec;
    __device__ __forceinline__ int chunks() const { return K >> 5; }
    __device__ __forceinline__ void load(Raw& r, int row, int c) const {
        r.q = ldg(reinterpret_cast<const uint4*>(qw + (size_t)row * KW) + c);
        const size_t g = (size_t)row * NG + (c << 5) / G;
        r.s = ldg(scales + g);
        r.z = ldg(zeros + g);
    }
    __device__ __forceinline__ void dequant(const Raw& r, int sub, float (&w)[8]) const {
        const uint32_t word = sub == 0 ? r.q.x : sub == 1 ? r.q.y : sub == 2 ? r.q.z : r.q.w;
        awq_word_to_float(word, awq_group(r.s, r.z), w);
    }
    __device__ __forceinline__ int k0(int c, int sub) const { return (c << 5) + (sub << 3); }
};

// Word path (gemv_slow; any K % 8 == 0 and G % 8 == 0): a chunk is one word, 32-bit loads.
struct AwqWord {
    struct Raw {
        uint32_t q;
        __half s, z;
    };
    static constexpr int U_M1 = 1;
    static constexpr int SUBS = 1;
    const uint32_t* __restrict__ qw;
    const __half* __restrict__ scales;
    const __half* __restrict__ zeros;
    int K, G, KW, NG;
    bool x_vec;
    __device__ __forceinline__ int chunks() const { return KW; }
    __device__ __forceinline__ void load(Raw& r, int row, int c) const {
        r.q = ldg(qw + (size_t)row * KW + c);
        const size_t g = (size_t)row * NG + (c << 3) / G;
        r.s = ldg(scales + g);
        r.z = ldg(zeros + g);
    }
    __device__ __forceinline__ void dequant(const Raw& r, int, float (&w)[8]) const {
        awq_word_to_float(r.q, awq_group(r.s, r.z), w);
    }
    __device__ __forceinline__ int k0(int c, int) const { return c << 3; }
};

}  // namespace zoe

// out[m*out_stride + col0 + n] = sum_k x[m*K + k] * w[n][k] + (bias ? bias[n] : 0), m < M, n < N.
// Grid ceil(N / AWQ_GEMV_ROWS_PER_BLOCK), block AWQ_GEMV_THREADS. Built for M <= 8 (decode); any
// M works, in passes of 4 token rows that each re-read the weights.
extern "C" __global__ void __launch_bounds__(GEMV_THREADS, GEMV_MIN_BLOCKS)
    awq_gemv_f32(const float* __restrict__ x, int M, int K, const uint32_t* __restrict__ qw,
                 const __half* __restrict__ scales, const __half* __restrict__ zeros, int G,
                 const float* __restrict__ bias, float* __restrict__ out, int out_stride, int col0, int N) {
    if (N <= 0 || K <= 0 || M <= 0) return;
    const int KW = K >> 3, NG = K / G;
    const bool x_vec = zoe::aligned16(x);
    if ((K & 31) == 0 && (G & 31) == 0 && x_vec && zoe::aligned16(qw)) {
        const zoe::AwqVec p{qw, scales, zeros, K, G, KW, NG, true};
        zoe::gemv_all(p, x, M, bias, out, out_stride, col0, N);
    } else {
        const zoe::AwqWord p{qw, scales, zeros, K, G, KW, NG, x_vec};
        zoe::gemv_slow(p, x, M, bias, out, out_stride, col0, N);
    }
}

// w[n*K + k] = f16((q - z) * s) for the whole matrix (prefill: the caller runs cuBLAS on it).
// Grid-stride over the N*K/8 words; block AWQ_DEQUANT_THREADS, grid min(ceil(N*K/8 / 256), 65535).
// Each word becomes one 16-byte store of 8 fp16 (fp16 stores if w is not 16-byte aligned).
extern "C" __global__ void __launch_bounds__(AWQ_DEQUANT_THREADS)
    awq_dequant_f16(const uint32_t* __restrict__ qw, const __half* __restrict__ scales,
                    const __half* __restrict__ zeros, int G, __half* __restrict__ w, int N, int K) {
    const int KW = K >> 3, NG = K / G;
    const size_t words = (size_t)N * KW;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    // 32-bit division when the index fits (the common case), else 64-bit.
    const bool small = words <= 0xFFFFFFFFull;
    const bool vec = zoe::aligned16(w);
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < words; i += stride) {
        size_t n;
        int j;
        if (small) {
            const uint32_t n32 = (uint32_t)i / (uint32_t)KW;
            n = n32;
            j = (int)((uint32_t)i - n32 * (uint32_t)KW);
        } else {
            n = i / (size_t)KW;
            j = (int)(i - n * KW);
        }
        __half2 h[4];
        const size_t g = n * NG + (j << 3) / G;
        zoe::awq_dequant_word(zoe::ldg(qw + i), zoe::awq_group(zoe::ldg(scales + g), zoe::ldg(zeros + g)), h);
        // h[e] = (input e, input e + 4) -> memory order 0..7.
        const __half2 o0 = __lows2half2(h[0], h[1]), o1 = __lows2half2(h[2], h[3]);
        const __half2 o2 = __highs2half2(h[0], h[1]), o3 = __highs2half2(h[2], h[3]);
        if (vec) {
            uint4 v;
            v.x = *reinterpret_cast<const uint32_t*>(&o0);
            v.y = *reinterpret_cast<const uint32_t*>(&o1);
            v.z = *reinterpret_cast<const uint32_t*>(&o2);
            v.w = *reinterpret_cast<const uint32_t*>(&o3);
            reinterpret_cast<uint4*>(w)[i] = v;
        } else {
            __half* d = w + i * 8;
            d[0] = __low2half(o0), d[1] = __high2half(o0), d[2] = __low2half(o1), d[3] = __high2half(o1);
            d[4] = __low2half(o2), d[5] = __high2half(o2), d[6] = __low2half(o3), d[7] = __high2half(o3);
        }
    }
}
