//! The engine core on the real SmolLM2 model through `zoe-llm serve`: batched greedy decoding
//! equal to decoding alone (the tiny test model does not reach the SIMD attention and the
//! multi-token weight kernels; this model does), the prefix cache's effect on time to first
//! token, and — with the `fault-injection` feature — the systemd watchdog, which is fed only
//! while the engines are alive.

mod common;

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use common::{metric, ModelsDir, Server};
use serde_json::{json, Value};

static SERIAL: Mutex<()> = Mutex::new(());

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().no_proxy().timeout(Duration::from_secs(120)).build().unwrap()
}

fn lock() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A binary built with the cuda feature starts where there is no GPU (or no driver at all), says
/// so, and serves on the CPU.
#[cfg(feature = "cuda")]
#[test]
fn without_a_gpu_the_cuda_build_serves_on_the_cpu() {
    let Some(gguf) = common::smollm2_gguf("without_a_gpu_the_cuda_build_serves_on_the_cpu") else { return };
    if zoe_llm::backend::cuda::device_count().is_ok() {
        eprintln!("skipped without_a_gpu_the_cuda_build_serves_on_the_cpu: this machine has a GPU");
        return;
    }
    let _guard = lock();
    let models = ModelsDir::for_gguf(&gguf);
    let server = Server::start(models.path());
    let body = json!({"model": "smollm2", "stream": false, "prompt": "Hi", "options": {"num_predict": 2}});
    assert!(http().post(server.at("/api/generate")).json(&body).send().unwrap().status().is_success());
    let log = server.log();
    assert!(log.contains("no CUDA device") && log.contains("every model runs on the CPU engine"), "{log}");
}

/// 8 concurrent greedy requests (one decode batch of 8) each return exactly what they return
/// alone.
#[test]
fn eight_concurrent_greedy_requests_equal_their_solo_runs() {
    let Some(gguf) = common::smollm2_gguf("eight_concurrent_greedy_requests_equal_their_solo_runs") else { return };
    let _guard = lock();
    let models = ModelsDir::for_gguf(&gguf);
    let server = Server::start(models.path());
    let generate = |i: usize| -> String {
        let body = json!({"model": "smollm2", "stream": false, "raw": true,
                          "prompt": format!("List {} animals that live in {}:", i + 2, ["Africa", "the sea", "cold places", "forests"][i % 4]),
                          "options": {"temperature": 0, "num_predict": 40}});
        let r = http().post(server.at("/api/generate")).json(&body).send().unwrap();
        assert!(r.status().is_success());
        let v: Value = r.json().unwrap();
        v["response"].as_str().unwrap().to_owned()
    };
    let solo: Vec<String> = (0..8).map(generate).collect();
    let together: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8).map(|i| s.spawn(move || generate(i))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for i in 0..8 {
        assert_eq!(together[i], solo[i], "request {i}");
    }
    let text = http().get(server.at("/metrics")).send().unwrap().text().unwrap();
    assert_eq!(metric(&text, "vllm:num_requests_running{model_name=\"smollm2-135m\"}"), 0.0);
}

/// A second chat with the same long system prompt finds it in the prefix cache: the metrics
/// count the hit, the server's own prompt-evaluation time (prefill to first token) drops, and
/// the answer is the same.
#[test]
fn a_repeated_long_system_prompt_is_served_from_the_prefix_cache() {
    let Some(gguf) = common::smollm2_gguf("a_repeated_long_system_prompt_is_served_from_the_prefix_cache") else {
        return;
    };
    let _guard = lock();
    let models = ModelsDir::for_gguf(&gguf);
    let server = Server::start(models.path());
    let system = "You are Zoe, a helpful voice assistant in a family home. Answer briefly and kindly. ".repeat(24);
    let chat = |q: &str| -> Value {
        let body = json!({"model": "smollm2", "stream": false, "options": {"temperature": 0, "num_predict": 4},
                          "messages": [{"role": "system", "content": system}, {"role": "user", "content": q}]});
        let r = http().post(server.at("/api/chat")).json(&body).send().unwrap();
        assert!(r.status().is_success());
        r.json().unwrap()
    };
    let hits = || {
        let text = http().get(server.at("/metrics")).send().unwrap().text().unwrap();
        metric(&text, "vllm:prefix_cache_hits_total{model_name=\"smollm2-135m\"}")
    };
    let first = chat("What time is it?");
    assert_eq!(hits(), 0.0);
    let second = chat("What time is it?");
    let cached = hits();
    assert!(cached >= 400.0, "the system prompt's blocks were reused: {cached} tokens");
    assert_eq!(first["message"], second["message"]);
    let (t1, t2) = (first["prompt_eval_duration"].as_u64().unwrap(), second["prompt_eval_duration"].as_u64().unwrap());
    eprintln!(
        "prompt of {} tokens: prefill {:.1} ms cold, {:.1} ms with {cached} tokens cached",
        first["prompt_eval_count"],
        t1 as f64 / 1e6,
        t2 as f64 / 1e6
    );
    // About 480 prompt tokens against the ~20 left to compute: an order of magnitude apart; half
    // leaves room for any noise.
    assert!(t2 * 2 < t1, "prefill with the cached prefix ({t2} ns) vs cold ({t1} ns)");
}

/// systemd: READY=1 once serving, WATCHDOG=1 at half of WATCHDOG_USEC while the engine is alive,
/// and none once it hangs (injected), while /health says 503 and the hung request ends.
#[cfg(feature = "fault-injection")]
#[test]
fn the_watchdog_is_fed_only_while_the_engine_is_alive() {
    use std::os::unix::net::UnixDatagram;
    use std::time::Instant;

    let Some(gguf) = common::smollm2_gguf("the_watchdog_is_fed_only_while_the_engine_is_alive") else { return };
    let _guard = lock();
    let models = ModelsDir::for_gguf(&gguf);
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let config = dir.path().join("serve.toml");
    std::fs::write(&config, "stall_timeout = 0.5\n").unwrap();
    let server = Server::start_with(
        models.path(),
        &["--config", config.to_str().unwrap()],
        &[("NOTIFY_SOCKET", socket_path.to_str().unwrap()), ("WATCHDOG_USEC", "200000"), ("ZOE_FAULT", "hang@step:3")],
    );
    // Messages received within `window`.
    let collect = |window: Duration| -> Vec<String> {
        let mut out = Vec::new();
        let end = Instant::now() + window;
        let mut buf = [0u8; 512];
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            socket.set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
            match socket.recv(&mut buf) {
                Ok(n) => out.push(String::from_utf8_lossy(&buf[..n]).trim_end().to_owned()),
                Err(_) => break,
            }
        }
        out
    };
    let alive = collect(Duration::from_millis(1500));
    assert_eq!(alive.first().map(String::as_str), Some("READY=1"), "{alive:?}");
    let pings = alive.iter().filter(|m| m.as_str() == "WATCHDOG=1").count();
    assert!(pings >= 5, "pings every 100 ms while alive: {alive:?}");
    assert_eq!(http().get(server.at("/health")).send().unwrap().status(), 200);

    // The third forward step hangs: the request ends with an error instead of hanging.
    let r = http()
        .post(server.at("/api/generate"))
        .json(&json!({"model": "smollm2", "prompt": "Hello", "stream": false, "options": {"num_predict": 20}}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 500);
    let body: Value = r.json().unwrap();
    assert!(body["error"].as_str().unwrap().contains("not responding"), "{body}");
    let health = http().get(server.at("/health")).send().unwrap();
    assert_eq!(health.status(), 503);
    let health: Value = health.json().unwrap();
    assert_eq!(health["models"][0]["state"], "stalled", "{health}");
    // Drop what was sent before the stall was seen, then listen.
    socket.set_nonblocking(true).unwrap();
    while socket.recv(&mut [0u8; 512]).is_ok() {}
    socket.set_nonblocking(false).unwrap();
    let stalled = collect(Duration::from_millis(1000));
    assert!(!stalled.iter().any(|m| m == "WATCHDOG=1"), "no pings for a stalled engine: {stalled:?}");
    let text = http().get(server.at("/metrics")).send().unwrap().text().unwrap();
    assert_eq!(metric(&text, "zoe_engine_alive{model_name=\"smollm2-135m\"}"), 0.0);
}

/// An invalid ZOE_FAULT stops `serve` before it opens the port, naming the variable.
#[cfg(feature = "fault-injection")]
#[test]
fn an_invalid_fault_spec_is_refused() {
    let out = std::process::Command::new(common::BIN)
        .args(["serve", "--port", "1"])
        .env("ZOE_FAULT", "explode@step:1")
        .env("ZOE_PYPI_INDEX", common::DEAD_INDEX)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ZOE_FAULT") && err.contains("unknown kind \"explode\""), "{err}");
}

/// SIGTERM with 4 streams running: no new requests, the streams get until `shutdown_grace`
/// (here 1 s) and are then cut with a final error line each, and the process exits 0.
#[test]
fn sigterm_cuts_running_streams_cleanly_and_exits_zero() {
    use std::io::{BufRead, BufReader};
    use std::time::Instant;

    let Some(gguf) = common::smollm2_gguf("sigterm_cuts_running_streams_cleanly_and_exits_zero") else { return };
    let _guard = lock();
    let models = ModelsDir::for_gguf(&gguf);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("serve.toml");
    std::fs::write(&config, "shutdown_grace = 1\n").unwrap();
    let mut server = Server::start_with(models.path(), &["--config", config.to_str().unwrap()], &[]);
    let streams: Vec<_> = (0..4)
        .map(|i| {
            let r = http()
                .post(server.at("/api/generate"))
                .json(&json!({ "model": "smollm2", "prompt": format!("Story {i}:"), "raw": true,
                               "options": { "num_predict": 1800, "seed": i } }))
                .send()
                .unwrap();
            assert_eq!(r.status(), 200);
            let mut lines = BufReader::new(r).lines();
            let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
            assert_eq!(first["done"], false);
            lines
        })
        .collect();
    let t = Instant::now();
    server.terminate();
    let readers: Vec<_> = streams
        .into_iter()
        .map(|lines| std::thread::spawn(move || lines.map(|l| l.unwrap()).collect::<Vec<String>>()))
        .collect();
    // Draining: a new request is refused (503) or finds the port closed.
    if let Ok(r) = http().post(server.at("/api/generate")).json(&json!({ "model": "smollm2", "prompt": "x" })).send() {
        assert_eq!(r.status(), 503);
        assert!(r.text().unwrap().contains("shutting down"));
    }
    let mut cuts = 0;
    for reader in readers {
        let rest = reader.join().unwrap();
        let last: Value = serde_json::from_str(rest.last().expect("a final line")).unwrap();
        let cut = last["error"].as_str().is_some_and(|e| e.contains("shutting down"));
        assert!(cut || last["done"] == true, "each stream ends with a final line: {last}");
        cuts += usize::from(cut);
        assert!(rest[..rest.len() - 1].iter().all(|l| serde_json::from_str::<Value>(l).unwrap()["done"] == false));
    }
    // 1800 tokens each take far longer than the 1 s grace: streams were cut, not waited for.
    assert!(cuts > 0, "no stream was cut");
    let status = server.wait_exit(Duration::from_secs(15)).expect("exits within the grace and the cut");
    assert!(status.success(), "exit status {status}: {}", server.log());
    eprintln!("SIGTERM to exit: {:?}", t.elapsed());
    assert!(server.log().contains("draining"), "{}", server.log());
}

/// The journal's native protocol: `NAME=value\n`, or `NAME\n` + u64 LE length + value + `\n`.
fn journal_fields(mut d: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while let Some(nl) = d.iter().position(|&b| b == b'\n') {
        let line = &d[..nl];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            out.push((String::from_utf8_lossy(&line[..eq]).into(), String::from_utf8_lossy(&line[eq + 1..]).into()));
            d = &d[nl + 1..];
        } else {
            let len = u64::from_le_bytes(d[nl + 1..nl + 9].try_into().unwrap()) as usize;
            let value = &d[nl + 9..nl + 9 + len];
            out.push((String::from_utf8_lossy(line).into(), String::from_utf8_lossy(value).into()));
            d = &d[nl + 9 + len + 1..];
        }
    }
    out
}

/// Under systemd (`JOURNAL_STREAM` set) the log records go to the journal socket with structured
/// fields. The test owns that socket: the server runs in a private mount namespace whose /run is
/// a directory of the test's (`unshare -rm`, unprivileged user namespaces).
#[test]
fn logs_go_to_the_journal_with_structured_fields() {
    use std::os::unix::net::UnixDatagram;
    use std::process::{Command, Stdio};
    use std::time::Instant;

    let Some(gguf) = common::smollm2_gguf("logs_go_to_the_journal_with_structured_fields") else { return };
    let userns = Command::new("unshare").args(["-rm", "true"]).stderr(Stdio::null()).status();
    if !userns.is_ok_and(|s| s.success()) {
        eprintln!("skipped logs_go_to_the_journal_with_structured_fields: `unshare -rm` (user + mount namespaces) is not available here");
        return;
    }
    let _guard = lock();
    let models = ModelsDir::for_gguf(&gguf);
    let run = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(run.path().join("systemd/journal")).unwrap();
    let journal = UnixDatagram::bind(run.path().join("systemd/journal/socket")).unwrap();
    // Read as journald does, from the start: a datagram socket's queue is short (10 by default),
    // and a full queue blocks the logging server.
    let (tx, records_rx) = std::sync::mpsc::channel::<Vec<(String, String)>>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n) = journal.recv(&mut buf) {
            if tx.send(journal_fields(&buf[..n])).is_err() {
                break;
            }
        }
    });
    let port = common::free_port();
    let mut child = Command::new("unshare")
        .args(["-rm", "sh", "-c", "mount --bind \"$0\" /run && exec \"$@\""])
        .arg(run.path())
        .arg(common::BIN)
        .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string(), "--log", "info", "--models-dir"])
        .arg(models.path())
        .env("JOURNAL_STREAM", "8:12345")
        .env("ZOE_PYPI_INDEX", common::DEAD_INDEX)
        .env_remove("RUST_LOG")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("ZOE_FAULT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while http().get(format!("http://127.0.0.1:{port}/")).send().is_err() {
        assert!(child.try_wait().unwrap().is_none(), "the server exited");
        assert!(Instant::now() < deadline, "the server did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let child = Kill(child);
    let r = http()
        .post(format!("http://127.0.0.1:{port}/api/generate"))
        .header("x-request-id", "journal-test-1")
        .json(&json!({ "model": "smollm2", "prompt": "Hi", "stream": false, "options": { "num_predict": 2 } }))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut records = Vec::new();
    let found = loop {
        let fields = records_rx.recv_timeout(Duration::from_secs(5)).expect("a journal record within 5 s");
        let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        if get("REQUEST_ID").as_deref() == Some("journal-test-1") && get("MESSAGE").as_deref() == Some("response") {
            break fields;
        }
        records.push(fields);
        assert!(records.len() < 500, "no access record for the request among {} records", records.len());
    };
    let get = |k: &str| found.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(get("MODEL"), Some("smollm2"), "{found:?}");
    assert_eq!(get("PRIORITY"), Some("5"), "INFO is journald's notice: {found:?}");
    assert_eq!(get("SYSLOG_IDENTIFIER"), Some("zoe-llm"));
    assert_eq!(get("PATH"), Some("/api/generate"));
    assert_eq!(get("STATUS"), Some("200"));
    // The server's start-up records came before, at their levels too.
    assert!(records.iter().any(|f| f.iter().any(|(k, v)| k == "PRIORITY" && v == "5")), "{records:?}");
    drop(child);
}
