//! Model formats, configs, tokenizers and the architectures written over the backend ops.

pub mod config;
pub mod kv_cache;
pub mod llama;
pub mod loaded;
pub mod paged_kv;
pub mod synth;
#[cfg(test)]
pub(crate) mod test_model;
pub mod tokenizer;
pub mod vision;
pub mod weights;
