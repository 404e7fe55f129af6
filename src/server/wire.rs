//! Wire pieces both dialects share: flexible JSON shapes, keep-alive durations, model lookup,
//! image checks, timestamps.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::engines::KeepAlive;
use super::error::ApiError;
use super::AppState;
use crate::chat::tools::{ToolChoice, ToolSet};
use crate::engine::generate::TokenLogprobs;
use crate::engine::grammar::OutputFormat;
use crate::hub::{Manifest, Role};
use crate::model::tokenizer::Tokenizer;
use serde_json::Value;

/// A string or a list of strings (`stop`, embedding `input`).
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// Ollama's `keep_alive`: a number of seconds or a Go duration string (`"5m"`, `"-1"` is not a
/// duration but `-1` is a number).
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(untagged)]
pub enum KeepAliveWire {
    Seconds(f64),
    Duration(String),
}

impl KeepAliveWire {
    /// Negative = forever (`None`).
    pub fn parse(&self) -> Result<KeepAlive, ApiError> {
        let secs = match self {
            Self::Seconds(s) => *s,
            Self::Duration(s) => parse_go_duration(s).ok_or_else(|| {
                ApiError::bad_field(
                    "keep_alive",
                    format!("keep_alive: time: invalid duration \"{s}\" (use a number of seconds or a duration such as \"5m\", \"1h30m\", \"-1m\")"),
                )
            })?,
        };
        if !secs.is_finite() {
            return Err(ApiError::bad_field("keep_alive", "keep_alive must be a finite number of seconds"));
        }
        if secs < 0.0 {
            return Ok(None);
        }
        Ok(Some(Duration::from_secs_f64(secs.min(1e10))))
    }
}

/// Go's `time.ParseDuration` in seconds: `[-+]?(<number><unit>)+` with units ns, us, µs, ms, s,
/// m, h, or a bare `0`.
pub fn parse_go_duration(s: &str) -> Option<f64> {
    let (neg, mut rest) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Some(0.0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total = 0.0;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let value: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += value * scale;
    }
    Some(if neg { -total } else { total })
}

/// The manifest `name` resolves to (404 in the dialect's words otherwise).
pub fn resolve<'a>(state: &'a AppState, name: &str) -> Result<&'a Manifest, ApiError> {
    if name.trim().is_empty() {
        return Err(ApiError::bad_field("model", "model is required"));
    }
    state.registry.get(name).ok_or_else(|| ApiError::ModelNotFound { model: name.to_owned() })
}

/// Decodes base64 images (standard alphabet, padded, as Go's `[]byte`); the error names the
/// field. Models without the vision role refuse images.
pub fn check_images(m: &Manifest, field: &str, images: &[String]) -> Result<Vec<Vec<u8>>, ApiError> {
    let mut out = Vec::with_capacity(images.len());
    for (i, b64) in images.iter().enumerate() {
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64.trim()).map_err(|e| {
            let hint = if b64.starts_with("data:") { " (send plain base64, without a data: URL prefix)" } else { "" };
            ApiError::bad_field(&format!("{field}[{i}]"), format!("{field}[{i}] is not valid base64: {e}{hint}"))
        })?;
        out.push(bytes);
    }
    if !out.is_empty() {
        require_vision(m, field)?;
    }
    Ok(out)
}

/// Models without the vision role refuse images (before anything is decoded or fetched).
pub fn require_vision(m: &Manifest, field: &str) -> Result<(), ApiError> {
    if m.has_role(Role::Vision) {
        return Ok(());
    }
    Err(ApiError::bad_field(field, format!("model '{}' does not support vision: it cannot take images", m.id)))
}

/// Validates `tools` and `tool_choice` (OpenAI's rules, which Ollama's `tools` follow too):
/// every tool is `{"type": "function", "function": {"name", "parameters"?}}` with a unique
/// name; `tool_choice` is `"none"`, `"auto"` (the default with tools), `"required"` or
/// `{"type": "function", "function": {"name"}}` naming an offered tool. `None`: no tools in
/// play (none given, or `"none"`). Tools on a model without the tools role: Ollama's
/// capability error.
pub fn tool_set(m: &Manifest, tools: Option<&[Value]>, choice: Option<&Value>) -> Result<Option<ToolSet>, ApiError> {
    let choice = choice.filter(|c| !c.is_null());
    let tools = match tools {
        Some(t) if !t.is_empty() => t,
        _ => {
            return match choice {
                // vLLM: "required" (or "none") with an empty list means no tools.
                Some(Value::String(s)) if tools.is_some() && (s == "required" || s == "none") => Ok(None),
                Some(Value::String(s)) if s == "none" => Ok(None),
                Some(_) => Err(ApiError::bad_field("tool_choice", "When using `tool_choice`, `tools` must be set.")),
                None => Ok(None),
            };
        }
    };
    if !m.has_role(Role::Tools) {
        return Err(ApiError::bad_field("tools", format!("{} does not support tools", m.id)));
    }
    let mut names: Vec<&str> = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        let field = |f: &str| format!("tools[{i}]{f}");
        if let Some(kind) = t.get("type").filter(|k| !k.is_null()) {
            if kind != "function" {
                return Err(ApiError::bad_field(
                    &field(".type"),
                    format!("{} = {kind}: the only supported tool type is \"function\"", field(".type")),
                ));
            }
        }
        let Some(f) = t.get("function").filter(|f| f.is_object()) else {
            return Err(ApiError::bad_field(&field(".function"), format!("{} must be an object", field(".function"))));
        };
        let name = match f.get("name") {
            Some(Value::String(n)) if !n.trim().is_empty() => n.as_str(),
            _ => {
                return Err(ApiError::bad_field(
                    &field(".function.name"),
                    format!("{} is required: a non-empty string", field(".function.name")),
                ))
            }
        };
        if names.contains(&name) {
            return Err(ApiError::bad_field(
                &field(".function.name"),
                format!("{} = {name:?} is offered twice: tool names must be unique", field(".function.name")),
            ));
        }
        names.push(name);
        if f.get("parameters").is_some_and(|p| !p.is_object() && !p.is_null()) {
            return Err(ApiError::bad_field(
                &field(".function.parameters"),
                format!("{} must be a JSON Schema object", field(".function.parameters")),
            ));
        }
        if let Some(t) = f.pointer("/parameters/type").filter(|t| *t != "object") {
            return Err(ApiError::bad_field(
                &field(".function.parameters.type"),
                format!("{} = {t}: a tool's arguments are an object", field(".function.parameters.type")),
            ));
        }
    }
    let choice = match choice {
        None => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => return Ok(None),
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => return Err(bad_choice(&format!("{other:?}"))),
        },
        Some(v @ Value::Object(o)) => {
            let name = o.get("function").and_then(|f| f.get("name")).and_then(Value::as_str);
            match (o.get("type").and_then(Value::as_str), name) {
                (Some("function"), Some(n)) if names.contains(&n) => ToolChoice::Named(n.to_owned()),
                (Some("function"), Some(n)) => {
                    return Err(ApiError::bad_field(
                        "tool_choice.function.name",
                        format!("tool_choice names {n:?}, which is not among the tools offered ({})", names.join(", ")),
                    ))
                }
                _ => return Err(bad_choice(&v.to_string())),
            }
        }
        Some(v) => return Err(bad_choice(&v.to_string())),
    };
    Ok(Some(ToolSet { tools: tools.to_vec(), choice }))
}

fn bad_choice(got: &str) -> ApiError {
    ApiError::bad_field(
        "tool_choice",
        format!(
            "tool_choice = {got} is invalid: use \"none\", \"auto\", \"required\" or \
             {{\"type\": \"function\", \"function\": {{\"name\": …}}}}"
        ),
    )
}

/// Ollama `format`: `"json"` (JSON mode) or a JSON Schema object; absent, null or `""` is free
/// text.
pub fn ollama_format(format: Option<&Value>) -> Result<Option<OutputFormat>, ApiError> {
    match format {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) if s == "json" => Ok(Some(OutputFormat::JsonObject)),
        Some(Value::Object(_)) => Ok(Some(OutputFormat::JsonSchema(format.cloned().expect("matched")))),
        Some(other) => Err(ApiError::bad_field(
            "format",
            format!("format = {other} is invalid: use \"json\" or a JSON Schema object"),
        )),
    }
}

/// OpenAI `response_format`: `{"type": "text"}`, `{"type": "json_object"}`, or
/// `{"type": "json_schema", "json_schema": {"name", "schema", "strict"?}}`.
pub fn response_format(rf: Option<&Value>) -> Result<Option<OutputFormat>, ApiError> {
    let Some(rf) = rf.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    match rf.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(OutputFormat::JsonObject)),
        Some("json_schema") => match rf.pointer("/json_schema/schema") {
            Some(s @ Value::Object(_)) => Ok(Some(OutputFormat::JsonSchema(s.clone()))),
            _ => Err(ApiError::bad_field(
                "response_format.json_schema.schema",
                "response_format.json_schema.schema is required: a JSON Schema object",
            )),
        },
        _ => Err(ApiError::bad_field(
            "response_format.type",
            format!(
                "response_format.type = {} is not supported: use \"text\", \"json_object\" or \"json_schema\"",
                rf.get("type").unwrap_or(&Value::Null)
            ),
        )),
    }
}

/// One token with its log-probability, as both dialects write it (`bytes` are the UTF-8 of
/// `token`).
#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

impl TopLogprob {
    /// Decodes `id` once.
    pub fn of(tok: &Tokenizer, id: u32, logprob: f32) -> Self {
        let token = tok.decode(&[id], false);
        Self { bytes: token.as_bytes().to_vec(), token, logprob }
    }

    /// The chosen token of `lp` and its alternatives.
    pub fn with_top(tok: &Tokenizer, id: u32, lp: &TokenLogprobs) -> (Self, Vec<Self>) {
        let top = lp.top.iter().map(|&(t, l)| Self::of(tok, t, l)).collect();
        (Self::of(tok, id, lp.logprob), top)
    }
}

/// RFC 3339 UTC with nanoseconds, as Ollama writes `created_at`.
pub fn rfc3339(t: SystemTime) -> String {
    let dt: chrono::DateTime<chrono::Utc> = t.into();
    dt.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("5m"), Some(300.0));
        assert_eq!(parse_go_duration("1h30m"), Some(5400.0));
        assert_eq!(parse_go_duration("-1m"), Some(-60.0));
        assert_eq!(parse_go_duration("0"), Some(0.0));
        assert_eq!(parse_go_duration("1.5s"), Some(1.5));
        assert_eq!(parse_go_duration("300ms"), Some(0.3));
        for bad in ["300", "", "m", "5x", "-", "1h-3m", "5 m"] {
            assert_eq!(parse_go_duration(bad), None, "{bad:?}");
        }
        assert_eq!(KeepAliveWire::Seconds(-1.0).parse().unwrap(), None);
        assert_eq!(KeepAliveWire::Duration("10m".into()).parse().unwrap(), Some(Duration::from_secs(600)));
        let e = KeepAliveWire::Duration("300".into()).parse().unwrap_err();
        assert!(e.message(super::super::error::Dialect::Ollama).contains("invalid duration \"300\""));
    }
}
