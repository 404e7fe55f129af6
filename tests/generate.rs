//! The generation loop on the real SmolLM2-135M-Instruct file, against llama.cpp's tokens
//! (tests/fixtures/smollm2_goldens.json, made by tests/fixtures/make_model_goldens.py): the chat
//! prompt we render and tokenize must be llama.cpp's prompt ids, and greedy generation from it
//! must follow llama.cpp's greedy tokens.

mod common;

use serde_json::Value;
use zoe_llm::backend::cpu::{CpuBackend, Precision};
use zoe_llm::engine::generate::{
    generate, raw_prompt_ids, render_chat_prompt, user_message, FinishReason, GenerateRequest,
};
use zoe_llm::engine::sampler::SamplingParams;
use zoe_llm::model::llama::Llama;
use zoe_llm::model::tokenizer::Tokenizer;
use zoe_llm::model::weights::GgufFile;

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn case<'a>(goldens: &'a Value, prompt_starts: &str) -> &'a Value {
    goldens["exact"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["prompt"].as_str().unwrap().starts_with(prompt_starts))
        .unwrap()
}

#[test]
fn chat_generation_follows_llama_cpp() {
    let Some(path) = common::smollm2_gguf("chat_generation_follows_llama_cpp") else {
        return;
    };
    let goldens: Value = serde_json::from_str(include_str!("fixtures/smollm2_goldens.json")).unwrap();
    let file = GgufFile::open(&path).unwrap();
    // The exact precision: its greedy path is the reference's (see tests/model_goldens.rs).
    let be = CpuBackend::with_precision(2, Precision::F32);
    let model = Llama::from_gguf(&file, &be).unwrap();
    let tok = Tokenizer::from_gguf(&file).unwrap();

    // SmolLM2's template adds its default system prompt when the conversation has none.
    let chat = case(&goldens, "<|im_start|>system");
    let prompt = render_chat_prompt(&tok, &[user_message("What is the boiling point of water?")]).unwrap();
    assert_eq!(prompt, ids(&chat["prompt_ids"]), "chat prompt ids differ from llama.cpp's");
    let raw = case(&goldens, "The capital");
    let mut want_raw = ids(&raw["prompt_ids"]);
    if tok.add_bos() {
        want_raw.insert(0, tok.bos_id().unwrap());
    }
    assert_eq!(raw_prompt_ids(&tok, raw["prompt"].as_str().unwrap()).unwrap(), want_raw);

    let golden = ids(&chat["greedy"]);
    let req = GenerateRequest {
        prompt_ids: prompt.clone(),
        max_tokens: golden.len(),
        sampling: SamplingParams::greedy(),
        stop: vec![],
        logprobs: None,
        constraint: None,
        mm: None,
    };
    let mut streamed = String::new();
    let g = generate(&model, &be, &tok, req, 2048, |e| {
        streamed.push_str(e.text);
        std::ops::ControlFlow::Continue(())
    })
    .unwrap();
    eprintln!("{:?} ({:?}): {:?}", g.finish_reason, g.timings, g.text);
    // Greedy through the whole loop (sampler, detokenizer, stops) equals llama.cpp's tokens
    // until it either ends or stops on an end-of-generation id the reference also produced.
    let same = g.tokens.iter().zip(&golden).take_while(|(a, b)| a == b).count();
    assert!(same == g.tokens.len(), "greedy diverged at {same}:\n ours {:?}\n ref  {golden:?}", g.tokens);
    if same == g.tokens.len() && g.finish_reason == FinishReason::Stop {
        // Stopped on an end-of-generation id: llama.cpp produced that id next.
        assert!(tok.eos_ids().contains(&golden[same]), "stopped early without EOS in the reference");
    }
    assert_eq!(streamed, g.text);
    assert_eq!(g.text, tok.decode(&g.tokens, true));
    assert_eq!(g.prompt_tokens, prompt.len());
    assert!(g.timings.prompt_tokens_per_s().is_some() && g.timings.decode_tokens_per_s().is_some());
}

/// A JSON Schema constraint makes even the 135M model emit schema-valid JSON, for any seed;
/// the same run unconstrained shows the model does not do so on its own.
#[test]
fn constrained_generation_is_schema_valid_for_every_seed() {
    use zoe_llm::engine::grammar::{Constraint, OutputFormat};
    let Some(path) = common::smollm2_gguf("constrained_generation_is_schema_valid_for_every_seed") else {
        return;
    };
    let file = GgufFile::open(&path).unwrap();
    let be = CpuBackend::new(2);
    let model = Llama::from_gguf(&file, &be).unwrap();
    let tok = Tokenizer::from_gguf(&file).unwrap();
    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Person {
        name: String,
        age: u32,
        room: Room,
    }
    #[derive(serde::Deserialize, Debug)]
    #[serde(rename_all = "lowercase")]
    enum Room {
        Kitchen,
        Bedroom,
        Garden,
    }
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "name": { "type": "string", "maxLength": 40 },
            "age": { "type": "integer", "minimum": 0, "maximum": 150 },
            "room": { "type": "string", "enum": ["kitchen", "bedroom", "garden"] }
        },
        "required": ["name", "age", "room"],
        "additionalProperties": false
    });
    let constraint = Constraint::new(&tok, OutputFormat::JsonSchema(schema)).unwrap();
    let prompt =
        render_chat_prompt(&tok, &[user_message("Describe a person in the house as JSON with name, age and room.")])
            .unwrap();
    for seed in 0..20u64 {
        let sampling = SamplingParams { temperature: 1.0, seed: Some(seed), ..SamplingParams::greedy() };
        let req = GenerateRequest {
            prompt_ids: prompt.clone(),
            max_tokens: 200,
            sampling,
            stop: vec![],
            logprobs: None,
            constraint: Some(constraint.clone()),
            mm: None,
        };
        let g = generate(&model, &be, &tok, req, 2048, |_| std::ops::ControlFlow::Continue(())).unwrap();
        eprintln!("seed {seed}: {}", g.text);
        assert_eq!(g.finish_reason, FinishReason::Stop, "seed {seed}: {:?}", g.text);
        let p: Person = serde_json::from_str(&g.text).unwrap_or_else(|e| panic!("seed {seed}: {e}: {:?}", g.text));
        assert!(p.age <= 150 && p.name.chars().count() <= 40, "seed {seed}: {p:?}");
    }
}
