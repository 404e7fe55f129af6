//! Shared by the integration tests: where the real SmolLM2 model file is.
#![allow(dead_code)]

use std::path::PathBuf;

/// The SmolLM2 GGUF from `ZOE_TEST_GGUF`. When it is unset the calling test prints a visible
/// skip line and returns, unless `ZOE_REQUIRE_MODEL=1` (set by `scripts/test`, so CI can never
/// pass by skipping), in which case it fails.
pub fn smollm2_gguf(test: &str) -> Option<PathBuf> {
    match std::env::var_os("ZOE_TEST_GGUF") {
        Some(p) => {
            let p = PathBuf::from(p);
            assert!(p.is_file(), "ZOE_TEST_GGUF={} is not a file", p.display());
            Some(p)
        }
        None if std::env::var("ZOE_REQUIRE_MODEL").as_deref() == Ok("1") => {
            panic!("{test}: ZOE_REQUIRE_MODEL=1 but ZOE_TEST_GGUF is not set")
        }
        None => {
            eprintln!(
                "skipped {test}: set ZOE_TEST_GGUF=<path to SmolLM2-135M-Instruct.Q4_1.gguf> (scripts/test does)"
            );
            None
        }
    }
}
