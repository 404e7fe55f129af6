//! Weight files: names → tensors.

pub mod gguf;
#[cfg(test)]
pub(crate) mod gguf_writer;

pub use gguf::{GgufError, GgufFile, MetaValue, TensorInfo};
