//! Constrained decoding: the sampler may only pick tokens that keep the output valid for a
//! grammar (JSON mode, a JSON Schema, a forced tool call), so even a tiny model emits output
//! that parses.
//!
//! The grammar engine is llguidance (the library behind vLLM's and llama.cpp's guidance
//! backends): a JSON Schema compiles to a lexer + Earley parser, and each step it computes the
//! set of vocabulary tokens the grammar allows, walking a token trie instead of the whole
//! vocabulary. We build the trie once per tokenizer from our own token bytes (special tokens
//! marked so that they never count as text), keep it in the tokenizer, and per sequence run one
//! [`Matcher`]: [`ConstraintState::mask`] sets forbidden logits to −∞ before sampling and
//! [`ConstraintState::accept`] advances the parser after.
//!
//! JSON is emitted with `json.dumps` separators (`", "`, `": "`) and no free whitespace between
//! tokens: a small model given free whitespace can fill its whole budget with newlines.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use crate::model::tokenizer::Tokenizer;

/// What a request constrains its output to.
#[derive(Clone, Debug, PartialEq)]
pub enum OutputFormat {
    /// Any JSON object (Ollama `format: "json"`, OpenAI `json_object`).
    JsonObject,
    /// Output valid under this JSON Schema (Ollama `format: {…}`, OpenAI `json_schema`, forced
    /// tool calls).
    JsonSchema(Value),
}

impl OutputFormat {
    fn grammar(&self) -> TopLevelGrammar {
        let mut schema = match self {
            Self::JsonObject => json!({ "type": "object" }),
            Self::JsonSchema(s) => s.clone(),
        };
        if let Value::Object(map) = &mut schema {
            // Options of our own; a schema's own `x-guidance` is not honoured (it could turn
            // free whitespace back on).
            map.insert(
                "x-guidance".into(),
                json!({ "whitespace_flexible": false, "item_separator": ", ", "key_separator": ": " }),
            );
        }
        TopLevelGrammar::from_json_schema(schema)
    }
}

/// A checked constraint, ready to start per sequence. Compiling happens when the request is
/// prepared, so a schema the engine cannot enforce is the client's error (400) before anything
/// is queued.
#[derive(Clone)]
pub struct Constraint {
    format: OutputFormat,
    factory: Arc<ParserFactory>,
    /// Compiled once; each sequence starts from a deep copy (no recompilation on the engine
    /// thread).
    parser: llguidance::TokenParser,
    /// End-of-generation ids: all of them are allowed where the grammar allows its EOS.
    eos: Vec<u32>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").field("format", &self.format).finish()
    }
}

impl PartialEq for Constraint {
    fn eq(&self, other: &Self) -> bool {
        self.format == other.format && Arc::ptr_eq(&self.factory, &other.factory)
    }
}

impl Constraint {
    /// Compiles `format` for `tok`'s vocabulary. The error says what the grammar engine could
    /// not take (an unsupported schema keyword, a malformed schema).
    pub fn new(tok: &Tokenizer, format: OutputFormat) -> Result<Self, String> {
        let factory = factory(tok)?;
        let parser = factory.create_parser(format.grammar()).map_err(|e| e.to_string())?;
        Ok(Self { format, factory, parser, eos: tok.eos_ids().to_vec() })
    }

    pub fn format(&self) -> &OutputFormat {
        &self.format
    }

    /// A fresh parser at the start of the output.
    pub fn start(&self) -> ConstraintState {
        let tok_eos = self.factory.tok_env().tok_trie().eos_token();
        ConstraintState { matcher: Matcher::new(Ok(self.parser.deep_clone())), eos: self.eos.clone(), tok_eos }
    }
}

/// One sequence's position in the grammar.
pub struct ConstraintState {
    matcher: Matcher,
    eos: Vec<u32>,
    tok_eos: u32,
}

impl std::fmt::Debug for ConstraintState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConstraintState").field("stopped", &self.matcher.is_stopped()).finish()
    }
}

impl ConstraintState {
    /// Sets the logit of every token the grammar does not allow next to −∞ (ids past the trie's
    /// vocabulary too). End-of-generation ids stay as they were when the grammar may end here.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        let allowed = self.matcher.compute_mask_or_eos().map_err(|e| e.to_string())?;
        let may_end = allowed.is_allowed(self.tok_eos);
        let kept: Vec<(usize, f32)> = if may_end {
            self.eos
                .iter()
                .filter(|&&e| (e as usize) < logits.len())
                .map(|&e| (e as usize, logits[e as usize]))
                .collect()
        } else {
            Vec::new()
        };
        let n = allowed.len().min(logits.len());
        allowed.iter_unset_entries(|i| {
            if i < n {
                logits[i] = f32::NEG_INFINITY;
            }
        });
        logits[n..].fill(f32::NEG_INFINITY);
        for (i, v) in kept {
            logits[i] = v;
        }
        Ok(())
    }

    /// Advances past the sampled `id`. Returns true when the grammar is complete (nothing may
    /// follow but the end). An end-of-generation id is not fed to the parser: the sequence ends
    /// with it.
    pub fn accept(&mut self, id: u32) -> Result<bool, String> {
        if self.eos.contains(&id) {
            return Ok(true);
        }
        self.matcher.consume_token(id).map_err(|e| e.to_string())?;
        Ok(self.matcher.is_stopped())
    }
}

/// Builds `tok`'s token trie now (a few hundred milliseconds for a large vocabulary) rather than
/// on the first constrained request; a failure is logged and left for that request to report.
pub fn prepare_vocabulary(tok: &Tokenizer) {
    let t = std::time::Instant::now();
    match factory(tok) {
        Ok(_) => tracing::debug!(ms = t.elapsed().as_millis() as u64, "constrained-decoding token trie built"),
        Err(e) => tracing::warn!(error = %e, "constrained decoding will not be available for this model"),
    }
}

/// The parser factory for `tok`'s vocabulary, built once (token trie + mask slices).
fn factory(tok: &Tokenizer) -> Result<Arc<ParserFactory>, String> {
    tok.grammar.get_or_init(|| build_factory(tok).map(Arc::new)).clone()
}

fn build_factory(tok: &Tokenizer) -> Result<ParserFactory, String> {
    let n = tok.vocab_size();
    let words: Vec<Vec<u8>> = (0..n as u32)
        .map(|id| {
            let bytes = tok.token_bytes(id).unwrap_or_default();
            // End-of-generation ids are never text, even where the vocabulary calls them normal.
            if tok.is_special(id) || tok.eos_ids().contains(&id) {
                // The trie's marker: never matched by text the grammar asks for.
                let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                w.extend_from_slice(bytes);
                w
            } else {
                bytes.to_vec()
            }
        })
        .collect();
    let eos = tok.eos_id().ok_or("the tokenizer has no end-of-sequence token: constrained output cannot end")?;
    let mut info = TokRxInfo::new(n as u32, eos);
    info.tok_bos = tok.bos_id();
    let trie = TokTrie::from(&info, &words);
    // Tokenizing is only needed for forced-token shortcuts, which this engine does not use; the
    // trie's greedy tokenization is enough.
    let env: llguidance::toktrie::TokEnv = Arc::new(ApproximateTokEnv::new(trie));
    let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
    factory.quiet();
    Ok(factory)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_model;

    fn tok() -> Tokenizer {
        Tokenizer::from_gguf(&test_model::gguf(1)).unwrap()
    }

    /// Runs `c` to the end, each step taking the allowed token that `pick` ranks highest.
    fn drive(tok: &Tokenizer, c: &Constraint, mut pick: impl FnMut(usize) -> Vec<f32>) -> (String, bool) {
        let mut st = c.start();
        let mut out = Vec::new();
        for step in 0..200 {
            let mut logits = pick(step);
            st.mask(&mut logits).unwrap();
            let id = (0..logits.len()).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap() as u32;
            assert!(logits[id as usize] > f32::NEG_INFINITY, "the mask left nothing");
            if tok.eos_ids().contains(&id) {
                return (tok.decode(&out, false), true);
            }
            out.push(id);
            if st.accept(id).unwrap() {
                return (tok.decode(&out, false), true);
            }
        }
        (tok.decode(&out, false), false)
    }

    #[test]
    fn json_mode_yields_an_object_whatever_the_model_prefers() {
        let tok = tok();
        let c = Constraint::new(&tok, OutputFormat::JsonObject).unwrap();
        let n = tok.vocab_size();
        // Scores that favour closing braces and quotes, so the object ends soon, else noise.
        let mut seed = 7u64;
        let (text, ended) = drive(&tok, &c, |_| {
            (0..n)
                .map(|i| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let noise = (seed >> 40) as f32 / (1u64 << 24) as f32;
                    let t = tok.decode(&[i as u32], false);
                    noise + if t == "}" || t == "\"" { 0.5 } else { 0.0 }
                })
                .collect()
        });
        assert!(ended, "{text:?}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        assert!(v.is_object(), "{text}");
        // The end-of-generation ids are forbidden until the object closes.
        let mut st = c.start();
        let mut logits = vec![0.0; n];
        st.mask(&mut logits).unwrap();
        assert!(tok.eos_ids().iter().all(|&e| logits[e as usize] == f32::NEG_INFINITY));
        let allowed: Vec<String> =
            (0..n).filter(|&i| logits[i] > f32::NEG_INFINITY).map(|i| tok.decode(&[i as u32], false)).collect();
        assert_eq!(allowed, ["{"], "an object starts with a brace and nothing else");
    }

    #[test]
    fn a_schema_with_constants_forces_the_exact_output_and_ends_it() {
        let tok = tok();
        let schema = json!({
            "type": "object",
            "properties": { "room": { "const": "kitchen" }, "on": { "const": true } },
            "required": ["room", "on"],
            "additionalProperties": false
        });
        let c = Constraint::new(&tok, OutputFormat::JsonSchema(schema)).unwrap();
        let n = tok.vocab_size();
        let (text, ended) = drive(&tok, &c, |_| vec![0.0; n]);
        assert!(ended);
        assert_eq!(text, r#"{"room": "kitchen", "on": true}"#, "json.dumps separators, no free whitespace");
    }

    /// A token the grammar does not allow is an error from `accept`, never silently taken (the
    /// decoder turns it into an error event rather than a normal finish).
    #[test]
    fn a_token_the_grammar_forbids_is_an_error() {
        let tok = tok();
        let c = Constraint::new(&tok, OutputFormat::JsonObject).unwrap();
        let mut st = c.start();
        let x = tok.encode("x", false).unwrap()[0];
        assert!(st.accept(x).is_err(), "an object cannot start with x");
        let brace = tok.encode("{", false).unwrap()[0];
        assert!(!c.start().accept(brace).unwrap(), "a brace is a start, not an end");
    }

    #[test]
    fn schemas_the_engine_cannot_enforce_are_refused_with_the_reason() {
        let tok = tok();
        let bad = json!({ "type": "object", "if": { "required": ["a"] }, "then": { "required": ["b"] } });
        let e = Constraint::new(&tok, OutputFormat::JsonSchema(bad)).unwrap_err();
        assert!(e.contains("if") && e.contains("then"), "{e}");
        let e = Constraint::new(&tok, OutputFormat::JsonSchema(json!({ "type": "strng" }))).unwrap_err();
        assert!(e.contains("strng"), "{e}");
    }
}
