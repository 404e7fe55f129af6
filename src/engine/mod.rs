//! Generation: sampling, detokenization, the single-sequence loop, and the engine thread that
//! serves a loaded model.

pub mod detokenizer;
pub mod generate;
pub mod sampler;
pub mod service;
