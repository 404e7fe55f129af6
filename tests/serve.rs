//! `zoe-llm serve` end to end on the real SmolLM2 model: greedy parity with `zoe-llm run`,
//! cancellation when a client hangs up, the official `openai` and `ollama` Python packages
//! (tests/clients/*.py), and the README's API examples.
//!
//! One server per test, on a free loopback port. The tests take turns (one lock): each server
//! uses every core, and the cancellation test watches counters that must not move.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{ModelsDir, Server, BIN, DEAD_INDEX};
use serde_json::{json, Value};

static SERIAL: Mutex<()> = Mutex::new(());

/// The lock, the model's store and a ready server; `None` (after a skip line) without the model.
fn setup(test: &str) -> Option<(MutexGuard<'static, ()>, ModelsDir, Server)> {
    let gguf = common::smollm2_gguf(test)?;
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let models = ModelsDir::for_gguf(&gguf);
    let server = Server::start(models.path());
    Some((guard, models, server))
}

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().no_proxy().timeout(Duration::from_secs(120)).build().unwrap()
}

fn post_json(server: &Server, path: &str, body: &Value) -> Value {
    let r = http().post(server.at(path)).json(body).send().unwrap();
    let status = r.status();
    let text = r.text().unwrap();
    assert!(status.is_success(), "POST {path} {body}: {status} {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("POST {path}: not JSON ({e}): {text}"))
}

/// One sample of `/metrics` as a count.
fn metric(text: &str, series: &str) -> u64 {
    common::metric(text, series) as u64
}

struct Counters {
    running: u64,
    generated: u64,
    abort: u64,
    length: u64,
}

fn counters(server: &Server) -> Counters {
    let text = http().get(server.at("/metrics")).send().unwrap().text().unwrap();
    let m = "model_name=\"smollm2-135m\"";
    Counters {
        running: metric(&text, &format!("vllm:num_requests_running{{{m}}}")),
        generated: metric(&text, &format!("vllm:generation_tokens_total{{{m}}}")),
        abort: metric(&text, &format!("vllm:request_success_total{{{m},finished_reason=\"abort\"}}")),
        length: metric(&text, &format!("vllm:request_success_total{{{m},finished_reason=\"length\"}}")),
    }
}

const PARITY_PROMPT: &str = "The capital of France is";
const PARITY_TOKENS: u64 = 24;

#[test]
fn generate_greedy_equals_run_streamed_or_not() {
    let Some((_guard, models, server)) = setup("generate_greedy_equals_run_streamed_or_not") else { return };

    let out = Command::new(BIN)
        .args(["run", "--raw", "--temperature", "0", "--max-tokens", &PARITY_TOKENS.to_string()])
        .arg("--models-dir")
        .arg(models.path())
        .arg(PARITY_PROMPT)
        .env("ZOE_PYPI_INDEX", DEAD_INDEX)
        .output()
        .unwrap();
    assert!(out.status.success(), "zoe-llm run: {}", String::from_utf8_lossy(&out.stderr));
    let run_text = String::from_utf8(out.stdout).unwrap();
    let want = run_text.strip_suffix('\n').expect("run ends its output with a newline");
    assert!(want.contains("Paris"), "{want:?}");

    let request = json!({
        "model": "smollm2",
        "prompt": PARITY_PROMPT,
        "raw": true,
        "stream": false,
        "options": {"temperature": 0, "num_predict": PARITY_TOKENS},
    });
    let done = post_json(&server, "/api/generate", &request);
    assert_eq!(done["response"], want, "/api/generate vs zoe-llm run: {done}");
    assert_eq!(done["done"], true, "{done}");
    let eval_count = done["eval_count"].as_u64().unwrap();
    assert!(eval_count > 0 && eval_count <= PARITY_TOKENS, "{done}");
    match done["done_reason"].as_str() {
        Some("length") => assert_eq!(eval_count, PARITY_TOKENS, "{done}"),
        Some("stop") => assert!(eval_count < PARITY_TOKENS, "{done}"),
        other => panic!("done_reason {other:?}: {done}"),
    }
    assert!(done["prompt_eval_count"].as_u64().unwrap() > 0, "{done}");
    for field in ["total_duration", "load_duration", "prompt_eval_duration", "eval_duration"] {
        if let Some(v) = done.get(field) {
            assert!(v.as_u64().is_some_and(|ns| ns > 0), "{field} is omitted when zero: {done}");
        }
    }
    assert!(done["eval_duration"].as_u64().is_some() && done["total_duration"].as_u64().is_some(), "{done}");
    assert!(done.get("context").is_none(), "raw generate returns no context: {done}");

    // The same request streamed (NDJSON): the pieces join to the same text, the last line is
    // the only one with done:true and carries the same counts.
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let r = http().post(server.at("/api/generate")).json(&streamed).send().unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let lines: Vec<Value> = BufReader::new(r)
        .lines()
        .map(|l| l.unwrap())
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let (last, pieces) = lines.split_last().expect("a streamed response has lines");
    assert!(pieces.iter().all(|l| l["done"] == false), "only the last line is done: {lines:?}");
    assert_eq!(last["done"], true, "{last}");
    let joined: String = lines.iter().map(|l| l["response"].as_str().unwrap()).collect();
    assert_eq!(joined, want, "streamed pieces vs zoe-llm run");
    assert_eq!(last["eval_count"], done["eval_count"], "{last}");
    assert_eq!(last["done_reason"], done["done_reason"], "{last}");
    assert_eq!(last["prompt_eval_count"], done["prompt_eval_count"], "{last}");
}

#[test]
fn a_client_hanging_up_cancels_its_generation() {
    let Some((_guard, _models, server)) = setup("a_client_hanging_up_cancels_its_generation") else { return };
    let before = counters(&server);
    assert_eq!(before.running, 0);

    // A long raw generation; read a few lines, then drop the connection.
    let request = json!({
        "model": "smollm2",
        "prompt": "Once upon a time",
        "raw": true,
        "options": {"temperature": 0, "num_predict": 2000},
    });
    let read = {
        let client = http();
        let r = client.post(server.at("/api/generate")).json(&request).send().unwrap();
        assert!(r.status().is_success(), "{}", r.status());
        let mut lines = BufReader::new(r).lines();
        let mut read = 0;
        for _ in 0..3 {
            let line: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
            assert_eq!(line["done"], false, "{line}");
            read += 1;
        }
        read
        // response and client dropped here: the connection closes
    };

    // The server notices: the request stops running and counts as aborted.
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let c = counters(&server);
        if c.running == 0 && c.abort == before.abort + 1 {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "10 s after the hang-up: running {} (want 0), aborted {} (want {})",
            c.running,
            c.abort,
            before.abort + 1
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let generated = after.generated - before.generated;
    assert!(generated >= read, "{generated} tokens counted, {read} received");
    assert!(generated < 200, "{generated} tokens generated for a request cancelled after {read} (of 2000)");

    // Nothing keeps generating in the background.
    std::thread::sleep(Duration::from_secs(1));
    let later = counters(&server);
    assert_eq!(later.generated, after.generated, "tokens still being generated after the cancel");
    assert_eq!(later.running, 0);

    // And the server still serves.
    let done = post_json(
        &server,
        "/api/generate",
        &json!({"model": "smollm2", "prompt": PARITY_PROMPT, "raw": true, "stream": false,
                "options": {"temperature": 0, "num_predict": 4}}),
    );
    assert_eq!(done["done"], true, "{done}");
    assert_eq!(done["eval_count"], 4, "{done}");
    assert!(!done["response"].as_str().unwrap().is_empty(), "{done}");
    let end = counters(&server);
    assert_eq!(end.length, after.length + 1);
    assert_eq!(end.abort, after.abort);
    assert_eq!(end.generated, after.generated + 4);
}

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

/// Runs one of tests/clients/*.py against a fresh server.
fn python_client(test: &str, script: &str) {
    let Some(python) = common::client_python(test) else { return };
    let Some((_guard, _models, server)) = setup(test) else { return };
    let mut cmd = Command::new(&python);
    cmd.arg(clients_dir().join(script))
        .env("ZOE_URL", &server.url)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env_remove("OLLAMA_HOST");
    common::bypass_proxy_for_loopback(&mut cmd);
    let out = cmd.output().unwrap_or_else(|e| panic!("running {} (ZOE_TEST_PYTHON): {e}", python.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert!(out.status.success(), "{script} failed ({}):\n{stdout}\n{stderr}", out.status);
    assert!(stdout.contains("checks passed"), "{script} did not finish:\n{stdout}\n{stderr}");
}

#[test]
fn the_openai_python_package_works() {
    python_client("the_openai_python_package_works", "test_openai.py");
}

#[test]
fn the_ollama_python_package_works() {
    python_client("the_ollama_python_package_works", "test_ollama.py");
}

/// The fenced blocks of README.md marked `<!-- example: NAME -->` on the line before.
fn readme_examples() -> Vec<(String, String, String)> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let mut lines = readme.lines();
    let mut out = Vec::new();
    while let Some(line) = lines.next() {
        let Some(name) = line.trim().strip_prefix("<!-- example:").and_then(|s| s.strip_suffix("-->")) else {
            continue;
        };
        let fence = lines.next().unwrap_or_default();
        let lang = fence.strip_prefix("```").unwrap_or_else(|| panic!("example {name}: no ``` block after it"));
        let mut body = String::new();
        for l in lines.by_ref() {
            if l.starts_with("```") {
                break;
            }
            body.push_str(l);
            body.push('\n');
        }
        out.push((name.trim().to_owned(), lang.trim().to_owned(), body));
    }
    out
}

/// Runs `cmd`, killing it after `limit`.
fn output_within(mut cmd: Command, limit: Duration, what: &str) -> std::process::Output {
    use std::process::Stdio;
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let id = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").arg(id.to_string()).status();
            panic!("{what} did not finish within {limit:?}")
        }
    }
}

#[test]
fn the_readme_api_examples_work() {
    let Some((_guard, _models, server)) = setup("the_readme_api_examples_work") else { return };
    let examples = readme_examples();
    let names: Vec<&str> = examples.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(names, ["curl-ollama", "curl-openai", "python-openai", "python-ollama"], "README examples");
    let curl = Command::new("curl").arg("--version").output();
    assert!(
        curl.is_ok_and(|o| o.status.success()),
        "curl is required to run the README's curl examples and was not found on PATH"
    );
    let python = common::client_python("the_readme_api_examples_work (python examples)");

    for (name, lang, body) in &examples {
        assert!(body.contains("http://localhost:11434"), "example {name} does not use http://localhost:11434");
        let body = body.replace("http://localhost:11434", &server.url);
        let mut cmd = match lang.as_str() {
            "sh" | "bash" | "shell" => {
                let mut c = Command::new("bash");
                c.args(["-euo", "pipefail", "-c", &body]);
                c
            }
            "python" | "py" => {
                let Some(python) = &python else { continue };
                let mut c = Command::new(python);
                c.args(["-c", &body]).env_remove("OPENAI_API_KEY").env_remove("OPENAI_BASE_URL");
                c
            }
            other => panic!("example {name}: unknown language {other:?}"),
        };
        common::bypass_proxy_for_loopback(&mut cmd);
        let started = Instant::now();
        let out = output_within(cmd, Duration::from_secs(180), &format!("README example {name}"));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "README example {name} failed ({}):\n{stdout}\n{stderr}", out.status);
        let shown: String = stdout.trim().chars().take(300).collect();
        eprintln!("README example {name} ({:.1} s): {shown}", started.elapsed().as_secs_f64());
        match name.as_str() {
            "curl-ollama" => {
                let v: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{name}: not JSON ({e})"));
                assert_eq!(v["done"], true, "{v}");
                assert!(v["response"].as_str().is_some_and(|s| !s.trim().is_empty()), "{v}");
            }
            "curl-openai" => {
                let v: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{name}: not JSON ({e})"));
                assert_eq!(v["object"], "chat.completion", "{v}");
                let content = &v["choices"][0]["message"]["content"];
                assert!(content.as_str().is_some_and(|s| !s.trim().is_empty()), "{v}");
            }
            _ => assert!(!stdout.trim().is_empty(), "README example {name} printed nothing"),
        }
    }
}
