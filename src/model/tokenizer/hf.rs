//! A [`Tokenizer`](super::Tokenizer) from an HF `tokenizer.json` (+ `tokenizer_config.json`).
//!
//! The crate loads the file as is. What it does not give us is read from the JSON here: how token
//! strings map to bytes (byte-level vs SentencePiece, from the decoder/pre-tokenizer types), and
//! from the config the BOS/EOS strings, `add_bos_token` and the chat template.

use serde_json::Value;
use tokenizers::models::ModelWrapper;

use super::{
    byte_level_piece, gpt2_char_bytes, parse_byte_token, spm_piece, Parts, Result, TokenKind, TokenizerError,
    TokenizerFamily,
};

fn invalid(msg: impl Into<String>) -> TokenizerError {
    TokenizerError::Invalid(msg.into())
}

/// True when `v` or anything nested in it is an object with `"type": ty`.
fn has_type(v: &Value, ty: &str) -> bool {
    match v {
        Value::Object(m) => m.get("type").and_then(Value::as_str) == Some(ty) || m.values().any(|x| has_type(x, ty)),
        Value::Array(a) => a.iter().any(|x| has_type(x, ty)),
        _ => false,
    }
}

/// `"<s>"` or `{"content": "<s>", …}` (both spellings occur in tokenizer_config.json files).
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

/// `chat_template` is a string, or a list of `{name, template}` of which `default` is the one
/// `apply_chat_template` uses without a name.
fn chat_template(v: Option<&Value>) -> Result<Option<String>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(list)) => Ok(list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_owned)),
        Some(_) => Err(invalid("tokenizer_config.json: chat_template is neither a string nor a list")),
    }
}

pub(super) fn build(json: &[u8], config: Option<&[u8]>) -> Result<super::Tokenizer> {
    let doc: Value = serde_json::from_slice(json).map_err(|e| invalid(format!("tokenizer.json: {e}")))?;
    let config: Value = match config {
        Some(bytes) => serde_json::from_slice(bytes).map_err(|e| invalid(format!("tokenizer_config.json: {e}")))?,
        None => Value::Null,
    };
    let mut inner = tokenizers::Tokenizer::from_bytes(json).map_err(|e| invalid(format!("tokenizer.json: {e}")))?;
    // Some files carry truncation/padding for training; prompts must never be cut or padded.
    inner.with_truncation(None).map_err(|e| TokenizerError::Backend(e.to_string()))?;
    inner.with_padding(None);
    // Special tokens are split by `Tokenizer::encode` only when asked; the crate must leave
    // them alone. Non-special added tokens are still matched by the crate, as HF does.
    inner.set_encode_special_tokens(true);

    let vocab = inner.get_vocab(true);
    let n = vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0);
    if n == 0 {
        return Err(invalid("tokenizer.json: the vocabulary is empty"));
    }
    // Ids missing from the file (gaps) stay Unused with no text.
    let mut texts = vec![String::new(); n];
    let mut kinds = vec![TokenKind::Unused; n];
    for (t, &id) in &vocab {
        texts[id as usize] = t.clone();
        kinds[id as usize] = TokenKind::Normal;
    }
    let byte_fallback = matches!(inner.get_model(), ModelWrapper::BPE(bpe) if bpe.byte_fallback);
    if byte_fallback {
        for (t, k) in texts.iter().zip(kinds.iter_mut()) {
            if *k == TokenKind::Normal && parse_byte_token(t).is_some() {
                *k = TokenKind::Byte;
            }
        }
    }
    for (id, tok) in inner.get_added_tokens_decoder() {
        let i = id as usize;
        if i < n {
            texts[i] = tok.content.clone();
            kinds[i] = if tok.special { TokenKind::Control } else { TokenKind::UserDefined };
        }
    }

    let family = if has_type(&doc["decoder"], "ByteLevel") || has_type(&doc["pre_tokenizer"], "ByteLevel") {
        TokenizerFamily::ByteLevelBpe
    } else if byte_fallback || has_type(&doc["decoder"], "Metaspace") || has_type(&doc["pre_tokenizer"], "Metaspace") {
        TokenizerFamily::SentencePieceBpe
    } else {
        TokenizerFamily::Other
    };
    let byte_map = gpt2_char_bytes();
    let pieces = (0..n)
        .map(|i| match kinds[i] {
            TokenKind::Unused => Vec::new(),
            TokenKind::Control | TokenKind::Unknown | TokenKind::UserDefined => texts[i].as_bytes().to_vec(),
            k => match family {
                TokenizerFamily::ByteLevelBpe => byte_level_piece(&texts[i], &byte_map),
                TokenizerFamily::SentencePieceBpe => spm_piece(&texts[i], k),
                // Unknown decoder: trust the file's own decoder for a lone token.
                TokenizerFamily::Other => inner.decode(&[i as u32], false).unwrap_or_default().into_bytes(),
            },
        })
        .collect();

    let bos_text = token_string(config.get("bos_token"));
    let eos_text = token_string(config.get("eos_token"));
    let id_of = |t: &Option<String>| t.as_deref().and_then(|t| inner.token_to_id(t));
    let bos = id_of(&bos_text);
    let eos = id_of(&eos_text);
    // HF adds BOS through the post-processor; tokenizer_config's flag, when present, wins.
    let add_bos = match config.get("add_bos_token").and_then(Value::as_bool) {
        Some(b) => b,
        None => post_processor_adds(&doc["post_processor"], bos_text.as_deref()),
    };

    Parts {
        inner,
        family,
        texts,
        kinds,
        pieces,
        bos,
        eos,
        extra_eog: Vec::new(),
        add_bos,
        bos_text,
        eos_text,
        chat_template: chat_template(config.get("chat_template"))?,
    }
    .finish()
}

/// Whether a `TemplateProcessing` post-processor starts single sequences with the BOS token.
fn post_processor_adds(pp: &Value, bos: Option<&str>) -> bool {
    let Some(bos) = bos else { return false };
    let first = |p: &Value| -> bool {
        p.get("single")
            .and_then(Value::as_array)
            .and_then(|s| s.first())
            .and_then(|f| f.get("SpecialToken"))
            .and_then(|s| s.get("id"))
            .and_then(Value::as_str)
            == Some(bos)
    };
    match pp.get("type").and_then(Value::as_str) {
        Some("TemplateProcessing") => first(pp),
        Some("Sequence") => pp.get("processors").and_then(Value::as_array).is_some_and(|ps| ps.iter().any(first)),
        _ => false,
    }
}
