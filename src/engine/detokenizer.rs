//! Incremental detokenization.
