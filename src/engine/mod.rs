//! Generation: sampling, detokenization, the single-sequence loop, and the supervised engine
//! that serves a loaded model with continuous batching.

mod batch;
pub mod detokenizer;
pub mod fault;
pub mod generate;
pub mod grammar;
pub mod histogram;
pub mod sampler;
pub mod service;
mod supervisor;
