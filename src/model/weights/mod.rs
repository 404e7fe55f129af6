//! Weight files: names → tensors.

pub mod awq;
pub mod gguf;
#[cfg(test)]
pub(crate) mod gguf_writer;
pub mod safetensors;

pub use gguf::{GgufError, GgufFile, MetaValue, TensorInfo};
