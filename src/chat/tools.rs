//! Tool calls in model output: one extractor for both API dialects, safe while streaming.
//!
//! Models announce calls in many envelopes, and servers that expect only one lose the others
//! (ollama #12174, vllm #32926: Qwen2.5-Coder emits bare JSON or fenced ```json blocks instead
//! of `<tool_call>` tags). Recognized here, anywhere in the output:
//! - `<tool_call>{…}</tool_call>` (Hermes / Qwen2.5), one or many, closing tag optional at the end;
//! - `<tools>…</tools>` and `<function>…</function>` wrappers around a call object or array;
//! - `<function=NAME>{arguments}</function>`;
//! - ```` ```json ```` (or bare ```` ``` ````) fenced blocks holding calls;
//! - `<|python_tag|>` followed by calls (Llama 3.x), several separated by `;`;
//! - bare JSON: an object, or an array of objects, that is a call.
//!
//! A call object has a string `name` and `arguments` or `parameters` (an object, or a string
//! holding a JSON object); OpenAI's `{"type": "function", "function": {…}}` nesting is accepted.
//! Anything else — prose, JSON that is not a call, invalid or truncated JSON, an envelope that
//! holds no valid call — stays content, byte for byte: nothing is ever dropped.
//!
//! Streaming: [`ToolStream`] releases text as soon as it cannot be the start of a call and holds
//! the rest (an open brace, a partial tag) until it is decided; its content pieces concatenate to
//! [`extract`]'s content and its calls equal [`extract`]'s calls, whatever the chunking.

use serde_json::{json, Value};

/// One extracted call: arguments are always a JSON object.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: serde_json::Map<String, Value>,
}

impl ToolCall {
    /// The arguments as a JSON string (OpenAI's wire form; keys in the model's order).
    pub fn arguments_json(&self) -> String {
        serde_json::to_string(&self.arguments).expect("a JSON map serializes")
    }
}

/// A piece of output in order: text for the content, or a whole call.
#[derive(Clone, Debug, PartialEq)]
pub enum Segment {
    Text(String),
    Call(ToolCall),
}

/// The whole output split into content (the text outside calls) and calls.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Extracted {
    pub content: String,
    pub calls: Vec<ToolCall>,
}

impl Extracted {
    fn from_segments(segments: Vec<Segment>) -> Self {
        let mut out = Extracted::default();
        for s in segments {
            match s {
                Segment::Text(t) => out.content.push_str(&t),
                Segment::Call(c) => out.calls.push(c),
            }
        }
        out
    }
}

/// How the model must use the offered tools (OpenAI `tool_choice`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model decides; calls are extracted from whatever it writes.
    Auto,
    /// At least one call, of any offered tool, enforced by constrained decoding.
    Required,
    /// Exactly one call of this tool, enforced by constrained decoding.
    Named(String),
}

/// Validated tool definitions (OpenAI shape: `{"type": "function", "function": {"name",
/// "description", "parameters"}}`) and the choice. `tool_choice: "none"` is no tool set at all.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolSet {
    pub tools: Vec<Value>,
    pub choice: ToolChoice,
}

impl ToolSet {
    /// The JSON Schema a forced choice constrains the output to: a JSON array of call objects
    /// (`{"name", "arguments"}`, arguments under the tool's own `parameters` schema), which
    /// [`extract`] reads back as calls. `None` for [`ToolChoice::Auto`].
    ///
    /// Each tool's `$defs`/`definitions` move to the root under a per-tool prefix (references
    /// resolve from the root of the whole document), and arguments are always an object.
    pub fn forced_schema(&self) -> Option<Value> {
        let mut defs = serde_json::Map::new();
        let mut call = |i: usize, f: &Value| {
            let mut params = f.get("parameters").filter(|p| p.is_object()).cloned().unwrap_or(json!({}));
            let prefix = format!("tool{i}_");
            for key in ["$defs", "definitions"] {
                if let Some(Value::Object(d)) = params.as_object_mut().and_then(|p| p.remove(key)) {
                    for (name, mut schema) in d {
                        rewrite_refs(&mut schema, &prefix);
                        defs.insert(format!("{prefix}{name}"), schema);
                    }
                }
            }
            rewrite_refs(&mut params, &prefix);
            if let Some(p) = params.as_object_mut() {
                p.entry("type").or_insert_with(|| "object".into());
            }
            json!({
                "type": "object",
                "properties": { "name": { "const": f["name"] }, "arguments": params },
                "required": ["name", "arguments"],
                "additionalProperties": false
            })
        };
        let functions: Vec<&Value> = self.tools.iter().filter_map(|t| t.get("function")).collect();
        let mut schema = match &self.choice {
            ToolChoice::Auto => return None,
            ToolChoice::Required => {
                let calls: Vec<Value> = functions.iter().enumerate().map(|(i, f)| call(i, f)).collect();
                json!({ "type": "array", "minItems": 1, "items": { "anyOf": calls } })
            }
            ToolChoice::Named(name) => {
                let i = functions.iter().position(|f| f["name"] == name.as_str())?;
                json!({ "type": "array", "minItems": 1, "maxItems": 1, "items": call(i, functions[i]) })
            }
        };
        if !defs.is_empty() {
            schema["$defs"] = Value::Object(defs);
        }
        Some(schema)
    }

    /// The tools as a system-prompt section, for chat templates that do not render `tools`
    /// themselves: the functions one JSON object per line and the call format [`extract`]
    /// reads.
    pub fn prompt_section(&self) -> String {
        let mut s = String::from(
            "# Tools\n\nYou may call one or more of the functions below. To call functions, reply with only a JSON \
             array of calls, each {\"name\": <function name>, \"arguments\": <arguments object>}.\n\nFunctions:",
        );
        for f in self.tools.iter().filter_map(|t| t.get("function")) {
            s.push('\n');
            s.push_str(&f.to_string());
        }
        s
    }
}

/// Points a tool's local references (`#/$defs/X`, `#/definitions/X`) at its hoisted copies
/// (`#/$defs/<prefix>X`).
fn rewrite_refs(v: &mut Value, prefix: &str) {
    match v {
        Value::Object(o) => {
            for (k, x) in o.iter_mut() {
                if k == "$ref" {
                    if let Value::String(r) = x {
                        for local in ["#/$defs/", "#/definitions/"] {
                            if let Some(rest) = r.strip_prefix(local) {
                                *r = format!("#/$defs/{prefix}{rest}");
                                break;
                            }
                        }
                    }
                } else {
                    rewrite_refs(x, prefix);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| rewrite_refs(x, prefix)),
        _ => {}
    }
}

/// Extracts the calls of a complete output.
pub fn extract(text: &str) -> Extracted {
    let mut s = ToolStream::default();
    let mut segs = s.push(text);
    segs.extend(s.finish());
    Extracted::from_segments(segs)
}

/// Incremental extraction over streamed text.
#[derive(Debug, Default)]
pub struct ToolStream {
    /// Text received but not yet released.
    buf: String,
}

impl ToolStream {
    /// Adds `text`; returns what is decided: content safe to emit and complete calls, in order.
    pub fn push(&mut self, text: &str) -> Vec<Segment> {
        self.buf.push_str(text);
        self.drain(false)
    }

    /// The output ended: everything held is decided now (an unfinished envelope is content).
    pub fn finish(mut self) -> Vec<Segment> {
        self.drain(true)
    }

    fn drain(&mut self, end: bool) -> Vec<Segment> {
        let mut out: Vec<Segment> = Vec::new();
        let mut text_start = 0;
        let mut pos = 0;
        let buf = std::mem::take(&mut self.buf);
        let emit_text = |out: &mut Vec<Segment>, t: &str| {
            if t.is_empty() {
                return;
            }
            match out.last_mut() {
                Some(Segment::Text(prev)) => prev.push_str(t),
                _ => out.push(Segment::Text(t.to_owned())),
            }
        };
        while let Some(off) = buf[pos..].find(is_candidate_start) {
            let at = pos + off;
            match try_envelope(&buf[at..], end) {
                Attempt::Calls(calls, len) => {
                    emit_text(&mut out, &buf[text_start..at]);
                    out.extend(calls.into_iter().map(Segment::Call));
                    pos = at + len;
                    text_start = pos;
                }
                Attempt::NeedMore => {
                    // Undecided: release what precedes it, keep the rest for the next push.
                    emit_text(&mut out, &buf[text_start..at]);
                    self.buf = buf[at..].to_owned();
                    return out;
                }
                Attempt::Text(len) => pos = at + len,
                Attempt::NotACall => pos = at + buf[at..].chars().next().map_or(1, char::len_utf8),
            }
        }
        emit_text(&mut out, &buf[text_start..]);
        out
    }
}

/// Characters that can open an envelope.
fn is_candidate_start(c: char) -> bool {
    matches!(c, '<' | '`' | '{' | '[')
}

enum Attempt {
    /// Calls, and the bytes of input they took.
    Calls(Vec<ToolCall>, usize),
    /// A complete envelope or JSON value that holds no call: this many bytes are content
    /// (nothing nested inside is taken for a call).
    Text(usize),
    /// Could still become a call: wait for more text.
    NeedMore,
    NotACall,
}

/// Tag pairs that wrap call JSON (the closing tag may be missing at the end of the output).
const WRAPPERS: [(&str, &str); 4] = [
    ("<tool_call>", "</tool_call>"),
    ("<tools>", "</tools>"),
    ("<function>", "</function>"),
    ("<function-call>", "</function-call>"),
];
const PYTHON_TAG: &str = "<|python_tag|>";
const FUNCTION_EQ: &str = "<function=";
const FENCE: &str = "```";

/// Tries to read an envelope at the start of `s`. `end`: no more text will come.
fn try_envelope(s: &str, end: bool) -> Attempt {
    let first = s.as_bytes()[0];
    if first == b'<' {
        for (open, close) in WRAPPERS {
            if let Some(r) = tagged(s, open, close, end) {
                return r;
            }
        }
        if let Some(r) = function_eq(s, end) {
            return r;
        }
        if let Some(r) = python_tag(s, end) {
            return r;
        }
        return Attempt::NotACall;
    }
    if first == b'`' {
        return fenced(s, end);
    }
    // A bare `{` or `[`.
    match json_prefix(s, end) {
        Json::Value(v, len) => match calls_of(&v) {
            Some(calls) => Attempt::Calls(calls, len),
            None => Attempt::Text(len),
        },
        Json::Incomplete => Attempt::NeedMore,
        Json::Invalid => Attempt::NotACall,
    }
}

/// `None` when `s` does not start with `open` (nor is a prefix of it); else the attempt.
///
/// The body is read as JSON (so a closing tag inside a string is just text), then the closing
/// tag is expected. Missing at the end of the output, it is forgiven (models stop at end-of-turn
/// right after the JSON); other text before it ends the envelope there and stays content.
fn tagged(s: &str, open: &str, close: &str, end: bool) -> Option<Attempt> {
    if let Some(r) = partial_prefix(s, open, end) {
        return Some(r);
    }
    let inner = s.strip_prefix(open)?;
    Some(match leading_calls(inner, end, None) {
        Lead::NeedMore => Attempt::NeedMore,
        Lead::Calls(calls, used) => {
            let rest = &inner[used..];
            let ws = rest.len() - rest.trim_start().len();
            let after = &rest[ws..];
            if after.starts_with(close) {
                Attempt::Calls(calls, open.len() + used + ws + close.len())
            } else if after.is_empty() && end {
                Attempt::Calls(calls, s.len())
            } else if !end && close.starts_with(after) {
                Attempt::NeedMore
            } else {
                Attempt::Calls(calls, open.len() + used)
            }
        }
        Lead::None => match inner.find(close) {
            Some(i) => Attempt::Text(open.len() + i + close.len()),
            None if !end => Attempt::NeedMore,
            None => Attempt::NotACall,
        },
    })
}

enum Lead {
    /// Calls read from the start (after whitespace), and the bytes they took.
    Calls(Vec<ToolCall>, usize),
    NeedMore,
    None,
}

/// The call values at the start of `s`, one after another: whitespace between them, or, with
/// `sep`, that character (a separator after the last call is taken with it).
fn leading_calls(s: &str, end: bool, sep: Option<char>) -> Lead {
    let mut calls = Vec::new();
    let mut used = 0;
    loop {
        let mut rest = &s[used..];
        let mut ws = rest.len() - rest.trim_start().len();
        if let (Some(c), false) = (sep, calls.is_empty()) {
            let t = &rest[ws..];
            if t.is_empty() {
                if !end {
                    // A separator and another call may still come.
                    return Lead::NeedMore;
                }
                break;
            }
            let Some(after) = t.strip_prefix(c) else { break };
            used += ws + c.len_utf8();
            rest = after;
            ws = rest.len() - rest.trim_start().len();
        }
        if ws == rest.len() {
            if !end {
                return Lead::NeedMore;
            }
            break;
        }
        match json_prefix(&rest[ws..], end) {
            Json::Value(v, len) => match calls_of(&v) {
                Some(c) => {
                    calls.extend(c);
                    used += ws + len;
                }
                None => break,
            },
            Json::Incomplete => return Lead::NeedMore,
            Json::Invalid => break,
        }
    }
    if calls.is_empty() {
        Lead::None
    } else {
        Lead::Calls(calls, used)
    }
}

/// `s` is a proper prefix of `tag`: more text may complete it.
fn partial_prefix(s: &str, tag: &str, end: bool) -> Option<Attempt> {
    (s.len() < tag.len() && tag.starts_with(s)).then_some(if end { Attempt::NotACall } else { Attempt::NeedMore })
}

/// `<function=NAME>{arguments}</function>`.
fn function_eq(s: &str, end: bool) -> Option<Attempt> {
    if let Some(r) = partial_prefix(s, FUNCTION_EQ, end) {
        return Some(r);
    }
    let rest = s.strip_prefix(FUNCTION_EQ)?;
    // Names are short: a `>` more than 256 bytes away means this is not a call, decided the same
    // way whether the text has arrived yet or not.
    let Some(gt) = rest.find('>') else {
        return Some(if end || rest.len() > 256 { Attempt::NotACall } else { Attempt::NeedMore });
    };
    let name = rest[..gt].trim();
    if gt > 256 || name.is_empty() || name.contains(char::is_whitespace) {
        return Some(Attempt::NotACall);
    }
    let body = &rest[gt + 1..];
    let close = "</function>";
    let (args_text, used) = match body.find(close) {
        Some(i) => (&body[..i], FUNCTION_EQ.len() + gt + 1 + i + close.len()),
        None if !end => return Some(Attempt::NeedMore),
        None => (body, s.len()),
    };
    let args_text = args_text.trim();
    let arguments = if args_text.is_empty() {
        serde_json::Map::new()
    } else {
        match serde_json::from_str::<Value>(args_text) {
            Ok(Value::Object(m)) => m,
            _ => return Some(Attempt::NotACall),
        }
    };
    Some(Attempt::Calls(vec![ToolCall { name: name.to_owned(), arguments }], used))
}

/// `<|python_tag|>` then one or more calls separated by `;` (Llama 3.x), up to the end of the
/// output or to text that is not a call.
fn python_tag(s: &str, end: bool) -> Option<Attempt> {
    if let Some(r) = partial_prefix(s, PYTHON_TAG, end) {
        return Some(r);
    }
    let body = s.strip_prefix(PYTHON_TAG)?;
    Some(match leading_calls(body, end, Some(';')) {
        Lead::NeedMore => Attempt::NeedMore,
        Lead::Calls(calls, used) => Attempt::Calls(calls, PYTHON_TAG.len() + used),
        Lead::None => Attempt::NotACall,
    })
}

/// A fenced block whose body is calls.
fn fenced(s: &str, end: bool) -> Attempt {
    if let Some(r) = partial_prefix(s, FENCE, end) {
        return r;
    }
    let Some(rest) = s.strip_prefix(FENCE) else { return Attempt::NotACall };
    // The info string runs to the end of the line: `json`, `tool_call`, or nothing.
    let Some(nl) = rest.find('\n') else {
        return if end || rest.len() > 32 { Attempt::NotACall } else { Attempt::NeedMore };
    };
    let info = rest[..nl].trim();
    let body = &rest[nl + 1..];
    if !(info.is_empty() || info.eq_ignore_ascii_case("json") || info.eq_ignore_ascii_case("tool_call")) {
        // Another language: the whole block is content (a dict in Python code is not a call).
        return match body.find(FENCE) {
            Some(i) => Attempt::Text(FENCE.len() + nl + 1 + i + FENCE.len()),
            None if end => Attempt::Text(s.len()),
            None => Attempt::NeedMore,
        };
    }
    match body.find(FENCE) {
        Some(i) => match all_calls(body[..i].trim()) {
            Some(calls) => Attempt::Calls(calls, FENCE.len() + nl + 1 + i + FENCE.len()),
            None => Attempt::Text(FENCE.len() + nl + 1 + i + FENCE.len()),
        },
        None if !end => {
            // Decide early when the body already cannot be calls.
            let b = body.trim_start();
            if b.is_empty() || b.starts_with(['{', '[']) {
                Attempt::NeedMore
            } else {
                Attempt::NotACall
            }
        }
        None => Attempt::NotACall,
    }
}

enum Json {
    /// A complete value and the bytes it took.
    Value(Value, usize),
    /// Valid so far, cut off by the end of the text.
    Incomplete,
    Invalid,
}

/// The JSON value at the start of `s`.
fn json_prefix(s: &str, end: bool) -> Json {
    let mut it = serde_json::Deserializer::from_str(s).into_iter::<Value>();
    match it.next() {
        Some(Ok(v)) => Json::Value(v, it.byte_offset()),
        Some(Err(e)) if e.is_eof() && !end => Json::Incomplete,
        _ => Json::Invalid,
    }
}

/// The calls in an envelope's body: one call, an array of calls, or calls one per line.
fn all_calls(body: &str) -> Option<Vec<ToolCall>> {
    if let Ok(v) = serde_json::from_str::<Value>(body) {
        return calls_of(&v);
    }
    // Several objects in one envelope, one after another.
    let mut calls = Vec::new();
    let mut it = serde_json::Deserializer::from_str(body).into_iter::<Value>();
    for v in &mut it {
        calls.extend(calls_of(&v.ok()?)?);
    }
    (!calls.is_empty()).then_some(calls)
}

/// `v` as calls: a call object or a non-empty array of them.
fn calls_of(v: &Value) -> Option<Vec<ToolCall>> {
    match v {
        Value::Array(items) if !items.is_empty() => items.iter().map(call_of).collect(),
        Value::Object(_) => Some(vec![call_of(v)?]),
        _ => None,
    }
}

fn call_of(v: &Value) -> Option<ToolCall> {
    let o = v.as_object()?;
    // OpenAI's nesting: {"type": "function", "function": {"name", "arguments"}}.
    if let Some(f) = o.get("function").filter(|f| f.is_object()) {
        return call_of(f);
    }
    let name = o.get("name")?.as_str()?.trim();
    if name.is_empty() {
        return None;
    }
    let args = o.get("arguments").or_else(|| o.get("parameters"))?;
    let arguments = match args {
        Value::Object(m) => m.clone(),
        // Arguments as a JSON string (OpenAI's wire form, which models imitate).
        Value::String(s) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Object(m)) => m,
            _ => return None,
        },
        _ => return None,
    };
    Some(ToolCall { name: name.to_owned(), arguments })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Case {
        name: String,
        output: String,
        calls: Vec<Value>,
        content: String,
    }

    fn corpus() -> Vec<Case> {
        serde_json::from_str(include_str!("../../tests/fixtures/tool_calls/corpus.json")).expect("corpus.json")
    }

    fn expected_calls(case: &Case) -> Vec<ToolCall> {
        case.calls
            .iter()
            .map(|c| ToolCall {
                name: c["name"].as_str().unwrap().to_owned(),
                arguments: c["arguments"].as_object().unwrap().clone(),
            })
            .collect()
    }

    /// Every corpus output maps to its expected calls and content.
    #[test]
    fn the_corpus_extracts_as_expected() {
        let cases = corpus();
        assert!(cases.len() >= 40, "the corpus has {} cases", cases.len());
        for case in &cases {
            let got = extract(&case.output);
            assert_eq!(got.calls, expected_calls(case), "{}: calls", case.name);
            assert_eq!(got.content, case.content, "{}: content", case.name);
        }
    }

    /// Streamed in pieces of every size (and split at every byte boundary for the short ones),
    /// the content pieces concatenate to the non-streamed content and the calls are the same.
    #[test]
    fn streaming_any_chunking_equals_the_whole() {
        for case in corpus() {
            let whole = extract(&case.output);
            let chars: Vec<(usize, char)> = case.output.char_indices().collect();
            let mut splits: Vec<Vec<usize>> =
                (1..=7).map(|n| (0..chars.len()).step_by(n).map(|i| chars[i].0).collect()).collect();
            // Two pieces, cut at every character boundary.
            splits.extend(chars.iter().map(|&(at, _)| vec![0, at]));
            for cuts in splits {
                let mut s = ToolStream::default();
                let mut segs = Vec::new();
                let mut bounds = cuts.clone();
                bounds.push(case.output.len());
                for w in bounds.windows(2) {
                    segs.extend(s.push(&case.output[w[0]..w[1]]));
                }
                segs.extend(s.finish());
                assert_eq!(Extracted::from_segments(segs), whole, "{}: chunked at {cuts:?}", case.name);
            }
        }
    }

    /// Text that cannot start a call is released at once; an open brace is held until decided.
    #[test]
    fn plain_text_streams_without_delay() {
        let mut s = ToolStream::default();
        assert_eq!(s.push("Hello, wor"), vec![Segment::Text("Hello, wor".into())]);
        assert_eq!(s.push("ld {\"name\": \"f\""), vec![Segment::Text("ld ".into())]);
        assert_eq!(
            s.push(", \"arguments\": {}} bye"),
            vec![
                Segment::Call(ToolCall { name: "f".into(), arguments: serde_json::Map::new() }),
                Segment::Text(" bye".into())
            ]
        );
        assert_eq!(s.push(" <tool_"), vec![Segment::Text(" ".into())]);
        assert_eq!(s.finish(), vec![Segment::Text("<tool_".into())]);
    }
}
