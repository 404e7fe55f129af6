//! Weight files: names → tensors.

pub mod awq;
pub mod gguf;
pub mod safetensors;
#[cfg(test)]
pub(crate) mod gguf_writer;

pub use gguf::{GgufError, GgufFile, MetaValue, TensorInfo};
