//! What every API dialect shares.

pub mod template;
