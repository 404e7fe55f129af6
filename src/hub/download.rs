//! HTTP for `pull`: one blocking client, bounded retries with exponential backoff, and a resumable
//! download that hashes while it writes `<file>.part` and renames it into place only once its
//! size and sha256 are right, so a final path never holds a partial or unverified file.
//!
//! Resume: a `.part` left by an interrupted run is continued with `Range: bytes=<len>-`. Only a
//! 206 whose `Content-Range` starts at exactly `<len>` is appended; a 200 means the server ignored
//! the range, and the download starts over. The hash of a resumed file is seeded by reading the
//! existing part once.

use std::fs::{self, File, OpenOptions};
use std::io::{self, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::blocking::Client;
use reqwest::header::{HeaderMap, ACCEPT, CONTENT_LENGTH, CONTENT_RANGE, RANGE};
use reqwest::redirect::Policy;
use sha2::{Digest, Sha256};

use super::progress::{emit, PullEvent, PullSink, Throttle};
use super::pull::PullOptions;
use super::HubError;

/// Backoff doubles per attempt from `PullOptions::retry_delay` up to this.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Index pages and HEADs are small; a larger answer is not what we asked for.
const MAX_PAGE_BYTES: u64 = 64 << 20;
const BUF_BYTES: usize = 256 << 10;

/// What to tell a user whose network is out: "copy `file` into `dir` manually".
pub(crate) struct Manual {
    pub file: String,
    pub dir: PathBuf,
}

/// How one attempt failed; decides whether `Http::retry` tries again.
pub(crate) enum Failure {
    /// No connection at all (DNS, refused, unreachable): retried, then reported as offline.
    Connect(String),
    /// Worth another try: timeout, 5xx, 429, a connection dropped mid-body.
    Retry(String),
    /// Retrying cannot help (404, 403, a hash or size that is wrong, a disk error).
    Fatal(HubError),
}

/// One file to download.
pub(crate) struct Download<'a> {
    pub url: &'a str,
    pub dest: &'a Path,
    /// The name progress events give it (the wheel's, or the manifest file's).
    pub file: &'a str,
    pub sha256: Option<&'a str>,
    pub size: Option<u64>,
    /// Bearer token (Hugging Face); reqwest drops it on redirects to another host.
    pub auth: Option<&'a str>,
    /// What the URL was supposed to be, for a 404 ("wheel x of package y").
    pub what: &'a str,
    pub manual: &'a Manual,
}

#[derive(Debug, PartialEq)]
pub(crate) struct Fetched {
    pub sha256: String,
    pub size: u64,
}

pub(crate) struct Http {
    client: Client,
    /// For Hugging Face HEADs: the LFS hash is a header of the redirect itself, not of its target.
    no_redirect: Client,
    max_attempts: u32,
    retry_delay: Duration,
    progress: bool,
    on_event: Option<PullSink>,
}

impl Http {
    pub fn new(opts: &PullOptions) -> Result<Http, HubError> {
        let build = |policy: Policy| {
            Client::builder()
                .user_agent(concat!("zoe-llm/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(opts.io_timeout)
                // Blocking reqwest applies this to the request and to each body read: a stall
                // detector, not a cap on how long a large download may take.
                .timeout(opts.io_timeout)
                .redirect(policy)
                .build()
                .map_err(|e| HubError::Client(error_chain(&e)))
        };
        Ok(Http {
            client: build(Policy::limited(10))?,
            no_redirect: build(Policy::none())?,
            max_attempts: opts.max_attempts.max(1),
            retry_delay: opts.retry_delay,
            progress: opts.progress,
            on_event: opts.on_event.clone(),
        })
    }

    /// Runs `op` until it succeeds, fails fatally, or has been tried `max_attempts` times.
    pub fn retry<T>(
        &self,
        url: &str,
        manual: &Manual,
        mut op: impl FnMut() -> Result<T, Failure>,
    ) -> Result<T, HubError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (reason, connect) = match op() {
                Ok(value) => return Ok(value),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Connect(reason)) => (reason, true),
                Err(Failure::Retry(reason)) => (reason, false),
            };
            if attempt >= self.max_attempts {
                return Err(if connect {
                    HubError::Unreachable {
                        host: host_of(url),
                        reason,
                        file: manual.file.clone(),
                        dir: manual.dir.clone(),
                    }
                } else {
                    HubError::Network { url: url.to_owned(), attempts: attempt, reason }
                });
            }
            let delay = backoff(self.retry_delay, attempt);
            tracing::warn!(%url, attempt, max = self.max_attempts, %reason, ?delay, "retrying");
            std::thread::sleep(delay);
        }
    }

    /// GETs a small document (an index page), with `accept` as the Accept header.
    pub fn get_page(&self, url: &str, accept: &str, what: &str) -> Result<Vec<u8>, Failure> {
        let resp = self.client.get(url).header(ACCEPT, accept).send().map_err(classify)?;
        check_status(url, resp.status().as_u16(), what)?;
        let mut body = Vec::new();
        resp.take(MAX_PAGE_BYTES).read_to_end(&mut body).map_err(|e| Failure::Retry(format!("reading {url}: {e}")))?;
        Ok(body)
    }

    /// HEAD without following redirects: the status and headers of the first answer.
    pub fn head(&self, url: &str, auth: Option<&str>, what: &str) -> Result<(u16, HeaderMap), Failure> {
        let mut req = self.no_redirect.head(url);
        if let Some(token) = auth {
            req = req.bearer_auth(token);
        }
        let resp = req.send().map_err(classify)?;
        let status = resp.status().as_u16();
        if !(300..400).contains(&status) {
            check_status(url, status, what)?;
        }
        Ok((status, resp.headers().clone()))
    }

    /// Downloads `d.url` to `d.dest` via `<dest>.part`, resuming, retrying and verifying.
    pub fn download(&self, d: &Download) -> Result<Fetched, HubError> {
        let part = part_path(d.dest);
        if let Some(parent) = part.parent() {
            fs::create_dir_all(parent).map_err(|source| HubError::Write { path: parent.to_path_buf(), source })?;
        }
        let name = d.dest.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let bar = self.progress_bar(&name, d.size);
        tracing::info!(url = d.url, dest = %d.dest.display(), size = ?d.size, "downloading");
        let fetched = self.retry(d.url, d.manual, || self.fetch_once(d, &part, &bar));
        bar.finish_and_clear();
        let fetched = fetched?;
        // The hash was computed while the bytes arrived; this is where it is checked.
        emit(self.on_event.as_ref(), PullEvent::Verifying { file: d.file.to_owned() });
        if let Some(expected) = d.sha256 {
            if fetched.sha256 != expected {
                remove_quietly(&part);
                return Err(HubError::Sha256Mismatch {
                    path: d.dest.to_path_buf(),
                    expected: expected.to_owned(),
                    actual: fetched.sha256,
                });
            }
        }
        if let Some(size) = d.size.filter(|&size| size != fetched.size) {
            remove_quietly(&part);
            return Err(HubError::SizeMismatch { path: d.dest.to_path_buf(), expected: size, actual: fetched.size });
        }
        fs::rename(&part, d.dest).map_err(|source| HubError::Write { path: d.dest.to_path_buf(), source })?;
        tracing::info!(dest = %d.dest.display(), sha256 = %fetched.sha256, "downloaded");
        Ok(fetched)
    }

    /// One request: continue or restart `part`, stream the body into it, and hash.
    fn fetch_once(&self, d: &Download, part: &Path, bar: &ProgressBar) -> Result<Fetched, Failure> {
        let write_err = |source| Failure::Fatal(HubError::Write { path: part.to_path_buf(), source });
        let mut offset = match fs::metadata(part) {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(source) => return Err(Failure::Fatal(HubError::Read { path: part.to_path_buf(), source })),
        };
        match d.size {
            Some(size) if offset > size => {
                fs::remove_file(part).map_err(write_err)?;
                offset = 0;
            }
            // Complete from an earlier run (killed before the rename): just verify it.
            Some(size) if offset == size && size > 0 => {
                self.report(d, Some(size), size);
                let (sha256, size) = hash_file(part)
                    .map_err(|source| Failure::Fatal(HubError::Read { path: part.to_path_buf(), source }))?;
                return Ok(Fetched { sha256, size });
            }
            _ => {}
        }

        let mut req = self.client.get(d.url);
        if let Some(token) = d.auth {
            req = req.bearer_auth(token);
        }
        if offset > 0 {
            req = req.header(RANGE, format!("bytes={offset}-"));
        }
        let mut resp = req.send().map_err(classify)?;
        let status = resp.status().as_u16();
        let (mut file, mut hasher) = match status {
            206 => {
                let start = content_range_start(resp.headers());
                if start != Some(offset) {
                    fs::remove_file(part).or_else(ignore_not_found).map_err(write_err)?;
                    return Err(Failure::Retry(format!(
                        "server resumed at byte {start:?} instead of {offset}; starting over"
                    )));
                }
                tracing::info!(url = d.url, offset, "resuming a partial download");
                let hasher = hash_prefix(part)
                    .map_err(|source| Failure::Fatal(HubError::Read { path: part.to_path_buf(), source }))?;
                let file = OpenOptions::new().create(true).append(true).open(part).map_err(write_err)?;
                (file, hasher)
            }
            200 => {
                if offset > 0 {
                    tracing::info!(url = d.url, "server ignored the range request; starting over");
                    offset = 0;
                }
                (File::create(part).map_err(write_err)?, Sha256::new())
            }
            416 => {
                fs::remove_file(part).or_else(ignore_not_found).map_err(write_err)?;
                return Err(Failure::Retry(
                    "HTTP 416: the partial file does not fit the remote one; starting over".to_owned(),
                ));
            }
            _ => {
                let unexpected =
                    HubError::HttpStatus { url: d.url.to_owned(), status, hint: " (expected 200 or 206)".to_owned() };
                return Err(check_status(d.url, status, d.what).err().unwrap_or(Failure::Fatal(unexpected)));
            }
        };

        // The server's length tells us before the first byte whether this is the pinned file.
        let body_len = header_u64(resp.headers(), CONTENT_LENGTH.as_str());
        if let (Some(size), Some(len)) = (d.size, body_len) {
            if offset + len != size {
                drop(file);
                remove_quietly(part);
                return Err(Failure::Fatal(HubError::SizeMismatch {
                    path: d.dest.to_path_buf(),
                    expected: size,
                    actual: offset + len,
                }));
            }
        }
        let expected_total = d.size.or(body_len.map(|len| offset + len));
        bar.set_length(expected_total.unwrap_or(0));
        bar.set_position(offset);
        self.report(d, expected_total, offset);
        let mut throttle = Throttle::new(offset);

        let mut buf = vec![0u8; BUF_BYTES];
        let mut received = 0u64;
        loop {
            let n = match resp.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // What arrived is on disk; the next attempt resumes after it.
                Err(e) => {
                    return Err(Failure::Retry(format!("connection lost after {} bytes: {e}", offset + received)))
                }
            };
            file.write_all(&buf[..n]).map_err(write_err)?;
            hasher.update(&buf[..n]);
            received += n as u64;
            bar.inc(n as u64);
            if self.on_event.is_some() && throttle.due(offset + received) {
                self.report(d, expected_total, offset + received);
            }
            if let Some(size) = d.size.filter(|&size| offset + received > size) {
                drop(file);
                remove_quietly(part);
                return Err(Failure::Fatal(HubError::SizeMismatch {
                    path: d.dest.to_path_buf(),
                    expected: size,
                    actual: offset + received,
                }));
            }
        }
        // Durable before the rename, so a power cut cannot leave a verified name on lost bytes.
        file.sync_all().map_err(write_err)?;
        let total = offset + received;
        if let Some(expected) = expected_total.filter(|&expected| total < expected) {
            return Err(Failure::Retry(format!("connection closed after {total} of {expected} bytes")));
        }
        // Always a last report with completed == total; with no length known, the total is now.
        if throttle.reported() != total || expected_total != Some(total) {
            self.report(d, Some(total), total);
        }
        Ok(Fetched { sha256: hex(hasher), size: total })
    }

    /// A `Downloading` event for `d`, if anyone listens.
    fn report(&self, d: &Download, total: Option<u64>, completed: u64) {
        let Some(sink) = &self.on_event else {
            return;
        };
        let digest = d.sha256.map(str::to_owned);
        sink(&PullEvent::Downloading { file: d.file.to_owned(), digest, total, completed });
    }

    /// A bar on stderr only when someone is watching: hidden for journald, pipes and tests.
    fn progress_bar(&self, name: &str, len: Option<u64>) -> ProgressBar {
        if !self.progress || !io::stderr().is_terminal() {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::with_draw_target(len, ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_message(name.to_owned());
        bar
    }
}

/// sha256 (lowercase hex) and length of a file, streamed.
pub(crate) fn hash_file(path: &Path) -> io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let size = io::copy(&mut File::open(path)?, &mut hasher)?;
    Ok((hex(hasher), size))
}

pub(crate) fn hex(hasher: Sha256) -> String {
    format!("{:x}", hasher.finalize())
}

pub(crate) fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.as_os_str().to_owned();
    name.push(".part");
    PathBuf::from(name)
}

fn hash_prefix(part: &Path) -> io::Result<Sha256> {
    let mut hasher = Sha256::new();
    match File::open(part) {
        Ok(mut f) => {
            io::copy(&mut f, &mut hasher)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(hasher)
}

fn ignore_not_found(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

/// Cleanup on an error path: the error being returned matters more than a failed unlink.
pub(crate) fn remove_quietly(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove");
        }
    }
}

/// Maps a status that is not a success to a failure; `Ok` for 2xx.
fn check_status(url: &str, status: u16, what: &str) -> Result<(), Failure> {
    match status {
        200..=299 => Ok(()),
        404 => Err(Failure::Fatal(HubError::NotFound { url: url.to_owned(), what: what.to_owned() })),
        408 | 429 | 500..=599 => Err(Failure::Retry(format!("HTTP {status}"))),
        401 | 403 => Err(Failure::Fatal(HubError::HttpStatus {
            url: url.to_owned(),
            status,
            hint: " (a gated or private repository needs a token: set HF_TOKEN)".to_owned(),
        })),
        _ => Err(Failure::Fatal(HubError::HttpStatus { url: url.to_owned(), status, hint: String::new() })),
    }
}

fn classify(e: reqwest::Error) -> Failure {
    let reason = error_chain(&e);
    // An untrusted certificate is not transient and not "offline": say what it is, once. reqwest
    // exposes no typed TLS error, so this reads rustls' message ("invalid peer certificate: ...").
    if reason.contains("certificate") {
        let host = e.url().and_then(|u| u.host_str()).unwrap_or("the server").to_owned();
        return Failure::Fatal(HubError::Tls { host, reason });
    }
    if e.is_connect() {
        Failure::Connect(reason)
    } else {
        Failure::Retry(reason)
    }
}

/// The causes of an error without reqwest's "error sending request for url (...)" preamble,
/// which repeats the URL the message already names: "tcp connect error: Connection refused".
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = Vec::new();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !parts.iter().any(|p: &String| p.contains(&text)) {
            parts.push(text);
        }
        cause = c.source();
    }
    if parts.is_empty() {
        e.to_string()
    } else {
        parts.join(": ")
    }
}

fn backoff(base: Duration, attempt: u32) -> Duration {
    base.saturating_mul(1u32 << attempt.saturating_sub(1).min(16)).min(MAX_BACKOFF)
}

fn host_of(url: &str) -> String {
    reqwest::Url::parse(url).ok().and_then(|u| u.host_str().map(str::to_owned)).unwrap_or_else(|| url.to_owned())
}

pub(crate) fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// The first byte of `Content-Range: bytes <start>-<end>/<total>`.
fn content_range_start(headers: &HeaderMap) -> Option<u64> {
    let value = headers.get(CONTENT_RANGE)?.to_str().ok()?;
    let range = value.trim().strip_prefix("bytes")?.trim_start();
    range.split('-').next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let base = Duration::from_millis(500);
        assert_eq!(backoff(base, 1), Duration::from_millis(500));
        assert_eq!(backoff(base, 2), Duration::from_secs(1));
        assert_eq!(backoff(base, 4), Duration::from_secs(4));
        assert_eq!(backoff(base, 40), MAX_BACKOFF);
    }

    #[test]
    fn content_range_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(content_range_start(&h), None);
        h.insert(CONTENT_RANGE, HeaderValue::from_static("bytes 100-199/200"));
        assert_eq!(content_range_start(&h), Some(100));
        h.insert(CONTENT_RANGE, HeaderValue::from_static("bytes */200"));
        assert_eq!(content_range_start(&h), None);
    }

    #[test]
    fn statuses_map_to_retry_or_fatal() {
        assert!(check_status("u", 206, "x").is_ok());
        assert!(matches!(check_status("u", 503, "x"), Err(Failure::Retry(_))));
        assert!(matches!(check_status("u", 429, "x"), Err(Failure::Retry(_))));
        assert!(matches!(check_status("u", 404, "x"), Err(Failure::Fatal(HubError::NotFound { .. }))));
        match check_status("u", 403, "x") {
            Err(Failure::Fatal(e)) => assert!(e.to_string().contains("HF_TOKEN"), "{e}"),
            _ => panic!("403 must be fatal"),
        }
    }

    #[test]
    fn hashes_files_and_names_parts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("abc");
        fs::write(&path, b"abc").unwrap();
        let expected = ("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad".to_owned(), 3);
        assert_eq!(hash_file(&path).unwrap(), expected);
        assert_eq!(part_path(&path), dir.path().join("abc.part"));
        assert_eq!(host_of("https://pypi.org/simple/x/"), "pypi.org");
    }
}
