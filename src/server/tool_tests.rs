//! Tool calls and structured output through both dialects: the streamed tool-call deltas and
//! Ollama's call lines join to the non-streamed result for every corpus output and chunking, and
//! forced calls and `format`/`response_format` give valid JSON over HTTP on the tiny model.

use std::time::Duration;

use serde_json::{json, Map, Value};

use super::infer::StreamWriter;
use super::sse::{ChatChunks, SseStream};
use super::tests::{ndjson, post, sse, state};
use crate::chat::tools;
use crate::engine::generate::FinishReason;
use crate::engine::service::{Event, ModelHandle, Summary};

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    output: String,
}

fn corpus() -> Vec<Case> {
    serde_json::from_str(include_str!("../../tests/fixtures/tool_calls/corpus.json")).expect("corpus.json")
}

fn summary() -> Summary {
    Summary {
        finish_reason: FinishReason::Stop,
        stop_reason: None,
        prompt_tokens: 1,
        tokens: vec![],
        queue: Duration::ZERO,
        prompt_eval: Duration::ZERO,
        eval: Duration::ZERO,
    }
}

/// Feeds `output` to `w` in pieces of `size` characters, then the end.
fn feed(w: &mut impl StreamWriter, output: &str, size: usize) -> String {
    let mut out = Vec::new();
    let chars: Vec<char> = output.chars().collect();
    for piece in chars.chunks(size) {
        let text: String = piece.iter().collect();
        assert!(!w.event(0, Event::Token { text, token: None, logprobs: None }, &mut out));
    }
    assert!(w.event(0, Event::Done(summary()), &mut out));
    String::from_utf8(out).unwrap()
}

/// Content and `(name, arguments)` calls.
type Reply = (String, Vec<(String, Map<String, Value>)>);

/// Joins an OpenAI chat stream: content deltas, and per call index its header then argument
/// pieces. Returns the reply and the last finish_reason.
fn join_openai(body: &str) -> (Reply, String) {
    let mut content = String::new();
    let mut calls: Vec<(String, String, String)> = Vec::new();
    let mut finish = String::new();
    for ev in body.split_terminator("\n\n") {
        let data = ev.strip_prefix("data: ").unwrap();
        if data == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        let c = &v["choices"][0];
        if let Some(t) = c["delta"]["content"].as_str() {
            content.push_str(t);
        }
        for d in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
            let i = d["index"].as_u64().unwrap() as usize;
            if let Some(id) = d["id"].as_str() {
                assert_eq!(i, calls.len(), "a new call takes the next index");
                assert_eq!(d["type"], "function");
                assert!(id.starts_with("chatcmpl-tool-"));
                calls.push((id.to_owned(), d["function"]["name"].as_str().unwrap().to_owned(), String::new()));
            } else {
                assert!(d["function"].get("name").is_none(), "the name comes once, in the header");
            }
            calls[i].2.push_str(d["function"]["arguments"].as_str().unwrap_or(""));
        }
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_owned();
        }
    }
    let calls = calls
        .into_iter()
        .map(|(_, name, args)| {
            (name, serde_json::from_str::<Map<String, Value>>(&args).expect("joined arguments parse"))
        })
        .collect();
    ((content, calls), finish)
}

/// Joins an Ollama chat stream: content of every line, calls whole, one per line.
fn join_ollama(body: &str) -> Reply {
    let mut content = String::new();
    let mut calls = Vec::new();
    for (i, l) in body.lines().enumerate() {
        let v: Value = serde_json::from_str(l).unwrap();
        content.push_str(v["message"]["content"].as_str().unwrap());
        for c in v["message"]["tool_calls"].as_array().into_iter().flatten() {
            assert_eq!(c["function"]["index"], calls.len(), "line {i}: {c}");
            let id = c["id"].as_str().unwrap();
            assert!(id.len() == 13 && id.starts_with("call_"), "{id}");
            let f = &c["function"];
            calls.push((f["name"].as_str().unwrap().to_owned(), f["arguments"].as_object().unwrap().clone()));
        }
        if v["done"] == true {
            assert_eq!(v["done_reason"], "stop", "Ollama's done_reason is never tool_calls");
        }
    }
    (content, calls)
}

fn expected(output: &str) -> Reply {
    let x = tools::extract(output);
    (x.content, x.calls.into_iter().map(|c| (c.name, c.arguments)).collect())
}

async fn tiny_handle() -> std::sync::Arc<ModelHandle> {
    let st = state();
    let m = st.registry.get("tiny").unwrap().clone();
    st.engines.get(&m, "tiny", None).await.unwrap().0
}

#[tokio::test]
async fn streamed_calls_join_to_the_whole_result_in_both_dialects() {
    let handle = tiny_handle().await;
    for case in corpus() {
        let want = expected(&case.output);
        for size in [1, 2, 5, 13, usize::MAX / 2] {
            let chunks = ChatChunks::new("id".into(), 0, "m".into(), handle.clone(), false, 1, true);
            let mut w = SseStream::new(chunks, 1, false, 1);
            let (got, finish) = join_openai(&feed(&mut w, &case.output, size));
            assert_eq!(got, want, "{} (openai, pieces of {size})", case.name);
            assert_eq!(finish, if want.1.is_empty() { "stop" } else { "tool_calls" }, "{}", case.name);
            let mut w = super::ollama::chat_stream_writer(handle.clone(), true);
            assert_eq!(
                join_ollama(&feed(&mut w, &case.output, size)),
                want,
                "{} (ollama, pieces of {size})",
                case.name
            );
        }
    }
    // Without tools in play the same outputs are plain content, envelopes and all.
    let output = "<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>";
    let chunks = ChatChunks::new("id".into(), 0, "m".into(), handle.clone(), false, 1, false);
    let ((content, calls), finish) = join_openai(&feed(&mut SseStream::new(chunks, 1, false, 1), output, 3));
    assert_eq!((content.as_str(), calls.len(), finish.as_str()), (output, 0, "stop"));
    let (content, calls) = join_ollama(&feed(&mut super::ollama::chat_stream_writer(handle, false), output, 3));
    assert_eq!((content.as_str(), calls.len()), (output, 0));
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 12},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7}
                },
                "required": ["city", "unit", "days"],
                "additionalProperties": false
            }
        }},
        {"type": "function", "function": {
            "name": "set_light",
            "parameters": {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"]}
        }}
    ])
}

/// The weather tool's arguments, checked field by field (unknown fields refused).
#[derive(serde::Deserialize, Debug)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Weather {
    city: String,
    unit: Unit,
    days: u8,
}

#[derive(serde::Deserialize, Debug)]
#[serde(rename_all = "lowercase")]
enum Unit {
    Celsius,
    Fahrenheit,
}

fn check_weather(args: &Map<String, Value>) {
    let w: Weather = serde_json::from_value(Value::Object(args.clone())).unwrap_or_else(|e| panic!("{e}: {args:?}"));
    assert!((1..=7).contains(&w.days) && w.city.chars().count() <= 12, "{w:?}");
}

#[tokio::test]
async fn forced_tool_calls_are_valid_in_both_dialects_streamed_or_not() {
    let st = state();
    let msgs = json!([{"role": "user", "content": "weather in Paris for 3 days?"}]);
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    for seed in 0..4 {
        let body = json!({
            "model": "tiny-tools", "messages": msgs, "tools": weather_tools(), "tool_choice": named,
            "seed": seed, "temperature": 1.0, "max_tokens": 120
        });
        let r = post(&st, "/v1/chat/completions", body.clone()).await;
        let v = r.json();
        let choice = &v["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
        assert!(choice["message"]["content"].is_null(), "{v}");
        let calls = choice["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1, "a named choice is exactly one call: {v}");
        assert_eq!(calls[0]["function"]["name"], "get_weather");
        let args: Map<String, Value> =
            serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
        check_weather(&args);

        // The same seed streamed: the deltas join to the same call.
        let mut sb = body.clone();
        sb["stream"] = json!(true);
        let r = post(&st, "/v1/chat/completions", sb).await;
        let events = sse(&r);
        let ((content, calls), finish) =
            join_openai(&(events.iter().map(|e| format!("data: {e}\n\n")).collect::<String>()));
        assert_eq!((content.as_str(), finish.as_str()), ("", "tool_calls"));
        assert_eq!(calls, vec![("get_weather".to_owned(), args.clone())]);

        // Ollama, with the extension field, streamed and not: the same call.
        let ob = json!({
            "model": "tiny-tools", "messages": msgs, "tools": weather_tools(), "tool_choice": named,
            "options": {"seed": seed, "temperature": 1.0, "num_predict": 120}, "stream": false
        });
        let v = post(&st, "/api/chat", ob.clone()).await.json();
        assert_eq!(v["done_reason"], "stop", "{v}");
        let c = &v["message"]["tool_calls"][0]["function"];
        assert_eq!((c["name"].as_str(), c["arguments"].as_object()), (Some("get_weather"), Some(&args)), "{v}");
        let mut ob = ob;
        ob["stream"] = json!(true);
        let lines = ndjson(&post(&st, "/api/chat", ob).await);
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        assert_eq!(join_ollama(&text), (String::new(), vec![("get_weather".to_owned(), args)]));
    }

    // "required": one or more calls, each of an offered tool with valid arguments.
    for seed in 0..4 {
        let body = json!({
            "model": "tiny-tools", "messages": msgs, "tools": weather_tools(), "tool_choice": "required",
            "seed": seed, "temperature": 1.0, "max_tokens": 200
        });
        let v = post(&st, "/v1/chat/completions", body).await.json();
        let calls = v["choices"][0]["message"]["tool_calls"].as_array().unwrap_or_else(|| panic!("{v}"));
        assert!(!calls.is_empty());
        for c in calls {
            let args: Map<String, Value> = serde_json::from_str(c["function"]["arguments"].as_str().unwrap()).unwrap();
            match c["function"]["name"].as_str().unwrap() {
                "get_weather" => check_weather(&args),
                "set_light" => assert!(args["on"].is_boolean(), "{args:?}"),
                other => panic!("{other} was not offered"),
            }
        }
    }
}

#[tokio::test]
async fn structured_output_is_valid_json_in_both_dialects() {
    let st = state();
    let schema = weather_tools()[0]["function"]["parameters"].clone();
    let msgs = json!([{"role": "user", "content": "weather?"}]);
    for seed in 0..4 {
        let v = post(
            &st,
            "/api/chat",
            json!({"model": "tiny", "messages": msgs, "format": schema, "stream": false,
                   "options": {"seed": seed, "temperature": 1.0, "num_predict": 120}}),
        )
        .await
        .json();
        let args: Map<String, Value> = serde_json::from_str(v["message"]["content"].as_str().unwrap()).unwrap();
        check_weather(&args);
        let v = post(
            &st,
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": msgs, "seed": seed, "temperature": 1.0, "max_tokens": 120,
                   "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": schema}}}),
        )
        .await
        .json();
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        let args: Map<String, Value> =
            serde_json::from_str(v["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
        check_weather(&args);
        // JSON mode: any object, on /api/generate too.
        let v = post(
            &st,
            "/api/generate",
            json!({"model": "tiny", "prompt": "json please", "format": "json", "stream": false,
                   "options": {"seed": seed, "temperature": 1.0, "num_predict": 200}}),
        )
        .await
        .json();
        if v["done_reason"] == "stop" {
            let o: Value = serde_json::from_str(v["response"].as_str().unwrap()).unwrap();
            assert!(o.is_object(), "{o}");
        } else {
            // A random model may write one endless string; what it wrote is still JSON's prefix.
            assert_eq!(v["done_reason"], "length");
            assert!(v["response"].as_str().unwrap().starts_with('{'));
        }
    }
}

/// Tools as Pydantic writes them (`$defs` + `$ref`) and tools whose parameters schema has no
/// type still give calls whose arguments are objects under a forced choice.
#[tokio::test]
async fn forced_calls_take_pydantic_refs_and_schemaless_tools() {
    let st = state();
    let tools = json!([
        {"type": "function", "function": {"name": "move", "parameters": {
            "$defs": {"Room": {"type": "string", "enum": ["hall", "attic"]}},
            "properties": {"to": {"$ref": "#/$defs/Room"}},
            "required": ["to"], "additionalProperties": false, "title": "Move", "type": "object"
        }}},
        // No "type": without the server adding "object", a bare 0 would be valid arguments.
        {"type": "function", "function": {"name": "ping", "parameters": {"properties": {}, "additionalProperties": false}}}
    ]);
    let msgs = json!([{"role": "user", "content": "go"}]);
    for (choice, name) in [
        (json!({"type": "function", "function": {"name": "move"}}), "move"),
        (json!({"type": "function", "function": {"name": "ping"}}), "ping"),
    ] {
        for seed in 0..3 {
            let v = post(
                &st,
                "/v1/chat/completions",
                json!({"model": "tiny-tools", "messages": msgs, "tools": tools, "tool_choice": choice,
                       "seed": seed, "temperature": 1.0, "max_tokens": 60}),
            )
            .await
            .json();
            let calls = v["choices"][0]["message"]["tool_calls"].as_array().unwrap_or_else(|| panic!("{v}"));
            assert_eq!(calls[0]["function"]["name"], name);
            let args: Value = serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
            if name == "move" {
                assert!(args["to"] == "hall" || args["to"] == "attic", "{args}");
            } else {
                assert_eq!(args, json!({}));
            }
        }
    }
    // A tool whose arguments are not an object is refused up front.
    let bad = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]);
    let r = post(&st, "/v1/chat/completions", json!({"model": "tiny-tools", "messages": msgs, "tools": bad})).await;
    assert_eq!(r.status, axum::http::StatusCode::BAD_REQUEST);
    assert!(r.error().contains("tools[0].function.parameters.type"), "{}", r.error());
}
