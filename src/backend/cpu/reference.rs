//! The plain reference semantics of every op: simple loops over slices, no threads, no SIMD,
//! f32 weights. Fast paths in this module's siblings are tested against these functions, and the
//! CUDA backend will be too. Clarity beats speed here.

use super::blocks::dequantize_row;
use crate::backend::{AttnSeq, GgmlType, QkvLayout, Rope, RopeStyle};

/// Dequantizes a whole `[rows, cols]` weight to f32 (reference only: the fast path never does this).
pub fn dequantize_matrix(dtype: GgmlType, rows: usize, cols: usize, bytes: &[u8]) -> Vec<f32> {
    let row_bytes = dtype.row_bytes(cols).expect("cols must be whole blocks");
    let mut out = vec![0.0; rows * cols];
    for r in 0..rows {
        dequantize_row(dtype, &bytes[r * row_bytes..(r + 1) * row_bytes], &mut out[r * cols..(r + 1) * cols]);
    }
    out
}

/// `out[n, m] = x[n, k] · w[m, k]ᵀ (+ bias[m])`.
pub fn linear(x: &[f32], n: usize, k: usize, w: &[f32], m: usize, bias: Option<&[f32]>) -> Vec<f32> {
    let mut out = vec![0.0; n * m];
    for t in 0..n {
        for j in 0..m {
            let mut acc = 0.0f32;
            for i in 0..k {
                acc += x[t * k + i] * w[j * k + i];
            }
            out[t * m + j] = acc + bias.map_or(0.0, |b| b[j]);
        }
    }
    out
}

pub fn rms_norm(x: &[f32], cols: usize, weight: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for (xr, or) in x.chunks(cols).zip(out.chunks_mut(cols)) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / cols as f32;
        let scale = 1.0 / (ms + eps).sqrt();
        for i in 0..cols {
            or[i] = xr[i] * scale * weight[i];
        }
    }
    out
}

pub fn silu_mul(gate_up: &[f32], hidden: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(gate_up.len() / 2);
    for row in gate_up.chunks(2 * hidden) {
        for i in 0..hidden {
            let g = row[i];
            out.push(g / (1.0 + (-g).exp()) * row[hidden + i]);
        }
    }
    out
}

/// Rotates the first `n_heads` heads of each row (row length `cols`) in place.
pub fn rope(x: &mut [f32], cols: usize, n_heads: usize, positions: &[u32], rope: &Rope) {
    let d = rope.head_dim;
    let half = d / 2;
    let per_row = rope.positions_per_row();
    for (row, pos) in x.chunks_mut(cols).zip(positions.chunks_exact(per_row)) {
        for h in 0..n_heads {
            let head = &mut row[h * d..(h + 1) * d];
            for i in 0..half {
                let angle = pos[rope.component(i)] as f32 * rope.inv_freq[i];
                let (sin, cos) = angle.sin_cos();
                let (a, b) = match rope.style {
                    RopeStyle::Neox => (i, i + half),
                    RopeStyle::Norm => (2 * i, 2 * i + 1),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos - x1 * sin;
                head[b] = x0 * sin + x1 * cos;
            }
        }
    }
}

/// Causal GQA attention for each sequence over cached K/V rows (`kv_cols` wide, indexed by slot).
pub fn attention(qkv: &[f32], k_cache: &[f32], v_cache: &[f32], layout: QkvLayout, seqs: &[AttnSeq<'_>]) -> Vec<f32> {
    let cols = layout.total_cols();
    let d = layout.head_dim;
    let kv_cols = layout.kv_cols();
    let group = layout.n_heads / layout.n_kv_heads;
    let rows = seqs.iter().map(|s| s.q_rows.end).max().unwrap_or(0);
    let mut out = vec![0.0; rows * layout.q_cols()];
    let scale = 1.0 / (d as f32).sqrt();
    for seq in seqs {
        let ctx = seq.slots.len();
        let first_pos = ctx - seq.q_rows.len();
        for (i, r) in seq.q_rows.clone().enumerate() {
            let visible = first_pos + i + 1;
            for h in 0..layout.n_heads {
                let kvh = h / group;
                let q = &qkv[r * cols + h * d..r * cols + (h + 1) * d];
                let scores: Vec<f32> = (0..visible)
                    .map(|p| {
                        let k = &k_cache[seq.slots[p] as usize * kv_cols + kvh * d..][..d];
                        q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let exps: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f32 = exps.iter().sum();
                let o = &mut out[r * layout.q_cols() + h * d..][..d];
                for (p, e) in exps.iter().enumerate() {
                    let v = &v_cache[seq.slots[p] as usize * kv_cols + kvh * d..][..d];
                    for j in 0..d {
                        o[j] += e / sum * v[j];
                    }
                }
            }
        }
    }
    out
}

/// LayerNorm over each row: `(x − mean) / sqrt(var + eps) · w + b` (biased variance).
pub fn layer_norm(x: &[f32], cols: usize, w: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for (xr, or) in x.chunks(cols).zip(out.chunks_mut(cols)) {
        let mean = xr.iter().sum::<f32>() / cols as f32;
        let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / cols as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for i in 0..cols {
            or[i] = (xr[i] - mean) * inv * w[i] + b[i];
        }
    }
    out
}

/// GELU of each value (erf evaluated in f64).
pub fn gelu(x: &[f32], kind: crate::backend::Gelu) -> Vec<f32> {
    x.iter()
        .map(|&v| match kind {
            crate::backend::Gelu::Quick => v * (1.0 / (1.0 + (-1.702 * v).exp())),
            crate::backend::Gelu::Erf => {
                let xd = v as f64;
                (0.5 * xd * (1.0 + libm::erf(xd * std::f64::consts::FRAC_1_SQRT_2))) as f32
            }
        })
        .collect()
}

/// Bidirectional attention within spans, K/V from `qkv` (see `Backend::attention_spans`).
pub fn attention_spans(qkv: &[f32], layout: QkvLayout, spans: &[std::ops::Range<usize>]) -> Vec<f32> {
    let cols = layout.total_cols();
    let d = layout.head_dim;
    let group = layout.n_heads / layout.n_kv_heads;
    let rows = qkv.len() / cols;
    let mut out = vec![0.0; rows * layout.q_cols()];
    let scale = 1.0 / (d as f32).sqrt();
    for span in spans {
        for r in span.clone() {
            for h in 0..layout.n_heads {
                let kvh = h / group;
                let q = &qkv[r * cols + h * d..][..d];
                let k = |p: usize| &qkv[p * cols + layout.k_offset() + kvh * d..][..d];
                let v = |p: usize| &qkv[p * cols + layout.v_offset() + kvh * d..][..d];
                let scores: Vec<f32> =
                    span.clone().map(|p| q.iter().zip(k(p)).map(|(a, b)| a * b).sum::<f32>() * scale).collect();
                let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let exps: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f32 = exps.iter().sum();
                let o = &mut out[r * layout.q_cols() + h * d..][..d];
                for (e, p) in exps.iter().zip(span.clone()) {
                    for (oj, vj) in o.iter_mut().zip(v(p)) {
                        *oj += e / sum * vj;
                    }
                }
            }
        }
    }
    out
}
