// Rotary position embedding, NEOX / rotate-half pairing (Su et al. 2021 as laid out by GPT-NeoX,
// HF `rotate_half`; Llama/Qwen checkpoints in HF layout): within each head of width d, element i
// pairs with element i + d/2, i < d/2, rotated by angle = position * inv_freq[i].
//
// Numerics follow the CPU reference: the angle is one fp32 multiply of the position (converted to
// fp32) by inv_freq[i]; sin and cos are the accurate sincosf (not __sinf/__cosf: angles reach
// tens of thousands of radians and the fast versions lose all precision there); the products are
// rounded separately (__fmul_rn blocks contraction into fma) so the rotation rounds like the CPU's.
//
// Launch: grid (rows, n_heads), block head_dim / 2 threads (head_dim even, <= 2048; 64, 80 and
// 128 in practice). Thread i rotates pair (i, i + head_dim/2) of head blockIdx.y of row blockIdx.x.
#include "common.cuh"

// x: row r starts at x + r*stride; head h occupies columns h*head_dim .. +head_dim (the first
// n_heads heads are rotated, e.g. the q heads, or the k heads with x offset to the k columns).
//
// Multimodal RoPE (Qwen2-VL M-RoPE): a row has pos_stride positions (1, or 3 = t, h, w); pair i
// turns with position 0 below sec_end0, position 1 below sec_end1, else position 2 (clamped to the
// row's positions). Plain RoPE passes pos_stride 1 and sec_end0 = head_dim / 2.
extern "C" __global__ void rope_f32(float* x, int rows, int stride, int n_heads, int head_dim,
                                    const uint32_t* __restrict__ positions, int pos_stride, int sec_end0,
                                    int sec_end1, const float* __restrict__ inv_freq) {
    const int r = blockIdx.x, h = blockIdx.y, i = threadIdx.x, half = head_dim >> 1;
    if (r >= rows || h >= n_heads || i >= half) return;
    int comp = i < sec_end0 ? 0 : (i < sec_end1 ? 1 : 2);
    if (comp >= pos_stride) comp = pos_stride - 1;
    const float angle = (float)positions[(size_t)r * pos_stride + comp] * inv_freq[i];
    float s, c;
    sincosf(angle, &s, &c);
    float* head = x + (size_t)r * stride + (size_t)h * head_dim;
    const float a = head[i], b = head[i + half];
    head[i] = __fmul_rn(a, c) - __fmul_rn(b, s);
    head[i + half] = __fmul_rn(a, s) + __fmul_rn(b, c);
}
