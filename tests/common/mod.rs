//! Shared by the integration tests: where the real SmolLM2 model file is, and a running server.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The SmolLM2 GGUF from `ZOE_TEST_GGUF`. When it is unset the calling test prints a visible
/// skip line and returns, unless `ZOE_REQUIRE_MODEL=1` (set by `scripts/test`, so CI can never
/// pass by skipping), in which case it fails.
pub fn smollm2_gguf(test: &str) -> Option<PathBuf> {
    match std::env::var_os("ZOE_TEST_GGUF") {
        Some(p) => {
            let p = PathBuf::from(p);
            assert!(p.is_file(), "ZOE_TEST_GGUF={} is not a file", p.display());
            Some(p)
        }
        None if std::env::var("ZOE_REQUIRE_MODEL").as_deref() == Ok("1") => {
            panic!("{test}: ZOE_REQUIRE_MODEL=1 but ZOE_TEST_GGUF is not set")
        }
        None => {
            eprintln!(
                "skipped {test}: set ZOE_TEST_GGUF=<path to SmolLM2-135M-Instruct.Q4_1.gguf> (scripts/test does)"
            );
            None
        }
    }
}

/// The `zoe-llm` binary Cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_zoe-llm");
/// Nothing listens on the discard port of loopback: a package index that answers nothing, so a
/// test never downloads (the model must already be in its models directory).
pub const DEAD_INDEX: &str = "http://127.0.0.1:9/simple";

/// A models directory holding the test model. `ZOE_TEST_GGUF` normally lies in a store
/// (`<dir>/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf`, verified: `scripts/test` pulls it there),
/// which is used as is; a file anywhere else gets a temporary store with a symlink to it (verified
/// on first use).
pub enum ModelsDir {
    Store(PathBuf),
    Temp(tempfile::TempDir),
}

impl ModelsDir {
    pub fn for_gguf(gguf: &Path) -> ModelsDir {
        const FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
        let model_dir = gguf.parent();
        if gguf.file_name().is_some_and(|n| n == FILE)
            && model_dir.and_then(Path::file_name).is_some_and(|n| n == "smollm2-135m")
        {
            if let Some(store) = model_dir.and_then(Path::parent) {
                return ModelsDir::Store(store.to_path_buf());
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let model_dir = dir.path().join("smollm2-135m");
        std::fs::create_dir_all(&model_dir).unwrap();
        std::os::unix::fs::symlink(std::fs::canonicalize(gguf).unwrap(), model_dir.join(FILE)).unwrap();
        ModelsDir::Temp(dir)
    }

    pub fn path(&self) -> &Path {
        match self {
            ModelsDir::Store(p) => p,
            ModelsDir::Temp(d) => d.path(),
        }
    }
}

/// The Python of the venv holding the `openai` and `ollama` client packages, from
/// `ZOE_TEST_PYTHON` (`scripts/test` creates the venv and sets it). Unset: a visible skip line,
/// or a failure under `ZOE_REQUIRE_MODEL=1`.
pub fn client_python(test: &str) -> Option<PathBuf> {
    match std::env::var_os("ZOE_TEST_PYTHON") {
        Some(p) => Some(PathBuf::from(p)),
        None if std::env::var("ZOE_REQUIRE_MODEL").as_deref() == Ok("1") => {
            panic!("{test}: ZOE_REQUIRE_MODEL=1 but ZOE_TEST_PYTHON is not set (scripts/test sets it)")
        }
        None => {
            eprintln!(
                "skipped {test}: set ZOE_TEST_PYTHON=<python with the openai and ollama packages> (scripts/test does)"
            );
            None
        }
    }
}

/// Makes `cmd` (an HTTP client: curl, Python) reach loopback directly even where the environment
/// names an HTTP proxy.
pub fn bypass_proxy_for_loopback(cmd: &mut Command) {
    for var in ["NO_PROXY", "no_proxy"] {
        let mut v = std::env::var(var).unwrap_or_default();
        if !v.is_empty() {
            v.push(',');
        }
        v.push_str("127.0.0.1,localhost");
        cmd.env(var, v);
    }
}

/// A free TCP port on loopback (`serve` has no "port 0"): bound, read and released.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// `zoe-llm serve` on a free loopback port, ready (`GET /` answers `Ollama is running`) when
/// [`Server::start`] returns; killed on drop. Its stderr (`--log info`) goes to a file, printed
/// when a test panics while the server is alive.
pub struct Server {
    child: Child,
    pub url: String,
    log: PathBuf,
    _logdir: tempfile::TempDir,
}

impl Server {
    pub fn start(models_dir: &Path) -> Server {
        Self::start_with(models_dir, &[], &[])
    }

    /// [`Server::start`] with extra `serve` arguments and environment variables.
    pub fn start_with(models_dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Server {
        let mut last_log = String::new();
        // A port found free can be taken before the server binds it: then try another.
        for _ in 0..3 {
            match Self::try_at(models_dir, free_port(), args, envs) {
                Ok(server) => return server,
                Err(log) => last_log = log,
            }
        }
        panic!("zoe-llm serve found no free port\n--- its stderr ---\n{last_log}")
    }

    /// [`Server::start_with`] on a given port (a server restarted where its clients expect it).
    pub fn start_at(models_dir: &Path, port: u16, args: &[&str], envs: &[(&str, &str)]) -> Server {
        Self::try_at(models_dir, port, args, envs).unwrap_or_else(|log| panic!("port {port} is taken\n{log}"))
    }

    /// The server on `port`, ready; `Err(its stderr)` when the port was taken.
    fn try_at(models_dir: &Path, port: u16, args: &[&str], envs: &[(&str, &str)]) -> Result<Server, String> {
        let logdir = tempfile::tempdir().unwrap();
        let log = logdir.path().join("serve.stderr");
        let child = Command::new(BIN)
            .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string(), "--log", "info"])
            .arg("--models-dir")
            .arg(models_dir)
            .args(args)
            // Nothing from the environment the tests run in (a CI under systemd).
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env_remove("ZOE_FAULT")
            .envs(envs.iter().copied())
            .env("ZOE_PYPI_INDEX", DEAD_INDEX)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawning zoe-llm serve");
        let mut server = Server { child, url: format!("http://127.0.0.1:{port}"), log, _logdir: logdir };
        match server.wait_ready(Duration::from_secs(60)) {
            Ok(()) => Ok(server),
            Err(e) => {
                let log = server.log();
                if !log.contains("cannot listen") {
                    panic!("zoe-llm serve did not come up: {e}\n--- its stderr ---\n{log}");
                }
                Err(log)
            }
        }
    }

    /// Sends SIGTERM (what systemd and Docker send to stop it).
    pub fn terminate(&self) {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits up to `limit` for the process to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.url.rsplit(':').next().unwrap().parse().unwrap()
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let client = reqwest::blocking::Client::builder().no_proxy().timeout(Duration::from_secs(2)).build().unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(format!("it exited ({status})"));
            }
            if let Ok(r) = client.get(format!("{}/", self.url)).send() {
                let ok = r.status().is_success();
                let body = r.text().unwrap_or_default();
                if ok && body == "Ollama is running" {
                    return Ok(());
                }
                return Err(format!("GET / answered {body:?}"));
            }
            if Instant::now() > deadline {
                return Err(format!("no answer on {} within {timeout:?}", self.url));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Everything the server wrote on stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `url` + `path`.
    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- zoe-llm serve stderr ({}) ---\n{}", self.url, self.log());
        }
    }
}

/// One sample of `/metrics` text: the value of `series` (`name{labels}` exactly).
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{series} is not in /metrics:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}
