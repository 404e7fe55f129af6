// Small memory-bound element-wise kernels. Launch for the grid-stride ones: block
// ELEMWISE_THREADS (256), any grid (ceil(count / 256) capped at 65535 is a good choice; every
// element is covered by the stride loop whatever the grid). The per-row ones (embedding,
// gather, KV write) use one block of 256 per row. Indices are size_t where row * cols or
// slot * kv_cols can pass 2^31.
#include "common.cuh"

#define ELEMWISE_THREADS 256

namespace zoe {

__device__ __forceinline__ size_t grid_start() { return (size_t)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ size_t grid_stride() { return (size_t)gridDim.x * blockDim.x; }

// i / d and i % d, in 32-bit arithmetic when i fits (a 64-bit division is a long software
// sequence; the 32-bit one a few instructions).
__device__ __forceinline__ void divmod(size_t i, int d, size_t& q, size_t& r) {
    if (i <= 0xFFFFFFFFull) {
        const uint32_t q32 = (uint32_t)i / (uint32_t)d;
        q = q32;
        r = (uint32_t)i - q32 * (uint32_t)d;
    } else {
        q = i / (size_t)d;
        r = i - q * (size_t)d;
    }
}

}  // namespace zoe

// out[r, j] = silu(gate_up[r, j]) * gate_up[r, h + j], silu(g) = g / (1 + exp(-g)): the SwiGLU
// MLP with gate and up fused in one [rows, 2h] projection (gate first). Same expression and
// order as the CPU. Grid-stride over rows * h; out must not overlap gate_up.
extern "C" __global__ void __launch_bounds__(ELEMWISE_THREADS)
    silu_mul_f32(const float* __restrict__ gate_up, float* __restrict__ out, int rows, int h) {
    const size_t n = (size_t)rows * h;
    for (size_t i = zoe::grid_start(); i < n; i += zoe::grid_stride()) {
        size_t r, j;
        zoe::divmod(i, h, r, j);
        const float g = gate_up[r * 2 * h + j], u = gate_up[r * 2 * h + h + j];
        out[i] = g / (1.0f + expf(-g)) * u;
    }
}

// acc[i] += x[i] (the residual add). Grid-stride over n.
extern "C" __global__ void __launch_bounds__(ELEMWISE_THREADS) add_f32(float* acc, const float* x, int n) {
    for (size_t i = zoe::grid_start(); i < (size_t)n; i += zoe::grid_stride()) acc[i] += x[i];
}

// y[i] = fp16(x[i]), round to nearest even (overflow to +-inf as IEEE). Grid-stride over n.
extern "C" __global__ void __launch_bounds__(ELEMWISE_THREADS)
    cast_f32_f16(const float* __restrict__ x, __half* __restrict__ y, int n) {
    for (size_t i = zoe::grid_start(); i < (size_t)n; i += zoe::grid_stride()) y[i] = __float2half_rn(x[i]);
}

// y[i] = float(x[i]) (exact). Grid-stride over n.
extern "C" __global__ void __launch_bounds__(ELEMWISE_THREADS)
    cast_f16_f32(const __half* __restrict__ x, float* __restrict__ y, int n) {
    for (size_t i = zoe::grid_start(); i < (size_t)n; i += zoe::grid_stride()) y[i] = __half2float(x[i]);
}

// out[i, :] = float(table[ids[i], :]) for the token ids; table [vocab, cols] fp16, out [n, cols].
// Grid n, block 256. 16-byte loads of 8 fp16 when cols % 8 == 0 and the pointers are aligned.
extern "C" __global__ void __launch_bounds__(ELEMWISE_THREADS)
    embedding_f16(const __half* __restrict__ table, const uint32_t* __restrict__ ids, float* __restrict__ out, int n,
                  int cols) {
    const int i = blockIdx.x;
    if (i >= n) return;
    const __half* src = table + (size_t)ids[i] * cols;
    float* dst = out + (size_t)i * cols;
    if ((cols & 7) == 0 && zoe::aligned16(table) && zoe::aligned16(out)) {
        for (int c = threadIdx.x; c < (cols >> 3); c += blockDim.x) {
            const uint4 v = zoe::ldg(reinterpret_cast<const uint4*>(src) + c);
            const float2 a = zoe::h2_bits_to_float2(v.x), b = zoe::h2_bits_to_float2(v.y);
            const float2 e = zoe::h2_bits_to_float2(v.z), f = zoe::h2_bits_to_float2(v.w);
            reinterpret_cast<float4*>(dst)[2 * c] = make_float4(a.x, a.y, b.x, b.y);
            reinterpret_cast<float4*>(dst)[2 * c + 1] = make_float4(e.x, e.y, f.x, f.y);
        }
    } else {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = __half2float(src[c]);
    }
}

// out[i, :] = x[rows[i], :] (e.g. the last position of each sequence before the head).
// Grid n, block 256.
extern "C" __global__ void __launch_bounds__(ELEMWISE_THREADS)
    gather_rows_f32(const float* __restrict__ x, const uint32_t* __restrict__ rows, float* __restrict__ out, int n,
                    int cols) {
    const int i = blockIdx.x;
    if (i >= n) return;
    const float* src = x + (size_t)rows[i] * cols;
    float* dst = out + (size_t)i * cols;
    if ((cols & 3) == 0 && zoe::aligned16(x) && zoe::aligned16(out)) {
        for (int c = threadIdx.x; c < (cols >> 2); c += blockDim.x)
            reinterpret_cast<float4*>(dst)[c] = reinterpret_cast<const float4*>(src)[c];
    } else {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = src[c];
    }
}

// out[r*out_stride + col0 + j] += bias[j], r < rows, j < n (bias after a cuBLAS GEMM that wrote
// columns col0.. of a wider output). Grid-stride over rows * n.
extern "C" __global__ void __launch_bounds__(ELEMWISE_THREADS)
    add_bias_f32(float* __restrict__ out, int out_stride, int col0, const float* __restrict__ bias, int rows, int n) {
    const size_t total = (size_t)rows * n;
    for (size_t i = zoe::grid_start(); i < total; i += zoe::grid_stride()) {
        size_t r, j;
        zoe::divmod(i, n, r, j);
        out[r * out_stride + col0 + j] += bias[j];
    }
}

// Appends the new tokens' K and V to the paged fp16 cache: for row r and c < kv_cols,
//   k_cache[slots[r]*kv_cols + c] = fp16(qkv[r*qkv_stride + k_off + c]), v likewise from v_off.
// Caches are [total_slots, kv_cols]; slot * kv_cols is size_t. Grid rows, block 256.
extern "C" __global__ void __launch_bounds__(ELEMWISE_THREADS)
    write_kv_f16(const float* __restrict__ qkv, int qkv_stride, int k_off, int v_off, int kv_cols,
                 const uint32_t* __restrict__ slots, __half* __restrict__ k_cache, __half* __restrict__ v_cache,
                 int rows) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const float* src = qkv + (size_t)r * qkv_stride;
    const size_t dst = (size_t)slots[r] * kv_cols;
    for (int c = threadIdx.x; c < kv_cols; c += blockDim.x) {
        k_cache[dst + c] = __float2half_rn(src[k_off + c]);
        v_cache[dst + c] = __float2half_rn(src[v_off + c]);
    }
}

// x[i] = gelu(x[i]) in place: kind 0 is quick GELU, x * sigmoid(1.702 x) (transformers'
// quick_gelu, written as the CPU writes it), kind 1 the exact x/2 * (1 + erf(x / sqrt 2)) with
// fp32 erff (the CPU evaluates erf in f64: the two differ by an ulp or two). Grid-stride over n.
extern "C" __global__ void __launch_bounds__(ELEMWISE_THREADS) gelu_f32(float* x, int n, int kind) {
    for (size_t i = zoe::grid_start(); i < (size_t)n; i += zoe::grid_stride()) {
        const float v = x[i];
        x[i] = kind == 0 ? v * (1.0f / (1.0f + expf(-1.702f * v))) : 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    }
}
