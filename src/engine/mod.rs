//! Generation: sampling, detokenization, the loop.

pub mod detokenizer;
pub mod sampler;
