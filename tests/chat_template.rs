//! `ChatTemplate` against Jinja2 renders in HF's `apply_chat_template` configuration
//! (tests/fixtures/make_template_goldens.py): SmolLM2, Llama-3.2-Instruct, Qwen2.5-Instruct and
//! Qwen2-VL-Instruct templates over single/multi-turn conversations, system messages, tools,
//! tool calls and results, images; plus probe templates for tojson options, Python methods, loop
//! controls, whitespace control and Python `str()` of values. Byte-for-byte.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use zoe_llm::chat::{ChatTemplate, TemplateError};

#[derive(Deserialize)]
struct Goldens {
    reference: String,
    templates: BTreeMap<String, TemplateDef>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct TemplateDef {
    text: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    template: String,
    messages: Vec<serde_json::Value>,
    tools: Option<serde_json::Value>,
    add_generation_prompt: bool,
    extra: serde_json::Map<String, serde_json::Value>,
    expected: Option<String>,
    error: Option<String>,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn goldens() -> Goldens {
    let path = fixtures().join("chat_template_goldens.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn compile(g: &Goldens) -> BTreeMap<&str, ChatTemplate> {
    g.templates
        .iter()
        .map(|(name, t)| {
            let compiled = ChatTemplate::new(&t.text, t.bos_token.as_deref(), t.eos_token.as_deref())
                .unwrap_or_else(|e| panic!("template {name}: {e}"));
            (name.as_str(), compiled)
        })
        .collect()
}

/// Shows where two renders part, with some context.
fn first_difference(want: &str, got: &str) -> String {
    let at = want.bytes().zip(got.bytes()).position(|(a, b)| a != b).unwrap_or(want.len().min(got.len()));
    let from = at.saturating_sub(60);
    let window = |s: &str| {
        let start = (from..=at.min(s.len())).find(|&i| s.is_char_boundary(i)).unwrap_or(at.min(s.len()));
        let end = (at + 60).min(s.len());
        let end = (end..=s.len()).find(|&i| s.is_char_boundary(i)).unwrap_or(s.len());
        s[start..end].to_owned()
    };
    format!("first difference at byte {at}:\n  expected …{:?}…\n  got      …{:?}…", window(want), window(got))
}

#[test]
fn renders_match_jinja2_byte_for_byte() {
    let g = goldens();
    let templates = compile(&g);
    let mut failures = Vec::new();
    let mut compared = 0;
    for case in &g.cases {
        let t = &templates[case.template.as_str()];
        let got = t.render(&case.messages, case.add_generation_prompt, case.tools.as_ref(), &case.extra);
        match (&case.expected, &case.error, got) {
            (Some(want), _, Ok(got)) => {
                compared += 1;
                if *want != got {
                    failures.push(format!("{}: {}", case.name, first_difference(want, &got)));
                }
            }
            (_, Some(msg), Err(TemplateError::Raised(got))) => {
                compared += 1;
                if *msg != got {
                    failures.push(format!("{}: raised {got:?}, expected {msg:?}", case.name));
                }
            }
            (_, _, Ok(got)) => {
                failures.push(format!("{}: rendered {got:?} but Jinja2 raised {:?}", case.name, case.error))
            }
            (_, _, Err(e)) => failures.push(format!("{}: {e}", case.name)),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from {}:\n{}",
        failures.len(),
        g.cases.len(),
        g.reference,
        failures.join("\n")
    );
    assert_eq!(compared, g.cases.len());
}

#[test]
fn goldens_cover_every_model_template_with_tools_and_errors() {
    // Guards the fixture itself: a regenerated file that lost a family would otherwise pass.
    let g = goldens();
    for name in ["smollm2", "llama-3.2", "qwen2.5", "qwen2-vl"] {
        assert!(g.cases.iter().any(|c| c.template == name), "no case for {name}");
    }
    assert!(g.cases.iter().any(|c| c.tools.is_some() && c.template == "llama-3.2"));
    assert!(g.cases.iter().any(|c| c.tools.is_some() && c.template == "qwen2.5"));
    assert!(g.cases.iter().any(|c| c.error.is_some()));
}

#[test]
fn smollm2_gguf_template_is_the_one_in_the_goldens() {
    let Some(path) = std::env::var_os("ZOE_TEST_GGUF") else {
        eprintln!("skipped smollm2_gguf_template_is_the_one_in_the_goldens: set ZOE_TEST_GGUF=<path to SmolLM2 gguf>");
        return;
    };
    let file = zoe_llm::model::weights::GgufFile::open(Path::new(&path)).expect("open gguf");
    let tok = zoe_llm::model::tokenizer::Tokenizer::from_gguf(&file).expect("tokenizer");
    let g = goldens();
    let smol = &g.templates["smollm2"];
    assert_eq!(tok.chat_template(), Some(smol.text.as_str()));
    assert_eq!(tok.bos_token(), smol.bos_token.as_deref());
    assert_eq!(tok.eos_token(), smol.eos_token.as_deref());
}
