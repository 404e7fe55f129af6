//! Model formats, configs, tokenizers and the architectures written over the backend ops.

pub mod tokenizer;
pub mod weights;
