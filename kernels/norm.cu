// RMSNorm (Zhang & Sennrich 2019, as in Llama/Qwen): out = x * (1 / sqrt(mean(x^2) + eps)) * w,
// fp32 throughout, the same operation order as the CPU reference (x * scale, then * w; 1/sqrt
// rather than rsqrtf, whose last bit differs).
//
// No __restrict__ on x/out/residual: in-place calls (out == x) are fine, since every thread
// reads an element before it writes the same element and never touches another thread's.
//
// Launch: grid = rows (one block per row), block NORM_THREADS = 1024 for every width. 1024 and
// not 256 because decode normalizes 1..8 rows: the kernel is then a single latency-bound block
// per row, and four times the threads finish a 3584-wide row in one float4 load each.
#include "common.cuh"

#define NORM_THREADS 1024

namespace zoe {

// Row length in float4 when every row start is 16-byte aligned (cols % 4 == 0 and aligned
// bases), else 0 for the scalar path.
__device__ __forceinline__ int norm_vec4(int cols, const void* a, const void* b, const void* c, const void* d) {
    return (cols & 3) == 0 && aligned16(a) && aligned16(b) && aligned16(c) && aligned16(d) ? cols >> 2 : 0;
}

__device__ __forceinline__ float rms_scale(float sum_sq, int cols, float eps) {
    return 1.0f / sqrtf(sum_sq / (float)cols + eps);
}

}  // namespace zoe

// out[r, :] = rms_norm(x[r, :]) * w; x, out [rows, cols], w [cols].
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    rms_norm_f32(const float* x, const float* __restrict__ w, float* out, int cols, float eps) {
    __shared__ float scratch[32];
    const size_t base = (size_t)blockIdx.x * cols;
    const float* xr = x + base;
    float* orow = out + base;
    const int n4 = zoe::norm_vec4(cols, xr, w, orow, orow);
    float ss = 0.0f;
    if (n4) {
        for (int i = threadIdx.x; i < n4; i += NORM_THREADS) {
            const float4 v = reinterpret_cast<const float4*>(xr)[i];
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
    } else {
        for (int i = threadIdx.x; i < cols; i += NORM_THREADS) ss += xr[i] * xr[i];
    }
    const float scale = zoe::rms_scale(zoe::block_sum<NORM_THREADS>(ss, scratch), cols, eps);
    if (n4) {
        for (int i = threadIdx.x; i < n4; i += NORM_THREADS) {
            const float4 v = reinterpret_cast<const float4*>(xr)[i];
            const float4 g = reinterpret_cast<const float4*>(w)[i];
            reinterpret_cast<float4*>(orow)[i] =
                make_float4(v.x * scale * g.x, v.y * scale * g.y, v.z * scale * g.z, v.w * scale * g.w);
        }
    } else {
        for (int i = threadIdx.x; i < cols; i += NORM_THREADS) orow[i] = xr[i] * scale * w[i];
    }
}

// residual[r, :] += x[r, :], then out[r, :] = rms_norm(residual[r, :]) * w (the pre-norm
// residual add fused with the next norm). The sum is stored before it is normalized, exactly as
// the CPU's separate add then norm would compute it.
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    add_rms_norm_f32(float* residual, const float* x, const float* __restrict__ w, float* out, int cols, float eps) {
    __shared__ float scratch[32];
    const size_t base = (size_t)blockIdx.x * cols;
    float* rr = residual + base;
    const float* xr = x + base;
    float* orow = out + base;
    const int n4 = zoe::norm_vec4(cols, rr, xr, w, orow);
    float ss = 0.0f;
    // Each thread re-reads only the elements it wrote itself, so no barrier is needed between
    // the residual update and the second pass.
    if (n4) {
        for (int i = threadIdx.x; i < n4; i += NORM_THREADS) {
            float4 v = reinterpret_cast<float4*>(rr)[i];
            const float4 d = reinterpret_cast<const float4*>(xr)[i];
            v.x += d.x, v.y += d.y, v.z += d.z, v.w += d.w;
            reinterpret_cast<float4*>(rr)[i] = v;
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
    } else {
        for (int i = threadIdx.x; i < cols; i += NORM_THREADS) {
            const float v = rr[i] + xr[i];
            rr[i] = v;
            ss += v * v;
        }
    }
    const float scale = zoe::rms_scale(zoe::block_sum<NORM_THREADS>(ss, scratch), cols, eps);
    if (n4) {
        for (int i = threadIdx.x; i < n4; i += NORM_THREADS) {
            const float4 v = reinterpret_cast<const float4*>(rr)[i];
            const float4 g = reinterpret_cast<const float4*>(w)[i];
            reinterpret_cast<float4*>(orow)[i] =
                make_float4(v.x * scale * g.x, v.y * scale * g.y, v.z * scale * g.z, v.w * scale * g.w);
        }
    } else {
        for (int i = threadIdx.x; i < cols; i += NORM_THREADS) orow[i] = rr[i] * scale * w[i];
    }
}

// LayerNorm (Ba et al. 2016, the vision tower's): out = (x - mean) * (1 / sqrt(var + eps)) * w + b
// with the biased variance mean((x - mean)^2), two block reductions (sum, then the centred sum of
// squares, which does not lose precision the way E[x^2] - mean^2 does), fp32 throughout, the
// CPU's expression order. In-place calls (out == x) are fine for the same reason as above. Same
// launch as rms_norm_f32: grid = rows, block NORM_THREADS.
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    layer_norm_f32(const float* x, const float* __restrict__ w, const float* __restrict__ b, float* out, int cols,
                   float eps) {
    __shared__ float scratch[32];
    const size_t base = (size_t)blockIdx.x * cols;
    const float* xr = x + base;
    float* orow = out + base;
    float s = 0.0f;
    for (int i = threadIdx.x; i < cols; i += NORM_THREADS) s += xr[i];
    const float mean = zoe::block_sum<NORM_THREADS>(s, scratch) / (float)cols;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < cols; i += NORM_THREADS) {
        const float d = xr[i] - mean;
        ss += d * d;
    }
    const float inv = 1.0f / sqrtf(zoe::block_sum<NORM_THREADS>(ss, scratch) / (float)cols + eps);
    for (int i = threadIdx.x; i < cols; i += NORM_THREADS) orow[i] = (xr[i] - mean) * inv * w[i] + b[i];
}
