//! The CPU backend: the reference semantics of every op, plus fast paths tested against them.

pub mod blocks;
