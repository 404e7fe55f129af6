//! Helpers shared by integration tests. Cargo builds only `tests/*.rs` as test crates; this
//! directory is pulled in with `mod support;`.

pub mod http;
