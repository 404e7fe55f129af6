// Causal grouped-query attention over the paged fp16 KV cache.
//
// Layout shared by all kernels here. Query row r (one token of some sequence):
//   q head h       qkv[r*qkv_stride + h*D .. +D]                      (f32)
//   visible ctx    positions p = 0 .. row_ctx[r]-1 of its sequence
//   K/V of p       k_cache[slot*kv_cols + kvh*D .. +D], slot = slots[row_slot_off[r] + p]
//                  (v_cache the same), kvh = h / (n_heads / n_kv_heads)
//   output         out[r*out_stride + h*D + d]                        (f32)
// Scores are (q . k) * scale, softmax in fp32 relative to the running max, fp32 accumulation.
// D is a template parameter: decode is instantiated for 64 and 128 (the decoders' head dims),
// prefill also for 16 and 80 (the vision towers': Qwen2-VL-7B's is 80, the tiny test model's 16).
// kv_cols % 8 == 0 (it is n_kv_heads * D), so every K/V head row is 16-byte aligned and read with
// 128-bit loads.
//
// The prefill kernel is also the vision tower's bidirectional attention: a row whose visible
// positions are its whole span (row_ctx = span length, slots = the span's rows) attends without
// a causal mask, and every row of a tile must then share the span (see attention_spans in
// src/backend/cuda).
//
// Online softmax (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"):
// a stream of scores keeps (m = running max, l = sum exp(s - m), acc = sum exp(s - m) v); a new
// max rescales l and acc by exp(m_old - m_new); two streams merge the same way. Empty streams are
// (m = -inf, l = 0, acc = 0) and every merge guards exp(-inf - -inf).
#include "common.cuh"

#define ATTN_DECODE_THREADS 128
#define ATTN_PREFILL_THREADS 128
// Query rows per prefill tile (the launcher's tile_rows[t] must not exceed it).
#define PREFILL_TILE_ROWS 32
// K/V positions staged in shared memory per step of the prefill kernel.
#define PREFILL_CHUNK 32

namespace zoe {

__device__ __forceinline__ void h8_to_float(const uint4& v, float (&f)[8]) {
    const float2 a = h2_bits_to_float2(v.x), b = h2_bits_to_float2(v.y);
    const float2 c = h2_bits_to_float2(v.z), d = h2_bits_to_float2(v.w);
    f[0] = a.x, f[1] = a.y, f[2] = b.x, f[3] = b.y, f[4] = c.x, f[5] = c.y, f[6] = d.x, f[7] = d.y;
}

// exp(m - m_new) for merging a stream whose max is m into one whose max becomes m_new; 0 for an
// empty stream (m = -inf), whatever m_new is.
__device__ __forceinline__ float rescale(float m, float m_new) { return m == -INFINITY ? 0.0f : expf(m - m_new); }

// ---------------------------------------------------------------------------------------------
// Decode, split-K ("flash decoding", Dao et al. 2023): block (r, h, s) covers positions
// [s*split_len, min((s+1)*split_len, row_ctx[r])) and writes its unnormalized partial result;
// attention_reduce_* combines the splits. Grid (rows, n_heads, n_splits), block 128.
//
// Inside a block: 16 streams of 8 lanes. Stream t takes positions p_begin + t, + 16, ...; its 8
// lanes split the head dimension (lane j holds dims 8(j + 8v) .. +8, v < D/64: one 16-byte load
// of K and of V per v, so a stream reads each 128/256-byte head row as one coalesced segment).
// The q.k dot is 8 FMAs per lane and v plus a 3-step shuffle within the 8 lanes; each stream runs
// its own online softmax, so there is no shared-memory staging and no barrier in the loop. The
// 16 streams merge at the end (shuffles across the warp's 4 streams, then shared memory across
// the 4 warps).
// part_out [rows, n_heads, n_splits, D]: sum_p exp(score_p - max) * v_p (unnormalized)
// part_ml  [rows, n_heads, n_splits, 2]: (max, sum_p exp(score_p - max)); empty: (-inf, 0), out 0.
template <int D>
__device__ __forceinline__ void attention_decode(const float* __restrict__ qkv, int qkv_stride,
                                                 const __half* __restrict__ k_cache,
                                                 const __half* __restrict__ v_cache, int kv_cols,
                                                 const uint32_t* __restrict__ slots,
                                                 const uint32_t* __restrict__ row_slot_off,
                                                 const uint32_t* __restrict__ row_ctx, int n_heads, int n_kv_heads,
                                                 float scale, int split_len, float* __restrict__ part_out,
                                                 float* __restrict__ part_ml, int n_splits) {
    constexpr int NV = D / 64;
    constexpr int STREAMS = ATTN_DECODE_THREADS / 8;
    constexpr int WARPS = ATTN_DECODE_THREADS / 32;
    const int r = blockIdx.x, h = blockIdx.y, s = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, grp = lane >> 3, j = lane & 7;

    const int ctx = (int)row_ctx[r];
    const long long begin_ll = (long long)s * split_len;
    const int p_begin = begin_ll < ctx ? (int)begin_ll : ctx;
    const int p_end = min(p_begin + split_len, ctx);
    const int kvh = h / (n_heads / n_kv_heads);

    float qv[NV][8];
    const float* q = qkv + (size_t)r * qkv_stride + (size_t)h * D;
#pragma unroll
    for (int v = 0; v < NV; ++v)
#pragma unroll
        for (int e = 0; e < 8; ++e) qv[v][e] = q[8 * (j + 8 * v) + e];

    float m = -INFINITY, l = 0.0f, acc[NV][8];
#pragma unroll
    for (int v = 0; v < NV; ++v)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[v][e] = 0.0f;

    const uint32_t* sl = slots + row_slot_off[r];
    const size_t col = (size_t)kvh * D + 8 * j;

    // One position of this lane's stream; `valid` is per stream (8 lanes), the shuffles run on
    // every lane of the warp.
    auto step = [&](const uint4 (&kr)[NV], const uint4 (&vr)[NV], bool valid) {
        float dot = 0.0f;
#pragma unroll
        for (int v = 0; v < NV; ++v) {
            float kf[8];
            h8_to_float(kr[v], kf);
#pragma unroll
            for (int e = 0; e < 8; ++e) dot = fmaf(qv[v][e], kf[e], dot);
        }
        dot += __shfl_xor_sync(ZOE_FULL_MASK, dot, 1);
        dot += __shfl_xor_sync(ZOE_FULL_MASK, dot, 2);
        dot += __shfl_xor_sync(ZOE_FULL_MASK, dot, 4);
        if (!valid) return;
        const float sc = dot * scale;
        if (sc > m) {
            const float a = rescale(m, sc);
            l *= a;
#pragma unroll
            for (int v = 0; v < NV; ++v)
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[v][e] *= a;
            m = sc;
        }
        const float p = expf(sc - m);
        l += p;
#pragma unroll
        for (int v = 0; v < NV; ++v) {
            float vf[8];
            h8_to_float(vr[v], vf);
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[v][e] = fmaf(p, vf[e], acc[v][e]);
        }
    };

    // Two positions per stream and iteration, all four K/V loads issued first. The loop bound is
    // warp-uniform (pb depends on the warp only) so the shuffles always see all 32 lanes.
    for (int pb = p_begin + warp * 4; pb < p_end; pb += 2 * STREAMS) {
        const int p0 = pb + grp, p1 = pb + STREAMS + grp;
        const bool ok0 = p0 < p_end, ok1 = p1 < p_end;
        const size_t b0 = (size_t)sl[ok0 ? p0 : p_begin] * kv_cols + col;
        const size_t b1 = (size_t)sl[ok1 ? p1 : p_begin] * kv_cols + col;
        uint4 k0[NV], v0[NV], k1[NV], v1[NV];
#pragma unroll
        for (int v = 0; v < NV; ++v) {
            k0[v] = ldg(reinterpret_cast<const uint4*>(k_cache + b0 + 64 * v));
            v0[v] = ldg(reinterpret_cast<const uint4*>(v_cache + b0 + 64 * v));
            k1[v] = ldg(reinterpret_cast<const uint4*>(k_cache + b1 + 64 * v));
            v1[v] = ldg(reinterpret_cast<const uint4*>(v_cache + b1 + 64 * v));
        }
        step(k0, v0, ok0);
        step(k1, v1, ok1);
    }

    // Merge the warp's 4 streams (lanes j, j+8, j+16, j+24 hold the same dims).
#pragma unroll
    for (int off = 8; off <= 16; off <<= 1) {
        const float mo = __shfl_xor_sync(ZOE_FULL_MASK, m, off);
        const float lo = __shfl_xor_sync(ZOE_FULL_MASK, l, off);
        const float mn = fmaxf(m, mo);
        const float a = rescale(m, mn), b = rescale(mo, mn);
        l = l * a + lo * b;
#pragma unroll
        for (int v = 0; v < NV; ++v)
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const float o = __shfl_xor_sync(ZOE_FULL_MASK, acc[v][e], off);
                acc[v][e] = acc[v][e] * a + o * b;
            }
        m = mn;
    }

    // Merge the 4 warps.
    __shared__ float s_acc[WARPS][D];
    __shared__ float s_m[WARPS], s_l[WARPS];
    if (lane < 8) {
#pragma unroll
        for (int v = 0; v < NV; ++v)
#pragma unroll
            for (int e = 0; e < 8; ++e) s_acc[warp][8 * (j + 8 * v) + e] = acc[v][e];
        if (lane == 0) {
            s_m[warp] = m;
            s_l[warp] = l;
        }
    }
    __syncthreads();
    const size_t idx = ((size_t)r * n_heads + h) * n_splits + s;
    for (int d = threadIdx.x; d < D; d += ATTN_DECODE_THREADS) {
        float mx = -INFINITY;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) mx = fmaxf(mx, s_m[w]);
        float lsum = 0.0f, o = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            const float f = rescale(s_m[w], mx);
            lsum += s_l[w] * f;
            o += s_acc[w][d] * f;
        }
        part_out[idx * D + d] = o;
        if (d == 0) {
            part_ml[idx * 2] = mx;
            part_ml[idx * 2 + 1] = lsum;
        }
    }
}

// Combines the n_splits partial results of (r, h): global max, rescale, divide by the total sum.
// Grid (rows, n_heads), block D. A row with no visible position (all splits empty) gets 0.
template <int D>
__device__ __forceinline__ void attention_reduce(const float* __restrict__ part_out, const float* __restrict__ part_ml,
                                                 int n_splits, int n_heads, float* __restrict__ out, int out_stride) {
    const int r = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
    if (d >= D) return;
    const size_t idx = ((size_t)r * n_heads + h) * n_splits;
    const float* ml = part_ml + idx * 2;
    float mx = -INFINITY;
    for (int s = 0; s < n_splits; ++s) mx = fmaxf(mx, ml[2 * s]);
    float lsum = 0.0f, o = 0.0f;
    for (int s = 0; s < n_splits; ++s) {
        const float f = rescale(ml[2 * s], mx);
        lsum += ml[2 * s + 1] * f;
        o += part_out[(idx + s) * D + d] * f;
    }
    out[(size_t)r * out_stride + (size_t)h * D + d] = lsum > 0.0f ? o / lsum : 0.0f;
}

// ---------------------------------------------------------------------------------------------
// Prefill, flash-attention style (Dao et al. 2022) on CUDA cores: block (t, h) takes the tile's
// up to 32 query rows of one sequence for head h. Thread layout: 4 threads per query row; thread
// j of a row holds the row's q and output accumulator for dims 16v + 4j .. +4 (v < D/16), in
// registers. The block walks the context in chunks of PREFILL_CHUNK positions: all 128 threads
// stage the chunk's K and V rows (converted to f32) in shared memory, then every row scores the
// chunk 8 positions at a time (each thread reads K/V as float4; the 4 threads of a row read 4
// consecutive float4, every row the same ones: broadcast, no bank conflicts), masks positions at
// or past its own row_ctx, and folds them into its online softmax.
// Shared memory: 2 * PREFILL_CHUNK * D * 4 bytes, static (32 KiB for D = 128, 20 KiB for 80, 16 KiB for 64).
template <int D>
__device__ __forceinline__ void attention_prefill(const float* __restrict__ qkv, int qkv_stride,
                                                  const __half* __restrict__ k_cache,
                                                  const __half* __restrict__ v_cache, int kv_cols,
                                                  const uint32_t* __restrict__ slots,
                                                  const uint32_t* __restrict__ row_slot_off,
                                                  const uint32_t* __restrict__ row_ctx,
                                                  const uint32_t* __restrict__ tile_row0,
                                                  const uint32_t* __restrict__ tile_rows, int n_heads, int n_kv_heads,
                                                  float scale, float* __restrict__ out, int out_stride) {
    constexpr int TPR = ATTN_PREFILL_THREADS / PREFILL_TILE_ROWS;  // 4 threads per query row
    constexpr int NF = D / (4 * TPR);                              // float4 per thread
    constexpr int C = PREFILL_CHUNK;
    constexpr int SUB = 8;                                         // positions scored at once
    constexpr int ROW8 = D / 8;                                    // 16-byte pieces per K/V row
    static_assert(TPR == 4 && C % SUB == 0 && D % 16 == 0, "tile shape");
    __shared__ float4 ks[C][D / 4];
    __shared__ float4 vs[C][D / 4];

    const int t = blockIdx.x, h = blockIdx.y;
    const int row0 = (int)tile_row0[t];
    const int nrows = min((int)tile_rows[t], PREFILL_TILE_ROWS);
    const int i = threadIdx.x / TPR, j = threadIdx.x % TPR;
    const bool active = i < nrows;
    const int r = row0 + (active ? i : 0);
    const int ctx = active ? (int)row_ctx[r] : 0;
    // The block walks up to the longest context of the tile (normally its last row's).
    int cmax = 0;
    for (int ii = 0; ii < nrows; ++ii) cmax = max(cmax, (int)row_ctx[row0 + ii]);
    const uint32_t* sl = slots + row_slot_off[row0];
    const int kvh = h / (n_heads / n_kv_heads);
    const size_t col = (size_t)kvh * D;

    float4 qv[NF], acc[NF];
    const float* q = qkv + (size_t)r * qkv_stride + (size_t)h * D;
#pragma unroll
    for (int v = 0; v < NF; ++v) {
        const int d = 16 * v + 4 * j;
        qv[v] = make_float4(q[d], q[d + 1], q[d + 2], q[d + 3]);
        acc[v] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    float m = -INFINITY, l = 0.0f;

    for (int c0 = 0; c0 < cmax; c0 += C) {
        // Stage positions c0 .. c0+C (zeros past cmax) as f32.
        // C * ROW8 pieces: a whole number of passes for D = 64 and 128, a partial last pass for
        // 80 (320 pieces), fewer pieces than threads for 16.
        for (int idx = threadIdx.x; idx < C * ROW8; idx += ATTN_PREFILL_THREADS) {
            const int pp = idx / ROW8, c8 = idx % ROW8;
            const int p = c0 + pp;
            float kf[8], vf[8];
            if (p < cmax) {
                const size_t base = (size_t)sl[p] * kv_cols + col + 8 * c8;
                h8_to_float(ldg(reinterpret_cast<const uint4*>(k_cache + base)), kf);
                h8_to_float(ldg(reinterpret_cast<const uint4*>(v_cache + base)), vf);
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e) kf[e] = vf[e] = 0.0f;
            }
            ks[pp][2 * c8] = make_float4(kf[0], kf[1], kf[2], kf[3]);
            ks[pp][2 * c8 + 1] = make_float4(kf[4], kf[5], kf[6], kf[7]);
            vs[pp][2 * c8] = make_float4(vf[0], vf[1], vf[2], vf[3]);
            vs[pp][2 * c8 + 1] = make_float4(vf[4], vf[5], vf[6], vf[7]);
        }
        __syncthreads();

        const int n = min(C, cmax - c0);  // block-uniform
        for (int sb = 0; sb < n; sb += SUB) {
            float sc[SUB];
#pragma unroll
            for (int e = 0; e < SUB; ++e) {
                float dot = 0.0f;
#pragma unroll
                for (int v = 0; v < NF; ++v) {
                    const float4 k = ks[sb + e][4 * v + j];
                    dot = fmaf(qv[v].x, k.x, dot);
                    dot = fmaf(qv[v].y, k.y, dot);
                    dot = fmaf(qv[v].z, k.z, dot);
                    dot = fmaf(qv[v].w, k.w, dot);
                }
                dot += __shfl_xor_sync(ZOE_FULL_MASK, dot, 1);
                dot += __shfl_xor_sync(ZOE_FULL_MASK, dot, 2);
                sc[e] = c0 + sb + e < ctx ? dot * scale : -INFINITY;
            }
            float mx = sc[0];
#pragma unroll
            for (int e = 1; e < SUB; ++e) mx = fmaxf(mx, sc[e]);
            if (mx != -INFINITY) {  // else none of the 8 is visible to this row
                if (mx > m) {
                    const float a = rescale(m, mx);
                    l *= a;
#pragma unroll
                    for (int v = 0; v < NF; ++v) {
                        acc[v].x *= a, acc[v].y *= a, acc[v].z *= a, acc[v].w *= a;
                    }
                    m = mx;
                }
#pragma unroll
                for (int e = 0; e < SUB; ++e) {
                    const float p = expf(sc[e] - m);  // masked: exp(-inf) = 0
                    l += p;
#pragma unroll
                    for (int v = 0; v < NF; ++v) {
                        const float4 vv = vs[sb + e][4 * v + j];
                        acc[v].x = fmaf(p, vv.x, acc[v].x);
                        acc[v].y = fmaf(p, vv.y, acc[v].y);
                        acc[v].z = fmaf(p, vv.z, acc[v].z);
                        acc[v].w = fmaf(p, vv.w, acc[v].w);
                    }
                }
            }
        }
        __syncthreads();  // before the next chunk overwrites ks/vs
    }

    if (!active) return;
    float* o = out + (size_t)r * out_stride + (size_t)h * D;
#pragma unroll
    for (int v = 0; v < NF; ++v) {
        const int d = 16 * v + 4 * j;
        // A row that sees nothing (row_ctx 0) writes 0 rather than 0/0.
        o[d] = l > 0.0f ? acc[v].x / l : 0.0f;
        o[d + 1] = l > 0.0f ? acc[v].y / l : 0.0f;
        o[d + 2] = l > 0.0f ? acc[v].z / l : 0.0f;
        o[d + 3] = l > 0.0f ? acc[v].w / l : 0.0f;
    }
}

}  // namespace zoe

#define ZOE_ATTN_DECODE(D)                                                                                        \
    extern "C" __global__ void __launch_bounds__(ATTN_DECODE_THREADS, 4) attention_decode_d##D##_f16(                \
        const float* __restrict__ qkv, int qkv_stride, const __half* __restrict__ k_cache,                         \
        const __half* __restrict__ v_cache, int kv_cols, const uint32_t* __restrict__ slots,                       \
        const uint32_t* __restrict__ row_slot_off, const uint32_t* __restrict__ row_ctx, int n_heads,              \
        int n_kv_heads, float scale, int split_len, float* __restrict__ part_out, float* __restrict__ part_ml,     \
        int n_splits) {                                                                                            \
        zoe::attention_decode<D>(qkv, qkv_stride, k_cache, v_cache, kv_cols, slots, row_slot_off, row_ctx,       \
                                 n_heads, n_kv_heads, scale, split_len, part_out, part_ml, n_splits);             \
    }

#define ZOE_ATTN_REDUCE(D)                                                                                        \
    extern "C" __global__ void __launch_bounds__(D) attention_reduce_d##D##_f32(                                  \
        const float* __restrict__ part_out, const float* __restrict__ part_ml, int n_splits, int n_heads,         \
        float* __restrict__ out, int out_stride) {                                                                 \
        zoe::attention_reduce<D>(part_out, part_ml, n_splits, n_heads, out, out_stride);                          \
    }

#define ZOE_ATTN_PREFILL(D)                                                                                       \
    extern "C" __global__ void __launch_bounds__(ATTN_PREFILL_THREADS) attention_prefill_d##D##_f16(              \
        const float* __restrict__ qkv, int qkv_stride, const __half* __restrict__ k_cache,                         \
        const __half* __restrict__ v_cache, int kv_cols, const uint32_t* __restrict__ slots,                       \
        const uint32_t* __restrict__ row_slot_off, const uint32_t* __restrict__ row_ctx,                           \
        const uint32_t* __restrict__ tile_row0, const uint32_t* __restrict__ tile_rows, int n_heads,               \
        int n_kv_heads, float scale, float* __restrict__ out, int out_stride) {                                    \
        zoe::attention_prefill<D>(qkv, qkv_stride, k_cache, v_cache, kv_cols, slots, row_slot_off, row_ctx,      \
                                  tile_row0, tile_rows, n_heads, n_kv_heads, scale, out, out_stride);             \
    }

ZOE_ATTN_DECODE(64)
ZOE_ATTN_DECODE(128)
ZOE_ATTN_REDUCE(64)
ZOE_ATTN_REDUCE(128)
ZOE_ATTN_PREFILL(16)
ZOE_ATTN_PREFILL(64)
ZOE_ATTN_PREFILL(80)
ZOE_ATTN_PREFILL(128)
