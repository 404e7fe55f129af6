//! `/metrics`: Prometheus text with vLLM's names and the label `model_name`, plus zoe_* series
//! for the model manager and the supervisor.

use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::Shared;
use crate::engine::histogram::Histogram;
use crate::engine::service::ModelHandle;

/// A per-model histogram: (name, help, which one).
type HistogramSeries = (&'static str, &'static str, fn(&ModelHandle) -> &Histogram);

/// Per-model counters and gauges: (name, type, help, value).
type Series = (&'static str, &'static str, &'static str, fn(&ModelHandle) -> f64);

const PER_MODEL: &[Series] = &[
    ("vllm:num_requests_running", "gauge", "Requests being generated.", |h| h.stats.running.load(Relaxed) as f64),
    ("vllm:num_requests_waiting", "gauge", "Requests waiting to be scheduled.", |h| {
        h.stats.waiting.load(Relaxed) as f64
    }),
    ("vllm:kv_cache_usage_perc", "gauge", "Fraction of KV-cache blocks in use (0..1).", kv_usage),
    ("vllm:gpu_cache_usage_perc", "gauge", "Same as vllm:kv_cache_usage_perc (older dashboards).", kv_usage),
    ("vllm:prompt_tokens_total", "counter", "Prompt tokens processed.", |h| h.stats.prompt_tokens.load(Relaxed) as f64),
    ("vllm:generation_tokens_total", "counter", "Tokens generated.", |h| {
        h.stats.generation_tokens.load(Relaxed) as f64
    }),
    ("vllm:prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.", |h| {
        h.stats.prefix_queries.load(Relaxed) as f64
    }),
    ("vllm:prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.", |h| {
        h.stats.prefix_hits.load(Relaxed) as f64
    }),
    ("vllm:num_preemptions_total", "counter", "Sequences preempted (recomputed) when KV blocks ran out.", |h| {
        h.stats.preemptions.load(Relaxed) as f64
    }),
    ("zoe_engine_errors_total", "counter", "Generations that ended with an error.", |h| {
        h.stats.errors.load(Relaxed) as f64
    }),
    ("zoe_engine_retries_total", "counter", "Requests retried transparently after an engine failure.", |h| {
        h.stats.retries.load(Relaxed) as f64
    }),
    ("zoe_engine_restarts_total", "counter", "Times the supervisor restarted the model's engine.", |h| {
        h.health.restarts.load(Relaxed) as f64
    }),
    ("zoe_engine_alive", "gauge", "1 while the engine is ready and beating, else 0.", |h| {
        f64::from(u8::from(h.health.is_alive()))
    }),
    ("zoe_engine_heartbeat_age_seconds", "gauge", "Seconds since the engine loop last beat.", |h| {
        h.health.since_beat().as_secs_f64()
    }),
    ("zoe_kv_cache_blocks", "gauge", "KV-cache blocks of the model's pool.", |h| {
        h.stats.kv_blocks.load(Relaxed) as f64
    }),
    ("zoe_model_load_seconds", "gauge", "Time the model's load and warm-up took.", |h| h.load_duration.as_secs_f64()),
    ("zoe_model_size_bytes", "gauge", "Bytes the model holds: weights and KV cache.", |h| h.size_bytes() as f64),
];

fn kv_usage(h: &ModelHandle) -> f64 {
    h.stats.kv_blocks_used.load(Relaxed) as f64 / h.stats.kv_blocks.load(Relaxed).max(1) as f64
}

pub async fn handler(State(state): State<Shared>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], Body::from(render(&state))).into_response()
}

pub fn render(state: &Shared) -> String {
    let mut out = String::new();
    let resident = state.engines.resident();
    let head = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    for (name, kind, help, value) in PER_MODEL {
        head(&mut out, name, kind, help);
        for (h, _) in &resident {
            let _ = writeln!(out, "{name}{{model_name=\"{}\"}} {}", h.id, value(h));
        }
    }
    head(&mut out, "vllm:request_success_total", "counter", "Finished requests by finish reason.");
    for (h, _) in &resident {
        let s = &h.stats;
        for (reason, c) in [("stop", &s.finished_stop), ("length", &s.finished_length), ("abort", &s.finished_abort)] {
            let _ = writeln!(
                out,
                "vllm:request_success_total{{model_name=\"{}\",finished_reason=\"{reason}\"}} {}",
                h.id,
                c.load(Relaxed)
            );
        }
    }
    let histograms: [HistogramSeries; 3] = [
        ("vllm:time_to_first_token_seconds", "Time from arrival to the first token.", |h| &h.stats.ttft),
        ("vllm:time_per_output_token_seconds", "Mean time per output token after the first, per request.", |h| {
            &h.stats.tpot
        }),
        ("vllm:e2e_request_latency_seconds", "Time from arrival to the end of the request.", |h| &h.stats.e2e),
    ];
    for (name, help, get) in histograms {
        head(&mut out, name, "histogram", help);
        for (h, _) in &resident {
            get(h).render(name, &format!("model_name=\"{}\"", h.id), &mut out);
        }
    }
    // Vision-language models: the tower's output cache (images resent with every turn) and the
    // tower runs in progress. One cache snapshot per model, so a scrape's series agree.
    const VISION: [(&str, &str, &str); 5] = [
        ("zoe_vision_cache_hits_total", "counter", "Images whose tower output was found in the cache."),
        ("zoe_vision_cache_misses_total", "counter", "Images the vision tower had to encode."),
        ("zoe_vision_cache_entries", "gauge", "Images whose tower output the cache holds."),
        ("zoe_vision_cache_bytes", "gauge", "Bytes of tower output the cache holds."),
        ("zoe_vision_encoding", "gauge", "Vision-tower runs in progress."),
    ];
    let vision: Vec<(&str, [u64; 5])> = resident
        .iter()
        .filter_map(|(h, _)| {
            let v = h.vision.as_ref()?;
            let (bytes, entries, hits, misses) = v.cache_stats();
            Some((h.id.as_str(), [hits, misses, entries as u64, bytes as u64, v.encoding() as u64]))
        })
        .collect();
    for (i, (name, kind, help)) in VISION.iter().enumerate() {
        head(&mut out, name, kind, help);
        for (id, values) in &vision {
            let _ = writeln!(out, "{name}{{model_name=\"{id}\"}} {}", values[i]);
        }
    }
    // Every model the registry knows and the store holds: resident or not.
    head(&mut out, "zoe_model_resident", "gauge", "1 when the model is loaded, else 0.");
    for m in state.registry.manifests() {
        let loaded = state.engines.is_loaded(&m.id);
        if loaded || state.engines.source().present(m) {
            let _ = writeln!(out, "zoe_model_resident{{model_name=\"{}\"}} {}", m.id, u8::from(loaded));
        }
    }
    head(&mut out, "zoe_memory_budget_bytes", "gauge", "Bytes the resident models may hold together.");
    let _ = writeln!(out, "zoe_memory_budget_bytes {}", state.engines.budget);
    head(&mut out, "zoe_memory_used_bytes", "gauge", "Bytes the resident models hold.");
    let _ = writeln!(out, "zoe_memory_used_bytes {}", state.engines.memory_used());
    let ups = &state.providers.upstreams;
    if !ups.is_empty() {
        use std::sync::atomic::Ordering::Relaxed;
        type UpSeries = (&'static str, &'static str, &'static str, fn(&crate::provider::upstream::Upstream) -> f64);
        let series: [UpSeries; 5] = [
            ("zoe_upstream_up", "gauge", "1 while the upstream's circuit breaker is closed, else 0.", |u| {
                f64::from(u8::from(u.breaker.allows()))
            }),
            ("zoe_upstream_requests_total", "counter", "Requests the upstream answered.", |u| {
                u.ok.load(Relaxed) as f64
            }),
            (
                "zoe_upstream_failures_total",
                "counter",
                "Attempts that failed before an answer (retries included).",
                |u| u.failures.load(Relaxed) as f64,
            ),
            (
                "zoe_upstream_skipped_total",
                "counter",
                "Requests that skipped the upstream while its breaker was open.",
                |u| u.skipped.load(Relaxed) as f64,
            ),
            ("zoe_upstream_breaker_opened_total", "counter", "Times the upstream's circuit breaker opened.", |u| {
                u.breaker.snapshot().opened_total as f64
            }),
        ];
        for (name, kind, help, get) in series {
            head(&mut out, name, kind, help);
            for u in ups {
                let _ = writeln!(out, "{name}{{upstream=\"{}\"}} {}", u.name(), get(u));
            }
        }
    }
    out
}
