//! Model formats, configs, tokenizers and the architectures written over the backend ops.

pub mod config;
pub mod kv_cache;
pub mod loaded;
pub mod llama;
pub mod tokenizer;
pub mod weights;
