//! OpenAI's API as vLLM serves it (`/v1/*`), plus vLLM's `/tokenize`, `/detokenize`, `/version`
//! and `/health`; ../shared/reference/api.md §2 and §5.
//!
//! Streams are SSE: `data: <json>\n\n` per chunk, a role chunk first for each choice, content
//! deltas, one finish chunk per choice (`delta: {}` with `finish_reason`), a usage chunk with
//! `choices: []` when `stream_options.include_usage`, then `data: [DONE]`. Unset optional fields
//! are left out (vLLM's `exclude_unset`). Omitted sampling fields take the model's defaults (vLLM's
//! `generation_config` behaviour), not Ollama's forced temperature 1.0.

use std::time::SystemTime;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::error::{json_response, parse_json, read_json, ApiError, OpenAiError};
use super::infer::{self, Collected, ImageBytes, InferenceRequest, Input, MaxTokens, SamplingOverrides};
use super::infer::{check_dimensions, embed_error, embedding_ids, normalize};
use super::ollama::listed_name;
use super::sse::{ChatChunks, SseStream, TextChunks};
use super::wire::{self, OneOrMany, TopLogprob};
use super::Shared;
use crate::chat::tools::{self, ToolCall};
use crate::engine::generate::{raw_prompt_ids, render_chat_prompt_with_tools, TokenLogprobs};
use crate::engine::service::{ModelHandle, Summary};
use crate::hub::Manifest;

type Result<T, E = OpenAiError> = std::result::Result<T, E>;

/// Most choices one request may ask for.
pub const MAX_N: i64 = 8;

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/version", get(version))
        .route("/health", get(health))
}

// ---------------------------------------------------------------------------------------------
// Models, version, health

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    pub root: String,
    pub max_model_len: u32,
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

fn card(st: &Shared, m: &Manifest) -> ModelCard {
    ModelCard {
        id: listed_name(m),
        object: "model",
        created: wire::unix_secs(st.engines.source().modified(m)),
        owned_by: "zoe-llm",
        root: m.id.clone(),
        max_model_len: m.defaults.context_length,
    }
}

async fn models(State(st): State<Shared>) -> Response {
    let data = st
        .registry
        .manifests()
        .iter()
        .filter(|m| st.providers.local && st.engines.source().present(m))
        .map(|m| card(&st, m))
        .collect();
    let local = serde_json::to_value(ModelList { object: "list", data }).expect("wire types serialize");
    json_response(
        StatusCode::OK,
        &super::proxy::merged_listing(&st, super::proxy::Listing::Models, local, "data").await,
    )
}

async fn model(State(st): State<Shared>, Path(id): Path<String>) -> Result<Response> {
    if let Some(m) = st.registry.get(&id).filter(|m| st.providers.local && st.engines.source().present(m)) {
        return Ok(json_response(StatusCode::OK, &card(&st, m)));
    }
    if id.trim().is_empty() {
        return Err(ApiError::bad_field("model", "model is required").into());
    }
    // An upstream's model.
    let found = super::proxy::upstream_listing(&st, super::proxy::Listing::Models)
        .await
        .into_iter()
        .find(|c| c.get("id").and_then(serde_json::Value::as_str) == Some(id.as_str()));
    match found {
        Some(card) => Ok(json_response(StatusCode::OK, &card)),
        None => Err(ApiError::ModelNotFound { model: id }.into()),
    }
}

#[derive(Serialize, JsonSchema)]
pub struct ServerVersion {
    pub version: String,
}

async fn version() -> Response {
    json_response(StatusCode::OK, &ServerVersion { version: env!("CARGO_PKG_VERSION").into() })
}

/// 200 with an empty body when every model loaded at start is still resident; 503 otherwise.
async fn health(State(st): State<Shared>) -> Response {
    let (status, body) = super::health(&st);
    json_response(status, &body)
}

// ---------------------------------------------------------------------------------------------
// Requests

#[derive(Clone, Debug, Default, Deserialize, JsonSchema)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
    pub continuous_usage_stats: Option<bool>,
}

/// A message `content` part.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
    pub image_url: Option<ImageUrl>,
}

#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum ImageUrl {
    Url(String),
    Object { url: String, detail: Option<String> },
}

#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Clone, Debug, Deserialize, JsonSchema)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<Content>,
    pub name: Option<String>,
    pub tool_calls: Option<Vec<serde_json::Value>>,
    pub tool_call_id: Option<String>,
}

/// Sampling and length fields shared by chat and text completions (vLLM extras included).
#[derive(Clone, Debug, Default)]
pub struct CommonParams {
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<i64>,
    pub n: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<OneOrMany>,
    pub user: Option<String>,
}

#[derive(Clone, Debug, Deserialize, JsonSchema)]
pub struct ChatCompletionRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<i64>,
    pub n: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<OneOrMany>,
    pub user: Option<String>,
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub response_format: Option<serde_json::Value>,
    pub tools: Option<Vec<serde_json::Value>>,
    pub tool_choice: Option<serde_json::Value>,
    /// vLLM's per-request image-processor arguments: `min_pixels` and `max_pixels` here.
    pub mm_processor_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
}

/// `mm_processor_kwargs` as a pixel budget; other keys, or values that are not integers, are
/// 400s naming them.
fn pixel_budget(kwargs: Option<&serde_json::Map<String, serde_json::Value>>) -> Result<infer::PixelBudget> {
    let mut budget = infer::PixelBudget::default();
    for (key, value) in kwargs.into_iter().flatten() {
        let field = format!("mm_processor_kwargs.{key}");
        let slot = match key.as_str() {
            "min_pixels" => &mut budget.min,
            "max_pixels" => &mut budget.max,
            _ => {
                return Err(ApiError::bad_field(
                    &field,
                    format!("{field} is not supported: mm_processor_kwargs takes min_pixels and max_pixels"),
                )
                .into())
            }
        };
        let Some(v) = value.as_i64() else {
            return Err(ApiError::bad_field(&field, format!("{field} must be an integer, not {value}")).into());
        };
        *slot = Some((field, v));
    }
    Ok(budget)
}

/// The shared fields of both request types (written out in each, not `flatten`ed: flattening
/// would hide the field name in decode errors).
macro_rules! common_params {
    ($t:ty) => {
        impl $t {
            fn common(&self) -> CommonParams {
                CommonParams {
                    stream: self.stream,
                    stream_options: self.stream_options.clone(),
                    max_tokens: self.max_tokens,
                    n: self.n,
                    temperature: self.temperature,
                    top_p: self.top_p,
                    top_k: self.top_k,
                    min_p: self.min_p,
                    presence_penalty: self.presence_penalty,
                    frequency_penalty: self.frequency_penalty,
                    repetition_penalty: self.repetition_penalty,
                    seed: self.seed,
                    stop: self.stop.clone(),
                    user: self.user.clone(),
                }
            }
        }
    };
}
common_params!(ChatCompletionRequest);
common_params!(CompletionRequest);

#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

#[derive(Clone, Debug, Deserialize, JsonSchema)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Prompt,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<i64>,
    pub n: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<OneOrMany>,
    pub user: Option<String>,
    pub echo: Option<bool>,
    /// Legacy: how many alternatives to report per token (0–5).
    pub logprobs: Option<i64>,
    pub suffix: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Responses

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct TokenLogprob {
    #[serde(flatten)]
    pub chosen: TopLogprob,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct ChoiceLogprobs {
    pub content: Vec<TokenLogprob>,
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct AssistantMessage {
    pub role: &'static str,
    /// `null` when the reply is only tool calls.
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallOut>,
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct ToolCallOut {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionOut,
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct FunctionOut {
    pub name: String,
    /// The arguments object as a JSON string (OpenAI's wire form).
    pub arguments: String,
}

impl ToolCallOut {
    pub fn new(call: &ToolCall) -> Self {
        Self {
            id: tool_call_id(),
            kind: "function",
            function: FunctionOut { name: call.name.clone(), arguments: call.arguments_json() },
        }
    }
}

/// vLLM's tool-call id form.
pub fn tool_call_id() -> String {
    format!("chatcmpl-tool-{:032x}", rand::random::<u128>())
}

/// One piece of a streamed tool call: the first carries `id`, `type` and the name, the next the
/// arguments.
#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionDelta,
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct FunctionDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    pub logprobs: Option<ChoiceLogprobs>,
    pub finish_reason: &'static str,
    pub stop_reason: Option<String>,
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Clone, Debug, Default, Serialize, JsonSchema)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct ChunkChoice {
    pub index: usize,
    pub delta: Delta,
    pub logprobs: Option<ChoiceLogprobs>,
    pub finish_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// Legacy completions logprobs.
#[derive(Clone, Debug, Default, Serialize, JsonSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<serde_json::Map<String, serde_json::Value>>,
    pub text_offset: Vec<usize>,
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct Completion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

// ---------------------------------------------------------------------------------------------
// Shared mapping

/// The model a request names, or the default model when it names none (vLLM makes `model`
/// optional).
fn resolve_model(st: &Shared, model: Option<&str>) -> Result<(Manifest, String)> {
    match model.filter(|m| !m.trim().is_empty()) {
        Some(name) => Ok((wire::resolve(st, name)?.clone(), name.to_owned())),
        None => {
            let m = st.registry.default_model().ok_or_else(|| ApiError::bad_field("model", "model is required"))?;
            Ok((m.clone(), listed_name(m)))
        }
    }
}

struct Mapped {
    sampling: SamplingOverrides,
    n: usize,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
}

fn map_common(c: &CommonParams) -> Result<Mapped> {
    let stream = c.stream.unwrap_or(false);
    if c.stream_options.is_some() && !stream {
        return Err(
            ApiError::bad_field("stream_options", "Stream options can only be defined when `stream=True`.").into()
        );
    }
    let n = c.n.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(ApiError::bad_field("n", format!("n = {n} is out of range: allowed is 1 to {MAX_N}")).into());
    }
    let top_k = match c.top_k {
        None => None,
        Some(k) if k <= 0 => Some(0), // vLLM: -1 (and 0) disable top-k
        Some(k) => Some(usize::try_from(k).unwrap_or(usize::MAX)),
    };
    let stop = c.stop.clone().map(OneOrMany::into_vec).unwrap_or_default();
    if stop.len() > 16 {
        return Err(
            ApiError::bad_field("stop", format!("stop has {} entries: at most 16 are allowed", stop.len())).into()
        );
    }
    Ok(Mapped {
        sampling: SamplingOverrides {
            temperature: c.temperature,
            top_k,
            top_p: c.top_p,
            min_p: c.min_p,
            repeat_penalty: c.repetition_penalty,
            repeat_last_n: None,
            presence_penalty: c.presence_penalty,
            frequency_penalty: c.frequency_penalty,
            seed: c.seed.map(|s| s as u64),
        },
        n: n as usize,
        stop,
        stream,
        include_usage: c.stream_options.as_ref().is_some_and(|o| o.include_usage.unwrap_or(true)),
    })
}

fn max_tokens(field: &str, v: Option<i64>, default: MaxTokens) -> Result<MaxTokens> {
    match v {
        None => Ok(default),
        Some(n) if n < 1 => Err(ApiError::bad_field(field, format!("{field} must be at least 1, got {n}.")).into()),
        Some(n) => Ok(MaxTokens::Strict(usize::try_from(n).unwrap_or(usize::MAX))),
    }
}

/// A message's content for the template; image parts are checked (data URLs only; models
/// without vision refuse them), become image slots, and their bytes go to `images`.
fn content_value(
    m: &Manifest,
    i: usize,
    content: Option<&Content>,
    images: &mut Vec<ImageBytes>,
    fetch_urls: bool,
) -> Result<serde_json::Value> {
    match content {
        None => Ok(String::new().into()),
        Some(Content::Text(s)) => Ok(s.clone().into()),
        Some(Content::Parts(parts)) => {
            let mut texts = Vec::new();
            for (j, p) in parts.iter().enumerate() {
                let field = format!("messages[{i}].content[{j}]");
                match p.kind.as_str() {
                    "text" | "input_text" => texts.push(Some(p.text.clone().unwrap_or_default())),
                    "image_url" => {
                        let url = match &p.image_url {
                            Some(ImageUrl::Url(u)) | Some(ImageUrl::Object { url: u, .. }) => u,
                            None => {
                                return Err(ApiError::bad_field(&field, format!("{field}: image_url is missing")).into())
                            }
                        };
                        if url.starts_with("http://") || url.starts_with("https://") {
                            if !fetch_urls {
                                return Err(ApiError::bad_field(
                                    &field,
                                    "image URLs are not currently supported, please use base64 encoded data instead \
                                     (or enable image_url_fetch in the server's settings)",
                                )
                                .into());
                            }
                            wire::require_vision(m, &field)?;
                            images.push(ImageBytes {
                                field: format!("{field}.image_url"),
                                bytes: Vec::new(),
                                url: Some(url.clone()),
                            });
                            texts.push(None);
                            continue;
                        }
                        let b64 = match url.split_once(";base64,") {
                            Some((head, data)) if head.starts_with("data:") => data.to_owned(),
                            _ if !url.starts_with("data:") => url.clone(),
                            _ => {
                                return Err(ApiError::bad_field(&field, format!("{field}: invalid image input")).into())
                            }
                        };
                        let field = format!("{field}.image_url");
                        let bytes = wire::check_images(m, &field, &[b64])?.pop().expect("one image in, one out");
                        images.push(ImageBytes { field, bytes, url: None });
                        texts.push(None);
                    }
                    other => {
                        return Err(ApiError::bad_field(
                            &field,
                            format!("{field}: unsupported content part type {other:?} (supported: text, image_url)"),
                        )
                        .into())
                    }
                }
            }
            Ok(infer::message_content(texts))
        }
    }
}

/// OpenAI messages → template messages (tool-call arguments parsed from strings, so templates do
/// not encode them twice).
fn chat_messages(
    m: &Manifest,
    msgs: &[ChatMessage],
    fetch_urls: bool,
) -> Result<(Vec<serde_json::Value>, Vec<ImageBytes>)> {
    if msgs.is_empty() {
        return Err(
            ApiError::bad_field("messages", "messages: [] is too short - at least one message is required").into()
        );
    }
    let mut out = Vec::with_capacity(msgs.len());
    let mut images = Vec::new();
    for (i, msg) in msgs.iter().enumerate() {
        let role = match msg.role.as_str() {
            "developer" => "system",
            r @ ("system" | "user" | "assistant" | "tool") => r,
            other => {
                return Err(ApiError::bad_field(
                    &format!("messages[{i}].role"),
                    format!("messages[{i}].role = {other:?}: expected system, developer, user, assistant or tool"),
                )
                .into())
            }
        };
        let mut v = serde_json::json!({ "role": role, "content": content_value(m, i, msg.content.as_ref(), &mut images, fetch_urls)? });
        if let Some(calls) = &msg.tool_calls {
            let mut calls = calls.clone();
            for (j, c) in calls.iter_mut().enumerate() {
                if let Some(args) = c.pointer_mut("/function/arguments") {
                    if let serde_json::Value::String(s) = args {
                        *args = serde_json::from_str(s).map_err(|e| {
                            ApiError::bad_field(
                                &format!("messages[{i}].tool_calls[{j}].function.arguments"),
                                format!("messages[{i}].tool_calls[{j}].function.arguments is not valid JSON: {e}"),
                            )
                        })?;
                    }
                }
            }
            v["tool_calls"] = serde_json::Value::Array(calls);
        }
        if let Some(name) = &msg.name {
            v["name"] = name.clone().into();
        }
        if let Some(id) = &msg.tool_call_id {
            v["tool_call_id"] = id.clone().into();
        }
        out.push(v);
    }
    Ok((out, images))
}

fn request_id(prefix: &str) -> String {
    format!("{prefix}{:032x}", rand::random::<u128>())
}

pub(super) fn chat_logprobs(handle: &ModelHandle, lps: &[(u32, TokenLogprobs)]) -> ChoiceLogprobs {
    let content = lps
        .iter()
        .map(|(id, lp)| {
            let (chosen, top_logprobs) = TopLogprob::with_top(&handle.tokenizer, *id, lp);
            TokenLogprob { chosen, top_logprobs }
        })
        .collect();
    ChoiceLogprobs { content }
}

pub(super) fn legacy_logprobs(handle: &ModelHandle, lps: &[(u32, TokenLogprobs)], offset: usize) -> CompletionLogprobs {
    let tok = &handle.tokenizer;
    let mut out = CompletionLogprobs::default();
    let mut at = offset;
    for (id, lp) in lps {
        let t = tok.decode(&[*id], false);
        out.text_offset.push(at);
        at += t.len();
        out.tokens.push(t);
        out.token_logprobs.push(lp.logprob);
        out.top_logprobs.push(lp.top.iter().map(|&(t, l)| (tok.decode(&[t], false), serde_json::json!(l))).collect());
    }
    out
}

pub(super) fn usage(prompt: usize, choices: &[&Summary]) -> Usage {
    let completion: usize = choices.iter().map(|s| s.tokens.len()).sum();
    Usage { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion }
}

pub(super) fn sse(out: &mut Vec<u8>, v: &impl Serialize) {
    out.extend_from_slice(b"data: ");
    serde_json::to_writer(&mut *out, v).expect("wire types serialize");
    out.extend_from_slice(b"\n\n");
}

fn sse_response(body: Body) -> Response {
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

// ---------------------------------------------------------------------------------------------
// Chat completions

async fn chat_completions(State(st): State<Shared>, body: Body) -> Response {
    super::proxy::dispatch(st, super::proxy::Endpoint::OpenAiChat, body, chat_completions_local).await
}

async fn chat_completions_local(st: Shared, body: axum::body::Bytes) -> Result<Response> {
    let req: ChatCompletionRequest = parse_json(&body)?;
    let (manifest, model_name) = resolve_model(&st, req.model.as_deref())?;
    let common = req.common();
    let mapped = map_common(&common)?;
    let max = match req.max_completion_tokens {
        Some(_) => max_tokens("max_completion_tokens", req.max_completion_tokens, MaxTokens::Fill)?,
        None => max_tokens("max_tokens", common.max_tokens, MaxTokens::Fill)?,
    };
    let top = req.top_logprobs.unwrap_or(0);
    if !(0..=20).contains(&top) {
        return Err(ApiError::bad_field(
            "top_logprobs",
            format!("top_logprobs = {top} is out of range: allowed is 0 to 20"),
        )
        .into());
    }
    if top > 0 && req.logprobs != Some(true) {
        return Err(
            ApiError::bad_field("top_logprobs", "when using `top_logprobs`, `logprobs` must be set to true.").into()
        );
    }
    let logprobs = (req.logprobs == Some(true)).then_some(top as usize);
    let tools = wire::tool_set(&manifest, req.tools.as_deref(), req.tool_choice.as_ref())?;
    let format = wire::response_format(req.response_format.as_ref())?.map(|f| ("response_format", f));
    let pixels = pixel_budget(req.mm_processor_kwargs.as_ref())?;
    let (messages, mut images) = chat_messages(&manifest, &req.messages, st.config.image_url_fetch)?;
    infer::fetch_images(&mut images, crate::vision::PreprocessConfig::default().max_file_bytes).await?;
    let (handle, _) = st.engines.get(&manifest, &model_name, None).await?;
    let ireq = InferenceRequest {
        input: Input::Chat { messages },
        max_tokens: max,
        sampling: mapped.sampling,
        stop: mapped.stop,
        num_ctx: None,
        n: mapped.n,
        logprobs,
        tools,
        format,
        images,
        pixels,
    };
    let prepared = infer::prepare(&handle, &manifest, &ireq).await?;
    let rx = infer::submit(&handle, &prepared)?;
    let id = request_id("chatcmpl-");
    let created = wire::unix_secs(SystemTime::now());
    let prompt_tokens = prepared.prompt_ids.len();
    if mapped.stream {
        let kind = ChatChunks::new(id, created, model_name, handle, logprobs.is_some(), mapped.n, prepared.tool_calls);
        let writer = SseStream::new(kind, mapped.n, mapped.include_usage, prompt_tokens);
        return Ok(sse_response(infer::stream_body(rx, writer, st.shutdown.watcher())));
    }
    let got = infer::collect(rx, mapped.n, st.shutdown.watcher()).await?;
    let summaries: Vec<&Summary> = got.iter().filter_map(|c| c.summary.as_ref()).collect();
    let usage = usage(prompt_tokens, &summaries);
    let choices = got
        .iter()
        .enumerate()
        .map(|(index, c)| {
            let s = c.summary.as_ref().expect("collect waits for Done");
            let (content, calls) = if prepared.tool_calls {
                let x = tools::extract(&c.text);
                (x.content, x.calls)
            } else {
                (c.text.clone(), Vec::new())
            };
            let tool_calls: Vec<ToolCallOut> = calls.iter().map(ToolCallOut::new).collect();
            let finish_reason = if tool_calls.is_empty() { s.finish_reason.as_str() } else { "tool_calls" };
            let content = (!content.is_empty() || tool_calls.is_empty()).then_some(content);
            ChatChoice {
                index,
                message: AssistantMessage { role: "assistant", content, tool_calls },
                logprobs: logprobs.map(|_| chat_logprobs(&handle, &c.logprobs)),
                finish_reason,
                stop_reason: s.stop_reason.clone(),
            }
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &ChatCompletion { id, object: "chat.completion", created, model: model_name, choices, usage },
    ))
}

// ---------------------------------------------------------------------------------------------
// Text completions

async fn completions(State(st): State<Shared>, body: Body) -> Response {
    super::proxy::dispatch(st, super::proxy::Endpoint::OpenAiCompletions, body, completions_local).await
}

async fn completions_local(st: Shared, body: axum::body::Bytes) -> Result<Response> {
    let req: CompletionRequest = parse_json(&body)?;
    let (manifest, model_name) = resolve_model(&st, req.model.as_deref())?;
    let common = req.common();
    let mapped = map_common(&common)?;
    // OpenAI's and vLLM's default for completions.
    let max = max_tokens("max_tokens", common.max_tokens, MaxTokens::Strict(16))?;
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad_field("suffix", "suffix is not currently supported").into());
    }
    let logprobs = match req.logprobs {
        None => None,
        Some(k) if (0..=5).contains(&k) => Some(k as usize),
        Some(k) => {
            return Err(
                ApiError::bad_field("logprobs", format!("logprobs = {k} is out of range: allowed is 0 to 5")).into()
            )
        }
    };
    let (handle, _) = st.engines.get(&manifest, &model_name, None).await?;
    let (prompt_text, token_prompt) = match &req.prompt {
        Prompt::Text(s) => (s.clone(), None),
        Prompt::Texts(v) if v.len() == 1 => (v[0].clone(), None),
        Prompt::Texts(v) => {
            return Err(ApiError::bad_field(
                "prompt",
                format!("prompt holds {} strings: this server takes one prompt per request", v.len()),
            )
            .into())
        }
        Prompt::Tokens(ids) => {
            if let Some(&bad) = ids.iter().find(|&&t| t as usize >= handle.vocab_size) {
                return Err(ApiError::bad_field(
                    "prompt",
                    format!("prompt token id {bad} is outside the vocabulary of {}", handle.vocab_size),
                )
                .into());
            }
            (handle.tokenizer.decode(ids, false), Some(ids.clone()))
        }
    };
    if prompt_text.is_empty() && token_prompt.as_ref().is_none_or(Vec::is_empty) {
        return Err(ApiError::bad_field("prompt", "prompt is empty").into());
    }
    let ireq = InferenceRequest {
        input: Input::Text {
            prompt: prompt_text.clone(),
            raw: true,
            system: None,
            template: None,
            context: Vec::new(),
        },
        max_tokens: max,
        sampling: mapped.sampling,
        stop: mapped.stop,
        num_ctx: None,
        n: mapped.n,
        logprobs,
        tools: None,
        format: None,
        images: Vec::new(),
        pixels: infer::PixelBudget::default(),
    };
    let mut prepared = infer::prepare(&handle, &manifest, &ireq).await?;
    if let Some(ids) = token_prompt {
        for r in &mut prepared.requests {
            r.prompt_ids = ids.clone();
        }
        prepared.prompt_ids = ids;
    }
    let rx = infer::submit(&handle, &prepared)?;
    let echo = req.echo.unwrap_or(false).then_some(prompt_text);
    let id = request_id("cmpl-");
    let created = wire::unix_secs(SystemTime::now());
    let prompt_tokens = prepared.prompt_ids.len();
    if mapped.stream {
        let kind = TextChunks {
            id,
            created,
            model: model_name,
            handle,
            echo,
            offsets: vec![0; mapped.n],
            logprobs: logprobs.is_some(),
        };
        let writer = SseStream::new(kind, mapped.n, mapped.include_usage, prompt_tokens);
        return Ok(sse_response(infer::stream_body(rx, writer, st.shutdown.watcher())));
    }
    let got: Vec<Collected> = infer::collect(rx, mapped.n, st.shutdown.watcher()).await?;
    let summaries: Vec<&Summary> = got.iter().filter_map(|c| c.summary.as_ref()).collect();
    let usage = usage(prompt_tokens, &summaries);
    let prefix = echo.unwrap_or_default();
    let choices = got
        .iter()
        .enumerate()
        .map(|(index, c)| {
            let s = c.summary.as_ref().expect("collect waits for Done");
            CompletionChoice {
                index,
                text: format!("{prefix}{}", c.text),
                logprobs: logprobs.map(|_| legacy_logprobs(&handle, &c.logprobs, prefix.len())),
                finish_reason: Some(s.finish_reason.as_str()),
                stop_reason: s.stop_reason.clone(),
            }
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &Completion { id, object: "text_completion", created, model: model_name, choices, usage: Some(usage) },
    ))
}

// ---------------------------------------------------------------------------------------------
// Embeddings

#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum EmbeddingInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Clone, Debug, Deserialize, JsonSchema)]
pub struct EmbeddingRequest {
    pub model: Option<String>,
    pub input: EmbeddingInput,
    pub encoding_format: Option<String>,
    pub dimensions: Option<i64>,
    pub user: Option<String>,
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum EmbeddingVector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct EmbeddingData {
    pub index: usize,
    pub object: &'static str,
    pub embedding: EmbeddingVector,
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct EmbeddingResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub data: Vec<EmbeddingData>,
    pub usage: Usage,
}

async fn embeddings(State(st): State<Shared>, body: Body) -> Response {
    super::proxy::dispatch(st, super::proxy::Endpoint::OpenAiEmbeddings, body, embeddings_local).await
}

async fn embeddings_local(st: Shared, body: axum::body::Bytes) -> Result<Response> {
    let req: EmbeddingRequest = parse_json(&body)?;
    let (manifest, model_name) = resolve_model(&st, req.model.as_deref())?;
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_field(
                "encoding_format",
                format!("Invalid value for 'encoding_format' = {other}. Supported values: ['float', 'base64']."),
            )
            .into())
        }
    };
    let (handle, _) = st.engines.get(&manifest, &model_name, None).await?;
    let dims = check_dimensions(req.dimensions, handle.hidden_size)?;
    let ids = match &req.input {
        EmbeddingInput::Text(s) => embedding_ids(&handle, std::slice::from_ref(s), true)?,
        EmbeddingInput::Texts(v) if v.is_empty() => return Err(ApiError::bad_field("input", "input is empty").into()),
        EmbeddingInput::Texts(v) => embedding_ids(&handle, v, true)?,
        EmbeddingInput::Tokens(t) => vec![t.clone()],
        EmbeddingInput::TokenLists(v) => v.clone(),
    };
    for (i, t) in ids.iter().enumerate() {
        if t.is_empty() {
            return Err(ApiError::bad_field(&format!("input[{i}]"), format!("input[{i}] is empty")).into());
        }
        if t.len() > handle.context_length {
            return Err(ApiError::bad_field(
                &format!("input[{i}]"),
                format!("input[{i}] is {} tokens, the context is {}", t.len(), handle.context_length),
            )
            .into());
        }
        if let Some(&bad) = t.iter().find(|&&id| id as usize >= handle.vocab_size) {
            return Err(ApiError::bad_field(
                &format!("input[{i}]"),
                format!("token id {bad} is outside the vocabulary of {}", handle.vocab_size),
            )
            .into());
        }
    }
    let prompt_tokens: usize = ids.iter().map(Vec::len).sum();
    let vectors = handle.embed(ids).await.map_err(embed_error)?;
    let data = vectors
        .into_iter()
        .enumerate()
        .map(|(index, v)| {
            let v = normalize(v, dims);
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                EmbeddingVector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                EmbeddingVector::Float(v)
            };
            EmbeddingData { index, object: "embedding", embedding }
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &EmbeddingResponse {
            id: request_id("embd-"),
            object: "list",
            created: wire::unix_secs(SystemTime::now()),
            model: model_name,
            data,
            usage: Usage { prompt_tokens, completion_tokens: 0, total_tokens: prompt_tokens },
        },
    ))
}

// ---------------------------------------------------------------------------------------------
// Tokenize / detokenize

#[derive(Clone, Debug, Deserialize, JsonSchema)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<ChatMessage>>,
    /// With `messages`: tools rendered into the prompt, as a chat request would.
    pub tools: Option<Vec<serde_json::Value>>,
    pub add_special_tokens: Option<bool>,
    pub return_token_strs: Option<bool>,
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_strs: Option<Vec<String>>,
}

async fn tokenize(State(st): State<Shared>, body: Body) -> Result<Response> {
    let req: TokenizeRequest = read_json(body, st.config.max_body_bytes).await?;
    let (manifest, name) = resolve_model(&st, req.model.as_deref())?;
    let (handle, _) = st.engines.get(&manifest, &name, None).await?;
    let tok = &handle.tokenizer;
    let bad = |e: crate::engine::generate::GenerateError| ApiError::bad(format!("could not tokenize: {e}"));
    let tokens = match (&req.prompt, &req.messages) {
        (Some(p), None) => {
            if req.add_special_tokens.unwrap_or(true) {
                raw_prompt_ids(tok, p).map_err(bad)?
            } else {
                tok.encode(p, true).map_err(|e| bad(e.into()))?
            }
        }
        (None, Some(msgs)) => {
            let tools = wire::tool_set(&manifest, req.tools.as_deref(), None)?;
            let (messages, images) = chat_messages(&manifest, msgs, false)?;
            if !images.is_empty() {
                return Err(ApiError::bad_field("messages", "/tokenize does not take images").into());
            }
            render_chat_prompt_with_tools(tok, &messages, tools.as_ref()).map_err(bad)?
        }
        _ => return Err(ApiError::bad("give exactly one of `prompt` and `messages`").into()),
    };
    let token_strs = req.return_token_strs.unwrap_or(false).then(|| {
        tokens.iter().map(|&t| tok.token_text(t).map_or_else(|| tok.decode(&[t], false), str::to_owned)).collect()
    });
    Ok(json_response(
        StatusCode::OK,
        &TokenizeResponse { count: tokens.len(), max_model_len: handle.context_length, tokens, token_strs },
    ))
}

#[derive(Clone, Debug, Deserialize, JsonSchema)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

async fn detokenize(State(st): State<Shared>, body: Body) -> Result<Response> {
    let req: DetokenizeRequest = read_json(body, st.config.max_body_bytes).await?;
    let (manifest, name) = resolve_model(&st, req.model.as_deref())?;
    let (handle, _) = st.engines.get(&manifest, &name, None).await?;
    if let Some((i, &bad)) = req.tokens.iter().enumerate().find(|(_, &t)| t as usize >= handle.tokenizer.vocab_size()) {
        return Err(ApiError::bad_field(
            &format!("tokens[{i}]"),
            format!("tokens[{i}] = {bad} is outside the vocabulary of {} tokens", handle.tokenizer.vocab_size()),
        )
        .into());
    }
    Ok(json_response(StatusCode::OK, &DetokenizeResponse { prompt: handle.tokenizer.decode(&req.tokens, false) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeddings_serialize_as_f32() {
        let v = EmbeddingVector::Float(vec![0.364_974_8_f32]);
        assert_eq!(serde_json::to_string(&v).unwrap(), "[0.3649748]");
    }
}
