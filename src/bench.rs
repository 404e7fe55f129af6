//! zoe-llm bench.
