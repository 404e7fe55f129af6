//! The seam between the API and whatever makes tokens: this machine's engines ([`LOCAL`]) and
//! upstream servers (an Ollama on the Raspberry Pi, an OpenAI-compatible box to scale out).

pub mod config;

pub use config::{RouteConfig, UpstreamConfig, UpstreamKind, LOCAL};
pub mod breaker;
pub mod router;
pub mod translate;
pub mod upstream;

pub use router::{Providers, Target};
