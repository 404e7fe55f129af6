//! The HTTP surface in-process (tower `oneshot`) over the tiny random model: wire framing field
//! by field, every error path, the Host/CORS layer, and a generated-input run of bad requests.
//! Real clients against a real server and model are in tests/serve.rs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use serde_json::{json, Value};
use tower::ServiceExt;

use super::engines::{Engines, ModelSource};
use super::{router, AppState, ServeConfig, Shared};
use crate::backend::cpu::CpuBackend;
use crate::hub::{HubError, Manifest, PullEvent, PullOptions, Registry};
use crate::model::llama::Llama;
use crate::model::loaded::LoadedModel;
use crate::model::test_model::{self, CHATML, CONTEXT};
use crate::model::tokenizer::Tokenizer;
use crate::model::weights::MetaValue;

pub(super) const TINY: &str = r#"
id = "tiny"
aliases = ["tiny:1b"]
roles = ["default", "chat"]
format = "gguf"
architecture = "llama"
[source]
kind = "huggingface"
repo = "test/tiny"
[[files]]
name = "tiny.gguf"
sha256 = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
primary = true
[defaults]
context_length = 256
[defaults.sampling]
temperature = 0.7
"#;

/// The tiny model again, offered as tool-capable (its template renders no tools, so they go
/// into the system message).
pub(super) const TINY_TOOLS: &str = r#"
id = "tiny-tools"
roles = ["chat", "tools"]
format = "gguf"
architecture = "llama"
[source]
kind = "huggingface"
repo = "test/tiny"
[[files]]
name = "tiny.gguf"
sha256 = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
primary = true
[defaults]
context_length = 2048
"#;

/// The tiny transformers-made Qwen2-VL (tests/fixtures/qwen2_vl_tiny) with a test tokenizer.
pub(super) const TINY_VL: &str = r#"
id = "tiny-vl"
roles = ["chat", "vision"]
format = "gguf"
architecture = "qwen2"
[source]
kind = "huggingface"
repo = "test/tiny-vl"
[[files]]
name = "tiny-vl.gguf"
sha256 = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
primary = true
[defaults]
context_length = 512
"#;

/// [`TINY_VL`] with a deep synthetic vision tower ([`slow_vl`]): an image takes the tower seconds.
pub(super) const SLOW_VL: &str = r#"
id = "slow-vl"
roles = ["vision"]
format = "gguf"
architecture = "qwen2"
[source]
kind = "huggingface"
repo = "test/slow-vl"
[[files]]
name = "slow-vl.gguf"
sha256 = "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc"
primary = true
[defaults]
context_length = 512
"#;

const ABSENT: &str = r#"
id = "absent"
format = "gguf"
architecture = "llama"
[source]
kind = "huggingface"
repo = "test/absent"
[[files]]
name = "absent.gguf"
primary = true
[defaults]
context_length = 256
"#;

const AWQ: &str = r#"
id = "big-awq"
roles = ["tools", "vision"]
format = "awq-safetensors"
architecture = "qwen2"
[source]
kind = "huggingface"
repo = "test/awq"
[[files]]
name = "model.safetensors"
primary = true
[defaults]
context_length = 256
"#;

/// The tiny model (and an AWQ one) "in the store"; pull and delete flip presence.
pub(super) struct TestSource {
    pub(super) tiny_present: AtomicBool,
    pub(super) pulls: Mutex<usize>,
    /// What `size` reports for every model.
    pub(super) size: u64,
    /// Loads so far; from the `fail_from`th on (counting from 1), loading fails.
    pub(super) loads: std::sync::atomic::AtomicUsize,
    pub(super) fail_from: usize,
}

impl TestSource {
    pub(super) fn new(size: u64) -> Self {
        Self { tiny_present: AtomicBool::new(true), pulls: Mutex::new(0), size, loads: 0.into(), fail_from: usize::MAX }
    }
}

impl ModelSource for TestSource {
    fn present(&self, m: &Manifest) -> bool {
        match m.id.as_str() {
            "tiny" | "tiny2" | "tiny-tools" | "tiny-vl" | "slow-vl" => self.tiny_present.load(Ordering::SeqCst),
            "big-awq" => true,
            _ => false,
        }
    }
    fn size(&self, _: &Manifest) -> u64 {
        self.size
    }
    fn modified(&self, _: &Manifest) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }
    fn digest(&self, m: &Manifest) -> String {
        m.primary().sha256.clone().unwrap_or_default()
    }
    fn load(&self, m: &Manifest) -> Result<crate::model::loaded::AnyModel, String> {
        let n = self.loads.fetch_add(1, Ordering::SeqCst) + 1;
        if n >= self.fail_from {
            return Err(format!("the test source refuses load {n}"));
        }
        if m.id == "tiny-vl" {
            return Ok(tiny_vl().into());
        }
        if m.id == "slow-vl" {
            return Ok(slow_vl().into());
        }
        let mut w = test_model::writer(3);
        w.kv("tokenizer.chat_template", MetaValue::String(CHATML.into()));
        // Tools in the system prompt take many of its one-byte tokens.
        let context_length = if m.id == "tiny-tools" { 2048 } else { CONTEXT };
        w.kv("llama.context_length", MetaValue::U32(context_length as u32));
        let file = w.build();
        let backend = CpuBackend::new(1);
        let model = Llama::from_gguf(&file, &backend).map_err(|e| e.to_string())?;
        let tokenizer = Tokenizer::from_gguf(&file).map_err(|e| e.to_string())?;
        Ok(LoadedModel { id: m.id.clone(), backend, model, tokenizer, context_length, vision: None }.into())
    }
    fn pull(&self, m: &Manifest, opts: &PullOptions) -> Result<(), HubError> {
        *self.pulls.lock().unwrap() += 1;
        let sink = opts.on_event.as_ref().expect("the server passes a sink");
        let digest = m.primary().sha256.clone();
        sink(&PullEvent::Resolving);
        for completed in [0, 500, 1000] {
            sink(&PullEvent::Downloading {
                file: m.primary().name.clone(),
                digest: digest.clone(),
                total: Some(1000),
                completed,
            });
        }
        sink(&PullEvent::Verifying { file: m.primary().name.clone() });
        sink(&PullEvent::Done { file: m.primary().name.clone() });
        self.tiny_present.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn delete(&self, _: &Manifest) -> Result<(), String> {
        self.tiny_present.store(false, Ordering::SeqCst);
        Ok(())
    }
}

/// [`tiny_vl`] whose vision tower is synthetic, 64 blocks deep: a 448×448 image (1024 patches)
/// keeps it busy for seconds, long enough to hang up in the middle.
fn slow_vl() -> LoadedModel<CpuBackend> {
    use crate::model::vision::{VisionConfig, VisionTower};
    let mut m = tiny_vl();
    let v = m.vision.take().expect("tiny-vl has vision");
    let config = VisionConfig { depth: 64, embed_dim: 32, num_heads: 2, mlp_hidden: 128, ..v.tower.config().clone() };
    let tower = VisionTower::synthetic(CpuBackend::new(1), config, 7);
    m.vision = Some(Arc::new(crate::vision::Vision::new(Box::new(tower), v.tokens, v.preprocess.clone())));
    m.id = "slow-vl".into();
    m
}

/// The tiny Qwen2-VL checkpoint with the test model's byte-level vocabulary, padded to the
/// checkpoint's 300 ids with its vision tokens at their config.json ids, and Qwen2-VL's template.
fn tiny_vl() -> LoadedModel<CpuBackend> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2_vl_tiny");
    let config: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let n = config["vocab_size"].as_u64().unwrap() as usize;
    let mut tokens = test_model::vocab();
    let mut types = vec![1i32; tokens.len()];
    types[..3].fill(3);
    let named = [
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
    ];
    while tokens.len() < n {
        let id = tokens.len() as u64;
        let name = named.iter().find(|(k, _)| config[k].as_u64() == Some(id)).map(|(_, t)| t.to_string());
        tokens.push(name.unwrap_or_else(|| format!("<|unused_{id}|>")));
        types.push(3);
    }
    let strs = |v: Vec<String>| MetaValue::Array(v.into_iter().map(MetaValue::String).collect());
    let template = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_templates/qwen2-vl-instruct.jinja"),
    )
    .unwrap();
    let mut w = crate::model::weights::gguf_writer::GgufWriter::new();
    w.kv("tokenizer.ggml.model", MetaValue::String("gpt2".into()))
        .kv("tokenizer.ggml.pre", MetaValue::String("gpt2".into()))
        .kv("tokenizer.ggml.tokens", strs(tokens))
        .kv("tokenizer.ggml.token_type", MetaValue::Array(types.into_iter().map(MetaValue::I32).collect()))
        .kv("tokenizer.ggml.merges", strs(vec!["h e".into(), "\u{120} t".into()]))
        .kv("tokenizer.ggml.eos_token_id", MetaValue::U32(test_model::IM_END))
        .kv("tokenizer.chat_template", MetaValue::String(template));
    let tokenizer = Tokenizer::from_gguf(&w.build()).unwrap();
    let backend = CpuBackend::new(1);
    let st = crate::model::weights::safetensors::SafetensorsDir::open(&dir).unwrap();
    let (cfg, _) = crate::model::config::ModelConfig::from_hf_json(&config).unwrap();
    let model = Llama::from_safetensors(&st, cfg, None, &backend).unwrap();
    let vision = crate::vision::Vision::load(&dir, &config, &st, 64, || Ok(CpuBackend::new(1))).unwrap().map(Arc::new);
    assert!(vision.is_some());
    LoadedModel { id: "tiny-vl".into(), backend, model, tokenizer, context_length: 512, vision }
}

pub(super) fn state_with(config: ServeConfig) -> Shared {
    state_from(config, &[TINY, TINY_TOOLS, ABSENT, AWQ], TestSource::new(1234))
}

/// A state over `manifests` (TOML) and `source`; the memory budget is unlimited unless
/// configured.
pub(super) fn state_from(config: ServeConfig, manifests: &[&str], source: TestSource) -> Shared {
    let engine = config.engine().unwrap();
    state_full(config, engine, manifests, source)
}

/// [`state_from`] with engine settings of its own (an injected fault).
pub(super) fn state_full(
    config: ServeConfig,
    engine: crate::engine::service::EngineConfig,
    manifests: &[&str],
    source: TestSource,
) -> Shared {
    let manifests = manifests.iter().map(|t| Manifest::from_toml(t, "test").unwrap()).collect();
    let registry = Registry::new(manifests).unwrap();
    let budget = config.memory_budget_bytes.unwrap_or(u64::MAX);
    let engines = Engines::new(Arc::new(source), engine, config.keep_alive, budget);
    Arc::new(AppState {
        registry,
        engines,
        config,
        loopback: true,
        providers: crate::provider::Providers::local_only(),
        shutdown: Default::default(),
    })
}

pub(super) fn state() -> Shared {
    state_with(ServeConfig::default())
}

pub(super) struct Reply {
    pub(super) status: StatusCode,
    pub(super) headers: axum::http::HeaderMap,
    pub(super) body: Vec<u8>,
}

impl Reply {
    pub(super) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    pub(super) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub(super) fn content_type(&self) -> &str {
        self.headers.get(header::CONTENT_TYPE).map_or("", |v| v.to_str().unwrap())
    }
    /// The error message in either dialect's shape.
    pub(super) fn error(&self) -> String {
        let v = self.json();
        match &v["error"] {
            Value::String(s) => s.clone(),
            Value::Object(o) => o["message"].as_str().unwrap().to_owned(),
            _ => panic!("no error in {v}"),
        }
    }
}

pub(super) async fn send_raw(st: &Shared, req: Request<Body>) -> Reply {
    let resp = router(st.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap().to_vec();
    Reply { status, headers, body }
}

pub(super) async fn call(st: &Shared, method: Method, path: &str, body: impl Into<Body>) -> Reply {
    let req =
        Request::builder().method(method).uri(path).header(header::HOST, "localhost:11434").body(body.into()).unwrap();
    send_raw(st, req).await
}

pub(super) async fn post(st: &Shared, path: &str, body: Value) -> Reply {
    call(st, Method::POST, path, body.to_string()).await
}

pub(super) async fn get(st: &Shared, path: &str) -> Reply {
    call(st, Method::GET, path, Body::empty()).await
}

pub(super) fn ndjson(r: &Reply) -> Vec<Value> {
    assert_eq!(r.content_type(), "application/x-ndjson");
    let text = r.text();
    assert!(text.ends_with('\n'), "every line ends in \\n");
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("line {l:?}: {e}"))).collect()
}

/// SSE events (`data: <json>` or `data: [DONE]`), checking the framing.
pub(super) fn sse(r: &Reply) -> Vec<String> {
    assert_eq!(r.content_type(), "text/event-stream");
    let text = r.text();
    assert!(text.ends_with("\n\n"));
    text.split_terminator("\n\n")
        .map(|e| e.strip_prefix("data: ").unwrap_or_else(|| panic!("event without data: {e:?}")).to_owned())
        .collect()
}

pub(super) const GREEDY: fn(u32) -> Value = |n| json!({ "temperature": 0, "num_predict": n });

fn is_rfc3339(s: &str) -> bool {
    chrono::DateTime::parse_from_rfc3339(s).is_ok() && s.ends_with('Z')
}

#[tokio::test]
async fn root_version_and_head() {
    let st = state();
    let r = get(&st, "/").await;
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "Ollama is running"));
    assert!(r.content_type().starts_with("text/plain"));
    let r = call(&st, Method::HEAD, "/", Body::empty()).await;
    assert_eq!((r.status, r.body.len()), (StatusCode::OK, 0));
    let v = get(&st, "/api/version").await.json();
    assert!(v["version"].as_str().unwrap().split('.').count() == 3);
    assert_eq!(call(&st, Method::HEAD, "/api/version", Body::empty()).await.status, StatusCode::OK);
    assert_eq!(get(&st, "/version").await.json()["version"], env!("CARGO_PKG_VERSION"));
    let r = get(&st, "/no/such/path").await;
    assert_eq!((r.status, r.text().as_str()), (StatusCode::NOT_FOUND, "404 page not found"));
    assert_eq!(get(&st, "/api/generate").await.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(r.headers.get("x-request-id").is_some(), "every response carries its request id");
}

#[tokio::test]
async fn generate_stream_framing_and_final_line() {
    let st = state();
    let r = post(&st, "/api/generate", json!({"model": "tiny", "prompt": "hello there", "options": GREEDY(12)})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let lines = ndjson(&r);
    let (last, pieces) = lines.split_last().unwrap();
    assert!(!pieces.is_empty());
    for l in pieces {
        assert_eq!(l["model"], "tiny");
        assert!(is_rfc3339(l["created_at"].as_str().unwrap()));
        assert!(l["response"].is_string() && l["done"] == false);
        assert!(l.get("done_reason").is_none() && l.get("eval_count").is_none() && l.get("context").is_none());
    }
    assert_eq!(last["done"], true);
    assert_eq!(last["response"], "");
    assert_eq!(last["done_reason"], "length");
    assert_eq!(last["eval_count"], 12);
    for k in ["total_duration", "prompt_eval_count", "prompt_eval_duration", "eval_duration"] {
        assert!(last[k].as_u64().unwrap() > 0, "{k} in {last}");
    }
    let ctx: Vec<u64> = last["context"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert_eq!(ctx.len() as u64, last["prompt_eval_count"].as_u64().unwrap() + 12);
    let streamed: String = pieces.iter().map(|l| l["response"].as_str().unwrap()).collect();

    // stream:false: one object with the whole text and the same greedy output.
    let r = post(
        &st,
        "/api/generate",
        json!({"model": "tiny:1b", "prompt": "hello there", "stream": false, "options": GREEDY(12)}),
    )
    .await;
    assert!(r.content_type().starts_with("application/json"));
    let one = r.json();
    assert_eq!((one["done"].clone(), one["model"].clone()), (json!(true), json!("tiny:1b")));
    assert_eq!(one["response"].as_str().unwrap(), streamed);
    assert_eq!(one["context"], last["context"]);
}

#[tokio::test]
async fn generate_raw_system_template_and_context() {
    let st = state();
    let raw = post(
        &st,
        "/api/generate",
        json!({"model": "tiny", "prompt": "abc", "raw": true, "stream": false, "options": GREEDY(3)}),
    )
    .await
    .json();
    assert!(raw.get("context").is_none(), "raw responses carry no context");
    let r = post(&st, "/api/generate", json!({"model": "tiny", "prompt": "abc", "raw": true, "system": "s"})).await;
    assert_eq!(
        (r.status, r.error().as_str()),
        (StatusCode::BAD_REQUEST, "raw mode does not support template, system, or context")
    );

    // The context returned starts with the rendered prompt: check what system and template did.
    let tok = Tokenizer::from_gguf(&test_model::gguf(3)).unwrap();
    let prompt_of = |v: &Value| {
        let ids: Vec<u32> = v["context"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let n = v["prompt_eval_count"].as_u64().unwrap() as usize;
        tok.decode(&ids[..n], false)
    };
    let v = post(
        &st,
        "/api/generate",
        json!({"model": "tiny", "prompt": "hi", "system": "be brief", "stream": false, "options": GREEDY(2)}),
    )
    .await
    .json();
    assert_eq!(
        prompt_of(&v),
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    let t = "{{ if .System }}[{{ .System }}]{{ end }}Q: {{ .Prompt }} A:";
    let v = post(
        &st,
        "/api/generate",
        json!({"model": "tiny", "prompt": "hi", "system": "s", "template": t, "stream": false, "options": GREEDY(2)}),
    )
    .await
    .json();
    assert_eq!(prompt_of(&v), "[s]Q: hi A:");
    // `context` goes first, as Ollama's deprecated continuation.
    let first = prompt_of(&v);
    let ctx = v["context"].clone();
    let v2 = post(&st, "/api/generate", json!({"model": "tiny", "prompt": "more", "template": "{{ .Prompt }}", "context": ctx, "stream": false, "options": GREEDY(2)})).await.json();
    assert!(prompt_of(&v2).starts_with(&first) && prompt_of(&v2).ends_with("more"), "{}", prompt_of(&v2));

    let r = post(
        &st,
        "/api/generate",
        json!({"model": "tiny", "prompt": "hi", "template": "{{ range .Messages }}x{{ end }}"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.error().contains("range"), "{}", r.error());
}

#[tokio::test]
async fn chat_stream_and_non_stream_agree() {
    let st = state();
    let body = |stream: bool| {
        json!({"model": "tiny", "stream": stream, "options": GREEDY(10),
               "messages": [{"role": "system", "content": "sys"}, {"role": "USER", "content": "hello"}]})
    };
    let lines = ndjson(&post(&st, "/api/chat", body(true)).await);
    let (last, pieces) = lines.split_last().unwrap();
    for l in pieces {
        assert_eq!(l["message"]["role"], "assistant");
        assert!(l["message"]["content"].is_string() && l["done"] == false);
    }
    assert_eq!((last["done"].clone(), last["message"]["content"].clone()), (json!(true), json!("")));
    assert_eq!(last["done_reason"], "length");
    assert!(last.get("context").is_none());
    let streamed: String = pieces.iter().map(|l| l["message"]["content"].as_str().unwrap()).collect();
    let one = post(&st, "/api/chat", body(false)).await.json();
    assert_eq!(one["message"]["content"].as_str().unwrap(), streamed);
    assert_eq!(one["eval_count"], 10);
}

#[tokio::test]
async fn load_unload_ps_tags_show() {
    let st = state();
    assert_eq!(get(&st, "/api/ps").await.json(), json!({"models": []}));
    let v = post(&st, "/api/generate", json!({"model": "tiny"})).await.json();
    assert_eq!(
        (v["done"].clone(), v["done_reason"].clone(), v["response"].clone()),
        (json!(true), json!("load"), json!(""))
    );
    let ps = get(&st, "/api/ps").await.json();
    let m = &ps["models"][0];
    assert_eq!((m["name"].clone(), m["context_length"].clone()), (json!("tiny:1b"), json!(256)));
    let expires = chrono::DateTime::parse_from_rfc3339(m["expires_at"].as_str().unwrap()).unwrap();
    let in_secs = expires.timestamp() - chrono::Utc::now().timestamp();
    assert!((290..=300).contains(&in_secs), "default keep_alive is 5m: {in_secs}");
    post(&st, "/api/chat", json!({"model": "tiny", "messages": [], "keep_alive": "10m"})).await;
    let ps = get(&st, "/api/ps").await.json();
    let expires = chrono::DateTime::parse_from_rfc3339(ps["models"][0]["expires_at"].as_str().unwrap()).unwrap();
    assert!((590..=600).contains(&(expires.timestamp() - chrono::Utc::now().timestamp())));
    let v = post(&st, "/api/generate", json!({"model": "tiny", "keep_alive": 0})).await.json();
    assert_eq!(v["done_reason"], "unload");
    assert_eq!(get(&st, "/api/ps").await.json(), json!({"models": []}));
    // A pinned model (loaded at start) keeps "never" whatever requests say.
    st.engines.pin("tiny");
    post(&st, "/api/generate", json!({"model": "tiny", "prompt": "x", "keep_alive": "1m", "options": GREEDY(1)})).await;
    assert_eq!(get(&st, "/api/ps").await.json()["models"][0]["expires_at"], "9999-12-31T23:59:59.000000000Z");
    let r = post(&st, "/api/generate", json!({"model": "tiny", "keep_alive": "300"})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.error().contains("invalid duration \"300\""), "{}", r.error());

    let tags = get(&st, "/api/tags").await.json();
    let names: Vec<&str> = tags["models"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["tiny:1b", "tiny-tools:latest", "big-awq:latest"]);
    let t = &tags["models"][0];
    assert_eq!(
        (t["size"].clone(), t["details"]["format"].clone(), t["details"]["family"].clone()),
        (json!(1234), json!("gguf"), json!("llama"))
    );
    assert!(is_rfc3339(t["modified_at"].as_str().unwrap()));

    let show = post(&st, "/api/show", json!({"name": "tiny"})).await.json();
    assert_eq!(show["capabilities"], json!(["completion"]));
    assert_eq!(show["model_info"]["llama.context_length"], 256);
    assert_eq!(show["template"], CHATML);
    assert!(show["parameters"].as_str().unwrap().contains("temperature 0.7"));
    let r = post(&st, "/api/show", json!({})).await;
    assert_eq!((r.status, r.error().as_str()), (StatusCode::BAD_REQUEST, "model is required"));
    let r = post(&st, "/api/show", json!({"model": "absent"})).await;
    assert_eq!((r.status, r.error().as_str()), (StatusCode::NOT_FOUND, "model 'absent' not found"));
}

#[tokio::test]
async fn pull_and_delete() {
    let st = state();
    let r = call(&st, Method::DELETE, "/api/delete", json!({"model": "tiny"}).to_string()).await;
    assert_eq!((r.status, r.body.len()), (StatusCode::OK, 0));
    let r = call(&st, Method::DELETE, "/api/delete", json!({"model": "tiny"}).to_string()).await;
    assert_eq!((r.status, r.error().as_str()), (StatusCode::NOT_FOUND, "model 'tiny' not found"));
    assert_eq!(post(&st, "/api/generate", json!({"model": "tiny", "prompt": "x"})).await.status, StatusCode::NOT_FOUND);

    let lines = ndjson(&post(&st, "/api/pull", json!({"model": "tiny"})).await);
    let statuses: Vec<&str> = lines.iter().map(|l| l["status"].as_str().unwrap()).collect();
    assert_eq!(statuses.first(), Some(&"pulling manifest"));
    assert_eq!(&statuses[statuses.len() - 3..], ["verifying sha256 digest", "writing manifest", "success"]);
    let dl: Vec<&Value> = lines.iter().filter(|l| l.get("completed").is_some()).collect();
    assert_eq!(dl.len(), 3);
    assert_eq!(dl[0]["status"], "pulling aaaaaaaaaaaa");
    assert_eq!(dl[2]["digest"], format!("sha256:{}", "a".repeat(64)));
    assert_eq!((dl[2]["total"].clone(), dl[2]["completed"].clone()), (json!(1000), json!(1000)));
    assert_eq!(
        post(&st, "/api/pull", json!({"model": "tiny", "stream": false})).await.json(),
        json!({"status": "success"})
    );
    assert_eq!(post(&st, "/api/pull", json!({"model": "nope"})).await.status, StatusCode::NOT_FOUND);

    for path in ["/api/create", "/api/push", "/api/copy"] {
        let r = post(&st, path, json!({"model": "tiny"})).await;
        assert_eq!(r.status, StatusCode::NOT_IMPLEMENTED);
        assert!(r.error().contains("not supported"), "{}", r.error());
    }
}

#[tokio::test]
async fn embeddings_in_both_dialects() {
    let st = state();
    let v = post(&st, "/api/embed", json!({"model": "tiny", "input": ["a b", "hello"]})).await.json();
    let embs = v["embeddings"].as_array().unwrap();
    assert_eq!(embs.len(), 2);
    let norm = |e: &Value| e.as_array().unwrap().iter().map(|x| x.as_f64().unwrap().powi(2)).sum::<f64>().sqrt();
    for e in embs {
        assert_eq!(e.as_array().unwrap().len(), test_model::HIDDEN);
        assert!((norm(e) - 1.0).abs() < 1e-4);
    }
    assert!(v["prompt_eval_count"].as_u64().unwrap() > 0);
    let one = post(&st, "/api/embed", json!({"model": "tiny", "input": "hello", "dimensions": 8})).await.json();
    assert_eq!(one["embeddings"][0].as_array().unwrap().len(), 8);
    assert!((norm(&one["embeddings"][0]) - 1.0).abs() < 1e-4);
    assert_eq!(post(&st, "/api/embed", json!({"model": "tiny", "input": []})).await.json()["embeddings"], json!([]));
    let r = post(&st, "/api/embed", json!({"model": "tiny", "input": 3})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.error().contains("input"), "{}", r.error());
    let r = post(&st, "/api/embed", json!({"model": "tiny", "input": "x", "dimensions": 100000})).await;
    assert!(r.status == StatusCode::BAD_REQUEST && r.error().contains("dimensions"));
    let long = "ab ".repeat(400);
    let r = post(&st, "/api/embed", json!({"model": "tiny", "input": long, "truncate": false})).await;
    assert!(r.status == StatusCode::BAD_REQUEST && r.error().contains("exceeds the context length"), "{}", r.text());
    assert_eq!(post(&st, "/api/embed", json!({"model": "tiny", "input": long})).await.status, StatusCode::OK);

    let legacy = post(&st, "/api/embeddings", json!({"model": "tiny", "prompt": "hello"})).await.json();
    let raw = &legacy["embedding"];
    let n = norm(raw);
    assert!((n - 1.0).abs() > 1e-3, "legacy vectors are not normalized");
    // Same direction as /api/embed.
    let unit = &post(&st, "/api/embed", json!({"model": "tiny", "input": "hello"})).await.json()["embeddings"][0];
    for (a, b) in raw.as_array().unwrap().iter().zip(unit.as_array().unwrap()) {
        assert!((a.as_f64().unwrap() / n - b.as_f64().unwrap()).abs() < 1e-4);
    }
    assert_eq!(
        post(&st, "/api/embeddings", json!({"model": "tiny", "prompt": ""})).await.json(),
        json!({"embedding": []})
    );

    let f = post(&st, "/v1/embeddings", json!({"model": "tiny", "input": ["hello", "a b"]})).await.json();
    assert_eq!((f["object"].clone(), f["data"][1]["index"].clone()), (json!("list"), json!(1)));
    let close = |a: &Value, b: &Value| {
        a.as_array()
            .unwrap()
            .iter()
            .zip(b.as_array().unwrap())
            .all(|(x, y)| (x.as_f64().unwrap() - y.as_f64().unwrap()).abs() < 1e-6)
    };
    assert!(close(&f["data"][0]["embedding"], unit));
    assert!(f["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    let b = post(&st, "/v1/embeddings", json!({"model": "tiny", "input": "hello", "encoding_format": "base64"}))
        .await
        .json();
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD.decode(b["data"][0]["embedding"].as_str().unwrap()).unwrap();
    let floats: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert!(close(&json!(floats), &f["data"][0]["embedding"]));
    let r = post(&st, "/v1/embeddings", json!({"model": "tiny", "input": "x", "encoding_format": "int8"})).await;
    assert_eq!(r.error(), "Invalid value for 'encoding_format' = int8. Supported values: ['float', 'base64'].");
}

fn chunks(events: &[String]) -> Vec<Value> {
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect()
}

#[tokio::test]
async fn chat_completions_sse_sequence() {
    let st = state();
    let body = |extra: Value| {
        let mut b = json!({"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "temperature": 0, "max_tokens": 6});
        b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        b
    };
    let r = post(&st, "/v1/chat/completions", body(json!({"stream": true, "stream_options": {"include_usage": true}})))
        .await;
    let cs = chunks(&sse(&r));
    let id = cs[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    for c in &cs {
        assert_eq!((c["id"].as_str().unwrap(), c["object"].as_str().unwrap()), (id, "chat.completion.chunk"));
        assert_eq!((c["created"].clone(), c["model"].clone()), (cs[0]["created"].clone(), json!("tiny")));
    }
    assert_eq!(cs[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
    let finishes: Vec<&Value> =
        cs.iter().filter(|c| c["choices"].get(0).is_some_and(|ch| !ch["finish_reason"].is_null())).collect();
    assert_eq!(finishes.len(), 1);
    assert_eq!(finishes[0]["choices"][0]["finish_reason"], "length");
    assert_eq!(finishes[0]["choices"][0]["delta"], json!({}));
    let usage = cs.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    let u = &usage["usage"];
    assert_eq!(u["completion_tokens"], 6);
    assert_eq!(u["total_tokens"].as_u64(), Some(u["prompt_tokens"].as_u64().unwrap() + 6));
    assert!(cs[..cs.len() - 1].iter().all(|c| c.get("usage").is_none()), "usage only on its own chunk");
    let streamed: String =
        cs.iter().filter_map(|c| c["choices"].get(0)?.get("delta")?.get("content")?.as_str()).collect();

    // Without include_usage there is no usage chunk.
    let cs2 = chunks(&sse(&post(&st, "/v1/chat/completions", body(json!({"stream": true}))).await));
    assert!(cs2.iter().all(|c| c.get("usage").is_none() && !c["choices"].as_array().unwrap().is_empty()));

    let one = post(&st, "/v1/chat/completions", body(json!({}))).await.json();
    assert_eq!(one["object"], "chat.completion");
    assert!(one["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let ch = &one["choices"][0];
    assert_eq!((ch["message"]["role"].clone(), ch["finish_reason"].clone()), (json!("assistant"), json!("length")));
    assert_eq!(ch["message"]["content"].as_str().unwrap(), streamed);
    assert_eq!(one["usage"]["completion_tokens"], 6);

    // n = 2: two choices, each with its own role chunk and finish.
    let cs = chunks(&sse(&post(
        &st,
        "/v1/chat/completions",
        body(json!({"stream": true, "n": 2, "temperature": 1, "seed": 3})),
    )
    .await));
    for i in 0..2 {
        let of_i: Vec<&Value> = cs.iter().filter(|c| c["choices"][0]["index"] == i).collect();
        assert_eq!(of_i[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(of_i.iter().filter(|c| !c["choices"][0]["finish_reason"].is_null()).count(), 1);
    }
    let two = post(&st, "/v1/chat/completions", body(json!({"n": 2, "temperature": 1, "seed": 3}))).await.json();
    assert_eq!(two["choices"].as_array().unwrap().len(), 2);
    assert_eq!(two["usage"]["completion_tokens"], 12);

    // Unknown fields are ignored; max_completion_tokens wins over max_tokens.
    let v = post(&st, "/v1/chat/completions", body(json!({"foo": 1, "max_completion_tokens": 3}))).await.json();
    assert_eq!(v["usage"]["completion_tokens"], 3);
}

#[tokio::test]
async fn logprobs_shapes() {
    let st = state();
    let v = post(
        &st,
        "/v1/chat/completions",
        json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0, "max_tokens": 4, "logprobs": true, "top_logprobs": 3}),
    )
    .await
    .json();
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 4);
    for t in content {
        assert!(t["logprob"].as_f64().unwrap() <= 0.0);
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert_eq!(top[0]["token"], t["token"], "greedy takes the most likely token");
    }
    let joined: String = content.iter().map(|t| t["token"].as_str().unwrap()).collect();
    assert_eq!(joined, v["choices"][0]["message"]["content"].as_str().unwrap());
    let r = post(
        &st,
        "/v1/chat/completions",
        json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}),
    )
    .await;
    assert_eq!(
        (r.status, r.error().as_str()),
        (StatusCode::BAD_REQUEST, "when using `top_logprobs`, `logprobs` must be set to true.")
    );

    let c = post(
        &st,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "abc", "max_tokens": 3, "logprobs": 2, "temperature": 0}),
    )
    .await
    .json();
    let lp = &c["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 3);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
    assert_eq!(lp["text_offset"][0], 0);

    let g = post(&st, "/api/generate", json!({"model": "tiny", "prompt": "abc", "raw": true, "stream": false, "logprobs": true, "top_logprobs": 2, "options": GREEDY(3)})).await.json();
    assert_eq!(g["logprobs"].as_array().unwrap().len(), 3);
    assert_eq!(g["logprobs"][0]["top_logprobs"].as_array().unwrap().len(), 2);
    let r = post(&st, "/api/generate", json!({"model": "tiny", "prompt": "abc", "logprobs": true, "top_logprobs": 21}))
        .await;
    assert_eq!(r.error(), "top_logprobs must be between 0 and 20");
}

#[tokio::test]
async fn completions_models_tokenize() {
    let st = state();
    let v = post(&st, "/v1/completions", json!({"model": "tiny", "prompt": "abc", "temperature": 0})).await.json();
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(
        (v["usage"]["completion_tokens"].clone(), v["choices"][0]["finish_reason"].clone()),
        (json!(16), json!("length"))
    );
    // Same greedy text as Ollama's raw generate.
    let g = post(
        &st,
        "/api/generate",
        json!({"model": "tiny", "prompt": "abc", "raw": true, "stream": false, "options": GREEDY(16)}),
    )
    .await
    .json();
    assert_eq!(v["choices"][0]["text"], g["response"]);
    let echo = post(&st, "/v1/completions", json!({"model": "tiny", "prompt": "abc", "temperature": 0, "echo": true}))
        .await
        .json();
    assert_eq!(echo["choices"][0]["text"].as_str().unwrap(), format!("abc{}", g["response"].as_str().unwrap()));
    let cs = chunks(&sse(&post(
        &st,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "abc", "temperature": 0, "stream": true}),
    )
    .await));
    let text: String = cs.iter().filter_map(|c| c["choices"].get(0)?.get("text")?.as_str()).collect();
    assert_eq!(text, g["response"].as_str().unwrap());
    assert_eq!(cs.last().unwrap()["choices"][0]["finish_reason"], "length");

    let models = get(&st, "/v1/models").await.json();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "tiny:1b");
    assert_eq!(models["data"][0]["object"], "model");
    assert!(models["data"][0]["owned_by"].is_string());
    assert_eq!(get(&st, "/v1/models/tiny").await.json()["id"], "tiny:1b");
    let r = get(&st, "/v1/models/nope").await;
    assert_eq!((r.status, r.error().as_str()), (StatusCode::NOT_FOUND, "The model `nope` does not exist."));

    let t = post(&st, "/tokenize", json!({"model": "tiny", "prompt": "hello there", "return_token_strs": true}))
        .await
        .json();
    let n = t["tokens"].as_array().unwrap().len();
    assert_eq!((t["count"].as_u64().unwrap() as usize, t["max_model_len"].clone()), (n, json!(256)));
    assert_eq!(t["token_strs"].as_array().unwrap().len(), n);
    let d = post(&st, "/detokenize", json!({"model": "tiny", "tokens": t["tokens"]})).await.json();
    assert_eq!(d["prompt"], "hello there");
    let m =
        post(&st, "/tokenize", json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})).await.json();
    assert_eq!(m["tokens"][0], test_model::IM_START);
    let r = post(&st, "/detokenize", json!({"model": "tiny", "tokens": [1, 99999]})).await;
    assert!(r.status == StatusCode::BAD_REQUEST && r.error().contains("tokens[1]"), "{}", r.text());
    // No model named: the default model answers.
    assert_eq!(post(&st, "/tokenize", json!({"prompt": "hi"})).await.status, StatusCode::OK);
}

/// (request, expected status, text the message must contain)
fn bad_cases() -> Vec<(&'static str, Value, StatusCode, &'static str)> {
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let f = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
    let tool = |extra: Value| {
        let mut b = json!({"model": "tiny-tools", "messages": msgs, "tools": f});
        b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        b
    };
    let unenforceable = json!({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}});
    let mut cases = vec![
        ("/api/generate", json!({"model": "tiny", "prompt": "x", "format": "yaml"}), "format = \"yaml\" is invalid"),
        ("/api/generate", json!({"model": "tiny", "prompt": "x", "format": 3}), "use \"json\" or a JSON Schema"),
        ("/api/chat", json!({"model": "tiny", "messages": msgs, "format": unenforceable}), "cannot be enforced"),
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": msgs, "response_format": {"type": "json_schema"}}),
            "response_format.json_schema.schema is required",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": msgs, "response_format": {"type": "xml"}}),
            "response_format.type = \"xml\" is not supported",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": msgs, "tool_choice": "auto"}),
            "`tools` must be set",
        ),
        ("/v1/chat/completions", tool(json!({"tool_choice": "maybe"})), "tool_choice = \"maybe\" is invalid"),
        (
            "/v1/chat/completions",
            tool(json!({"tool_choice": {"type": "function", "function": {"name": "g"}}})),
            "\"g\", which is not among the tools offered (f)",
        ),
        (
            "/v1/chat/completions",
            tool(json!({"tool_choice": "required", "response_format": {"type": "json_object"}})),
            "cannot be combined with tool_choice",
        ),
        (
            "/v1/chat/completions",
            tool(json!({"tools": [{"type": "function", "function": {"description": "no name"}}]})),
            "tools[0].function.name is required",
        ),
        ("/api/chat", tool(json!({"tools": [f[0], f[0]]})), "tools[1].function.name = \"f\" is offered twice"),
        ("/api/chat", tool(json!({"tools": [{"type": "retrieval"}]})), "tools[0].type = \"retrieval\""),
        (
            "/api/chat",
            tool(json!({"tools": [{"function": {"name": "f", "parameters": "none"}}]})),
            "tools[0].function.parameters must be a JSON Schema object",
        ),
        (
            "/api/chat",
            tool(
                json!({"tool_choice": "required", "tools": [{"function": {"name": "f", "parameters": unenforceable}}]}),
            ),
            "tools: this JSON Schema cannot be enforced",
        ),
    ];
    let mut out: Vec<(&'static str, Value, StatusCode, &'static str)> =
        cases.drain(..).map(|(p, b, m)| (p, b, StatusCode::BAD_REQUEST, m)).collect();
    out.extend(vec![
        ("/api/generate", json!({"model": "nope", "prompt": "x"}), StatusCode::NOT_FOUND, "model 'nope' not found"),
        ("/api/chat", json!({"model": "nope", "messages": msgs}), StatusCode::NOT_FOUND, "model 'nope' not found"),
        (
            "/v1/chat/completions",
            json!({"model": "nope", "messages": msgs}),
            StatusCode::NOT_FOUND,
            "The model `nope` does not exist.",
        ),
        (
            "/api/generate",
            json!({"model": 3, "prompt": "x"}),
            StatusCode::BAD_REQUEST,
            "model: invalid type: integer `3`, expected a string",
        ),
        ("/api/generate", json!({"prompt": "x"}), StatusCode::BAD_REQUEST, "missing field `model`"),
        (
            "/api/generate",
            json!({"model": "tiny", "prompt": "x", "options": {"num_predict": "5"}}),
            StatusCode::BAD_REQUEST,
            "options.num_predict",
        ),
        (
            "/api/generate",
            json!({"model": "tiny", "prompt": "x", "options": {"num_predict": -5}}),
            StatusCode::BAD_REQUEST,
            "options.num_predict = -5 is invalid",
        ),
        (
            "/api/generate",
            json!({"model": "tiny", "prompt": "x", "options": {"num_predict": 1_000_000_000_000u64}}),
            StatusCode::BAD_REQUEST,
            "more than the model's context of 256",
        ),
        (
            "/api/generate",
            json!({"model": "tiny", "prompt": "x", "options": {"temperature": -1}}),
            StatusCode::BAD_REQUEST,
            "temperature = -1 is out of range",
        ),
        (
            "/api/generate",
            json!({"model": "tiny", "prompt": "x", "options": {"top_p": 1.5}}),
            StatusCode::BAD_REQUEST,
            "top_p",
        ),
        (
            "/api/generate",
            json!({"model": "tiny", "prompt": "x", "images": ["***"]}),
            StatusCode::BAD_REQUEST,
            "images[0] is not valid base64",
        ),
        (
            "/api/generate",
            json!({"model": "tiny", "prompt": "x", "images": ["data:image/png;base64,AAAA"]}),
            StatusCode::BAD_REQUEST,
            "without a data: URL prefix",
        ),
        (
            "/api/generate",
            json!({"model": "tiny", "prompt": "x", "images": ["AAAA"]}),
            StatusCode::BAD_REQUEST,
            "does not support vision",
        ),
        (
            "/api/generate",
            json!({"model": "tiny", "prompt": "x", "suffix": "y"}),
            StatusCode::BAD_REQUEST,
            "tiny does not support insert",
        ),
        (
            "/api/generate",
            json!({"model": "tiny", "prompt": "x", "think": true}),
            StatusCode::BAD_REQUEST,
            "\"tiny\" does not support thinking",
        ),
        (
            "/api/generate",
            json!({"model": "tiny", "prompt": "x", "think": "loud"}),
            StatusCode::BAD_REQUEST,
            "invalid think value",
        ),
        (
            "/api/generate",
            json!({"model": "tiny", "prompt": "ab ".repeat(200)}),
            StatusCode::BAD_REQUEST,
            "maximum context length is 256 tokens",
        ),
        (
            "/api/generate",
            json!({"model": "tiny", "prompt": "x", "context": [1, 99999]}),
            StatusCode::BAD_REQUEST,
            "context holds token id 99999",
        ),
        (
            "/api/chat",
            json!({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}),
            StatusCode::BAD_REQUEST,
            "messages[0].role",
        ),
        (
            "/api/chat",
            json!({"model": "tiny", "messages": [{"role": "user", "content": ["x"]}]}),
            StatusCode::BAD_REQUEST,
            "messages[0].content",
        ),
        (
            "/api/chat",
            json!({"model": "tiny", "messages": msgs, "tools": [{"type": "function", "function": {"name": "f"}}]}),
            StatusCode::BAD_REQUEST,
            "tiny does not support tools",
        ),
        (
            "/api/chat",
            json!({"model": "tiny", "messages": [{"role": "user", "content": "x", "images": ["%%"]}]}),
            StatusCode::BAD_REQUEST,
            "messages[0].images[0] is not valid base64",
        ),
        ("/api/chat", json!({"model": "absent", "messages": msgs}), StatusCode::NOT_FOUND, "model 'absent' not found"),
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": []}),
            StatusCode::BAD_REQUEST,
            "messages: [] is too short",
        ),
        ("/v1/chat/completions", json!({"model": "tiny"}), StatusCode::BAD_REQUEST, "missing field `messages`"),
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": msgs, "max_tokens": 0}),
            StatusCode::BAD_REQUEST,
            "max_tokens must be at least 1, got 0.",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": msgs, "max_tokens": 100000}),
            StatusCode::BAD_REQUEST,
            "This model's maximum context length is 256 tokens. However, you requested",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": msgs, "stream_options": {"include_usage": true}}),
            StatusCode::BAD_REQUEST,
            "Stream options can only be defined when `stream=True`.",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": msgs, "n": 0}),
            StatusCode::BAD_REQUEST,
            "n = 0 is out of range",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": msgs, "temperature": "hot"}),
            StatusCode::BAD_REQUEST,
            "temperature",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]}),
            StatusCode::BAD_REQUEST,
            "image URLs are not currently supported",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}]}]}),
            StatusCode::BAD_REQUEST,
            "is not valid base64",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "audio"}]}]}),
            StatusCode::BAD_REQUEST,
            "unsupported content part type",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": [{"role": "assistant", "content": null, "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}]}),
            StatusCode::BAD_REQUEST,
            "arguments is not valid JSON",
        ),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": ["a", "b"]}),
            StatusCode::BAD_REQUEST,
            "prompt holds 2 strings",
        ),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": "x", "logprobs": 9}),
            StatusCode::BAD_REQUEST,
            "logprobs = 9 is out of range",
        ),
        ("/v1/completions", json!({"model": "tiny", "prompt": ""}), StatusCode::BAD_REQUEST, "prompt is empty"),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": [5, 100000]}),
            StatusCode::BAD_REQUEST,
            "prompt token id 100000",
        ),
    ]);
    out
}

#[tokio::test]
async fn bad_input_gets_the_right_status_and_a_message_naming_the_problem() {
    let st = state();
    for (path, body, status, text) in bad_cases() {
        let r = post(&st, path, body.clone()).await;
        assert_eq!(r.status, status, "{path} {body}: {}", r.text());
        assert!(r.error().contains(text), "{path} {body}: {:?} lacks {text:?}", r.error());
        if path.starts_with("/v1") {
            let e = &r.json()["error"];
            assert_eq!(e["code"], status.as_u16());
            assert!(e["type"].is_string() && e.get("param").is_some());
        }
    }
    // Malformed JSON and a missing body.
    let r = call(&st, Method::POST, "/api/generate", "{\"model\": \"tiny\", ").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.error().starts_with("invalid JSON"), "{}", r.error());
    let r = call(&st, Method::POST, "/api/chat", "").await;
    assert_eq!((r.status, r.error().as_str()), (StatusCode::BAD_REQUEST, "missing request body"));
    let r = call(&st, Method::POST, "/v1/chat/completions", "[1,2").await;
    assert_eq!(r.json()["error"]["type"], "BadRequestError");
    // Still serving.
    assert_eq!(
        post(&st, "/api/generate", json!({"model": "tiny", "prompt": "ok", "options": GREEDY(2)})).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn oversized_bodies_get_413_in_each_dialect() {
    let st = state_with(ServeConfig { max_body_bytes: 1000, ..ServeConfig::default() });
    let big = json!({"model": "tiny", "prompt": "x".repeat(2000)});
    let r = post(&st, "/api/generate", big.clone()).await;
    assert_eq!(
        (r.status, r.error().as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, "request body is larger than the limit of 1000 bytes")
    );
    let r = post(&st, "/v1/completions", big).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.json()["error"]["code"], 413);
}

#[test]
fn busy_is_503_with_ollamas_text_and_retry_after() {
    use super::error::{ApiError, Dialect};
    let r = ApiError::Busy.into_response_for(Dialect::Ollama);
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    assert_eq!(
        ApiError::Busy.body(Dialect::Ollama),
        json!({"error": "server busy, please try again.  maximum pending requests exceeded"})
    );
}

#[tokio::test]
async fn host_header_and_cors() {
    let st = state();
    let with_host = |host: &'static str| {
        Request::builder().uri("/api/version").header(header::HOST, host).body(Body::empty()).unwrap()
    };
    for host in ["evil.example.com", "evil.example.com:11434", "8.8.8.8"] {
        let r = send_raw(&st, with_host(host)).await;
        assert_eq!((r.status, r.body.len()), (StatusCode::FORBIDDEN, 0), "{host}");
    }
    for host in
        ["localhost", "127.0.0.1:11434", "[::1]:11434", "zoe.local", "box.internal", "192.168.1.20", "10.0.0.5:80"]
    {
        assert_eq!(send_raw(&st, with_host(host)).await.status, StatusCode::OK, "{host}");
    }
    let preflight = |origin: &'static str| {
        Request::builder()
            .method(Method::OPTIONS)
            .uri("/api/chat")
            .header(header::HOST, "localhost")
            .header(header::ORIGIN, origin)
            .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
            .header(header::ACCESS_CONTROL_REQUEST_HEADERS, "content-type,x-stainless-os")
            .body(Body::empty())
            .unwrap()
    };
    let ok = send_raw(&st, preflight("http://localhost:3000")).await;
    assert!(ok.status.is_success());
    assert_eq!(ok.headers[header::ACCESS_CONTROL_ALLOW_ORIGIN], "http://localhost:3000");
    let no = send_raw(&st, preflight("https://evil.example.com")).await;
    assert!(no.headers.get(header::ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
    assert!(super::glob_match("app://*", "app://x") && !super::glob_match("http://a:*", "http://b:1"));
}

#[tokio::test]
async fn openapi_document_covers_every_route_and_resolves_its_refs() {
    let st = state();
    let doc = get(&st, "/openapi.json").await.json();
    assert_eq!(doc["openapi"], "3.0.3");
    for (path, method) in [
        ("/api/generate", "post"),
        ("/api/chat", "post"),
        ("/api/embed", "post"),
        ("/api/tags", "get"),
        ("/api/show", "post"),
        ("/api/ps", "get"),
        ("/api/pull", "post"),
        ("/api/delete", "delete"),
        ("/v1/chat/completions", "post"),
        ("/v1/completions", "post"),
        ("/v1/embeddings", "post"),
        ("/v1/models", "get"),
        ("/tokenize", "post"),
        ("/detokenize", "post"),
        ("/health", "get"),
    ] {
        assert!(doc["paths"][path][method].is_object(), "{method} {path}");
    }
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for name in ["GenerateRequest", "ChatCompletionRequest", "Options", "ChatCompletion"] {
        assert!(schemas.contains_key(name), "{name}");
    }
    let req = &schemas["GenerateRequest"];
    assert!(req["properties"]["keep_alive"].is_object() && req["required"] == json!(["model"]));
    // Every $ref points at a schema that exists.
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(o) => {
                if let Some(Value::String(r)) = o.get("$ref") {
                    out.push(r.clone());
                }
                o.values().for_each(|x| refs(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let name = r.strip_prefix("#/components/schemas/").unwrap_or_else(|| panic!("{r}"));
        assert!(schemas.contains_key(name), "dangling {r}");
    }
}

/// A small deterministic generator for the fuzz run.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.next() as usize % v.len()]
    }
}

fn weird_value(rng: &mut Lcg) -> Value {
    let n = rng.next();
    match n % 12 {
        0 => Value::Null,
        1 => json!(-1),
        2 => json!(-1_000_000_000_000i64),
        3 => json!(1e300),
        4 => json!(u64::MAX),
        5 => json!(""),
        6 => json!("\u{0}\u{ffff}"),
        7 => json!([1, "a", null]),
        8 => json!({"x": {"y": []}}),
        9 => json!(true),
        10 => json!(0.5),
        _ => json!("x".repeat((n % 300) as usize)),
    }
}

#[tokio::test]
async fn a_thousand_generated_bad_requests_get_4xx_and_never_5xx() {
    let st = state_with(ServeConfig { max_body_bytes: 64 * 1024, ..ServeConfig::default() });
    let mut rng = Lcg(0x5eed);
    let valid = [
        ("/api/generate", json!({"model": "tiny", "prompt": "hi", "stream": false, "options": {"num_predict": 2}})),
        (
            "/api/chat",
            json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": false, "options": {"num_predict": 2}}),
        ),
        ("/api/embed", json!({"model": "tiny", "input": ["hi"]})),
        ("/api/show", json!({"model": "tiny"})),
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
        ),
        ("/v1/completions", json!({"model": "tiny", "prompt": "hi", "max_tokens": 2})),
        ("/v1/embeddings", json!({"model": "tiny", "input": "hi"})),
        ("/tokenize", json!({"model": "tiny", "prompt": "hi"})),
        ("/detokenize", json!({"model": "tiny", "tokens": [5, 6]})),
    ];
    let fields = [
        "model",
        "prompt",
        "messages",
        "options",
        "stream",
        "raw",
        "system",
        "template",
        "context",
        "images",
        "keep_alive",
        "format",
        "max_tokens",
        "n",
        "temperature",
        "top_p",
        "stop",
        "logprobs",
        "top_logprobs",
        "input",
        "dimensions",
        "tokens",
        "stream_options",
        "seed",
        "num_predict",
        "think",
        "echo",
        "suffix",
    ];
    let mut statuses = std::collections::BTreeMap::new();
    for i in 0..1000 {
        let (path, base) = rng.pick(&valid);
        let mut body = base.clone();
        let bytes: Vec<u8> = match rng.next() % 6 {
            // Truncated JSON.
            0 => {
                let s = body.to_string();
                s.as_bytes()[..(rng.next() as usize % s.len())].to_vec()
            }
            // Random bytes.
            1 => (0..rng.next() % 64).map(|_| rng.next() as u8).collect(),
            // A field set to a weird value (top level or inside options/messages).
            2 | 3 => {
                let f = *rng.pick(&fields);
                let v = weird_value(&mut rng);
                match rng.next() % 3 {
                    0 => body[f] = v,
                    1 => body["options"] = json!({ f: v }),
                    _ => body["messages"] = json!([{ "role": "user", "content": v, f: weird_value(&mut rng) }]),
                }
                body.to_string().into_bytes()
            }
            // A field removed.
            4 => {
                let key = body
                    .as_object()
                    .unwrap()
                    .keys()
                    .nth(rng.next() as usize % body.as_object().unwrap().len())
                    .unwrap()
                    .clone();
                body.as_object_mut().unwrap().remove(&key);
                body.to_string().into_bytes()
            }
            // Wrong top-level JSON type.
            _ => rng.pick(&[json!([]), json!(1), json!("s"), json!(null)]).to_string().into_bytes(),
        };
        let r = call(&st, Method::POST, path, bytes.clone()).await;
        assert!(
            !r.status.is_server_error(),
            "request {i} to {path} got {}: {} (body {:?})",
            r.status,
            r.text(),
            String::from_utf8_lossy(&bytes)
        );
        if r.status != StatusCode::OK && !r.body.is_empty() {
            let e = r.json();
            assert!(e["error"].is_string() || e["error"]["message"].is_string(), "{e}");
        }
        *statuses.entry(r.status.as_u16()).or_insert(0) += 1;
    }
    assert!(statuses.get(&400).copied().unwrap_or(0) > 500, "{statuses:?}");
    eprintln!("statuses over 1000 generated requests: {statuses:?}");
    let ok = post(
        &st,
        "/api/generate",
        json!({"model": "tiny", "prompt": "still here", "stream": false, "options": GREEDY(2)}),
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK);
}

#[tokio::test]
async fn a_dropped_stream_cancels_its_generation() {
    use http_body_util::BodyExt;
    let st = state();
    // Load first so the engine's stats exist.
    post(&st, "/api/generate", json!({"model": "tiny"})).await;
    let handle = st.engines.resident()[0].0.clone();
    let req = Request::builder()
        .method(Method::POST)
        .uri("/api/generate")
        .header(header::HOST, "localhost")
        .body(Body::from(json!({"model": "tiny", "prompt": "go", "options": {"num_predict": 250}}).to_string()))
        .unwrap();
    let resp = router(st.clone()).oneshot(req).await.unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    drop(body);
    // The engine notices at its next token: the request ends as "abort" (unless the tiny model
    // outran the drop and finished all 250 tokens, which the counters would show as "length").
    let stats = &handle.stats;
    for _ in 0..200 {
        if stats.running.load(Ordering::SeqCst) == 0
            && stats.finished_abort.load(Ordering::SeqCst) + stats.finished_length.load(Ordering::SeqCst) == 1
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(stats.running.load(Ordering::SeqCst), 0);
    // The sequence's KV blocks went back to the pool.
    assert_eq!(stats.kv_blocks_used.load(Ordering::SeqCst), 0);
    let generated = stats.generation_tokens.load(Ordering::SeqCst);
    if stats.finished_abort.load(Ordering::SeqCst) == 1 {
        assert!(generated < 250, "{generated}");
    } else {
        eprintln!("note: the tiny model finished before the drop was seen; tests/serve.rs covers cancellation on the real model");
        assert_eq!(generated, 250);
    }
}

/// Continuous batching: concurrent greedy requests each return exactly what they return alone,
/// and with more requests than `max_num_seqs` every one completes while at most that many run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_greedy_requests_equal_their_solo_runs() {
    let st = state_with(ServeConfig { max_num_seqs: Some(8), max_batched_tokens: 64, ..ServeConfig::default() });
    let body = |i: usize| {
        json!({"model": "tiny", "prompt": format!("req {i}: {}", "ab ".repeat(i * 3)), "raw": true,
               "stream": i.is_multiple_of(2), "options": {"temperature": 0, "num_predict": 24}})
    };
    let text = |r: &Reply| -> String {
        if r.content_type() == "application/x-ndjson" {
            ndjson(r).iter().map(|l| l["response"].as_str().unwrap().to_owned()).collect()
        } else {
            r.json()["response"].as_str().unwrap().to_owned()
        }
    };
    let mut solo = Vec::new();
    for i in 0..20 {
        solo.push(text(&post(&st, "/api/generate", body(i)).await));
    }
    let together = futures_util::future::join_all((0..20).map(|i| {
        let st = st.clone();
        async move { post(&st, "/api/generate", body(i)).await }
    }))
    .await;
    for (i, r) in together.iter().enumerate() {
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(text(r), solo[i], "request {i}");
    }
    let stats = &st.engines.resident()[0].0.stats;
    let peak = stats.running_peak.load(Ordering::SeqCst);
    assert!((2..=8).contains(&peak), "peak running {peak}");
    assert_eq!(stats.running.load(Ordering::SeqCst), 0);
    assert_eq!(stats.waiting.load(Ordering::SeqCst), 0);
}

/// A KV pool far too small for the running sequences still completes every request correctly:
/// sequences are preempted and recomputed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_kv_pool_preempts_and_still_answers_correctly() {
    // Bytes per block of 4 tokens: K and V of every layer, f16 (the default Q8 precision's cache).
    let per_block = 4 * test_model::KV_HEADS * (test_model::HIDDEN / test_model::HEADS) * test_model::LAYERS * 2 * 2;
    let st = state_with(ServeConfig {
        max_num_seqs: Some(4),
        block_size: 4,
        kv_cache_bytes: Some(24 * per_block),
        ..ServeConfig::default()
    });
    let body = |i: usize| {
        json!({"model": "tiny", "prompt": format!("p{i} {}", "xy ".repeat(4)), "raw": true, "stream": false,
                                 "options": {"temperature": 0, "num_predict": 40}})
    };
    let mut solo = Vec::new();
    for i in 0..4 {
        solo.push(post(&st, "/api/generate", body(i)).await.json()["response"].clone());
    }
    let together = futures_util::future::join_all((0..4).map(|i| {
        let st = st.clone();
        async move { post(&st, "/api/generate", body(i)).await }
    }))
    .await;
    for (i, r) in together.iter().enumerate() {
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.json()["response"], solo[i], "request {i}");
    }
    let stats = &st.engines.resident()[0].0.stats;
    assert!(stats.preemptions.load(Ordering::SeqCst) > 0, "the pool was small enough to force preemption");
    assert_eq!(stats.kv_blocks.load(Ordering::SeqCst), 24);
}

/// A repeated long system prompt is computed once: the second request's prompt blocks come from
/// the prefix cache (visible in /metrics), and its answer is unchanged.
#[tokio::test]
async fn a_repeated_system_prompt_hits_the_prefix_cache() {
    let st = state();
    let body = |q: &str| {
        json!({"model": "tiny", "stream": false, "options": GREEDY(6), "messages": [
            {"role": "system", "content": "You are a helpful assistant. ".repeat(4)},
            {"role": "user", "content": q}]})
    };
    let metric = |text: &str, name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{model_name=\"tiny\"}}")))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
            .parse()
            .unwrap()
    };
    let first = post(&st, "/api/chat", body("hi")).await.json();
    let m1 = get(&st, "/metrics").await.text();
    assert_eq!(metric(&m1, "vllm:prefix_cache_hits_total"), 0.0);
    assert!(metric(&m1, "vllm:prefix_cache_queries_total") > 0.0);
    let again = post(&st, "/api/chat", body("hi")).await.json();
    assert_eq!(again["message"], first["message"]);
    let m2 = get(&st, "/metrics").await.text();
    let hits = metric(&m2, "vllm:prefix_cache_hits_total");
    assert!(hits >= 64.0, "the system prompt's full blocks are reused: {hits}");
    // Another question after the same system prompt reuses it too.
    post(&st, "/api/chat", body("what now?")).await;
    assert!(metric(&get(&st, "/metrics").await.text(), "vllm:prefix_cache_hits_total") > hits);
    for name in
        ["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "vllm:num_preemptions_total", "zoe_kv_cache_blocks"]
    {
        assert!(m2.contains(&format!("# TYPE {name} ")), "{name}");
        metric(&m2, name);
    }
    assert_eq!(metric(&m2, "vllm:kv_cache_usage_perc"), 0.0, "idle: every block released (cached blocks are free)");
}

/// `options.stop` cuts the text before the stop string with `done_reason: "stop"`;
/// `options.num_ctx` caps the context below the model's.
#[tokio::test]
async fn options_stop_and_num_ctx() {
    let st = state();
    let full = post(
        &st,
        "/api/generate",
        json!({"model": "tiny", "prompt": "abc", "raw": true, "stream": false, "options": GREEDY(30)}),
    )
    .await
    .json();
    let text = full["response"].as_str().unwrap().to_owned();
    let chars: Vec<char> = text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let at = text.find(&stop).unwrap();
    let v = post(
        &st,
        "/api/generate",
        json!({"model": "tiny", "prompt": "abc", "raw": true, "stream": false,
        "options": {"temperature": 0, "num_predict": 30, "stop": [stop]}}),
    )
    .await
    .json();
    assert_eq!(v["done_reason"], "stop");
    assert_eq!(v["response"].as_str().unwrap(), &text[..at]);

    let r = post(
        &st,
        "/api/generate",
        json!({"model": "tiny", "prompt": "ab ".repeat(20), "raw": true, "options": {"num_ctx": 16}}),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.error().contains("maximum context length is 16 tokens"), "{}", r.error());
    let v = post(
        &st,
        "/api/generate",
        json!({"model": "tiny", "prompt": "abc", "raw": true, "stream": false, "options": {"num_ctx": 8}}),
    )
    .await
    .json();
    assert_eq!(v["prompt_eval_count"].as_u64().unwrap() + v["eval_count"].as_u64().unwrap(), 8, "{v}");
}

/// `/health`: 503 naming a pinned model that is not loaded, 200 once it is ready; the body
/// lists each model's state either way.
#[tokio::test]
async fn health_follows_the_pinned_models() {
    let st = state();
    st.engines.pin("tiny");
    let r = get(&st, "/health").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.json()["status"], "unavailable");
    assert_eq!(r.json()["models"][0]["state"], "not_loaded");
    post(&st, "/api/generate", json!({"model": "tiny"})).await;
    let r = get(&st, "/health").await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(v["status"], "ok");
    assert_eq!(
        (v["models"][0]["model"].clone(), v["models"][0]["state"].clone(), v["models"][0]["pinned"].clone()),
        (json!("tiny"), json!("ready"), json!(true))
    );
}
