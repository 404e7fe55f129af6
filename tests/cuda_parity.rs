//! CUDA ↔ CPU parity: every op of the CUDA backend against the CPU backend (the oracle) on random
//! inputs, each with a named tolerance, and whole synthetic models (prefill + 16 greedy decode
//! steps, batch 1 and 8) against the CPU engine.
//!
//! Built with `--features cuda`. Without a GPU each test prints `skipped <test>: no CUDA device
//! (…)` and returns (`scripts/test` runs this file with `--nocapture`, so the skips show); with
//! `ZOE_REQUIRE_GPU=1` (the GPU machine's run) a missing device fails instead.
#![cfg(feature = "cuda")]

mod common;

use zoe_llm::backend::cpu::{CpuBackend, Precision};
use zoe_llm::backend::cuda::CudaBackend;
use zoe_llm::backend::{AttnSeq, Backend, Gelu, GgmlType, QkvLayout, Rope, RopeStyle};
use zoe_llm::model::llama::Llama;
use zoe_llm::model::loaded::LoadedModel;
use zoe_llm::model::paged_kv::PagedKvCache;
use zoe_llm::model::synth::{write, SynthArch};
use zoe_llm::model::weights::awq::AwqMatrix;

fn gpu(test: &str) -> Option<CudaBackend> {
    match CudaBackend::new(0) {
        Ok(be) => Some(be),
        Err(e) if std::env::var("ZOE_REQUIRE_GPU").as_deref() == Ok("1") => panic!("{test}: ZOE_REQUIRE_GPU=1 but {e}"),
        Err(e) => {
            eprintln!("skipped {test}: {e}");
            None
        }
    }
}

fn cpu() -> CpuBackend {
    CpuBackend::with_precision(2, Precision::F32)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn uniform(&mut self) -> f32 {
        self.next() as f32 / (1u64 << 31) as f32 * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
    /// Values fp16 holds exactly: what the device casts (prefill GEMM inputs, the KV cache) then
    /// equals what the CPU computes with, and the tolerances can be tight.
    fn vec16(&mut self, n: usize, scale: f32) -> Vec<f32> {
        self.vec(n, scale).into_iter().map(|v| half::f16::from_f32(v).to_f32()).collect()
    }
}

/// `|got − want| ≤ atol + rtol·|want|` element-wise, with the worst offender in the message.
fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0usize, 0f32);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{what}[{i}] = {g}");
        let excess = (g - w).abs() - (atol + rtol * w.abs());
        if excess > worst.1 {
            worst = (i, excess);
        }
    }
    let i = worst.0;
    assert!(worst.1 <= 0.0, "{what}[{i}]: cuda {} vs cpu {} (atol {atol}, rtol {rtol})", got[i], want[i]);
}

/// Named tolerances. Inputs are fp16-exact where the device rounds to fp16 (prefill GEMM inputs,
/// the KV cache), so what is left is summation order and the libm differences of exp/sin/cos.
mod tol {
    /// Linear layers, GEMV (f32 activations) and cuBLAS (fp16-exact inputs, products exact in
    /// f32): summation order only. Absolute part scaled by √K in the test.
    pub const LINEAR: (f32, f32) = (2e-5, 1e-4);
    pub const NORM: (f32, f32) = (1e-5, 1e-5);
    pub const ROPE: (f32, f32) = (1e-4, 1e-5);
    pub const ELEMENTWISE: (f32, f32) = (1e-6, 1e-6);
    /// Peaked softmax over up to 1300 positions, f32 accumulation in a different order.
    pub const ATTENTION: (f32, f32) = (5e-5, 2e-4);
    /// Whole-model logits: the device rounds activations to fp16 for prefill GEMMs and into the
    /// KV cache at every layer; the CPU (Precision::F32) does not.
    pub const LOGITS: (f32, f32) = (5e-2, 5e-2);
    /// A whole vision tower (2 blocks and the merger): the device rounds every prefill-sized
    /// linear's input and attention's K/V to fp16 (2^-11 relative each), about 3e-4 relative per
    /// linear after averaging over the dot product, compounding over ~14 of them. An estimate,
    /// not yet measured on a GPU; tight enough that the smallest real defect the CPU golden test
    /// lists (the blocks' QuickGELU swapped for erf GELU, 1.1e-2) fails it.
    pub const TOWER: (f32, f32) = (5e-3, 5e-3);
}

fn awq_weight(rng: &mut Rng, n: usize, k: usize, group: usize) -> AwqMatrix {
    let w = rng.vec(n * k, 0.1);
    AwqMatrix::quantize(&w, n, k, group).unwrap()
}

#[test]
fn linear_awq_and_f16_match_cpu() {
    let Some(g) = gpu("linear_awq_and_f16_match_cpu") else { return };
    let c = cpu();
    let mut rng = Rng(1);
    // (n, k, group): the kernels' fast paths, and shapes that take their fallbacks (AWQ with
    // K % 32 != 0; fp16 with K % 8 != 0).
    for &(n, k, group) in
        &[(256usize, 512usize, 128usize), (1032, 384, 128), (96, 1024, 128), (64, 120, 40), (24, 200, 8)]
    {
        let m = awq_weight(&mut rng, n, k, group);
        let f16_bytes: Vec<u8> =
            rng.vec(n * k, 0.1).iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
        let (wc, wg) = (c.awq_weight("w", m.clone()).unwrap(), g.awq_weight("w", m).unwrap());
        let (fc, fg) = (
            c.weight("f", GgmlType::F16, n, k, &f16_bytes).unwrap(),
            g.weight("f", GgmlType::F16, n, k, &f16_bytes).unwrap(),
        );
        let bias = rng.vec(n, 1.0);
        for rows in [1usize, 2, 3, 5, 8, 9, 40] {
            let x = rng.vec16(rows * k, 1.0);
            let (xc, xg) = (c.upload(&x, rows, k), g.upload(&x, rows, k));
            let (bc, bg) = (c.upload(&bias, 1, n), g.upload(&bias, 1, n));
            for (label, wc, wg) in [("awq", &wc, &wg), ("f16", &fc, &fg)] {
                // Written at a column offset inside a wider output that starts non-zero, with
                // bias: the columns outside [8, 8 + n) must keep their 7s.
                let fill = vec![7.0f32; rows * (n + 16)];
                let (mut oc, mut og) = (c.upload(&fill, rows, n + 16), g.upload(&fill, rows, n + 16));
                c.linear(&xc, wc, Some(&bc), &mut oc, 8);
                g.linear(&xg, wg, Some(&bg), &mut og, 8);
                let what = format!("linear {label} n={n} k={k} group={group} rows={rows}");
                assert_close(
                    &what,
                    &g.download(&og),
                    &c.download(&oc),
                    tol::LINEAR.0 * (k as f32).sqrt(),
                    tol::LINEAR.1,
                );
            }
        }
    }
}

/// fp16 weights with K % 8 != 0 take the kernel's scalar path.
#[test]
fn linear_f16_with_odd_k_matches_cpu() {
    let Some(g) = gpu("linear_f16_with_odd_k_matches_cpu") else { return };
    let c = cpu();
    let mut rng = Rng(5);
    let (n, k) = (40usize, 100usize);
    let bytes: Vec<u8> = rng.vec(n * k, 0.1).iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
    let (wc, wg) =
        (c.weight("f", GgmlType::F16, n, k, &bytes).unwrap(), g.weight("f", GgmlType::F16, n, k, &bytes).unwrap());
    for rows in [1usize, 4, 8, 12] {
        let x = rng.vec16(rows * k, 1.0);
        let (mut oc, mut og) = (c.zeros(rows, n), g.zeros(rows, n));
        c.linear(&c.upload(&x, rows, k), &wc, None, &mut oc, 0);
        g.linear(&g.upload(&x, rows, k), &wg, None, &mut og, 0);
        let what = format!("linear f16 n={n} k={k} rows={rows}");
        assert_close(&what, &g.download(&og), &c.download(&oc), tol::LINEAR.0 * (k as f32).sqrt(), tol::LINEAR.1);
    }
}

#[test]
fn norms_rope_and_elementwise_match_cpu() {
    let Some(g) = gpu("norms_rope_and_elementwise_match_cpu") else { return };
    let c = cpu();
    let mut rng = Rng(2);
    let up = |data: &[f32], r, cc| (c.upload(data, r, cc), g.upload(data, r, cc));
    let rows = 5;
    // 3583: the norms' scalar path (no float4 loads).
    for cols in [3584usize, 3583] {
        let (x, y, w) = (rng.vec(rows * cols, 3.0), rng.vec(rows * cols, 3.0), rng.vec(cols, 1.0));
        let ((xc, xg), (yc, yg), (wc, wg)) = (up(&x, rows, cols), up(&y, rows, cols), up(&w, 1, cols));

        let (mut oc, mut og) = (c.zeros(rows, cols), g.zeros(rows, cols));
        c.rms_norm(&xc, &wc, 1e-6, &mut oc);
        g.rms_norm(&xg, &wg, 1e-6, &mut og);
        assert_close("rms_norm", &g.download(&og), &c.download(&oc), tol::NORM.0, tol::NORM.1);

        let ((mut rc, mut rg), (mut oc, mut og)) = (up(&x, rows, cols), (c.zeros(rows, cols), g.zeros(rows, cols)));
        c.add_rms_norm(&mut rc, &yc, &wc, 1e-5, &mut oc);
        g.add_rms_norm(&mut rg, &yg, &wg, 1e-5, &mut og);
        assert_close(
            "add_rms_norm residual",
            &g.download(&rg),
            &c.download(&rc),
            tol::ELEMENTWISE.0,
            tol::ELEMENTWISE.1,
        );
        assert_close("add_rms_norm out", &g.download(&og), &c.download(&oc), tol::NORM.0, tol::NORM.1);

        let (mut ac, mut ag) = up(&x, rows, cols);
        c.add(&mut ac, &yc);
        g.add(&mut ag, &yg);
        assert_close("add", &g.download(&ag), &c.download(&ac), tol::ELEMENTWISE.0, tol::ELEMENTWISE.1);
    }

    let (gu, h) = (rng.vec(rows * 2 * 1024, 4.0), 1024);
    let (gc, gg) = up(&gu, rows, 2 * h);
    let (mut sc, mut sg) = (c.zeros(rows, h), g.zeros(rows, h));
    c.silu_mul(&gc, &mut sc);
    g.silu_mul(&gg, &mut sg);
    assert_close("silu_mul", &g.download(&sg), &c.download(&sc), 1e-5, 1e-5);

    for d in [64usize, 128] {
        let heads = 6;
        let inv_freq = (0..d / 2).map(|i| 1e6f32.powf(-((2 * i) as f32) / d as f32)).collect();
        let rope = Rope { style: RopeStyle::Neox, head_dim: d, inv_freq, mrope_section: None };
        let positions = [0u32, 1, 17, 4095, 31999];
        let x = rng.vec(positions.len() * (heads + 2) * d, 1.0);
        let (mut rc, mut rg) = up(&x, positions.len(), (heads + 2) * d);
        c.rope(&mut rc, heads, &positions, &rope);
        g.rope(&mut rg, heads, &positions, &rope);
        assert_close(&format!("rope d={d}"), &g.download(&rg), &c.download(&rc), tol::ROPE.0, tol::ROPE.1);
        // M-RoPE, Qwen2-VL's sections scaled to the head: (t, h, w) per row.
        let q = d / 8;
        let mrope = Rope { mrope_section: Some([q * 2, q * 3, q * 3]), ..rope.clone() };
        let pos3: Vec<u32> = positions.iter().flat_map(|&p| [p, p / 3 + 2, p / 5 + 7]).collect();
        let (mut rc, mut rg) = up(&x, positions.len(), (heads + 2) * d);
        c.rope(&mut rc, heads, &pos3, &mrope);
        g.rope(&mut rg, heads, &pos3, &mrope);
        assert_close(&format!("mrope d={d}"), &g.download(&rg), &c.download(&rc), tol::ROPE.0, tol::ROPE.1);
    }

    let (vocab, h) = (300, 256);
    let table: Vec<u8> = rng.vec(vocab * h, 1.0).iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
    let (tc, tg) = (
        c.weight("e", GgmlType::F16, vocab, h, &table).unwrap(),
        g.weight("e", GgmlType::F16, vocab, h, &table).unwrap(),
    );
    let ids = [0u32, 299, 5, 5, 128];
    let (mut ec, mut eg) = (c.zeros(ids.len(), h), g.zeros(ids.len(), h));
    c.embedding(&tc, &ids, &mut ec);
    g.embedding(&tg, &ids, &mut eg);
    assert_close("embedding", &g.download(&eg), &c.download(&ec), 0.0, 0.0);
    let rows_idx = [4usize, 0, 2];
    assert_close(
        "gather_rows",
        &g.download(&g.gather_rows(&eg, &rows_idx)),
        &c.download(&c.gather_rows(&ec, &rows_idx)),
        0.0,
        0.0,
    );
}

/// Writes K/V for several sequences into a paged layout (scattered slots), then attends: decode
/// (one row per sequence, contexts past the split length) and prefill (chunks with context).
#[test]
fn kv_write_and_attention_match_cpu() {
    let Some(g) = gpu("kv_write_and_attention_match_cpu") else { return };
    let c = cpu();
    let mut rng = Rng(3);
    for (d, heads, kv_heads) in [(64usize, 9usize, 3usize), (128, 28, 4)] {
        let layout = QkvLayout { n_heads: heads, n_kv_heads: kv_heads, head_dim: d };
        let lens = [1usize, 70, 600, 1300];
        let total: usize = lens.iter().sum();
        let slots_total = total + 64;
        // A permutation of slots: sequence i's position p sits at a scattered slot.
        let mut perm: Vec<u32> = (0..slots_total as u32).collect();
        for i in (1..perm.len()).rev() {
            perm.swap(i, rng.next() as usize % (i + 1));
        }
        let mut seq_slots = Vec::new();
        let mut at = 0;
        for &l in &lens {
            seq_slots.push(perm[at..at + l].to_vec());
            at += l;
        }
        let (mut kc, mut vc) =
            (c.kv_layer(slots_total, layout.kv_cols()).unwrap(), c.kv_layer(slots_total, layout.kv_cols()).unwrap());
        let (mut kg, mut vg) =
            (g.kv_layer(slots_total, layout.kv_cols()).unwrap(), g.kv_layer(slots_total, layout.kv_cols()).unwrap());
        // Fill every position's K/V (all rows at once), fp16-exact so both caches hold the same.
        let all_slots: Vec<u32> = seq_slots.concat();
        let qkv = rng.vec16(total * layout.total_cols(), 1.0);
        let (qc, qg) = (c.upload(&qkv, total, layout.total_cols()), g.upload(&qkv, total, layout.total_cols()));
        c.write_kv((&mut kc, &mut vc), &qc, layout, &all_slots);
        g.write_kv((&mut kg, &mut vg), &qg, layout, &all_slots);

        // Decode: the last position of every sequence queries its whole context. Large queries
        // make the softmax peaked, so a position lost at a split boundary shows.
        let q = rng.vec(lens.len() * layout.total_cols(), 6.0);
        let (qc, qg) = (c.upload(&q, lens.len(), layout.total_cols()), g.upload(&q, lens.len(), layout.total_cols()));
        let seqs: Vec<AttnSeq> =
            seq_slots.iter().enumerate().map(|(i, s)| AttnSeq { q_rows: i..i + 1, slots: s }).collect();
        let (mut oc, mut og) = (c.zeros(lens.len(), layout.q_cols()), g.zeros(lens.len(), layout.q_cols()));
        c.attention(&qc, (&kc, &vc), layout, &seqs, &mut oc);
        g.attention(&qg, (&kg, &vg), layout, &seqs, &mut og);
        assert_close(
            &format!("decode attention d={d}"),
            &g.download(&og),
            &c.download(&oc),
            tol::ATTENTION.0,
            tol::ATTENTION.1,
        );

        // Prefill: the last 65 positions of the 600-long and the last 130 of the 1300-long
        // sequence (chunks after cached context), plus the whole 70-long one.
        let chunks = [(1usize, 70usize), (2, 65), (3, 130)];
        let rows: usize = chunks.iter().map(|c| c.1).sum();
        let q = rng.vec(rows * layout.total_cols(), 6.0);
        let (qc, qg) = (c.upload(&q, rows, layout.total_cols()), g.upload(&q, rows, layout.total_cols()));
        let mut start = 0;
        let seqs: Vec<AttnSeq> = chunks
            .iter()
            .map(|&(s, n)| {
                let a = AttnSeq { q_rows: start..start + n, slots: &seq_slots[s] };
                start += n;
                a
            })
            .collect();
        let (mut oc, mut og) = (c.zeros(rows, layout.q_cols()), g.zeros(rows, layout.q_cols()));
        c.attention(&qc, (&kc, &vc), layout, &seqs, &mut oc);
        g.attention(&qg, (&kg, &vg), layout, &seqs, &mut og);
        assert_close(
            &format!("prefill attention d={d}"),
            &g.download(&og),
            &c.download(&oc),
            tol::ATTENTION.0,
            tol::ATTENTION.1,
        );
    }
}

#[test]
fn device_sampling_agrees_with_the_cpu_rules() {
    let Some(g) = gpu("device_sampling_agrees_with_the_cpu_rules") else { return };
    let mut rng = Rng(4);
    let (rows, vocab) = (6, 152064);
    let mut logits = rng.vec(rows * vocab, 5.0);
    // Ties: the lowest index wins, as on the CPU.
    logits[3 * vocab + 10] = 100.0;
    logits[3 * vocab + 20] = 100.0;
    let t = g.upload(&logits, rows, vocab);
    let want: Vec<u32> =
        logits.chunks_exact(vocab).map(|r| (0..vocab).fold(0, |b, i| if r[i] > r[b] { i } else { b }) as u32).collect();
    assert_eq!(g.argmax(&t), want);
    // Greedy by temperature 0, by top_k 1 and by a tiny top_p all give the argmax.
    let ones = vec![1.0f32; rows];
    assert_eq!(g.sample(&t, &[0.0; 6], &[0; 6], &ones, &[0.5; 6]), want);
    // Top-k keeps every token tied at the threshold (kernels/README.md): row 3's two maxima both
    // survive top_k = 1, and a uniform below one half picks the first of them.
    assert_eq!(g.sample(&t, &ones, &[1; 6], &ones, &[0.3; 6]), want);
    let mut tie_high = want.clone();
    tie_high[3] = 20;
    assert_eq!(g.sample(&t, &ones, &[1; 6], &ones, &[0.99; 6]), tie_high);
    assert_eq!(g.sample(&t, &ones, &[0; 6], &[1e-6; 6], &[0.3; 6]), want);
    // A two-token distribution: uniform below p0 picks the first, above it the second.
    let mut two = vec![-1e4f32; vocab];
    two[7] = 0.0;
    two[9] = 0.0; // equal logits: 50/50
    let t2 = g.upload(&two, 1, vocab);
    assert_eq!(g.sample(&t2, &[1.0], &[0], &[1.0], &[0.25]), vec![7]);
    assert_eq!(g.sample(&t2, &[1.0], &[0], &[1.0], &[0.75]), vec![9]);
}

fn greedy(l: &[f32]) -> u32 {
    (0..l.len()).fold(0, |b, i| if l[i] > l[b] { i } else { b }) as u32
}

/// Prefills `prompts` together in a paged cache, then runs 16 decode steps for all of them at
/// once. Each step feeds `forced[step]` when given (teacher forcing: both backends then see the
/// same tokens), else each sequence's greedy token. Returns the fed tokens and every step's logits.
fn decode_batch<B: Backend>(
    model: &Llama<B>,
    be: &B,
    prompts: &[Vec<u32>],
    forced: Option<&[Vec<u32>]>,
) -> (Vec<Vec<u32>>, Vec<Vec<Vec<f32>>>)
where
    B::KvLayer: Send,
{
    let cfg = &model.config;
    let mut cache = PagedKvCache::new(be, cfg.n_layers, model.layout().kv_cols(), 64, 16).unwrap();
    let mut seqs: Vec<_> = prompts.iter().map(|t| cache.start(t, 200).0).collect();
    let mut batch: Vec<_> = prompts.iter().map(|t| &t[..]).zip(seqs.iter_mut()).collect();
    let mut logits = model.forward_batch(be, &mut cache, &mut batch).unwrap();
    let (mut fed, mut all) = (Vec::new(), Vec::new());
    for step in 0..16 {
        let next: Vec<u32> = match forced {
            Some(f) => f[step].clone(),
            None => logits.iter().map(|l| greedy(l)).collect(),
        };
        all.push(logits);
        let one: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let mut batch: Vec<_> = one.iter().map(|t| &t[..]).zip(seqs.iter_mut()).collect();
        logits = model.forward_batch(be, &mut cache, &mut batch).unwrap();
        fed.push(next);
    }
    all.push(logits);
    (fed, all)
}

/// Runs `prompts` on the CPU (greedy) and on the GPU fed the CPU's tokens: logits agree within
/// [`tol::LOGITS`] at every step, and the GPU's greedy choice equals the CPU's wherever the CPU's
/// best two logits are further apart than twice that tolerance (a closer pair is a tie the fp16
/// rounding may break either way: counted, and at most a quarter of the steps may be such ties).
fn compare_decoding<C: Backend, G: Backend>(
    what: &str,
    cpu: (&Llama<C>, &C),
    gpu: (&Llama<G>, &G),
    prompts: &[Vec<u32>],
) where
    C::KvLayer: Send,
    G::KvLayer: Send,
{
    let (tokens, lc) = decode_batch(cpu.0, cpu.1, prompts, None);
    let (_, lg) = decode_batch(gpu.0, gpu.1, prompts, Some(&tokens));
    let mut near_ties = 0;
    for (step, (a, b)) in lg.iter().zip(&lc).enumerate() {
        for (s, (x, y)) in a.iter().zip(b).enumerate() {
            assert_close(&format!("{what} step {step} seq {s} logits"), x, y, tol::LOGITS.0, tol::LOGITS.1);
            let best = greedy(y) as usize;
            let second = (0..y.len()).filter(|&i| i != best).map(|i| y[i]).fold(f32::NEG_INFINITY, f32::max);
            if y[best] - second > 2.0 * (tol::LOGITS.0 + tol::LOGITS.1 * y[best].abs()) {
                assert_eq!(greedy(x), best as u32, "{what} step {step} seq {s}: greedy token");
            } else {
                near_ties += 1;
            }
        }
    }
    let steps = lc.len() * prompts.len();
    eprintln!("{what}: {near_ties} near-tie step(s) of {steps}");
    assert!(near_ties <= steps / 4, "{what}: too many near ties ({near_ties}) for the comparison to mean much");
}

/// Prefill + 16 decode steps of the tiny synthetic AWQ model at batch 1 and 8 (see
/// [`compare_decoding`]).
#[test]
fn synthetic_model_decodes_like_the_cpu_engine() {
    let Some(g) = gpu("synthetic_model_decodes_like_the_cpu_engine") else { return };
    let dir = tempfile::tempdir().unwrap();
    write(SynthArch::Tiny, dir.path(), 11).unwrap();
    let mc = LoadedModel::load_hf_dir("tiny", dir.path(), cpu(), None).unwrap();
    let mg = LoadedModel::load_hf_dir("tiny", dir.path(), g, None).unwrap();
    for batch in [1usize, 8] {
        let prompts: Vec<Vec<u32>> =
            (0..batch).map(|b| (0..(20 + 7 * b) as u32).map(|t| (t * 31 + b as u32) % 384).collect()).collect();
        compare_decoding(
            &format!("synthetic batch {batch}"),
            (&mc.model, &mc.backend),
            (&mg.model, &mg.backend),
            &prompts,
        );
    }
}

/// The real SmolLM2 (GGUF, dequantized to fp16 on the GPU) decodes like the CPU (see
/// [`compare_decoding`]). Needs ZOE_TEST_GGUF on the GPU machine too.
#[test]
fn smollm2_decodes_like_the_cpu_engine() {
    let Some(path) = common::smollm2_gguf("smollm2_decodes_like_the_cpu_engine") else { return };
    let Some(g) = gpu("smollm2_decodes_like_the_cpu_engine") else { return };
    let file = zoe_llm::model::weights::GgufFile::open(&path).unwrap();
    let c = cpu();
    let mc = Llama::from_gguf(&file, &c).unwrap();
    let mg = Llama::from_gguf(&file, &g).unwrap();
    let prompt: Vec<u32> = vec![1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 2, 198, 1, 4093, 198];
    compare_decoding("smollm2", (&mc, &c), (&mg, &g), &[prompt]);
}

/// The vision-tower ops: LayerNorm (also on a large offset and an odd width), both GELUs,
/// bidirectional attention within spans (head dims 16 and 80; spans longer than a tile, ragged
/// tiles, a one-row span) and reshape.
#[test]
fn vision_ops_match_cpu() {
    let Some(g) = gpu("vision_ops_match_cpu") else { return };
    let c = cpu();
    let mut rng = Rng(5);
    let up = |data: &[f32], r, cc| (c.upload(data, r, cc), g.upload(data, r, cc));
    for (cols, offset) in [(1280usize, 0.0f32), (32, 50.0), (3, -2.0)] {
        let rows = 7;
        let x: Vec<f32> = rng.vec(rows * cols, 3.0).into_iter().map(|v| v + offset).collect();
        let ((xc, xg), (wc, wg), (bc, bg)) =
            (up(&x, rows, cols), up(&rng.vec(cols, 1.0), 1, cols), up(&rng.vec(cols, 1.0), 1, cols));
        let (mut oc, mut og) = (c.zeros(rows, cols), g.zeros(rows, cols));
        c.layer_norm(&xc, &wc, &bc, 1e-6, &mut oc);
        g.layer_norm(&xg, &wg, &bg, 1e-6, &mut og);
        assert_close(&format!("layer_norm {cols}"), &g.download(&og), &c.download(&oc), tol::NORM.0, tol::NORM.1);
    }
    let x = rng.vec(4 * 1001, 6.0);
    for kind in [Gelu::Quick, Gelu::Erf] {
        let (mut xc, mut xg) = up(&x, 4, 1001);
        c.gelu(&mut xc, kind);
        g.gelu(&mut xg, kind);
        assert_close(&format!("{kind:?}"), &g.download(&xg), &c.download(&xc), tol::ELEMENTWISE.0, tol::ELEMENTWISE.1);
    }
    for (heads, d) in [(16usize, 80usize), (2, 16)] {
        let layout = QkvLayout { n_heads: heads, n_kv_heads: heads, head_dim: d };
        let spans = [0..45, 45..46, 46..146];
        // fp16-exact, so the device's fp16 K/V equal the CPU's f32 ones.
        let qkv = rng.vec16(146 * layout.total_cols(), 1.0);
        let (qc, qg) = up(&qkv, 146, layout.total_cols());
        let (mut oc, mut og) = (c.zeros(146, layout.q_cols()), g.zeros(146, layout.q_cols()));
        c.attention_spans(&qc, layout, &spans, &mut oc);
        g.attention_spans(&qg, layout, &spans, &mut og);
        let what = format!("attention_spans d={d}");
        assert_close(&what, &g.download(&og), &c.download(&oc), tol::ATTENTION.0, tol::ATTENTION.1);
        let r = g.reshape(og, 73, 2 * layout.q_cols());
        assert_eq!(g.shape(&r), (73, 2 * layout.q_cols()));
        assert_eq!(g.download(&r), c.download(&oc), "reshape keeps the values");
    }
}

/// The vision tower on the device against the CPU, two images in one call: the tiny checkpoint
/// written by transformers (head dim 16) and a synthetic tower with Qwen2-VL-7B's widths (head
/// dim 80) cut to 2 blocks.
#[test]
fn vision_tower_matches_cpu() {
    use zoe_llm::model::vision::{VisionConfig, VisionTower};
    use zoe_llm::model::weights::safetensors::SafetensorsDir;
    let Some(g) = gpu("vision_tower_matches_cpu") else { return };
    let pixels = |rows: usize, cols: usize| -> Vec<f32> {
        (0..rows * cols).map(|i| ((i * 7919 + 13) % 255) as f32 / 128.0 - 1.0).collect()
    };
    let grids = [[1, 4, 6], [1, 2, 2]];
    let rows: usize = grids.iter().map(|g| g.iter().product::<usize>()).sum();

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2_vl_tiny");
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let vc = VisionConfig::from_hf_json(&config).unwrap();
    let st = SafetensorsDir::open(&dir).unwrap();
    let tc = VisionTower::from_safetensors(cpu(), &st, vc.clone()).unwrap();
    let tg = VisionTower::from_safetensors(g.sibling().unwrap(), &st, vc.clone()).unwrap();
    let px = pixels(rows, vc.patch_cols());
    assert_close("tiny tower", &tg.forward(&px, &grids), &tc.forward(&px, &grids), tol::TOWER.0, tol::TOWER.1);

    let big = VisionConfig { depth: 2, ..VisionConfig::qwen2_vl_7b() };
    assert_eq!(big.head_dim(), 80);
    let (tc, tg) = (VisionTower::synthetic(cpu(), big.clone(), 9), VisionTower::synthetic(g, big.clone(), 9));
    let px = pixels(rows, big.patch_cols());
    assert_close("7B-shaped tower", &tg.forward(&px, &grids), &tc.forward(&px, &grids), tol::TOWER.0, tol::TOWER.1);
}
