//! Weight files: names → tensors.

pub mod gguf;

pub use gguf::{GgufError, GgufFile, MetaValue, TensorInfo};
