//! `zoe-llm bench`: prompt-processing and decode throughput, measured like llama.cpp's
//! `llama-bench` so the two can be run side by side: `pp N` evaluates N prompt tokens in one
//! batch on an empty cache; `tg N` generates N tokens one at a time from an empty cache. Token ids
//! are pseudo-random (content does not change the work). One untimed warm-up run of each first;
//! then `reps` timed runs, reported as mean ± standard deviation.

use std::time::Instant;

use crate::backend::Backend;
use crate::model::kv_cache::ContiguousKvCache;
use crate::model::llama::ModelError;
use crate::model::loaded::LoadedModel;

#[derive(Clone, Debug, PartialEq)]
pub struct Throughput {
    pub test: String,
    pub tokens_per_s: f64,
    pub stddev: f64,
}

fn random_tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab as u64) as u32
        })
        .collect()
}

fn stats(test: String, rates: &[f64]) -> Throughput {
    let mean = rates.iter().sum::<f64>() / rates.len() as f64;
    let var = rates.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (rates.len().max(2) - 1) as f64;
    Throughput { test, tokens_per_s: mean, stddev: var.sqrt() }
}

/// Tokens per second of one pp run.
fn prompt_run<B: Backend>(m: &LoadedModel<B>, n: usize, seed: u64) -> Result<f64, ModelError> {
    let tokens = random_tokens(n, m.model.config.vocab_size, seed);
    let mut cache = ContiguousKvCache::new(&m.backend, m.model.config.n_layers, m.model.layout().kv_cols(), n)?;
    let t = Instant::now();
    m.model.forward(&m.backend, &tokens, &mut cache, false)?;
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// Tokens per second of one tg run.
fn decode_run<B: Backend>(m: &LoadedModel<B>, n: usize, seed: u64) -> Result<f64, ModelError> {
    let tokens = random_tokens(n, m.model.config.vocab_size, seed);
    let mut cache = ContiguousKvCache::new(&m.backend, m.model.config.n_layers, m.model.layout().kv_cols(), n)?;
    let t = Instant::now();
    for &tok in &tokens {
        m.model.forward(&m.backend, &[tok], &mut cache, false)?;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// Runs `pp prompt_tokens` and `tg gen_tokens` (either may be 0 to skip it).
pub fn run<B: Backend>(
    m: &LoadedModel<B>,
    prompt_tokens: usize,
    gen_tokens: usize,
    reps: usize,
) -> Result<Vec<Throughput>, ModelError> {
    let reps = reps.max(1);
    let mut out = Vec::new();
    if prompt_tokens > 0 {
        prompt_run(m, prompt_tokens, 0)?;
        let rates = (1..=reps).map(|r| prompt_run(m, prompt_tokens, r as u64)).collect::<Result<Vec<_>, _>>()?;
        out.push(stats(format!("pp{prompt_tokens}"), &rates));
    }
    if gen_tokens > 0 {
        decode_run(m, gen_tokens.min(16), 0)?;
        let rates = (1..=reps).map(|r| decode_run(m, gen_tokens, r as u64)).collect::<Result<Vec<_>, _>>()?;
        out.push(stats(format!("tg{gen_tokens}"), &rates));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_tokens_are_in_range_and_reproducible() {
        let a = random_tokens(1000, 49152, 3);
        assert!(a.iter().all(|&t| t < 49152));
        assert_eq!(a, random_tokens(1000, 49152, 3));
        assert_ne!(a, random_tokens(1000, 49152, 4));
        assert!(a.iter().collect::<std::collections::HashSet<_>>().len() > 900);
    }

    #[test]
    fn stats_are_mean_and_sample_stddev() {
        let s = stats("pp8".into(), &[10.0, 12.0, 14.0]);
        assert_eq!(s.tokens_per_s, 12.0);
        assert!((s.stddev - 2.0).abs() < 1e-12);
    }
}
