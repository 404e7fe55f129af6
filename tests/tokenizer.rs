//! `Tokenizer::from_gguf` against llama.cpp goldens (tests/fixtures/make_tokenizer_goldens.py):
//! token ids for varied text with and without special-token parsing, decoded text, the bytes of
//! every token, and which ids are special / end generation.
//!
//! The SmolLM2 tests need the real model: its path comes from `ZOE_TEST_GGUF`; when unset they
//! print a skip line and pass, unless `ZOE_REQUIRE_MODEL=1` (CI), where they fail. The
//! SentencePiece tests use the committed tests/fixtures/spm_tiny.gguf and always run.

mod common;

use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use zoe_llm::model::tokenizer::{Tokenizer, TokenizerFamily};
use zoe_llm::model::weights::GgufFile;

#[derive(Deserialize)]
struct Goldens {
    reference: String,
    vocab_size: usize,
    bos: i64,
    eos: i64,
    add_bos: bool,
    special_ids: Vec<u32>,
    eog_ids: Vec<u32>,
    pieces_sha256: String,
    pieces_sample: std::collections::BTreeMap<String, String>,
    encode: Vec<EncodeCase>,
    decode: Vec<DecodeCase>,
}

#[derive(Deserialize)]
struct EncodeCase {
    text: String,
    parse_special: bool,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct DecodeCase {
    ids: Vec<u32>,
    skip_special: bool,
    text: String,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn goldens(name: &str) -> Goldens {
    let path = fixtures().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn load(path: &Path) -> Tokenizer {
    let file = GgufFile::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Tokenizer::from_gguf(&file).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn check_encode(tok: &Tokenizer, g: &Goldens) {
    let mut failures = Vec::new();
    for case in &g.encode {
        let got = tok.encode(&case.text, case.parse_special).expect("encode");
        if got != case.ids {
            failures.push(format!(
                "text {:?} parse_special={}:\n  expected {:?}\n  got      {:?}",
                case.text, case.parse_special, case.ids, got
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from {}:\n{}",
        failures.len(),
        g.encode.len(),
        g.reference,
        failures.join("\n")
    );
}

fn check_decode(tok: &Tokenizer, g: &Goldens) {
    let mut failures = Vec::new();
    for case in &g.decode {
        let got = tok.decode(&case.ids, case.skip_special);
        if got != case.text {
            failures.push(format!(
                "ids {:?} skip_special={}: expected {:?}, got {:?}",
                case.ids, case.skip_special, case.text, got
            ));
        }
    }
    assert!(failures.is_empty(), "decode differs from {}:\n{}", g.reference, failures.join("\n"));
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn check_pieces(tok: &Tokenizer, g: &Goldens) {
    assert_eq!(tok.vocab_size(), g.vocab_size);
    // The sample names the first differing ids; the hash then covers the whole vocabulary.
    for (id, want) in &g.pieces_sample {
        let id: u32 = id.parse().unwrap();
        let got = tok.token_bytes(id).expect("id in range");
        assert_eq!(&hex(got), want, "bytes of token {id} ({:?})", tok.token_text(id));
    }
    let mut h = Sha256::new();
    for id in 0..tok.vocab_size() as u32 {
        let p = tok.token_bytes(id).unwrap();
        h.update((p.len() as u32).to_le_bytes());
        h.update(p);
    }
    assert_eq!(hex(&h.finalize()), g.pieces_sha256, "token bytes over the whole vocabulary");
    assert_eq!(tok.token_bytes(tok.vocab_size() as u32), None);
}

fn check_specials(tok: &Tokenizer, g: &Goldens) {
    let ours: Vec<u32> = (0..tok.vocab_size() as u32).filter(|&id| tok.is_special(id)).collect();
    assert_eq!(ours, g.special_ids, "special (control/unknown) ids");
    assert_eq!(tok.bos_id().map(i64::from), Some(g.bos));
    assert_eq!(tok.eos_id().map(i64::from), Some(g.eos));
    assert_eq!(tok.add_bos(), g.add_bos);
    let eog = tok.eos_ids();
    assert_eq!(eog.first().copied().map(i64::from), Some(g.eos), "EOS comes first");
    for id in eog {
        assert!(g.eog_ids.contains(id), "{id} ({:?}) ends generation here but not in llama.cpp", tok.token_text(*id));
    }
}

#[test]
fn smollm2_encode_matches_llama_cpp() {
    let Some(path) = common::smollm2_gguf("smollm2_encode_matches_llama_cpp") else {
        return;
    };
    let tok = load(&path);
    assert_eq!(tok.family(), TokenizerFamily::ByteLevelBpe);
    check_encode(&tok, &goldens("tokenizer_smollm2.json"));
}

#[test]
fn smollm2_decode_and_token_bytes_match_llama_cpp() {
    let Some(path) = common::smollm2_gguf("smollm2_decode_and_token_bytes_match_llama_cpp") else {
        return;
    };
    let tok = load(&path);
    let g = goldens("tokenizer_smollm2.json");
    check_decode(&tok, &g);
    check_pieces(&tok, &g);
}

#[test]
fn smollm2_special_tokens_and_template() {
    let Some(path) = common::smollm2_gguf("smollm2_special_tokens_and_template") else {
        return;
    };
    let tok = load(&path);
    check_specials(&tok, &goldens("tokenizer_smollm2.json"));
    assert_eq!(tok.special_token_text(1), Some("<|im_start|>"));
    assert_eq!(tok.special_token_text(19556), None, "an ordinary token is not special");
    assert_eq!(tok.token_id("<|im_end|>"), Some(2));
    assert_eq!(tok.bos_token(), Some("<|im_start|>"));
    assert_eq!(tok.eos_token(), Some("<|im_end|>"));
    let template = tok.chat_template().expect("SmolLM2 ships a chat template");
    assert!(template.contains("<|im_start|>"), "{template}");
}

#[test]
fn spm_encode_matches_llama_cpp() {
    let tok = load(&fixtures().join("spm_tiny.gguf"));
    assert_eq!(tok.family(), TokenizerFamily::SentencePieceBpe);
    check_encode(&tok, &goldens("tokenizer_spm_tiny.json"));
}

#[test]
fn spm_decode_token_bytes_and_specials_match_llama_cpp() {
    let tok = load(&fixtures().join("spm_tiny.gguf"));
    let g = goldens("tokenizer_spm_tiny.json");
    check_decode(&tok, &g);
    check_pieces(&tok, &g);
    check_specials(&tok, &g);
    assert_eq!(tok.bos_token(), Some("<s>"));
    assert_eq!(tok.eos_token(), Some("</s>"));
}

/// Goldens for the small byte-level BPE fixtures (tests/fixtures/make_bpe_fixtures.py).
#[derive(Deserialize)]
struct BpeGoldens {
    gguf: std::collections::BTreeMap<String, BpeGguf>,
    tokenizer_json: std::collections::BTreeMap<String, BpeJson>,
}

#[derive(Deserialize)]
struct BpeGguf {
    add_bos: bool,
    eos: u32,
    eog_ids: Vec<u32>,
    encode: Vec<EncodeCase>,
}

#[derive(Deserialize)]
struct BpeJson {
    encode: Vec<EncodeCase>,
    decode: Vec<DecodeCase>,
}

fn bpe_goldens() -> BpeGoldens {
    let path = fixtures().join("bpe_tiny/goldens.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn encode_failures(tok: &Tokenizer, cases: &[EncodeCase], label: &str) -> Vec<String> {
    cases
        .iter()
        .filter_map(|case| {
            let got = tok.encode(&case.text, case.parse_special).expect("encode");
            (got != case.ids).then(|| {
                format!(
                    "{label}: text {:?} parse_special={}:\n  expected {:?}\n  got      {:?}",
                    case.text, case.parse_special, case.ids, got
                )
            })
        })
        .collect()
}

#[test]
fn every_gguf_pre_tokenizer_matches_llama_cpp() {
    let g = bpe_goldens();
    let expected = ["default", "gpt-2", "llama-bpe", "qwen2", "smollm"];
    assert_eq!(g.gguf.keys().map(String::as_str).collect::<Vec<_>>(), expected);
    let mut failures = Vec::new();
    for (pre, golden) in &g.gguf {
        let tok = load(&fixtures().join(format!("bpe_tiny/{pre}.gguf")));
        assert_eq!(tok.add_bos(), golden.add_bos, "{pre}: add_bos");
        assert_eq!(tok.eos_ids().first(), Some(&golden.eos), "{pre}: EOS first");
        let mut eog = tok.eos_ids().to_vec();
        eog.sort_unstable();
        assert_eq!(eog, golden.eog_ids, "{pre}: end-of-generation ids");
        failures.extend(encode_failures(&tok, &golden.encode, pre));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn tokenizer_json_matches_hf_tokenizers() {
    let g = bpe_goldens();
    let mut failures = Vec::new();
    for (style, golden) in &g.tokenizer_json {
        let dir = fixtures().join("bpe_tiny").join(style);
        let tok = Tokenizer::from_file(&dir.join("tokenizer.json"), Some(&dir.join("tokenizer_config.json")))
            .unwrap_or_else(|e| panic!("{style}: {e}"));
        assert_eq!(tok.family(), TokenizerFamily::ByteLevelBpe, "{style}");
        failures.extend(encode_failures(&tok, &golden.encode, style));
        for case in &golden.decode {
            let got = tok.decode(&case.ids, case.skip_special);
            if got != case.text {
                failures.push(format!(
                    "{style}: decode {:?} skip={}: expected {:?}, got {:?}",
                    case.ids, case.skip_special, case.text, got
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn tokenizer_config_supplies_tokens_bos_policy_and_template() {
    let dir = fixtures().join("bpe_tiny/llama3-style");
    let llama = Tokenizer::from_file(&dir.join("tokenizer.json"), Some(&dir.join("tokenizer_config.json"))).unwrap();
    assert_eq!(llama.bos_token(), Some("<|begin_of_text|>"));
    assert_eq!(llama.bos_id(), llama.token_id("<|begin_of_text|>"));
    assert_eq!(llama.eos_token(), Some("<|eot_id|>"));
    assert!(llama.add_bos(), "the post-processor prepends BOS");
    let want = std::fs::read_to_string(fixtures().join("chat_templates/llama-3.2-instruct.jinja")).unwrap();
    assert_eq!(llama.chat_template(), Some(want.as_str()));
    let eot = llama.token_id("<|eot_id|>").unwrap();
    let end = llama.token_id("<|end_of_text|>").unwrap();
    assert_eq!(llama.eos_ids(), [eot, end], "EOS first, then the other end-of-generation specials");
    assert!(llama.is_special(eot));
    let tool_call = llama.token_id("<tool_call>").unwrap();
    assert!(!llama.is_special(tool_call), "user-defined tokens are text");
    assert_eq!(llama.decode(&[tool_call, eot], true), "<tool_call>");

    let dir = fixtures().join("bpe_tiny/qwen2-style");
    let qwen = Tokenizer::from_file(&dir.join("tokenizer.json"), Some(&dir.join("tokenizer_config.json"))).unwrap();
    assert_eq!(qwen.bos_token(), None);
    assert!(!qwen.add_bos());
    assert_eq!(qwen.eos_token(), Some("<|eot_id|>"), "the {{content: …}} spelling");
    let want = std::fs::read_to_string(fixtures().join("chat_templates/qwen2.5-instruct.jinja")).unwrap();
    assert_eq!(qwen.chat_template(), Some(want.as_str()), "the 'default' entry of a template list");

    // Without a config there is no template and no BOS string, but the vocabulary still works.
    let bare = Tokenizer::from_file(&dir.join("tokenizer.json"), None).unwrap();
    assert_eq!(bare.chat_template(), None);
    assert_eq!(bare.encode("Hello", false).unwrap(), qwen.encode("Hello", false).unwrap());
}

#[test]
fn bad_tokenizer_files_are_errors() {
    let missing = Tokenizer::from_file(Path::new("/nonexistent/tokenizer.json"), None).unwrap_err();
    assert!(missing.to_string().contains("/nonexistent/tokenizer.json"), "{missing}");
    let garbage = Tokenizer::from_json_bytes(b"{not json", None).unwrap_err();
    assert!(garbage.to_string().contains("tokenizer.json"), "{garbage}");
    let dir = fixtures().join("bpe_tiny/qwen2-style");
    let json = std::fs::read(dir.join("tokenizer.json")).unwrap();
    let bad_config = Tokenizer::from_json_bytes(&json, Some(br#"{"chat_template": 5}"#)).unwrap_err();
    assert!(bad_config.to_string().contains("chat_template"), "{bad_config}");
}
