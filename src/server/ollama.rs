//! Ollama's native API (`/`, `/api/*`), following ../shared/reference/api.md §1.
//!
//! Streams are NDJSON (`application/x-ndjson`, one object per line): zero or more `done: false`
//! lines carrying text, then exactly one `done: true` line with `done_reason` and the metrics in
//! nanoseconds (left out when zero, as Go's `omitempty` does). `stream: false` returns one object
//! with the whole text. An error after the stream began is a last `{"error": "…"}` line.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::engines::KeepAlive;
use super::error::{json_response, parse_json, read_json, ApiError, Dialect, OllamaError};
use super::infer::{self, ImageBytes, InferenceRequest, Input, MaxTokens, SamplingOverrides, StreamWriter};
use super::wire::{self, KeepAliveWire, OneOrMany, TopLogprob};
use super::{Shared, OLLAMA_COMPAT_VERSION};
use crate::chat::gotmpl::GoTemplate;
use crate::chat::tools::{self, Segment, ToolCall, ToolSet, ToolStream};
use crate::engine::generate::TokenLogprobs;
use crate::engine::grammar::OutputFormat;
use crate::engine::service::{Event, ModelHandle, Summary};
use crate::hub::PullEvent;
use crate::hub::{Manifest, PullOptions, Role};

type Result<T, E = OllamaError> = std::result::Result<T, E>;

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/", get(root))
        .route("/api/version", get(version))
        .route("/api/tags", get(tags))
        .route("/api/show", post(show))
        .route("/api/ps", get(ps))
        .route("/api/generate", post(generate))
        .route("/api/chat", post(chat))
        .route("/api/embed", post(embed))
        .route("/api/embeddings", post(embeddings))
        .route("/api/pull", post(pull))
        .route("/api/delete", axum::routing::delete(delete))
        .route("/api/create", post(|| not_supported("/api/create")))
        .route("/api/push", post(|| not_supported("/api/push")))
        .route("/api/copy", post(|| not_supported("/api/copy")))
        .route("/api/blobs/{digest}", post(|| not_supported("/api/blobs")).head(|| not_supported("/api/blobs")))
}

async fn not_supported(what: &'static str) -> Response {
    OllamaError(ApiError::NotImplemented(format!(
        "{what} is not supported by zoe-llm: models are defined by manifests (models/*.toml) and fetched with /api/pull"
    )))
    .into_response()
}

async fn root() -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], "Ollama is running").into_response()
}

#[derive(Serialize, JsonSchema)]
pub struct VersionResponse {
    pub version: String,
}

async fn version() -> Response {
    json_response(StatusCode::OK, &VersionResponse { version: OLLAMA_COMPAT_VERSION.into() })
}

// ---------------------------------------------------------------------------------------------
// Requests

/// Ollama `options`. Unknown keys are ignored with a warning, as Ollama does; load-time options
/// (`num_gpu`, `num_thread`, …) are accepted and have no effect here.
#[derive(Clone, Debug, Default, Deserialize, JsonSchema)]
pub struct Options {
    pub num_ctx: Option<i64>,
    pub num_predict: Option<i64>,
    pub num_keep: Option<i64>,
    pub seed: Option<i64>,
    pub top_k: Option<i64>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub typical_p: Option<f32>,
    pub repeat_last_n: Option<i64>,
    pub temperature: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub stop: Option<OneOrMany>,
    pub num_batch: Option<i64>,
    pub num_gpu: Option<i64>,
    pub main_gpu: Option<i64>,
    pub num_thread: Option<i64>,
    pub use_mmap: Option<bool>,
    /// zoe-llm: the pixel budget of this request's images (vision models).
    pub min_pixels: Option<i64>,
    pub max_pixels: Option<i64>,
    #[serde(flatten)]
    #[schemars(skip)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

#[derive(Clone, Debug, Deserialize, JsonSchema)]
pub struct GenerateRequest {
    pub model: String,
    #[serde(default)]
    pub prompt: Option<String>,
    pub suffix: Option<String>,
    pub system: Option<String>,
    pub template: Option<String>,
    pub context: Option<Vec<u32>>,
    pub stream: Option<bool>,
    pub raw: Option<bool>,
    pub format: Option<serde_json::Value>,
    pub keep_alive: Option<KeepAliveWire>,
    pub images: Option<Vec<String>>,
    pub options: Option<Options>,
    pub think: Option<serde_json::Value>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
}

#[derive(Clone, Debug, Deserialize, JsonSchema)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<String>,
    pub images: Option<Vec<String>>,
    pub tool_calls: Option<Vec<serde_json::Value>>,
    pub thinking: Option<String>,
    pub tool_name: Option<String>,
    pub tool_call_id: Option<String>,
}

#[derive(Clone, Debug, Deserialize, JsonSchema)]
pub struct ChatRequest {
    pub model: String,
    #[serde(default)]
    pub messages: Vec<Message>,
    pub tools: Option<Vec<serde_json::Value>>,
    /// zoe-llm's extension, with OpenAI's values: `"none"`, `"auto"` (the default), `"required"`
    /// or `{"type": "function", "function": {"name": …}}`; the last two are enforced.
    pub tool_choice: Option<serde_json::Value>,
    pub format: Option<serde_json::Value>,
    pub options: Option<Options>,
    pub stream: Option<bool>,
    pub keep_alive: Option<KeepAliveWire>,
    pub think: Option<serde_json::Value>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
}

// ---------------------------------------------------------------------------------------------
// Responses

/// The metric fields of a final line; zero values are left out (Go `omitempty`).
#[derive(Clone, Debug, Default, Serialize, JsonSchema)]
pub struct Metrics {
    #[serde(skip_serializing_if = "is_zero")]
    pub total_duration: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub load_duration: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub prompt_eval_count: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub prompt_eval_duration: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub eval_count: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub eval_duration: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct Logprob {
    #[serde(flatten)]
    pub chosen: TopLogprob,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct GenerateResponse {
    pub model: String,
    pub created_at: String,
    pub response: String,
    pub done: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub done_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<Vec<u32>>,
    #[serde(flatten)]
    pub metrics: Metrics,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<Logprob>>,
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct ResponseMessage {
    pub role: String,
    pub content: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallOut>,
}

/// A call in Ollama's shape: arguments as an object, `index` its place in the reply.
#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct ToolCallOut {
    pub id: String,
    pub function: FunctionOut,
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct FunctionOut {
    pub index: usize,
    pub name: String,
    pub arguments: serde_json::Map<String, serde_json::Value>,
}

impl ToolCallOut {
    fn new(index: usize, call: ToolCall) -> Self {
        // Ollama's id form: call_ and 8 characters of [a-z0-9].
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let id: String = (0..8).map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char).collect();
        Self { id: format!("call_{id}"), function: FunctionOut { index, name: call.name, arguments: call.arguments } }
    }
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct ChatResponse {
    pub model: String,
    pub created_at: String,
    pub message: ResponseMessage,
    pub done: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub done_reason: Option<String>,
    #[serde(flatten)]
    pub metrics: Metrics,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<Logprob>>,
}

// ---------------------------------------------------------------------------------------------
// Generation

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Generate { context: bool },
    Chat,
}

/// What a generate or chat request becomes after validation.
struct Plan {
    manifest: Manifest,
    model: String,
    keep_alive: Option<KeepAlive>,
    stream: bool,
    logprobs: Option<usize>,
    options: Options,
    tools: Option<ToolSet>,
    format: Option<OutputFormat>,
    images: Vec<ImageBytes>,
}

fn parse_logprobs(logprobs: Option<bool>, top: Option<i64>) -> Result<Option<usize>> {
    let top = top.unwrap_or(0);
    if !(0..=20).contains(&top) {
        return Err(ApiError::bad_field("top_logprobs", "top_logprobs must be between 0 and 20").into());
    }
    Ok(logprobs.unwrap_or(false).then_some(top as usize))
}

fn check_think(m: &Manifest, think: Option<&serde_json::Value>) -> Result<()> {
    match think {
        None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => Ok(()),
        Some(serde_json::Value::Bool(true)) => {
            Err(ApiError::bad_field("think", format!("\"{}\" does not support thinking", m.id)).into())
        }
        Some(serde_json::Value::String(s)) if ["low", "medium", "high", "max"].contains(&s.as_str()) => {
            Err(ApiError::bad_field("think", format!("\"{}\" does not support thinking", m.id)).into())
        }
        Some(other) => Err(ApiError::bad_field("think", format!("invalid think value: {other}")).into()),
    }
}

/// Maps `options` onto the engine's knobs; `context_length` bounds `num_predict`.
fn map_options(
    o: &Options,
    context_length: usize,
) -> Result<(SamplingOverrides, MaxTokens, Vec<String>, Option<usize>)> {
    if !o.other.is_empty() {
        let keys: Vec<&String> = o.other.keys().collect();
        tracing::warn!(?keys, "invalid option provided (ignored)");
    }
    let max = match o.num_predict {
        None | Some(-1) | Some(-2) => MaxTokens::Fill,
        Some(n) if n < -2 => {
            return Err(ApiError::bad_field(
                "options.num_predict",
                format!(
                    "options.num_predict = {n} is invalid: use -1 (no limit), -2 (fill the context) or a count ≥ 0"
                ),
            )
            .into())
        }
        Some(n) if n as u64 > context_length as u64 => {
            return Err(ApiError::bad_field(
                "options.num_predict",
                format!("options.num_predict = {n} is more than the model's context of {context_length} tokens"),
            )
            .into())
        }
        Some(n) => MaxTokens::UpTo(n as usize),
    };
    let num_ctx = match o.num_ctx {
        None => None,
        Some(n) if n <= 0 => None,
        Some(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
    };
    let non_negative = |field: &str, v: Option<i64>| -> Result<Option<usize>> {
        match v {
            Some(n) if n < 0 => Err(ApiError::bad_field(field, format!("{field} = {n} must be ≥ 0")).into()),
            Some(n) => Ok(Some(usize::try_from(n).unwrap_or(usize::MAX))),
            None => Ok(None),
        }
    };
    let sampling = SamplingOverrides {
        temperature: o.temperature,
        // Ollama: top_k ≤ 0 disables it.
        top_k: o.top_k.map(|k| usize::try_from(k).unwrap_or(0)),
        top_p: o.top_p,
        min_p: o.min_p,
        repeat_penalty: o.repeat_penalty,
        // -1 = the whole context.
        repeat_last_n: match o.repeat_last_n {
            Some(-1) => Some(usize::MAX),
            v => non_negative("options.repeat_last_n", v)?,
        },
        presence_penalty: o.presence_penalty,
        frequency_penalty: o.frequency_penalty,
        // -1 (Ollama's default) = random.
        seed: o.seed.filter(|&s| s >= 0).map(|s| s as u64),
    };
    let stop = o.stop.clone().map(OneOrMany::into_vec).unwrap_or_default();
    Ok((sampling, max, stop, num_ctx))
}

async fn generate(State(st): State<Shared>, body: Body) -> Response {
    super::proxy::dispatch(st, super::proxy::Endpoint::OllamaGenerate, body, generate_local).await
}

async fn generate_local(st: Shared, body: axum::body::Bytes) -> Result<Response> {
    let start = Instant::now();
    let req: GenerateRequest = parse_json(&body)?;
    let manifest = wire::resolve(&st, &req.model)?.clone();
    let keep_alive = req.keep_alive.as_ref().map(KeepAliveWire::parse).transpose()?;
    let raw = req.raw.unwrap_or(false);
    if raw && (req.template.is_some() || req.system.is_some() || req.context.is_some()) {
        return Err(ApiError::bad("raw mode does not support template, system, or context").into());
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad_field("suffix", format!("{} does not support insert", manifest.id)).into());
    }
    let format = wire::ollama_format(req.format.as_ref())?;
    check_think(&manifest, req.think.as_ref())?;
    let images: Vec<ImageBytes> = wire::check_images(&manifest, "images", req.images.as_deref().unwrap_or(&[]))?
        .into_iter()
        .enumerate()
        .map(|(i, bytes)| ImageBytes { field: format!("images[{i}]"), bytes, url: None })
        .collect();
    if !images.is_empty() && (raw || req.template.is_some() || req.context.is_some()) {
        return Err(ApiError::bad_field(
            "images",
            "images need the model's chat template: they cannot be used with raw, template or context",
        )
        .into());
    }
    let template = match req.template.as_deref().filter(|t| !t.is_empty()) {
        Some(t) => Some(GoTemplate::parse(t).map_err(|e| ApiError::bad_field("template", e.to_string()))?),
        None => None,
    };
    let logprobs = parse_logprobs(req.logprobs, req.top_logprobs)?;
    let prompt = req.prompt.clone().unwrap_or_default();
    let plan = Plan {
        manifest,
        model: req.model.clone(),
        keep_alive,
        stream: req.stream.unwrap_or(true),
        logprobs,
        options: req.options.clone().unwrap_or_default(),
        tools: None,
        format,
        images: Vec::new(),
    };
    if prompt.is_empty() && images.is_empty() {
        return load_or_unload(&st, &plan, Kind::Generate { context: false }).await;
    }
    if !images.is_empty() {
        // The prompt becomes a user message with its images, through the chat template.
        let mut messages = Vec::new();
        if let Some(s) = &req.system {
            messages.push(serde_json::json!({ "role": "system", "content": s }));
        }
        let mut parts = vec![None; images.len()];
        parts.push(Some(prompt));
        messages.push(serde_json::json!({ "role": "user", "content": infer::message_content(parts) }));
        let plan = Plan { images, ..plan };
        return run(&st, plan, Input::Chat { messages }, Kind::Generate { context: false }, start).await;
    }
    let input = Input::Text {
        prompt,
        raw,
        system: req.system.clone(),
        template,
        context: req.context.clone().unwrap_or_default(),
    };
    run(&st, plan, input, Kind::Generate { context: !raw }, start).await
}

async fn chat(State(st): State<Shared>, body: Body) -> Response {
    super::proxy::dispatch(st, super::proxy::Endpoint::OllamaChat, body, chat_local).await
}

async fn chat_local(st: Shared, body: axum::body::Bytes) -> Result<Response> {
    let start = Instant::now();
    let req: ChatRequest = parse_json(&body)?;
    let manifest = wire::resolve(&st, &req.model)?.clone();
    let keep_alive = req.keep_alive.as_ref().map(KeepAliveWire::parse).transpose()?;
    let tools = wire::tool_set(&manifest, req.tools.as_deref(), req.tool_choice.as_ref())?;
    let format = wire::ollama_format(req.format.as_ref())?;
    check_think(&manifest, req.think.as_ref())?;
    let mut images = Vec::new();
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        let role = m.role.to_lowercase();
        if !["system", "user", "assistant", "tool"].contains(&role.as_str()) {
            return Err(ApiError::bad_field(
                &format!("messages[{i}].role"),
                format!("messages[{i}].role = {:?}: expected system, user, assistant or tool", m.role),
            )
            .into());
        }
        let field = format!("messages[{i}].images");
        let bytes = wire::check_images(&manifest, &field, m.images.as_deref().unwrap_or(&[]))?;
        // Images before the text, as Ollama's renderers place them.
        let mut parts: Vec<Option<String>> = vec![None; bytes.len()];
        parts.push(Some(m.content.clone().unwrap_or_default()));
        images.extend(bytes.into_iter().enumerate().map(|(j, bytes)| ImageBytes {
            field: format!("{field}[{j}]"),
            bytes,
            url: None,
        }));
        let mut msg = serde_json::json!({ "role": role, "content": infer::message_content(parts) });
        if let Some(calls) = &m.tool_calls {
            msg["tool_calls"] = serde_json::Value::Array(calls.clone());
        }
        if let Some(name) = &m.tool_name {
            msg["name"] = serde_json::Value::String(name.clone());
        }
        messages.push(msg);
    }
    let plan = Plan {
        manifest,
        model: req.model.clone(),
        keep_alive,
        stream: req.stream.unwrap_or(true),
        logprobs: parse_logprobs(req.logprobs, req.top_logprobs)?,
        options: req.options.clone().unwrap_or_default(),
        tools,
        format,
        images,
    };
    if messages.is_empty() {
        // Ollama: a chat with no messages loads (or, with keep_alive 0, unloads) the model.
        return load_or_unload(&st, &plan, Kind::Chat).await;
    }
    run(&st, plan, Input::Chat { messages }, Kind::Chat, start).await
}

/// The empty-prompt request: load the model (`done_reason: "load"`), or with `keep_alive: 0`
/// unload it (`"unload"`).
async fn load_or_unload(st: &Shared, plan: &Plan, kind: Kind) -> Result<Response> {
    let reason = if plan.keep_alive == Some(Some(std::time::Duration::ZERO)) {
        if !st.engines.source().present(&plan.manifest) {
            return Err(ApiError::ModelNotFound { model: plan.model.clone() }.into());
        }
        st.engines.unload(&plan.manifest.id);
        "unload"
    } else {
        st.engines.get(&plan.manifest, &plan.model, plan.keep_alive).await?;
        "load"
    };
    let done_reason = Some(reason.to_owned());
    Ok(json_response(StatusCode::OK, &kind.line(&plan.model, Line { done_reason, ..Line::default() })))
}

async fn run(st: &Shared, plan: Plan, input: Input, kind: Kind, start: Instant) -> Result<Response> {
    let (handle, load) = st.engines.get(&plan.manifest, &plan.model, plan.keep_alive).await?;
    let (sampling, max_tokens, stop, num_ctx) = map_options(&plan.options, handle.context_length)?;
    let ireq = InferenceRequest {
        input,
        max_tokens,
        sampling,
        stop,
        num_ctx,
        n: 1,
        logprobs: plan.logprobs,
        tools: plan.tools,
        format: plan.format.map(|f| ("format", f)),
        images: plan.images,
        pixels: infer::PixelBudget {
            min: plan.options.min_pixels.map(|v| ("options.min_pixels".to_owned(), v)),
            max: plan.options.max_pixels.map(|v| ("options.max_pixels".to_owned(), v)),
        },
    };
    let prepared = infer::prepare(&handle, &plan.manifest, &ireq).await?;
    let rx = infer::submit(&handle, &prepared)?;
    let mut writer = Writer {
        model: plan.model,
        kind,
        start,
        load,
        prompt_ids: prepared.prompt_ids,
        handle,
        logprobs: plan.logprobs.is_some(),
        text: String::new(),
        lps: Vec::new(),
        stream: plan.stream,
        tool_calls: prepared.tool_calls,
        tools: prepared.tool_calls.then(ToolStream::default),
        calls: 0,
    };
    if plan.stream {
        let mut resp = Response::new(infer::stream_body(rx, writer, st.shutdown.watcher()));
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
        return Ok(resp);
    }
    let got = infer::collect(rx, 1, st.shutdown.watcher()).await?;
    let c = got.into_iter().next().expect("one choice");
    writer.text = c.text;
    writer.lps = c.logprobs;
    let summary = c.summary.expect("collect waits for Done");
    Ok(json_response(StatusCode::OK, &writer.final_value(&summary)))
}

/// Builds the NDJSON lines of one generate/chat stream (and the single object of a non-stream).
struct Writer {
    model: String,
    kind: Kind,
    start: Instant,
    load: std::time::Duration,
    prompt_ids: Vec<u32>,
    handle: Arc<ModelHandle>,
    logprobs: bool,
    /// Non-stream only: the whole text for the single object.
    text: String,
    lps: Vec<(u32, TokenLogprobs)>,
    stream: bool,
    /// Tool calls are extracted from the output.
    tool_calls: bool,
    /// Streaming with tools: the extractor, until the end.
    tools: Option<ToolStream>,
    /// Calls written so far (their `index`).
    calls: usize,
}

impl Writer {
    fn logprob_entries(&self, lps: &[(u32, TokenLogprobs)]) -> Option<Vec<Logprob>> {
        if !self.logprobs {
            return None;
        }
        let tok = &self.handle.tokenizer;
        Some(
            lps.iter()
                .map(|(id, lp)| {
                    let (chosen, top_logprobs) = TopLogprob::with_top(tok, *id, lp);
                    Logprob { chosen, top_logprobs }
                })
                .collect(),
        )
    }

    fn piece(&self, text: String, lps: &[(u32, TokenLogprobs)]) -> serde_json::Value {
        self.kind.line(&self.model, Line { text, logprobs: self.logprob_entries(lps), ..Line::default() })
    }

    /// Lines for extracted segments: text as content, each call whole in a line of its own
    /// (Ollama does not stream a call in pieces).
    fn segment_lines(&mut self, segments: Vec<Segment>) -> Vec<Line> {
        segments
            .into_iter()
            .map(|seg| match seg {
                Segment::Text(text) => Line { text, ..Line::default() },
                Segment::Call(call) => {
                    self.calls += 1;
                    Line { tool_calls: vec![ToolCallOut::new(self.calls - 1, call)], ..Line::default() }
                }
            })
            .collect()
    }

    fn final_value(&self, s: &Summary) -> serde_json::Value {
        let metrics = Metrics {
            total_duration: infer::nanos(self.start.elapsed()),
            load_duration: infer::nanos(self.load),
            prompt_eval_count: s.prompt_tokens as u64,
            prompt_eval_duration: infer::nanos(s.prompt_eval),
            eval_count: s.tokens.len() as u64,
            eval_duration: infer::nanos(s.eval),
        };
        let context = match self.kind {
            Kind::Generate { context: true } => Some(self.prompt_ids.iter().chain(&s.tokens).copied().collect()),
            _ => None,
        };
        // Streamed text went out piece by piece; a single object carries all of it.
        let (mut text, logprobs) =
            if self.stream { (String::new(), None) } else { (self.text.clone(), self.logprob_entries(&self.lps)) };
        let mut tool_calls = Vec::new();
        if !self.stream && self.tool_calls {
            let x = tools::extract(&text);
            text = x.content;
            tool_calls = x.calls.into_iter().enumerate().map(|(i, c)| ToolCallOut::new(i, c)).collect();
        }
        let done_reason = Some(s.finish_reason.as_str().to_owned());
        self.kind.line(&self.model, Line { text, done_reason, context, metrics, logprobs, tool_calls })
    }
}

/// The fields of one generate/chat object; `done_reason` set means the final one.
#[derive(Default)]
struct Line {
    text: String,
    done_reason: Option<String>,
    context: Option<Vec<u32>>,
    metrics: Metrics,
    logprobs: Option<Vec<Logprob>>,
    tool_calls: Vec<ToolCallOut>,
}

impl Kind {
    /// `l` in this endpoint's shape (`response` for generate, `message` for chat).
    fn line(self, model: &str, l: Line) -> serde_json::Value {
        let created_at = wire::rfc3339(SystemTime::now());
        let (model, done) = (model.to_owned(), l.done_reason.is_some());
        let v = match self {
            Kind::Generate { .. } => serde_json::to_value(GenerateResponse {
                model,
                created_at,
                response: l.text,
                done,
                done_reason: l.done_reason,
                context: l.context,
                metrics: l.metrics,
                logprobs: l.logprobs,
            }),
            Kind::Chat => serde_json::to_value(ChatResponse {
                model,
                created_at,
                message: ResponseMessage { role: "assistant".into(), content: l.text, tool_calls: l.tool_calls },
                done,
                done_reason: l.done_reason,
                metrics: l.metrics,
                logprobs: l.logprobs,
            }),
        };
        v.expect("wire types serialize")
    }
}

fn line(out: &mut Vec<u8>, v: &serde_json::Value) {
    serde_json::to_writer(&mut *out, v).expect("JSON values serialize");
    out.push(b'\n');
}

impl StreamWriter for Writer {
    fn event(&mut self, _index: usize, event: Event, out: &mut Vec<u8>) -> bool {
        match event {
            Event::Token { text, token, logprobs } => {
                let lps: Vec<(u32, TokenLogprobs)> = token.zip(logprobs).into_iter().collect();
                let Some(ts) = &mut self.tools else {
                    if !text.is_empty() || (self.logprobs && !lps.is_empty()) {
                        line(out, &self.piece(text, &lps));
                    }
                    return false;
                };
                let segments = ts.push(&text);
                let mut lines = self.segment_lines(segments);
                if self.logprobs && !lps.is_empty() {
                    // The token's log-probabilities ride on its first line (an empty one while
                    // the extractor holds its text).
                    if lines.is_empty() {
                        lines.push(Line::default());
                    }
                    lines[0].logprobs = self.logprob_entries(&lps);
                }
                for l in lines {
                    line(out, &self.kind.line(&self.model, l));
                }
                false
            }
            Event::Done(s) => {
                if let Some(ts) = self.tools.take() {
                    for l in self.segment_lines(ts.finish()) {
                        line(out, &self.kind.line(&self.model, l));
                    }
                }
                line(out, &self.final_value(&s));
                true
            }
            Event::Error(e) => {
                line(out, &ApiError::Internal(e).body(Dialect::Ollama));
                true
            }
        }
    }

    fn abort(&mut self, message: &str, out: &mut Vec<u8>) {
        line(out, &ApiError::Internal(message.to_owned()).body(Dialect::Ollama));
    }
}

// ---------------------------------------------------------------------------------------------
// Embeddings

#[derive(Clone, Debug, Deserialize, JsonSchema)]
pub struct EmbedRequest {
    pub model: String,
    pub input: Option<OneOrMany>,
    pub truncate: Option<bool>,
    pub dimensions: Option<i64>,
    pub keep_alive: Option<KeepAliveWire>,
    pub options: Option<Options>,
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct EmbedResponse {
    pub model: String,
    pub embeddings: Vec<Vec<f32>>,
    #[serde(skip_serializing_if = "is_zero")]
    pub total_duration: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub load_duration: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub prompt_eval_count: u64,
}

#[derive(Clone, Debug, Deserialize, JsonSchema)]
pub struct EmbeddingsRequest {
    pub model: String,
    #[serde(default)]
    pub prompt: String,
    pub keep_alive: Option<KeepAliveWire>,
    pub options: Option<Options>,
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct EmbeddingsResponse {
    pub embedding: Vec<f32>,
}

async fn embed(State(st): State<Shared>, body: Body) -> Response {
    super::proxy::dispatch(st, super::proxy::Endpoint::OllamaEmbed, body, embed_local).await
}

async fn embed_local(st: Shared, body: axum::body::Bytes) -> Result<Response> {
    let start = Instant::now();
    let req: EmbedRequest = parse_json(&body)?;
    let manifest = wire::resolve(&st, &req.model)?.clone();
    let keep_alive = req.keep_alive.as_ref().map(KeepAliveWire::parse).transpose()?;
    let inputs: Vec<String> = match req.input.clone() {
        None => Vec::new(),
        Some(OneOrMany::One(s)) if s.is_empty() => Vec::new(),
        Some(i) => i.into_vec(),
    };
    let (handle, load) = st.engines.get(&manifest, &req.model, keep_alive).await?;
    let dims = infer::check_dimensions(req.dimensions, handle.hidden_size)?;
    let ids = infer::embedding_ids(&handle, &inputs, req.truncate.unwrap_or(true))?;
    let prompt_eval_count = ids.iter().map(Vec::len).sum::<usize>() as u64;
    let vectors = if ids.is_empty() { Vec::new() } else { handle.embed(ids).await.map_err(infer::embed_error)? };
    let embeddings = vectors.into_iter().map(|v| infer::normalize(v, dims)).collect();
    Ok(json_response(
        StatusCode::OK,
        &EmbedResponse {
            model: req.model,
            embeddings,
            total_duration: infer::nanos(start.elapsed()),
            load_duration: infer::nanos(load),
            prompt_eval_count,
        },
    ))
}

async fn embeddings(State(st): State<Shared>, body: Body) -> Response {
    super::proxy::dispatch(st, super::proxy::Endpoint::OllamaEmbeddings, body, embeddings_local).await
}

async fn embeddings_local(st: Shared, body: axum::body::Bytes) -> Result<Response> {
    let req: EmbeddingsRequest = parse_json(&body)?;
    let manifest = wire::resolve(&st, &req.model)?.clone();
    let keep_alive = req.keep_alive.as_ref().map(KeepAliveWire::parse).transpose()?;
    let (handle, _) = st.engines.get(&manifest, &req.model, keep_alive).await?;
    if req.prompt.is_empty() {
        return Ok(json_response(StatusCode::OK, &EmbeddingsResponse { embedding: Vec::new() }));
    }
    let ids = infer::embedding_ids(&handle, std::slice::from_ref(&req.prompt), true)?;
    let mut v = handle.embed(ids).await.map_err(infer::embed_error)?;
    Ok(json_response(StatusCode::OK, &EmbeddingsResponse { embedding: v.pop().unwrap_or_default() }))
}

// ---------------------------------------------------------------------------------------------
// Model information and management

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct Details {
    pub parent_model: String,
    pub format: String,
    pub family: String,
    pub families: Vec<String>,
    pub parameter_size: String,
    pub quantization_level: String,
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct ListModel {
    pub name: String,
    pub model: String,
    pub modified_at: String,
    pub size: u64,
    pub digest: String,
    pub details: Details,
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct ListResponse {
    pub models: Vec<ListModel>,
}

/// The name a model is listed under: its first Ollama-style `name:tag` alias, else `id:latest`.
pub fn listed_name(m: &Manifest) -> String {
    m.aliases.iter().find(|a| a.contains(':')).cloned().unwrap_or_else(|| format!("{}:latest", m.id))
}

fn details(m: &Manifest) -> Details {
    let (format, quant) = match m.format {
        crate::hub::Format::Gguf => ("gguf", m.primary().name.rsplit('.').nth(1).unwrap_or("").to_owned()),
        crate::hub::Format::AwqSafetensors => ("safetensors", "AWQ-INT4".to_owned()),
    };
    Details {
        parent_model: String::new(),
        format: format.into(),
        family: m.architecture.clone(),
        families: vec![m.architecture.clone()],
        parameter_size: String::new(),
        quantization_level: quant,
    }
}

async fn tags(State(st): State<Shared>) -> Response {
    let src = st.engines.source();
    let models = st
        .registry
        .manifests()
        .iter()
        // Without local engines (the Ollama-proxy plan) the store's files serve nothing.
        .filter(|m| st.providers.local && src.present(m))
        .map(|m| ListModel {
            name: listed_name(m),
            model: listed_name(m),
            modified_at: wire::rfc3339(src.modified(m)),
            size: src.size(m),
            digest: src.digest(m),
            details: details(m),
        })
        .collect();
    let local = serde_json::to_value(ListResponse { models }).expect("wire types serialize");
    json_response(
        StatusCode::OK,
        &super::proxy::merged_listing(&st, super::proxy::Listing::Tags, local, "models").await,
    )
}

#[derive(Clone, Debug, Deserialize, JsonSchema)]
pub struct ModelRequest {
    pub model: Option<String>,
    /// Older clients send `name`.
    pub name: Option<String>,
    pub verbose: Option<bool>,
    pub stream: Option<bool>,
    pub insecure: Option<bool>,
}

impl ModelRequest {
    fn model(&self) -> Result<&str, ApiError> {
        self.model
            .as_deref()
            .or(self.name.as_deref())
            .filter(|m| !m.trim().is_empty())
            .ok_or_else(|| ApiError::bad_field("model", "model is required"))
    }
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct ShowResponse {
    pub license: String,
    pub modelfile: String,
    pub parameters: String,
    pub template: String,
    pub details: Details,
    pub model_info: serde_json::Map<String, serde_json::Value>,
    pub capabilities: Vec<String>,
    pub modified_at: String,
}

pub fn capabilities(m: &Manifest) -> Vec<String> {
    let mut caps = vec!["completion".to_owned()];
    if m.has_role(Role::Tools) {
        caps.push("tools".into());
    }
    if m.has_role(Role::Vision) {
        caps.push("vision".into());
    }
    caps
}

async fn show(State(st): State<Shared>, body: Body) -> Response {
    super::proxy::dispatch(st, super::proxy::Endpoint::OllamaShow, body, show_local).await
}

async fn show_local(st: Shared, body: axum::body::Bytes) -> Result<Response> {
    let req: ModelRequest = parse_json(&body)?;
    let name = req.model()?;
    let m = wire::resolve(&st, name)?.clone();
    if !st.engines.source().present(&m) {
        return Err(ApiError::ModelNotFound { model: name.to_owned() }.into());
    }
    let (handle, _) = st.engines.get(&m, name, None).await?;
    let s = &m.defaults.sampling;
    let mut parameters = format!(
        "temperature {}\ntop_k {}\ntop_p {}\nmin_p {}\nrepeat_penalty {}",
        s.temperature, s.top_k, s.top_p, s.min_p, s.repeat_penalty
    );
    for stop in &m.defaults.stop {
        parameters.push_str(&format!("\nstop {stop:?}"));
    }
    let mut model_info = serde_json::Map::new();
    model_info.insert("general.architecture".into(), m.architecture.clone().into());
    model_info.insert(format!("{}.context_length", m.architecture), handle.context_length.into());
    model_info.insert(format!("{}.embedding_length", m.architecture), handle.hidden_size.into());
    model_info.insert("tokenizer.ggml.vocab_size".into(), handle.vocab_size.into());
    let template = handle.tokenizer.chat_template().unwrap_or("").to_owned();
    let path = st.engines.source().digest(&m);
    Ok(json_response(
        StatusCode::OK,
        &ShowResponse {
            license: String::new(),
            modelfile: format!("# Modelfile generated by zoe-llm from {}\nFROM sha256:{path}\n", m.origin),
            parameters,
            template,
            details: details(&m),
            model_info,
            capabilities: capabilities(&m),
            modified_at: wire::rfc3339(st.engines.source().modified(&m)),
        },
    ))
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct PsModel {
    pub name: String,
    pub model: String,
    pub size: u64,
    pub digest: String,
    pub details: Details,
    pub expires_at: String,
    pub size_vram: u64,
    pub context_length: usize,
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct PsResponse {
    pub models: Vec<PsModel>,
}

async fn ps(State(st): State<Shared>) -> Response {
    let models = st
        .engines
        .resident()
        .into_iter()
        .filter_map(|(h, expires)| {
            let m = st.registry.get(&h.id)?;
            // "Forever" as Ollama shows it: far in the future.
            let expires_at =
                expires.unwrap_or(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(253_402_300_799));
            Some(PsModel {
                name: listed_name(m),
                model: listed_name(m),
                size: h.size_bytes(),
                digest: st.engines.source().digest(m),
                details: details(m),
                expires_at: wire::rfc3339(expires_at),
                size_vram: 0,
                context_length: h.context_length,
            })
        })
        .collect();
    let local = serde_json::to_value(PsResponse { models }).expect("wire types serialize");
    json_response(StatusCode::OK, &super::proxy::merged_listing(&st, super::proxy::Listing::Ps, local, "models").await)
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct ProgressResponse {
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed: Option<u64>,
}

fn status(s: &str) -> ProgressResponse {
    ProgressResponse { status: s.to_owned(), digest: None, total: None, completed: None }
}

fn progress_line(ev: &PullEvent) -> Option<ProgressResponse> {
    Some(match ev {
        PullEvent::Resolving => status("pulling manifest"),
        PullEvent::Downloading { file, digest, total, completed } => {
            let short = digest.as_deref().map_or_else(|| file.clone(), |d| d.chars().take(12).collect());
            ProgressResponse {
                status: format!("pulling {short}"),
                digest: digest.as_ref().map(|d| format!("sha256:{d}")),
                total: *total,
                completed: Some(*completed),
            }
        }
        PullEvent::Verifying { .. } => status("verifying sha256 digest"),
        PullEvent::Done { .. } => return None,
    })
}

async fn pull(State(st): State<Shared>, body: Body) -> Result<Response> {
    let req: ModelRequest = read_json(body, st.config.max_body_bytes).await?;
    let name = req.model()?.to_owned();
    let m = wire::resolve(&st, &name)?.clone();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<std::result::Result<ProgressResponse, String>>();
    let sink_tx = tx.clone();
    let opts = PullOptions {
        progress: false,
        on_event: Some(Arc::new(move |ev: &PullEvent| {
            if let Some(line) = progress_line(ev) {
                let _ = sink_tx.send(Ok(line));
            }
        })),
        ..PullOptions::from_env()
    };
    let st2 = st.clone();
    tokio::task::spawn_blocking(move || {
        let result = st2.engines.source().pull(&m, &opts);
        let _ = match result {
            Ok(()) => {
                let _ = tx.send(Ok(status("writing manifest")));
                tx.send(Ok(status("success")))
            }
            Err(e) => tx.send(Err(e.to_string())),
        };
    });
    if req.stream == Some(false) {
        let mut last = None;
        while let Some(item) = rx.recv().await {
            match item {
                Ok(p) => last = Some(p),
                Err(e) => return Err(ApiError::Internal(e).into()),
            }
        }
        return Ok(json_response(StatusCode::OK, &last.unwrap_or_else(|| status("success"))));
    }
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let item = rx.recv().await?;
        let mut out = Vec::new();
        match item {
            Ok(p) => line(&mut out, &serde_json::to_value(p).expect("serializes")),
            Err(e) => line(&mut out, &ApiError::Internal(e).body(Dialect::Ollama)),
        }
        Some((Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(out)), rx))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    Ok(resp)
}

async fn delete(State(st): State<Shared>, body: Body) -> Result<Response> {
    let req: ModelRequest = read_json(body, st.config.max_body_bytes).await?;
    let name = req.model()?;
    let m = wire::resolve(&st, name)?.clone();
    if !st.engines.source().present(&m) {
        return Err(ApiError::ModelNotFound { model: name.to_owned() }.into());
    }
    st.engines.unload(&m.id);
    st.engines.source().delete(&m).map_err(ApiError::Internal)?;
    tracing::info!(model = %m.id, "deleted");
    Ok(StatusCode::OK.into_response())
}

/// A chat stream writer as `/api/chat` makes one, for tests that feed it events directly.
#[cfg(test)]
pub(super) fn chat_stream_writer(handle: Arc<ModelHandle>, tool_calls: bool) -> impl StreamWriter {
    Writer {
        model: "m".into(),
        kind: Kind::Chat,
        start: Instant::now(),
        load: std::time::Duration::ZERO,
        prompt_ids: Vec::new(),
        handle,
        logprobs: false,
        text: String::new(),
        lps: Vec::new(),
        stream: true,
        tool_calls,
        tools: tool_calls.then(ToolStream::default),
        calls: 0,
    }
}
