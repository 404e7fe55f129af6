//! Python's text forms of template values, so a template renders here as it does under HF's
//! Jinja2 environment: `json.dumps` (the `tojson` filter HF installs), `repr(float)`, and
//! `str()` of `True`/`None`/lists/dicts when a template prints them.
//!
//! Sources: CPython `Lib/json/encoder.py` (separators, indent, `ensure_ascii` escaping, key
//! coercion) and `Python/pystrtod.c` (`repr` of floats: shortest round-trip digits, exponent
//! form when the decimal exponent is < -4 or >= 16).

use std::fmt::Write;

use minijinja::value::ValueKind;
use minijinja::{Error, ErrorKind, Value};

/// Options of `json.dumps` that HF's `tojson` filter passes through.
#[derive(Clone, Debug, Default)]
pub struct DumpOptions {
    pub ensure_ascii: bool,
    /// `None`: one line. `Some(s)`: newline and `s` per nesting level.
    pub indent: Option<String>,
    /// `(item, key)` separators; default `", "`/`": "`, or `","`/`": "` with an indent.
    pub separators: Option<(String, String)>,
    pub sort_keys: bool,
}

fn type_error(msg: String) -> Error {
    Error::new(ErrorKind::InvalidOperation, msg)
}

/// `json.dumps(value, ...)`.
pub fn dumps(value: &Value, opts: &DumpOptions) -> Result<String, Error> {
    let (item_sep, key_sep) = match (&opts.separators, &opts.indent) {
        (Some((i, k)), _) => (i.clone(), k.clone()),
        (None, Some(_)) => (",".to_owned(), ": ".to_owned()),
        (None, None) => (", ".to_owned(), ": ".to_owned()),
    };
    let mut out = String::new();
    let mut enc = Encoder { opts, item_sep, key_sep, out: &mut out };
    enc.value(value, 0)?;
    Ok(out)
}

struct Encoder<'a> {
    opts: &'a DumpOptions,
    item_sep: String,
    key_sep: String,
    out: &'a mut String,
}

impl Encoder<'_> {
    fn newline(&mut self, level: usize) {
        if let Some(indent) = &self.opts.indent {
            self.out.push('\n');
            for _ in 0..level {
                self.out.push_str(indent);
            }
        }
    }

    fn value(&mut self, v: &Value, level: usize) -> Result<(), Error> {
        match v.kind() {
            ValueKind::None => self.out.push_str("null"),
            ValueKind::Bool => self.out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => self.out.push_str(&number(v, true)),
            ValueKind::String => quote(self.out, v.as_str().unwrap_or_default(), self.opts.ensure_ascii),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                self.seq(&items, level)?
            }
            ValueKind::Map => self.map(v, level)?,
            ValueKind::Undefined => return Err(type_error("tojson: value is undefined".into())),
            kind => return Err(type_error(format!("tojson: object of type {kind} is not JSON serializable"))),
        }
        Ok(())
    }

    fn seq(&mut self, items: &[Value], level: usize) -> Result<(), Error> {
        if items.is_empty() {
            self.out.push_str("[]");
            return Ok(());
        }
        self.out.push('[');
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                let sep = self.item_sep.clone();
                self.out.push_str(&sep);
            }
            self.newline(level + 1);
            self.value(item, level + 1)?;
        }
        self.newline(level);
        self.out.push(']');
        Ok(())
    }

    fn map(&mut self, v: &Value, level: usize) -> Result<(), Error> {
        let mut entries = Vec::new();
        for key in v.try_iter()? {
            let item = v.get_item(&key)?;
            entries.push((json_key(&key)?, item));
        }
        if self.opts.sort_keys {
            entries.sort_by(|a, b| a.0.cmp(&b.0));
        }
        if entries.is_empty() {
            self.out.push_str("{}");
            return Ok(());
        }
        self.out.push('{');
        for (i, (key, item)) in entries.iter().enumerate() {
            if i > 0 {
                let sep = self.item_sep.clone();
                self.out.push_str(&sep);
            }
            self.newline(level + 1);
            quote(self.out, key, self.opts.ensure_ascii);
            let sep = self.key_sep.clone();
            self.out.push_str(&sep);
            self.value(item, level + 1)?;
        }
        self.newline(level);
        self.out.push('}');
        Ok(())
    }
}

/// Python coerces non-string keys: `True` → `"true"`, `None` → `"null"`, numbers by `repr`.
fn json_key(key: &Value) -> Result<String, Error> {
    Ok(match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_owned(),
        ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_owned(),
        ValueKind::None => "null".to_owned(),
        ValueKind::Number => number(key, true),
        kind => return Err(type_error(format!("tojson: keys must be str, int, float, bool or None, not {kind}"))),
    })
}

/// An integer as is; a float as Python's `repr` (JSON spells the non-finite ones
/// `NaN`/`Infinity`, Python's `str` spells them `nan`/`inf`).
fn number(v: &Value, json: bool) -> String {
    if v.is_integer() {
        return v.to_string();
    }
    let x = f64::try_from(v.clone()).unwrap_or(f64::NAN);
    if x.is_nan() {
        return (if json { "NaN" } else { "nan" }).to_owned();
    }
    if x.is_infinite() {
        let s = if json { "Infinity" } else { "inf" };
        return if x < 0.0 { format!("-{s}") } else { s.to_owned() };
    }
    float_repr(x)
}

/// `repr(x)` for a finite float: the shortest digits that round-trip, in fixed notation when
/// the decimal exponent is in [-4, 16), otherwise as `d.ddde±XX`.
pub fn float_repr(x: f64) -> String {
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    // Rust's `{:e}` prints the shortest round-trip digits: "-1.2345e-7", "1e16".
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').expect("LowerExp always has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    // The value is 0.DIGITS × 10^decpt.
    let decpt = exp + 1;
    let n = digits.len() as i32;
    let body = if -4 < decpt && decpt <= 16 {
        if decpt <= 0 {
            format!("0.{}{digits}", "0".repeat((-decpt) as usize))
        } else if decpt >= n {
            format!("{digits}{}.0", "0".repeat((decpt - n) as usize))
        } else {
            format!("{}.{}", &digits[..decpt as usize], &digits[decpt as usize..])
        }
    } else {
        let (first, rest) = digits.split_at(1);
        let e = decpt - 1;
        let frac = if rest.is_empty() { String::new() } else { format!(".{rest}") };
        format!("{first}{frac}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs())
    };
    format!("{sign}{body}")
}

/// A JSON string literal the way `json.dumps` writes it: with `ensure_ascii=False` only `"`,
/// `\` and control characters are escaped; with `True` everything outside printable ASCII too
/// (as `\u` and four hex digits, surrogate pairs above U+FFFF).
fn quote(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && !(' '..='~').contains(&c) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `str(value)` as Jinja2 prints it: `True`, `None`, `1.0`, `['a', 1]`, `{'k': 'v'}`.
/// Undefined prints as nothing (Jinja2's default `Undefined`).
pub fn py_str(v: &Value) -> String {
    match v.kind() {
        ValueKind::String => v.as_str().unwrap_or_default().to_owned(),
        ValueKind::Undefined => String::new(),
        _ => py_repr(v),
    }
}

/// `repr(value)` for the types JSON-like template data has. Strings use Python's quote choice
/// (single quotes unless the text has a single quote and no double quote); only backslash, the
/// quote and ASCII control characters are escaped (CPython also escapes non-printable Unicode,
/// which chat data does not contain in practice).
pub fn py_repr(v: &Value) -> String {
    match v.kind() {
        ValueKind::None => "None".into(),
        ValueKind::Undefined => String::new(),
        ValueKind::Bool => (if v.is_true() { "True" } else { "False" }).into(),
        ValueKind::Number => number(v, false),
        ValueKind::String => str_repr(v.as_str().unwrap_or_default()),
        ValueKind::Seq | ValueKind::Iterable => match v.try_iter() {
            Ok(items) => format!("[{}]", items.map(|i| py_repr(&i)).collect::<Vec<_>>().join(", ")),
            Err(_) => v.to_string(),
        },
        ValueKind::Map => match v.try_iter() {
            Ok(keys) => {
                let parts: Vec<String> = keys
                    .map(|k| {
                        let item = v.get_item(&k).unwrap_or_default();
                        format!("{}: {}", py_repr(&k), py_repr(&item))
                    })
                    .collect();
                format!("{{{}}}", parts.join(", "))
            }
            Err(_) => v.to_string(),
        },
        _ => v.to_string(),
    }
}

fn str_repr(s: &str) -> String {
    let q = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(q);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == q => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(q);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected strings are CPython 3.11's `repr(float)`.
    #[test]
    fn float_repr_matches_python() {
        let cases: &[(f64, &str)] = &[
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (100.0, "100.0"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (123456789012345678.0, "1.2345678901234568e+17"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.234e-7, "1.234e-07"),
            (1e300, "1e+300"),
            (5e-324, "5e-324"),
            (-0.0, "-0.0"),
            (0.3333333333333333, "0.3333333333333333"),
            (21.5, "21.5"),
        ];
        for &(x, want) in cases {
            assert_eq!(float_repr(x), want, "repr({x:e})");
        }
    }

    #[test]
    fn dumps_defaults_match_python() {
        let v = Value::from_serialize(serde_json::json!({"b": [1, 2.0, null, true], "a": "x\"y\\z\n\u{1}é😀<>&'"}));
        let got = dumps(&v, &DumpOptions::default()).unwrap();
        assert_eq!(got, r#"{"b": [1, 2.0, null, true], "a": "x\"y\\z\n\u0001é😀<>&'"}"#);
        let ascii =
            dumps(&Value::from("é😀\u{7f}"), &DumpOptions { ensure_ascii: true, ..Default::default() }).unwrap();
        assert_eq!(ascii, r#""\u00e9\ud83d\ude00\u007f""#);
    }

    #[test]
    fn dumps_indent_and_separators_match_python() {
        let v = Value::from_serialize(serde_json::json!({"k": [1, {}], "e": []}));
        let opts = DumpOptions { indent: Some("  ".into()), ..Default::default() };
        assert_eq!(dumps(&v, &opts).unwrap(), "{\n  \"k\": [\n    1,\n    {}\n  ],\n  \"e\": []\n}");
        let opts = DumpOptions { separators: Some((",".into(), ":".into())), sort_keys: true, ..Default::default() };
        assert_eq!(dumps(&v, &opts).unwrap(), r#"{"e":[],"k":[1,{}]}"#);
    }

    #[test]
    fn dumps_refuses_undefined() {
        assert!(dumps(&Value::UNDEFINED, &DumpOptions::default()).is_err());
    }

    #[test]
    fn python_str_forms() {
        assert_eq!(py_str(&Value::from(true)), "True");
        assert_eq!(py_str(&Value::from(())), "None");
        assert_eq!(py_str(&Value::from(2.0)), "2.0");
        assert_eq!(py_str(&Value::UNDEFINED), "");
        let v = Value::from_serialize(serde_json::json!({"a": ["it's", "x"], "n": null}));
        assert_eq!(py_str(&v), r#"{'a': ["it's", 'x'], 'n': None}"#);
    }
}
