//! zoe-llm in front of another zoe-llm (SmolLM2 on its own loopback port) speaking Ollama's API:
//! the Raspberry Pi plan (no local engines, everything proxied) with the official `openai` and
//! `ollama` Python packages, and a front with a local fallback whose upstream is killed mid-stream,
//! stays down (breaker open, the fallback serves) and comes back (breaker closed).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{ModelsDir, Server};
use serde_json::{json, Value};

static SERIAL: Mutex<()> = Mutex::new(());

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().no_proxy().timeout(Duration::from_secs(120)).build().unwrap()
}

/// A config file with one Ollama upstream at `url` (fast probes) and `extra` TOML.
fn config(dir: &Path, url: &str, extra: &str) -> std::path::PathBuf {
    let path = dir.join("front.toml");
    let mut f = std::fs::File::create(&path).unwrap();
    write!(
        f,
        "{extra}\n[[upstreams]]\nname = \"pi\"\nkind = \"ollama\"\nurl = \"{url}\"\n\
         probe_interval = 0.2\nbreaker_failures = 2\nretries = 1\nconnect_timeout = 1\n"
    )
    .unwrap();
    path
}

fn setup(test: &str) -> Option<(MutexGuard<'static, ()>, ModelsDir)> {
    let gguf = common::smollm2_gguf(test)?;
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    Some((guard, ModelsDir::for_gguf(&gguf)))
}

fn health(front: &Server) -> (u16, Value) {
    let r = http().get(front.at("/health")).send().unwrap();
    (r.status().as_u16(), r.json().unwrap())
}

/// Polls /health until the upstream's breaker is `state` (probes run every 0.2 s).
fn wait_breaker(front: &Server, state: &str) -> (u16, Value) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, h) = health(front);
        if h["providers"][0]["breaker"] == state {
            return (code, h);
        }
        assert!(Instant::now() < deadline, "the breaker never became {state}: {h}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn chat(front: &Server, n: u32) -> (String, Value) {
    let r = http()
        .post(front.at("/api/chat"))
        .json(&json!({ "model": "smollm2", "stream": false, "messages": [{ "role": "user", "content": "Hi" }],
                       "options": { "temperature": 0, "num_predict": n } }))
        .send()
        .unwrap();
    let who = r.headers().get("x-zoe-provider").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    assert!(r.status().is_success(), "{}", r.text().unwrap());
    (who, r.json().unwrap())
}

#[test]
fn the_python_clients_work_through_an_ollama_proxy() {
    let test = "the_python_clients_work_through_an_ollama_proxy";
    let Some(python) = common::client_python(test) else { return };
    let Some((_guard, models)) = setup(test) else { return };
    let upstream = Server::start(models.path());
    let dir = tempfile::tempdir().unwrap();
    // The Raspberry Pi plan: no engines here, every request to the upstream Ollama.
    let cfg = config(dir.path(), &upstream.url, "backend = \"ollama-proxy\"");
    let empty = tempfile::tempdir().unwrap();
    let front = Server::start_with(empty.path(), &["--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(health(&front).0, 200);
    for script in ["test_ollama.py", "test_openai.py"] {
        let mut cmd = Command::new(&python);
        cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients").join(script))
            .env("ZOE_URL", &front.url)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env_remove("OPENAI_API_KEY")
            .env_remove("OPENAI_BASE_URL")
            .env_remove("OLLAMA_HOST");
        common::bypass_proxy_for_loopback(&mut cmd);
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        eprintln!("{script} through the proxy:\n{stdout}");
        assert!(
            out.status.success() && stdout.contains("checks passed"),
            "{script} failed through the proxy:\n{stdout}\n{}\n--- front ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            front.log()
        );
    }
    // The upstream did the work.
    let metrics = http().get(upstream.at("/metrics")).send().unwrap().text().unwrap();
    assert!(common::metric(&metrics, "vllm:generation_tokens_total{model_name=\"smollm2-135m\"}") > 0.0);
}

#[test]
fn a_killed_upstream_fails_over_and_comes_back() {
    let Some((_guard, models)) = setup("a_killed_upstream_fails_over_and_comes_back") else { return };
    let upstream = Server::start(models.path());
    let port = upstream.port();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &upstream.url, "[[routes]]\nmodel = \"smollm2\"\nproviders = [\"pi\", \"local\"]\n");
    let front = Server::start_with(models.path(), &["--config", cfg.to_str().unwrap()], &[]);
    let (who, _) = chat(&front, 4);
    assert_eq!(who, "pi");
    // `zoe-llm ps`: the front's own engine, and its upstream's breaker.
    let ps = Command::new(common::BIN).args(["ps", "--server", &front.url]).output().unwrap();
    let text = String::from_utf8_lossy(&ps.stdout);
    assert!(ps.status.success(), "{text}{}", String::from_utf8_lossy(&ps.stderr));
    assert!(text.contains("smollm2:135m") && text.contains(" ready "), "{text}");
    assert!(text.contains("upstream pi") && text.contains("breaker closed"), "{text}");

    // A long stream, the upstream killed after a few lines: the client gets a clean error line.
    let resp = http()
        .post(front.at("/api/chat"))
        .json(&json!({ "model": "smollm2", "messages": [{ "role": "user", "content": "Tell me a long story." }],
                       "options": { "num_predict": 1500, "seed": 1 } }))
        .send()
        .unwrap();
    assert_eq!(resp.headers()["x-zoe-provider"], "pi");
    let mut lines = BufReader::new(resp).lines();
    for _ in 0..3 {
        let l: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(l["done"], false, "{l}");
    }
    drop(upstream);
    let started = Instant::now();
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    assert!(started.elapsed() < Duration::from_secs(30), "the stream ended promptly");
    let last: Value = serde_json::from_str(rest.last().unwrap()).unwrap();
    assert!(last["error"].as_str().is_some_and(|e| e.starts_with("upstream pi: ")), "{last}");
    assert!(rest[..rest.len() - 1].iter().all(|l| serde_json::from_str::<Value>(l).unwrap()["done"] == false));

    // Down: the breaker opens, the local engine serves, /health says degraded and why.
    let (who, reply) = chat(&front, 4);
    assert_eq!(who, "local");
    assert!(reply["message"]["content"].as_str().is_some_and(|c| !c.is_empty()));
    let (code, h) = wait_breaker(&front, "open");
    assert_eq!((code, h["status"].clone()), (200, json!("degraded")), "{h}");
    let metrics = http().get(front.at("/metrics")).send().unwrap().text().unwrap();
    assert_eq!(common::metric(&metrics, "zoe_upstream_up{upstream=\"pi\"}"), 0.0);

    // Back on its port: a probe closes the breaker and requests go up again.
    let _upstream = Server::start_at(models.path(), port, &[], &[]);
    let (code, h) = wait_breaker(&front, "closed");
    assert_eq!((code, h["status"].clone()), (200, json!("ok")), "{h}");
    assert_eq!(chat(&front, 4).0, "pi");
}
