//! The op surface models are written against, and its implementations.

pub mod cpu;
mod dtype;

pub use dtype::GgmlType;
