//! `zoe-llm bench`: prompt-processing and decode throughput, measured like llama.cpp's
//! `llama-bench` so the two can be run side by side: `pp N` evaluates N prompt tokens in one
//! batch on an empty cache; `tg N` generates N tokens one at a time from an empty cache. Token ids
//! are pseudo-random (content does not change the work). One untimed warm-up run of each first;
//! then `reps` timed runs, reported as mean ± standard deviation.
//!
//! With a server URL, [`http_vs_loop`] runs the same decode length through a running server's
//! Ollama `/api/generate` stream and times it on the client: tokens received after the first one
//! over the wall time from the first streamed line to the `done` line, so the HTTP path (sampling,
//! detokenization, JSON, the socket) can be compared with the bare forwards of `tg N`.

use std::io::BufRead;
use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::model::kv_cache::ContiguousKvCache;
use crate::model::llama::ModelError;
use crate::model::loaded::LoadedModel;

#[derive(Clone, Debug, PartialEq)]
pub struct Throughput {
    pub test: String,
    pub tokens_per_s: f64,
    pub stddev: f64,
}

fn random_tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab as u64) as u32
        })
        .collect()
}

fn stats(test: String, rates: &[f64]) -> Throughput {
    let mean = rates.iter().sum::<f64>() / rates.len() as f64;
    let var = rates.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (rates.len().max(2) - 1) as f64;
    Throughput { test, tokens_per_s: mean, stddev: var.sqrt() }
}

/// Tokens per second of one pp run.
fn prompt_run<B: Backend>(m: &LoadedModel<B>, n: usize, seed: u64) -> Result<f64, ModelError> {
    let tokens = random_tokens(n, m.model.config.vocab_size, seed);
    let mut cache = ContiguousKvCache::new(&m.backend, m.model.config.n_layers, m.model.layout().kv_cols(), n)?;
    let t = Instant::now();
    m.model.forward(&m.backend, &tokens, &mut cache, false)?;
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// Tokens per second of one tg run.
fn decode_run<B: Backend>(m: &LoadedModel<B>, n: usize, seed: u64) -> Result<f64, ModelError> {
    let tokens = random_tokens(n, m.model.config.vocab_size, seed);
    let mut cache = ContiguousKvCache::new(&m.backend, m.model.config.n_layers, m.model.layout().kv_cols(), n)?;
    let t = Instant::now();
    for &tok in &tokens {
        m.model.forward(&m.backend, &[tok], &mut cache, false)?;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// Runs `pp prompt_tokens` and `tg gen_tokens` (either may be 0 to skip it).
pub fn run<B: Backend>(
    m: &LoadedModel<B>,
    prompt_tokens: usize,
    gen_tokens: usize,
    reps: usize,
) -> Result<Vec<Throughput>, ModelError> {
    let reps = reps.max(1);
    let mut out = Vec::new();
    if prompt_tokens > 0 {
        prompt_run(m, prompt_tokens, 0)?;
        let rates = (1..=reps).map(|r| prompt_run(m, prompt_tokens, r as u64)).collect::<Result<Vec<_>, _>>()?;
        out.push(stats(format!("pp{prompt_tokens}"), &rates));
    }
    if gen_tokens > 0 {
        decode_run(m, gen_tokens.min(16), 0)?;
        let rates = (1..=reps).map(|r| decode_run(m, gen_tokens, r as u64)).collect::<Result<Vec<_>, _>>()?;
        out.push(stats(format!("tg{gen_tokens}"), &rates));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Checkpoint benchmark: prefill sizes, batched decode, roofline

/// One line of the checkpoint benchmark.
#[derive(Clone, Debug, PartialEq)]
pub struct StepResult {
    /// `pp512` (one prompt of 512 tokens) or `tg b8` (decode, 8 sequences per step).
    pub test: String,
    /// Tokens per second (all sequences together for decode).
    pub tokens_per_s: f64,
    /// Milliseconds per forward: the prompt's time to first token, or one decode step.
    pub ms: f64,
    /// Decode only: weight + KV bytes one step reads ÷ step time ÷ measured copy bandwidth.
    pub roofline: Option<f64>,
}

/// What [`run_checkpoint`] measured.
#[derive(Clone, Debug)]
pub struct CheckpointReport {
    pub results: Vec<StepResult>,
    /// Bytes of weights one decode step reads (every linear and the head).
    pub weight_bytes: usize,
    /// The backend's measured device copy bandwidth, bytes/s (read + write counted).
    pub copy_bandwidth: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Prefill `prompts` token counts (one sequence each) and decode `steps` steps at each batch
/// size of `batches` (every sequence first prefilled with `context` tokens), each `reps` times
/// after one warm-up; reports medians. Roofline bytes per decode step = the model's weight
/// bytes + the K/V bytes of every sequence's context.
pub fn run_checkpoint<B: Backend>(
    m: &LoadedModel<B>,
    prompts: &[usize],
    batches: &[usize],
    context: usize,
    steps: usize,
    reps: usize,
) -> Result<CheckpointReport, ModelError>
where
    B::KvLayer: Send,
{
    use crate::model::paged_kv::PagedKvCache;
    let (be, model) = (&m.backend, &m.model);
    let cfg = &model.config;
    let reps = reps.max(1);
    let block = 16;
    let longest = prompts.iter().copied().max().unwrap_or(0).max(context + steps + 1);
    let max_batch = batches.iter().copied().max().unwrap_or(1).max(1);
    let blocks = (longest.div_ceil(block) + 1) * max_batch;
    let mut cache = PagedKvCache::new(be, cfg.n_layers, model.layout().kv_cols(), blocks, block)?;
    let mut results = Vec::new();
    let mut seed = 1u64;
    for &n in prompts {
        let mut times = Vec::new();
        for _ in 0..=reps {
            seed += 1;
            let prompt = random_tokens(n, cfg.vocab_size, seed);
            let (mut seq, _) = cache.start(&prompt, n);
            let t = Instant::now();
            model.forward_batch(be, &mut cache, &mut [(&prompt[..], &mut seq)])?;
            times.push(t.elapsed().as_secs_f64());
            cache.free(&mut seq);
        }
        let s = median(times[1..].to_vec());
        results.push(StepResult { test: format!("pp{n}"), tokens_per_s: n as f64 / s, ms: s * 1e3, roofline: None });
    }
    let weight_bytes = model.weight_bytes(be);
    let copy_bandwidth = be.copy_bandwidth();
    let kv_bytes_per_token = 2 * cfg.n_layers * model.layout().kv_cols() * be.kv_value_bytes();
    for &b in batches {
        let mut step_times = Vec::new();
        for rep in 0..=reps {
            let mut seqs = Vec::new();
            for _ in 0..b {
                seed += 1;
                let prompt = random_tokens(context, cfg.vocab_size, seed);
                let (mut seq, _) = cache.start(&prompt, context + steps + 1);
                model.forward_batch(be, &mut cache, &mut [(&prompt[..], &mut seq)])?;
                seqs.push((seq, random_tokens(steps, cfg.vocab_size, seed + 1000)));
            }
            for step in 0..steps {
                let toks: Vec<[u32; 1]> = seqs.iter().map(|(_, t)| [t[step]]).collect();
                let mut batch: Vec<(&[u32], &mut crate::model::paged_kv::Sequence)> =
                    seqs.iter_mut().zip(&toks).map(|((s, _), t)| (&t[..], s)).collect();
                let t = Instant::now();
                model.forward_batch(be, &mut cache, &mut batch)?;
                if rep > 0 {
                    step_times.push(t.elapsed().as_secs_f64());
                }
            }
            for (mut s, _) in seqs {
                cache.free(&mut s);
            }
        }
        let s = median(step_times);
        let bytes = weight_bytes + b * (context + steps / 2) * kv_bytes_per_token;
        results.push(StepResult {
            test: format!("tg b{b}"),
            tokens_per_s: b as f64 / s,
            ms: s * 1e3,
            roofline: Some(bytes as f64 / s / copy_bandwidth),
        });
    }
    Ok(CheckpointReport { results, weight_bytes, copy_bandwidth })
}

// ---------------------------------------------------------------------------------------------
// Decode through the HTTP stream

/// A raw prompt greedy decoding keeps extending (the list goes on), so a run does not stop early.
pub const HTTP_PROMPT: &str = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,";

#[derive(Debug, thiserror::Error)]
pub enum HttpBenchError {
    #[error("cannot reach the server at {url}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered {status}: {body}")]
    Status { url: String, status: reqwest::StatusCode, body: String },
    #[error("reading the stream from {url}")]
    Read {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the server reported an error in the stream: {0}")]
    Stream(String),
    #[error("stream line {line} is not a JSON object: {text:?}")]
    BadLine { line: usize, text: String },
    #[error("the stream ended without a done line")]
    NoDone,
    #[error("the server generated {eval_count} token(s) (done_reason {done_reason:?}); a rate needs at least 2")]
    TooFew { eval_count: u64, done_reason: Option<String> },
}

/// What one streamed `/api/generate` response carried, with the client's arrival times.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamStats {
    /// When the first `done: false` line arrived; `None` when the done line was the only one.
    pub first_at: Option<Instant>,
    /// When the `done: true` line arrived.
    pub done_at: Instant,
    /// `done: false` lines (a token whose text is still an incomplete UTF-8 sequence sends none).
    pub lines: usize,
    pub done_reason: Option<String>,
    /// Generated tokens, the first included (Ollama's convention).
    pub eval_count: u64,
    /// Server time of the forwards after the first token, in ns.
    pub eval_duration_ns: u64,
    pub prompt_eval_count: u64,
    pub prompt_eval_duration_ns: u64,
    pub total_duration_ns: u64,
}

impl StreamStats {
    /// Tokens that arrived after the first one.
    pub fn client_tokens(&self) -> u64 {
        self.eval_count.saturating_sub(1)
    }

    /// Client wall time from the first streamed line to the done line.
    pub fn client_secs(&self) -> Option<f64> {
        self.first_at.map(|t| self.done_at.saturating_duration_since(t).as_secs_f64())
    }

    /// Decode tokens/s seen by the client; `None` without a second token or a measurable span.
    pub fn client_rate(&self) -> Option<f64> {
        let secs = self.client_secs()?;
        (self.client_tokens() > 0 && secs > 0.0).then(|| self.client_tokens() as f64 / secs)
    }

    /// The server's own rate, `eval_count / eval_duration` as Ollama clients compute it.
    pub fn server_rate(&self) -> Option<f64> {
        (self.eval_count > 0 && self.eval_duration_ns > 0)
            .then(|| self.eval_count as f64 / (self.eval_duration_ns as f64 / 1e9))
    }
}

/// Reads an Ollama NDJSON stream given as `(arrival time, line)` pairs, up to its done line.
pub fn read_stream<I>(lines: I) -> Result<StreamStats, HttpBenchError>
where
    I: IntoIterator<Item = std::io::Result<(Instant, String)>>,
{
    let mut first_at = None;
    let mut count = 0;
    for (i, item) in lines.into_iter().enumerate() {
        let (at, text) = item.map_err(|source| HttpBenchError::Read { url: String::new(), source })?;
        if text.trim().is_empty() {
            continue;
        }
        let bad = || HttpBenchError::BadLine { line: i + 1, text: text.clone() };
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|_| bad())?;
        let obj = v.as_object().ok_or_else(bad)?;
        if let Some(e) = obj.get("error") {
            return Err(HttpBenchError::Stream(e.as_str().map_or_else(|| e.to_string(), str::to_owned)));
        }
        if obj.get("done").and_then(serde_json::Value::as_bool) != Some(true) {
            first_at.get_or_insert(at);
            count += 1;
            continue;
        }
        let n = |k: &str| obj.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
        return Ok(StreamStats {
            first_at,
            done_at: at,
            lines: count,
            done_reason: obj.get("done_reason").and_then(|r| r.as_str()).map(str::to_owned),
            eval_count: n("eval_count"),
            eval_duration_ns: n("eval_duration"),
            prompt_eval_count: n("prompt_eval_count"),
            prompt_eval_duration_ns: n("prompt_eval_duration"),
            total_duration_ns: n("total_duration"),
        });
    }
    Err(HttpBenchError::NoDone)
}

/// Checks a `--server` value: an http(s) URL with a host and no query; the returned base ends in
/// `/` so that `api/...` joins under any path prefix.
pub fn parse_server_url(s: &str) -> Result<reqwest::Url, String> {
    let mut url = reqwest::Url::parse(s)
        .map_err(|e| format!("{s:?} is not a URL (expected e.g. http://127.0.0.1:11434): {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{s:?}: expected an http:// or https:// URL with a host, e.g. http://127.0.0.1:11434"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{s:?}: the server URL takes no query or fragment"));
    }
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

/// A client to a bench target: no proxy (a proxy would be part of what is timed).
pub struct HttpTarget {
    client: reqwest::blocking::Client,
    base: reqwest::Url,
}

impl HttpTarget {
    pub fn new(base: reqwest::Url) -> Result<Self, HttpBenchError> {
        let client = reqwest::blocking::Client::builder()
            .user_agent(concat!("zoe-llm-bench/", env!("CARGO_PKG_VERSION")))
            .no_proxy()
            .connect_timeout(Duration::from_secs(10))
            // Covers a model load on the server's first request; a stall detector, not a budget.
            .timeout(Duration::from_secs(600))
            .build()
            .map_err(|source| HttpBenchError::Unreachable { url: base.to_string(), source })?;
        Ok(Self { client, base })
    }

    fn url(&self, path: &str) -> String {
        self.base.join(path).map_or_else(|_| format!("{}{path}", self.base), |u| u.to_string())
    }

    fn check(url: &str, resp: reqwest::blocking::Response) -> Result<reqwest::blocking::Response, HttpBenchError> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.text().unwrap_or_default();
        let body = if body.trim().is_empty() { "(empty body)".to_owned() } else { body.trim().to_owned() };
        Err(HttpBenchError::Status { url: url.to_owned(), status, body })
    }

    /// `GET /api/version`: fails early, before the in-process runs, if nothing answers there.
    pub fn probe(&self) -> Result<String, HttpBenchError> {
        let url = self.url("api/version");
        let resp =
            self.client.get(&url).send().map_err(|source| HttpBenchError::Unreachable { url: url.clone(), source })?;
        let resp = Self::check(&url, resp)?;
        let v: serde_json::Value = resp.json().unwrap_or_default();
        Ok(v.get("version").and_then(|v| v.as_str()).unwrap_or("unknown").to_owned())
    }

    /// One streamed raw greedy `/api/generate` of `n` tokens, timed as it arrives.
    pub fn generate(&self, model: &str, n: usize) -> Result<StreamStats, HttpBenchError> {
        let url = self.url("api/generate");
        let body = serde_json::json!({
            "model": model,
            "prompt": HTTP_PROMPT,
            "raw": true,
            "stream": true,
            "options": { "temperature": 0, "repeat_penalty": 1.0, "num_predict": n },
        });
        let resp = self
            .client
            .post(&url)
            .json(&body)
            .send()
            .map_err(|source| HttpBenchError::Unreachable { url: url.clone(), source })?;
        let resp = Self::check(&url, resp)?;
        let lines = std::io::BufReader::new(resp).lines().map(|l| l.map(|l| (Instant::now(), l)));
        read_stream(lines).map_err(|e| match e {
            HttpBenchError::Read { source, .. } => HttpBenchError::Read { url, source },
            e => e,
        })
    }
}

/// `tg N (http)`: the client-side rate and the server's own, over `reps` runs.
#[derive(Clone, Debug)]
pub struct HttpDecode {
    pub client: Throughput,
    /// `eval_count / eval_duration` from the done lines.
    pub server: Option<Throughput>,
    pub runs: Vec<StreamStats>,
}

/// `tg N (http)` against `tg N (generate loop)`: the same request (raw [`HTTP_PROMPT`], greedy,
/// no repeat penalty, `n` tokens) through the server's stream and through the generation loop in
/// process (sampler, detokenizer, stop checks), timed alike (tokens after the first over the time
/// after it). Runs alternate loop and HTTP, after one untimed warm-up of each (which also loads
/// the model on the server), so drift on a shared machine hits both alike; `http / loop` is the
/// cost of the server path alone.
pub fn http_vs_loop(
    m: &LoadedModel<crate::backend::cpu::CpuBackend>,
    target: &HttpTarget,
    model: &str,
    n: usize,
    reps: usize,
) -> anyhow::Result<(Throughput, HttpDecode)> {
    use crate::engine::generate::{generate, raw_prompt_ids, GenerateRequest};
    use crate::engine::sampler::SamplingParams;
    let prompt_ids = raw_prompt_ids(&m.tokenizer, HTTP_PROMPT)?;
    let req = GenerateRequest {
        prompt_ids,
        max_tokens: n,
        sampling: SamplingParams::greedy(),
        stop: vec![],
        logprobs: None,
        constraint: None,
        mm: None,
    };
    let in_process = || -> anyhow::Result<f64> {
        let keep_going = |_: crate::engine::generate::Emitted<'_>| std::ops::ControlFlow::Continue(());
        let g = generate(&m.model, &m.backend, &m.tokenizer, req.clone(), m.context_length, keep_going)?;
        g.timings.decode_tokens_per_s().ok_or_else(|| anyhow::anyhow!("the generation loop made fewer than 2 tokens"))
    };
    in_process()?;
    target.generate(model, n.min(16))?;
    let (mut rates, mut runs) = (Vec::new(), Vec::new());
    for _ in 0..reps.max(1) {
        rates.push(in_process()?);
        runs.push(target.generate(model, n)?);
    }
    Ok((stats(format!("tg{n} (generate loop)"), &rates), summarize_http(format!("tg{n} (http)"), runs)?))
}

/// The JSON Schema of `bench --constrained`: eight three-field objects, about 150 tokens of
/// output, so the decode rate is measured over a real stretch of constrained tokens.
pub fn constrained_schema() -> serde_json::Value {
    serde_json::json!({
        "type": "array", "minItems": 8, "maxItems": 8,
        "items": {
            "type": "object",
            "properties": {
                "room": { "type": "string", "enum": ["kitchen", "bedroom", "garden", "hall"] },
                "on": { "type": "boolean" },
                "brightness": { "type": "integer", "minimum": 0, "maximum": 100 }
            },
            "required": ["room", "on", "brightness"],
            "additionalProperties": false
        }
    })
}

/// One line of [`vision`]'s report.
#[derive(Clone, Debug)]
pub struct VisionResult {
    pub test: String,
    /// Median milliseconds per image.
    pub ms: f64,
    /// The vision tower only: GFLOP per image and the rate achieved.
    pub gflop: Option<f64>,
}

/// A 1920×1080 JPEG (quality 90) of smooth gradients and hard-edged shapes: a camera-frame-sized
/// input for the preprocessing benchmark.
pub fn test_jpeg_1080p() -> Vec<u8> {
    let img = image::RgbImage::from_fn(1920, 1080, |x, y| {
        let edge = ((x / 97 + y / 61) % 3 == 0) as u8 * 90;
        image::Rgb([(x / 8) as u8 ^ edge, (y / 5) as u8, ((x + 2 * y) / 12) as u8 ^ (edge / 2)])
    });
    // Baseline 4:2:0 Huffman, as cameras write (mozjpeg's own defaults would make it progressive).
    let mut c = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
    c.set_fastest_defaults();
    c.set_size(1920, 1080);
    c.set_quality(90.0);
    let encode = || -> std::io::Result<Vec<u8>> {
        let mut started = c.start_compress(Vec::new())?;
        started.write_scanlines(img.as_raw())?;
        started.finish()
    };
    encode().expect("encoding an in-memory image")
}

/// Image preprocessing (a 1080p JPEG, default and Orin-sized pixel budgets) and the vision
/// tower of Qwen2-VL-7B's shapes (synthetic fp16 weights) at `sides` (square images, pixels) on
/// the CPU with `threads` workers and, in a `cuda` build with a device, on the GPU: median of
/// `reps` after one warm-up each.
pub fn vision(reps: usize, sides: &[usize], threads: usize) -> anyhow::Result<Vec<VisionResult>> {
    use crate::model::vision::{ImageEncoder, VisionConfig, VisionTower};
    use crate::vision::{preprocess, PreprocessConfig};
    let reps = reps.max(1);
    let time = |f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<f64> {
        f()?;
        let mut v = Vec::with_capacity(reps);
        for _ in 0..reps {
            let t = Instant::now();
            f()?;
            v.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        Ok(median(v))
    };
    let jpeg = test_jpeg_1080p();
    let mut out = Vec::new();
    for max_pixels in [PreprocessConfig::default().max_pixels, 1_003_520] {
        let cfg = PreprocessConfig { max_pixels, ..PreprocessConfig::default() };
        let grid = preprocess(&jpeg, &cfg)?.grid_thw;
        let ms = time(&mut || preprocess(&jpeg, &cfg).map(|_| ()).map_err(Into::into))?;
        let test = format!("preprocess 1920x1080 JPEG, max_pixels {max_pixels} -> grid {grid:?}");
        out.push(VisionResult { test, ms, gflop: None });
    }
    // What an image the tower's cache holds still costs: its hash and header.
    let cfg = PreprocessConfig::default();
    let ms = time(&mut || crate::vision::probe(&jpeg, &cfg).map(|_| ()).map_err(Into::into))?;
    out.push(VisionResult { test: "probe 1920x1080 JPEG (a cached image: SHA-256 + header)".into(), ms, gflop: None });
    if sides.is_empty() {
        return Ok(out);
    }
    let config = VisionConfig::qwen2_vl_7b();
    let mut towers: Vec<(String, Box<dyn ImageEncoder>)> = Vec::new();
    #[cfg(feature = "cuda")]
    match crate::backend::cuda::CudaBackend::new(0) {
        Ok(be) => {
            let name = format!("CUDA {}", be.device());
            towers.push((name, Box::new(VisionTower::synthetic(be, config.clone(), 1))));
        }
        Err(e) => tracing::warn!("vision tower on the GPU not measured: {e}"),
    }
    let cpu = crate::backend::cpu::CpuBackend::new(threads);
    towers.push((format!("CPU, {threads} threads"), Box::new(VisionTower::synthetic(cpu, config.clone(), 1))));
    for (name, tower) in &towers {
        for &side in sides {
            let g = side / config.patch_size;
            let grid = [1, g - g % 2, g - g % 2];
            let rows = grid.iter().product::<usize>();
            let pixels: Vec<f32> =
                (0..rows * config.patch_cols()).map(|i| ((i * 7919) % 255) as f32 / 128.0 - 1.0).collect();
            let ms = time(&mut || {
                tower.forward(&pixels, &[grid]);
                Ok(())
            })?;
            let gflop = config.flops(&[grid]) / 1e9;
            let test = format!(
                "vision tower (Qwen2-VL-7B shapes, fp16 weights, {name}) {side}x{side}: {rows} patches, {} tokens",
                rows / 4
            );
            out.push(VisionResult { test, ms, gflop: Some(gflop) });
        }
    }
    Ok(out)
}

/// What [`constrained_vs_free`] measured.
#[derive(Clone, Debug)]
pub struct ConstrainedReport {
    pub free: Throughput,
    pub constrained: Throughput,
    /// Mean constrained output length, tokens.
    pub mean_len: f64,
    /// Compiling the schema the first time (includes building the tokenizer's token trie).
    pub first_compile_ms: f64,
    /// Compiling it again (the trie reused): what every later request pays.
    pub compile_ms: f64,
}

/// Constrained decoding's cost: the generation loop (sampling at temperature 0.8) with the
/// [`constrained_schema`] grammar, then without it for the same number of tokens from the same
/// prompt and seed, alternating, `reps` times after one warm-up of each.
pub fn constrained_vs_free<B: Backend>(m: &LoadedModel<B>, reps: usize) -> anyhow::Result<ConstrainedReport> {
    use crate::engine::generate::{generate, render_chat_prompt, user_message, GenerateRequest};
    use crate::engine::grammar::{Constraint, OutputFormat};
    use crate::engine::sampler::SamplingParams;
    let prompt_ids =
        render_chat_prompt(&m.tokenizer, &[user_message("List the lamps of a house as JSON: room, on, brightness.")])?;
    let compile = || {
        let t = Instant::now();
        let c =
            Constraint::new(&m.tokenizer, OutputFormat::JsonSchema(constrained_schema())).map_err(anyhow::Error::msg);
        (c, t.elapsed().as_secs_f64() * 1000.0)
    };
    // The first compile also builds the tokenizer's token trie; later ones reuse it.
    let (first, first_ms) = compile();
    first?;
    let (constraint, again_ms) = compile();
    let constraint = constraint?;
    let run = |seed: u64, max_tokens: usize, constraint: Option<Constraint>| -> anyhow::Result<(f64, usize)> {
        let sampling = SamplingParams { temperature: 0.8, top_k: 40, seed: Some(seed), ..SamplingParams::greedy() };
        let req = GenerateRequest {
            prompt_ids: prompt_ids.clone(),
            max_tokens,
            sampling,
            stop: vec![],
            logprobs: None,
            constraint,
            mm: None,
        };
        let keep_going = |_: crate::engine::generate::Emitted<'_>| std::ops::ControlFlow::Continue(());
        let g = generate(&m.model, &m.backend, &m.tokenizer, req, m.context_length, keep_going)?;
        let rate = g.timings.decode_tokens_per_s().ok_or_else(|| anyhow::anyhow!("fewer than 2 tokens generated"))?;
        Ok((rate, g.tokens.len()))
    };
    let (_, n) = run(0, 512, Some(constraint.clone()))?;
    run(0, n, None)?;
    let (mut free, mut constrained, mut lens) = (Vec::new(), Vec::new(), Vec::new());
    for r in 1..=reps.max(1) as u64 {
        let (rate, n) = run(r, 512, Some(constraint.clone()))?;
        constrained.push(rate);
        lens.push(n as f64);
        free.push(run(r, n, None)?.0);
    }
    let mean_len = lens.iter().sum::<f64>() / lens.len() as f64;
    Ok(ConstrainedReport {
        free: stats("tg (free)".into(), &free),
        constrained: stats("tg (JSON schema)".into(), &constrained),
        mean_len,
        first_compile_ms: first_ms,
        compile_ms: again_ms,
    })
}

fn summarize_http(test: String, runs: Vec<StreamStats>) -> Result<HttpDecode, HttpBenchError> {
    let mut rates = Vec::with_capacity(runs.len());
    for r in &runs {
        match r.client_rate() {
            Some(rate) => rates.push(rate),
            None => {
                return Err(HttpBenchError::TooFew { eval_count: r.eval_count, done_reason: r.done_reason.clone() })
            }
        }
    }
    let server: Option<Vec<f64>> = runs.iter().map(StreamStats::server_rate).collect();
    Ok(HttpDecode {
        client: stats(test.clone(), &rates),
        server: server.map(|s| stats(format!("{test} server"), &s)),
        runs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_tokens_are_in_range_and_reproducible() {
        let a = random_tokens(1000, 49152, 3);
        assert!(a.iter().all(|&t| t < 49152));
        assert_eq!(a, random_tokens(1000, 49152, 3));
        assert_ne!(a, random_tokens(1000, 49152, 4));
        assert!(a.iter().collect::<std::collections::HashSet<_>>().len() > 900);
    }

    #[test]
    fn stats_are_mean_and_sample_stddev() {
        let s = stats("pp8".into(), &[10.0, 12.0, 14.0]);
        assert_eq!(s.tokens_per_s, 12.0);
        assert!((s.stddev - 2.0).abs() < 1e-12);
    }

    /// A fake stream: `(ms after t0, line)` pairs.
    fn fake(t0: Instant, lines: &[(u64, &str)]) -> Vec<std::io::Result<(Instant, String)>> {
        lines.iter().map(|&(ms, l)| Ok((t0 + Duration::from_millis(ms), l.to_owned()))).collect()
    }

    fn piece(text: &str) -> String {
        serde_json::json!({"model": "smollm2", "created_at": "x", "response": text, "done": false}).to_string()
    }

    #[test]
    fn client_rate_counts_tokens_after_the_first_over_first_line_to_done() {
        let t0 = Instant::now();
        let (a, b, c, d) = (piece(" 11"), piece(","), piece(" 12"), piece(","));
        let done = r#"{"model":"smollm2","created_at":"x","response":"","done":true,"done_reason":"length","total_duration":900000000,"prompt_eval_count":20,"prompt_eval_duration":100000000,"eval_count":5,"eval_duration":400000000}"#;
        let stream = fake(t0, &[(100, &a), (200, &b), (300, &c), (400, ""), (400, &d), (600, done)]);
        let s = read_stream(stream).unwrap();
        assert_eq!(s.first_at, Some(t0 + Duration::from_millis(100)));
        assert_eq!(s.done_at, t0 + Duration::from_millis(600));
        assert_eq!((s.lines, s.eval_count, s.client_tokens()), (4, 5, 4));
        assert_eq!(s.done_reason.as_deref(), Some("length"));
        assert_eq!(
            (s.prompt_eval_count, s.prompt_eval_duration_ns, s.total_duration_ns),
            (20, 100_000_000, 900_000_000)
        );
        // 4 tokens after the first in 0.5 s of client time; the server's 5 / 0.4 s.
        assert!((s.client_rate().unwrap() - 8.0).abs() < 1e-9);
        assert!((s.server_rate().unwrap() - 12.5).abs() < 1e-9);
    }

    #[test]
    fn stream_without_a_second_token_has_no_rate() {
        let t0 = Instant::now();
        let done = r#"{"done":true,"done_reason":"stop","eval_count":1,"eval_duration":0}"#;
        let s = read_stream(fake(t0, &[(5, &piece("1")), (6, done)])).unwrap();
        assert_eq!((s.client_tokens(), s.client_rate(), s.server_rate()), (0, None, None));
        let s = read_stream(fake(t0, &[(6, r#"{"done":true}"#)])).unwrap();
        assert_eq!((s.first_at, s.lines, s.client_rate()), (None, 0, None));
        let e = summarize_http("tg4 (http)".into(), vec![s]).unwrap_err();
        assert!(matches!(e, HttpBenchError::TooFew { eval_count: 0, .. }), "{e}");
    }

    #[test]
    fn stream_errors() {
        let t0 = Instant::now();
        let e = read_stream(fake(t0, &[(1, &piece("a")), (2, r#"{"error":"model crashed"}"#)])).unwrap_err();
        assert_eq!(e.to_string(), "the server reported an error in the stream: model crashed");
        let e = read_stream(fake(t0, &[(1, &piece("a")), (2, "not json")])).unwrap_err();
        assert!(matches!(e, HttpBenchError::BadLine { line: 2, .. }), "{e}");
        let e = read_stream(fake(t0, &[(1, &piece("a")), (2, "[1]")])).unwrap_err();
        assert!(matches!(e, HttpBenchError::BadLine { line: 2, .. }), "{e}");
        assert!(matches!(read_stream(fake(t0, &[(1, &piece("a"))])), Err(HttpBenchError::NoDone)));
        let broken: Vec<std::io::Result<(Instant, String)>> = vec![Err(std::io::ErrorKind::ConnectionReset.into())];
        assert!(matches!(read_stream(broken), Err(HttpBenchError::Read { .. })));
    }

    #[test]
    fn summary_is_over_runs_and_keeps_early_stops() {
        let t0 = Instant::now();
        let run = |end_ms: u64, eval_count: u64, reason: &str| {
            let done = serde_json::json!({"done": true, "done_reason": reason, "eval_count": eval_count, "eval_duration": 1_000_000_000u64});
            read_stream(fake(t0, &[(0, &piece("1")), (end_ms, &done.to_string())])).unwrap()
        };
        // 9 tokens after the first in 1 s and in 0.5 s; the second stopped early at 5 tokens.
        let h = summarize_http("tg10 (http)".into(), vec![run(1000, 10, "length"), run(500, 5, "stop")]).unwrap();
        assert_eq!(h.client.test, "tg10 (http)");
        assert!((h.client.tokens_per_s - 8.5).abs() < 1e-9);
        assert!((h.server.unwrap().tokens_per_s - 7.5).abs() < 1e-9);
        assert_eq!(h.runs[1].done_reason.as_deref(), Some("stop"));
    }

    #[test]
    fn server_urls() {
        assert_eq!(parse_server_url("http://127.0.0.1:11600").unwrap().as_str(), "http://127.0.0.1:11600/");
        let u = parse_server_url("https://box.lan/ollama").unwrap();
        assert_eq!(u.join("api/generate").unwrap().as_str(), "https://box.lan/ollama/api/generate");
        for bad in ["127.0.0.1:11600", "localhost:11434", "ftp://x/", "http://x/?a=1", "", "http://"] {
            assert!(parse_server_url(bad).is_err(), "{bad}");
        }
    }
}
