//! Requests routed past this machine's engines: the provider chain of a model
//! ([`crate::provider::Providers::chain`]) tried in order, the answer streamed back.
//!
//! - Same dialect (an Ollama request to an upstream Ollama, OpenAI to OpenAI): the body goes up
//!   with only `model` changed when the route renames it, and the answer comes back as the
//!   upstream framed it, piece by piece (lines rewritten only to put back the client's name).
//! - Other dialect: [`crate::provider::translate`] maps the request and each answer piece.
//! - Falling through: the next provider is tried when this one is skipped (breaker open), down
//!   after its retries, says it lacks the model (404), or — for this machine — cannot take the
//!   request (5xx: load failed, model failed, queue full, no memory) or lacks the files (404). Only before
//!   anything reached the client: once streaming, a failure is an error line in the stream.
//! - The `x-zoe-provider` response header names who answered.

use std::future::Future;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::error::{ApiError, Dialect};
use super::Shared;
use crate::provider::translate::{self, Framer, OpenAiReader, Shape, Step, Untranslatable, Writer};
use crate::provider::upstream::{Answer, SendError, Upstream};
use crate::provider::{Target, UpstreamKind};

/// The endpoints a provider chain serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    OllamaChat,
    OllamaGenerate,
    OllamaEmbed,
    OllamaEmbeddings,
    OllamaShow,
    OpenAiChat,
    OpenAiCompletions,
    OpenAiEmbeddings,
}

impl Endpoint {
    fn dialect(self) -> Dialect {
        match self {
            Self::OpenAiChat | Self::OpenAiCompletions | Self::OpenAiEmbeddings => Dialect::OpenAi,
            _ => Dialect::Ollama,
        }
    }

    /// The path of the same endpoint on a same-dialect upstream.
    fn path(self) -> &'static str {
        match self {
            Self::OllamaChat => "/api/chat",
            Self::OllamaGenerate => "/api/generate",
            Self::OllamaEmbed => "/api/embed",
            Self::OllamaEmbeddings => "/api/embeddings",
            Self::OllamaShow => "/api/show",
            Self::OpenAiChat => "/v1/chat/completions",
            Self::OpenAiCompletions => "/v1/completions",
            Self::OpenAiEmbeddings => "/v1/embeddings",
        }
    }

    /// Whether the client asked for a stream (each dialect's default).
    fn streams(self, body: &Value) -> bool {
        let asked = body.get("stream").and_then(Value::as_bool);
        match self {
            Self::OllamaChat | Self::OllamaGenerate => asked.unwrap_or(true),
            Self::OpenAiChat | Self::OpenAiCompletions => asked.unwrap_or(false),
            _ => false,
        }
    }
}

/// Why a provider was passed over.
enum Passed {
    /// Try the next one; the reason goes into the final 503/404.
    Next { why: String, not_found: bool },
    /// The answer to give (a client error the upstream or translation found).
    Answer(Response),
}

/// Reads the body, picks the chain for its `model`, and tries each provider; `local` serves a
/// request on this machine's engines.
pub async fn dispatch<F, Fut, E>(st: Shared, ep: Endpoint, body: Body, local: F) -> Response
where
    F: FnOnce(Shared, Bytes) -> Fut,
    Fut: Future<Output = Result<Response, E>>,
    E: Into<ApiError>,
{
    let dialect = ep.dialect();
    let bytes = match super::error::read_bytes(body, st.config.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => return e.into_response_for(dialect),
    };
    // Only the name is looked at here; the local handler decodes (and reports errors in) the rest.
    let model = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| v.get("model").or_else(|| v.get("name")).and_then(Value::as_str).map(str::to_owned));
    if let Some(m) = &model {
        tracing::Span::current().record("model", m.as_str());
    }
    let chain = match &model {
        Some(m) if !m.trim().is_empty() => st.providers.chain(m, &st.registry),
        _ => Vec::new(),
    };
    let no_upstream = chain.iter().all(|t| matches!(t, Target::Local));
    if no_upstream && (st.providers.local || model.as_deref().is_none_or(|m| m.trim().is_empty())) {
        // This machine's engines only (or nothing): the local handler gives the exact answer,
        // its 404 for an unknown name included.
        return tagged(local(st.clone(), bytes).await.map_err(Into::into), dialect, "local");
    }
    let model = model.unwrap_or_default();
    if chain.is_empty() {
        let e = ApiError::NotFound(match dialect {
            Dialect::Ollama => format!("model '{model}' not found: no provider serves it"),
            Dialect::OpenAi => format!("The model `{model}` does not exist: no provider serves it."),
        });
        return e.into_response_for(dialect);
    }
    let mut local = Some(local);
    let mut reasons = Vec::new();
    let mut all_not_found = true;
    let last = chain.len() - 1;
    for (i, target) in chain.iter().enumerate() {
        let passed = match target {
            Target::Local => {
                let Some(f) = local.take() else { continue };
                match f(st.clone(), bytes.clone()).await.map_err(Into::into) {
                    Ok(resp) => return tagged(Ok(resp), dialect, "local"),
                    // The engines could not take it (5xx: load failed, model failed, queue
                    // full, no memory) or lack the files (404); the client's mistakes (4xx) stay.
                    Err(e) if i < last && (e.status().is_server_error() || e.status() == StatusCode::NOT_FOUND) => {
                        tracing::warn!(error = %e.message(dialect), "local engines passed: trying the next provider");
                        Passed::Next { why: e.message(dialect), not_found: e.status() == StatusCode::NOT_FOUND }
                    }
                    Err(e) => return e.into_response_for(dialect),
                }
            }
            Target::Upstream { upstream, model: sent } => {
                match upstream_once(ep, upstream, sent, &model, &bytes, st.shutdown.watcher()).await {
                    Ok(resp) => return with_provider(resp, upstream.name()),
                    Err(p) => p,
                }
            }
        };
        match passed {
            Passed::Answer(resp) => return with_provider(resp, target.name()),
            Passed::Next { why, not_found } => {
                all_not_found &= not_found;
                reasons.push(format!("{}: {why}", target.name()));
            }
        }
    }
    let reasons = reasons.join("; ");
    let e = if all_not_found {
        ApiError::NotFound(match dialect {
            Dialect::Ollama => format!("model '{model}' not found ({reasons})"),
            Dialect::OpenAi => format!("The model `{model}` does not exist ({reasons})."),
        })
    } else {
        ApiError::Unavailable(format!("no provider could serve model '{model}' ({reasons})"))
    };
    e.into_response_for(dialect)
}

/// A model listing that upstreams add to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listing {
    /// `/api/tags` entries.
    Tags,
    /// `/api/ps` entries (Ollama upstreams only).
    Ps,
    /// `/v1/models` cards.
    Models,
}

/// The upstreams' entries for `what`, in each client's shape: every upstream whose breaker is
/// closed is asked at once (an upstream that does not answer in time adds nothing), and only
/// names it serves are kept.
pub async fn upstream_listing(st: &Shared, what: Listing) -> Vec<Value> {
    let asks = st.providers.upstreams.iter().filter(|u| u.breaker.allows()).map(|u| async move {
        let (path, key) = match (what, u.kind()) {
            (Listing::Ps, UpstreamKind::Openai) => return Vec::new(),
            (Listing::Ps, UpstreamKind::Ollama) => ("/api/ps", "models"),
            (_, UpstreamKind::Ollama) => ("/api/tags", "models"),
            (_, UpstreamKind::Openai) => ("/v1/models", "data"),
        };
        let v = match u.get_json(path).await {
            Ok(v) => v,
            Err(e) => {
                tracing::info!(upstream = u.name(), error = %e, path, "upstream listing failed");
                return Vec::new();
            }
        };
        let entries = v.get(key).and_then(Value::as_array).cloned().unwrap_or_default();
        entries
            .into_iter()
            .filter_map(|e| {
                let name = e.get("name").or_else(|| e.get("id")).and_then(Value::as_str)?.to_owned();
                if !u.serves(&name) {
                    return None;
                }
                Some(match (what, u.kind()) {
                    (Listing::Models, UpstreamKind::Openai) | (Listing::Tags | Listing::Ps, UpstreamKind::Ollama) => e,
                    (Listing::Models, UpstreamKind::Ollama) => {
                        let created = e
                            .get("modified_at")
                            .and_then(Value::as_str)
                            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                            .map_or(0, |t| t.timestamp().max(0));
                        serde_json::json!({ "id": name, "object": "model", "created": created, "owned_by": u.name() })
                    }
                    (Listing::Tags | Listing::Ps, UpstreamKind::Openai) => {
                        let at = e
                            .get("created")
                            .and_then(Value::as_i64)
                            .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
                            .unwrap_or_default()
                            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
                        serde_json::json!({
                            "name": name, "model": name, "modified_at": at, "size": 0, "digest": "",
                            "details": { "format": "", "family": "", "parameter_size": "", "quantization_level": "" },
                        })
                    }
                })
            })
            .collect::<Vec<_>>()
    });
    futures_util::future::join_all(asks).await.into_iter().flatten().collect()
}

/// `local` (a listing's JSON with its entries under `key`) plus the upstreams' entries whose
/// names it does not have yet.
pub async fn merged_listing(st: &Shared, what: Listing, mut local: Value, key: &str) -> Value {
    if st.providers.upstreams.is_empty() {
        return local;
    }
    let extra = upstream_listing(st, what).await;
    let name_key = if what == Listing::Models { "id" } else { "name" };
    if let Some(list) = local.get_mut(key).and_then(Value::as_array_mut) {
        for e in extra {
            let name = e.get(name_key).cloned();
            if !list.iter().any(|x| x.get(name_key) == name.as_ref()) {
                list.push(e);
            }
        }
    }
    local
}

fn tagged(r: Result<Response, ApiError>, dialect: Dialect, provider: &str) -> Response {
    match r {
        Ok(resp) => with_provider(resp, provider),
        Err(e) => e.into_response_for(dialect),
    }
}

fn with_provider(mut resp: Response, name: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(name) {
        resp.headers_mut().insert("x-zoe-provider", v);
    }
    resp
}

/// How the answer is brought back.
enum Mode {
    /// Same dialect: as framed upstream (NDJSON `lines` or SSE), `model` put back if renamed.
    Pass { sse: bool },
    /// Other dialect: read as `from`, written as the client's shape.
    Translate { from: UpstreamKind, shape: Shape, include_usage: bool },
    /// Embeddings in the other dialect: one object mapped.
    Embeddings { from: UpstreamKind, legacy: bool },
}

fn untranslatable(dialect: Dialect, u: Untranslatable) -> Passed {
    Passed::Answer(ApiError::bad_field(&u.field, u.message).into_response_for(dialect))
}

/// One try of one upstream (its retries inside).
async fn upstream_once(
    ep: Endpoint,
    up: &Upstream,
    sent: &str,
    client_model: &str,
    bytes: &Bytes,
    cut: tokio::sync::watch::Receiver<bool>,
) -> Result<Response, Passed> {
    let dialect = ep.dialect();
    let Ok(mut body) = serde_json::from_slice::<Value>(bytes) else {
        return Err(Passed::Answer(ApiError::bad("invalid JSON in the request body").into_response_for(dialect)));
    };
    let stream = ep.streams(&body);
    let include_usage = body.pointer("/stream_options/include_usage").and_then(Value::as_bool) == Some(true);
    let same = matches!(
        (dialect, up.kind()),
        (Dialect::Ollama, UpstreamKind::Ollama) | (Dialect::OpenAi, UpstreamKind::Openai)
    );
    let (path, mode) = if same {
        if body.get("model").is_some() {
            body["model"] = sent.into();
        } else {
            body["name"] = sent.into();
        }
        (ep.path(), Mode::Pass { sse: dialect == Dialect::OpenAi })
    } else {
        let from = up.kind();
        let translated = match ep {
            Endpoint::OpenAiChat => translate::openai_chat_to_ollama(&body, sent)
                .map(|b| ("/api/chat", b, Mode::Translate { from, shape: Shape::OpenAiChat, include_usage })),
            Endpoint::OpenAiCompletions => translate::openai_completion_to_ollama(&body, sent)
                .map(|b| ("/api/generate", b, Mode::Translate { from, shape: Shape::OpenAiCompletion, include_usage })),
            Endpoint::OpenAiEmbeddings => translate::openai_embeddings_to_ollama(&body, sent)
                .map(|b| ("/api/embed", b, Mode::Embeddings { from, legacy: false })),
            Endpoint::OllamaChat => translate::ollama_chat_to_openai(&body, sent).map(|b| {
                ("/v1/chat/completions", b, Mode::Translate { from, shape: Shape::OllamaChat, include_usage: true })
            }),
            Endpoint::OllamaGenerate => translate::ollama_generate_to_openai(&body, sent)
                .map(|(p, b)| (p, b, Mode::Translate { from, shape: Shape::OllamaGenerate, include_usage: true })),
            Endpoint::OllamaEmbed | Endpoint::OllamaEmbeddings => translate::ollama_embed_to_openai(&body, sent)
                .map(|b| ("/v1/embeddings", b, Mode::Embeddings { from, legacy: ep == Endpoint::OllamaEmbeddings })),
            Endpoint::OllamaShow => {
                return Err(Passed::Next {
                    why: "an OpenAI-compatible upstream has no /api/show".into(),
                    not_found: true,
                })
            }
        };
        match translated {
            Ok((path, b, mode)) => {
                body = b;
                (path, mode)
            }
            Err(u) => return Err(untranslatable(dialect, u)),
        }
    };
    let answer = match up.send(path, &body, stream).await {
        Ok(a) => a,
        Err(e @ SendError::Open(_)) | Err(e @ SendError::Down(_)) => {
            return Err(Passed::Next { why: e.to_string(), not_found: false })
        }
    };
    match answer {
        Answer::Refused { status, body, content_type } => {
            if status == 404 {
                let why = String::from_utf8_lossy(&body).chars().take(200).collect::<String>();
                return Err(Passed::Next { why: format!("HTTP 404 {why}"), not_found: true });
            }
            if matches!(mode, Mode::Pass { .. }) {
                return Err(Passed::Answer(raw(status, body, content_type)));
            }
            // The upstream's message, in the client's shape.
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let msg = v
                .pointer("/error/message")
                .or_else(|| v.get("error"))
                .and_then(Value::as_str)
                .map_or_else(|| String::from_utf8_lossy(&body).into_owned(), str::to_owned);
            let e = ApiError::BadRequest { message: format!("upstream {}: {msg}", up.name()), param: None };
            let mut resp = e.into_response_for(dialect);
            *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
            Err(Passed::Answer(resp))
        }
        Answer::Whole { body, content_type } => Ok(whole(mode, body, content_type, sent, client_model, up.name())),
        Answer::Stream { first, rest, content_type } => {
            Ok(streamed(mode, first, rest, content_type, sent, client_model, up, dialect, cut))
        }
    }
}

fn raw(status: u16, body: Bytes, content_type: Option<String>) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    if let Some(ct) = content_type.and_then(|c| HeaderValue::from_str(&c).ok()) {
        resp.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    resp
}

/// `model` put back to the client's name in one JSON object, where the route renamed it.
fn rename(v: &mut Value, sent: &str, client_model: &str) {
    if sent != client_model {
        if let Some(m) = v.get_mut("model").filter(|m| m.as_str() == Some(sent)) {
            *m = client_model.into();
        }
    }
}

fn whole(
    mode: Mode,
    body: Bytes,
    content_type: Option<String>,
    sent: &str,
    client_model: &str,
    name: &str,
) -> Response {
    let json_ct = Some("application/json; charset=utf-8".to_owned());
    let bad_gateway = |what: &str| {
        ApiError::Internal(format!("upstream {name}: {what}")).into_response_for(Dialect::Ollama).into_response()
    };
    match mode {
        Mode::Pass { .. } => {
            if sent == client_model {
                return raw(200, body, content_type);
            }
            match serde_json::from_slice::<Value>(&body) {
                Ok(mut v) => {
                    rename(&mut v, sent, client_model);
                    raw(200, Bytes::from(v.to_string()), content_type)
                }
                Err(_) => raw(200, body, content_type),
            }
        }
        Mode::Translate { from, shape, .. } => {
            let Ok(v) = serde_json::from_slice::<Value>(&body) else { return bad_gateway("the answer is not JSON") };
            let steps = match from {
                UpstreamKind::Ollama => translate::read_ollama(&v),
                UpstreamKind::Openai => {
                    let mut r = OpenAiReader::default();
                    let mut s = r.read(&v);
                    s.extend(r.finish());
                    s
                }
            };
            let dialect = if matches!(shape, Shape::OllamaChat | Shape::OllamaGenerate) {
                Dialect::Ollama
            } else {
                Dialect::OpenAi
            };
            match Writer::new(shape, client_model, false).whole(steps) {
                Ok(v) => raw(200, Bytes::from(v.to_string()), json_ct),
                Err(e) => ApiError::Internal(format!("upstream {name}: {e}")).into_response_for(dialect),
            }
        }
        Mode::Embeddings { from, legacy } => {
            let Ok(v) = serde_json::from_slice::<Value>(&body) else { return bad_gateway("the answer is not JSON") };
            let out = match from {
                UpstreamKind::Ollama => translate::ollama_embed_to_openai_answer(&v, client_model),
                UpstreamKind::Openai => translate::openai_embed_to_ollama_answer(&v, client_model, legacy),
            };
            raw(200, Bytes::from(out.to_string()), json_ct)
        }
    }
}

/// The streamed answer: pieces forwarded as they come; a broken or stalled upstream ends the
/// stream with an error in the client's dialect.
#[allow(clippy::too_many_arguments)]
fn streamed(
    mode: Mode,
    first: Bytes,
    rest: reqwest::Response,
    content_type: Option<String>,
    sent: &str,
    client_model: &str,
    up: &Upstream,
    dialect: Dialect,
    cut: tokio::sync::watch::Receiver<bool>,
) -> Response {
    let writer = match &mode {
        Mode::Translate { shape, include_usage, .. } => Some(Writer::new(*shape, client_model, *include_usage)),
        _ => None,
    };
    let st = Relay {
        first: Some(first),
        rest,
        framer: Framer::default(),
        writer,
        reader: OpenAiReader::default(),
        mode,
        sent: sent.to_owned(),
        client: client_model.to_owned(),
        idle: up.config.idle_timeout,
        name: up.name().to_owned(),
        dialect,
        done: false,
        cut,
    };
    let ct = match (&st.mode, dialect) {
        (Mode::Pass { .. }, _) => content_type,
        (_, Dialect::Ollama) => Some("application/x-ndjson".to_owned()),
        (_, Dialect::OpenAi) => Some("text/event-stream".to_owned()),
    };
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        if st.done {
            return None;
        }
        let mut out = Vec::new();
        while out.is_empty() && !st.done {
            let chunk = match st.first.take() {
                Some(b) => Ok(Some(b)),
                None => tokio::select! {
                    r = tokio::time::timeout(st.idle, st.rest.chunk()) => match r {
                        Ok(r) => r.map_err(|e| format!("the stream broke off: {e}")),
                        Err(_) => Err(format!("the stream stalled: nothing for {:?}", st.idle)),
                    },
                    _ = super::shutdown::cut(&mut st.cut) => Err(super::shutdown::MESSAGE.to_owned()),
                },
            };
            match chunk {
                Ok(Some(bytes)) => st.feed(&bytes, &mut out),
                Ok(None) => {
                    // The end: a last unterminated line, then the close the upstream owed us.
                    if let Some(last) = st.framer.rest() {
                        let mut with_nl = last;
                        with_nl.push(b'\n');
                        st.feed(&with_nl, &mut out);
                    }
                    if !st.done {
                        match (&st.mode, st.writer.as_mut()) {
                            (Mode::Translate { from: UpstreamKind::Openai, .. }, Some(w)) => {
                                for s in st.reader.finish() {
                                    if w.stream(s, &mut out) {
                                        break;
                                    }
                                }
                            }
                            (Mode::Translate { .. }, Some(w)) => {
                                w.stream(
                                    Step::Error(format!("upstream {}: the stream ended without a final line", st.name)),
                                    &mut out,
                                );
                            }
                            _ => {}
                        }
                        st.done = true;
                    }
                }
                Err(why) => {
                    tracing::warn!(upstream = %st.name, error = %why, "upstream stream failed mid-answer");
                    let msg = format!("upstream {}: {why}", st.name);
                    match st.writer.as_mut() {
                        Some(w) => {
                            w.stream(Step::Error(msg), &mut out);
                        }
                        None => match st.dialect {
                            Dialect::Ollama => {
                                out.extend_from_slice(format!("{}\n", serde_json::json!({ "error": msg })).as_bytes())
                            }
                            Dialect::OpenAi => {
                                let body = ApiError::Internal(msg).body(Dialect::OpenAi);
                                out.extend_from_slice(format!("data: {body}\n\ndata: [DONE]\n\n").as_bytes());
                            }
                        },
                    }
                    st.done = true;
                }
            }
        }
        Some((Ok::<_, std::convert::Infallible>(Bytes::from(out)), st))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    if let Some(ct) = ct.and_then(|c| HeaderValue::from_str(&c).ok()) {
        resp.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    resp
}

/// A streamed upstream answer on its way to the client.
struct Relay {
    first: Option<Bytes>,
    rest: reqwest::Response,
    framer: Framer,
    writer: Option<Writer>,
    reader: OpenAiReader,
    mode: Mode,
    sent: String,
    client: String,
    idle: std::time::Duration,
    name: String,
    dialect: Dialect,
    done: bool,
    cut: tokio::sync::watch::Receiver<bool>,
}

impl Relay {
    /// One upstream piece into client bytes.
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        let Relay { framer, writer, reader, mode, sent, client, done, .. } = self;
        let (sent, client) = (sent.as_str(), client.as_str());
        match mode {
            Mode::Pass { sse: false } => {
                // Whole lines only, so a stream cut mid-line ends with a clean error line.
                for l in framer.lines(bytes) {
                    if sent == client {
                        out.extend_from_slice(&l);
                        out.push(b'\n');
                        continue;
                    }
                    match serde_json::from_slice::<Value>(&l) {
                        Ok(mut v) => {
                            rename(&mut v, sent, client);
                            out.extend_from_slice(v.to_string().as_bytes());
                        }
                        Err(_) => out.extend_from_slice(&l),
                    }
                    out.push(b'\n');
                }
            }
            Mode::Pass { sse: true } => {
                for data in framer.events(bytes) {
                    if sent == client || data == "[DONE]" {
                        out.extend_from_slice(format!("data: {data}\n\n").as_bytes());
                        continue;
                    }
                    match serde_json::from_str::<Value>(&data) {
                        Ok(mut v) => {
                            rename(&mut v, sent, client);
                            out.extend_from_slice(format!("data: {v}\n\n").as_bytes());
                        }
                        Err(_) => out.extend_from_slice(format!("data: {data}\n\n").as_bytes()),
                    }
                }
            }
            Mode::Translate { from, .. } => {
                let Some(w) = writer.as_mut() else { return };
                let steps: Vec<Step> = match from {
                    UpstreamKind::Ollama => framer
                        .lines(bytes)
                        .iter()
                        .flat_map(|l| match serde_json::from_slice::<Value>(l) {
                            Ok(v) => translate::read_ollama(&v),
                            Err(e) => vec![Step::Error(format!("upstream sent a line that is not JSON: {e}"))],
                        })
                        .collect(),
                    UpstreamKind::Openai => framer
                        .events(bytes)
                        .iter()
                        .flat_map(|d| {
                            if d == "[DONE]" {
                                return reader.finish();
                            }
                            match serde_json::from_str::<Value>(d) {
                                Ok(v) => reader.read(&v),
                                Err(e) => vec![Step::Error(format!("upstream sent an event that is not JSON: {e}"))],
                            }
                        })
                        .collect(),
                };
                for s in steps {
                    if w.stream(s, out) {
                        *done = true;
                        return;
                    }
                }
            }
            Mode::Embeddings { .. } => out.extend_from_slice(bytes),
        }
    }
}
