//! Generation: sampling, detokenization, the single-sequence loop.

pub mod detokenizer;
pub mod generate;
pub mod sampler;
