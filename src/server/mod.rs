//! `zoe-llm serve`: Ollama's API and OpenAI's on one port (default 127.0.0.1:11434).
//!
//! - [`ollama`]: `/`, `/api/*` (NDJSON streams, nanosecond durations, `{"error": "…"}`).
//! - [`openai`]: `/v1/*` (SSE with `data: [DONE]`) and vLLM's `/tokenize`, `/detokenize`,
//!   `/version`, `/health`.
//! - [`infer`]: the one internal request both map into, prompt preparation and streaming.
//! - [`engines`]: loaded models; [`error`]: one error type, written in each dialect's shape.
//! - [`openapi`]: `/openapi.json`, generated from the wire types.
//!
//! Around every route: a request id (`x-request-id`, taken from the client or made here) in a
//! tracing span, so every log line of a request — the engine thread's included — carries it;
//! Ollama's Host-header check when bound to loopback (DNS rebinding); CORS with Ollama's default
//! origins plus configured ones.

pub mod engines;
pub mod error;
pub mod infer;
pub mod metrics;
pub mod ollama;
pub mod openai;
pub mod openapi;
pub mod proxy;
pub mod shutdown;
mod sse;
pub mod wire;

#[cfg(test)]
mod engine_tests;
#[cfg(test)]
mod proxy_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tool_tests;
#[cfg(test)]
mod vision_tests;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tracing::Instrument;

use crate::hub::Registry;
use engines::Engines;

/// The version `/api/version` reports: clients enable tools, structured output and `think` by
/// comparing it with Ollama releases, so it is an Ollama version this API matches.
pub const OLLAMA_COMPAT_VERSION: &str = "0.12.10";

/// Settings of `serve`: flags, with a TOML file (`--config`) underneath.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    pub host: String,
    pub port: u16,
    /// Jobs that may wait per model before requests get 503.
    pub max_queue: usize,
    /// Engine for the plan: `cuda`, `cpu` or `ollama-proxy` (default: what the hardware probe
    /// suggests, see [`crate::plan`]).
    pub backend: Option<crate::plan::Backend>,
    /// Sequences decoded together per model (default: the plan's).
    pub max_num_seqs: Option<usize>,
    /// Tokens per forward pass (prompt chunks fill what decoding leaves).
    pub max_batched_tokens: usize,
    /// Bytes of KV cache per model (default: the plan's).
    pub kv_cache_bytes: Option<usize>,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// Extra CORS origins (`*` wildcards), added to Ollama's defaults; `OLLAMA_ORIGINS` too.
    pub origins: Vec<String>,
    /// How long a model stays after use when a request does not say (Ollama's 5m).
    #[serde(with = "secs")]
    pub keep_alive: Duration,
    /// Models loaded at start and pinned (default: the plan's).
    pub preload: Vec<String>,
    /// Models expected to load on request (default: the plan's).
    pub on_demand: Vec<String>,
    /// CPU worker threads per model (default: physical cores).
    pub threads: Option<usize>,
    /// Bytes the resident models may hold together (default: the plan's; 80% of the machine's
    /// memory where the plan has nothing better).
    pub memory_budget_bytes: Option<u64>,
    /// Seconds without a heartbeat after which a ready engine counts as stalled.
    #[serde(with = "secs")]
    pub stall_timeout: Duration,
    /// Seconds before the first restart of a failed engine (doubling per failure).
    #[serde(with = "secs")]
    pub restart_backoff: Duration,
    /// Engine failures within 10 minutes that are restarted; one more marks the model failed.
    pub max_restarts: u32,
    /// Run a short generation after each load before the model counts as ready.
    pub warmup: bool,
    /// Seconds streams in flight may take to finish after SIGTERM before they are cut.
    #[serde(with = "secs")]
    pub shutdown_grace: std::time::Duration,
    /// Fetch OpenAI `image_url` http(s) URLs (off: such URLs are a 400). The server then
    /// requests any URL a client names, so enable it only where clients are trusted.
    pub image_url_fetch: bool,
    /// Other servers that serve models: an Ollama (the Raspberry Pi plan), OpenAI-compatible
    /// boxes ([`crate::provider::config`]).
    pub upstreams: Vec<crate::provider::UpstreamConfig>,
    /// Model name or pattern → providers to try in order.
    pub routes: Vec<crate::provider::RouteConfig>,
}

/// Durations written as seconds (`keep_alive = 300`, `connect_timeout = 0.5`) in config files.
pub(crate) mod secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = f64::deserialize(d)?;
        if !(0.0..=1e9).contains(&s) {
            return Err(serde::de::Error::custom(format!("{s}: expected seconds in [0, 1e9]")));
        }
        Ok(Duration::from_secs_f64(s))
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 11434,
            max_queue: 64,
            backend: None,
            max_num_seqs: None,
            max_batched_tokens: 512,
            kv_cache_bytes: None,
            block_size: crate::model::paged_kv::DEFAULT_BLOCK_SIZE,
            max_body_bytes: 32 * 1024 * 1024,
            origins: Vec::new(),
            keep_alive: Duration::from_secs(300),
            preload: Vec::new(),
            on_demand: Vec::new(),
            threads: None,
            memory_budget_bytes: None,
            stall_timeout: Duration::from_secs(30),
            restart_backoff: Duration::from_millis(500),
            max_restarts: 3,
            warmup: true,
            image_url_fetch: false,
            shutdown_grace: Duration::from_secs(10),
            upstreams: Vec::new(),
            routes: Vec::new(),
        }
    }
}

impl ServeConfig {
    /// The engine settings within these. With the `fault-injection` feature, `ZOE_FAULT` adds
    /// an injected failure (an invalid spec is an error).
    pub fn engine(&self) -> anyhow::Result<crate::engine::service::EngineConfig> {
        #[cfg(feature = "fault-injection")]
        let fault = crate::engine::fault::Fault::from_env().map_err(anyhow::Error::msg)?;
        #[cfg(not(feature = "fault-injection"))]
        let fault = None;
        Ok(crate::engine::service::EngineConfig {
            max_queue: self.max_queue,
            max_num_seqs: self.max_num_seqs.unwrap_or(crate::plan::DEFAULT_MAX_NUM_SEQS),
            max_batched_tokens: self.max_batched_tokens,
            block_size: self.block_size,
            kv_cache_bytes: self.kv_cache_bytes.unwrap_or(crate::plan::DEFAULT_KV_CACHE_BYTES),
            stall_timeout: self.stall_timeout,
            restart_backoff: self.restart_backoff,
            max_restarts: self.max_restarts,
            warmup: self.warmup,
            fault,
        })
    }

    /// The memory budget: the configured one, else 80% of the machine's memory.
    pub fn memory_budget(&self) -> u64 {
        self.memory_budget_bytes.unwrap_or_else(|| {
            let total = provider_probe::probe().memory.total_bytes.unwrap_or(8 << 30);
            total / 5 * 4
        })
    }

    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let cfg: ServeConfig = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        for (key, v) in [
            ("max_queue", cfg.max_queue),
            ("max_num_seqs", cfg.max_num_seqs.unwrap_or(1)),
            ("kv_cache_bytes", cfg.kv_cache_bytes.unwrap_or(1)),
            ("max_batched_tokens", cfg.max_batched_tokens),
            ("block_size", cfg.block_size),
        ] {
            if v == 0 {
                anyhow::bail!("{}: {key} must be at least 1", path.display());
            }
        }
        if cfg.stall_timeout.is_zero() {
            anyhow::bail!("{}: stall_timeout must be above 0 seconds", path.display());
        }
        crate::provider::config::validate(&cfg.upstreams, &cfg.routes)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(cfg)
    }
}

/// What every handler can reach.
pub struct AppState {
    pub registry: Registry,
    pub engines: Engines,
    pub config: ServeConfig,
    /// Who serves which model: this machine's engines and the configured upstreams.
    pub providers: crate::provider::Providers,
    /// True when bound to a loopback address: the Host check applies.
    pub loopback: bool,
    /// Draining after SIGTERM; cutting the streams left at the deadline.
    pub shutdown: shutdown::Shutdown,
}

pub type Shared = Arc<AppState>;

/// The whole HTTP surface.
pub fn router(state: Shared) -> Router {
    let api = Router::new()
        .merge(ollama::routes())
        .merge(openai::routes())
        .route("/openapi.json", get(openapi::handler))
        .route("/metrics", get(metrics::handler))
        .fallback(not_found)
        .with_state(state.clone());
    api.layer(cors(&state.config))
        .layer(middleware::from_fn_with_state(state.clone(), refuse_while_draining))
        .layer(middleware::from_fn_with_state(state.clone(), host_check))
        .layer(middleware::from_fn(request_span))
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], "404 page not found").into_response()
}

/// After SIGTERM: 503 for every new request but `/health` (which says `stopping`).
async fn refuse_while_draining(State(state): State<Shared>, req: Request, next: Next) -> Response {
    if state.shutdown.draining() && req.uri().path() != "/health" {
        let dialect =
            if req.uri().path().starts_with("/v1/") { error::Dialect::OpenAi } else { error::Dialect::Ollama };
        return error::ApiError::Unavailable(shutdown::MESSAGE.into()).into_response_for(dialect);
    }
    next.run(req).await
}

/// Binds and serves until SIGINT/SIGTERM, then drains (see [`shutdown`]).
pub async fn serve(state: Shared) -> anyhow::Result<()> {
    let addr = format!("{}:{}", state.config.host, state.config.port);
    let listener =
        tokio::net::TcpListener::bind(&addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let local: SocketAddr = listener.local_addr()?;
    tracing::info!(%local, "listening");
    eprintln!("zoe-llm listening on http://{local}");
    engines::spawn_reaper(state.clone());
    crate::provider::upstream::spawn_probes(&state.providers.upstreams);
    spawn_systemd_notifier(state.clone());
    // No Nagle: a reply's head and its first piece often leave back to back (a proxied stream
    // always does), and Nagle would hold the piece until the client's delayed ACK (~40 ms).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
        let _ = tcp.set_nodelay(true);
    });
    let drain = {
        let state = state.clone();
        async move {
            shutdown_signal().await;
            state.shutdown.begin();
            let grace = state.config.shutdown_grace;
            tracing::info!(grace_s = grace.as_secs_f64(), "draining: no new requests; streams may finish");
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                tracing::warn!("shutdown grace over: cutting the streams still running");
                state.shutdown.cut_now();
            });
        }
    };
    let server = axum::serve(listener, router(state.clone())).with_graceful_shutdown(drain);
    // Cut streams end within a moment; a connection that still hangs on (a client that stopped
    // reading) does not hold the exit past the grace plus this.
    let mut cut = state.shutdown.watcher();
    tokio::select! {
        r = server => r?,
        _ = async {
            shutdown::cut(&mut cut).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        } => tracing::warn!("connections still open 5 s after the cut: exiting anyway"),
    }
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
}

/// Request id + span around everything; one access line per request.
async fn request_span(req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        })
        .map(str::to_owned)
        .unwrap_or_else(new_request_id);
    // `model` is filled in once the body is read (server::proxy::dispatch).
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %req.method(),
        path = %req.uri().path(),
        model = tracing::field::Empty
    );
    let start = Instant::now();
    let mut resp = next.run(req).instrument(span.clone()).await;
    span.in_scope(|| {
        tracing::info!(status = resp.status().as_u16(), ms = start.elapsed().as_millis() as u64, "response")
    });
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

fn new_request_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Ollama's `allowedHostsMiddleware`: on a loopback bind, only loopback/private/local names may
/// appear in `Host`; anything else (a DNS-rebinding page) gets an empty 403.
async fn host_check(State(state): State<Shared>, req: Request, next: Next) -> Response {
    if state.loopback {
        let host = req.headers().get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
        if !allowed_host(host) {
            tracing::info!(host, "refused: Host not allowed on a loopback bind");
            return StatusCode::FORBIDDEN.into_response();
        }
    }
    next.run(req).await
}

pub fn allowed_host(host_header: &str) -> bool {
    let host = strip_port(host_header).to_ascii_lowercase();
    if host.is_empty() || host == "localhost" {
        return true;
    }
    if hostname().is_some_and(|name| host == name) {
        return true;
    }
    if [".localhost", ".local", ".internal"].iter().any(|tld| host.ends_with(tld)) {
        return true;
    }
    match host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => ip.is_loopback() || ip.is_private() || ip.is_unspecified() || ip.is_link_local(),
        Ok(IpAddr::V6(ip)) => {
            ip.is_loopback() || ip.is_unspecified() || (ip.segments()[0] & 0xfe00) == 0xfc00
            // unique local
        }
        Err(_) => false,
    }
}

/// This machine's name, lowercase, read once (not per request).
fn hostname() -> Option<&'static str> {
    static NAME: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        let name = std::env::var("HOSTNAME").or_else(|_| std::fs::read_to_string("/etc/hostname")).ok()?;
        Some(name.trim().to_ascii_lowercase()).filter(|n| !n.is_empty())
    })
    .as_deref()
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or("");
    }
    match host.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// Ollama's default origins (`envconfig.AllowedOrigins`) plus configured and `OLLAMA_ORIGINS`.
fn cors(config: &ServeConfig) -> CorsLayer {
    let mut patterns: Vec<String> = Vec::new();
    for host in ["localhost", "127.0.0.1", "0.0.0.0"] {
        for scheme in ["http", "https"] {
            patterns.push(format!("{scheme}://{host}"));
            patterns.push(format!("{scheme}://{host}:*"));
        }
    }
    for p in ["app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*"] {
        patterns.push(p.to_owned());
    }
    patterns.extend(config.origins.iter().cloned());
    if let Ok(env) = std::env::var("OLLAMA_ORIGINS") {
        patterns.extend(env.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()));
    }
    let allow = AllowOrigin::predicate(move |origin: &HeaderValue, _| {
        origin.to_str().is_ok_and(|o| patterns.iter().any(|p| glob_match(p, o)))
    });
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::HEAD,
            Method::OPTIONS,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::USER_AGENT,
            header::ACCEPT,
            header::HeaderName::from_static("x-requested-with"),
            header::HeaderName::from_static("openai-beta"),
            header::HeaderName::from_static("x-stainless-arch"),
            header::HeaderName::from_static("x-stainless-async"),
            header::HeaderName::from_static("x-stainless-custom-poll-interval"),
            header::HeaderName::from_static("x-stainless-helper-method"),
            header::HeaderName::from_static("x-stainless-lang"),
            header::HeaderName::from_static("x-stainless-os"),
            header::HeaderName::from_static("x-stainless-package-version"),
            header::HeaderName::from_static("x-stainless-poll-helper"),
            header::HeaderName::from_static("x-stainless-retry-count"),
            header::HeaderName::from_static("x-stainless-runtime"),
            header::HeaderName::from_static("x-stainless-runtime-version"),
            header::HeaderName::from_static("x-stainless-timeout"),
        ])
}

/// `*` matches any run of characters.
pub fn glob_match(pattern: &str, s: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == s;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !s.starts_with(first) || s.len() < first.len() + last.len() || !s.ends_with(last) {
        return false;
    }
    let mut rest = &s[first.len()..s.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// `/health`: 200 when every pinned model is ready and its engine beating; 503 when one is not
/// (down, restarting, failed, stalled, or not loaded); 200 with `"degraded"` when only an
/// on-demand model has trouble. The body always lists every resident and pinned model's state.
pub fn health(state: &AppState) -> (StatusCode, serde_json::Value) {
    let pinned = state.engines.pinned();
    let mut models = Vec::new();
    let (mut pinned_down, mut other_down) = (false, false);
    for (h, _) in state.engines.resident() {
        let s = h.health.state();
        let is_pinned = pinned.contains(&h.id);
        let alive = s == crate::engine::service::EngineState::Ready;
        if !alive {
            if is_pinned {
                pinned_down = true;
            } else if s != crate::engine::service::EngineState::Starting {
                other_down = true;
            }
        }
        models.push(serde_json::json!({
            "model": h.id,
            // The name /api/ps and /api/tags list it under.
            "name": state.registry.get(&h.id).map(ollama::listed_name),
            "pinned": is_pinned,
            "state": s.name(),
            "reason": s.reason(),
            "alive": alive,
            "heartbeat_age_seconds": (h.health.since_beat().as_secs_f64() * 1000.0).round() / 1000.0,
            "restarts": h.health.restarts.load(std::sync::atomic::Ordering::Relaxed),
        }));
    }
    for id in pinned.iter().filter(|id| !state.engines.is_loaded(id)) {
        pinned_down = true;
        models.push(serde_json::json!({
            "model": id, "pinned": true, "state": "not_loaded", "reason": "the model is not loaded", "alive": false,
        }));
    }
    // Upstreams: an open breaker is a provider down. Without local engines (the Ollama-proxy
    // plan) the upstreams are all there is: every one down is unavailable.
    let mut providers = Vec::new();
    let mut upstream_up = false;
    for u in &state.providers.upstreams {
        let s = u.breaker.snapshot();
        let up = s.state == crate::provider::breaker::BreakerState::Closed;
        upstream_up |= up;
        if !up {
            other_down = true;
        }
        providers.push(serde_json::json!({
            "name": u.name(),
            "kind": u.config.kind,
            "url": u.config.url,
            "breaker": s.state.name(),
            "consecutive_failures": s.consecutive_failures,
            "last_error": s.last_error,
            "seconds_in_state": (s.in_state_for.as_secs_f64() * 1000.0).round() / 1000.0,
            "seconds_since_success": s.since_success.map(|d| (d.as_secs_f64() * 1000.0).round() / 1000.0),
        }));
    }
    if !state.providers.local && !upstream_up {
        pinned_down = true;
    }
    let (code, status) = if state.shutdown.draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "stopping")
    } else if pinned_down {
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    } else if other_down {
        (StatusCode::OK, "degraded")
    } else {
        (StatusCode::OK, "ok")
    };
    let mut body = serde_json::json!({ "status": status, "models": models });
    if !providers.is_empty() {
        body["providers"] = providers.into();
    }
    (code, body)
}

/// Every pinned model is loaded and its engine alive or restarting (what the systemd watchdog
/// vouches for: a restart in progress is the supervisor doing its job; a stall or a model
/// marked failed is not).
pub fn watchdog_ok(state: &AppState) -> bool {
    state.engines.pinned().iter().all(|id| state.engines.handle(id).is_some_and(|h| h.health.is_live_or_recovering()))
}

/// systemd: `READY=1` once serving, then `WATCHDOG=1` at half the unit's `WatchdogSec` — only
/// while [`watchdog_ok`], so a stalled or failed pinned engine gets the process restarted.
/// Without `NOTIFY_SOCKET` this sends nothing.
fn spawn_systemd_notifier(state: Shared) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let Some(period) = sd_notify::watchdog_enabled() else { return };
    let every = (period / 2).max(Duration::from_millis(10));
    tracing::info!(ms = every.as_millis() as u64, "systemd watchdog enabled");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        let mut was_alive = true;
        loop {
            tick.tick().await;
            let alive = watchdog_ok(&state);
            if alive {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            } else if was_alive {
                tracing::error!("a pinned engine is stalled or failed: watchdog notifications stop");
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Status("a pinned engine is stalled or failed")]);
            }
            was_alive = alive;
        }
    });
}
