//! zoe-llm: an LLM appliance for the Zoe home assistant.
//!
//! The crate is a library (everything testable lives here) plus the thin `zoe-llm` binary in
//! `main.rs`. Module map (see docs/architecture.md for the data flow):
//! - [`backend`]: the op surface models are written against, and its CPU implementation.
//! - [`model`]: GGUF reading, model configs, the Llama-family decoder, tokenizers.
//! - [`chat`]: chat-template rendering shared by every API dialect.
//! - [`engine`]: sampling, incremental detokenization, the generation loop.
//! - [`hub`]: model manifests, the models directory, `pull`.
//! - [`plan`]: the hardware plan (backend, models, memory) from the probe's report and the config.
//! - [`provider`]: upstream servers and routes (providers behind the API).
//! - [`server`]: `zoe-llm serve`, the Ollama and OpenAI APIs over the engine.
//! - [`vision`]: images into vision-model inputs (Qwen2-VL preprocessing).
//! - [`bench`]: `zoe-llm bench`.

pub mod backend;
pub mod bench;
pub mod chat;
pub mod engine;
pub mod hub;
pub mod model;
pub mod plan;
pub mod provider;
pub mod server;
pub mod vision;
