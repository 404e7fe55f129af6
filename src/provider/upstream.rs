//! One upstream server: its HTTP client, circuit breaker, retries and health probes.
//!
//! A request is retried (exponential backoff from 0.25 s) only while nothing has reached the
//! client: a connection refused, a timeout before the first byte, a 5xx. Once the first piece
//! of the answer is in, the answer is the client's, whatever happens later.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Bytes;

use super::breaker::Breaker;
use super::config::{UpstreamConfig, UpstreamKind};

/// First retry's delay; each later one doubles it.
const BACKOFF: Duration = Duration::from_millis(250);

pub struct Upstream {
    pub config: UpstreamConfig,
    /// `url` without a trailing `/` (and without `/v1` for OpenAI: paths carry it).
    base: String,
    client: reqwest::Client,
    pub breaker: Breaker,
    /// Requests answered (a first byte came back).
    pub ok: AtomicU64,
    /// Attempts that failed before any answer (each retry counts).
    pub failures: AtomicU64,
    /// Requests that skipped this upstream because its breaker was open.
    pub skipped: AtomicU64,
}

/// How an attempt ended before anything reached the client.
#[derive(Debug)]
pub enum SendError {
    /// The breaker is open: not tried.
    Open(String),
    /// No answer after every retry (connect error, timeout, 5xx); the last reason.
    Down(String),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Open(why) => write!(f, "circuit open (last error: {why})"),
            Self::Down(why) => write!(f, "{why}"),
        }
    }
}

/// An upstream's answer, once it started.
pub enum Answer {
    /// A non-2xx status below 500 (the client's mistake, or a model the upstream lacks): passed on.
    Refused { status: u16, body: Bytes, content_type: Option<String> },
    /// A whole (non-streamed) 2xx body.
    Whole { body: Bytes, content_type: Option<String> },
    /// A streamed 2xx body: its first piece and the rest (read within `idle_timeout`).
    Stream { first: Bytes, rest: reqwest::Response, content_type: Option<String> },
}

impl Upstream {
    pub fn new(config: UpstreamConfig) -> Self {
        let mut base = config.url.trim_end_matches('/').to_owned();
        if config.kind == UpstreamKind::Openai {
            base = base.strip_suffix("/v1").unwrap_or(&base).to_owned();
        }
        let loopback = reqwest::Url::parse(&base).ok().and_then(|u| u.host_str().map(str::to_owned)).is_some_and(|h| {
            h == "localhost" || h.trim_matches(['[', ']']).parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback())
        });
        let mut builder = reqwest::Client::builder().connect_timeout(config.connect_timeout).tcp_nodelay(true);
        if loopback {
            // A configured HTTP proxy cannot reach this machine's loopback.
            builder = builder.no_proxy();
        }
        let client = builder.build().unwrap_or_else(|_| reqwest::Client::new());
        Self {
            breaker: Breaker::new(config.breaker_failures),
            config,
            base,
            client,
            ok: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn kind(&self) -> UpstreamKind {
        self.config.kind
    }

    /// A request to `path` with the key, if any.
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let rb = self.client.request(method, format!("{}{path}", self.base));
        match &self.config.api_key {
            Some(key) => rb.bearer_auth(key),
            None => rb,
        }
    }

    /// A short GET (probes, listings): within `connect_timeout × 2`.
    fn quick_get(&self, path: &str) -> reqwest::RequestBuilder {
        self.request(reqwest::Method::GET, path).timeout(self.config.connect_timeout * 2)
    }

    /// POSTs `body` to `path`, retrying before the first byte. `stream`: return at the first
    /// piece of a 2xx body (else read it whole), both within `first_token_timeout`.
    pub async fn send(&self, path: &str, body: &serde_json::Value, stream: bool) -> Result<Answer, SendError> {
        let mut last = String::new();
        for attempt in 0..=self.config.retries {
            if !self.breaker.allows() {
                self.skipped.fetch_add(1, Ordering::Relaxed);
                let why = self.breaker.snapshot().last_error.unwrap_or_default();
                return Err(SendError::Open(why));
            }
            if attempt > 0 {
                tokio::time::sleep(BACKOFF * 2u32.pow(attempt - 1)).await;
            }
            let try_once = async {
                let resp =
                    self.request(reqwest::Method::POST, path).json(body).send().await.map_err(|e| describe(&e))?;
                let status = resp.status();
                let content_type =
                    resp.headers().get(reqwest::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
                if status.is_server_error() {
                    let text = resp.text().await.unwrap_or_default();
                    return Err(format!("HTTP {status}: {}", text.trim().chars().take(300).collect::<String>()));
                }
                if !status.is_success() {
                    let body = resp.bytes().await.map_err(|e| describe(&e))?;
                    return Ok(Answer::Refused { status: status.as_u16(), body, content_type });
                }
                if stream {
                    let mut rest = resp;
                    let first = rest.chunk().await.map_err(|e| describe(&e))?.unwrap_or_default();
                    Ok(Answer::Stream { first, rest, content_type })
                } else {
                    let body = resp.bytes().await.map_err(|e| describe(&e))?;
                    Ok(Answer::Whole { body, content_type })
                }
            };
            let outcome = match tokio::time::timeout(self.config.first_token_timeout, try_once).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {:?}", self.config.first_token_timeout)),
            };
            match outcome {
                Ok(answer) => {
                    self.breaker.success();
                    self.ok.fetch_add(1, Ordering::Relaxed);
                    return Ok(answer);
                }
                Err(why) => {
                    tracing::warn!(upstream = self.name(), attempt, error = %why, "upstream attempt failed");
                    self.failures.fetch_add(1, Ordering::Relaxed);
                    self.breaker.failure(&why);
                    last = why;
                }
            }
        }
        Err(SendError::Down(last))
    }

    /// One health probe (`GET /api/version` or `/v1/models`); feeds the breaker.
    pub async fn probe(&self) -> Result<(), String> {
        let path = match self.kind() {
            UpstreamKind::Ollama => "/api/version",
            UpstreamKind::Openai => "/v1/models",
        };
        let result = match self.quick_get(path).send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("health probe: HTTP {}", r.status())),
            Err(e) => Err(format!("health probe: {}", describe(&e))),
        };
        match &result {
            Ok(()) => self.breaker.success(),
            Err(why) => {
                self.breaker.failure(why);
            }
        }
        result
    }

    /// `GET path` as JSON, within `connect_timeout × 2` (listings: `/api/tags`, `/api/ps`, `/v1/models`).
    pub async fn get_json(&self, path: &str) -> Result<serde_json::Value, String> {
        let resp = self.quick_get(path).send().await.map_err(|e| describe(&e))?;
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status()));
        }
        resp.json().await.map_err(|e| describe(&e))
    }

    /// This upstream takes requests for `model` (its `models` patterns).
    pub fn serves(&self, model: &str) -> bool {
        self.config.models.iter().any(|p| crate::server::glob_match(&p.to_lowercase(), &model.to_lowercase()))
    }
}

/// reqwest's message plus its causes ("error sending request: … Connection refused").
fn describe(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

/// Probes every upstream every `probe_interval`, for as long as the server runs.
pub fn spawn_probes(upstreams: &[std::sync::Arc<Upstream>]) {
    for up in upstreams {
        let up = up.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(up.config.probe_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let _ = up.probe().await;
            }
        });
    }
}
