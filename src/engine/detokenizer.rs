//! Incremental detokenization: generated token ids in, text that is safe to send out.
//!
//! Two things make streaming text harder than `decode(all_ids)`:
//! - A token can end in the middle of a UTF-8 character (byte-level BPE splits emoji and CJK
//!   into byte tokens; SentencePiece falls back to `<0xNN>`). Bytes of an incomplete character
//!   are held until the character is complete. A sequence that can never become valid is replaced
//!   by U+FFFD as soon as that is certain; an incomplete tail becomes U+FFFD only at `finish`.
//!   The concatenation of everything emitted is exactly `String::from_utf8_lossy(all bytes)`.
//! - Stop strings may span tokens. Text that could be the beginning of a stop string is held
//!   back; once a stop string appears, the output is cut before it and the stop is reported.
//!   Text after the stop, and every later token, is discarded.
//!
//! Special tokens (control/unknown: `<|im_end|>`, …) are not text: by default they produce
//! nothing (the engine stops on end-of-generation ids itself), as HF's `skip_special_tokens`.

use std::sync::Arc;

use crate::model::tokenizer::Tokenizer;

/// Where the detokenizer gets token bytes from: a [`Tokenizer`], or a table in tests.
pub trait TokenSource {
    /// The bytes token `id` stands for; `None` outside the vocabulary.
    fn token_bytes(&self, id: u32) -> Option<&[u8]>;
    /// Control/unknown tokens, which are not emitted unless asked for.
    fn is_special(&self, id: u32) -> bool;
}

impl TokenSource for Tokenizer {
    fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        Tokenizer::token_bytes(self, id)
    }
    fn is_special(&self, id: u32) -> bool {
        Tokenizer::is_special(self, id)
    }
}

impl<T: TokenSource + ?Sized> TokenSource for &T {
    fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        (**self).token_bytes(id)
    }
    fn is_special(&self, id: u32) -> bool {
        (**self).is_special(id)
    }
}

impl<T: TokenSource + ?Sized> TokenSource for Arc<T> {
    fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        (**self).token_bytes(id)
    }
    fn is_special(&self, id: u32) -> bool {
        (**self).is_special(id)
    }
}

/// What one pushed token produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// Text that is final and can be sent (possibly empty).
    pub text: String,
    /// The stop string that just matched; the sequence is finished.
    pub stopped: Option<String>,
}

/// Per-sequence streaming state. Owned by the sequence; no shared state.
#[derive(Debug)]
pub struct Detokenizer<S> {
    source: S,
    /// Non-empty stop strings.
    stops: Vec<String>,
    emit_special: bool,
    /// Bytes of a UTF-8 character that is not complete yet (at most 3).
    pending: Vec<u8>,
    /// Decoded text withheld because its end could begin a stop string.
    held: String,
    stopped: Option<String>,
}

impl<S: TokenSource> Detokenizer<S> {
    /// `stops`: strings that end generation when they appear in the text. Empty strings are
    /// ignored (they would match before any output).
    pub fn new(source: S, stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        Self { source, stops, emit_special: false, pending: Vec::new(), held: String::new(), stopped: None }
    }

    /// Emit the text of special tokens too (for raw completions that want `<|im_end|>` shown).
    pub fn with_special_tokens(mut self, emit: bool) -> Self {
        self.emit_special = emit;
        self
    }

    /// The stop string that ended the text, if one did.
    pub fn stopped(&self) -> Option<&str> {
        self.stopped.as_deref()
    }

    /// Adds one generated token. After a stop, further tokens produce nothing.
    pub fn push(&mut self, id: u32) -> Step {
        if self.stopped.is_some() {
            return Step::default();
        }
        let bytes = match self.source.token_bytes(id) {
            Some(b) if self.emit_special || !self.source.is_special(id) => b,
            // Specials not shown and ids outside the vocabulary carry no text.
            _ => return Step::default(),
        };
        self.pending.extend_from_slice(bytes);
        let text = take_valid_utf8(&mut self.pending);
        self.scan(text, false)
    }

    /// Ends the sequence: flushes an incomplete character as U+FFFD and releases held-back text
    /// (still cut at a stop string if the flush completes one).
    pub fn finish(&mut self) -> String {
        if self.stopped.is_some() {
            return String::new();
        }
        let tail = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        self.scan(tail, true).text
    }

    /// Appends decoded text after the held text, finds a stop string, and decides how much can be
    /// released. Invariant: `held` never contains a whole stop string.
    fn scan(&mut self, new_text: String, at_end: bool) -> Step {
        if new_text.is_empty() && !at_end {
            return Step::default();
        }
        let mut text = std::mem::take(&mut self.held);
        text.push_str(&new_text);
        // The earliest stop wins; at equal starts the longer one (it contains the shorter).
        let found = self
            .stops
            .iter()
            .filter_map(|s| text.find(s.as_str()).map(|at| (at, s)))
            .min_by(|a, b| a.0.cmp(&b.0).then(b.1.len().cmp(&a.1.len())));
        if let Some((at, stop)) = found {
            let stop = stop.clone();
            text.truncate(at);
            self.pending.clear();
            self.stopped = Some(stop.clone());
            return Step { text, stopped: Some(stop) };
        }
        if !at_end {
            let keep = self.stops.iter().map(|s| partial_stop_suffix(&text, s)).max().unwrap_or(0);
            self.held = text.split_off(text.len() - keep);
        }
        Step { text, stopped: None }
    }
}

/// Removes and returns the longest decodable prefix of `buf`, replacing sequences that can never
/// be valid by U+FFFD (one per maximal invalid subpart, as `String::from_utf8_lossy`). Leaves in
/// `buf` only the bytes of a character that may still be completed.
fn take_valid_utf8(buf: &mut Vec<u8>) -> String {
    let mut out = String::new();
    let mut rest: &[u8] = buf;
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.push_str(s);
                rest = &[];
                break;
            }
            Err(e) => {
                let (valid, after) = rest.split_at(e.valid_up_to());
                // The first `valid_up_to` bytes are valid UTF-8 by definition.
                out.push_str(std::str::from_utf8(valid).expect("valid prefix"));
                match e.error_len() {
                    Some(n) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        rest = &after[n..];
                    }
                    // Unexpected end: the character may still be completed by the next token.
                    None => {
                        rest = after;
                        break;
                    }
                }
            }
        }
    }
    let keep = rest.len();
    let start = buf.len() - keep;
    buf.drain(..start);
    out
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop` (so it might still
/// grow into the stop string). Only character boundaries are tried: `stop` is valid UTF-8, so a
/// prefix of it never starts inside a character.
fn partial_stop_suffix(text: &str, stop: &str) -> usize {
    let max = text.len().min(stop.len() - 1);
    (1..=max)
        .rev()
        .find(|&k| {
            text.is_char_boundary(text.len() - k) && stop.as_bytes().starts_with(&text.as_bytes()[text.len() - k..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vocabulary given as byte strings; ids listed in `special` are control tokens.
    struct Table {
        pieces: Vec<Vec<u8>>,
        special: Vec<u32>,
    }

    impl TokenSource for Table {
        fn token_bytes(&self, id: u32) -> Option<&[u8]> {
            self.pieces.get(id as usize).map(Vec::as_slice)
        }
        fn is_special(&self, id: u32) -> bool {
            self.special.contains(&id)
        }
    }

    /// Token i is `pieces[i]`; the table also holds every single byte at id 1000 + b.
    fn table(pieces: &[&[u8]], special: &[u32]) -> Table {
        let mut all: Vec<Vec<u8>> = pieces.iter().map(|p| p.to_vec()).collect();
        all.resize(1000, Vec::new());
        all.extend((0..=255u8).map(|b| vec![b]));
        Table { pieces: all, special: special.to_vec() }
    }

    fn byte(b: u8) -> u32 {
        1000 + b as u32
    }

    /// Pushes all ids, then finishes; returns the per-step texts and the final text.
    fn run<S: TokenSource>(d: &mut Detokenizer<S>, ids: &[u32]) -> (Vec<String>, String) {
        let steps = ids.iter().map(|&id| d.push(id).text).collect();
        (steps, d.finish())
    }

    #[test]
    fn emoji_from_byte_tokens_is_emitted_once_complete() {
        let t = table(&[b"Hi "], &[]);
        let mut d = Detokenizer::new(&t, vec![]);
        let smile = "😀".as_bytes(); // F0 9F 98 80
        let ids = [0, byte(smile[0]), byte(smile[1]), byte(smile[2]), byte(smile[3]), byte(b'!')];
        let (steps, rest) = run(&mut d, &ids);
        assert_eq!(steps, ["Hi ", "", "", "", "😀", "!"]);
        assert_eq!(rest, "");
    }

    #[test]
    fn multibyte_character_split_across_multi_byte_tokens() {
        // "é" = C3 A9, "日" = E6 97 A5: tokens end and begin mid-character.
        let t = table(&[b"caf\xc3", b"\xa9 \xe6\x97", b"\xa5!"], &[]);
        let mut d = Detokenizer::new(&t, vec![]);
        let (steps, rest) = run(&mut d, &[0, 1, 2]);
        assert_eq!(steps, ["caf", "é ", "日!"]);
        assert_eq!(rest, "");
    }

    #[test]
    fn incomplete_tail_becomes_replacement_only_at_finish() {
        let t = table(&[b"ok"], &[]);
        let mut d = Detokenizer::new(&t, vec![]);
        let (steps, rest) = run(&mut d, &[0, byte(0xF0), byte(0x9F)]);
        assert_eq!(steps, ["ok", "", ""]);
        assert_eq!(rest, "\u{FFFD}");
    }

    #[test]
    fn invalid_bytes_are_replaced_as_soon_as_certain() {
        let t = table(&[], &[]);
        let mut d = Detokenizer::new(&t, vec![]);
        // A lone continuation byte, then a lead byte interrupted by ASCII.
        let (steps, rest) = run(&mut d, &[byte(0x80), byte(b'a'), byte(0xE6), byte(b'b')]);
        assert_eq!(steps, ["\u{FFFD}", "a", "", "\u{FFFD}b"]);
        assert_eq!(rest, "");
    }

    #[test]
    fn streamed_text_equals_lossy_decode_for_every_split() {
        // Every way of cutting a byte string into two-token chunks gives the same total.
        let text =
            "a😀é\u{FFFD}日\u{80}".as_bytes().iter().copied().chain([0xF0, 0x9F, 0xff, 0xC3]).collect::<Vec<u8>>();
        let expected = String::from_utf8_lossy(&text).into_owned();
        for cut in 0..=text.len() {
            let t = Table { pieces: vec![text[..cut].to_vec(), text[cut..].to_vec()], special: vec![] };
            let mut d = Detokenizer::new(&t, vec![]);
            let (steps, rest) = run(&mut d, &[0, 1]);
            assert_eq!(steps.concat() + &rest, expected, "cut at {cut}");
        }
    }

    #[test]
    fn stop_string_spanning_tokens_cuts_output() {
        let t = table(&[b"Hello", b" wor", b"ld", b"! ##", b"#END", b" after"], &[]);
        let mut d = Detokenizer::new(&t, vec!["###END".into()]);
        assert_eq!(d.push(0).text, "Hello");
        assert_eq!(d.push(1).text, " wor");
        assert_eq!(d.push(2).text, "ld");
        // "! ##" ends with a prefix of the stop: "##" is held back.
        assert_eq!(d.push(3), Step { text: "! ".into(), stopped: None });
        assert_eq!(d.push(4), Step { text: String::new(), stopped: Some("###END".into()) });
        assert_eq!(d.push(5), Step::default(), "nothing after a stop");
        assert_eq!(d.finish(), "");
        assert_eq!(d.stopped(), Some("###END"));
    }

    #[test]
    fn held_prefix_is_released_when_it_does_not_become_a_stop() {
        let t = table(&[b"a <", b"/", b"bx", b" <"], &[]);
        let mut d = Detokenizer::new(&t, vec!["</a>".into()]);
        assert_eq!(d.push(0).text, "a ");
        assert_eq!(d.push(1).text, "", "\"</\" could still become \"</a>\"");
        assert_eq!(d.push(2).text, "</bx");
        assert_eq!(d.push(3).text, " ");
        assert_eq!(d.finish(), "<", "held text is released at the end");
        assert_eq!(d.stopped(), None);
    }

    #[test]
    fn stop_string_at_the_very_start() {
        let t = table(&[b"STOP", b"more"], &[]);
        let mut d = Detokenizer::new(&t, vec!["STOP".into()]);
        assert_eq!(d.push(0), Step { text: String::new(), stopped: Some("STOP".into()) });
        assert_eq!(d.push(1), Step::default());
    }

    #[test]
    fn stop_inside_one_token_keeps_text_before_it() {
        let t = table(&[b"answer: 42\nUser: hi"], &[]);
        let mut d = Detokenizer::new(&t, vec!["\nUser:".into(), "zzz".into()]);
        assert_eq!(d.push(0), Step { text: "answer: 42".into(), stopped: Some("\nUser:".into()) });
    }

    #[test]
    fn earliest_stop_wins_and_multibyte_stops_work() {
        let t = table(&[b"x \xe2\x80", b"\x94 y STOP"], &[]);
        let mut d = Detokenizer::new(&t, vec!["STOP".into(), "— y".into(), "".into()]);
        assert_eq!(d.push(0).text, "x ");
        // "— y" (completed by this token) starts before "STOP".
        assert_eq!(d.push(1), Step { text: String::new(), stopped: Some("— y".into()) });
    }

    #[test]
    fn special_tokens_are_silent_unless_asked() {
        let t = table(&[b"Hi", b"<|im_end|>"], &[1]);
        let mut d = Detokenizer::new(&t, vec![]);
        assert_eq!(run(&mut d, &[0, 1]), (vec!["Hi".to_string(), String::new()], String::new()));
        let mut d = Detokenizer::new(&t, vec![]).with_special_tokens(true);
        assert_eq!(run(&mut d, &[0, 1]).0, ["Hi", "<|im_end|>"]);
        // A stop string written as a special token's text matches only when specials are shown.
        let mut d = Detokenizer::new(&t, vec!["<|im_end|>".into()]).with_special_tokens(true);
        assert_eq!(d.push(1).stopped.as_deref(), Some("<|im_end|>"));
    }

    #[test]
    fn ids_outside_the_vocabulary_produce_nothing() {
        let t = table(&[b"a"], &[]);
        let mut d = Detokenizer::new(&t, vec![]);
        assert_eq!(d.push(u32::MAX), Step::default());
        assert_eq!(d.push(0).text, "a");
    }

    #[test]
    fn finish_can_complete_a_stop_from_held_text() {
        // The flushed U+FFFD completes the stop string "<\u{FFFD}".
        let t = table(&[b"a<", b"\xe6"], &[]);
        let mut d = Detokenizer::new(&t, vec!["<\u{FFFD}".into()]);
        assert_eq!(d.push(0).text, "a");
        assert_eq!(d.push(1).text, "");
        assert_eq!(d.finish(), "");
        assert_eq!(d.stopped(), Some("<\u{FFFD}"));
    }
}
