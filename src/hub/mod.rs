//! Model manifests, the models directory, and `pull`.
//!
//! - [`manifest`]: the TOML manifest types and their validation.
//! - [`registry`]: the manifests this binary embeds (`models/*.toml`) plus local ones, and name
//!   resolution (id or Ollama-style alias, case-insensitive, `:latest`-blind).
//! - [`store`]: where model files live on disk and whether a model is complete.
//! - [`pull`]: download, verify and place a model's files ([`pull()`], [`ensure`]).
//! - [`progress`]: the events a pull reports to `PullOptions::on_event` ([`PullEvent`]).
//!
//! Data flow: a request's model name → `Registry::resolve` → `Manifest` → `ensure` → the primary
//! file's path, which the loader opens. All errors are [`HubError`].

mod download;
mod error;
pub mod manifest;
pub mod progress;
pub mod pull;
pub mod registry;
pub mod store;

pub use error::HubError;
pub use manifest::{Defaults, FileSpec, Format, HfSource, Manifest, PypiSource, Role, Sampling, Source};
pub use progress::{PullEvent, PullSink};
pub use pull::{ensure, pull, PullOptions};
pub use registry::Registry;
pub use store::Store;
