//! Upstream servers and routes as the config file writes them (`[[upstreams]]`, `[[routes]]`).
//!
//! ```toml
//! [[upstreams]]
//! name = "pi-ollama"              # what routes and /health call it
//! kind = "ollama"                 # "ollama" or "openai" (any OpenAI-compatible server: vLLM, another appliance)
//! url = "http://127.0.0.1:11435"  # Ollama on the Pi moves off 11434, which zoe-llm holds
//! models = ["*"]                  # names it serves, `*` wildcards (default: every name)
//!
//! [[routes]]
//! model = "qwen2-vl*"             # an id, an alias or a pattern
//! providers = ["local", "vision-box"]   # tried in order; "local" is this box's engines
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::server::secs;

/// The provider name routes use for this machine's own engines.
pub const LOCAL: &str = "local";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamKind {
    /// Ollama's API (`/api/chat`, `/api/generate`, NDJSON).
    Ollama,
    /// OpenAI's API (`/v1/chat/completions`, `/v1/completions`, SSE).
    Openai,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub name: String,
    pub kind: UpstreamKind,
    /// Base URL, without the API path (`http://host:port`, or `…/v1`'s parent for OpenAI).
    pub url: String,
    /// Sent as `Authorization: Bearer …` (OpenAI-compatible servers that want a key).
    #[serde(default, skip_serializing)]
    pub api_key: Option<String>,
    /// Model names this upstream serves (`*` wildcards); requests for others never go there.
    #[serde(default = "every_model")]
    pub models: Vec<String>,
    /// Seconds to connect.
    #[serde(default = "d_connect", with = "secs")]
    pub connect_timeout: Duration,
    /// Seconds from sending the request to the first token (or the whole reply when not streaming).
    #[serde(default = "d_first_token", with = "secs")]
    pub first_token_timeout: Duration,
    /// Seconds between two streamed pieces before the stream counts as dead.
    #[serde(default = "d_idle", with = "secs")]
    pub idle_timeout: Duration,
    /// Retries of a request that failed before its first token (backoff 0.25 s, doubling).
    #[serde(default = "d_retries")]
    pub retries: u32,
    /// Consecutive failures that open the circuit breaker.
    #[serde(default = "d_breaker")]
    pub breaker_failures: u32,
    /// Seconds between health probes (`/api/version` or `/v1/models`); an open breaker closes on
    /// the first probe that succeeds.
    #[serde(default = "d_probe", with = "secs")]
    pub probe_interval: Duration,
}

fn every_model() -> Vec<String> {
    vec!["*".into()]
}
fn d_connect() -> Duration {
    Duration::from_secs(3)
}
fn d_first_token() -> Duration {
    Duration::from_secs(120)
}
fn d_idle() -> Duration {
    Duration::from_secs(60)
}
fn d_retries() -> u32 {
    2
}
fn d_breaker() -> u32 {
    3
}
fn d_probe() -> Duration {
    Duration::from_secs(5)
}

impl UpstreamConfig {
    /// An upstream with every default: `name`, `kind`, `url`, all models.
    pub fn new(name: &str, kind: UpstreamKind, url: &str) -> Self {
        Self {
            name: name.into(),
            kind,
            url: url.into(),
            api_key: None,
            models: every_model(),
            connect_timeout: d_connect(),
            first_token_timeout: d_first_token(),
            idle_timeout: d_idle(),
            retries: d_retries(),
            breaker_failures: d_breaker(),
            probe_interval: d_probe(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// A model id, an alias, or a pattern with `*` wildcards.
    pub model: String,
    /// Providers tried in order: [`LOCAL`] or an upstream's name.
    pub providers: Vec<String>,
    /// The name sent upstream instead of the client's (e.g. `qwen2.5vl:7b` for a local id).
    #[serde(default)]
    pub upstream_model: Option<String>,
}

/// Checks names, URLs and references; the error names the entry and field.
pub fn validate(upstreams: &[UpstreamConfig], routes: &[RouteConfig]) -> Result<(), String> {
    let mut names = std::collections::HashSet::new();
    for (i, u) in upstreams.iter().enumerate() {
        let at = |field: &str| format!("upstreams[{i}].{field}");
        if u.name.trim().is_empty() {
            return Err(format!("{}: an upstream needs a name", at("name")));
        }
        if u.name == LOCAL {
            return Err(format!("{}: \"{LOCAL}\" is reserved for this machine's engines", at("name")));
        }
        if !names.insert(u.name.as_str()) {
            return Err(format!("{}: {:?} is used twice", at("name"), u.name));
        }
        let url = reqwest::Url::parse(&u.url).map_err(|e| format!("{}: {:?} is not a URL: {e}", at("url"), u.url))?;
        if !["http", "https"].contains(&url.scheme()) || url.host_str().is_none() {
            return Err(format!("{}: {:?} must be an http(s) URL with a host", at("url"), u.url));
        }
        if u.models.is_empty() {
            return Err(format!(
                "{}: empty: the upstream would serve nothing (\"*\" serves every model)",
                at("models")
            ));
        }
        for (field, d) in [
            ("connect_timeout", u.connect_timeout),
            ("first_token_timeout", u.first_token_timeout),
            ("idle_timeout", u.idle_timeout),
            ("probe_interval", u.probe_interval),
        ] {
            if d.is_zero() {
                return Err(format!("{}: must be above 0 seconds", at(field)));
            }
        }
        if u.breaker_failures == 0 {
            return Err(format!("{}: must be at least 1", at("breaker_failures")));
        }
    }
    for (i, r) in routes.iter().enumerate() {
        if r.model.trim().is_empty() {
            return Err(format!("routes[{i}].model: a route needs a model name or pattern"));
        }
        if r.providers.is_empty() {
            return Err(format!("routes[{i}].providers: empty: name \"{LOCAL}\" or an upstream"));
        }
        for (j, p) in r.providers.iter().enumerate() {
            if p != LOCAL && !names.contains(p.as_str()) {
                return Err(format!(
                    "routes[{i}].providers[{j}]: {p:?} is neither \"{LOCAL}\" nor the name of an upstream"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (Vec<UpstreamConfig>, Vec<RouteConfig>) {
        #[derive(Deserialize)]
        struct F {
            #[serde(default)]
            upstreams: Vec<UpstreamConfig>,
            #[serde(default)]
            routes: Vec<RouteConfig>,
        }
        let f: F = toml::from_str(text).unwrap();
        (f.upstreams, f.routes)
    }

    #[test]
    fn defaults_and_validation() {
        let (u, r) = parse(
            "[[upstreams]]\nname = \"pi\"\nkind = \"ollama\"\nurl = \"http://127.0.0.1:11435\"\n\
             [[routes]]\nmodel = \"qwen2-vl*\"\nproviders = [\"local\", \"pi\"]\n",
        );
        assert_eq!(u[0], UpstreamConfig::new("pi", UpstreamKind::Ollama, "http://127.0.0.1:11435"));
        assert_eq!(validate(&u, &r), Ok(()));
        let bad_ref = vec![RouteConfig { model: "x".into(), providers: vec!["nope".into()], upstream_model: None }];
        assert!(validate(&u, &bad_ref).unwrap_err().starts_with("routes[0].providers[0]: \"nope\""));
        let mut twice = u.clone();
        twice.push(u[0].clone());
        assert!(validate(&twice, &[]).unwrap_err().contains("upstreams[1].name"));
        let mut bad_url = u.clone();
        bad_url[0].url = "127.0.0.1:11435".into();
        assert!(validate(&bad_url, &[]).unwrap_err().starts_with("upstreams[0].url"));
        let mut local = u;
        local[0].name = LOCAL.into();
        assert!(validate(&local, &[]).unwrap_err().contains("reserved"));
    }
}
