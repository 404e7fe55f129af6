//! The model's own HF chat template, rendered with minijinja the way `transformers`'
//! `apply_chat_template` renders it with Jinja2.
//!
//! HF's environment (`transformers/utils/chat_template_utils.py`): an
//! `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with the loop-controls
//! extension, globals `raise_exception(msg)` and `strftime_now(fmt)` (local time), and `tojson`
//! replaced by `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
//! sort_keys=False)`. Templates are rendered with `messages`, `tools`, `documents`,
//! `add_generation_prompt`, the tokenizer's special tokens (`bos_token`, `eos_token`) and any
//! extra keyword arguments (`date_string`, `add_vision_id`, …), which override the tokens.
//!
//! minijinja differs from Jinja2 where it matters for chat templates, and is adjusted here:
//! Python string/dict methods (`.strip()`, `.items()`, …) come from `minijinja-contrib`'s
//! pycompat callback; `tojson` is our Python-compatible one (minijinja's sorts keys, uses compact
//! separators and escapes HTML); printed values use Python's `str()` (`True`, `None`, `1.0`,
//! `['a']`). Known remaining gaps: the `~` operator and string concatenation of non-strings use
//! minijinja's forms (`true`, not `True`); `{% generation %}` blocks (HF's AssistantTracker) are
//! not supported and fail as a syntax error.

use std::collections::BTreeMap;
use std::fmt::Write;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};

use super::pyfmt::{self, DumpOptions};

const NAME: &str = "chat_template";

/// Keys the renderer sets itself; `extra` may not replace them (Python would raise a
/// "multiple values for keyword argument" TypeError).
const RESERVED: &[&str] = &["messages", "tools", "documents", "add_generation_prompt"];

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The template text does not parse.
    #[error("chat template does not compile: {0}")]
    Syntax(String),
    /// The template called `raise_exception(message)`: the request is not something the model's
    /// format can express (e.g. roles out of order). The message is the template's own.
    #[error("chat template rejected the conversation: {0}")]
    Raised(String),
    /// Any other failure while rendering (undefined attribute, type error, bad `tojson` input).
    #[error("chat template failed to render: {0}")]
    Render(String),
    #[error("'{0}' cannot be passed as an extra template variable: the renderer sets it")]
    ReservedKey(String),
}

/// Marks an error made by `raise_exception`, so it can be told apart from engine errors.
#[derive(Debug)]
struct RaisedByTemplate(String);

impl std::fmt::Display for RaisedByTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedByTemplate {}

/// A compiled chat template plus the special-token strings it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("bos_token", &self.bos_token).field("eos_token", &self.eos_token).finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`. `bos_token`/`eos_token` are the strings the tokenizer defines (absent
    /// ones stay undefined in the template, as in HF where `special_tokens_map` omits them).
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(|out, _state, value| {
            // Safe strings and plain strings print as themselves; everything else as Python's str().
            match value.as_str() {
                Some(s) => out.write_str(s),
                None => out.write_str(&pyfmt::py_str(value)),
            }
            .map_err(Error::from)
        });
        env.add_filter("tojson", tojson);
        env.add_filter("string", |v: Value| Value::from(pyfmt::py_str(&v)));
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, source.to_owned()).map_err(|e| TemplateError::Syntax(describe(&e)))?;
        Ok(Self { env, bos_token: bos_token.map(str::to_owned), eos_token: eos_token.map(str::to_owned) })
    }

    /// Renders the conversation. `messages` and `tools` are OpenAI/HF-shaped JSON (tool-call
    /// `arguments` must already be objects, as HF templates expect); `tools: None` renders with
    /// `tools = none`, as HF does. `extra` adds template variables such as `date_string`.
    pub fn render(
        &self,
        messages: &[serde_json::Value],
        add_generation_prompt: bool,
        tools: Option<&serde_json::Value>,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, TemplateError> {
        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        for (tok, value) in [("bos_token", &self.bos_token), ("eos_token", &self.eos_token)] {
            if let Some(v) = value {
                ctx.insert(tok.to_owned(), Value::from(v.as_str()));
            }
        }
        for (k, v) in extra {
            if RESERVED.contains(&k.as_str()) {
                return Err(TemplateError::ReservedKey(k.clone()));
            }
            ctx.insert(k.clone(), Value::from_serialize(v));
        }
        ctx.insert("messages".into(), Value::from_serialize(messages));
        ctx.insert("tools".into(), tools.map(Value::from_serialize).unwrap_or(Value::from(())));
        ctx.insert("documents".into(), Value::from(()));
        ctx.insert("add_generation_prompt".into(), Value::from(add_generation_prompt));

        let template = self.env.get_template(NAME).map_err(|e| TemplateError::Render(describe(&e)))?;
        template.render(ctx).map_err(|e| match raised_message(&e) {
            Some(msg) => TemplateError::Raised(msg),
            None => TemplateError::Render(describe(&e)),
        })
    }
}

/// The error text plus where in the template it happened.
fn describe(e: &Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        let _ = write!(s, ": {inner}");
        src = inner.source();
    }
    s
}

fn raised_message(e: &Error) -> Option<String> {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = src {
        if let Some(r) = err.downcast_ref::<RaisedByTemplate>() {
            return Some(r.0.clone());
        }
        src = err.source();
    }
    None
}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, "raise_exception called").with_source(RaisedByTemplate(msg)))
}

/// `datetime.now().strftime(fmt)` in local time. An invalid format is an error, not a panic
/// (chrono reports bad specifiers through `fmt::Error`).
fn strftime_now(fmt: String) -> Result<Value, Error> {
    let mut out = String::new();
    write!(out, "{}", chrono::Local::now().format(&fmt))
        .map_err(|_| Error::new(ErrorKind::InvalidOperation, format!("strftime_now: invalid format {fmt:?}")))?;
    Ok(Value::from(out))
}

/// HF's `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, keyword arguments only.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let bad = |what: &str| Error::new(ErrorKind::InvalidOperation, format!("tojson: {what}"));
    let mut opts = DumpOptions::default();
    if let Some(v) = kwargs.get::<Option<bool>>("ensure_ascii")? {
        opts.ensure_ascii = v;
    }
    if let Some(v) = kwargs.get::<Option<bool>>("sort_keys")? {
        opts.sort_keys = v;
    }
    if let Some(v) = kwargs.get::<Option<Value>>("indent")? {
        opts.indent = match v.kind() {
            ValueKind::None => None,
            // Python: an int is that many spaces (negative: none); a str is used as is.
            ValueKind::Number => {
                let n = i64::try_from(v.clone()).map_err(|_| bad("indent must be an integer or a string"))?;
                Some(" ".repeat(n.clamp(0, 64) as usize))
            }
            ValueKind::String => Some(v.as_str().unwrap_or_default().to_owned()),
            _ => return Err(bad("indent must be an integer or a string")),
        };
    }
    if let Some(v) = kwargs.get::<Option<Value>>("separators")? {
        if !v.is_none() {
            let parts: Vec<Value> = v.try_iter().map_err(|_| bad("separators must be a pair of strings"))?.collect();
            match parts.as_slice() {
                [a, b] if a.as_str().is_some() && b.as_str().is_some() => {
                    opts.separators = Some((a.as_str().unwrap().to_owned(), b.as_str().unwrap().to_owned()));
                }
                _ => return Err(bad("separators must be a pair of strings")),
            }
        }
    }
    kwargs.assert_all_used()?;
    pyfmt::dumps(value, &opts).map(Value::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(src: &str, messages: serde_json::Value) -> Result<String, TemplateError> {
        let t = ChatTemplate::new(src, Some("<s>"), Some("</s>"))?;
        let msgs = messages.as_array().cloned().unwrap_or_default();
        t.render(&msgs, false, None, &serde_json::Map::new())
    }

    #[test]
    fn raise_exception_becomes_a_raised_error_with_the_message() {
        let err = render("{{ raise_exception('roles must alternate') }}", json!([])).unwrap_err();
        assert!(matches!(&err, TemplateError::Raised(m) if m == "roles must alternate"), "{err}");
    }

    #[test]
    fn syntax_errors_are_reported_at_compile_time() {
        let err = ChatTemplate::new("{% for m in messages %}", None, None).unwrap_err();
        assert!(matches!(err, TemplateError::Syntax(_)), "{err}");
        let err = ChatTemplate::new("{% generation %}x{% endgeneration %}", None, None).unwrap_err();
        assert!(matches!(err, TemplateError::Syntax(_)), "{err}");
    }

    #[test]
    fn undefined_attribute_access_is_a_render_error() {
        let err = render("{{ messages[0].nope.deeper }}", json!([{"role": "user"}])).unwrap_err();
        assert!(matches!(err, TemplateError::Render(_)), "{err}");
        // Printing an undefined value is allowed and prints nothing (Jinja2's default).
        assert_eq!(render("[{{ missing }}]", json!([])).unwrap(), "[]");
    }

    #[test]
    fn tojson_rejects_unknown_arguments_and_bad_values() {
        let err = render("{{ messages | tojson(colour=1) }}", json!([])).unwrap_err();
        assert!(matches!(err, TemplateError::Render(_)), "{err}");
        let err = render("{{ messages | tojson(separators=1) }}", json!([])).unwrap_err();
        assert!(matches!(err, TemplateError::Render(_)), "{err}");
        let err = render("{{ missing | tojson }}", json!([])).unwrap_err();
        assert!(matches!(err, TemplateError::Render(_)), "{err}");
    }

    #[test]
    fn strftime_now_formats_local_time_and_rejects_bad_formats() {
        let year = chrono::Local::now().format("%Y").to_string();
        let got = render("{{ strftime_now('%Y') }}", json!([])).unwrap();
        // Around midnight on new year's eve the two clocks may straddle the change.
        assert!(
            got == year || got.parse::<i32>().is_ok_and(|y| (y - year.parse::<i32>().unwrap()).abs() == 1),
            "{got}"
        );
        assert!(matches!(render("{{ strftime_now('%Q') }}", json!([])), Err(TemplateError::Render(_))));
    }

    #[test]
    fn reserved_keys_cannot_be_overridden_but_tokens_can() {
        let t = ChatTemplate::new("{{ bos_token }}|{{ eos_token }}", Some("<s>"), None).unwrap();
        let mut extra = serde_json::Map::new();
        assert_eq!(t.render(&[], false, None, &extra).unwrap(), "<s>|");
        extra.insert("eos_token".into(), json!("<e>"));
        assert_eq!(t.render(&[], false, None, &extra).unwrap(), "<s>|<e>");
        extra.insert("messages".into(), json!([]));
        assert!(matches!(t.render(&[], false, None, &extra), Err(TemplateError::ReservedKey(k)) if k == "messages"));
    }
}
