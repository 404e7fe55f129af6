// The skeleton shared by the two decode GEMVs (awq.cu: int4 weights, linear.cu: fp16 weights):
// out[m, col0 + n] = sum_k x[m, k] * w[n, k] (+ bias[n]) for a few token rows m.
//
// Why this shape: at decode the weight matrix is read once per token step and is far larger than
// anything else, so the kernel is bound by weight bandwidth. Each weight chunk (one 128-bit load,
// coalesced along the contiguous K of its row) is loaded once per pass and reused for every token
// row of the pass; x is small and re-read through L1/L2 (never staged: 8 x 18944 floats do not fit
// in shared memory). A warp owns R = 2 consecutive output rows and walks all of K, so every x
// value a lane loads serves two weight rows; the 32 lanes' partial sums meet in a shuffle
// reduction. For M = 1 each lane keeps U = 2 chunks per row in flight to cover memory latency.
//
// Token rows go in passes of up to GEMV_MAX_M = 4: M = 5..8 reads the weights twice. That costs
// little: with that many rows the kernel is bound by x traffic through L1 and by FMAs rather than
// by weight bandwidth, and 4-row passes keep every path inside the register budget.
//
// Registers: one kernel serves every M, so its register count is its largest path's. The bound
// __launch_bounds__(256, GEMV_MIN_BLOCKS = 3) caps it at 80: 3 blocks = 24 warps per SM for the
// bandwidth-bound M = 1 case (at the 96 the paths would take uncapped, only 2 blocks fit). The
// choices above (R = 2, 4-row passes, U = 2 only for M = 1, one sub-chunk at a time, the light
// gemv_slow fallback) are what keep everything spill-free under that cap on sm_87 and sm_90.
//
// Launch: block GEMV_THREADS (256), grid ceil(N / GEMV_ROWS_PER_BLOCK); the mapping inside the
// block does not depend on N.
//
// A weight policy P supplies: `Raw` (one chunk of one row as loaded), `SUBS` (8-input sub-chunks
// per chunk), `U_M1` (chunks in flight per lane and row when M = 1), `chunks()` (per row),
// `load(raw, row, chunk)`, `dequant(raw, sub, w[8])` (the 8 weights as fp32, natural input
// order) and `k0(chunk, sub)` (first input of a sub-chunk); `x_vec` says whether x can be read
// with 128-bit loads, `K` is the inputs per row (masks a partial last sub-chunk).
#pragma once

#include "common.cuh"

#define GEMV_THREADS 256
#define GEMV_ROWS_PER_BLOCK 16
#define GEMV_MAX_M 4
#define GEMV_MIN_BLOCKS 3
#define GEMV_ROWS_PER_WARP 2

namespace zoe {

static_assert(GEMV_ROWS_PER_WARP * GEMV_THREADS / 32 == GEMV_ROWS_PER_BLOCK, "one warp per row pair");

// Reduces each lane's acc[M][R] over the warp and writes out[m*out_stride + col0 + n] =
// acc + bias[n] for the rows n < N.
template <int M, int R>
__device__ __forceinline__ void gemv_epilogue(float (&acc)[M][R], int n_first, const float* __restrict__ bias,
                                              float* __restrict__ out, int out_stride, int col0, int N) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int r = 0; r < R; ++r) acc[m][r] = warp_sum(acc[m][r]);
    // Lane m*R + r stores value (m, r): compile-time register indices, stores spread over lanes.
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int n = n_first + r;
            if (lane == ((m * R + r) & 31) && n < N) {
                const float b = bias ? ldg(bias + n) : 0.0f;
                out[(size_t)m * out_stride + col0 + n] = acc[m][r] + b;
            }
        }
}

// x[k .. k+8) of one token row into v. vec: 16-byte aligned, 128-bit loads. Otherwise scalar
// loads, with inputs at or past K read as 0 (the partial last sub-chunk when K % 8 != 0).
__device__ __forceinline__ void load_x8(const float* __restrict__ row, int k, int K, bool vec, float (&v)[8]) {
    if (vec) {
        const float4 a = ldg(reinterpret_cast<const float4*>(row + k));
        const float4 b = ldg(reinterpret_cast<const float4*>(row + k) + 1);
        v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
        v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = k + e < K ? ldg(row + k + e) : 0.0f;
    }
}

__device__ __forceinline__ void fma8(float& acc, const float (&x)[8], const float (&w)[8]) {
    float a = acc;
#pragma unroll
    for (int e = 0; e < 8; ++e) a = fmaf(x[e], w[e], a);
    acc = a;
}

// M (1..4) token rows against the block's 16 weight rows with weight policy P.
template <class P, int M>
__device__ __forceinline__ void gemv_rows(const P& p, const float* __restrict__ x, const float* __restrict__ bias,
                                          float* __restrict__ out, int out_stride, int col0, int N) {
    constexpr int R = GEMV_ROWS_PER_WARP, U = M == 1 ? P::U_M1 : 1;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n_first = blockIdx.x * GEMV_ROWS_PER_BLOCK + warp * R;
    const int K = p.K;

    // Rows past N are clamped to N - 1 (loaded, never stored) so every lane runs the same loop.
    int rows[R];
#pragma unroll
    for (int r = 0; r < R; ++r) rows[r] = min(n_first + r, N - 1);
    float acc[M][R];
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int r = 0; r < R; ++r) acc[m][r] = 0.0f;

    const int chunks = p.chunks();
    constexpr int STEP = 32;
    for (int c0 = lane; c0 < chunks; c0 += U * STEP) {
        // Issue every load of this round before using any of them.
        typename P::Raw raw[U][R];
#pragma unroll
        for (int t = 0; t < U; ++t) {
            const int c = c0 + t * STEP < chunks ? c0 + t * STEP : c0;
#pragma unroll
            for (int r = 0; r < R; ++r) p.load(raw[t][r], rows[r], c);
        }
#pragma unroll
        for (int t = 0; t < U; ++t) {
            const int c = c0 + t * STEP;
            if (t > 0 && c >= chunks) break;
            // One sub-chunk at a time, or the x loads of all of them get hoisted (spills).
#pragma unroll 1
            for (int sub = 0; sub < P::SUBS; ++sub) {
                const int k = p.k0(c, sub);
                float w[R][8];
#pragma unroll
                for (int r = 0; r < R; ++r) p.dequant(raw[t][r], sub, w[r]);
#pragma unroll
                for (int m = 0; m < M; ++m) {
                    float xv[8];
                    load_x8(x + (size_t)m * K, k, K, p.x_vec, xv);
#pragma unroll
                    for (int r = 0; r < R; ++r) fma8(acc[m][r], xv, w[r]);
                }
            }
        }
    }
    gemv_epilogue<M, R>(acc, n_first, bias, out, out_stride, col0, N);
}

template <class P>
__device__ __forceinline__ void gemv_dispatch(const P& p, const float* __restrict__ x, int M,
                                              const float* __restrict__ bias, float* __restrict__ out, int out_stride,
                                              int col0, int N) {
    switch (M) {
        case 1: gemv_rows<P, 1>(p, x, bias, out, out_stride, col0, N); break;
        case 2: gemv_rows<P, 2>(p, x, bias, out, out_stride, col0, N); break;
        case 3: gemv_rows<P, 3>(p, x, bias, out, out_stride, col0, N); break;
        default: gemv_rows<P, 4>(p, x, bias, out, out_stride, col0, N); break;
    }
}

// All M token rows in passes of up to GEMV_MAX_M (see the top of the file). The first pass is
// peeled out of the loop: with the loop around every pass the kernel spilled under the cap.
template <class P>
__device__ __forceinline__ void gemv_all(const P& p, const float* __restrict__ x, int M,
                                         const float* __restrict__ bias, float* __restrict__ out, int out_stride,
                                         int col0, int N) {
    gemv_dispatch(p, x, min(M, GEMV_MAX_M), bias, out, out_stride, col0, N);
#pragma unroll 1
    for (int m0 = GEMV_MAX_M; m0 < M; m0 += GEMV_MAX_M)
        gemv_dispatch(p, x + (size_t)m0 * p.K, min(M - m0, GEMV_MAX_M), bias, out + (size_t)m0 * out_stride,
                      out_stride, col0, N);
}

// The fallback for shapes and pointers the 128-bit policies cannot take (K % 8 != 0 for fp16,
// K % 32 != 0 or G % 32 != 0 for AWQ, misaligned pointers): same results, kept simple and light
// on registers rather than fast. Each warp does its two rows one after the other, up to 4 token
// rows at a time, one 8-input chunk per lane and step.
template <class P>
__device__ __forceinline__ void gemv_slow(const P& p, const float* __restrict__ x, int M,
                                          const float* __restrict__ bias, float* __restrict__ out, int out_stride,
                                          int col0, int N) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int K = p.K, chunks = p.chunks();
#pragma unroll 1
    for (int r = 0; r < GEMV_ROWS_PER_WARP; ++r) {
        const int n = blockIdx.x * GEMV_ROWS_PER_BLOCK + warp * GEMV_ROWS_PER_WARP + r;
        if (n >= N) break;  // warp-uniform
#pragma unroll 1
        for (int m0 = 0; m0 < M; m0 += GEMV_MAX_M) {
            const int mc = min(M - m0, GEMV_MAX_M);
            float acc[GEMV_MAX_M];
#pragma unroll
            for (int m = 0; m < GEMV_MAX_M; ++m) acc[m] = 0.0f;
            for (int c = lane; c < chunks; c += 32) {
                typename P::Raw raw;
                p.load(raw, n, c);
#pragma unroll 1
                for (int sub = 0; sub < P::SUBS; ++sub) {
                    float w[8];
                    p.dequant(raw, sub, w);
                    const int k = p.k0(c, sub);
#pragma unroll
                    for (int m = 0; m < GEMV_MAX_M; ++m) {
                        if (m < mc) {
                            float xv[8];
                            load_x8(x + (size_t)(m0 + m) * K, k, K, p.x_vec, xv);
                            fma8(acc[m], xv, w);
                        }
                    }
                }
            }
#pragma unroll
            for (int m = 0; m < GEMV_MAX_M; ++m) {
                const float s = warp_sum(acc[m]);
                if (lane == m && m < mc) {
                    const float b = bias ? ldg(bias + n) : 0.0f;
                    out[(size_t)(m0 + m) * out_stride + col0 + n] = s + b;
                }
            }
        }
    }
}

}  // namespace zoe
