//! Wire pieces both dialects share: flexible JSON shapes, keep-alive durations, model lookup,
//! image checks, timestamps.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::engines::KeepAlive;
use super::error::ApiError;
use super::AppState;
use crate::engine::generate::TokenLogprobs;
use crate::hub::{Manifest, Role};
use crate::model::tokenizer::Tokenizer;

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
    if !out.is_empty() && !m.has_role(Role::Vision) {
        return Err(ApiError::bad_field(
            field,
            format!("model '{}' does not support vision: it cannot take images", m.id),
        ));
    }
    Ok(out)
}

/// `tools` on a model without the tools role: Ollama's capability error.
pub fn check_tools(m: &Manifest, tools: Option<&[serde_json::Value]>) -> Result<(), ApiError> {
    if tools.is_some_and(|t| !t.is_empty()) && !m.has_role(Role::Tools) {
        return Err(ApiError::bad_field("tools", format!("{} does not support tools", m.id)));
    }
    Ok(())
}

/// Structured output (`format`, `response_format`) arrives with the tool-calling issue; until
/// then a request that asks for it is told so rather than silently getting free text.
pub fn check_format(field: &str, format: Option<&serde_json::Value>) -> Result<(), ApiError> {
    match format {
        None | Some(serde_json::Value::Null) => Ok(()),
        Some(serde_json::Value::String(s)) if s.is_empty() => Ok(()),
        Some(_) => Err(ApiError::bad_field(
            field,
            format!("{field}: structured output (JSON mode / JSON schema) is not supported by this server yet"),
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
