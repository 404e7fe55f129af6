//! Tokenizers from GGUF metadata or an HF `tokenizer.json`, wrapping the `tokenizers` crate.
//!
//! The crate does the BPE work (pre-tokenizer regexes, merges, byte fallback); this module adds
//! what llama.cpp and HF's Python layer do around it and the crate does not expose the way an
//! inference server needs:
//! - special-token parsing as a per-call choice (`encode(text, parse_special)`), done here by
//!   splitting the text on special-token strings before the crate sees it;
//! - the raw bytes of every token (`token_bytes`), so generated text can be streamed without ever
//!   splitting a UTF-8 character (see `engine::detokenizer`);
//! - BOS/EOS/end-of-generation ids and the chat template that ship with the model.
//!
//! Token classes follow llama.cpp (`src/llama-vocab.cpp`): control and unknown tokens are
//! "special" (split out only when `parse_special`, rendered only when asked); user-defined tokens
//! are always split out and always rendered as their text.

mod gguf;
mod hf;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::model::weights::{GgufError, GgufFile};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("unsupported tokenizer model '{0}' in tokenizer.ggml.model (supported: gpt2, llama)")]
    UnknownModel(String),
    #[error(
        "unsupported pre-tokenizer '{0}' in tokenizer.ggml.pre (supported: default, gpt2, gpt-2, \
         smollm and its group (starcoder, refact, command-r, codeshell, exaone, minerva-7b), \
         llama-bpe/llama3/llama-v3, qwen2/deepseek-r1-qwen/megrez/stablelm2)"
    )]
    UnknownPreTokenizer(String),
    #[error("invalid tokenizer data: {0}")]
    Invalid(String),
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("tokenizers: {0}")]
    Backend(String),
}

pub type Result<T> = std::result::Result<T, TokenizerError>;

/// What a token is, in llama.cpp's terms (GGUF `tokenizer.ggml.token_type`: 1 normal,
/// 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    Normal,
    /// `<unk>`; treated like a control token (llama.cpp `attr_special`).
    Unknown,
    /// BOS/EOS/`<|im_start|>`…: special.
    Control,
    /// Added vocabulary that is always matched literally and rendered as its text.
    UserDefined,
    /// Reserved slots; they decode to nothing.
    Unused,
    /// SentencePiece byte-fallback token `<0xNN>`.
    Byte,
}

impl TokenKind {
    pub fn is_special(self) -> bool {
        matches!(self, TokenKind::Control | TokenKind::Unknown)
    }
}

/// Token texts that mark the end of a turn, used to complete the end-of-generation set when the
/// metadata names only one EOS. Source: llama.cpp `llama_vocab::impl::load` (EOG detection by
/// text); trimmed to the families this server targets.
const EOG_TEXTS: &[&str] =
    &["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "<|end|>", "<end_of_turn>"];

/// Which algorithm the wrapped `tokenizers` model runs; decides how token strings map to bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenizerFamily {
    /// GPT-2 style byte-level BPE (SmolLM2, Llama 3, Qwen2): token strings are bytes mapped
    /// through the GPT-2 byte→char table.
    ByteLevelBpe,
    /// SentencePiece-style BPE: `▁` stands for a space, `<0xNN>` tokens are raw bytes.
    SentencePieceBpe,
    /// Anything else loaded from a tokenizer.json; token bytes come from the file's decoder.
    Other,
}

/// A model's tokenizer. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    family: TokenizerFamily,
    /// Indexed by token id: the stored token string and its class.
    texts: Vec<String>,
    kinds: Vec<TokenKind>,
    /// Indexed by token id: the bytes the token stands for (llama.cpp `token_to_piece` with
    /// `special = true`).
    pieces: Vec<Vec<u8>>,
    specials: SpecialSplitter,
    bos: Option<u32>,
    eos: Option<u32>,
    /// EOS first, then any other end-of-generation ids; no duplicates.
    eog: Vec<u32>,
    add_bos: bool,
    bos_text: Option<String>,
    eos_text: Option<String>,
    chat_template: Option<String>,
    /// The constrained-decoding token trie and parser factory, built on first use
    /// (`engine::grammar`).
    pub(crate) grammar: std::sync::OnceLock<std::result::Result<std::sync::Arc<llguidance::ParserFactory>, String>>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("family", &self.family)
            .field("vocab_size", &self.texts.len())
            .field("bos", &self.bos)
            .field("eog", &self.eog)
            .field("add_bos", &self.add_bos)
            .finish()
    }
}

impl Tokenizer {
    /// Builds the tokenizer stored in a GGUF file's `tokenizer.*` metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        gguf::build(file)
    }

    /// Loads an HF `tokenizer.json`, with the model's `tokenizer_config.json` (when given) for
    /// BOS/EOS strings, `add_bos_token` and the chat template.
    pub fn from_file(tokenizer_json: &Path, tokenizer_config: Option<&Path>) -> Result<Self> {
        let read = |path: &Path| std::fs::read(path).map_err(|source| TokenizerError::Io { path: path.into(), source });
        let json = read(tokenizer_json)?;
        let config = tokenizer_config.map(read).transpose()?;
        hf::build(&json, config.as_deref())
    }

    /// Same as [`Tokenizer::from_file`] from bytes already in memory.
    pub fn from_json_bytes(tokenizer_json: &[u8], tokenizer_config: Option<&[u8]>) -> Result<Self> {
        hf::build(tokenizer_json, tokenizer_config)
    }

    /// Token ids for `text`. Never adds BOS/EOS (see [`Tokenizer::add_bos`]). With
    /// `parse_special`, special-token strings in the text (e.g. `<|im_start|>`) become their single
    /// ids, as for a rendered chat prompt; without it they are tokenized as plain text, as for
    /// untrusted user content. User-defined tokens are matched either way (llama.cpp and HF agree).
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 1);
        if !parse_special {
            self.encode_plain(text, &mut ids)?;
            return Ok(ids);
        }
        let mut last = 0;
        for (start, end, id) in self.specials.find_iter(text) {
            self.encode_plain(&text[last..start], &mut ids)?;
            ids.push(id);
            last = end;
        }
        self.encode_plain(&text[last..], &mut ids)?;
        Ok(ids)
    }

    /// Runs the crate on text that contains no special token to split out. Each such segment is
    /// normalized on its own, which is what gives SentencePiece vocabularies their space prefix
    /// after every special token (llama.cpp `tokenize`, `is_prev_special`).
    fn encode_plain(&self, text: &str, ids: &mut Vec<u32>) -> Result<()> {
        if text.is_empty() {
            return Ok(());
        }
        let enc = self.inner.encode_fast(text, false).map_err(|e| TokenizerError::Backend(e.to_string()))?;
        ids.extend_from_slice(enc.get_ids());
        Ok(())
    }

    /// Text for `ids`: the concatenated token bytes, decoded as UTF-8 with U+FFFD for invalid
    /// sequences. `skip_special` drops control/unknown tokens. Ids outside the vocabulary are
    /// skipped (they carry no text; the engine masks them before sampling).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            let Some(piece) = self.pieces.get(id as usize) else {
                continue;
            };
            if skip_special && self.kinds[id as usize].is_special() {
                continue;
            }
            bytes.extend_from_slice(piece);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The raw bytes token `id` stands for (special tokens: their text), or `None` when the id is
    /// outside the vocabulary. A token may hold part of a UTF-8 character.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.pieces.get(id as usize).map(Vec::as_slice)
    }

    /// The token string as stored in the vocabulary (byte-level tokens in their mapped form,
    /// e.g. `Ġthe`).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.texts.get(id as usize).map(String::as_str)
    }

    /// The id of a token string as stored in the vocabulary (e.g. `<|im_end|>`).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.inner.token_to_id(text)
    }

    pub fn token_kind(&self, id: u32) -> Option<TokenKind> {
        self.kinds.get(id as usize).copied()
    }

    /// Number of token ids (the highest id + 1).
    pub fn vocab_size(&self) -> usize {
        self.texts.len()
    }

    pub fn family(&self) -> TokenizerFamily {
        self.family
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Every id that ends generation: EOS first, then end-of-turn/end-of-message tokens
    /// (`<|eot_id|>`, `<|eom_id|>`, `<|im_end|>`, … when present as special tokens).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eog
    }

    /// Whether a raw prompt should be prefixed with BOS (GGUF `tokenizer.ggml.add_bos_token` or
    /// llama.cpp's default for the vocabulary). Chat templates usually emit BOS themselves.
    pub fn add_bos(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }

    /// Control and unknown tokens: not part of the text, hidden from output by default.
    pub fn is_special(&self, id: u32) -> bool {
        self.kinds.get(id as usize).is_some_and(|k| k.is_special())
    }

    /// The text of a special token (`<|im_end|>`), or `None` for ordinary tokens and ids outside
    /// the vocabulary.
    pub fn special_token_text(&self, id: u32) -> Option<&str> {
        self.is_special(id).then(|| self.texts[id as usize].as_str())
    }

    /// The model's own chat template (GGUF `tokenizer.chat_template` / tokenizer_config.json).
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// `bos_token` for chat-template rendering.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_text.as_deref()
    }

    /// `eos_token` for chat-template rendering.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_text.as_deref()
    }
}

/// The vocabulary-derived parts of a [`Tokenizer`] that both loaders fill in.
struct Parts {
    inner: tokenizers::Tokenizer,
    family: TokenizerFamily,
    texts: Vec<String>,
    kinds: Vec<TokenKind>,
    pieces: Vec<Vec<u8>>,
    bos: Option<u32>,
    eos: Option<u32>,
    /// Extra end-of-generation ids named by metadata (GGUF eot/eom).
    extra_eog: Vec<u32>,
    add_bos: bool,
    bos_text: Option<String>,
    eos_text: Option<String>,
    chat_template: Option<String>,
}

impl Parts {
    fn finish(self) -> Result<Tokenizer> {
        let n = self.texts.len();
        if n == 0 {
            return Err(TokenizerError::Invalid("the vocabulary is empty".into()));
        }
        debug_assert!(self.kinds.len() == n && self.pieces.len() == n);
        for (what, id) in [("bos", self.bos), ("eos", self.eos)] {
            if let Some(id) = id.filter(|&id| id as usize >= n) {
                return Err(TokenizerError::Invalid(format!(
                    "{what} token id {id} is outside the vocabulary ({n} tokens)"
                )));
            }
        }
        let specials = SpecialSplitter::new(
            (0..n).filter(|&i| self.kinds[i].is_special()).map(|i| (self.texts[i].as_str(), i as u32)),
        );
        let mut eog: Vec<u32> = self.eos.into_iter().collect();
        let named = EOG_TEXTS.iter().filter_map(|t| self.inner.token_to_id(t));
        let mut rest: Vec<u32> = self
            .extra_eog
            .into_iter()
            .filter(|&id| (id as usize) < n)
            .chain(named.filter(|&id| self.kinds.get(id as usize).is_some_and(|k| k.is_special())))
            .filter(|id| !eog.contains(id))
            .collect();
        rest.sort_unstable();
        rest.dedup();
        eog.extend(rest);
        let bos_text = self.bos_text.or_else(|| self.bos.map(|id| self.texts[id as usize].clone()));
        let eos_text = self.eos_text.or_else(|| self.eos.map(|id| self.texts[id as usize].clone()));
        Ok(Tokenizer {
            inner: self.inner,
            family: self.family,
            texts: self.texts,
            kinds: self.kinds,
            pieces: self.pieces,
            specials,
            bos: self.bos,
            eos: self.eos,
            eog,
            add_bos: self.add_bos,
            bos_text,
            eos_text,
            chat_template: self.chat_template,
            grammar: std::sync::OnceLock::new(),
        })
    }
}

/// Finds special-token strings in text, leftmost first and longest at a position (the rule of
/// HF's added-vocabulary matcher). llama.cpp instead tries tokens longest-first over the whole
/// text; the two differ only when special-token strings overlap, which no supported vocabulary
/// has.
struct SpecialSplitter {
    /// Candidates by first byte, longest first.
    by_first: HashMap<u8, Vec<(String, u32)>>,
}

impl SpecialSplitter {
    fn new<'a>(tokens: impl Iterator<Item = (&'a str, u32)>) -> Self {
        let mut by_first: HashMap<u8, Vec<(String, u32)>> = HashMap::new();
        for (text, id) in tokens {
            if let Some(&b) = text.as_bytes().first() {
                by_first.entry(b).or_default().push((text.to_owned(), id));
            }
        }
        for list in by_first.values_mut() {
            list.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        }
        Self { by_first }
    }

    /// `(start, end, id)` of each match, in order, non-overlapping.
    fn find_iter<'s>(&'s self, text: &'s str) -> impl Iterator<Item = (usize, usize, u32)> + 's {
        let bytes = text.as_bytes();
        let mut pos = 0;
        std::iter::from_fn(move || {
            if self.by_first.is_empty() {
                return None;
            }
            while pos < bytes.len() {
                let start = pos;
                pos += 1;
                let Some(cands) = self.by_first.get(&bytes[start]) else {
                    continue;
                };
                // A match can only begin on a character boundary because every candidate is
                // valid UTF-8 and so begins with a non-continuation byte.
                if let Some((t, id)) = cands.iter().find(|(t, _)| bytes[start..].starts_with(t.as_bytes())) {
                    pos = start + t.len();
                    return Some((start, pos, *id));
                }
            }
            None
        })
    }
}

/// GPT-2's byte→char table: printable Latin-1 bytes map to themselves, the other 68 byte values
/// to U+0100.. in increasing byte order (openai/gpt-2 `encoder.py: bytes_to_unicode`, restated in
/// model-formats.md §5.4).
fn gpt2_byte_chars() -> [char; 256] {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut table = ['\0'; 256];
    let mut next = 0x100u32;
    for b in 0..256u32 {
        let c = if printable(b) {
            b
        } else {
            next += 1;
            next - 1
        };
        table[b as usize] = char::from_u32(c).expect("code points below U+0200 are valid");
    }
    table
}

/// The inverse of [`gpt2_byte_chars`].
fn gpt2_char_bytes() -> HashMap<char, u8> {
    gpt2_byte_chars().iter().enumerate().map(|(b, &c)| (c, b as u8)).collect()
}

/// Bytes of a byte-level BPE token string. Characters outside the table (never produced by a
/// well-formed vocabulary) keep their own UTF-8 bytes rather than failing the whole load.
fn byte_level_piece(text: &str, map: &HashMap<char, u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match map.get(&c) {
            Some(&b) => out.push(b),
            None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    out
}

/// The byte of a SentencePiece byte-fallback token `<0xNN>`.
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok()).flatten()
}

/// SentencePiece's visible space, U+2581.
const SPM_SPACE: char = '\u{2581}';

/// Bytes of a SentencePiece token: `▁` is a space, `<0xNN>` one raw byte.
fn spm_piece(text: &str, kind: TokenKind) -> Vec<u8> {
    match kind {
        TokenKind::Byte => parse_byte_token(text).map(|b| vec![b]).unwrap_or_default(),
        _ => text.replace(SPM_SPACE, " ").into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The engine shares one tokenizer between the HTTP side and the engine thread.
    #[test]
    fn tokenizer_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tokenizer>();
        assert_send_sync::<crate::chat::ChatTemplate>();
    }

    #[test]
    fn gpt2_byte_table_matches_known_points() {
        let t = gpt2_byte_chars();
        assert_eq!(t[b' ' as usize], '\u{120}', "space is Ġ");
        assert_eq!(t[b'\n' as usize], '\u{10a}', "newline is Ċ");
        assert_eq!(t[0], '\u{100}');
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[0xad], '\u{143}', "soft hyphen is the last remapped byte");
        let inverse = gpt2_char_bytes();
        assert_eq!(inverse.len(), 256, "the table is a bijection");
    }

    #[test]
    fn byte_tokens_parse_only_in_canonical_form() {
        assert_eq!(parse_byte_token("<0x0A>"), Some(10));
        assert_eq!(parse_byte_token("<0xff>"), Some(255));
        assert_eq!(parse_byte_token("<0x1>"), None);
        assert_eq!(parse_byte_token("<0xZZ>"), None);
        assert_eq!(parse_byte_token("0x0A"), None);
    }

    #[test]
    fn special_splitter_prefers_leftmost_then_longest() {
        let s = SpecialSplitter::new([("<a>", 1), ("<a><b>", 2), ("<b>", 3), ("é!", 4)].into_iter());
        let found: Vec<_> = s.find_iter("x<a><b>y<b><a>zé!").collect();
        assert_eq!(found, vec![(1, 7, 2), (8, 11, 3), (11, 14, 1), (15, 18, 4)]);
        assert_eq!(s.find_iter("plain text").count(), 0);
        let empty = SpecialSplitter::new(std::iter::empty());
        assert_eq!(empty.find_iter("<a>").count(), 0);
    }
}
