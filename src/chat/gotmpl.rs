//! The small subset of Go's `text/template` that Ollama clients send in the `template` field of
//! `POST /api/generate`.
//!
//! Ollama renders the prompt of a generate request with the request's `template` (a Go template)
//! when one is given, overriding the model's own. Clients only ever send the simple, pre-chat
//! Modelfile shape of those templates, for example
//!
//! ```text
//! {{ if .System }}<|im_start|>system
//! {{ .System }}<|im_end|>
//! {{ end }}<|im_start|>user
//! {{ .Prompt }}<|im_end|>
//! <|im_start|>assistant
//! ```
//!
//! so that shape is what this module renders, with Go's semantics:
//! - literal text, copied verbatim;
//! - `{{ .System }}`, `{{ .Prompt }}`, `{{ .Response }}`: the value, inserted verbatim
//!   (`text/template` does no escaping);
//! - `{{ if .X }}…{{ else if .Y }}…{{ else }}…{{ end }}`, nested, where a value is true when it is
//!   a non-empty string; the condition may also be `not .X`;
//! - trim markers: `{{- ` trims all white space (space, tab, CR, LF) from the end of the text
//!   just before the action, ` -}}` trims it from the start of the text just after; as in Go the
//!   space is part of the marker (`{{-3}}` is not a trim marker);
//! - comments `{{/* … */}}`, with or without trim markers (`{{- /* … */ -}}`), which must start
//!   and end at the delimiters as in Go;
//! - free white space (including newlines) inside actions, and Go's `{{if.System}}` spelling.
//!
//! Everything else — `range`, `with`, `template`, pipelines, function calls, variables (`$x`),
//! `{{ . }}`, other fields (`.Messages`, `.Tools`, …) — and every malformed template (an
//! unclosed `{{` or comment, an unmatched `{{ end }}`/`{{ else }}`, a missing `{{ end }}`) is a
//! [`GoTemplateError`] whose message names the construct and its byte offset, for the API to
//! answer with a 400 instead of rendering something other than what Ollama would. Parsing never
//! panics and never recurses on the input; nesting is bounded by [`MAX_DEPTH`].

/// The deepest `{{ if }}` nesting a template may have.
pub const MAX_DEPTH: usize = 64;

const SUPPORTED: &str = "{{ .System }}, {{ .Prompt }}, {{ .Response }}, \
    {{ if .X }}/{{ if not .X }}/{{ else }}/{{ else if .X }}/{{ end }}, {{- -}} trimming, comments";

/// The longest piece of template text an error message quotes.
const QUOTE_MAX: usize = 60;

/// Why a template is not one this module renders. Every message names the construct and the
/// byte offset (into the template) of the `{{` that starts it.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GoTemplateError {
    /// An action that is valid Go (or not) but outside the supported subset.
    #[error("template: unsupported action `{action}` at byte {offset} (supported: {SUPPORTED})")]
    UnsupportedAction { action: String, offset: usize },
    /// A field other than `.System`, `.Prompt` and `.Response`.
    #[error("template: unsupported field `.{field}` at byte {offset} (supported fields: .System, .Prompt, .Response)")]
    UnsupportedField { field: String, offset: usize },
    /// `{{}}` or `{{- -}}`: an action with nothing in it.
    #[error("template: empty action `{{{{}}}}` at byte {offset}")]
    EmptyAction { offset: usize },
    /// A `{{` with no `}}` after it.
    #[error("template: unclosed action: `{{{{` at byte {offset} has no closing `}}}}`")]
    UnclosedAction { offset: usize },
    /// A `{{/*` with no `*/` after it.
    #[error("template: unclosed comment: `{{{{/*` at byte {offset} has no closing `*/}}}}`")]
    UnclosedComment { offset: usize },
    /// A comment whose `*/` is not immediately followed by `}}` (or ` -}}`).
    #[error("template: comment at byte {offset} ends before the closing delimiter (`*/` must be followed by `}}}}`)")]
    CommentNotAtDelimiter { offset: usize },
    /// A comment that does not start right after `{{` / `{{- `.
    #[error("template: comment at byte {offset} must start right after `{{{{` or `{{{{- ` (write `{{{{/* … */}}}}`)")]
    CommentNotAtStart { offset: usize },
    /// `{{ end }}`, `{{ else }}` or `{{ else if }}` outside any `{{ if }}`.
    #[error("template: unexpected `{{{{ {keyword} }}}}` at byte {offset}: no open `{{{{ if }}}}`")]
    Unmatched { keyword: &'static str, offset: usize },
    /// `{{ else }}` or `{{ else if }}` after the `{{ else }}` of the same `{{ if }}`.
    #[error(
        "template: unexpected `{{{{ {keyword} }}}}` at byte {offset}: the `{{{{ if }}}}` at byte {if_offset} already had its `{{{{ else }}}}`"
    )]
    AfterElse { keyword: &'static str, offset: usize, if_offset: usize },
    /// An `{{ if }}` that the template never closes.
    #[error("template: missing `{{{{ end }}}}` for the `{{{{ if }}}}` at byte {offset}")]
    MissingEnd { offset: usize },
    /// More than [`MAX_DEPTH`] nested `{{ if }}`s.
    #[error("template: `{{{{ if }}}}` at byte {offset} nests deeper than {max} levels")]
    TooDeep { offset: usize, max: usize },
}

/// The values a template is rendered with.
#[derive(Debug, Clone, Copy, Default)]
pub struct GoTemplateVars<'a> {
    pub system: &'a str,
    pub prompt: &'a str,
    pub response: &'a str,
}

/// A parsed template; see the module docs for what it accepts.
#[derive(Debug, Clone, PartialEq)]
pub struct GoTemplate {
    nodes: Vec<Node>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Var {
    System,
    Prompt,
    Response,
}

impl Var {
    fn get<'a>(self, vars: &GoTemplateVars<'a>) -> &'a str {
        match self {
            Var::System => vars.system,
            Var::Prompt => vars.prompt,
            Var::Response => vars.response,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Cond {
    var: Var,
    negate: bool,
}

impl Cond {
    fn holds(self, vars: &GoTemplateVars) -> bool {
        self.var.get(vars).is_empty() == self.negate
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Branch {
    cond: Cond,
    body: Vec<Node>,
}

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Text(String),
    Var(Var),
    /// The first branch whose condition holds renders, else `otherwise`.
    If {
        branches: Vec<Branch>,
        otherwise: Vec<Node>,
    },
}

/// What one `{{ … }}` means.
enum Action {
    Var(Var),
    If(Cond),
    ElseIf(Cond),
    Else,
    End,
}

/// An `{{ if }}` being parsed.
struct OpenIf {
    offset: usize,
    branches: Vec<Branch>,
    /// `Some` once its `{{ else }}` has been seen.
    otherwise: Option<Vec<Node>>,
}

impl OpenIf {
    fn body(&mut self) -> &mut Vec<Node> {
        match &mut self.otherwise {
            Some(body) => body,
            // `branches` starts with the `{{ if }}`'s own and never shrinks.
            None => &mut self.branches.last_mut().expect("an if has a branch").body,
        }
    }

    fn close(self) -> Node {
        Node::If { branches: self.branches, otherwise: self.otherwise.unwrap_or_default() }
    }
}

/// Go's white space for trim markers and inside actions.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

fn trim_space_end(s: &str) -> &str {
    s.trim_end_matches([' ', '\t', '\r', '\n'])
}

fn trim_space_start(s: &str) -> &str {
    s.trim_start_matches([' ', '\t', '\r', '\n'])
}

fn find(haystack: &str, from: usize, needle: &str) -> Option<usize> {
    haystack[from..].find(needle).map(|i| from + i)
}

/// `s` for an error message: at most [`QUOTE_MAX`] characters.
fn quote(s: &str) -> String {
    match s.char_indices().nth(QUOTE_MAX) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_string(),
    }
}

#[derive(Debug, PartialEq)]
enum Token<'a> {
    /// `if`, `else`, `end`, `not`, or any other bare word.
    Word(&'a str),
    /// `.Name`
    Field(&'a str),
}

/// Splits an action's inside into words and fields; `None` for anything else (`$x`, `|`, `(`,
/// strings, a bare `.`), which is never part of the supported subset.
fn tokenize(s: &str) -> Option<Vec<Token<'_>>> {
    let bytes = s.as_bytes();
    let is_word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let word_end = |from: usize| bytes[from..].iter().position(|&b| !is_word(b)).map_or(bytes.len(), |n| from + n);
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if is_space(b) {
            i += 1;
        } else if is_word(b) {
            let end = word_end(i);
            tokens.push(Token::Word(&s[i..end]));
            i = end;
        } else if b == b'.' {
            let end = word_end(i + 1);
            if end == i + 1 {
                return None;
            }
            tokens.push(Token::Field(&s[i + 1..end]));
            i = end;
        } else {
            return None;
        }
    }
    Some(tokens)
}

/// What the (trimmed, non-empty) inside of the action at `offset` means.
fn parse_action(inner: &str, offset: usize) -> Result<Action, GoTemplateError> {
    let unsupported = || GoTemplateError::UnsupportedAction { action: quote(inner), offset };
    let field = |name: &str| match name {
        "System" => Ok(Var::System),
        "Prompt" => Ok(Var::Prompt),
        "Response" => Ok(Var::Response),
        _ => Err(GoTemplateError::UnsupportedField { field: quote(name), offset }),
    };
    let cond = |tokens: &[Token]| match tokens {
        [Token::Field(name)] => Ok(Cond { var: field(name)?, negate: false }),
        [Token::Word("not"), Token::Field(name)] => Ok(Cond { var: field(name)?, negate: true }),
        _ => Err(unsupported()),
    };
    let tokens = tokenize(inner).ok_or_else(unsupported)?;
    match tokens.as_slice() {
        [Token::Field(name)] => Ok(Action::Var(field(name)?)),
        [Token::Word("if"), rest @ ..] => Ok(Action::If(cond(rest)?)),
        [Token::Word("else")] => Ok(Action::Else),
        [Token::Word("else"), Token::Word("if"), rest @ ..] => Ok(Action::ElseIf(cond(rest)?)),
        [Token::Word("end")] => Ok(Action::End),
        _ => Err(unsupported()),
    }
}

impl GoTemplate {
    /// Parses `src`, or says which construct (and where) is outside the supported subset.
    pub fn parse(src: &str) -> Result<Self, GoTemplateError> {
        let bytes = src.as_bytes();
        let mut root: Vec<Node> = Vec::new();
        let mut open: Vec<OpenIf> = Vec::new();
        let push = |root: &mut Vec<Node>, open: &mut Vec<OpenIf>, node: Node| match open.last_mut() {
            Some(top) => top.body().push(node),
            None => root.push(node),
        };

        let mut pos = 0;
        // Whether the previous action ended with ` -}}`.
        let mut trim_next = false;
        loop {
            let start = find(src, pos, "{{");
            let mut text = &src[pos..start.unwrap_or(src.len())];
            if trim_next {
                text = trim_space_start(text);
            }
            let Some(start) = start else {
                if !text.is_empty() {
                    push(&mut root, &mut open, Node::Text(text.to_string()));
                }
                break;
            };
            let mut inner_start = start + 2;
            let trim_prev =
                bytes.get(inner_start) == Some(&b'-') && bytes.get(inner_start + 1).is_some_and(|&b| is_space(b));
            if trim_prev {
                text = trim_space_end(text);
                inner_start += 2;
            }
            if !text.is_empty() {
                push(&mut root, &mut open, Node::Text(text.to_string()));
            }

            if src[inner_start..].starts_with("/*") {
                let close =
                    find(src, inner_start + 2, "*/").ok_or(GoTemplateError::UnclosedComment { offset: start })?;
                let after = &src[close + 2..];
                if after.starts_with("}}") {
                    pos = close + 4;
                    trim_next = false;
                } else if after.len() >= 4 && is_space(after.as_bytes()[0]) && after[1..].starts_with("-}}") {
                    pos = close + 6;
                    trim_next = true;
                } else {
                    return Err(GoTemplateError::CommentNotAtDelimiter { offset: start });
                }
                continue;
            }

            let close = find(src, inner_start, "}}").ok_or(GoTemplateError::UnclosedAction { offset: start })?;
            let mut inner = &src[inner_start..close];
            let inner_bytes = inner.as_bytes();
            trim_next = inner_bytes.len() >= 2
                && inner_bytes[inner_bytes.len() - 1] == b'-'
                && is_space(inner_bytes[inner_bytes.len() - 2]);
            if trim_next {
                inner = &inner[..inner.len() - 2];
            }
            pos = close + 2;
            let inner = trim_space_start(trim_space_end(inner));
            if inner.is_empty() {
                return Err(GoTemplateError::EmptyAction { offset: start });
            }
            if inner.starts_with("/*") {
                return Err(GoTemplateError::CommentNotAtStart { offset: start });
            }

            match parse_action(inner, start)? {
                Action::Var(var) => push(&mut root, &mut open, Node::Var(var)),
                Action::If(cond) => {
                    if open.len() >= MAX_DEPTH {
                        return Err(GoTemplateError::TooDeep { offset: start, max: MAX_DEPTH });
                    }
                    open.push(OpenIf {
                        offset: start,
                        branches: vec![Branch { cond, body: Vec::new() }],
                        otherwise: None,
                    });
                }
                Action::ElseIf(cond) => {
                    let top =
                        open.last_mut().ok_or(GoTemplateError::Unmatched { keyword: "else if", offset: start })?;
                    if top.otherwise.is_some() {
                        return Err(GoTemplateError::AfterElse {
                            keyword: "else if",
                            offset: start,
                            if_offset: top.offset,
                        });
                    }
                    top.branches.push(Branch { cond, body: Vec::new() });
                }
                Action::Else => {
                    let top = open.last_mut().ok_or(GoTemplateError::Unmatched { keyword: "else", offset: start })?;
                    if top.otherwise.is_some() {
                        return Err(GoTemplateError::AfterElse {
                            keyword: "else",
                            offset: start,
                            if_offset: top.offset,
                        });
                    }
                    top.otherwise = Some(Vec::new());
                }
                Action::End => {
                    let top = open.pop().ok_or(GoTemplateError::Unmatched { keyword: "end", offset: start })?;
                    push(&mut root, &mut open, top.close());
                }
            }
        }
        match open.last() {
            // The innermost: the one the first missing `{{ end }}` would close.
            Some(top) => Err(GoTemplateError::MissingEnd { offset: top.offset }),
            None => Ok(GoTemplate { nodes: root }),
        }
    }

    /// The template's text with `vars` in it.
    pub fn render(&self, vars: &GoTemplateVars) -> String {
        let mut out = String::new();
        render_nodes(&self.nodes, vars, &mut out);
        out
    }
}

/// Recursion depth is at most [`MAX_DEPTH`]: `parse` builds nothing deeper.
fn render_nodes(nodes: &[Node], vars: &GoTemplateVars, out: &mut String) {
    for node in nodes {
        match node {
            Node::Text(text) => out.push_str(text),
            Node::Var(var) => out.push_str(var.get(vars)),
            Node::If { branches, otherwise } => {
                let body = branches.iter().find(|b| b.cond.holds(vars)).map_or(otherwise, |b| &b.body);
                render_nodes(body, vars, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    fn vars<'a>(system: &'a str, prompt: &'a str, response: &'a str) -> GoTemplateVars<'a> {
        GoTemplateVars { system, prompt, response }
    }

    fn render(src: &str, v: GoTemplateVars) -> String {
        GoTemplate::parse(src).unwrap_or_else(|e| panic!("{src:?}: {e}")).render(&v)
    }

    fn err(src: &str) -> GoTemplateError {
        match GoTemplate::parse(src) {
            Ok(t) => panic!("{src:?} parsed: {t:?}"),
            Err(e) => e,
        }
    }

    const CHATML: &str = "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}\
        {{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}\
        <|im_start|>assistant\n{{ .Response }}<|im_end|>";

    #[test]
    fn chatml_with_and_without_system() {
        assert_eq!(
            render(CHATML, vars("Be brief.", "Hi", "")),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<|im_end|>"
        );
        assert_eq!(
            render(CHATML, vars("", "Hi", "")),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<|im_end|>"
        );
        assert_eq!(render(CHATML, vars("", "", "Hello")), "<|im_start|>assistant\nHello<|im_end|>");
    }

    #[test]
    fn llama2() {
        let t = "[INST] <<SYS>>{{ .System }}<</SYS>>\n\n{{ .Prompt }} [/INST]";
        assert_eq!(render(t, vars("sys", "hi", "")), "[INST] <<SYS>>sys<</SYS>>\n\nhi [/INST]");
        assert_eq!(render(t, vars("", "hi", "")), "[INST] <<SYS>><</SYS>>\n\nhi [/INST]");
    }

    #[test]
    fn text_only_and_stray_braces_are_literal() {
        for t in ["", "plain text", "a } b }} c { d", "}}", "{ {", "é}}ü"] {
            assert_eq!(render(t, GoTemplateVars::default()), t);
        }
    }

    #[test]
    fn values_are_inserted_verbatim() {
        let p = "{{ .System }} <b>&amp;</b> \"'\n";
        assert_eq!(render("[{{.Prompt}}]", vars("S", p, "")), format!("[{p}]"));
    }

    #[test]
    fn whitespace_inside_actions_is_free() {
        let v = vars("S", "P", "R");
        assert_eq!(render("{{.Prompt}}{{   .System\t}}{{\n.Response\n}}", v), "PSR");
        assert_eq!(render("{{if .System}}y{{else}}n{{end}}", v), "y");
        assert_eq!(render("{{\n  if  .System\n}}y{{ end\n}}", v), "y");
        // Go's lexer ends the keyword at the `.`.
        assert_eq!(render("{{if.System}}y{{end}}", v), "y");
    }

    #[test]
    fn trim_markers() {
        let v = vars("S", "P", "");
        // Go's own example, `{{23 -}} < {{- 45}}` → `23<45`.
        assert_eq!(render("{{ .System -}} < {{- .Prompt }}", v), "S<P");
        assert_eq!(render("a \t\r\n {{- .Prompt -}} \n\t\r b", v), "aPb");
        assert_eq!(render("a\n\n{{- .Prompt }}\n\nb", v), "aP\n\nb");
        assert_eq!(render("a\n\n{{ .Prompt -}}\n\nb", v), "a\n\nPb");
        // Any of Go's four space characters completes a marker.
        assert_eq!(render("a {{-\n.Prompt\t-}} b", v), "aPb");
        // Only those four are trimmed.
        assert_eq!(render("a\u{a0}\u{0b}{{- .Prompt -}}\u{0b}\u{a0}b", v), "a\u{a0}\u{0b}P\u{0b}\u{a0}b");
        // Trimming reaches only the adjacent text, not across a value.
        assert_eq!(render("{{ .Prompt }} {{- .Prompt }}", vars("", " P ", "")), " P  P ");
        // Text trimmed away entirely, and text trimmed from both sides.
        assert_eq!(render("{{ .System -}}   \n  {{- .Prompt }}", v), "SP");
        assert_eq!(render("{{ .System -}} x {{- .Prompt }}", v), "SxP");
        // Markers on control actions, the usual way to write multi-line templates.
        let t = "{{- if .System }}\n<sys>{{ .System }}</sys>\n{{- end }}\n{{ .Prompt -}}\n";
        assert_eq!(render(t, v), "\n<sys>S</sys>\nP");
        assert_eq!(render(t, vars("", "P", "")), "\nP");
    }

    #[test]
    fn minus_without_space_is_not_a_trim_marker() {
        // As in Go, where `{{-3}}` is the number -3.
        assert!(
            matches!(err("a {{-.Prompt}}"), GoTemplateError::UnsupportedAction { action, .. } if action == "-.Prompt")
        );
        assert!(
            matches!(err("{{.Prompt-}} b"), GoTemplateError::UnsupportedAction { action, .. } if action == ".Prompt-")
        );
        assert!(matches!(err("{{- -}}"), GoTemplateError::UnsupportedAction { action, .. } if action == "-"));
    }

    #[test]
    fn else_if_chains() {
        let t = "{{ if .System }}s{{ else if .Prompt }}p{{ else if .Response }}r{{ else }}none{{ end }}";
        assert_eq!(render(t, vars("x", "x", "x")), "s");
        assert_eq!(render(t, vars("", "x", "x")), "p");
        assert_eq!(render(t, vars("", "", "x")), "r");
        assert_eq!(render(t, vars("", "", "")), "none");
        let t = "{{ if .System }}s{{ else if .Prompt }}p{{ end }}!";
        assert_eq!(render(t, vars("", "", "")), "!");
        assert_eq!(render(t, vars("", "x", "")), "p!");
    }

    #[test]
    fn if_not() {
        let t = "{{ if not .System }}default system{{ else }}{{ .System }}{{ end }}";
        assert_eq!(render(t, vars("", "", "")), "default system");
        assert_eq!(render(t, vars("mine", "", "")), "mine");
        let t = "{{ if .Prompt }}p{{ else if not .Response }}no response{{ end }}";
        assert_eq!(render(t, vars("", "", "")), "no response");
        assert_eq!(render(t, vars("", "", "r")), "");
    }

    #[test]
    fn truthiness_is_non_empty() {
        assert_eq!(render("{{ if .System }}y{{ else }}n{{ end }}", vars(" ", "", "")), "y");
        assert_eq!(render("{{ if .System }}y{{ else }}n{{ end }}", vars("", "", "")), "n");
    }

    #[test]
    fn nesting() {
        let t =
            "{{ if .System }}S{{ if .Prompt }}SP{{ else }}S-{{ end }}{{ else }}-{{ if .Prompt }}P{{ end }}{{ end }}.";
        assert_eq!(render(t, vars("x", "x", "")), "SSP.");
        assert_eq!(render(t, vars("x", "", "")), "SS-.");
        assert_eq!(render(t, vars("", "x", "")), "-P.");
        assert_eq!(render(t, vars("", "", "")), "-.");
        let t = "{{ if .System }}{{ if .Prompt }}{{ if .Response }}all{{ end }}{{ end }}{{ end }}";
        assert_eq!(render(t, vars("x", "x", "x")), "all");
        assert_eq!(render(t, vars("x", "x", "")), "");
    }

    #[test]
    fn depth_is_bounded() {
        let nested = |n: usize| format!("{}x{}", "{{ if .System }}".repeat(n), "{{ end }}".repeat(n));
        assert_eq!(render(&nested(MAX_DEPTH), vars("s", "", "")), "x");
        let offset = MAX_DEPTH * "{{ if .System }}".len();
        assert_eq!(err(&nested(MAX_DEPTH + 1)), GoTemplateError::TooDeep { offset, max: MAX_DEPTH });
        // Hostile input fails cleanly instead of overflowing the stack.
        assert!(matches!(err(&"{{if .Prompt}}".repeat(100_000)), GoTemplateError::TooDeep { .. }));
        assert!(matches!(err(&"{{end}}".repeat(100_000)), GoTemplateError::Unmatched { .. }));
        // Long flat templates are fine.
        let flat = "{{ if .System }}a{{ else if .Prompt }}b{{ end }}".repeat(10_000);
        assert_eq!(render(&flat, vars("", "p", "")), "b".repeat(10_000));
    }

    #[test]
    fn comments() {
        let v = vars("S", "P", "");
        assert_eq!(render("a {{/* note */}} b", v), "a  b");
        assert_eq!(render("a {{- /* note */ -}} b", v), "ab");
        assert_eq!(render("a {{- /* note */}} b", v), "a b");
        assert_eq!(render("a {{/* note */ -}} b", v), "a b");
        assert_eq!(render("{{/* multi\nline {{ range }} }} {{ .Nope */}}{{ .Prompt }}", v), "P");
        assert_eq!(render("{{/**/}}x", v), "x");
        assert_eq!(err("x {{/* a */ b */}}"), GoTemplateError::CommentNotAtDelimiter { offset: 2 });
        assert_eq!(err("{{/* a */-}}"), GoTemplateError::CommentNotAtDelimiter { offset: 0 });
        assert_eq!(err("{{/* a */"), GoTemplateError::CommentNotAtDelimiter { offset: 0 });
        assert_eq!(err("ab{{/* a }}"), GoTemplateError::UnclosedComment { offset: 2 });
        assert_eq!(err("{{ /* a */ }}"), GoTemplateError::CommentNotAtStart { offset: 0 });
        assert!(err("{{/* a */ b */}}").to_string().contains("comment"));
    }

    #[test]
    fn unsupported_action_message() {
        let e = err("{{ .System }}\n\n{{ range .Messages }}{{ end }}");
        assert_eq!(e, GoTemplateError::UnsupportedAction { action: "range .Messages".into(), offset: 15 });
        assert_eq!(
            e.to_string(),
            "template: unsupported action `range .Messages` at byte 15 (supported: {{ .System }}, {{ .Prompt }}, \
             {{ .Response }}, {{ if .X }}/{{ if not .X }}/{{ else }}/{{ else if .X }}/{{ end }}, {{- -}} trimming, \
             comments)"
        );
    }

    #[test]
    fn unsupported_actions() {
        for (src, action) in [
            ("{{ range .Messages }}x{{ end }}", "range .Messages"),
            ("{{ with .System }}{{ . }}{{ end }}", "with .System"),
            ("{{ .Prompt | trim }}", ".Prompt | trim"),
            ("{{ printf \"%s\" .Prompt }}", "printf \"%s\" .Prompt"),
            ("{{ slice .Prompt 1 }}", "slice .Prompt 1"),
            ("{{ $x := .Prompt }}", "$x := .Prompt"),
            ("{{ $x }}", "$x"),
            ("{{ $.Prompt }}", "$.Prompt"),
            ("{{ . }}", "."),
            ("{{ .System.Foo }}", ".System.Foo"),
            ("{{ .Prompt. }}", ".Prompt."),
            ("{{ (.Prompt) }}", "(.Prompt)"),
            ("{{ if }}x{{ end }}", "if"),
            ("{{ if and .System .Prompt }}x{{ end }}", "if and .System .Prompt"),
            ("{{ if not }}x{{ end }}", "if not"),
            ("{{ if eq .System \"x\" }}x{{ end }}", "if eq .System \"x\""),
            ("{{ if .System }}{{ else with .Prompt }}{{ end }}", "else with .Prompt"),
            ("{{ if .System }}{{ end .System }}", "end .System"),
            ("{{ template \"x\" }}", "template \"x\""),
            ("{{ define \"x\" }}{{ end }}", "define \"x\""),
            ("{{ block \"x\" . }}{{ end }}", "block \"x\" ."),
            ("{{ break }}", "break"),
            ("{{ System }}", "System"),
            ("{{ 3 }}", "3"),
            ("{{ \"}}\" }}", "\""),
            ("{{ .Prömpt }}", ".Prömpt"),
        ] {
            match err(src) {
                GoTemplateError::UnsupportedAction { action: a, offset } => {
                    assert_eq!((a.as_str(), offset), (action, src.find(&format!("{{{{ {action}")).unwrap()), "{src}");
                }
                e => panic!("{src}: {e}"),
            }
            let message = err(src).to_string();
            assert!(message.contains(&format!("unsupported action `{action}`")), "{message}");
        }
        // Long actions are quoted shortened.
        let long = format!("{{{{ range {} }}}}", ".X".repeat(100));
        let GoTemplateError::UnsupportedAction { action, .. } = err(&long) else { panic!() };
        assert!(action.starts_with("range .X.X") && action.ends_with('…') && action.chars().count() == QUOTE_MAX + 1);
    }

    #[test]
    fn unsupported_fields() {
        for (src, field, offset) in [
            ("{{ .Messages }}", "Messages", 0),
            ("x{{ if .Tools }}{{ end }}", "Tools", 1),
            ("{{ if .System }}{{ else if .Suffix }}{{ end }}", "Suffix", 16),
            ("{{ if not .system }}{{ end }}", "system", 0),
            ("{{ .prompt }}", "prompt", 0),
        ] {
            let e = err(src);
            assert_eq!(e, GoTemplateError::UnsupportedField { field: field.into(), offset }, "{src}");
            assert!(e.to_string().contains(&format!("unsupported field `.{field}` at byte {offset}")), "{e}");
        }
    }

    #[test]
    fn malformed() {
        use GoTemplateError::*;
        assert_eq!(err("abc {{ .Prompt "), UnclosedAction { offset: 4 });
        assert_eq!(err("{{"), UnclosedAction { offset: 0 });
        assert_eq!(err("{{-"), UnclosedAction { offset: 0 });
        assert_eq!(err("{{ .Prompt }} {{ .System }"), UnclosedAction { offset: 14 });
        assert_eq!(err("{{}}"), EmptyAction { offset: 0 });
        assert_eq!(err("a{{ \n }}"), EmptyAction { offset: 1 });
        assert_eq!(err("a{{- }}"), EmptyAction { offset: 1 });
        assert_eq!(err("a{{ -}}"), EmptyAction { offset: 1 });
        assert_eq!(err("x{{ end }}"), Unmatched { keyword: "end", offset: 1 });
        assert_eq!(err("{{ if .System }}{{ end }}{{ end }}"), Unmatched { keyword: "end", offset: 25 });
        assert_eq!(err("{{ else }}"), Unmatched { keyword: "else", offset: 0 });
        assert_eq!(err("{{ else if .Prompt }}"), Unmatched { keyword: "else if", offset: 0 });
        assert_eq!(
            err("{{ if .System }}{{ else }}{{ else }}{{ end }}"),
            AfterElse { keyword: "else", offset: 26, if_offset: 0 }
        );
        assert_eq!(
            err("{{ if .System }}{{ else }}{{ else if .Prompt }}{{ end }}"),
            AfterElse { keyword: "else if", offset: 26, if_offset: 0 }
        );
        assert_eq!(err("ab{{ if .System }}x"), MissingEnd { offset: 2 });
        assert_eq!(err("{{ if .System }}{{ if .Prompt }}{{ end }}"), MissingEnd { offset: 0 });
        assert_eq!(err("{{ if .System }}{{ end }}{{ if .Prompt }}{{ else }}"), MissingEnd { offset: 25 });

        let cases = [
            ("{{ .Prompt ", "unclosed action"),
            ("{{}}", "empty action"),
            ("{{/* x", "unclosed comment"),
            ("{{ end }}", "unexpected `{{ end }}` at byte 0"),
            ("{{ else }}", "unexpected `{{ else }}` at byte 0"),
            ("{{ if .Prompt }}{{ else }}{{ else }}", "already had its `{{ else }}`"),
            ("{{ if .Prompt }}", "missing `{{ end }}` for the `{{ if }}` at byte 0"),
        ];
        for (src, needle) in cases {
            let message = err(src).to_string();
            assert!(message.starts_with("template: ") && message.contains(needle), "{src}: {message}");
        }
    }

    /// Whatever the input, `parse` returns (never panics, never overflows), and what parses
    /// renders; text without `{{` renders as itself.
    #[test]
    fn random_input_never_panics() {
        const FRAGMENTS: &[&str] = &[
            "{{",
            "}}",
            "{{-",
            "-}}",
            "{{- ",
            " -}}",
            "{",
            "}",
            "-",
            " ",
            "\n",
            "\t",
            "\r",
            ".",
            "$",
            "|",
            "(",
            ")",
            "\"",
            "/*",
            "*/",
            "{{/*",
            "*/}}",
            "if",
            "else",
            "end",
            "not",
            "range",
            ".System",
            ".Prompt",
            ".Response",
            ".Messages",
            "{{ if .System }}",
            "{{ if not .Prompt }}",
            "{{ else if .Response }}",
            "{{ else }}",
            "{{ end }}",
            "{{ .Prompt }}",
            "{{- .System -}}",
            "{{/* c */}}",
            "{{- /* c */ -}}",
            "text",
            "é",
            "日本",
            "\u{a0}",
            "\0",
        ];
        let mut rng = ChaCha8Rng::seed_from_u64(0x0907_e3b1);
        let v = vars("S", "P", "R");
        let mut parsed = 0;
        for i in 0..20_000 {
            let src = if i % 4 == 0 {
                let bytes: Vec<u8> = (0..rng.random_range(0..40))
                    .map(|_| if rng.random_bool(0.5) { b"{}-/* .$\n"[rng.random_range(0..9)] } else { rng.random() })
                    .collect();
                String::from_utf8_lossy(&bytes).into_owned()
            } else {
                (0..rng.random_range(0..24)).map(|_| FRAGMENTS[rng.random_range(0..FRAGMENTS.len())]).collect()
            };
            if let Ok(t) = GoTemplate::parse(&src) {
                parsed += 1;
                let out = t.render(&v);
                if !src.contains("{{") {
                    assert_eq!(out, src);
                }
            }
        }
        // The generator reaches the success path too, not only errors.
        assert!(parsed > 1_000, "{parsed}");
    }
}
