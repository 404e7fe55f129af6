//! Sampling: one row of logits in, one token id out, reproducible under a seed.
//!
//! The chain is llama.cpp's default order (`common/sampling.cpp`, `common_sampler_init`):
//! penalties → top-k → top-p → min-p → temperature → softmax → draw, with the knobs and defaults
//! Ollama exposes (`api/types.go`, `DefaultOptions`). Temperature 0 is greedy argmax after the
//! penalties, as in llama.cpp (`temp <= 0` switches the chain to greedy).
//!
//! Semantics of each step, with sources:
//! - repeat penalty (llama.cpp `llama_sampler_penalties_apply`): for every distinct token in the
//!   last `repeat_last_n` tokens of the history, a positive logit is divided by the penalty and a
//!   non-positive one multiplied, so the penalty always pushes the token down;
//! - presence/frequency (OpenAI's formula, as llama.cpp applies it in the same pass):
//!   `logit -= presence + frequency · count`, over the same window;
//! - top-p: softmax over the surviving candidates at temperature 1, keep the smallest
//!   most-probable prefix whose mass reaches `top_p` (at least one token);
//! - min-p: keep tokens with `p ≥ min_p · p_max`, i.e. `logit ≥ max_logit + ln(min_p)`; it does
//!   not depend on the normalization, so no softmax is needed;
//! - temperature divides the logits of the survivors, then one draw from their softmax.
//!
//! Numerics: NaN logits are treated as −∞ (never chosen); softmax is taken relative to the max so
//! `+∞`/huge logits cannot overflow; when no finite candidate is left the sampler falls back to
//! the argmax of the logits as they came in. Nothing here panics on bad logits.
//!
//! Cost on a 150k vocabulary: the penalties touch only the window; top-k is one `select_nth`
//! (linear) plus a sort of k; top-p without top-k sorts only as long a prefix as it needs,
//! doubling from 64; min-p and the draw are linear. The full vocabulary is never sorted unless
//! top-p really needs all of it.

use std::cmp::Ordering;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Per-request sampling knobs. Field names follow Ollama's options; `Default` is Ollama's
/// defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy argmax; otherwise logits are divided by it before the draw.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 = off.
    pub top_k: usize,
    /// Nucleus mass in (0, 1]; 1 = off.
    pub top_p: f32,
    /// Minimum probability relative to the most likely token, in [0, 1]; 0 = off.
    pub min_p: f32,
    /// llama.cpp-style repetition penalty (> 0); 1 = off.
    pub repeat_penalty: f32,
    /// How many of the most recent history tokens the penalties look at; 0 disables every
    /// penalty (llama.cpp `penalty_last_n = 0`).
    pub repeat_last_n: usize,
    /// Subtracted once from every token present in the window, in [-2, 2] (OpenAI's range).
    pub presence_penalty: f32,
    /// Subtracted per occurrence in the window, in [-2, 2] (OpenAI's range).
    pub frequency_penalty: f32,
    /// Seed of the request's random stream; `None` = fresh OS entropy.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    /// Ollama's `DefaultOptions` (api/types.go).
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.9,
            min_p: 0.0,
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Plain argmax: temperature 0 and every filter and penalty off.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }

    /// Checks every field against its allowed range; the error names the field, the value and
    /// the range. `top_k` and `repeat_last_n` accept any value (larger than the vocabulary or the
    /// history simply means "all").
    pub fn validate(&self) -> Result<(), SamplingError> {
        let check = |field: &'static str, v: f32, ok: bool, allowed: &'static str| {
            if v.is_finite() && ok {
                Ok(())
            } else {
                Err(SamplingError::OutOfRange { field, value: v.to_string(), allowed })
            }
        };
        let t = self.temperature;
        check("temperature", t, t >= 0.0, "a finite number ≥ 0")?;
        let p = self.top_p;
        check("top_p", p, p > 0.0 && p <= 1.0, "(0, 1]")?;
        let m = self.min_p;
        check("min_p", m, (0.0..=1.0).contains(&m), "[0, 1]")?;
        let r = self.repeat_penalty;
        check("repeat_penalty", r, r > 0.0, "a finite number > 0")?;
        for (field, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            check(field, v, (-2.0..=2.0).contains(&v), "[-2, 2]")?;
        }
        Ok(())
    }

    fn penalties_active(&self) -> bool {
        self.repeat_last_n > 0
            && (self.repeat_penalty != 1.0 || self.presence_penalty != 0.0 || self.frequency_penalty != 0.0)
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    #[error("{field} = {value} is out of range: allowed is {allowed}")]
    OutOfRange { field: &'static str, value: String, allowed: &'static str },
}

/// One sequence's sampler: its parameters, its random stream and reusable scratch space (no
/// allocation per token after the first).
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    /// Only ids below this are ever chosen: models often pad the output head past the
    /// tokenizer's vocabulary, and those ids carry no text.
    vocab_size: usize,
    rng: ChaCha8Rng,
    /// Surviving (id, logit) pairs of the current step.
    cands: Vec<(u32, f32)>,
    /// Softmax weights of `cands` for the draw.
    weights: Vec<f32>,
    /// The penalty window's ids, sorted to count them.
    window: Vec<u32>,
}

impl Sampler {
    /// Validates `params` and seeds the random stream (ChaCha8 from `seed`, else OS entropy).
    pub fn new(params: SamplingParams, vocab_size: usize) -> Result<Self, SamplingError> {
        params.validate()?;
        if vocab_size == 0 {
            return Err(SamplingError::OutOfRange {
                field: "vocab_size",
                value: "0".into(),
                allowed: "at least 1 token",
            });
        }
        let rng = match params.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_os_rng(),
        };
        Ok(Self { params, vocab_size, rng, cands: Vec::new(), weights: Vec::new(), window: Vec::new() })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token. `logits` is the model's row for the last position; it is modified
    /// in place (NaN → −∞, penalties applied). `history` is the sequence so far (prompt and
    /// generated tokens, oldest first), which the penalties look at.
    ///
    /// Panics only if `logits` is empty, which the model never returns.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        assert!(!logits.is_empty(), "sampler called with an empty logit row");
        let n = logits.len().min(self.vocab_size);
        let logits = &mut logits[..n];

        // One pass: sanitize and remember the incoming argmax for the all-(−∞) fallback.
        let mut raw_best = (0u32, f32::NEG_INFINITY);
        for (i, l) in logits.iter_mut().enumerate() {
            if l.is_nan() {
                *l = f32::NEG_INFINITY;
            }
            if *l > raw_best.1 {
                raw_best = (i as u32, *l);
            }
        }
        let raw_argmax = raw_best.0;

        let penalties = self.params.penalties_active();
        if self.params.temperature == 0.0 && !penalties {
            // Plain greedy: the pass above already found it (highest, lowest id on ties, 0 when
            // every logit is −∞), so the vocabulary is scanned once per token, not twice.
            return raw_argmax;
        }
        if penalties {
            self.apply_penalties(logits, history);
        }

        if self.params.temperature == 0.0 {
            return argmax(logits).unwrap_or(raw_argmax);
        }

        self.cands.clear();
        self.cands
            .extend(logits.iter().enumerate().filter(|(_, &l)| l > f32::NEG_INFINITY).map(|(i, &l)| (i as u32, l)));
        if self.cands.is_empty() {
            return raw_argmax;
        }
        // +∞ outweighs every finite logit: only the +∞ tokens stay, equally likely (the shifted
        // softmax below would compute ∞ − ∞ = NaN for them).
        if self.cands.iter().any(|c| c.1 == f32::INFINITY) {
            self.cands.retain(|c| c.1 == f32::INFINITY);
            self.cands.iter_mut().for_each(|c| c.1 = 0.0);
        }
        // `sorted`: how many leading candidates are known to be the most likely, in order.
        let mut sorted = 0;
        let k = self.params.top_k;
        if k > 0 && k < self.cands.len() {
            self.cands.select_nth_unstable_by(k - 1, by_logit_desc);
            self.cands.truncate(k);
            self.cands.sort_unstable_by(by_logit_desc);
            sorted = k;
        }
        if self.params.top_p < 1.0 {
            self.top_p(sorted);
        }
        if self.params.min_p > 0.0 {
            let max = max_logit(&self.cands);
            let ln_min_p = self.params.min_p.ln();
            // `max` itself always passes (0 ≥ ln(min_p) since min_p ≤ 1).
            self.cands.retain(|&(_, l)| l - max >= ln_min_p);
        }
        self.draw()
    }

    /// Repeat, presence and frequency penalties over the last `repeat_last_n` history tokens,
    /// once per distinct token (llama.cpp counts occurrences in a map the same way).
    fn apply_penalties(&mut self, logits: &mut [f32], history: &[u32]) {
        let p = &self.params;
        let start = history.len().saturating_sub(p.repeat_last_n);
        self.window.clear();
        self.window.extend(history[start..].iter().copied().filter(|&id| (id as usize) < logits.len()));
        self.window.sort_unstable();
        for run in self.window.chunk_by(|a, b| a == b) {
            let l = &mut logits[run[0] as usize];
            if p.repeat_penalty != 1.0 {
                if *l <= 0.0 {
                    *l *= p.repeat_penalty;
                } else {
                    *l /= p.repeat_penalty;
                }
            }
            *l -= p.presence_penalty + p.frequency_penalty * run.len() as f32;
        }
    }

    /// Keeps the smallest most-probable prefix of `cands` whose softmax mass (temperature 1)
    /// reaches `top_p`. The first `sorted` candidates are already in order; more are ordered
    /// only as far as the prefix needs.
    fn top_p(&mut self, mut sorted: usize) {
        let cands = &mut self.cands;
        let len = cands.len();
        let max = max_logit(cands);
        let total: f64 = cands.iter().map(|&(_, l)| ((l - max) as f64).exp()).sum();
        let target = self.params.top_p as f64 * total;
        let mut mass = 0.0f64;
        let mut i = 0;
        let mut want = len.min(64);
        loop {
            if want > sorted {
                let rest = &mut cands[sorted..];
                let need = want - sorted;
                if need < rest.len() {
                    rest.select_nth_unstable_by(need - 1, by_logit_desc);
                }
                rest[..need].sort_unstable_by(by_logit_desc);
                sorted = want;
            }
            while i < want {
                mass += ((cands[i].1 - max) as f64).exp();
                i += 1;
                if mass >= target {
                    cands.truncate(i);
                    return;
                }
            }
            if want == len {
                // Rounding kept the sum just under the target: everything stays.
                return;
            }
            want = (want * 2).min(len);
        }
    }

    /// Temperature, softmax relative to the max, one uniform draw.
    fn draw(&mut self) -> u32 {
        let cands = &self.cands;
        let max = max_logit(cands);
        let t = self.params.temperature;
        self.weights.clear();
        // (l − max) ≤ 0, so every weight is in [0, 1] and the max has weight 1: no overflow,
        // and the sum is at least 1.
        self.weights.extend(cands.iter().map(|&(_, l)| ((l - max) / t).exp()));
        let total: f64 = self.weights.iter().map(|&w| w as f64).sum();
        let r = self.rng.random::<f64>() * total;
        let mut acc = 0.0f64;
        for (&(id, _), &w) in cands.iter().zip(&self.weights) {
            acc += w as f64;
            // Strictly greater: a zero-weight candidate can never be chosen.
            if acc > r {
                return id;
            }
        }
        // `acc` ends at exactly `total` (same sum, same order), so this is reached only when
        // u·total rounds up to total for u just below 1: take the most likely candidate.
        cands.iter().max_by(|a, b| by_logit_desc(b, a)).map(|c| c.0).expect("draw runs on a non-empty candidate list")
    }
}

/// Highest logit first; equal logits by lower id, so every ordering is deterministic.
fn by_logit_desc(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

fn max_logit(cands: &[(u32, f32)]) -> f32 {
    cands.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max)
}

/// Index of the largest finite-or-+∞ logit, lowest id on ties; `None` if all are −∞.
fn argmax(logits: &[f32]) -> Option<u32> {
    let mut best: Option<(u32, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        if l > best.map_or(f32::NEG_INFINITY, |b| b.1) {
            best = Some((i as u32, l));
        }
    }
    best.map(|b| b.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams { temperature: 1.0, seed: Some(7), ..SamplingParams::greedy() };
        f(&mut p);
        p
    }

    fn sampler(p: SamplingParams, vocab: usize) -> Sampler {
        Sampler::new(p, vocab).expect("valid params")
    }

    /// Draws `n` tokens from fresh copies of `logits` with an empty history.
    fn draws(s: &mut Sampler, logits: &[f32], n: usize) -> Vec<u32> {
        (0..n).map(|_| s.sample(&mut logits.to_vec(), &[])).collect()
    }

    fn softmax(logits: &[f32], t: f32) -> Vec<f64> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let e: Vec<f64> = logits.iter().map(|&l| ((l as f64 - max) / t as f64).exp()).collect();
        let z: f64 = e.iter().sum();
        e.iter().map(|v| v / z).collect()
    }

    /// Pearson's chi-square statistic of observed counts against expected probabilities.
    fn chi_square(counts: &[usize], probs: &[f64]) -> f64 {
        let n: usize = counts.iter().sum();
        counts
            .iter()
            .zip(probs)
            .map(|(&c, &p)| {
                let e = p * n as f64;
                (c as f64 - e).powi(2) / e
            })
            .sum()
    }

    fn counts(ids: &[u32], vocab: usize) -> Vec<usize> {
        let mut c = vec![0; vocab];
        ids.iter().for_each(|&i| c[i as usize] += 1);
        c
    }

    /// Pseudo-random logits spread over a realistic range (no crate needed for a fixed pattern).
    fn spread_logits(n: usize, salt: u64) -> Vec<f32> {
        let mut x = salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 24) as f32 * 20.0 - 10.0
            })
            .collect()
    }

    #[test]
    fn defaults_are_ollamas_and_valid() {
        let d = SamplingParams::default();
        assert_eq!((d.temperature, d.top_k, d.top_p, d.min_p), (0.8, 40, 0.9, 0.0));
        assert_eq!((d.repeat_penalty, d.repeat_last_n), (1.1, 64));
        assert_eq!((d.presence_penalty, d.frequency_penalty, d.seed), (0.0, 0.0, None));
        d.validate().unwrap();
        SamplingParams::greedy().validate().unwrap();
    }

    #[test]
    fn greedy_picks_the_max_and_the_lowest_id_on_ties() {
        let mut s = sampler(SamplingParams::greedy(), 6);
        assert_eq!(s.sample(&mut [0.1, 2.0, -1.0, 1.5, 0.0, 1.9], &[]), 1);
        assert_eq!(s.sample(&mut [0.1, 3.0, -1.0, 3.0, 0.0, 1.9], &[]), 1);
        let logits = spread_logits(150_000, 3);
        let want = argmax(&logits).unwrap();
        let mut s = sampler(SamplingParams::greedy(), logits.len());
        assert_eq!(s.sample(&mut logits.clone(), &[]), want);
    }

    #[test]
    fn ids_past_the_vocabulary_are_never_chosen() {
        // A padded head: the largest logit sits at an id the tokenizer does not have.
        let mut s = sampler(SamplingParams::greedy(), 3);
        assert_eq!(s.sample(&mut [0.0, 1.0, 0.5, 9.0], &[]), 1);
        let mut s = sampler(params(|_| {}), 3);
        let logits = [0.0, 0.0, 0.0, 50.0];
        assert!(draws(&mut s, &logits, 200).iter().all(|&t| t < 3));
    }

    #[test]
    fn same_seed_same_sequence_different_seed_differs() {
        let logits = [0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -0.1, -0.2];
        let run = |seed| {
            let mut s = sampler(params(|p| p.seed = Some(seed)), logits.len());
            draws(&mut s, &logits, 100)
        };
        let a = run(42);
        assert_eq!(a, run(42));
        assert_ne!(a, run(43));
        // The draws really vary (a sampler stuck on one id would pass the two lines above).
        assert!(counts(&a, logits.len()).iter().filter(|&&c| c > 0).count() >= 5);
    }

    #[test]
    fn unseeded_samplers_draw_from_os_entropy() {
        let logits = [0.0; 16];
        let mut a = sampler(params(|p| p.seed = None), 16);
        let mut b = sampler(params(|p| p.seed = None), 16);
        // 64 uniform draws over 16 ids coincide with probability 16^-64.
        assert_ne!(draws(&mut a, &logits, 64), draws(&mut b, &logits, 64));
    }

    #[test]
    fn top_k_1_and_tiny_top_p_equal_greedy() {
        for salt in 0..20 {
            let logits = spread_logits(5_000, salt);
            let want = argmax(&logits).unwrap();
            let mut k1 = sampler(params(|p| (p.top_k, p.temperature) = (1, 1.5)), 5_000);
            assert_eq!(draws(&mut k1, &logits, 5), vec![want; 5], "top_k=1, salt {salt}");
            let mut p0 = sampler(params(|p| (p.top_p, p.temperature) = (1e-6, 1.5)), 5_000);
            assert_eq!(draws(&mut p0, &logits, 5), vec![want; 5], "top_p tiny, salt {salt}");
        }
    }

    #[test]
    fn top_k_keeps_exactly_the_k_best() {
        let logits = spread_logits(1_000, 11);
        let mut order: Vec<u32> = (0..1_000).collect();
        order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        let best: Vec<u32> = order[..5].to_vec();
        // A high temperature flattens the five so all of them show up.
        let mut s = sampler(params(|p| (p.top_k, p.temperature) = (5, 100.0)), 1_000);
        let got = draws(&mut s, &logits, 2_000);
        let mut seen: Vec<u32> = got.clone();
        seen.sort_unstable();
        seen.dedup();
        let mut want = best.clone();
        want.sort_unstable();
        assert_eq!(seen, want);
    }

    #[test]
    fn top_p_keeps_the_smallest_prefix_reaching_the_mass() {
        // Probabilities 0.5, 0.25, 0.125, 0.0625, 0.0625 (logits are log2-spaced).
        let ln2 = std::f32::consts::LN_2;
        let logits = [3.0 * ln2, 2.0 * ln2, ln2, 0.0, 0.0];
        let support = |top_p: f32| {
            let mut s = sampler(params(|p| (p.top_p, p.temperature) = (top_p, 50.0)), 5);
            let mut ids = draws(&mut s, &logits, 1_000);
            ids.sort_unstable();
            ids.dedup();
            ids
        };
        // Thresholds sit between the cumulative masses 0.5, 0.75, 0.875, 0.9375, 1.
        assert_eq!(support(0.45), [0]);
        assert_eq!(support(0.55), [0, 1]);
        assert_eq!(support(0.74), [0, 1]);
        assert_eq!(support(0.8), [0, 1, 2]);
        assert_eq!(support(0.9), [0, 1, 2, 3]);
        assert_eq!(support(0.95), [0, 1, 2, 3, 4]);
        assert_eq!(support(1.0), [0, 1, 2, 3, 4]);
    }

    #[test]
    fn top_p_without_top_k_on_a_large_vocabulary_matches_a_full_sort() {
        // The incremental prefix sort must pick the same set as sorting everything.
        let n = 20_000;
        let logits: Vec<f32> = spread_logits(n, 5).iter().map(|l| l * 0.3).collect();
        let probs = softmax(&logits, 1.0);
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        let mut mass = 0.0;
        let keep = order
            .iter()
            .position(|&i| {
                mass += probs[i];
                mass >= 0.9
            })
            .unwrap()
            + 1;
        assert!(keep > 128, "the case must need several doublings, needs {keep}");
        let mut s = sampler(params(|p| p.top_p = 0.9), n);
        s.sample(&mut logits.clone(), &[]);
        let mut got: Vec<u32> = s.cands.iter().map(|c| c.0).collect();
        got.sort_unstable();
        let mut want: Vec<u32> = order[..keep].iter().map(|&i| i as u32).collect();
        want.sort_unstable();
        assert_eq!(got.len(), want.len());
        assert_eq!(got, want);
    }

    #[test]
    fn min_p_is_relative_to_the_most_likely_token() {
        // Relative probabilities 1, 0.5, 0.25, 0.1 of the first token.
        let logits = [0.0, 0.5f32.ln(), 0.25f32.ln(), 0.1f32.ln()];
        let support = |min_p: f32| {
            let mut s = sampler(params(|p| (p.min_p, p.temperature) = (min_p, 50.0)), 4);
            let mut ids = draws(&mut s, &logits, 1_000);
            ids.sort_unstable();
            ids.dedup();
            ids
        };
        assert_eq!(support(0.3), [0, 1]);
        assert_eq!(support(0.2), [0, 1, 2]);
        assert_eq!(support(0.05), [0, 1, 2, 3]);
        assert_eq!(support(1.0), [0]);
        // Shifting every logit changes nothing: the rule is relative.
        let shifted: Vec<f32> = logits.iter().map(|l| l + 7.0).collect();
        let mut s = sampler(params(|p| (p.min_p, p.temperature) = (0.3, 50.0)), 4);
        assert!(draws(&mut s, &shifted, 500).iter().all(|&t| t < 2));
    }

    #[test]
    fn repeat_penalty_divides_positive_and_multiplies_negative_logits() {
        let p = params(|p| (p.temperature, p.repeat_penalty) = (0.0, 1.25));
        let mut s = sampler(p, 5);
        let mut logits = [2.0, 1.9, -1.0, -1.1, 0.5];
        // Token 0 appears twice but is penalized once; token 2 is negative.
        assert_eq!(s.sample(&mut logits, &[0, 2, 0]), 1);
        assert_eq!(logits, [2.0 / 1.25, 1.9, -1.25, -1.1, 0.5]);
        // Among negatives, the penalized one falls below its neighbour.
        let mut s = sampler(params(|p| (p.temperature, p.repeat_penalty) = (0.0, 1.25)), 2);
        assert_eq!(s.sample(&mut [-1.0, -1.1], &[0]), 1);
    }

    #[test]
    fn penalties_look_only_at_the_last_n_tokens() {
        let p = params(|p| (p.temperature, p.repeat_penalty, p.repeat_last_n) = (0.0, 2.0, 2));
        let mut s = sampler(p, 3);
        // Token 0 is outside the window of the last two tokens.
        assert_eq!(s.sample(&mut [2.0, 1.5, 0.0], &[0, 2, 2]), 0);
        assert_eq!(s.sample(&mut [2.0, 1.5, 0.0], &[2, 0]), 1);
        // repeat_last_n = 0 switches every penalty off.
        let p = params(|p| (p.temperature, p.repeat_penalty, p.presence_penalty, p.repeat_last_n) = (0.0, 2.0, 2.0, 0));
        let mut logits = [2.0, 1.5, 0.0];
        assert_eq!(sampler(p, 3).sample(&mut logits, &[0, 0]), 0);
        assert_eq!(logits, [2.0, 1.5, 0.0]);
    }

    #[test]
    fn presence_and_frequency_subtract_openai_style() {
        let p = params(|p| (p.temperature, p.presence_penalty, p.frequency_penalty) = (0.0, 0.5, 0.25));
        let mut s = sampler(p, 4);
        let mut logits = [3.0, 2.5, 1.0, 0.0];
        // Token 0 four times: 3 − 0.5 − 4·0.25 = 1.5, below token 1 seen once: 2.5 − 0.75.
        let choice = s.sample(&mut logits, &[0, 0, 0, 0, 1]);
        assert_eq!(logits, [3.0 - 0.5 - 1.0, 2.5 - 0.5 - 0.25, 1.0, 0.0]);
        assert_eq!(choice, 1);
        // A negative presence penalty encourages a seen token.
        let p = params(|p| (p.temperature, p.presence_penalty) = (0.0, -1.0));
        assert_eq!(sampler(p, 3).sample(&mut [1.0, 0.5, 0.2], &[2]), 2);
    }

    #[test]
    fn sampling_matches_softmax_frequencies() {
        const N: usize = 20_000;
        // Chi-square with 4 degrees of freedom: P(X > 18.47) = 0.001. With fixed seeds the
        // test is deterministic; a wrong distribution (an off-by-one in the walk, temperature
        // applied twice, a missing exp) lands far above the bound.
        const BOUND: f64 = 18.47;
        let logits = [1.0, 2.0, 0.5, -1.0, 3.0];
        for (t, seed) in [(1.0, 1), (0.6, 2), (2.5, 3)] {
            let mut s = sampler(params(|p| (p.temperature, p.seed) = (t, Some(seed))), 5);
            let c = counts(&draws(&mut s, &logits, N), 5);
            let chi = chi_square(&c, &softmax(&logits, t));
            assert!(chi < BOUND, "T={t}: chi-square {chi} ≥ {BOUND}, counts {c:?}");
            // The statistic has power: the T=1 distribution is rejected at other temperatures.
            if t != 1.0 {
                assert!(chi_square(&c, &softmax(&logits, 1.0)) > 10.0 * BOUND);
            }
        }
        // After top-k the draw follows the renormalized softmax of the survivors (2 dof: 13.82).
        let mut s = sampler(params(|p| (p.top_k, p.temperature, p.seed) = (3, 0.8, Some(9))), 5);
        let c = counts(&draws(&mut s, &logits, N), 5);
        assert_eq!((c[2], c[3]), (0, 0), "tokens outside the top 3 were drawn: {c:?}");
        let kept = [c[4], c[1], c[0]];
        let chi = chi_square(&kept, &softmax(&[3.0, 2.0, 1.0], 0.8));
        assert!(chi < 13.82, "top-k renormalization: chi-square {chi}, counts {c:?}");
    }

    #[test]
    fn nan_and_infinite_logits_do_not_panic() {
        let nan = f32::NAN;
        let inf = f32::INFINITY;
        for p in [SamplingParams::greedy(), params(|_| {}), SamplingParams::default()] {
            let mut s = sampler(p, 4);
            for _ in 0..50 {
                let t = s.sample(&mut [nan, 1.0, nan, 0.5], &[]);
                assert!(t == 1 || t == 3, "NaN chosen: {t}");
            }
            assert_eq!(s.sample(&mut [nan; 4], &[]), 0, "all NaN falls back to id 0");
            assert_eq!(s.sample(&mut [f32::NEG_INFINITY; 4], &[]), 0);
            assert_eq!(s.sample(&mut [0.0, inf, nan, f32::MAX], &[1]), 1, "+inf dominates");
        }
        // Logits so large that softmax without the max shift would overflow.
        let mut s = sampler(params(|_| {}), 3);
        let got = draws(&mut s, &[1e30, 1e30 - 1e24, -1e30], 200);
        assert!(got.iter().all(|&t| t == 0), "{got:?}");
    }

    #[test]
    fn a_penalty_overflow_falls_back_to_the_incoming_argmax() {
        // −3e38 · 10 overflows to −∞ for every token: nothing finite is left after penalties.
        let p = params(|p| (p.repeat_penalty, p.temperature) = (10.0, 1.0));
        let mut s = sampler(p, 2);
        assert_eq!(s.sample(&mut [-3e38, -3.1e38], &[0, 1]), 0);
    }

    #[test]
    fn validation_names_the_field_and_the_range() {
        let bad: [(SamplingParams, &str, &str); 10] = [
            (params(|p| p.temperature = -0.1), "temperature = -0.1", "≥ 0"),
            (params(|p| p.temperature = f32::NAN), "temperature = NaN", "finite"),
            (params(|p| p.temperature = f32::INFINITY), "temperature = inf", "finite"),
            (params(|p| p.top_p = 0.0), "top_p = 0", "(0, 1]"),
            (params(|p| p.top_p = 1.5), "top_p = 1.5", "(0, 1]"),
            (params(|p| p.min_p = -0.5), "min_p = -0.5", "[0, 1]"),
            (params(|p| p.min_p = 2.0), "min_p = 2", "[0, 1]"),
            (params(|p| p.repeat_penalty = 0.0), "repeat_penalty = 0", "> 0"),
            (params(|p| p.presence_penalty = 2.5), "presence_penalty = 2.5", "[-2, 2]"),
            (params(|p| p.frequency_penalty = -3.0), "frequency_penalty = -3", "[-2, 2]"),
        ];
        for (p, head, range) in bad {
            let msg = p.validate().unwrap_err().to_string();
            assert!(msg.starts_with(head) && msg.contains(range), "{msg}");
            let msg = Sampler::new(p, 10).unwrap_err().to_string();
            assert!(msg.starts_with(head), "Sampler::new validates too: {msg}");
        }
        // The edges of each range are allowed.
        for p in [
            params(|p| p.temperature = 0.0),
            params(|p| p.top_p = 1.0),
            params(|p| (p.min_p, p.presence_penalty, p.frequency_penalty) = (1.0, -2.0, 2.0)),
            params(|p| (p.top_k, p.repeat_last_n) = (usize::MAX, usize::MAX)),
        ] {
            p.validate().unwrap();
        }
        let msg = Sampler::new(params(|_| {}), 0).unwrap_err().to_string();
        assert!(msg.contains("vocab_size"), "{msg}");
    }
}
