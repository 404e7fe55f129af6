//! One sequence, start to finish: prompt ids in, text and tokens out. This is what `zoe-llm run`
//! and `zoe-llm bench` drive; the batching engine (scheduler, paged KV cache) replaces it for the
//! server but keeps its pieces: [`Sampler`], [`Detokenizer`], and the same finish rules.
//!
//! The loop: validate, one prefill forward over the whole prompt, then sample → check EOS →
//! detokenize (stop strings) → forward the new token, until a stop, `max_tokens`, or the context
//! is full. The last sampled token is never forwarded: nothing would read its logits.
//!
//! Finish rules (OpenAI/Ollama `stop` vs `length`): an end-of-generation id
//! ([`Tokenizer::eos_ids`]) stops without adding text or a token; a stop string stops with the
//! text cut before it (the token that completed it is kept in `tokens`); running out of
//! `max_tokens` or of context is `Length`.

use std::ops::ControlFlow;
use std::time::Instant;

use crate::backend::Backend;
use crate::chat::tools::ToolSet;
use crate::chat::{ChatTemplate, TemplateError};
use crate::engine::detokenizer::Detokenizer;
use crate::engine::grammar::{Constraint, ConstraintState};
use crate::engine::sampler::{Sampler, SamplingError, SamplingParams};
use crate::model::kv_cache::{ContiguousKvCache, KvError};
use crate::model::llama::{Llama, MmPrompt, ModelError};
use crate::model::tokenizer::{Tokenizer, TokenizerError};

#[derive(Clone, Debug, PartialEq)]
pub struct GenerateRequest {
    /// The tokenized prompt, BOS included when the model wants one (see [`raw_prompt_ids`] and
    /// [`render_chat_prompt`]).
    pub prompt_ids: Vec<u32>,
    /// Upper bound on generated tokens; clipped to what the context leaves. 0 = prefill only.
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Strings that end generation; the text is cut before the first one that appears.
    pub stop: Vec<String>,
    /// Report each generated token's log-probability and this many most likely alternatives
    /// (`Some(0)`: the chosen token's only). `None`: no log-probabilities (no extra work).
    pub logprobs: Option<usize>,
    /// Only tokens that keep the output valid for this grammar may be sampled; the sequence
    /// stops when the grammar is complete.
    pub constraint: Option<Constraint>,
    /// A prompt with images: embeddings, M-RoPE positions and cache keys (batching engine only).
    pub mm: Option<std::sync::Arc<MmPrompt>>,
}

/// Log-probabilities of one generated token under the model's own distribution (the softmax of
/// the raw logits, before penalties, filters and temperature, as vLLM reports them by default).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    /// The most likely tokens at this position, most likely first.
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprobs {
    /// Log-softmax of `logits` at `chosen`, plus the `top` best; NaN logits count as −∞.
    pub fn of(logits: &[f32], chosen: u32, top: usize) -> Self {
        let clean = |v: f32| if v.is_nan() { f32::NEG_INFINITY } else { v };
        let max = logits.iter().copied().map(clean).fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits.iter().map(|&v| ((clean(v) - max) as f64).exp()).sum();
        let lse = max + sum.ln() as f32;
        let lp = |v: f32| clean(v) - lse;
        let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
        if top > 0 {
            let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
            let k = top.min(idx.len());
            let by_logit =
                |a: &u32, b: &u32| clean(logits[*b as usize]).total_cmp(&clean(logits[*a as usize])).then(a.cmp(b));
            if k < idx.len() {
                idx.select_nth_unstable_by(k - 1, by_logit);
                idx.truncate(k);
            }
            idx.sort_unstable_by(by_logit);
            best.extend(idx.into_iter().map(|i| (i, lp(logits[i as usize]))));
        }
        Self { logprob: lp(logits[chosen as usize]), top: best }
    }
}

/// What the generation loop hands its caller after every sampled token, and once more for text
/// held back until the end.
#[derive(Clone, Copy, Debug)]
pub struct Emitted<'a> {
    /// Text that became final with this step; may be empty (a token that completes no
    /// character, or text held back as a possible stop-string prefix).
    pub text: &'a str,
    /// The sampled id; `None` for the end-of-generation flush of held-back text.
    pub token: Option<u32>,
    pub logprobs: Option<&'a TokenLogprobs>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` reached or the context is full.
    Length,
    /// The caller asked to stop (a client that went away).
    Cancelled,
}

impl FinishReason {
    /// The wire name both OpenAI (`finish_reason`) and Ollama (`done_reason`) use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Cancelled => "abort",
        }
    }
}

/// Wall-clock cost of one generation, split the way llama.cpp reports it (prompt eval vs eval).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Timings {
    /// Tokens in the prefill forward.
    pub prompt_tokens: usize,
    /// Prefill forward plus sampling the first token: the time to first token.
    pub prompt_ms: f64,
    /// Forward passes after the prefill, one per generated token except the first.
    pub decode_tokens: usize,
    /// Those forward passes plus the sampling after each.
    pub decode_ms: f64,
}

impl Timings {
    /// Prefill throughput; `None` when nothing was timed.
    pub fn prompt_tokens_per_s(&self) -> Option<f64> {
        rate(self.prompt_tokens, self.prompt_ms)
    }

    /// Decode throughput (one token per forward); `None` before a second token.
    pub fn decode_tokens_per_s(&self) -> Option<f64> {
        rate(self.decode_tokens, self.decode_ms)
    }

    pub fn total_ms(&self) -> f64 {
        self.prompt_ms + self.decode_ms
    }
}

fn rate(tokens: usize, ms: f64) -> Option<f64> {
    (tokens > 0 && ms > 0.0).then(|| tokens as f64 * 1000.0 / ms)
}

#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// Generated ids, without a final end-of-generation token.
    pub tokens: Vec<u32>,
    /// The text, exactly the concatenation of what `on_text` received.
    pub text: String,
    pub finish_reason: FinishReason,
    /// The stop string that ended generation, if one did.
    pub stop_reason: Option<String>,
    pub prompt_tokens: usize,
    pub timings: Timings,
    /// Set when the sequence had to end for an internal failure (its grammar failed): the
    /// output is cut short and the caller reports an error rather than a normal finish.
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("prompt_ids is empty: at least one prompt token is needed")]
    EmptyPrompt,
    #[error(
        "prompt is {prompt_tokens} tokens, the model's context is {context_len} \
         (the prompt must leave room for at least one generated token)"
    )]
    PromptTooLong { prompt_tokens: usize, context_len: usize },
    #[error("the model has no chat template (tokenizer.chat_template); use a raw prompt")]
    NoChatTemplate,
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error("{0}")]
    EndedEarly(String),
}

/// Generates for one prompt. `context_len` is the sequence's whole budget (prompt + generated);
/// the KV cache is sized to what this request can use, not to `context_len`. `on_token` is
/// called after every sampled token (except an end-of-generation one) with the text that became
/// final (complete UTF-8, not a possible stop-string prefix), and once more at the end if held
/// text remains; returning `Break` ends generation with [`FinishReason::Cancelled`] before the
/// next forward pass.
pub fn generate<B: Backend>(
    model: &Llama<B>,
    be: &B,
    tokenizer: &Tokenizer,
    req: GenerateRequest,
    context_len: usize,
    mut on_token: impl FnMut(Emitted<'_>) -> ControlFlow<()>,
) -> Result<Generation, GenerateError> {
    let mut dec = SeqDecoder::new(tokenizer, model.config.vocab_size, req, context_len)?;
    // Every sampled token but the last is forwarded, so the cache holds at most
    // prompt + max_new − 1 positions.
    let capacity = dec.prompt().len() + dec.max_new().saturating_sub(1);
    let mut cache = ContiguousKvCache::new(be, model.config.n_layers, model.layout().kv_cols(), capacity)?;
    dec.begin();
    let mut logits = model.forward(be, dec.prompt(), &mut cache, false)?;
    while let Some(id) = dec.step(&mut logits, &mut on_token) {
        logits = model.forward(be, &[id], &mut cache, false)?;
    }
    let g = dec.finish(&mut on_token);
    match g.error {
        Some(e) => Err(GenerateError::EndedEarly(e)),
        None => Ok(g),
    }
}

/// One sequence's state between forward passes: sampler, detokenizer, history and the finish
/// rules of the module doc. [`generate`] drives one with its own cache; the batching engine
/// drives many, one forward for all of them per step.
pub struct SeqDecoder<'t> {
    sampler: Sampler,
    detok: Detokenizer<&'t Tokenizer>,
    eos: &'t [u32],
    /// Prompt, then generated ids: what the penalties look at.
    history: Vec<u32>,
    prompt_tokens: usize,
    tokens: Vec<u32>,
    text: String,
    max_new: usize,
    logprobs: Option<usize>,
    raw_logits: Vec<f32>,
    constraint: Option<ConstraintState>,
    mm: Option<std::sync::Arc<MmPrompt>>,
    error: Option<String>,
    finish: Option<FinishReason>,
    started: Option<Instant>,
    decode_start: Option<Instant>,
    timings: Timings,
}

impl<'t> SeqDecoder<'t> {
    /// Validates `req` against the context (`context_len` = prompt + generated budget) and the
    /// vocabulary of the model's head (`model_vocab`).
    pub fn new(
        tokenizer: &'t Tokenizer,
        model_vocab: usize,
        req: GenerateRequest,
        context_len: usize,
    ) -> Result<Self, GenerateError> {
        let prompt_tokens = req.prompt_ids.len();
        if prompt_tokens == 0 {
            return Err(GenerateError::EmptyPrompt);
        }
        if prompt_tokens >= context_len {
            return Err(GenerateError::PromptTooLong { prompt_tokens, context_len });
        }
        // Ids past the tokenizer's vocabulary (a padded head) have no text; never sample them.
        let sampler = Sampler::new(req.sampling, tokenizer.vocab_size().min(model_vocab))?;
        let max_new = req.max_tokens.min(context_len - prompt_tokens);
        Ok(Self {
            sampler,
            detok: Detokenizer::new(tokenizer, req.stop),
            eos: tokenizer.eos_ids(),
            // The penalties see the prompt too, as llama.cpp's server feeds prompt tokens to its
            // sampler: a repetition of the question counts as repetition.
            history: req.prompt_ids,
            prompt_tokens,
            tokens: Vec::with_capacity(max_new),
            text: String::new(),
            max_new,
            logprobs: req.logprobs,
            raw_logits: Vec::new(),
            constraint: req.constraint.as_ref().map(Constraint::start),
            mm: req.mm,
            error: None,
            finish: None,
            started: None,
            decode_start: None,
            timings: Timings { prompt_tokens, ..Timings::default() },
        })
    }

    pub fn prompt(&self) -> &[u32] {
        &self.history[..self.prompt_tokens]
    }

    /// Prompt and generated ids so far.
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    /// The prompt's images, if it has any.
    pub fn mm(&self) -> Option<&MmPrompt> {
        self.mm.as_deref()
    }

    /// [`Self::history`] as the prefix cache keys it: image placeholders by their images.
    pub fn history_keys(&self) -> Vec<u32> {
        match &self.mm {
            None => self.history.clone(),
            Some(m) => m.keys(0, &self.history),
        }
    }

    pub fn max_new(&self) -> usize {
        self.max_new
    }

    pub fn generated(&self) -> &[u32] {
        &self.tokens
    }

    pub fn is_finished(&self) -> bool {
        self.finish.is_some()
    }

    /// Marks the start of the prefill (the time to first token counts from here).
    pub fn begin(&mut self) {
        self.started.get_or_insert_with(Instant::now);
    }

    /// Samples from the logits of the last forwarded position and reports the token through
    /// `on_token`. Returns the token to forward next, or `None` when the sequence has finished
    /// (end-of-generation id, stop string, `Break`, or length).
    pub fn step(
        &mut self,
        logits: &mut [f32],
        on_token: &mut impl FnMut(Emitted<'_>) -> ControlFlow<()>,
    ) -> Option<u32> {
        if self.finish.is_some() {
            return None;
        }
        if self.max_new == 0 {
            // Prefill only: its time is the prompt's.
            self.timings.prompt_ms = self.started.map_or(0.0, ms_since);
            self.finish = Some(FinishReason::Length);
            return None;
        }
        if self.logprobs.is_some() {
            // The sampler rewrites logits in place (penalties); log-probabilities use the raw row.
            self.raw_logits.clear();
            self.raw_logits.extend_from_slice(logits);
        }
        if let Some(c) = &mut self.constraint {
            if let Err(e) = c.mask(logits) {
                // A grammar that compiled can still fail (a parser step limit): end the output
                // rather than let it run unconstrained, and say so.
                self.error = Some(format!("constrained decoding failed: {e}"));
                self.finish = Some(FinishReason::Stop);
                return None;
            }
        }
        let id = self.sampler.sample(logits, &self.history);
        match self.decode_start {
            // The first sample ends the time to first token.
            None => {
                let t = Instant::now();
                self.timings.prompt_ms = self.started.map_or(0.0, |s| ms_between(s, t));
                self.decode_start = Some(t);
            }
            Some(_) => self.timings.decode_tokens += 1,
        }
        if self.eos.contains(&id) {
            self.finish = Some(FinishReason::Stop);
            return None;
        }
        self.tokens.push(id);
        self.history.push(id);
        let step = self.detok.push(id);
        let logprobs = self.logprobs.map(|top| TokenLogprobs::of(&self.raw_logits, id, top));
        self.text.push_str(&step.text);
        let flow = on_token(Emitted { text: &step.text, token: Some(id), logprobs: logprobs.as_ref() });
        let grammar_done = match self.constraint.as_mut().map(|c| c.accept(id)) {
            None | Some(Ok(false)) => false,
            Some(Ok(true)) => true,
            Some(Err(e)) => {
                self.error = Some(format!("constrained decoding failed: {e}"));
                true
            }
        };
        if step.stopped.is_some() || grammar_done {
            self.finish = Some(FinishReason::Stop);
        } else if flow.is_break() {
            self.finish = Some(FinishReason::Cancelled);
        } else if self.tokens.len() == self.max_new {
            self.finish = Some(FinishReason::Length);
        }
        if self.finish.is_some() {
            None
        } else {
            Some(id)
        }
    }

    /// Ends the sequence now (a client that left while it waited between steps).
    pub fn cancel(&mut self) {
        self.finish.get_or_insert(FinishReason::Cancelled);
    }

    /// Flushes held-back text (unless cancelled) and returns the result.
    pub fn finish(mut self, on_token: &mut impl FnMut(Emitted<'_>) -> ControlFlow<()>) -> Generation {
        let finish_reason = self.finish.unwrap_or(FinishReason::Length);
        // Releases text held back as a possible stop-string prefix and any incomplete UTF-8
        // tail (nothing after a stop string matched).
        let tail = self.detok.finish();
        if !tail.is_empty() && finish_reason != FinishReason::Cancelled {
            self.text.push_str(&tail);
            // Generation is over; a Break here has nothing left to stop.
            let _ = on_token(Emitted { text: &tail, token: None, logprobs: None });
        }
        if let Some(t) = self.decode_start {
            self.timings.decode_ms = ms_since(t);
        }
        Generation {
            tokens: self.tokens,
            text: self.text,
            finish_reason,
            stop_reason: self.detok.stopped().map(str::to_owned),
            prompt_tokens: self.prompt_tokens,
            timings: self.timings,
            error: self.error,
        }
    }
}

fn ms_between(a: Instant, b: Instant) -> f64 {
    b.saturating_duration_since(a).as_secs_f64() * 1000.0
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// A one-message conversation for [`render_chat_prompt`].
pub fn user_message(content: &str) -> serde_json::Value {
    serde_json::json!({ "role": "user", "content": content })
}

/// Prompt ids for a conversation in the model's own chat template: rendered with
/// `add_generation_prompt = true` and the tokenizer's BOS/EOS strings, tokenized with special
/// tokens parsed (the template's `<|im_start|>` must become one id). BOS is prepended only when
/// the tokenizer asks for it and the template did not already emit it; llama.cpp warns about the
/// double BOS that adding it blindly would produce.
pub fn render_chat_prompt(tokenizer: &Tokenizer, messages: &[serde_json::Value]) -> Result<Vec<u32>, GenerateError> {
    render_chat_prompt_with_tools(tokenizer, messages, None)
}

/// [`render_chat_prompt`] with tools offered to the model. A template that renders `tools`
/// (Qwen2.5, Llama 3.x, Hermes) gets them as the `tools` variable, exactly as Hugging Face's
/// `apply_chat_template(tools=…)` passes them. A template that does not (SmolLM2's) would drop
/// them silently, so they go into the system message instead ([`ToolSet::prompt_section`]).
pub fn render_chat_prompt_with_tools(
    tokenizer: &Tokenizer,
    messages: &[serde_json::Value],
    tools: Option<&ToolSet>,
) -> Result<Vec<u32>, GenerateError> {
    let source = tokenizer.chat_template().ok_or(GenerateError::NoChatTemplate)?;
    let template = ChatTemplate::new(source, tokenizer.bos_token(), tokenizer.eos_token())?;
    let (tools_var, injected);
    let mut messages = messages;
    match tools {
        Some(t) if source.contains("tools") => tools_var = Some(serde_json::Value::Array(t.tools.clone())),
        Some(t) => {
            tools_var = None;
            let mut msgs = messages.to_vec();
            let section = t.prompt_section();
            match msgs.first_mut() {
                Some(m) if m["role"] == "system" => match &mut m["content"] {
                    // Content parts (a system message with images): the section is one more part.
                    serde_json::Value::Array(parts) => {
                        parts.push(serde_json::json!({ "type": "text", "text": format!("\n\n{section}") }))
                    }
                    content => {
                        let text = content.as_str().unwrap_or_default();
                        *content = format!("{text}\n\n{section}").into();
                    }
                },
                _ => msgs.insert(0, serde_json::json!({ "role": "system", "content": section })),
            }
            injected = msgs;
            messages = &injected;
        }
        None => tools_var = None,
    }
    let text = template.render(messages, true, tools_var.as_ref(), &serde_json::Map::new())?;
    let mut ids = tokenizer.encode(&text, true)?;
    let starts_with_bos = tokenizer.bos_token().is_some_and(|b| !b.is_empty() && text.starts_with(b));
    add_bos(tokenizer, &mut ids, starts_with_bos);
    Ok(ids)
}

/// Prompt ids for text used as-is (no template): special tokens in it are parsed, as llama.cpp's
/// CLI and server do, and BOS is prepended when the tokenizer asks for it.
pub fn raw_prompt_ids(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, GenerateError> {
    let mut ids = tokenizer.encode(text, true)?;
    add_bos(tokenizer, &mut ids, false);
    Ok(ids)
}

fn add_bos(tokenizer: &Tokenizer, ids: &mut Vec<u32>, text_has_bos: bool) {
    if let Some(bos) = tokenizer.bos_id().filter(|_| tokenizer.add_bos()) {
        if !text_has_bos && ids.first() != Some(&bos) {
            ids.insert(0, bos);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::model::kv_cache::ContiguousKvCache;
    use crate::model::test_model::{self, CHATML, CONTEXT, ENDOFTEXT, IM_END, IM_START};
    use crate::model::weights::MetaValue;

    struct Fixture {
        be: CpuBackend,
        model: Llama<CpuBackend>,
        tok: Tokenizer,
    }

    fn fixture() -> Fixture {
        let file = test_model::gguf(3);
        let be = CpuBackend::new(1);
        let model = Llama::from_gguf(&file, &be).unwrap();
        let tok = Tokenizer::from_gguf(&file).unwrap();
        Fixture { be, model, tok }
    }

    /// A tokenizer built from the tiny model's GGUF with some metadata changed.
    fn tokenizer_with(kvs: &[(&str, MetaValue)]) -> Tokenizer {
        let mut w = test_model::writer(3);
        for (k, v) in kvs {
            w.kv(k, v.clone());
        }
        Tokenizer::from_gguf(&w.build()).unwrap()
    }

    fn sampled(seed: u64) -> SamplingParams {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            repeat_penalty: 1.0,
            seed: Some(seed),
            ..SamplingParams::default()
        }
    }

    fn request(f: &Fixture, max_tokens: usize, sampling: SamplingParams) -> GenerateRequest {
        GenerateRequest {
            prompt_ids: f.tok.encode("Once upon a time", false).unwrap(),
            max_tokens,
            sampling,
            stop: vec![],
            logprobs: None,
            constraint: None,
            mm: None,
        }
    }

    /// Collects the non-empty text pieces.
    fn collect(pieces: &mut Vec<String>) -> impl FnMut(Emitted<'_>) -> ControlFlow<()> + '_ {
        |e| {
            if !e.text.is_empty() {
                pieces.push(e.text.to_owned());
            }
            ControlFlow::Continue(())
        }
    }

    fn run(f: &Fixture, req: GenerateRequest, context_len: usize) -> (Generation, Vec<String>) {
        let mut pieces = Vec::new();
        let g = generate(&f.model, &f.be, &f.tok, req, context_len, collect(&mut pieces)).unwrap();
        (g, pieces)
    }

    fn err(f: &Fixture, req: GenerateRequest, context_len: usize) -> GenerateError {
        generate(&f.model, &f.be, &f.tok, req, context_len, |_| ControlFlow::Continue(())).unwrap_err()
    }

    #[test]
    fn break_cancels_before_the_next_forward() {
        let f = fixture();
        let (full, _) = run(&f, request(&f, 12, sampled(3)), CONTEXT);
        let mut seen = 0;
        let g = generate(&f.model, &f.be, &f.tok, request(&f, 12, sampled(3)), CONTEXT, |e| {
            seen += usize::from(e.token.is_some());
            if seen == 4 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
        assert_eq!(g.finish_reason, FinishReason::Cancelled);
        assert_eq!(g.finish_reason.as_str(), "abort");
        assert_eq!(g.tokens, full.tokens[..4]);
        assert_eq!((seen, g.timings.decode_tokens), (4, 3));
    }

    #[test]
    fn logprobs_are_the_raw_log_softmax_with_sorted_alternatives() {
        let f = fixture();
        let mut req = request(&f, 6, SamplingParams::greedy());
        req.logprobs = Some(3);
        let mut got = Vec::new();
        let g = generate(&f.model, &f.be, &f.tok, req.clone(), CONTEXT, |e| {
            got.push((e.token, e.logprobs.cloned()));
            ControlFlow::Continue(())
        })
        .unwrap();
        // Against a full recompute of each position's logits.
        let mut seq = req.prompt_ids.clone();
        let cols = f.model.layout().kv_cols();
        for (tok, lp) in got.iter().filter(|(t, _)| t.is_some()) {
            let (tok, lp) = (tok.unwrap(), lp.as_ref().unwrap());
            let mut cache = ContiguousKvCache::new(&f.be, test_model::LAYERS, cols, seq.len()).unwrap();
            let logits = f.model.forward(&f.be, &seq, &mut cache, false).unwrap();
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = max + logits.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
            assert!((lp.logprob - (logits[tok as usize] - lse)).abs() < 1e-3);
            assert_eq!(lp.top.len(), 3);
            assert_eq!(lp.top[0].0, tok, "greedy picks the most likely token");
            assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
            seq.push(tok);
        }
        assert_eq!(seq[req.prompt_ids.len()..], g.tokens[..]);
        assert_eq!(
            TokenLogprobs::of(&[0.0, f32::NAN, 0.0], 0, 0),
            TokenLogprobs { logprob: -(2f32.ln()), top: vec![] }
        );
    }

    #[test]
    fn same_seed_same_generation_different_seed_differs() {
        let f = fixture();
        let (a, _) = run(&f, request(&f, 24, sampled(5)), CONTEXT);
        let (b, _) = run(&f, request(&f, 24, sampled(5)), CONTEXT);
        let (c, _) = run(&f, request(&f, 24, sampled(6)), CONTEXT);
        assert_eq!(a.tokens.len(), 24);
        assert_eq!((&a.tokens, &a.text), (&b.tokens, &b.text));
        assert_ne!(a.tokens, c.tokens);
    }

    #[test]
    fn streamed_text_concatenates_to_the_final_text_and_the_decode() {
        let f = fixture();
        let (g, pieces) = run(&f, request(&f, 40, sampled(11)), CONTEXT);
        assert!(pieces.iter().all(|p| !p.is_empty()));
        assert!(pieces.len() > 1, "text should stream in several pieces");
        assert_eq!(pieces.concat(), g.text);
        assert_eq!(g.text, f.tok.decode(&g.tokens, true));
        assert!(!g.text.is_empty());
    }

    /// Greedy generation with the incremental cache equals recomputing the whole sequence from a
    /// fresh cache at every step: prefill and decode positions line up.
    #[test]
    fn greedy_matches_full_recompute() {
        let f = fixture();
        let req = request(&f, 8, SamplingParams::greedy());
        let mut seq = req.prompt_ids.clone();
        let (g, _) = run(&f, req, CONTEXT);
        let cols = f.model.layout().kv_cols();
        for &want in &g.tokens {
            let mut cache = ContiguousKvCache::new(&f.be, test_model::LAYERS, cols, seq.len()).unwrap();
            let logits = f.model.forward(&f.be, &seq, &mut cache, false).unwrap();
            let best = (0..logits.len()).max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)));
            assert_eq!(best, Some(want as usize));
            seq.push(want);
        }
    }

    #[test]
    fn max_tokens_and_a_full_context_finish_with_length() {
        let f = fixture();
        let (g, _) = run(&f, request(&f, 5, sampled(1)), CONTEXT);
        assert_eq!((g.tokens.len(), g.finish_reason), (5, FinishReason::Length));
        let t = &g.timings;
        assert_eq!((t.prompt_tokens, t.decode_tokens), (g.prompt_tokens, 4));
        assert!(t.prompt_ms > 0.0 && t.decode_ms > 0.0);
        assert!(t.prompt_tokens_per_s().unwrap() > 0.0 && t.decode_tokens_per_s().unwrap() > 0.0);

        // The context leaves 3 tokens: max_tokens is clipped.
        let req = request(&f, 100, sampled(1));
        let ctx = req.prompt_ids.len() + 3;
        let (g3, _) = run(&f, req, ctx);
        assert_eq!((g3.tokens.len(), g3.finish_reason), (3, FinishReason::Length));
        assert_eq!(g3.tokens, g.tokens[..3], "clipping does not change the draws");

        // max_tokens = 0: prefill only.
        let (g0, pieces) = run(&f, request(&f, 0, sampled(1)), CONTEXT);
        assert_eq!((g0.tokens.len(), g0.text.as_str()), (0, ""));
        assert_eq!(g0.finish_reason, FinishReason::Length);
        assert!(pieces.is_empty() && g0.timings.prompt_ms > 0.0);
        assert_eq!(g0.timings.decode_tokens_per_s(), None);
    }

    #[test]
    fn stop_string_cuts_the_text() {
        let f = fixture();
        let (full, _) = run(&f, request(&f, 48, sampled(21)), CONTEXT);
        let chars: Vec<char> = full.text.chars().collect();
        // A two-character stop whose first occurrence is well inside the text.
        let (stop, at) = (chars.len() / 3..chars.len() - 2)
            .map(|i| chars[i..i + 2].iter().collect::<String>())
            .find_map(|s| full.text.find(&s).filter(|&at| at > 0).map(|at| (s, at)))
            .expect("random text has a repeated-free pair");
        let mut req = request(&f, 48, sampled(21));
        req.stop = vec![stop.clone()];
        let (g, pieces) = run(&f, req, CONTEXT);
        assert_eq!(g.finish_reason, FinishReason::Stop);
        assert_eq!(g.text, full.text[..at], "stop {stop:?}");
        assert_eq!(g.stop_reason.as_deref(), Some(stop.as_str()));
        assert_eq!(pieces.concat(), g.text);
        // Same draws up to the token that completed the stop string, and no further.
        assert!(g.tokens.len() < full.tokens.len());
        assert_eq!(g.tokens, full.tokens[..g.tokens.len()]);
        let through = f.tok.decode(&g.tokens, true);
        assert!(through.contains(&stop) && !f.tok.decode(&g.tokens[..g.tokens.len() - 1], true).contains(&stop));
    }

    #[test]
    fn an_end_of_generation_token_stops_without_text() {
        let f = fixture();
        let (g, _) = run(&f, request(&f, 16, SamplingParams::greedy()), CONTEXT);
        // Make the first token that is new at its position the model's EOS.
        let i = (1..g.tokens.len())
            .find(|&i| !g.tokens[..i].contains(&g.tokens[i]))
            .expect("greedy text uses more than one token");
        let tok = tokenizer_with(&[("tokenizer.ggml.eos_token_id", MetaValue::U32(g.tokens[i]))]);
        let mut pieces = Vec::new();
        let req = request(&f, 16, SamplingParams::greedy());
        let stopped = generate(&f.model, &f.be, &tok, req, CONTEXT, collect(&mut pieces)).unwrap();
        assert_eq!(stopped.finish_reason, FinishReason::Stop);
        assert_eq!(stopped.tokens, g.tokens[..i]);
        assert_eq!(stopped.text, tok.decode(&g.tokens[..i], true));
        assert_eq!(pieces.concat(), stopped.text);
    }

    #[test]
    fn bad_requests_are_errors_naming_the_limit() {
        let f = fixture();
        let req = request(&f, 4, sampled(1));
        let n = req.prompt_ids.len();
        for ctx in [n, n - 1] {
            let e = err(&f, req.clone(), ctx);
            assert!(
                matches!(e, GenerateError::PromptTooLong { prompt_tokens, context_len } if prompt_tokens == n && context_len == ctx)
            );
            assert!(e.to_string().starts_with(&format!("prompt is {n} tokens, the model's context is {ctx}")), "{e}");
        }
        let e = err(&f, GenerateRequest { prompt_ids: vec![], ..req.clone() }, CONTEXT);
        assert!(matches!(e, GenerateError::EmptyPrompt) && e.to_string().contains("prompt_ids"), "{e}");
        let mut bad = req.clone();
        bad.sampling.top_p = 0.0;
        let e = err(&f, bad, CONTEXT);
        assert!(e.to_string().contains("top_p = 0"), "{e}");
        let vocab = f.tok.vocab_size() as u32;
        let e = err(&f, GenerateRequest { prompt_ids: vec![3, vocab + 7], ..req }, CONTEXT);
        assert!(e.to_string().contains(&format!("token id {}", vocab + 7)), "{e}");
    }

    #[test]
    fn chat_prompt_uses_the_models_template_and_parses_specials() {
        let chatml = MetaValue::String(CHATML.into());
        let tok = tokenizer_with(&[("tokenizer.chat_template", chatml.clone())]);
        let ids = render_chat_prompt(&tok, &[user_message("hi there")]).unwrap();
        assert_eq!(tok.decode(&ids, false), "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n");
        assert_eq!(ids[0], IM_START, "special tokens are single ids");
        assert_eq!(ids.iter().filter(|&&t| t == IM_END).count(), 1);
        // No BOS id in this tokenizer: nothing is prepended.
        assert_eq!(ids, tok.encode(&tok.decode(&ids, false), true).unwrap());

        let e = render_chat_prompt(&fixture().tok, &[user_message("hi")]).unwrap_err();
        assert!(matches!(e, GenerateError::NoChatTemplate), "{e}");
    }

    #[test]
    fn tools_go_to_templates_that_render_them_and_into_the_system_message_otherwise() {
        use crate::chat::tools::{ToolChoice, ToolSet};
        let tools = ToolSet {
            tools: vec![serde_json::json!({"type": "function", "function": {"name": "get_time", "parameters": {}}})],
            choice: ToolChoice::Auto,
        };
        let render = |template: &str, msgs: &[serde_json::Value]| {
            let tok = tokenizer_with(&[("tokenizer.chat_template", MetaValue::String(template.into()))]);
            let ids = render_chat_prompt_with_tools(&tok, msgs, Some(&tools)).unwrap();
            tok.decode(&ids, false)
        };
        // A template with a tools block gets them as `tools`.
        let with_block = format!("{{% if tools %}}{{{{ tools[0].function.name }}}};{{% endif %}}{CHATML}");
        assert!(render(&with_block, &[user_message("hi")]).starts_with("get_time;<|im_start|>user"));
        // Plain ChatML: a system message with the section, before the user's.
        let text = render(CHATML, &[user_message("hi")]);
        let section = tools.prompt_section();
        assert!(text.starts_with(&format!("<|im_start|>system\n{section}<|im_end|>\n<|im_start|>user")), "{text}");
        assert!(section.contains(r#"{"name":"get_time","parameters":{}}"#), "{section}");
        // An existing system message keeps its text and gains the section.
        let msgs = [serde_json::json!({"role": "system", "content": "Be brief."}), user_message("hi")];
        let text = render(CHATML, &msgs);
        assert!(text.starts_with(&format!("<|im_start|>system\nBe brief.\n\n{section}<|im_end|>")), "{text}");
    }

    #[test]
    fn bos_is_added_once_and_only_when_the_tokenizer_asks() {
        let bos = ("tokenizer.ggml.bos_token_id", MetaValue::U32(ENDOFTEXT));
        let add = |b: bool| ("tokenizer.ggml.add_bos_token", MetaValue::Bool(b));
        let template = |t: &str| ("tokenizer.chat_template", MetaValue::String(t.into()));
        let msgs = [user_message("hi")];

        let tok = tokenizer_with(&[bos.clone(), add(true), template(CHATML)]);
        let ids = render_chat_prompt(&tok, &msgs).unwrap();
        assert_eq!(&ids[..2], [ENDOFTEXT, IM_START]);
        let raw = raw_prompt_ids(&tok, "<|im_start|>hi").unwrap();
        assert_eq!(
            raw,
            [ENDOFTEXT, IM_START, tok.encode("hi", false).unwrap()[0], tok.encode("hi", false).unwrap()[1]]
        );
        // A template that writes BOS itself gets no second one; nor does raw text starting with it.
        let tok = tokenizer_with(&[bos.clone(), add(true), template(&format!("{{{{ bos_token }}}}{CHATML}"))]);
        let ids = render_chat_prompt(&tok, &msgs).unwrap();
        assert_eq!(&ids[..2], [ENDOFTEXT, IM_START]);
        assert_eq!(
            raw_prompt_ids(&tok, "<|endoftext|>hi").unwrap()[..2],
            [ENDOFTEXT, tok.encode("h", false).unwrap()[0]]
        );

        let tok = tokenizer_with(&[bos, add(false), template(CHATML)]);
        assert_eq!(render_chat_prompt(&tok, &msgs).unwrap()[0], IM_START);
        assert_eq!(raw_prompt_ids(&tok, "hi").unwrap(), tok.encode("hi", false).unwrap());
    }
}
