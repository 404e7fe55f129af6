//! A [`Tokenizer`](super::Tokenizer) from GGUF `tokenizer.*` metadata.
//!
//! Semantics follow llama.cpp (`src/llama-vocab.cpp`), since a GGUF file means what llama.cpp
//! does with it: the pre-tokenizer regex lists per `tokenizer.ggml.pre`, the BOS defaults, which
//! token types are split out as specials and how each type turns back into bytes.

use std::collections::HashMap;

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

use super::{
    byte_level_piece, gpt2_char_bytes, parse_byte_token, spm_piece, Parts, Result, TokenKind, TokenizerError,
    TokenizerFamily, SPM_SPACE,
};
use crate::model::weights::{GgufFile, MetaValue};

// Pre-tokenizer regexes, as llama.cpp lists them in `llm_tokenizer_bpe::llm_tokenizer_bpe`.
// llama.cpp spells `(?i:'s|…)` of the HF files as `(?:'[sS]|…)`; we keep its spelling because a
// GGUF file is tokenized the way llama.cpp does (the two differ on a few Unicode case folds).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's fallback list for `default` or a missing `tokenizer.ggml.pre`.
const DEFAULT_REGEXES: &[&str] = &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"];

/// How a `gpt2` vocabulary is pre-tokenized.
struct PreTokenizer {
    /// Applied in order; each splits every current piece, keeping matches and the text between
    /// them as separate pieces (llama.cpp `unicode_regex_split`; HF `Split` with `Isolated`).
    regexes: &'static [&'static str],
    /// Use a whole piece as one token when it is in the vocabulary (HF `ignore_merges`).
    ignore_merges: bool,
    /// llama.cpp's `add_bos` default when the file has no `tokenizer.ggml.add_bos_token`.
    add_bos_default: bool,
}

fn pre_tokenizer(name: Option<&str>) -> Result<PreTokenizer> {
    let plain = |regexes| PreTokenizer { regexes, ignore_merges: false, add_bos_default: false };
    Ok(match name {
        None | Some("default") => plain(DEFAULT_REGEXES),
        Some("gpt2" | "gpt-2" | "phi-2" | "mpt" | "olmo") => plain(&[GPT2]),
        // Every digit on its own, then GPT-2 (llama.cpp groups these pre types together).
        Some("smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b") => {
            plain(&[r"\p{N}", GPT2])
        }
        Some("llama-bpe" | "llama3" | "llama-v3") => {
            PreTokenizer { regexes: &[LLAMA3], ignore_merges: true, add_bos_default: true }
        }
        Some("qwen2" | "deepseek-r1-qwen" | "megrez" | "stablelm2") => plain(&[QWEN2]),
        Some(other) => return Err(TokenizerError::UnknownPreTokenizer(other.to_owned())),
    })
}

fn invalid(msg: impl Into<String>) -> TokenizerError {
    TokenizerError::Invalid(msg.into())
}

fn backend(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Backend(e.to_string())
}

/// An optional id key; present but out of range or of the wrong type is an error.
fn opt_id(file: &GgufFile, key: &str, n: usize) -> Result<Option<u32>> {
    if file.get(key).is_none() {
        return Ok(None);
    }
    let id = file.get_u64(key)?;
    if id as usize >= n {
        return Err(invalid(format!("{key} = {id} is outside the vocabulary ({n} tokens)")));
    }
    Ok(Some(id as u32))
}

fn opt_bool(file: &GgufFile, key: &str) -> Result<Option<bool>> {
    file.get(key).map(|_| file.get_bool(key)).transpose().map_err(Into::into)
}

fn token_kind(id: usize, ty: i128) -> Result<TokenKind> {
    Ok(match ty {
        1 => TokenKind::Normal,
        2 => TokenKind::Unknown,
        3 => TokenKind::Control,
        4 => TokenKind::UserDefined,
        6 => TokenKind::Byte,
        // 0 is "undefined": llama.cpp gives such tokens no text, like unused ones.
        0 | 5 => TokenKind::Unused,
        other => return Err(invalid(format!("token {id} has unknown token_type {other}"))),
    })
}

pub(super) fn build(file: &GgufFile) -> Result<super::Tokenizer> {
    let model = file.get_str("tokenizer.ggml.model")?;
    let spm = match model {
        "gpt2" => false,
        "llama" => true,
        other => return Err(TokenizerError::UnknownModel(other.to_owned())),
    };
    let texts: Vec<String> = file.get_str_array("tokenizer.ggml.tokens")?.into_iter().map(str::to_owned).collect();
    let n = texts.len();
    if n == 0 || n > u32::MAX as usize {
        return Err(invalid(format!("tokenizer.ggml.tokens has {n} entries")));
    }
    let kinds: Vec<TokenKind> = match file.get("tokenizer.ggml.token_type") {
        None => vec![TokenKind::Normal; n],
        Some(_) => {
            let types = file.get_array("tokenizer.ggml.token_type")?;
            if types.len() < n {
                return Err(invalid(format!("tokenizer.ggml.token_type has {} entries for {n} tokens", types.len())));
            }
            types[..n]
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let ty = v.as_int().ok_or_else(|| invalid(format!("token_type[{i}] is {}", v.type_name())))?;
                    token_kind(i, ty)
                })
                .collect::<Result<_>>()?
        }
    };

    // The vocabulary as the BPE model sees it. llama.cpp refuses duplicate strings; so do we,
    // because the crate's string→id map would silently keep only one of them.
    let mut vocab: Vocab = Vocab::with_capacity(n);
    for (i, t) in texts.iter().enumerate() {
        if let Some(prev) = vocab.insert(t.clone(), i as u32) {
            return Err(invalid(format!("duplicate token {t:?} at ids {prev} and {i}")));
        }
    }

    let pre_name = file.get("tokenizer.ggml.pre").map(|_| file.get_str("tokenizer.ggml.pre")).transpose()?;
    let mut add_bos = spm;
    let mut inner = if spm {
        let add_space_prefix = opt_bool(file, "tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
        build_spm(file, &texts, &kinds, vocab, add_space_prefix)?
    } else {
        let pre = pre_tokenizer(pre_name)?;
        add_bos = pre.add_bos_default;
        build_byte_level(file, vocab, &pre)?
    };
    // User-defined tokens are matched literally before the model runs, whether or not specials
    // are parsed (llama.cpp `tokenizer_st_partition`). Matching is on the raw text
    // (`normalized(false)`), as llama.cpp does. Control tokens are split by `Tokenizer::encode`.
    let user: Vec<AddedToken> = (0..n)
        .filter(|&i| kinds[i] == TokenKind::UserDefined)
        .map(|i| AddedToken::from(texts[i].clone(), false).normalized(false))
        .collect();
    inner.add_tokens(user).map_err(backend)?;

    let byte_map = gpt2_char_bytes();
    let pieces = texts
        .iter()
        .zip(&kinds)
        .map(|(t, &k)| match k {
            TokenKind::Unused => Vec::new(),
            TokenKind::Control | TokenKind::Unknown | TokenKind::UserDefined => t.as_bytes().to_vec(),
            TokenKind::Byte => parse_byte_token(t).map(|b| vec![b]).unwrap_or_default(),
            TokenKind::Normal if spm => spm_piece(t, k),
            TokenKind::Normal => byte_level_piece(t, &byte_map),
        })
        .collect();

    // llama.cpp defaults BOS/EOS/UNK to 1/2/0 for SentencePiece vocabularies only.
    let default_id = |id: u32| (spm && (id as usize) < n).then_some(id);
    let bos = opt_id(file, "tokenizer.ggml.bos_token_id", n)?.or(default_id(1));
    let eos = opt_id(file, "tokenizer.ggml.eos_token_id", n)?.or(default_id(2));
    let extra_eog = ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"]
        .into_iter()
        .map(|k| opt_id(file, k, n))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect();
    if let Some(b) = opt_bool(file, "tokenizer.ggml.add_bos_token")? {
        add_bos = b;
    }
    let chat_template = match file.get("tokenizer.chat_template") {
        Some(MetaValue::String(s)) => Some(s.clone()),
        Some(v) => return Err(invalid(format!("tokenizer.chat_template is {}, expected string", v.type_name()))),
        None => None,
    };

    Parts {
        inner,
        family: if spm { TokenizerFamily::SentencePieceBpe } else { TokenizerFamily::ByteLevelBpe },
        texts,
        kinds,
        pieces,
        bos,
        eos,
        extra_eog,
        add_bos,
        bos_text: None,
        eos_text: None,
        chat_template,
    }
    .finish()
}

/// Byte-level BPE: the pre-tokenizer regexes, then GPT-2 byte mapping, then merges by rank.
fn build_byte_level(file: &GgufFile, vocab: Vocab, pre: &PreTokenizer) -> Result<tokenizers::Tokenizer> {
    let merges = file
        .get_str_array("tokenizer.ggml.merges")?
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            // llama.cpp splits at the first space after the first byte (`word.find(' ', 1)`).
            // A space is ASCII, so the cut is always on a character boundary.
            let cut = m.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1);
            match cut {
                Some(p) => Ok((m[..p].to_owned(), m[p + 1..].to_owned())),
                None => Err(invalid(format!("merge {i} ({m:?}) is not two tokens separated by a space"))),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let model = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(pre.ignore_merges)
        .build()
        .map_err(|e| invalid(format!("tokenizer.ggml.merges: {e}")))?;

    let mut steps: Vec<PreTokenizerWrapper> = Vec::with_capacity(pre.regexes.len() + 1);
    for re in pre.regexes {
        let split = Split::new(SplitPattern::Regex((*re).to_owned()), SplitDelimiterBehavior::Isolated, false)
            .map_err(backend)?;
        steps.push(split.into());
    }
    // Only the byte→char mapping: splitting was done by the regexes above.
    steps.push(ByteLevel::new(false, false, false).into());
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(PreSequence::new(steps))));
    Ok(tok)
}

/// SentencePiece BPE (llama.cpp `llm_tokenizer_spm`): spaces become `▁`, a `▁` is prepended to
/// every run of text (at the start and after each special token), then the adjacent pair whose
/// concatenation is the highest-scoring vocabulary entry is merged until none is left; characters
/// that end up outside the vocabulary become `<0xNN>` byte tokens.
///
/// The crate's BPE merges by rank instead of score, so the merges are derived: every split of a
/// normal token into two vocabulary entries is a merge, ranked by the score of the token it makes
/// (highest first). That is the same choice llama.cpp makes at every step; the two can only
/// differ when two different tokens have exactly equal scores and compete for the same symbols
/// (llama.cpp then takes the leftmost pair, the crate the lower rank).
fn build_spm(
    file: &GgufFile,
    texts: &[String],
    kinds: &[TokenKind],
    vocab: Vocab,
    add_space_prefix: bool,
) -> Result<tokenizers::Tokenizer> {
    let n = texts.len();
    let scores: Vec<f64> = match file.get("tokenizer.ggml.scores") {
        None => vec![0.0; n],
        Some(_) => {
            let arr = file.get_array("tokenizer.ggml.scores")?;
            if arr.len() < n {
                return Err(invalid(format!("tokenizer.ggml.scores has {} entries for {n} tokens", arr.len())));
            }
            arr[..n]
                .iter()
                .enumerate()
                .map(|(i, v)| v.as_f64().ok_or_else(|| invalid(format!("scores[{i}] is {}", v.type_name()))))
                .collect::<Result<_>>()?
        }
    };

    let id_of: HashMap<&str, usize> = texts.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    // (score of the merged token, merged id, left length) → stable, total order.
    let mut ranked: Vec<(f64, usize, usize)> = Vec::new();
    for (id, t) in texts.iter().enumerate() {
        if kinds[id] != TokenKind::Normal {
            continue;
        }
        for (cut, _) in t.char_indices().skip(1) {
            let (a, b) = t.split_at(cut);
            let usable = |s: &str| id_of.get(s).is_some_and(|&j| kinds[j] == TokenKind::Normal);
            if usable(a) && usable(b) {
                ranked.push((scores[id], id, cut));
            }
        }
    }
    ranked.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    let merges =
        ranked.into_iter().map(|(_, id, cut)| (texts[id][..cut].to_owned(), texts[id][cut..].to_owned())).collect();

    let unk = kinds.iter().position(|&k| k == TokenKind::Unknown).map(|i| texts[i].clone());
    let has_bytes = kinds.contains(&TokenKind::Byte);
    let mut builder = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(has_bytes).fuse_unk(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    let model = builder.build().map_err(|e| invalid(format!("SentencePiece merges: {e}")))?;

    let space = SPM_SPACE.to_string();
    let mut norm: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        norm.push(Prepend::new(space.clone()).into());
    }
    norm.push(Replace::new(" ", space).map_err(backend)?.into());
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_normalizer(Some(NormalizerWrapper::Sequence(NormSequence::new(norm)))).map_err(backend)?;
    Ok(tok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tokenizer::Tokenizer;
    use crate::model::weights::gguf_writer::GgufWriter;

    /// Metadata shorthand for the shared test writer.
    enum Kv {
        Str(&'static str),
        Strs(Vec<&'static str>),
        I32s(Vec<i32>),
        U32(u32),
        Bool(bool),
    }

    /// A GGUF v3 file with the given metadata and no tensors.
    fn gguf(kvs: &[(&str, Kv)]) -> GgufFile {
        let mut w = GgufWriter::new();
        for (key, v) in kvs {
            let s = |v: &str| MetaValue::String(v.to_owned());
            w.kv(
                key,
                match v {
                    Kv::Str(v) => s(v),
                    Kv::Strs(vs) => MetaValue::Array(vs.iter().map(|v| s(v)).collect()),
                    Kv::I32s(vs) => MetaValue::Array(vs.iter().map(|&v| MetaValue::I32(v)).collect()),
                    Kv::U32(v) => MetaValue::U32(*v),
                    Kv::Bool(v) => MetaValue::Bool(*v),
                },
            );
        }
        w.build()
    }

    /// A four-token byte-level vocabulary: a, b, ab (one merge) and a control token.
    fn tiny(overrides: Vec<(&'static str, Kv)>) -> Result<Tokenizer> {
        let mut kvs = vec![
            ("tokenizer.ggml.model", Kv::Str("gpt2")),
            ("tokenizer.ggml.pre", Kv::Str("gpt-2")),
            ("tokenizer.ggml.tokens", Kv::Strs(vec!["a", "b", "ab", "<|eot|>"])),
            ("tokenizer.ggml.token_type", Kv::I32s(vec![1, 1, 1, 3])),
            ("tokenizer.ggml.merges", Kv::Strs(vec!["a b"])),
            ("tokenizer.ggml.eos_token_id", Kv::U32(3)),
        ];
        for (k, v) in overrides {
            kvs.retain(|(key, _)| *key != k);
            kvs.push((k, v));
        }
        Tokenizer::from_gguf(&gguf(&kvs))
    }

    fn err(overrides: Vec<(&'static str, Kv)>) -> String {
        tiny(overrides).expect_err("should be rejected").to_string()
    }

    #[test]
    fn tiny_vocabulary_works() {
        let tok = tiny(vec![]).unwrap();
        assert_eq!(tok.encode("abba", false).unwrap(), [2, 1, 0]);
        assert_eq!(tok.encode("ab<|eot|>", true).unwrap(), [2, 3]);
        // Unparsed, the control token is plain text whose characters are not in this vocabulary;
        // like llama.cpp, characters without a token are dropped.
        assert_eq!(tok.encode("<|eot|>", false).unwrap(), Vec::<u32>::new());
        assert_eq!(tok.eos_ids(), [3]);
        assert_eq!(tok.bos_id(), None);
        assert!(!tok.add_bos());
        assert_eq!(tok.chat_template(), None);
    }

    #[test]
    fn unknown_models_and_pre_tokenizers_are_named() {
        let e = err(vec![("tokenizer.ggml.model", Kv::Str("bert"))]);
        assert!(e.contains("'bert'") && e.contains("gpt2, llama"), "{e}");
        let e = err(vec![("tokenizer.ggml.pre", Kv::Str("tekken"))]);
        assert!(e.contains("'tekken'") && e.contains("smollm"), "{e}");
    }

    #[test]
    fn malformed_metadata_is_an_error() {
        let e = err(vec![("tokenizer.ggml.tokens", Kv::I32s(vec![1, 2]))]);
        assert!(e.contains("tokenizer.ggml.tokens"), "{e}");
        let e = err(vec![("tokenizer.ggml.token_type", Kv::I32s(vec![1, 1, 9, 3]))]);
        assert!(e.contains("token 2") && e.contains('9'), "{e}");
        let e = err(vec![("tokenizer.ggml.token_type", Kv::I32s(vec![1, 1]))]);
        assert!(e.contains("2 entries for 4 tokens"), "{e}");
        let e = err(vec![("tokenizer.ggml.merges", Kv::Strs(vec!["ab"]))]);
        assert!(e.contains("merge 0"), "{e}");
        let e = err(vec![("tokenizer.ggml.merges", Kv::Strs(vec!["a c"]))]);
        assert!(e.contains("tokenizer.ggml.merges"), "{e}");
        let e = err(vec![("tokenizer.ggml.tokens", Kv::Strs(vec!["a", "b", "a", "<|eot|>"]))]);
        assert!(e.contains("duplicate token"), "{e}");
        let e = err(vec![("tokenizer.ggml.eos_token_id", Kv::U32(99))]);
        assert!(e.contains("eos_token_id = 99"), "{e}");
        let e = err(vec![("tokenizer.ggml.add_bos_token", Kv::Str("yes"))]);
        assert!(e.contains("add_bos_token"), "{e}");
        let e = err(vec![("tokenizer.ggml.tokens", Kv::Strs(vec![]))]);
        assert!(e.contains("0 entries"), "{e}");
        let missing = Tokenizer::from_gguf(&gguf(&[("tokenizer.ggml.model", Kv::Str("gpt2"))])).unwrap_err();
        assert!(missing.to_string().contains("tokenizer.ggml.tokens"), "{missing}");
    }

    #[test]
    fn add_bos_follows_metadata_then_llama_cpp_defaults() {
        assert!(tiny(vec![("tokenizer.ggml.pre", Kv::Str("llama-bpe")), ("tokenizer.ggml.bos_token_id", Kv::U32(3))])
            .unwrap()
            .add_bos());
        assert!(!tiny(vec![
            ("tokenizer.ggml.pre", Kv::Str("llama-bpe")),
            ("tokenizer.ggml.bos_token_id", Kv::U32(3)),
            ("tokenizer.ggml.add_bos_token", Kv::Bool(false)),
        ])
        .unwrap()
        .add_bos());
        // Asking for BOS without a BOS id cannot add anything.
        assert!(!tiny(vec![("tokenizer.ggml.add_bos_token", Kv::Bool(true))]).unwrap().add_bos());
    }
}
