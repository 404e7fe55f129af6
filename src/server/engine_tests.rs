//! The engine core seen through the HTTP API: warm-up, keep-alive expiry, the memory budget
//! with LRU eviction, queue overflow, the latency histograms — and, with the `fault-injection`
//! feature, the supervisor: panics, fatal errors and hangs mid-stream.

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{json, Value};

use super::tests::{get, post, state_from, state_with, Reply, TestSource, GREEDY, TINY};
use super::ServeConfig;

/// A second model served by the same test source.
const TINY2: &str = r#"
id = "tiny2"
format = "gguf"
architecture = "llama"
[source]
kind = "huggingface"
repo = "test/tiny2"
[[files]]
name = "tiny2.gguf"
primary = true
[defaults]
context_length = 256
"#;

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{series} missing:\n{text}"))
        .parse()
        .unwrap()
}

fn ps_names(v: &Value) -> Vec<String> {
    v["models"].as_array().unwrap().iter().map(|m| m["model"].as_str().unwrap().to_owned()).collect()
}

/// After a load the warm-up generation has run, and it counts in no metric.
#[tokio::test]
async fn warm_up_runs_before_the_model_is_ready_and_counts_nowhere() {
    let st = state_with(ServeConfig::default());
    post(&st, "/api/generate", json!({"model": "tiny"})).await;
    let h = st.engines.handle("tiny").unwrap();
    assert!(h.warmup.is_some_and(|w| w > Duration::ZERO));
    assert!(h.load_duration >= h.warmup.unwrap());
    assert!(h.health.is_alive());
    let m = get(&st, "/metrics").await.text();
    for series in ["vllm:generation_tokens_total", "vllm:prompt_tokens_total", "vllm:prefix_cache_queries_total"] {
        assert_eq!(metric(&m, &format!("{series}{{model_name=\"tiny\"}}")), 0.0, "{series}");
    }
    let st = state_with(ServeConfig { warmup: false, ..ServeConfig::default() });
    post(&st, "/api/generate", json!({"model": "tiny"})).await;
    assert_eq!(st.engines.handle("tiny").unwrap().warmup, None);
}

/// keep_alive runs from the end of the last request; a busy model never expires; an expired
/// idle one is unloaded and the next request loads it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_expires_idle_models_only() {
    let st = state_with(ServeConfig::default());
    let r = post(
        &st,
        "/api/generate",
        json!({"model": "tiny", "prompt": "a", "keep_alive": "300ms", "options": GREEDY(2)}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(st.engines.reap(), Vec::<String>::new(), "not yet");
    assert_eq!(ps_names(&get(&st, "/api/ps").await.json()), ["tiny:1b"]);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(st.engines.reap(), ["tiny"]);
    assert_eq!(get(&st, "/api/ps").await.json(), json!({"models": []}));

    // keep_alive 0 on a generation: expired as soon as it is done, but never while a request
    // is queued or running (the engine's counters say busy; held here so it cannot race).
    let r = post(&st, "/api/generate", json!({"model": "tiny", "prompt": "go", "keep_alive": 0, "options": GREEDY(3)}))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let h = st.engines.handle("tiny").unwrap();
    h.stats.waiting.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    assert!(h.busy());
    assert_eq!(st.engines.reap(), Vec::<String>::new(), "a busy model is kept");
    h.stats.waiting.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(st.engines.reap(), ["tiny"], "keep_alive 0: gone once idle");

    // Negative: kept for good; the next request loads it again.
    post(&st, "/api/generate", json!({"model": "tiny", "keep_alive": -1})).await;
    let ps = get(&st, "/api/ps").await.json();
    assert!(ps["models"][0]["expires_at"].as_str().unwrap().starts_with("9999-"), "{ps}");
}

/// A load that would go past the memory budget evicts the least recently used unpinned model;
/// pinned models are never evicted, and a load they leave no room for gets 503 with the numbers.
#[tokio::test]
async fn a_load_beyond_the_budget_evicts_the_least_recently_used_model() {
    let weights: u64 = 40 << 20;
    let kv = 1 << 20;
    let config = ServeConfig {
        kv_cache_bytes: Some(kv),
        // One model (weights + KV) fits, two do not.
        memory_budget_bytes: Some(weights + kv as u64 + weights / 2),
        ..ServeConfig::default()
    };
    let st = state_from(config, &[TINY, TINY2], TestSource::new(weights));
    let ok = |r: Reply| assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    ok(post(&st, "/api/generate", json!({"model": "tiny"})).await);
    let used = metric(&get(&st, "/metrics").await.text(), "zoe_memory_used_bytes");
    let h = st.engines.handle("tiny").unwrap();
    assert_eq!(used as u64, h.size_bytes());
    assert_eq!(h.size_bytes(), weights + h.kv_bytes);
    assert!(h.kv_bytes > 0 && h.kv_bytes <= kv as u64);
    ok(post(&st, "/api/generate", json!({"model": "tiny2"})).await);
    assert_eq!(ps_names(&get(&st, "/api/ps").await.json()), ["tiny2:latest"], "tiny was evicted");
    let m = get(&st, "/metrics").await.text();
    assert_eq!(metric(&m, "zoe_model_resident{model_name=\"tiny\"}"), 0.0);
    assert_eq!(metric(&m, "zoe_model_resident{model_name=\"tiny2\"}"), 1.0);
    assert_eq!(metric(&m, "zoe_memory_budget_bytes") as u64, weights + kv as u64 + weights / 2);

    st.engines.pin("tiny2");
    let r = post(&st, "/api/generate", json!({"model": "tiny", "prompt": "x"})).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let e = r.error();
    assert!(e.contains("model 'tiny' needs about 41 MiB") && e.contains("memory budget is 61 MiB"), "{e}");
    assert!(e.contains("pinned models hold") && e.contains("'tiny2'"), "{e}");
    assert_eq!(ps_names(&get(&st, "/api/ps").await.json()), ["tiny2:latest"], "the pinned model stays");
}

/// Past `max_queue` waiting jobs, requests get 503 with Ollama's text and Retry-After, and the
/// accepted ones all complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_with_retry_after() {
    let st = state_with(ServeConfig { max_queue: 1, max_num_seqs: Some(1), ..ServeConfig::default() });
    post(&st, "/api/generate", json!({"model": "tiny"})).await;
    let replies = futures_util::future::join_all((0..8).map(|i| {
        let st = st.clone();
        async move {
            post(
                &st,
                "/api/generate",
                json!({"model": "tiny", "prompt": format!("q{i}"), "stream": false,
                                              "options": GREEDY(60)}),
            )
            .await
        }
    }))
    .await;
    let busy: Vec<&Reply> = replies.iter().filter(|r| r.status == StatusCode::SERVICE_UNAVAILABLE).collect();
    assert!(!busy.is_empty(), "8 at once cannot fit 1 running + 1 admitted + 1 queued");
    for r in &busy {
        assert_eq!(r.error(), "server busy, please try again.  maximum pending requests exceeded");
        assert!(r.headers.contains_key("retry-after"));
    }
    for r in replies.iter().filter(|r| r.status != StatusCode::SERVICE_UNAVAILABLE) {
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.json()["done"], true);
    }
}

/// TTFT, TPOT and end-to-end latency histograms fill as requests finish.
#[tokio::test]
async fn latency_histograms_count_finished_requests() {
    let st = state_with(ServeConfig::default());
    for i in 0..3 {
        let r = post(
            &st,
            "/api/generate",
            json!({"model": "tiny", "prompt": format!("h{i}"), "stream": false,
                                                  "options": GREEDY(5)}),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let m = get(&st, "/metrics").await.text();
    for name in
        ["vllm:time_to_first_token_seconds", "vllm:time_per_output_token_seconds", "vllm:e2e_request_latency_seconds"]
    {
        assert!(m.contains(&format!("# TYPE {name} histogram")), "{name}");
        assert_eq!(metric(&m, &format!("{name}_count{{model_name=\"tiny\"}}")), 3.0, "{name}");
        assert_eq!(metric(&m, &format!("{name}_bucket{{model_name=\"tiny\",le=\"+Inf\"}}")), 3.0, "{name}");
        assert!(metric(&m, &format!("{name}_sum{{model_name=\"tiny\"}}")) > 0.0, "{name}");
    }
    assert_eq!(metric(&m, "zoe_engine_restarts_total{model_name=\"tiny\"}"), 0.0);
    assert_eq!(metric(&m, "zoe_engine_alive{model_name=\"tiny\"}"), 1.0);
    assert!(metric(&m, "zoe_model_load_seconds{model_name=\"tiny\"}") > 0.0);
}

#[cfg(feature = "fault-injection")]
mod faults {
    use std::sync::atomic::Ordering;
    use std::time::Instant;

    use super::super::tests::{ndjson, sse, state_full};
    use super::super::Shared;
    use super::*;
    use crate::engine::fault::{Fault, FaultKind};

    /// Waits (up to 10 s) until `/health` answers `want`; returns its body.
    async fn health_becomes(st: &Shared, want: StatusCode) -> Value {
        let start = Instant::now();
        loop {
            let r = get(st, "/health").await;
            if r.status == want {
                return r.json();
            }
            assert!(start.elapsed() < Duration::from_secs(10), "/health stayed {}: {}", r.status, r.text());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A state whose engines get `fault`, with `tiny` pinned (unless `pinned` is false) and
    /// loaded.
    async fn faulty_with(fault: Fault, config: ServeConfig, pinned: bool) -> Shared {
        faulty_from(fault, config, pinned, TestSource::new(1234)).await
    }

    async fn faulty_from(fault: Fault, config: ServeConfig, pinned: bool, source: TestSource) -> Shared {
        let mut engine = config.engine().unwrap();
        engine.fault = Some(fault);
        let st = state_full(config, engine, &[TINY], source);
        if pinned {
            st.engines.pin("tiny");
        }
        let r = post(&st, "/api/generate", json!({"model": "tiny"})).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        st
    }

    async fn faulty(fault: Fault, config: ServeConfig) -> Shared {
        faulty_with(fault, config, true).await
    }

    fn quick() -> ServeConfig {
        ServeConfig {
            restart_backoff: Duration::from_millis(300),
            stall_timeout: Duration::from_millis(400),
            ..ServeConfig::default()
        }
    }

    /// The same request on a healthy server (the tiny model is the same in every state).
    async fn solo(body: Value) -> Value {
        post(&state_with(ServeConfig::default()), "/api/generate", body).await.json()
    }

    async fn check_restart(st: &Shared, restarts: f64) {
        let v = health_becomes(st, StatusCode::SERVICE_UNAVAILABLE).await;
        let s = v["models"][0]["state"].as_str().unwrap();
        assert!(s == "restarting" || s == "starting", "{v}");
        assert!(crate::server::watchdog_ok(st), "a restart in progress keeps the watchdog fed");
        health_becomes(st, StatusCode::OK).await;
        let body = json!({"model": "tiny", "prompt": "after", "stream": false, "options": GREEDY(8)});
        let r = post(st, "/api/generate", body.clone()).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.json()["response"], solo(body).await["response"], "the restarted engine answers as before");
        let m = get(st, "/metrics").await.text();
        assert_eq!(metric(&m, "zoe_engine_restarts_total{model_name=\"tiny\"}"), restarts);
        settles(st).await;
    }

    /// Once everything has ended, no request is counted as running or waiting (the counters
    /// that keep_alive expiry and eviction read).
    async fn settles(st: &Shared) {
        let h = st.engines.handle("tiny").unwrap();
        for _ in 0..500 {
            if !h.busy() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let s = &h.stats;
        panic!("still busy: running {} waiting {}", s.running.load(Ordering::SeqCst), s.waiting.load(Ordering::SeqCst));
    }

    /// A panic mid-stream: the NDJSON stream ends with an error line, /health goes 503 and back
    /// to 200, the next request succeeds, and the restart is counted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_mid_stream_ends_the_stream_with_an_error_and_the_engine_restarts() {
        let st = faulty(Fault::new(FaultKind::Panic, 4, 1), quick()).await;
        let r = post(&st, "/api/generate", json!({"model": "tiny", "prompt": "x", "options": GREEDY(30)})).await;
        assert_eq!(r.status, StatusCode::OK);
        let lines = ndjson(&r);
        assert!(lines.len() >= 2, "some tokens streamed before the panic: {lines:?}");
        let last = lines.last().unwrap();
        let e = last["error"].as_str().unwrap_or_else(|| panic!("last line is an error: {last}"));
        assert!(e.contains("failed mid-generation") && e.contains("panicked"), "{e}");
        check_restart(&st, 1.0).await;
    }

    /// A fatal backend error mid-stream: the SSE stream ends with an error event and [DONE].
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_backend_error_mid_stream_ends_the_sse_stream_with_an_error() {
        let st = faulty(Fault::new(FaultKind::Error, 4, 1), quick()).await;
        let r = post(
            &st,
            "/v1/chat/completions",
            json!({"model": "tiny", "stream": true, "max_tokens": 30, "temperature": 0,
                   "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
        let events = sse(&r);
        assert_eq!(events.last().unwrap(), "[DONE]");
        let err: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        let msg = err["error"]["message"].as_str().unwrap_or_else(|| panic!("an error event: {err}"));
        assert!(msg.contains("injected fault: backend error"), "{msg}");
        check_restart(&st, 1.0).await;
    }

    /// Of two requests when the engine panics, the one that streamed tokens gets an error and
    /// the one still waiting (nothing streamed) is retried transparently and answers exactly
    /// as it would alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_that_streamed_nothing_is_retried_transparently() {
        let config = ServeConfig { max_num_seqs: Some(1), ..quick() };
        let st = faulty(Fault::new(FaultKind::Panic, 3, 1), config).await;
        let body = |p: &str| json!({"model": "tiny", "prompt": p, "stream": false, "options": GREEDY(12)});
        let (a, b) =
            tokio::join!(post(&st, "/api/generate", body("first")), post(&st, "/api/generate", body("second")));
        let (failed, ok, ok_prompt) = match (a.status, b.status) {
            (StatusCode::OK, _) => (b, a, "first"),
            _ => (a, b, "second"),
        };
        assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR, "{}", failed.text());
        assert!(failed.error().contains("failed mid-generation"), "{}", failed.error());
        assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
        assert_eq!(ok.json()["response"], solo(body(ok_prompt)).await["response"]);
        // Taken from the queue before the crash (max_num_seqs 1 admits one, the intake holds
        // the next): it went through the retry path, not just the queue.
        let m = get(&st, "/metrics").await.text();
        assert_eq!(metric(&m, "zoe_engine_retries_total{model_name=\"tiny\"}"), 1.0);
        settles(&st).await;
    }

    /// A retried request whose reload fails too is answered with the reason, not dropped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retry_whose_reload_fails_gets_the_reason() {
        let config = ServeConfig { restart_backoff: Duration::from_millis(10), ..quick() };
        let source = TestSource { fail_from: 2, ..TestSource::new(1234) };
        let st = faulty_from(Fault::new(FaultKind::Panic, 1, 1), config, true, source).await;
        let r = post(&st, "/api/generate", json!({"model": "tiny", "prompt": "x", "stream": false})).await;
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR, "{}", r.text());
        assert!(r.error().contains("the test source refuses load 2"), "{}", r.error());
        let v = health_becomes(&st, StatusCode::SERVICE_UNAVAILABLE).await;
        assert!(["restarting", "failed"].contains(&v["models"][0]["state"].as_str().unwrap()), "{v}");
    }

    /// A crash during a chunked prefill (nothing streamed yet) is invisible to the client.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_crash_during_prefill_is_retried() {
        let config = ServeConfig { max_batched_tokens: 8, ..quick() };
        let st = faulty(Fault::new(FaultKind::Panic, 2, 1), config).await;
        let body = json!({"model": "tiny", "prompt": "ab ".repeat(12), "raw": true, "stream": false,
                          "options": GREEDY(6)});
        let r = post(&st, "/api/generate", body.clone()).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.json()["response"], solo(body).await["response"]);
        assert_eq!(st.engines.handle("tiny").unwrap().health.restarts.load(Ordering::SeqCst), 1);
        assert_eq!(st.engines.handle("tiny").unwrap().stats.retries.load(Ordering::SeqCst), 1);
        settles(&st).await;
    }

    /// Failing more than `max_restarts` times marks the model failed: requests get 503 with the
    /// reason, and /health reports it (503 for a pinned model, 200 "degraded" for an on-demand
    /// one). Unloading clears it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn repeated_failures_mark_the_model_failed() {
        let config = ServeConfig { max_restarts: 1, restart_backoff: Duration::from_millis(20), ..quick() };
        let st = faulty(Fault::new(FaultKind::Panic, 1, 100), config).await;
        // Fails at once, is retried (nothing streamed), fails again: the second failure is one
        // more than max_restarts.
        let r = post(&st, "/api/generate", json!({"model": "tiny", "prompt": "x", "stream": false})).await;
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR, "{}", r.text());
        assert!(r.error().contains("has failed"), "{}", r.error());
        let v = health_becomes(&st, StatusCode::SERVICE_UNAVAILABLE).await;
        assert_eq!(v["models"][0]["state"], "failed", "{v}");
        assert!(v["models"][0]["reason"].as_str().unwrap().contains("failed 2 times"), "{v}");
        let r = post(&st, "/api/generate", json!({"model": "tiny", "prompt": "again"})).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.error().contains("model 'tiny' has failed: the engine failed 2 times"), "{}", r.error());
        let r = post(&st, "/v1/completions", json!({"model": "tiny", "prompt": "again"})).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        // Not pinned: the server as a whole is still healthy, with details.
        let config = ServeConfig { max_restarts: 0, ..quick() };
        let st2 = faulty_with(Fault::new(FaultKind::Panic, 1, 100), config, false).await;
        post(&st2, "/api/generate", json!({"model": "tiny", "prompt": "x", "stream": false})).await;
        let v = health_becomes(&st2, StatusCode::OK).await;
        assert_eq!((v["status"].clone(), v["models"][0]["state"].clone()), (json!("degraded"), json!("failed")), "{v}");
        let r = post(&st2, "/api/generate", json!({"model": "tiny", "keep_alive": 0})).await;
        assert_eq!(r.json()["done_reason"], "unload");
        assert_eq!(get(&st2, "/health").await.json()["status"], "ok");
    }

    /// A hung engine: within the stall timeout /health turns 503 ("stalled"), the stream ends
    /// with an error instead of hanging, and new requests get 503.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hung_engine_turns_health_503_within_the_stall_timeout() {
        let st = faulty(Fault::new(FaultKind::Hang, 3, 1), quick()).await;
        let start = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            post(&st, "/api/generate", json!({"model": "tiny", "prompt": "x", "options": GREEDY(30)})),
        )
        .await
        .expect("the stream ends instead of hanging");
        let lines = ndjson(&r);
        let e = lines.last().unwrap()["error"].as_str().unwrap().to_owned();
        assert!(e.contains("not responding") && e.contains("no progress"), "{e}");
        let v = get(&st, "/health").await;
        assert_eq!(v.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(v.json()["models"][0]["state"], "stalled");
        assert!(start.elapsed() < Duration::from_secs(5), "noticed within the stall timeout (+ polling)");
        let r = post(&st, "/api/generate", json!({"model": "tiny", "prompt": "more"})).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.error().contains("not responding"), "{}", r.error());
        assert!(!crate::server::watchdog_ok(&st), "a stalled pinned engine stops the watchdog");
    }

    /// Requests queued behind a hung engine (submitted before the stall is noticed) are
    /// answered too, not left waiting.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_queued_behind_a_hung_engine_are_answered() {
        let st = faulty(Fault::new(FaultKind::Hang, 3, 1), quick()).await;
        let first = {
            let st = st.clone();
            tokio::spawn(async move { post(&st, "/api/generate", json!({"model": "tiny", "prompt": "x"})).await })
        };
        // Hung at its third step, not yet past the 400 ms stall timeout: this one is queued.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let second = tokio::time::timeout(
            Duration::from_secs(10),
            post(&st, "/api/generate", json!({"model": "tiny", "prompt": "y", "stream": false})),
        )
        .await
        .expect("answered, not left in the queue");
        let first = tokio::time::timeout(Duration::from_secs(10), first).await.unwrap().unwrap();
        assert!(ndjson(&first).last().unwrap()["error"].as_str().unwrap().contains("not responding"));
        // Queued (then 500 from the stall) or refused at the door (503) once the stall showed.
        assert!([StatusCode::INTERNAL_SERVER_ERROR, StatusCode::SERVICE_UNAVAILABLE].contains(&second.status));
        assert!(second.error().contains("not responding"), "{}", second.error());
        let w = st.engines.handle("tiny").unwrap().stats.waiting.load(Ordering::SeqCst);
        assert_eq!(w, 0, "what the queue held was answered and uncounted");
    }
}

/// The engine-core settings in a config file, and the ones refused.
#[test]
fn config_file_engine_settings() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("serve.toml");
    let write = |text: &str| std::fs::write(&path, text).unwrap();
    write(
        "memory_budget_bytes = 1000000\nstall_timeout = 2.5\nrestart_backoff = 0.1\nmax_restarts = 0\nwarmup = false\n",
    );
    let c = ServeConfig::from_file(&path).unwrap();
    let e = c.engine().unwrap();
    assert_eq!(c.memory_budget(), 1_000_000);
    assert_eq!(
        (e.stall_timeout, e.restart_backoff, e.max_restarts, e.warmup),
        (Duration::from_millis(2500), Duration::from_millis(100), 0, false)
    );
    write("stall_timeout = 0\n");
    let err = ServeConfig::from_file(&path).unwrap_err().to_string();
    assert!(err.contains("stall_timeout must be above 0"), "{err}");
    write("stall_timeout = -1\n");
    let err = ServeConfig::from_file(&path).unwrap_err().to_string();
    assert!(err.contains("stall_timeout") && err.contains("expected seconds"), "{err}");
    write("max_restart = 2\n");
    let err = ServeConfig::from_file(&path).unwrap_err().to_string();
    assert!(err.contains("unknown field `max_restart`"), "{err}");
}
