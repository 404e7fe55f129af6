// Token selection on the device: logits f32 [rows, V], one block of SAMPLE_THREADS (1024) per row,
// grid = rows. Output one uint32 token id per row.
//
// NaN logits count as -inf (never chosen), like the CPU sampler. Argmax ties go to the lowest
// index; a row of only -inf/NaN yields 0.
#include "common.cuh"

#define SAMPLE_THREADS 1024
// Candidates kept in shared memory for the threshold search (32 KiB of f32 weights).
#define SAMPLE_CAND_CAP 8192
// Weight levels 2^-3, 2^-6, ..., 2^-24 counted in the first weight pass (see sample_f32).
#define SAMPLE_LEVELS 8

namespace zoe {

__device__ __forceinline__ float sanitize(float v) { return v != v ? -INFINITY : v; }

// (v, i) beats (bv, bi): larger value, or equal value and smaller index.
__device__ __forceinline__ bool better(float v, uint32_t i, float bv, uint32_t bi) {
    return v > bv || (v == bv && i < bi);
}

// Block-wide argmax of the row; every thread gets the result. Scratch: 32 floats + 32 uints.
__device__ __forceinline__ void row_argmax(const float* __restrict__ row, int V, float& best_v, uint32_t& best_i,
                                           float* sv, uint32_t* si) {
    float bv = -INFINITY;
    uint32_t bi = 0xFFFFFFFFu;  // loses every tie, so an all -inf row still yields index 0
    if ((V & 3) == 0 && aligned16(row)) {
        for (int q = threadIdx.x; q < (V >> 2); q += SAMPLE_THREADS) {
            const float4 x = ldg(reinterpret_cast<const float4*>(row) + q);
            const float xs[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float v = sanitize(xs[e]);
                if (better(v, 4 * q + e, bv, bi)) bv = v, bi = 4 * q + e;
            }
        }
    } else {
        for (int k = threadIdx.x; k < V; k += SAMPLE_THREADS) {
            const float v = sanitize(ldg(row + k));
            if (better(v, k, bv, bi)) bv = v, bi = k;
        }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(ZOE_FULL_MASK, bv, o);
        const uint32_t oi = __shfl_xor_sync(ZOE_FULL_MASK, bi, o);
        if (better(ov, oi, bv, bi)) bv = ov, bi = oi;
    }
    if (lane == 0) sv[warp] = bv, si[warp] = bi;
    __syncthreads();
    bv = lane < SAMPLE_THREADS / 32 ? sv[lane] : -INFINITY;
    bi = lane < SAMPLE_THREADS / 32 ? si[lane] : 0xFFFFFFFFu;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(ZOE_FULL_MASK, bv, o);
        const uint32_t oi = __shfl_xor_sync(ZOE_FULL_MASK, bi, o);
        if (better(ov, oi, bv, bi)) bv = ov, bi = oi;
    }
    __syncthreads();
    best_v = bv;
    best_i = bi;
}

// Unnormalized probability of a logit at temperature T relative to the row max mx:
// exp((l - mx) / T) in [0, 1] (the max itself weighs 1). When the max is +inf only the +inf
// logits count, equally (the CPU sampler does the same).
struct Weight {
    float mx, T;
    bool inf_max;
    __device__ __forceinline__ float operator()(float l) const {
        l = sanitize(l);
        if (inf_max) return l == INFINITY ? 1.0f : 0.0f;
        return l == -INFINITY ? 0.0f : expf((l - mx) / T);
    }
};

// Count and mass of the weights >= t, over the shared-memory candidates or over the whole row.
__device__ __forceinline__ void eval_cand(const float* cand, int n, float t, float& cnt, float& mass,
                                          float* scratch) {
    float v[2] = {0.0f, 0.0f};
    for (int i = threadIdx.x; i < n; i += SAMPLE_THREADS) {
        const float e = cand[i];
        if (e >= t) v[0] += 1.0f, v[1] += e;
    }
    block_sum_n<SAMPLE_THREADS, 2>(v, scratch);
    cnt = v[0];
    mass = v[1];
}

__device__ __forceinline__ void eval_row(const float* __restrict__ row, int V, const Weight& W, float t, float& cnt,
                                         float& mass, float* scratch) {
    float v[2] = {0.0f, 0.0f};
    for (int i = threadIdx.x; i < V; i += SAMPLE_THREADS) {
        const float e = W(ldg(row + i));
        if (e >= t) v[0] += 1.0f, v[1] += e;
    }
    block_sum_n<SAMPLE_THREADS, 2>(v, scratch);
    cnt = v[0];
    mass = v[1];
}

// Inclusive prefix sum over the block in thread order. Scratch: 32 floats.
__device__ __forceinline__ float block_inclusive_scan(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const float u = __shfl_up_sync(ZOE_FULL_MASK, v, o);
        if (lane >= o) v += u;
    }
    if (lane == 31) scratch[warp] = v;
    __syncthreads();
    float w = lane < SAMPLE_THREADS / 32 ? scratch[lane] : 0.0f;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const float u = __shfl_up_sync(ZOE_FULL_MASK, w, o);
        if (lane >= o) w += u;
    }
    // Lane k of w holds the sum of warps 0..k; this warp adds the sum of the warps before it.
    const float before = __shfl_sync(ZOE_FULL_MASK, w, (warp + 31) & 31);
    __syncthreads();
    return warp > 0 ? v + before : v;
}

}  // namespace zoe

// out[r] = the index of the largest logit of row r (lowest index among equal maxima; NaN counts
// as -inf; an all -inf row gives 0). Grid rows, block SAMPLE_THREADS.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    argmax_f32(const float* __restrict__ logits, int V, uint32_t* __restrict__ out) {
    __shared__ float sv[32];
    __shared__ uint32_t si[32];
    if (V <= 0) {
        if (threadIdx.x == 0) out[blockIdx.x] = 0;
        return;
    }
    float v;
    uint32_t i;
    zoe::row_argmax(logits + (size_t)blockIdx.x * V, V, v, i, sv, si);
    if (threadIdx.x == 0) out[blockIdx.x] = i;
}

// Temperature / top-k / top-p sampling of row r with the caller's uniform draw u = uniform[r] in
// [0, 1). Grid rows, block SAMPLE_THREADS.
//
// Semantics: temperature[r] <= 0 (or NaN) -> argmax. Else p_i = softmax(logits / T); keep the
// top_k[r] most likely tokens (0 or >= V: no limit), then among those the smallest most-likely set
// whose mass reaches top_p[r] of theirs (>= 1: no limit), and pick the first token, walking the
// kept ones in index order, whose cumulative mass exceeds u * kept_mass. Equivalently, with
// unnormalized weights e_i = exp((l_i - max) / T) in [0, 1]: kept = {i : e_i >= t} for the
// threshold t that the two limits define.
//
// Ties: tokens whose weight equals the threshold exactly are all kept, so top-k may keep more than
// k tokens when several share the k-th weight, and top-p likewise at its boundary.
//
// How t is found without sorting: pass 1 finds the max (and the argmax fallback); pass 2 sums
// the weights and counts tokens and mass at or above 8 levels 2^-3 .. 2^-24. The highest level
// whose set already satisfies the limits (>= k tokens; or mass >= top_p of the total without
// top-k) contains the kept set; if it has at most SAMPLE_CAND_CAP tokens, pass 3 copies their
// weights into shared memory, and the threshold search runs there. Otherwise (very flat
// distributions, or k > SAMPLE_CAND_CAP) the search re-reads the whole row each step. The search
// bisects the bit pattern of t (monotone for non-negative floats, so the result is an exact
// weight value): first the largest t with count(e >= t) >= k, then the largest t above it with
// mass(e >= t) >= top_p * mass(top-k set); it stops early once the boundary is pinned (exactly k
// tokens, or at most one candidate between the bounds), otherwise after at most 30 steps. Pass 4
// sums the kept weights over 1024 contiguous segments, scans them, and one warp walks the segment
// where u * kept_mass falls. If nothing is found (rounding, or no kept mass) the argmax is used.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_f32(const float* __restrict__ logits, int V, const float* __restrict__ temperature,
               const uint32_t* __restrict__ top_k, const float* __restrict__ top_p,
               const float* __restrict__ uniform, uint32_t* __restrict__ out) {
    __shared__ float cand[SAMPLE_CAND_CAP];
    __shared__ float scratch[32 * (1 + 2 * SAMPLE_LEVELS)];
    __shared__ float s_incl[SAMPLE_THREADS];
    __shared__ uint32_t si[32];
    __shared__ float s_wcnt[SAMPLE_LEVELS][32];
    __shared__ uint32_t s_owner, s_pick;
    const int r = blockIdx.x, tid = threadIdx.x, lane = tid & 31;
    if (V <= 0) {
        if (tid == 0) out[r] = 0;
        return;
    }
    const float* row = logits + (size_t)r * V;

    // Pass 1: max and argmax.
    float mx;
    uint32_t amax;
    zoe::row_argmax(row, V, mx, amax, scratch, si);
    const float T = temperature[r];
    if (!(T > 0.0f) || mx == -INFINITY) {
        if (tid == 0) out[r] = amax;
        return;
    }
    const zoe::Weight W{mx, T, mx == INFINITY};

    // Pass 2: total mass and the level statistics.
    float st[1 + 2 * SAMPLE_LEVELS];
#pragma unroll
    for (int q = 0; q < 1 + 2 * SAMPLE_LEVELS; ++q) st[q] = 0.0f;
    for (int i = tid; i < V; i += SAMPLE_THREADS) {
        const float e = W(zoe::ldg(row + i));
        st[0] += e;
#pragma unroll
        for (int q = 0; q < SAMPLE_LEVELS; ++q) {
            if (e >= __uint_as_float((uint32_t)(127 - 3 * (q + 1)) << 23)) {
                st[1 + q] += 1.0f;
                st[1 + SAMPLE_LEVELS + q] += e;
            }
        }
    }
    // Per-warp candidate counts per level, so pass 3 can place every warp's candidates at a fixed
    // offset: the candidate order, and with it every float sum over the candidates, is then the
    // same on every run (reproducible draws under a seed).
#pragma unroll
    for (int q = 0; q < SAMPLE_LEVELS; ++q) {
        const float c = zoe::warp_sum(st[1 + q]);
        if (lane == 0) s_wcnt[q][tid >> 5] = c;
    }
    zoe::block_sum_n<SAMPLE_THREADS, 1 + 2 * SAMPLE_LEVELS>(st, scratch);
    const float total = st[0];

    const uint32_t k = top_k[r];
    const bool has_k = k > 0 && k < (uint32_t)V;
    const float tp = top_p[r];
    const bool has_p = tp < 1.0f;  // NaN: no limit
    float t = 0.0f;                // kept = {e >= t}
    if (has_k || has_p) {
        // The highest level that already holds the kept set, if small enough for shared memory.
        int level = -1;
        float level_count = 0.0f;  // (selected with constant indices: st stays in registers)
#pragma unroll
        for (int q = 0; q < SAMPLE_LEVELS; ++q) {
            const bool enough = has_k ? st[1 + q] >= (float)k : st[1 + SAMPLE_LEVELS + q] >= tp * total;
            if (level < 0 && enough) {
                level = st[1 + q] <= (float)SAMPLE_CAND_CAP ? q : SAMPLE_LEVELS;
                level_count = st[1 + q];
            }
        }
        const bool in_smem = level >= 0 && level < SAMPLE_LEVELS;
        uint32_t lo = 0;  // bit pattern of the lower bound; every kept weight is >= it
        int n_cand = 0;
        if (in_smem) {
            lo = (uint32_t)(127 - 3 * (level + 1)) << 23;
            const float eps = __uint_as_float(lo);
            // Pass 3: copy the candidates' weights, each warp's in its pass-2 order at its offset.
            const int warp = tid >> 5;
            const float before = zoe::warp_sum(lane < warp ? s_wcnt[level][lane] : 0.0f);
            uint32_t pos = (uint32_t)before;
            for (int base = warp * 32; base < V; base += SAMPLE_THREADS) {  // warp-uniform
                const int i = base + lane;
                const float e = i < V ? W(zoe::ldg(row + i)) : 0.0f;
                const bool take = i < V && e >= eps;
                const uint32_t mask = __ballot_sync(ZOE_FULL_MASK, take);
                const uint32_t at = pos + __popc(mask & ((1u << lane) - 1u));
                if (take && at < SAMPLE_CAND_CAP) cand[at] = e;
                pos += __popc(mask);
            }
            __syncthreads();
            n_cand = (int)level_count;
        }
        auto eval = [&](uint32_t bits, float& c, float& m) {
            if (in_smem)
                zoe::eval_cand(cand, n_cand, __uint_as_float(bits), c, m, scratch);
            else
                zoe::eval_row(row, V, W, __uint_as_float(bits), c, m, scratch);
        };
        float c_lo, m_lo;
        eval(lo, c_lo, m_lo);
        const uint32_t ABOVE_ONE = 0x3F800001u;  // no weight reaches it: count 0
        if (has_k) {
            // Largest t with count(e >= t) >= k.
            uint32_t hi = ABOVE_ONE;
            while (hi - lo > 1 && c_lo != (float)k) {
                const uint32_t mid = lo + (hi - lo) / 2;
                float c, m;
                eval(mid, c, m);
                if (c >= (float)k)
                    lo = mid, c_lo = c, m_lo = m;
                else
                    hi = mid;
            }
        }
        if (has_p) {
            // Largest t (above the top-k bound) with mass(e >= t) >= top_p * mass(top-k set).
            const float target = tp * (has_k ? m_lo : total);
            uint32_t hi = ABOVE_ONE;
            float c_hi = 0.0f;
            while (hi - lo > 1 && c_lo - c_hi > 1.0f) {
                const uint32_t mid = lo + (hi - lo) / 2;
                float c, m;
                eval(mid, c, m);
                if (m >= target)
                    lo = mid, c_lo = c;
                else
                    hi = mid, c_hi = c;
            }
        }
        t = __uint_as_float(lo);
    }

    // Pass 4: kept mass per contiguous segment, scanned in index order.
    const int seg = (V + SAMPLE_THREADS - 1) / SAMPLE_THREADS;
    const int sb = min(tid * seg, V), se = min(sb + seg, V);
    float local = 0.0f;
    for (int i = sb; i < se; ++i) {
        const float e = W(zoe::ldg(row + i));
        if (e >= t) local += e;
    }
    const float incl = zoe::block_inclusive_scan(local, scratch);
    s_incl[tid] = incl;
    if (tid == 0) s_owner = 0xFFFFFFFFu, s_pick = 0xFFFFFFFFu;
    __syncthreads();
    const float kept = s_incl[SAMPLE_THREADS - 1];
    const float target = uniform[r] * kept;
    // The owner is the first segment whose inclusive sum passes the target, so everything before
    // it sums to at most the target (taking the first, not "the one whose interval contains the
    // target", stays deterministic even if rounding made the scan dip somewhere).
    const uint32_t hit = __ballot_sync(ZOE_FULL_MASK, kept > 0.0f && incl > target);
    if (lane == 0 && hit) atomicMin(&s_owner, (uint32_t)(tid + __ffs(hit) - 1));
    __syncthreads();
    const uint32_t owner = s_owner;
    if (owner != 0xFFFFFFFFu && tid < 32) {
        // Warp 0 walks the owner's segment in index order, 32 tokens per step.
        float base = owner > 0 ? s_incl[owner - 1] : 0.0f;
        const int ob = min((int)owner * seg, V), oe = min(ob + seg, V);
        int last = -1;  // last kept token with weight > 0, if the walk falls short by rounding
        bool done = false;
        for (int c = ob; c < oe && !done; c += 32) {  // warp-uniform loop
            const int i = c + lane;
            float e = i < oe ? W(zoe::ldg(row + i)) : 0.0f;
            if (!(e >= t)) e = 0.0f;
            float cum = e;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const float u = __shfl_up_sync(ZOE_FULL_MASK, cum, o);
                if (lane >= o) cum += u;
            }
            cum += base;
            // Strictly greater: a zero-weight token can never be the one that crosses.
            const uint32_t cross = __ballot_sync(ZOE_FULL_MASK, e > 0.0f && cum > target);
            if (cross) {
                if (lane == 0) s_pick = (uint32_t)(c + __ffs(cross) - 1);
                done = true;
            }
            const uint32_t nz = __ballot_sync(ZOE_FULL_MASK, e > 0.0f);
            if (nz) last = c + 31 - __clz(nz);
            base = __shfl_sync(ZOE_FULL_MASK, cum, 31);
        }
        if (!done && lane == 0 && last >= 0) s_pick = (uint32_t)last;
    }
    __syncthreads();
    if (tid == 0) out[r] = s_pick != 0xFFFFFFFFu ? s_pick : amax;
}
