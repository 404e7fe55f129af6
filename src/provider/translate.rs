//! Requests and answers translated between Ollama's API and OpenAI's, for an upstream that
//! speaks the other dialect (an OpenAI client in front of the Pi's Ollama; Zoe's Ollama calls
//! to a vLLM box). Same-dialect requests are passed through untouched instead.
//!
//! Answers go through one neutral form, [`Step`]: a reader per dialect turns the upstream's
//! NDJSON lines or SSE chunks into steps, a writer per dialect turns steps into the client's.

use serde_json::{json, Map, Value};

/// A field the other dialect cannot express: 400 naming it.
#[derive(Debug, PartialEq)]
pub struct Untranslatable {
    pub field: String,
    pub message: String,
}

fn bad(field: &str, message: impl Into<String>) -> Untranslatable {
    Untranslatable { field: field.to_owned(), message: message.into() }
}

/// One tool call, arguments as a JSON value.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    pub id: String,
    pub name: String,
    pub arguments: Value,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    Text(String),
    Calls(Vec<Call>),
    Done { reason: String, prompt_tokens: u64, completion_tokens: u64 },
    Error(String),
}

fn call_id() -> String {
    format!("call_{:016x}", rand::random::<u64>())
}

fn obj(v: &Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Requests: OpenAI → Ollama

/// `/v1/chat/completions` body → `/api/chat` body for `model`.
pub fn openai_chat_to_ollama(req: &Value, model: &str) -> Result<Value, Untranslatable> {
    let mut out = Map::new();
    out.insert("model".into(), model.into());
    let mut messages = Vec::new();
    let mut names_by_id = std::collections::HashMap::new();
    for (i, m) in req.get("messages").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
        let role = if role == "developer" { "system" } else { role };
        let mut msg = Map::new();
        msg.insert("role".into(), role.into());
        let mut text = Vec::new();
        let mut images = Vec::new();
        match m.get("content") {
            Some(Value::String(s)) => text.push(s.clone()),
            Some(Value::Array(parts)) => {
                for (j, p) in parts.iter().enumerate() {
                    match p.get("type").and_then(Value::as_str) {
                        Some("text") => text.push(p.get("text").and_then(Value::as_str).unwrap_or("").to_owned()),
                        Some("image_url") => {
                            let field = format!("messages[{i}].content[{j}].image_url");
                            let url = p.pointer("/image_url/url").and_then(Value::as_str).unwrap_or("");
                            let b64 =
                                url.strip_prefix("data:").and_then(|rest| rest.split_once(";base64,")).map(|(_, d)| d);
                            match b64 {
                                Some(data) => images.push(Value::from(data)),
                                None => {
                                    return Err(bad(
                                        &field,
                                        format!(
                                        "{field}: the upstream Ollama takes images inline: send a data: URL (base64)"
                                    ),
                                    ))
                                }
                            }
                        }
                        other => {
                            let field = format!("messages[{i}].content[{j}].type");
                            return Err(bad(&field, format!("{field} = {other:?}: expected text or image_url")));
                        }
                    }
                }
            }
            _ => {}
        }
        msg.insert("content".into(), text.join("\n").into());
        if !images.is_empty() {
            msg.insert("images".into(), images.into());
        }
        if let Some(calls) = m.get("tool_calls").and_then(Value::as_array) {
            let mut out_calls = Vec::new();
            for c in calls {
                let name = c.pointer("/function/name").and_then(Value::as_str).unwrap_or("").to_owned();
                if let Some(id) = c.get("id").and_then(Value::as_str) {
                    names_by_id.insert(id.to_owned(), name.clone());
                }
                let args = match c.pointer("/function/arguments") {
                    Some(Value::String(s)) => serde_json::from_str(s).unwrap_or_else(|_| json!({})),
                    Some(v @ Value::Object(_)) => v.clone(),
                    _ => json!({}),
                };
                out_calls.push(json!({ "function": { "name": name, "arguments": args } }));
            }
            msg.insert("tool_calls".into(), out_calls.into());
        }
        if role == "tool" {
            let name =
                m.get("name").and_then(Value::as_str).map(str::to_owned).or_else(|| {
                    m.get("tool_call_id").and_then(Value::as_str).and_then(|id| names_by_id.get(id).cloned())
                });
            if let Some(name) = name {
                msg.insert("tool_name".into(), name.into());
            }
        }
        messages.push(Value::Object(msg));
    }
    out.insert("messages".into(), messages.into());
    if let Some(tools) = req.get("tools") {
        out.insert("tools".into(), tools.clone());
    }
    if let Some(choice) = req.get("tool_choice") {
        // zoe-llm's Ollama extension; a real Ollama ignores it.
        out.insert("tool_choice".into(), choice.clone());
    }
    match req.pointer("/response_format/type").and_then(Value::as_str) {
        Some("json_object") => {
            out.insert("format".into(), "json".into());
        }
        Some("json_schema") => {
            let schema = req.pointer("/response_format/json_schema/schema").cloned().unwrap_or_else(|| json!({}));
            out.insert("format".into(), schema);
        }
        _ => {}
    }
    common_openai(req, &mut out, "max_completion_tokens")?;
    Ok(Value::Object(out))
}

/// `/v1/completions` body → `/api/generate` body for `model`.
pub fn openai_completion_to_ollama(req: &Value, model: &str) -> Result<Value, Untranslatable> {
    let prompt = match req.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => a[0].as_str().unwrap_or("").to_owned(),
        _ => return Err(bad("prompt", "prompt: the upstream Ollama takes one prompt string")),
    };
    if req.get("echo").and_then(Value::as_bool) == Some(true) {
        return Err(bad("echo", "echo: not supported by an upstream Ollama"));
    }
    let mut out = Map::new();
    out.insert("model".into(), model.into());
    out.insert("prompt".into(), prompt.into());
    // OpenAI completions continue the text as given: no chat template.
    out.insert("raw".into(), true.into());
    if let Some(s) = req.get("suffix").filter(|s| s.is_string()) {
        out.insert("suffix".into(), s.clone());
    }
    common_openai(req, &mut out, "max_tokens")?;
    // OpenAI's completions default to 16 tokens.
    if out.get("options").and_then(|o| o.get("num_predict")).is_none() {
        out.entry("options").or_insert_with(|| json!({}))["num_predict"] = 16.into();
    }
    Ok(Value::Object(out))
}

/// `/v1/embeddings` body → `/api/embed` body.
pub fn openai_embeddings_to_ollama(req: &Value, model: &str) -> Result<Value, Untranslatable> {
    match req.get("input") {
        Some(v @ Value::String(_)) => Ok(json!({ "model": model, "input": v })),
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => Ok(json!({ "model": model, "input": a })),
        _ => Err(bad("input", "input: the upstream Ollama takes a string or a list of strings")),
    }
}

/// Sampling fields with the same meaning in both dialects: (OpenAI/vLLM name, Ollama `options` name).
const SAMPLING: &[(&str, &str)] = &[
    ("temperature", "temperature"),
    ("top_p", "top_p"),
    ("top_k", "top_k"),
    ("min_p", "min_p"),
    ("seed", "seed"),
    ("presence_penalty", "presence_penalty"),
    ("frequency_penalty", "frequency_penalty"),
    ("repetition_penalty", "repeat_penalty"),
];

/// The image pixel budget: vLLM's `mm_processor_kwargs` keys, which zoe-llm's Ollama dialect
/// takes in `options` under the same names (a real Ollama ignores them).
const PIXELS: &[&str] = &["min_pixels", "max_pixels"];

/// Sampling, limits and streaming shared by chat and completions.
fn common_openai(req: &Value, out: &mut Map<String, Value>, max_key: &str) -> Result<(), Untranslatable> {
    if req.get("n").and_then(Value::as_u64).is_some_and(|n| n > 1) {
        return Err(bad("n", "n: an upstream Ollama gives one choice per request"));
    }
    if req.get("logprobs").is_some_and(|v| v.as_bool() == Some(true) || v.as_u64().is_some_and(|n| n > 0)) {
        return Err(bad("logprobs", "logprobs: not translated for an upstream Ollama"));
    }
    let mut options = Map::new();
    for &(from, to) in SAMPLING {
        if let Some(v) = req.get(from).filter(|v| !v.is_null()) {
            options.insert(to.into(), v.clone());
        }
    }
    if let Some(kwargs) = req.get("mm_processor_kwargs") {
        for &k in PIXELS {
            if let Some(v) = kwargs.get(k).filter(|v| !v.is_null()) {
                options.insert(k.into(), v.clone());
            }
        }
    }
    if let Some(max) = req.get(max_key).or_else(|| req.get("max_tokens")).filter(|v| !v.is_null()) {
        options.insert("num_predict".into(), max.clone());
    }
    match req.get("stop") {
        Some(Value::String(s)) => {
            options.insert("stop".into(), json!([s]));
        }
        Some(v @ Value::Array(_)) => {
            options.insert("stop".into(), v.clone());
        }
        _ => {}
    }
    if !options.is_empty() {
        out.insert("options".into(), options.into());
    }
    out.insert("stream".into(), req.get("stream").and_then(Value::as_bool).unwrap_or(false).into());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Requests: Ollama → OpenAI

/// `/api/chat` body → `/v1/chat/completions` body for `model`.
pub fn ollama_chat_to_openai(req: &Value, model: &str) -> Result<Value, Untranslatable> {
    if req.get("logprobs").and_then(Value::as_bool) == Some(true) {
        return Err(bad("logprobs", "logprobs: not translated for an OpenAI-compatible upstream"));
    }
    let mut messages = Vec::new();
    // Ollama messages carry no call ids; OpenAI servers want a tool result to name its call.
    let mut open_calls: Vec<(String, String)> = Vec::new();
    for m in req.get("messages").and_then(Value::as_array).into_iter().flatten() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
        let text = m.get("content").and_then(Value::as_str).unwrap_or("");
        let images: Vec<&str> =
            m.get("images").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
        let content = if images.is_empty() {
            Value::from(text)
        } else {
            let mut parts: Vec<Value> = images
                .iter()
                .map(|b64| json!({ "type": "image_url", "image_url": { "url": format!("data:{};base64,{b64}", mime_of(b64)) } }))
                .collect();
            parts.push(json!({ "type": "text", "text": text }));
            parts.into()
        };
        let mut msg = json!({ "role": role, "content": content });
        if let Some(calls) = m.get("tool_calls").and_then(Value::as_array) {
            let calls: Vec<Value> = calls
                .iter()
                .map(|c| {
                    let id = call_id();
                    let name = c.pointer("/function/name").and_then(Value::as_str).unwrap_or("").to_owned();
                    open_calls.push((id.clone(), name.clone()));
                    let args = c.pointer("/function/arguments").cloned().unwrap_or_else(|| json!({}));
                    let args = if let Value::String(s) = args { s } else { args.to_string() };
                    json!({ "id": id, "type": "function", "function": { "name": name, "arguments": args } })
                })
                .collect();
            msg["tool_calls"] = calls.into();
        }
        if role == "tool" {
            let name = m.get("tool_name").or_else(|| m.get("name")).and_then(Value::as_str);
            let pos = match name {
                Some(n) => open_calls.iter().position(|(_, cn)| cn == n),
                None => (!open_calls.is_empty()).then_some(0),
            };
            if let Some(p) = pos {
                let (id, _) = open_calls.remove(p);
                msg["tool_call_id"] = id.into();
            }
        }
        messages.push(msg);
    }
    let mut out = json!({ "model": model, "messages": messages });
    if let Some(tools) = req.get("tools") {
        out["tools"] = tools.clone();
    }
    if let Some(choice) = req.get("tool_choice") {
        out["tool_choice"] = choice.clone();
    }
    match req.get("format") {
        Some(Value::String(s)) if s == "json" => out["response_format"] = json!({ "type": "json_object" }),
        Some(schema @ Value::Object(_)) => {
            out["response_format"] =
                json!({ "type": "json_schema", "json_schema": { "name": "output", "schema": schema } })
        }
        _ => {}
    }
    common_ollama(req, &mut out);
    Ok(out)
}

/// `/api/generate` body → `/v1/chat/completions` (a system and a user message), or
/// `/v1/completions` for `raw` prompts; returns the path with the body.
pub fn ollama_generate_to_openai(req: &Value, model: &str) -> Result<(&'static str, Value), Untranslatable> {
    for field in ["template", "context"] {
        if req.get(field).is_some_and(|v| !v.is_null()) {
            return Err(bad(field, format!("{field}: not supported by an upstream OpenAI-compatible server")));
        }
    }
    let prompt = req.get("prompt").and_then(Value::as_str).unwrap_or("");
    if req.get("raw").and_then(Value::as_bool) == Some(true) {
        let mut out = json!({ "model": model, "prompt": prompt });
        common_ollama(req, &mut out);
        return Ok(("/v1/completions", out));
    }
    let mut messages = Vec::new();
    if let Some(system) = req.get("system").and_then(Value::as_str) {
        messages.push(json!({ "role": "system", "content": system }));
    }
    let mut user = json!({ "role": "user", "content": prompt });
    if let Some(images) = req.get("images") {
        user["images"] = images.clone();
    }
    messages.push(user);
    let mut chat = obj(req);
    chat.insert("messages".into(), messages.into());
    Ok(("/v1/chat/completions", ollama_chat_to_openai(&Value::Object(chat), model)?))
}

/// `/api/embed` (or the older `/api/embeddings`, `prompt`) body → `/v1/embeddings`.
pub fn ollama_embed_to_openai(req: &Value, model: &str) -> Result<Value, Untranslatable> {
    let input = req.get("input").or_else(|| req.get("prompt")).cloned().unwrap_or(Value::Null);
    if !(input.is_string() || input.as_array().is_some_and(|a| a.iter().all(Value::is_string))) {
        return Err(bad("input", "input: a string or a list of strings"));
    }
    Ok(json!({ "model": model, "input": input }))
}

fn common_ollama(req: &Value, out: &mut Value) {
    let o = req.get("options").cloned().unwrap_or_else(|| json!({}));
    // Ollama's `stop` is always a list, which OpenAI takes as is.
    for &(to, from) in SAMPLING.iter().chain(&[("stop", "stop")]) {
        if let Some(v) = o.get(from).filter(|v| !v.is_null()) {
            out[to] = v.clone();
        }
    }
    for &k in PIXELS {
        if let Some(v) = o.get(k).filter(|v| !v.is_null()) {
            out["mm_processor_kwargs"][k] = v.clone();
        }
    }
    // -1 / -2: until a stop or the context is full, which is OpenAI's default.
    if let Some(n) = o.get("num_predict").and_then(Value::as_i64).filter(|&n| n >= 0) {
        out["max_tokens"] = n.into();
    }
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(true);
    out["stream"] = stream.into();
    if stream {
        out["stream_options"] = json!({ "include_usage": true });
    }
}

/// The image type from base64 magic (OpenAI data URLs name it).
fn mime_of(b64: &str) -> &'static str {
    match b64.get(..4) {
        Some("iVBO") => "image/png",
        Some("/9j/") => "image/jpeg",
        Some("UklG") => "image/webp",
        Some("R0lG") => "image/gif",
        _ => "image/jpeg",
    }
}

// ---------------------------------------------------------------------------------------------
// Answers: readers

/// Steps from one Ollama NDJSON line (or a whole non-streamed object).
pub fn read_ollama(line: &Value) -> Vec<Step> {
    if let Some(e) = line.get("error") {
        return vec![Step::Error(e.as_str().map_or_else(|| e.to_string(), str::to_owned))];
    }
    let mut steps = Vec::new();
    let text = line.pointer("/message/content").or_else(|| line.get("response")).and_then(Value::as_str).unwrap_or("");
    if !text.is_empty() {
        steps.push(Step::Text(text.to_owned()));
    }
    if let Some(calls) = line.pointer("/message/tool_calls").and_then(Value::as_array).filter(|c| !c.is_empty()) {
        steps.push(Step::Calls(
            calls
                .iter()
                .map(|c| Call {
                    id: c.get("id").and_then(Value::as_str).map_or_else(call_id, str::to_owned),
                    name: c.pointer("/function/name").and_then(Value::as_str).unwrap_or("").to_owned(),
                    arguments: c.pointer("/function/arguments").cloned().unwrap_or_else(|| json!({})),
                })
                .collect(),
        ));
    }
    if line.get("done").and_then(Value::as_bool) == Some(true) {
        steps.push(Step::Done {
            reason: line.get("done_reason").and_then(Value::as_str).unwrap_or("stop").to_owned(),
            prompt_tokens: line.get("prompt_eval_count").and_then(Value::as_u64).unwrap_or(0),
            completion_tokens: line.get("eval_count").and_then(Value::as_u64).unwrap_or(0),
        });
    }
    steps
}

/// Steps from OpenAI chunks (streamed) or a whole completion: tool-call deltas are gathered
/// until the finish, usage (a later chunk when streaming) until the end.
#[derive(Default)]
pub struct OpenAiReader {
    calls: Vec<(String, String, String)>,
    reason: Option<String>,
    usage: (u64, u64),
}

impl OpenAiReader {
    pub fn read(&mut self, v: &Value) -> Vec<Step> {
        if let Some(e) = v.get("error") {
            let msg = e.get("message").and_then(Value::as_str).map_or_else(|| e.to_string(), str::to_owned);
            return vec![Step::Error(msg)];
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            self.usage = (
                u.get("prompt_tokens").and_then(Value::as_u64).unwrap_or(0),
                u.get("completion_tokens").and_then(Value::as_u64).unwrap_or(0),
            );
        }
        let mut steps = Vec::new();
        let Some(choice) = v.get("choices").and_then(Value::as_array).and_then(|c| c.first()) else { return steps };
        // `delta` when streamed, `message` in a whole completion, `text` from /v1/completions.
        let part = choice.get("delta").or_else(|| choice.get("message"));
        let text = part.and_then(|p| p.get("content")).or_else(|| choice.get("text")).and_then(Value::as_str);
        if let Some(t) = text.filter(|t| !t.is_empty()) {
            steps.push(Step::Text(t.to_owned()));
        }
        for c in part.and_then(|p| p.get("tool_calls")).and_then(Value::as_array).into_iter().flatten() {
            let i = c.get("index").and_then(Value::as_u64).map_or(self.calls.len(), |i| i as usize);
            if i >= self.calls.len() {
                self.calls.resize(i + 1, Default::default());
            }
            let slot = &mut self.calls[i];
            if let Some(id) = c.get("id").and_then(Value::as_str) {
                slot.0 = id.to_owned();
            }
            if let Some(n) = c.pointer("/function/name").and_then(Value::as_str) {
                slot.1.push_str(n);
            }
            match c.pointer("/function/arguments") {
                Some(Value::String(a)) => slot.2.push_str(a),
                Some(v @ Value::Object(_)) => slot.2 = v.to_string(),
                _ => {}
            }
        }
        if let Some(r) = choice.get("finish_reason").and_then(Value::as_str) {
            self.reason = Some(r.to_owned());
            steps.extend(self.take_calls());
        }
        steps
    }

    fn take_calls(&mut self) -> Option<Step> {
        let calls: Vec<Call> = std::mem::take(&mut self.calls)
            .into_iter()
            .filter(|(_, name, _)| !name.is_empty())
            .map(|(id, name, args)| Call {
                id: if id.is_empty() { call_id() } else { id },
                name,
                arguments: serde_json::from_str(&args).unwrap_or(Value::String(args)),
            })
            .collect();
        (!calls.is_empty()).then_some(Step::Calls(calls))
    }

    /// The end of the answer: the final step.
    pub fn finish(&mut self) -> Vec<Step> {
        let mut steps: Vec<Step> = self.take_calls().into_iter().collect();
        let reason = match self.reason.take().as_deref() {
            Some("length") => "length",
            _ => "stop",
        };
        steps.push(Step::Done { reason: reason.into(), prompt_tokens: self.usage.0, completion_tokens: self.usage.1 });
        steps
    }
}

// ---------------------------------------------------------------------------------------------
// Answers: writers

/// The client's endpoint, which decides the shape a writer produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    OllamaChat,
    OllamaGenerate,
    OpenAiChat,
    OpenAiCompletion,
}

/// Steps → the client's dialect, streamed (NDJSON lines, SSE events) or gathered into one object.
pub struct Writer {
    shape: Shape,
    model: String,
    id: String,
    created: u64,
    start: std::time::Instant,
    include_usage: bool,
    role_sent: bool,
    calls_sent: usize,
    text: String,
    calls: Vec<Call>,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn created_at() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

fn sse(out: &mut Vec<u8>, v: &Value) {
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(v.to_string().as_bytes());
    out.extend_from_slice(b"\n\n");
}

fn line(out: &mut Vec<u8>, v: &Value) {
    out.extend_from_slice(v.to_string().as_bytes());
    out.push(b'\n');
}

impl Writer {
    pub fn new(shape: Shape, model: &str, include_usage: bool) -> Self {
        let prefix = if shape == Shape::OpenAiChat { "chatcmpl" } else { "cmpl" };
        Self {
            shape,
            model: model.to_owned(),
            id: format!("{prefix}-{:032x}", rand::random::<u128>()),
            created: now_secs(),
            start: std::time::Instant::now(),
            include_usage,
            role_sent: false,
            calls_sent: 0,
            text: String::new(),
            calls: Vec::new(),
        }
    }

    fn openai_calls(calls: &[Call], first_index: usize, streamed: bool) -> Value {
        calls
            .iter()
            .enumerate()
            .map(|(k, c)| {
                let args = if let Value::String(s) = &c.arguments { s.clone() } else { c.arguments.to_string() };
                let mut v =
                    json!({ "id": c.id, "type": "function", "function": { "name": c.name, "arguments": args } });
                if streamed {
                    v["index"] = (first_index + k).into();
                }
                v
            })
            .collect::<Vec<_>>()
            .into()
    }

    fn ollama_calls(calls: &[Call]) -> Value {
        calls
            .iter()
            .map(|c| json!({ "function": { "name": c.name, "arguments": c.arguments } }))
            .collect::<Vec<_>>()
            .into()
    }

    fn chunk(&self, choice: Value) -> Value {
        let object = if self.shape == Shape::OpenAiChat { "chat.completion.chunk" } else { "text_completion" };
        json!({ "id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [choice] })
    }

    /// One step as streamed bytes; true when the stream is over.
    pub fn stream(&mut self, step: Step, out: &mut Vec<u8>) -> bool {
        match self.shape {
            Shape::OllamaChat | Shape::OllamaGenerate => self.stream_ollama(step, out),
            Shape::OpenAiChat | Shape::OpenAiCompletion => self.stream_openai(step, out),
        }
    }

    fn stream_ollama(&mut self, step: Step, out: &mut Vec<u8>) -> bool {
        let chat = self.shape == Shape::OllamaChat;
        let base = |extra: Value| {
            let mut v = json!({ "model": self.model, "created_at": created_at() });
            if let (Value::Object(m), Value::Object(e)) = (&mut v, extra) {
                m.extend(e);
            }
            v
        };
        match step {
            Step::Text(t) if chat => {
                line(out, &base(json!({ "message": { "role": "assistant", "content": t }, "done": false })))
            }
            Step::Text(t) => line(out, &base(json!({ "response": t, "done": false }))),
            Step::Calls(calls) if chat => line(
                out,
                &base(
                    json!({ "message": { "role": "assistant", "content": "", "tool_calls": Self::ollama_calls(&calls) }, "done": false }),
                ),
            ),
            // /api/generate has no tool calls: their JSON as text.
            Step::Calls(calls) => {
                line(out, &base(json!({ "response": Self::ollama_calls(&calls).to_string(), "done": false })))
            }
            Step::Done { reason, prompt_tokens, completion_tokens } => {
                let total = self.start.elapsed().as_nanos() as u64;
                let mut v = base(json!({
                    "done": true, "done_reason": reason, "total_duration": total,
                    "prompt_eval_count": prompt_tokens, "eval_count": completion_tokens,
                }));
                if chat {
                    v["message"] = json!({ "role": "assistant", "content": "" });
                } else {
                    v["response"] = "".into();
                }
                line(out, &v);
                return true;
            }
            Step::Error(e) => {
                line(out, &json!({ "error": e }));
                return true;
            }
        }
        false
    }

    fn stream_openai(&mut self, step: Step, out: &mut Vec<u8>) -> bool {
        let chat = self.shape == Shape::OpenAiChat;
        if chat && !self.role_sent && !matches!(step, Step::Error(_)) {
            self.role_sent = true;
            sse(
                out,
                &self.chunk(
                    json!({ "index": 0, "delta": { "role": "assistant", "content": "" }, "finish_reason": null }),
                ),
            );
        }
        match step {
            Step::Text(t) if chat => {
                sse(out, &self.chunk(json!({ "index": 0, "delta": { "content": t }, "finish_reason": null })))
            }
            Step::Text(t) => {
                sse(out, &self.chunk(json!({ "index": 0, "text": t, "logprobs": null, "finish_reason": null })))
            }
            Step::Calls(calls) if chat => {
                let delta = json!({ "tool_calls": Self::openai_calls(&calls, self.calls_sent, true) });
                self.calls_sent += calls.len();
                sse(out, &self.chunk(json!({ "index": 0, "delta": delta, "finish_reason": null })));
            }
            Step::Calls(calls) => {
                let text = Self::ollama_calls(&calls).to_string();
                sse(out, &self.chunk(json!({ "index": 0, "text": text, "logprobs": null, "finish_reason": null })));
            }
            Step::Done { reason, prompt_tokens, completion_tokens } => {
                let reason = if self.calls_sent > 0 && reason == "stop" { "tool_calls".to_owned() } else { reason };
                let finish = if chat {
                    json!({ "index": 0, "delta": {}, "finish_reason": reason })
                } else {
                    json!({ "index": 0, "text": "", "logprobs": null, "finish_reason": reason })
                };
                sse(out, &self.chunk(finish));
                if self.include_usage {
                    let mut u = self.chunk(Value::Null);
                    u["choices"] = json!([]);
                    u["usage"] = usage(prompt_tokens, completion_tokens);
                    sse(out, &u);
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
                return true;
            }
            Step::Error(e) => {
                sse(
                    out,
                    &json!({ "error": { "message": e, "type": "InternalServerError", "param": null, "code": 502 } }),
                );
                out.extend_from_slice(b"data: [DONE]\n\n");
                return true;
            }
        }
        false
    }

    /// Gathers a non-streamed answer's steps into the client's single object; `Err` for an error step.
    pub fn whole(mut self, steps: Vec<Step>) -> Result<Value, String> {
        let (mut reason, mut pt, mut ct) = ("stop".to_owned(), 0, 0);
        for s in steps {
            match s {
                Step::Text(t) => self.text.push_str(&t),
                Step::Calls(c) => self.calls.extend(c),
                Step::Done { reason: r, prompt_tokens, completion_tokens } => {
                    (reason, pt, ct) = (r, prompt_tokens, completion_tokens)
                }
                Step::Error(e) => return Err(e),
            }
        }
        Ok(match self.shape {
            Shape::OllamaChat | Shape::OllamaGenerate => {
                let mut v = json!({
                    "model": self.model, "created_at": created_at(), "done": true, "done_reason": reason,
                    "total_duration": self.start.elapsed().as_nanos() as u64,
                    "prompt_eval_count": pt, "eval_count": ct,
                });
                if self.shape == Shape::OllamaChat {
                    let mut m = json!({ "role": "assistant", "content": self.text });
                    if !self.calls.is_empty() {
                        m["tool_calls"] = Self::ollama_calls(&self.calls);
                    }
                    v["message"] = m;
                } else {
                    v["response"] = self.text.into();
                }
                v
            }
            Shape::OpenAiChat => {
                let calls = !self.calls.is_empty();
                let mut m = json!({ "role": "assistant", "content": if calls && self.text.is_empty() { Value::Null } else { self.text.into() } });
                if calls {
                    m["tool_calls"] = Self::openai_calls(&self.calls, 0, false);
                    if reason == "stop" {
                        reason = "tool_calls".into();
                    }
                }
                json!({
                    "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                    "choices": [{ "index": 0, "message": m, "logprobs": null, "finish_reason": reason }],
                    "usage": usage(pt, ct),
                })
            }
            Shape::OpenAiCompletion => json!({
                "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{ "index": 0, "text": self.text, "logprobs": null, "finish_reason": reason }],
                "usage": usage(pt, ct),
            }),
        })
    }
}

fn usage(prompt: u64, completion: u64) -> Value {
    json!({ "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion })
}

/// Ollama `/api/embed` answer → OpenAI's embeddings list.
pub fn ollama_embed_to_openai_answer(v: &Value, model: &str) -> Value {
    let data: Vec<Value> = v
        .get("embeddings")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, e)| json!({ "object": "embedding", "index": i, "embedding": e }))
        .collect();
    let n = v.get("prompt_eval_count").and_then(Value::as_u64).unwrap_or(0);
    json!({ "object": "list", "data": data, "model": model, "usage": { "prompt_tokens": n, "total_tokens": n } })
}

/// OpenAI embeddings answer → Ollama `/api/embed` (or `/api/embeddings`: one `embedding`).
pub fn openai_embed_to_ollama_answer(v: &Value, model: &str, legacy: bool) -> Value {
    let mut rows: Vec<(u64, Value)> = v
        .get("data")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|d| (d.get("index").and_then(Value::as_u64).unwrap_or(0), d.get("embedding").cloned().unwrap_or_default()))
        .collect();
    rows.sort_by_key(|(i, _)| *i);
    if legacy {
        return json!({ "embedding": rows.into_iter().next().map(|(_, e)| e).unwrap_or_else(|| json!([])) });
    }
    let n = v.pointer("/usage/prompt_tokens").and_then(Value::as_u64).unwrap_or(0);
    json!({ "model": model, "embeddings": rows.into_iter().map(|(_, e)| e).collect::<Vec<_>>(), "prompt_eval_count": n })
}

// ---------------------------------------------------------------------------------------------
// Framing

/// Splits a byte stream into complete NDJSON lines or SSE `data:` payloads.
#[derive(Default)]
pub struct Framer {
    buf: Vec<u8>,
}

impl Framer {
    /// Complete NDJSON lines in `chunk` (and before it), without their newline.
    pub fn lines(&mut self, chunk: &[u8]) -> Vec<Vec<u8>> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
            let l: Vec<u8> = self.buf.drain(..=i).collect();
            let l = l[..l.len() - 1].strip_suffix(b"\r").unwrap_or(&l[..l.len() - 1]).to_vec();
            if !l.iter().all(u8::is_ascii_whitespace) {
                out.push(l);
            }
        }
        out
    }

    /// What is left once the stream ended (a last line without its newline).
    pub fn rest(&mut self) -> Option<Vec<u8>> {
        let rest = std::mem::take(&mut self.buf);
        (!rest.iter().all(u8::is_ascii_whitespace)).then_some(rest)
    }

    /// Complete SSE events' `data` payloads in `chunk` (and before it).
    pub fn events(&mut self, chunk: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        for l in self.lines(chunk) {
            let l = String::from_utf8_lossy(&l);
            if let Some(data) = l.strip_prefix("data:") {
                out.push(data.trim_start().to_owned());
            }
        }
        out
    }
}

#[cfg(test)]
#[path = "translate_tests.rs"]
mod tests;
