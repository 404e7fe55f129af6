//! Our Llama decoder on the real SmolLM2-135M-Instruct Q4_1 file against llama.cpp goldens
//! (tests/fixtures/make_model_goldens.py). Same token ids in, so this checks the model alone;
//! tokenizer parity is tests/tokenizer.rs.

mod common;

use serde_json::Value;
use zoe_llm::backend::cpu::{CpuBackend, Precision};
use zoe_llm::model::kv_cache::{ContiguousKvCache, KvCache};
use zoe_llm::model::llama::Llama;
use zoe_llm::model::weights::GgufFile;

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn argmax(v: &[f32]) -> u32 {
    v.iter().enumerate().fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| if x > bv { (i, x) } else { (bi, bv) }).0
        as u32
}

fn goldens() -> Value {
    serde_json::from_str(include_str!("fixtures/smollm2_goldens.json")).unwrap()
}

fn load(precision: Precision, test: &str) -> Option<(CpuBackend, Llama<CpuBackend>)> {
    let path = common::smollm2_gguf(test)?;
    let file = GgufFile::open(&path).unwrap();
    let be = CpuBackend::with_precision(2, precision);
    let model = Llama::from_gguf(&file, &be).unwrap();
    Some((be, model))
}

/// Largest |ours − reference| over the sampled ids and the reference's top 20.
fn max_logit_delta(ours: &[f32], case: &Value, sample_ids: &[u32]) -> f32 {
    let mut d = 0.0f32;
    for (id, want) in sample_ids.iter().zip(case["sample_logits"].as_array().unwrap()) {
        d = d.max((ours[*id as usize] - want.as_f64().unwrap() as f32).abs());
    }
    for pair in case["top20"].as_array().unwrap() {
        d = d.max((ours[pair[0].as_u64().unwrap() as usize] - pair[1].as_f64().unwrap() as f32).abs());
    }
    d
}

/// `Precision::F32` is the exact model; llama.cpp on the F32-dequantized weights computes the same
/// thing in a different summation order. Measured max |Δ| ≈ 2e-5 on logits of magnitude ≤ 35; the
/// bound allows 100× that and still catches any real defect (a wrong rope pairing, a mis-permuted
/// head, a missing bias move logits by whole units).
const EXACT_LOGIT_TOL: f32 = 2e-3;

#[test]
fn exact_precision_matches_llama_cpp_greedy_and_logits() {
    let Some((be, model)) = load(Precision::F32, "exact_precision_matches_llama_cpp_greedy_and_logits") else { return };
    let g = goldens();
    let sample_ids = ids(&g["sample_ids"]);
    let cases = g["exact"].as_array().unwrap();
    assert!(cases.len() >= 5);
    let mut full_matches = 0;
    for case in cases {
        let prompt = ids(&case["prompt_ids"]);
        let want = ids(&case["greedy"]);
        let mut cache = ContiguousKvCache::new(&be, model.config.n_layers, model.layout().kv_cols(), 512).unwrap();
        let mut logits = model.forward(&be, &prompt, &mut cache, false).unwrap();
        let delta = max_logit_delta(&logits, case, &sample_ids);
        let mut got = Vec::new();
        for _ in 0..want.len() {
            let t = argmax(&logits);
            got.push(t);
            logits = model.forward(&be, &[t], &mut cache, false).unwrap();
        }
        let same = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        eprintln!("{:?}: first-step max |Δlogit| {delta:.2e}, {same}/{} greedy tokens equal", short(case), want.len());
        assert!(delta <= EXACT_LOGIT_TOL, "first-step logits differ by {delta} for {:?}", case["prompt"]);
        assert!(same >= 16, "first 16 greedy tokens differ for {:?}:\n ours {got:?}\n ref  {want:?}", case["prompt"]);
        full_matches += usize::from(same == want.len());
        assert_eq!(cache.len(), prompt.len() + want.len());
    }
    assert!(full_matches >= 4, "only {full_matches} of {} prompts matched all 32 greedy tokens", cases.len());
}

/// `Precision::Q8` quantizes activations like llama.cpp does on the Q4_1 file; the rounding noise
/// of that scheme is chaotic in this model (llama.cpp moves its own logits by up to 0.83 just by
/// switching its KV cache between f16 and f32; we measure up to 0.73 between us and it), so
/// the bound is that noise level with margin. For the same reason the top choice may flip where
/// the reference's top two are closer than the noise (one golden has a 0.26 gap): our choice
/// must be a token the reference scores within the bound of its best, and most cases must agree
/// exactly.
const Q8_LOGIT_TOL: f32 = 1.5;

#[test]
fn q8_precision_matches_llama_cpp_within_quantization_noise() {
    let Some((be, model)) = load(Precision::Q8, "q8_precision_matches_llama_cpp_within_quantization_noise") else {
        return;
    };
    let g = goldens();
    let sample_ids = ids(&g["sample_ids"]);
    let cases = g["q8"].as_array().unwrap();
    let mut same_top = 0;
    for case in cases {
        let prompt = ids(&case["prompt_ids"]);
        let mut cache = ContiguousKvCache::new(&be, model.config.n_layers, model.layout().kv_cols(), 512).unwrap();
        let logits = model.forward(&be, &prompt, &mut cache, false).unwrap();
        let delta = max_logit_delta(&logits, case, &sample_ids);
        let ours = argmax(&logits);
        let top20 = case["top20"].as_array().unwrap();
        let best = top20[0][1].as_f64().unwrap() as f32;
        let ref_of_ours =
            top20.iter().find(|p| p[0].as_u64() == Some(ours as u64)).map(|p| p[1].as_f64().unwrap() as f32);
        eprintln!("{:?}: first-step max |Δlogit| {delta:.3}, top {ours} (ref {})", short(case), top20[0][0]);
        assert!(delta <= Q8_LOGIT_TOL, "first-step logits differ by {delta} for {:?}", case["prompt"]);
        assert!(
            ref_of_ours.is_some_and(|l| l >= best - Q8_LOGIT_TOL),
            "our top choice {ours} is not near the reference's best for {:?}",
            case["prompt"]
        );
        same_top += usize::from(ours as u64 == top20[0][0].as_u64().unwrap());
    }
    assert!(same_top + 2 >= cases.len(), "top choice agrees in only {same_top} of {} cases", cases.len());
}

/// Prefill of n tokens at once equals n single-token steps (the batched path and the decode path
/// are the same model), and all_logits returns every row.
#[test]
fn batched_prefill_equals_token_by_token() {
    let Some((be, model)) = load(Precision::F32, "batched_prefill_equals_token_by_token") else { return };
    let prompt = ids(&goldens()["exact"][0]["prompt_ids"]);
    let v = model.config.vocab_size;
    let mut c1 = ContiguousKvCache::new(&be, model.config.n_layers, model.layout().kv_cols(), 64).unwrap();
    let all = model.forward(&be, &prompt, &mut c1, true).unwrap();
    assert_eq!(all.len(), prompt.len() * v);
    let mut c2 = ContiguousKvCache::new(&be, model.config.n_layers, model.layout().kv_cols(), 64).unwrap();
    for (i, &t) in prompt.iter().enumerate() {
        let step = model.forward(&be, &[t], &mut c2, false).unwrap();
        let row = &all[i * v..(i + 1) * v];
        let d = step.iter().zip(row).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(d < 1e-3, "position {i}: batched and stepwise logits differ by {d}");
    }
}

fn short(case: &Value) -> String {
    case["prompt"].as_str().unwrap().chars().take(36).collect()
}
