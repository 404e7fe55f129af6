//! The vision-tower ops of the CPU backend (LayerNorm, GELU, bidirectional attention within
//! spans), rows in parallel; `reference` holds their plain semantics and the tests below hold
//! these to it.

use std::ops::Range;

use rayon::prelude::*;

use super::dot;
use crate::backend::{Gelu, QkvLayout};

pub(super) fn layer_norm(x: &[f32], cols: usize, w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    assert!(w.len() == cols && b.len() == cols && x.len() == out.len() && x.len().is_multiple_of(cols));
    out.par_chunks_mut(cols).zip(x.par_chunks(cols)).for_each(|(o, xr)| {
        let mean = xr.iter().sum::<f32>() / cols as f32;
        let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / cols as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for i in 0..cols {
            o[i] = (xr[i] - mean) * inv * w[i] + b[i];
        }
    });
}

pub(super) fn gelu(x: &mut [f32], kind: Gelu) {
    match kind {
        Gelu::Quick => x.par_iter_mut().for_each(|v| *v *= 1.0 / (1.0 + (-1.702 * *v).exp())),
        Gelu::Erf => x.par_iter_mut().for_each(|v| {
            let xd = *v as f64;
            *v = (0.5 * xd * (1.0 + libm::erf(xd * std::f64::consts::FRAC_1_SQRT_2))) as f32;
        }),
    }
}

/// One task per row: for each head, the scores over the row's span, softmax, weighted V.
pub(super) fn attention_spans(qkv: &[f32], layout: QkvLayout, spans: &[Range<usize>], out: &mut [f32]) {
    let cols = layout.total_cols();
    let rows = qkv.len() / cols;
    crate::backend::check_spans(spans, rows);
    assert!(qkv.len() == rows * cols && out.len() == rows * layout.q_cols());
    let d = layout.head_dim;
    let group = layout.n_heads / layout.n_kv_heads;
    let mut span_of = vec![0usize; rows];
    for (s, r) in spans.iter().enumerate() {
        span_of[r.clone()].fill(s);
    }
    let scale = 1.0 / (d as f32).sqrt();
    out.par_chunks_mut(layout.q_cols()).enumerate().for_each_init(Vec::new, |scores, (r, o)| {
        let span = spans[span_of[r]].clone();
        o.fill(0.0);
        for h in 0..layout.n_heads {
            let kv = layout.k_offset() + (h / group) * d;
            let q = &qkv[r * cols + h * d..][..d];
            scores.clear();
            scores.extend(span.clone().map(|p| dot(q, &qkv[p * cols + kv..][..d]) * scale));
            let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let oh = &mut o[h * d..(h + 1) * d];
            let vo = layout.v_offset() - layout.k_offset();
            for (s, p) in scores.iter().zip(span.clone()) {
                let v = &qkv[p * cols + kv + vo..][..d];
                let wgt = s / sum;
                for (oj, vj) in oh.iter_mut().zip(v) {
                    *oj += wgt * vj;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::super::reference as r;
    use super::super::test_util::Lcg;
    use super::super::{CpuBackend, Precision};
    use crate::backend::{Backend, Gelu, QkvLayout};

    fn close(got: &[f32], want: &[f32], tol: f32, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{what}[{i}]: {a} vs {b}");
        }
    }

    #[test]
    fn layer_norm_and_gelu_match_reference() {
        let be = CpuBackend::new(2);
        let mut rng = Lcg(11);
        let (n, c) = (7, 80);
        let xv: Vec<f32> = (0..n * c).map(|_| rng.normal() * 3.0 + 0.5).collect();
        let (w, b): (Vec<f32>, Vec<f32>) = (0..c).map(|_| (rng.normal(), rng.normal())).unzip();
        let x = be.upload(&xv, n, c);
        let mut out = be.zeros(n, c);
        be.layer_norm(&x, &be.upload(&w, 1, c), &be.upload(&b, 1, c), 1e-6, &mut out);
        close(&out.data, &r::layer_norm(&xv, c, &w, &b, 1e-6), 1e-5, "layer_norm");
        // Each row is normalized: with w = 1 and b = 0, mean 0 and variance 1.
        let mut unit = be.zeros(n, c);
        be.layer_norm(&x, &be.upload(&vec![1.0; c], 1, c), &be.zeros(1, c), 0.0, &mut unit);
        for row in unit.data.chunks(c) {
            let mean = row.iter().sum::<f32>() / c as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / c as f32;
            assert!(mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-4, "mean {mean} var {var}");
        }

        for kind in [Gelu::Quick, Gelu::Erf] {
            let mut y = x.clone();
            be.gelu(&mut y, kind);
            close(&y.data, &r::gelu(&xv, kind), 1e-6, &format!("{kind:?}"));
        }
        // Known values: GELU(1) = Φ(1) = 0.841345, quick GELU(1) = sigmoid(1.702) = 0.845795.
        let one = r::gelu(&[1.0, -1.0, 0.0], Gelu::Erf);
        close(&one, &[0.841_344_7, -0.158_655_3, 0.0], 1e-6, "gelu values");
        let q = r::gelu(&[1.0], Gelu::Quick);
        close(&q, &[0.845_795], 1e-5, "quick gelu value");
    }

    #[test]
    fn attention_spans_match_reference_and_stay_within_their_span() {
        let be = CpuBackend::with_precision(2, Precision::Q8);
        let mut rng = Lcg(12);
        for layout in [
            QkvLayout { n_heads: 2, n_kv_heads: 2, head_dim: 16 },
            QkvLayout { n_heads: 4, n_kv_heads: 4, head_dim: 80 },
            QkvLayout { n_heads: 4, n_kv_heads: 2, head_dim: 64 },
        ] {
            let cols = layout.total_cols();
            let spans = [0..5, 5..6, 6..23];
            let v: Vec<f32> = (0..23 * cols).map(|_| rng.normal()).collect();
            let qkv = be.upload(&v, 23, cols);
            let mut out = be.zeros(23, layout.q_cols());
            be.attention_spans(&qkv, layout, &spans, &mut out);
            close(&out.data, &r::attention_spans(&v, layout, &spans), 1e-5, &format!("{layout:?}"));

            // Changing a row of the last span leaves the first two spans' outputs as they were.
            let mut v2 = v.clone();
            v2[10 * cols..11 * cols].iter_mut().for_each(|x| *x += 1.0);
            let mut out2 = be.zeros(23, layout.q_cols());
            be.attention_spans(&be.upload(&v2, 23, cols), layout, &spans, &mut out2);
            let q = layout.q_cols();
            assert_eq!(out.data[..6 * q], out2.data[..6 * q], "{layout:?}: spans leak");
            assert_ne!(out.data[6 * q..], out2.data[6 * q..]);
            // A one-row span attends to itself only: its output is its own V.
            let row5 = &v[5 * cols..6 * cols];
            let group = layout.n_heads / layout.n_kv_heads;
            for h in 0..layout.n_heads {
                let vv = &row5[layout.v_offset() + (h / group) * layout.head_dim..][..layout.head_dim];
                close(&out.data[5 * q + h * layout.head_dim..][..layout.head_dim], vv, 1e-6, "one-row span");
            }
        }
    }

    #[test]
    #[should_panic(expected = "tile")]
    fn attention_spans_must_tile_the_rows() {
        let be = CpuBackend::new(1);
        let layout = QkvLayout { n_heads: 1, n_kv_heads: 1, head_dim: 16 };
        let qkv = be.zeros(4, layout.total_cols());
        let mut out = be.zeros(4, 16);
        be.attention_spans(&qkv, layout, &[0..2, 3..4], &mut out);
    }
}
