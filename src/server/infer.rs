//! The one internal request both dialects map into, and everything between it and the engine:
//! prompt rendering, tokenization, limits, sampling defaults, submission, and turning the
//! engine's event stream into either a streamed body or one collected result.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use tokio::sync::mpsc;

use super::error::ApiError;
use crate::chat::gotmpl::{GoTemplate, GoTemplateVars};
use crate::chat::tools::ToolSet;
use crate::engine::generate::{
    raw_prompt_ids, render_chat_prompt, render_chat_prompt_with_tools, GenerateError, GenerateRequest, TokenLogprobs,
};
use crate::engine::grammar::{Constraint, OutputFormat};
use crate::engine::sampler::{SamplingError, SamplingParams};
use crate::engine::service::{EmbedError, Event, ModelHandle, SubmitError, Summary, Tagged};
use crate::hub::Manifest;
use crate::model::llama::MmPrompt;
use crate::model::tokenizer::Tokenizer;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// What to generate from.
#[derive(Clone, Debug)]
pub enum Input {
    /// A conversation rendered with the model's chat template (`add_generation_prompt`).
    Chat { messages: Vec<serde_json::Value> },
    /// Ollama `/api/generate` and OpenAI `/v1/completions`.
    Text {
        prompt: String,
        /// Use `prompt` as is (special tokens parsed, BOS per the tokenizer).
        raw: bool,
        system: Option<String>,
        /// Ollama's Go-template override.
        template: Option<GoTemplate>,
        /// Ollama's deprecated `context`: token ids of an earlier exchange, put first.
        context: Vec<u32>,
    },
}

/// An image a request carries: its bytes and the request field it came from (errors name it).
#[derive(Clone, Debug)]
pub struct ImageBytes {
    pub field: String,
    pub bytes: Vec<u8>,
    /// An http(s) URL still to fetch (`bytes` empty until [`fetch_images`]).
    pub url: Option<String>,
}

/// Time one image URL may take, connection to last byte.
pub const IMAGE_FETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Fetches the images given by URL, each within [`IMAGE_FETCH_TIMEOUT`] and `max_bytes` (read
/// in pieces, so a large or endless body is cut off, not buffered). Failures are 400s naming
/// the field.
pub async fn fetch_images(images: &mut [ImageBytes], max_bytes: usize) -> Result<(), ApiError> {
    let build = |direct: bool| {
        let b = reqwest::Client::builder().timeout(IMAGE_FETCH_TIMEOUT);
        // A proxy cannot reach this machine's loopback addresses: those go direct.
        if direct { b.no_proxy() } else { b }.build().map_err(|e| ApiError::Internal(format!("HTTP client: {e}")))
    };
    let (client, direct) = (build(false)?, build(true)?);
    for img in images.iter_mut() {
        let Some(url) = img.url.take() else { continue };
        let field = img.field.clone();
        let fail = |why: String| ApiError::bad_field(&field, format!("{field}: fetching {url}: {why}"));
        let parsed = reqwest::Url::parse(&url).map_err(|e| fail(e.to_string()))?;
        let loopback = parsed.host_str().is_some_and(|h| {
            h == "localhost" || h.trim_matches(['[', ']']).parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback())
        });
        let c = if loopback { &direct } else { &client };
        let mut resp = c.get(parsed).send().await.map_err(|e| fail(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(fail(format!("HTTP {}", resp.status())));
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| fail(e.to_string()))? {
            if bytes.len() + chunk.len() > max_bytes {
                return Err(fail(format!("the image is larger than {max_bytes} bytes")));
            }
            bytes.extend_from_slice(&chunk);
        }
        img.bytes = bytes;
    }
    Ok(())
}

/// A template message's `content` with images: `{"type": "image"}` slots (where a vision chat
/// template writes the model's image placeholder) and `{"type": "text"}` parts, in order, as
/// Hugging Face processors pass them. Without images, the text parts joined by newlines.
pub fn message_content(parts: Vec<Option<String>>) -> serde_json::Value {
    if parts.iter().all(Option::is_some) {
        return parts.into_iter().flatten().collect::<Vec<_>>().join("\n").into();
    }
    parts
        .into_iter()
        .map(|p| match p {
            Some(text) => serde_json::json!({ "type": "text", "text": text }),
            None => serde_json::json!({ "type": "image" }),
        })
        .collect::<Vec<_>>()
        .into()
}

/// Sampling fields a request set; the rest come from the model's manifest.
#[derive(Clone, Debug, Default)]
pub struct SamplingOverrides {
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub repeat_last_n: Option<usize>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<u64>,
}

/// How many tokens to generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaxTokens {
    /// Until a stop or the context is full (Ollama `num_predict` -1 / -2, OpenAI chat default).
    Fill,
    /// At most this many; clipped to what the context leaves.
    UpTo(usize),
    /// Exactly what the client asked; more than the context leaves is a 400 (vLLM's rule).
    Strict(usize),
}

/// The request both dialects map into.
#[derive(Clone, Debug)]
pub struct InferenceRequest {
    pub input: Input,
    pub max_tokens: MaxTokens,
    pub sampling: SamplingOverrides,
    /// Stop strings added to the model's own.
    pub stop: Vec<String>,
    /// Caps the context below the model's (Ollama `num_ctx`).
    pub num_ctx: Option<usize>,
    /// Independent completions of the same prompt (OpenAI `n`).
    pub n: usize,
    pub logprobs: Option<usize>,
    /// Tools offered with a chat (`tool_choice: "none"` is `None`).
    pub tools: Option<ToolSet>,
    /// Structured output: the request field it came from (for errors) and the format.
    pub format: Option<(&'static str, OutputFormat)>,
    /// Images, in the order of their slots in `input` (a chat; vision models only).
    pub images: Vec<ImageBytes>,
    /// The request's own pixel budget for its images.
    pub pixels: PixelBudget,
}

/// A request's `min_pixels`/`max_pixels` for its images (Ollama `options`, OpenAI
/// `mm_processor_kwargs` as vLLM takes them), each with the field it came from. A smaller
/// `max_pixels` is fewer image tokens: a faster first token for a coarser look.
#[derive(Clone, Debug, Default)]
pub struct PixelBudget {
    pub min: Option<(String, i64)>,
    pub max: Option<(String, i64)>,
}

impl PixelBudget {
    /// The model's preprocessing `base` with this budget, or a 400 naming the field: each value
    /// at least one merged patch block (`factor²` pixels) and at most the model's `max_pixels`,
    /// and the minimum not above the maximum.
    pub fn apply(&self, base: &crate::vision::PreprocessConfig) -> Result<crate::vision::PreprocessConfig, ApiError> {
        let mut cfg = base.clone();
        let floor = base.factor() * base.factor();
        let check = |(field, v): &(String, i64)| -> Result<usize, ApiError> {
            if *v < floor as i64 {
                return Err(ApiError::bad_field(
                    field,
                    format!("{field} = {v} is less than {floor} pixels, one {f}×{f} block", f = base.factor()),
                ));
            }
            if *v as u64 > base.max_pixels as u64 {
                return Err(ApiError::bad_field(
                    field,
                    format!("{field} = {v} is more than the model's max_pixels of {}", base.max_pixels),
                ));
            }
            Ok(*v as usize)
        };
        if let Some(m) = &self.max {
            cfg.max_pixels = check(m)?;
        }
        if let Some(m) = &self.min {
            cfg.min_pixels = check(m)?;
        }
        if cfg.min_pixels > cfg.max_pixels {
            let field = self.min.as_ref().or(self.max.as_ref()).map(|(f, _)| f.as_str()).unwrap_or("min_pixels");
            return Err(ApiError::bad_field(
                field,
                format!("min_pixels {} is more than max_pixels {}", cfg.min_pixels, cfg.max_pixels),
            ));
        }
        Ok(cfg)
    }
}

/// A request ready for the engine.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub prompt_ids: Vec<u32>,
    pub context_len: usize,
    pub requests: Vec<GenerateRequest>,
    /// Tool calls are to be extracted from the output ([`crate::chat::tools`]).
    pub tool_calls: bool,
}

/// Renders and tokenizes the prompt, checks it against the context and merges sampling
/// defaults. Every failure is the client's: a 400 that names the field and the limit. Images are
/// decoded, preprocessed and encoded by the vision tower on a blocking thread.
pub async fn prepare(
    handle: &Arc<ModelHandle>,
    manifest: &Manifest,
    req: &InferenceRequest,
) -> Result<Prepared, ApiError> {
    // Images (decoding, the vision tower) and grammars (compiling; a model's first also builds
    // its token trie) are CPU work: off the async workers.
    let forced = req.tools.as_ref().is_some_and(|t| t.choice != crate::chat::tools::ToolChoice::Auto);
    if req.images.is_empty() && req.format.is_none() && !forced {
        return prepare_now(handle, manifest, req, &|| false);
    }
    // When the client goes, the server drops this future: the guard raises `gone`, and the
    // vision tower, which asks between blocks, stops instead of finishing for nobody.
    struct RaiseOnDrop(Arc<AtomicBool>);
    impl Drop for RaiseOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let gone = Arc::new(AtomicBool::new(false));
    let _guard = RaiseOnDrop(gone.clone());
    let (h, m, r) = (handle.clone(), manifest.clone(), req.clone());
    tokio::task::spawn_blocking(move || prepare_now(&h, &m, &r, &|| gone.load(Ordering::Relaxed)))
        .await
        .map_err(|e| ApiError::Internal(format!("preparing the images failed: {e}")))?
}

/// [`prepare`] on this thread; `stop` says that the client has gone (see [`crate::vision::Vision::attach`]).
fn prepare_now(
    handle: &ModelHandle,
    manifest: &Manifest,
    req: &InferenceRequest,
    stop: &dyn Fn() -> bool,
) -> Result<Prepared, ApiError> {
    let tok = &handle.tokenizer;
    let constraint = constraint(tok, req)?;
    let mut prompt_ids = match &req.input {
        Input::Chat { messages } => {
            render_chat_prompt_with_tools(tok, messages, req.tools.as_ref()).map_err(prompt_error)?
        }
        Input::Text { prompt, raw, system, template, context } => {
            // Text used as is: BOS per the tokenizer, unless it continues an earlier `context`.
            let as_is = |text: &str| {
                if context.is_empty() {
                    raw_prompt_ids(tok, text)
                } else {
                    tok.encode(text, true).map_err(GenerateError::from)
                }
                .map_err(prompt_error)
            };
            let text_ids = if let Some(t) = template {
                as_is(&t.render(&GoTemplateVars { system: system.as_deref().unwrap_or(""), prompt, response: "" }))?
            } else if *raw || tok.chat_template().is_none() {
                as_is(prompt)?
            } else {
                let mut messages = Vec::new();
                if let Some(s) = system {
                    messages.push(serde_json::json!({ "role": "system", "content": s }));
                }
                messages.push(serde_json::json!({ "role": "user", "content": prompt }));
                render_chat_prompt(tok, &messages).map_err(prompt_error)?
            };
            if let Some(&bad) = context.iter().find(|&&id| id as usize >= handle.vocab_size) {
                return Err(ApiError::bad_field(
                    "context",
                    format!(
                        "context holds token id {bad}, but the model's vocabulary has {} tokens",
                        handle.vocab_size
                    ),
                ));
            }
            let mut ids = context.clone();
            ids.extend(text_ids);
            ids
        }
    };
    let context_len = match req.num_ctx {
        Some(n) if n > 0 => n.min(handle.context_length),
        _ => handle.context_length,
    };
    let mm = if req.images.is_empty() {
        None
    } else {
        let (ids, mm) = attach_images(handle, &prompt_ids, &req.images, &req.pixels, context_len, stop)?;
        prompt_ids = ids;
        Some(Arc::new(mm))
    };
    let p = prompt_ids.len();
    if p == 0 {
        return Err(ApiError::bad("the prompt is empty after templating: nothing to generate from"));
    }
    if p >= context_len {
        return Err(ApiError::bad(format!(
            "This model's maximum context length is {context_len} tokens. However, your prompt is {p} tokens, \
             which leaves no room for a completion. Please reduce the length of the prompt."
        )));
    }
    let room = context_len - p;
    let max_tokens = match req.max_tokens {
        MaxTokens::Fill => room,
        MaxTokens::UpTo(n) => n.min(room),
        MaxTokens::Strict(n) if n > room => {
            return Err(ApiError::bad_field(
                "max_tokens",
                format!(
                    "This model's maximum context length is {context_len} tokens. However, you requested {} tokens \
                     ({p} in the messages, {n} in the completion). Please reduce the length of the messages or \
                     completion.",
                    p + n
                ),
            ))
        }
        MaxTokens::Strict(n) => n,
    };
    let sampling = merge_sampling(manifest, &req.sampling)?;
    let mut stop = manifest.defaults.stop.clone();
    stop.extend(req.stop.iter().filter(|s| !s.is_empty()).cloned());
    let requests = (0..req.n.max(1))
        .map(|i| {
            let mut sampling = sampling.clone();
            // Each choice draws its own stream; with a seed they stay reproducible.
            sampling.seed = sampling.seed.map(|s| s.wrapping_add(i as u64));
            GenerateRequest {
                prompt_ids: prompt_ids.clone(),
                max_tokens,
                sampling,
                stop: stop.clone(),
                logprobs: req.logprobs,
                constraint: constraint.clone(),
                mm: mm.clone(),
            }
        })
        .collect();
    // Output under `format` is the client's structured data, not calls to look for.
    Ok(Prepared { prompt_ids, context_len, requests, tool_calls: req.tools.is_some() && req.format.is_none() })
}

/// Preprocesses `images` (errors name each image's field), puts them into the rendered prompt
/// and encodes them with the model's vision tower.
fn attach_images(
    handle: &ModelHandle,
    prompt: &[u32],
    images: &[ImageBytes],
    pixels: &PixelBudget,
    context: usize,
    stop: &dyn Fn() -> bool,
) -> Result<(Vec<u32>, MmPrompt), ApiError> {
    let vision = handle.vision.as_ref().ok_or_else(|| {
        ApiError::bad_field(
            &images[0].field,
            format!("model '{}' does not support vision: it cannot take images", handle.id),
        )
    })?;
    if images.len() > MAX_IMAGES {
        return Err(ApiError::bad_field(
            &images[MAX_IMAGES].field,
            format!("{} images in one request: at most {MAX_IMAGES} are allowed", images.len()),
        ));
    }
    let cfg = pixels.apply(&vision.preprocess)?;
    // Each image's header first (every refusal that needs no pixels); an image whose tower
    // output the model still has (clients resend every image with every turn) is not decoded.
    let inputs = images
        .iter()
        .map(|img| {
            let err = |e: crate::vision::ImageError| match e {
                crate::vision::ImageError::Config(_) => ApiError::Internal(format!("the model's image settings: {e}")),
                _ => ApiError::bad_field(&img.field, format!("{}: {e}", img.field)),
            };
            let probed = crate::vision::probe(&img.bytes, &cfg).map_err(err)?;
            match vision.cached(probed.hash(), probed.grid_thw()) {
                Some(embeds) => Ok(probed.cached(embeds)),
                None => probed.decode().map_err(err),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    vision.attach(prompt, &inputs, context, stop).map_err(|e| ApiError::bad(format!("images: {e}")))
}

/// Most images one request may carry: each is a vision-tower run before the first token.
pub const MAX_IMAGES: usize = 8;

/// The grammar a request's output must follow: a forced tool call, or `format`. Both at once
/// is refused, as vLLM does; a schema the grammar engine cannot enforce is a 400 naming the
/// field.
fn constraint(tok: &Tokenizer, req: &InferenceRequest) -> Result<Option<Constraint>, ApiError> {
    let forced = req.tools.as_ref().and_then(ToolSet::forced_schema);
    let (field, format) = match (forced, &req.format) {
        (Some(_), Some((field, _))) => {
            return Err(ApiError::bad_field(
                field,
                format!(
                "{field} cannot be combined with tool_choice \"required\" or a named tool: both constrain the output"
            ),
            ))
        }
        (Some(schema), None) => ("tools", OutputFormat::JsonSchema(schema)),
        (None, Some((field, f))) => (*field, f.clone()),
        (None, None) => return Ok(None),
    };
    // The first constrained request of a model builds its token trie (once per model).
    Constraint::new(tok, format)
        .map(Some)
        .map_err(|e| ApiError::bad_field(field, format!("{field}: this JSON Schema cannot be enforced: {e}")))
}

fn merge_sampling(manifest: &Manifest, o: &SamplingOverrides) -> Result<SamplingParams, ApiError> {
    let d = manifest.defaults.sampling.params();
    let p = SamplingParams {
        temperature: o.temperature.unwrap_or(d.temperature),
        top_k: o.top_k.unwrap_or(d.top_k),
        top_p: o.top_p.unwrap_or(d.top_p),
        min_p: o.min_p.unwrap_or(d.min_p),
        repeat_penalty: o.repeat_penalty.unwrap_or(d.repeat_penalty),
        repeat_last_n: o.repeat_last_n.unwrap_or(d.repeat_last_n),
        presence_penalty: o.presence_penalty.unwrap_or(d.presence_penalty),
        frequency_penalty: o.frequency_penalty.unwrap_or(d.frequency_penalty),
        seed: o.seed,
    };
    p.validate().map_err(|e| match e {
        SamplingError::OutOfRange { field, .. } => ApiError::bad_field(field, e.to_string()),
    })?;
    Ok(p)
}

fn prompt_error(e: GenerateError) -> ApiError {
    ApiError::bad(format!("could not build the prompt: {e}"))
}

/// Queues every prepared request on `handle`; events arrive on the returned receiver tagged
/// with the choice index. Dropping the receiver cancels them all.
pub fn submit(handle: &ModelHandle, prepared: &Prepared) -> Result<mpsc::UnboundedReceiver<Tagged>, ApiError> {
    let (tx, rx) = mpsc::unbounded_channel();
    for (i, req) in prepared.requests.iter().enumerate() {
        handle.generate(req.clone(), prepared.context_len, i, tx.clone()).map_err(submit_error)?;
    }
    Ok(rx)
}

pub fn submit_error(e: SubmitError) -> ApiError {
    match e {
        SubmitError::Busy => ApiError::Busy,
        SubmitError::Stopped => ApiError::Unavailable(e.to_string()),
        SubmitError::Unavailable(reason) => ApiError::Unavailable(reason),
    }
}

/// One choice, collected to the end.
#[derive(Clone, Debug, Default)]
pub struct Collected {
    pub text: String,
    pub logprobs: Vec<(u32, TokenLogprobs)>,
    pub summary: Option<Summary>,
}

/// Waits for all `n` choices. An engine error (or an engine that went away) is a 500.
pub async fn collect(
    mut rx: mpsc::UnboundedReceiver<Tagged>,
    n: usize,
    mut cut: tokio::sync::watch::Receiver<bool>,
) -> Result<Vec<Collected>, ApiError> {
    let mut out = vec![Collected::default(); n];
    let mut done = 0;
    while done < n {
        let next = tokio::select! {
            ev = rx.recv() => ev,
            // Shutdown's deadline: dropping `rx` cancels the generation.
            _ = super::shutdown::cut(&mut cut) => return Err(ApiError::Unavailable(super::shutdown::MESSAGE.into())),
        };
        match next {
            Some((i, Event::Token { text, token, logprobs })) => {
                out[i].text.push_str(&text);
                if let (Some(t), Some(lp)) = (token, logprobs) {
                    out[i].logprobs.push((t, lp));
                }
            }
            Some((i, Event::Done(s))) => {
                out[i].summary = Some(s);
                done += 1;
            }
            Some((_, Event::Error(e))) => return Err(ApiError::Internal(format!("generation failed: {e}"))),
            None => return Err(ApiError::Internal("the engine stopped before the generation finished".into())),
        }
    }
    Ok(out)
}

/// Writes a dialect's stream: called per engine event, appends wire bytes to `out`.
pub trait StreamWriter: Send + 'static {
    /// Returns true when the stream is complete (after the last choice's final piece).
    fn event(&mut self, index: usize, event: Event, out: &mut Vec<u8>) -> bool;
    /// The engine went away without finishing: write a final error.
    fn abort(&mut self, message: &str, out: &mut Vec<u8>);
}

/// A streamed response body fed by the engine's events. Dropping the body (client gone) drops
/// the receiver, which cancels the generation at its next token.
/// At shutdown's deadline (`cut`) the stream ends with the writer's error.
pub fn stream_body<W: StreamWriter>(
    rx: mpsc::UnboundedReceiver<Tagged>,
    writer: W,
    cut: tokio::sync::watch::Receiver<bool>,
) -> Body {
    struct State<W> {
        rx: mpsc::UnboundedReceiver<Tagged>,
        writer: W,
        finished: bool,
        cut: tokio::sync::watch::Receiver<bool>,
    }
    let state = State { rx, writer, finished: false, cut };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        if st.finished {
            return None;
        }
        let mut out = Vec::new();
        // Keep reading until there are bytes to send (tokens that complete no text write none).
        while out.is_empty() {
            let next = tokio::select! {
                ev = st.rx.recv() => ev,
                _ = super::shutdown::cut(&mut st.cut) => {
                    st.writer.abort(super::shutdown::MESSAGE, &mut out);
                    st.finished = true;
                    break;
                }
            };
            match next {
                Some((i, ev)) => {
                    if st.writer.event(i, ev, &mut out) {
                        st.finished = true;
                        break;
                    }
                }
                None => {
                    st.writer.abort("the engine stopped before the generation finished", &mut out);
                    st.finished = true;
                    break;
                }
            }
        }
        Some((Ok::<_, Infallible>(Bytes::from(out)), st))
    });
    Body::from_stream(stream)
}

// ---------------------------------------------------------------------------------------------
// Embeddings (both dialects)

/// Tokenizes embedding inputs, cutting at the context (`truncate`) or refusing.
pub fn embedding_ids(handle: &ModelHandle, inputs: &[String], truncate: bool) -> Result<Vec<Vec<u32>>, ApiError> {
    inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let mut ids = raw_prompt_ids(&handle.tokenizer, text)
                .map_err(|e| ApiError::bad_field(&format!("input[{i}]"), e.to_string()))?;
            if ids.len() > handle.context_length {
                if !truncate {
                    return Err(ApiError::bad_field(
                        &format!("input[{i}]"),
                        format!(
                            "the input length exceeds the context length: input[{i}] is {} tokens, the context is {}",
                            ids.len(),
                            handle.context_length
                        ),
                    ));
                }
                ids.truncate(handle.context_length);
            }
            if ids.is_empty() {
                return Err(ApiError::bad_field(&format!("input[{i}]"), format!("input[{i}] is empty")));
            }
            Ok(ids)
        })
        .collect()
}

/// L2-normalizes `v` after cutting it to `dims`.
pub fn normalize(mut v: Vec<f32>, dims: Option<usize>) -> Vec<f32> {
    if let Some(d) = dims {
        v.truncate(d);
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

pub fn check_dimensions(dims: Option<i64>, hidden: usize) -> Result<Option<usize>, ApiError> {
    match dims {
        None => Ok(None),
        Some(d) if d < 1 || d as u64 > hidden as u64 => Err(ApiError::bad_field(
            "dimensions",
            format!("dimensions = {d} is out of range: the model's embeddings have 1 to {hidden} dimensions"),
        )),
        Some(d) => Ok(Some(d as usize)),
    }
}

pub fn embed_error(e: EmbedError) -> ApiError {
    match e {
        EmbedError::Submit(s) => submit_error(s),
        EmbedError::Engine(m) => ApiError::Internal(format!("embedding failed: {m}")),
    }
}

/// Whole nanoseconds (Ollama's duration fields).
pub fn nanos(d: Duration) -> u64 {
    d.as_nanos().min(u128::from(u64::MAX)) as u64
}
