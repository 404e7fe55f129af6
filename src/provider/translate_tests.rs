//! Translation both ways, readers and writers, framing (tests of `translate.rs`).

use super::*;

#[test]
fn openai_chat_request_to_ollama() {
    let req = json!({
        "model": "x", "stream": true, "temperature": 0.2, "max_tokens": 9, "stop": "END", "seed": 3,
        "response_format": { "type": "json_object" }, "mm_processor_kwargs": { "max_pixels": 200704 },
        "messages": [
            { "role": "developer", "content": "be brief" },
            { "role": "user", "content": [ { "type": "text", "text": "what is this?" },
                { "type": "image_url", "image_url": { "url": "data:image/png;base64,iVBORw0" } } ] },
            { "role": "assistant", "content": null, "tool_calls": [ { "id": "c1", "type": "function",
                "function": { "name": "get_weather", "arguments": "{\"city\":\"Paris\"}" } } ] },
            { "role": "tool", "tool_call_id": "c1", "content": "sunny" },
        ],
        "tools": [ { "type": "function", "function": { "name": "get_weather", "parameters": {} } } ],
    });
    let out = openai_chat_to_ollama(&req, "llava:7b").unwrap();
    assert_eq!(out["model"], "llava:7b");
    assert_eq!(out["stream"], true);
    assert_eq!(out["format"], "json");
    assert_eq!(
        out["options"],
        json!({ "temperature": 0.2, "seed": 3, "num_predict": 9, "stop": ["END"], "max_pixels": 200704 })
    );
    assert_eq!(out["messages"][0], json!({ "role": "system", "content": "be brief" }));
    assert_eq!(out["messages"][1], json!({ "role": "user", "content": "what is this?", "images": ["iVBORw0"] }));
    assert_eq!(out["messages"][2]["tool_calls"][0]["function"]["arguments"], json!({ "city": "Paris" }));
    assert_eq!(out["messages"][3]["tool_name"], "get_weather");
    assert_eq!(out["tools"], req["tools"]);
    let url = json!({ "messages": [ { "role": "user", "content": [ { "type": "image_url", "image_url": { "url": "https://x/y.png" } } ] } ] });
    assert_eq!(openai_chat_to_ollama(&url, "m").unwrap_err().field, "messages[0].content[0].image_url");
    assert_eq!(openai_chat_to_ollama(&json!({ "n": 2, "messages": [] }), "m").unwrap_err().field, "n");
    // Completions keep OpenAI's default of 16 tokens.
    let c = openai_completion_to_ollama(&json!({ "prompt": ["hi"] }), "m").unwrap();
    assert_eq!(
        (c["prompt"].clone(), c["options"]["num_predict"].clone(), c["stream"].clone()),
        (json!("hi"), json!(16), json!(false))
    );
}

#[test]
fn ollama_chat_request_to_openai() {
    let req = json!({
        "model": "x", "format": { "type": "object" },
        "options": { "num_predict": -1, "repeat_penalty": 1.1, "top_k": 5, "min_pixels": 3136 },
        "messages": [
            { "role": "user", "content": "look", "images": ["/9j/4AAQ"] },
            { "role": "assistant", "content": "", "tool_calls": [ { "function": { "name": "f", "arguments": { "a": 1 } } } ] },
            { "role": "tool", "tool_name": "f", "content": "42" },
        ],
    });
    let out = ollama_chat_to_openai(&req, "qwen").unwrap();
    assert_eq!(out["stream"], true, "Ollama streams by default");
    assert_eq!(out["stream_options"], json!({ "include_usage": true }));
    assert!(out.get("max_tokens").is_none());
    assert_eq!((out["repetition_penalty"].clone(), out["top_k"].clone()), (json!(1.1), json!(5)));
    assert_eq!(out["mm_processor_kwargs"], json!({ "min_pixels": 3136 }));
    assert_eq!(out["response_format"]["json_schema"]["schema"], json!({ "type": "object" }));
    assert_eq!(out["messages"][0]["content"][0]["image_url"]["url"], "data:image/jpeg;base64,/9j/4AAQ");
    assert_eq!(out["messages"][0]["content"][1], json!({ "type": "text", "text": "look" }));
    let call = &out["messages"][1]["tool_calls"][0];
    assert_eq!(call["function"]["arguments"], "{\"a\":1}");
    assert_eq!(out["messages"][2]["tool_call_id"], call["id"], "the result names its call");
    let (path, g) = ollama_generate_to_openai(&json!({ "prompt": "hi", "system": "s", "stream": false }), "m").unwrap();
    assert_eq!(path, "/v1/chat/completions");
    assert_eq!(g["messages"], json!([{ "role": "system", "content": "s" }, { "role": "user", "content": "hi" }]));
    assert_eq!(ollama_generate_to_openai(&json!({ "prompt": "hi", "raw": true }), "m").unwrap().0, "/v1/completions");
    assert_eq!(ollama_generate_to_openai(&json!({ "context": [1] }), "m").unwrap_err().field, "context");
}

fn stream_all(shape: Shape, steps: Vec<Step>) -> String {
    let mut w = Writer::new(shape, "front-name", true);
    let mut out = Vec::new();
    for s in steps {
        if w.stream(s, &mut out) {
            break;
        }
    }
    String::from_utf8(out).unwrap()
}

#[test]
fn ollama_stream_becomes_sse_and_back() {
    let lines = [
        json!({ "model": "up", "message": { "role": "assistant", "content": "Hel" }, "done": false }),
        json!({ "model": "up", "message": { "role": "assistant", "content": "lo" }, "done": false }),
        json!({ "model": "up", "message": { "role": "assistant", "content": "", "tool_calls": [ { "function": { "name": "f", "arguments": { "a": 1 } } } ] }, "done": false }),
        json!({ "model": "up", "message": { "role": "assistant", "content": "" }, "done": true, "done_reason": "stop", "prompt_eval_count": 7, "eval_count": 3 }),
    ];
    let steps: Vec<Step> = lines.iter().flat_map(read_ollama).collect();
    let sse_text = stream_all(Shape::OpenAiChat, steps.clone());
    let events: Vec<&str> = sse_text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 7, "{sse_text}");
    let ev = |i: usize| -> Value { serde_json::from_str(events[i].strip_prefix("data: ").unwrap()).unwrap() };
    assert_eq!(ev(0)["choices"][0]["delta"], json!({ "role": "assistant", "content": "" }));
    assert_eq!(ev(1)["choices"][0]["delta"]["content"], "Hel");
    assert_eq!(ev(1)["model"], "front-name");
    assert_eq!(
        ev(3)["choices"][0]["delta"]["tool_calls"][0]["function"],
        json!({ "name": "f", "arguments": "{\"a\":1}" })
    );
    assert_eq!(ev(4)["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(ev(5)["usage"], json!({ "prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10 }));
    assert_eq!(events[6], "data: [DONE]");
    // The SSE read back gives the same steps (call ids aside).
    let mut framer = Framer::default();
    let mut reader = OpenAiReader::default();
    let mut back = Vec::new();
    for data in framer.events(sse_text.as_bytes()) {
        if data == "[DONE]" {
            back.extend(reader.finish());
        } else {
            back.extend(reader.read(&serde_json::from_str(&data).unwrap()));
        }
    }
    assert_eq!(back.len(), steps.len());
    assert_eq!(&back[..2], &steps[..2]);
    assert!(matches!(&back[3], Step::Done { prompt_tokens: 7, completion_tokens: 3, .. }));
    // And as Ollama lines for an Ollama client.
    let nd = stream_all(Shape::OllamaChat, back);
    let ls: Vec<Value> = nd.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(ls[0]["message"]["content"], "Hel");
    assert_eq!(ls[2]["message"]["tool_calls"][0]["function"], json!({ "name": "f", "arguments": { "a": 1 } }));
    assert_eq!((ls[3]["done"].clone(), ls[3]["eval_count"].clone()), (json!(true), json!(3)));
}

#[test]
fn errors_and_whole_answers() {
    assert_eq!(read_ollama(&json!({ "error": "boom" })), [Step::Error("boom".into())]);
    let sse_text = stream_all(Shape::OpenAiChat, vec![Step::Text("a".into()), Step::Error("gone".into())]);
    assert!(sse_text.ends_with("data: [DONE]\n\n") && sse_text.contains("\"message\":\"gone\""), "{sse_text}");
    let nd = stream_all(Shape::OllamaGenerate, vec![Step::Text("a".into()), Step::Error("gone".into())]);
    assert_eq!(nd.lines().last().unwrap(), r#"{"error":"gone"}"#);
    let whole = json!({ "model": "up", "message": { "role": "assistant", "content": "hi" }, "done": true, "done_reason": "length", "prompt_eval_count": 2, "eval_count": 1 });
    let v = Writer::new(Shape::OpenAiChat, "m", false).whole(read_ollama(&whole)).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "hi");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["total_tokens"], 3);
    let completion = json!({ "choices": [ { "index": 0, "message": { "role": "assistant", "content": null,
        "tool_calls": [ { "id": "c", "type": "function", "function": { "name": "f", "arguments": "{}" } } ] }, "finish_reason": "tool_calls" } ],
        "usage": { "prompt_tokens": 4, "completion_tokens": 5 } });
    let mut r = OpenAiReader::default();
    let mut steps = r.read(&completion);
    steps.extend(r.finish());
    let v = Writer::new(Shape::OllamaChat, "m", false).whole(steps).unwrap();
    assert_eq!(v["message"]["tool_calls"][0]["function"], json!({ "name": "f", "arguments": {} }));
    assert_eq!((v["prompt_eval_count"].clone(), v["eval_count"].clone()), (json!(4), json!(5)));
}

#[test]
fn framing_survives_any_split() {
    let text = b"{\"a\":1}\n{\"b\":2}\r\n\n{\"c\":3}";
    for cut in 0..text.len() {
        let mut f = Framer::default();
        let mut got = f.lines(&text[..cut]);
        got.extend(f.lines(&text[cut..]));
        got.extend(f.rest());
        assert_eq!(got, [b"{\"a\":1}".to_vec(), b"{\"b\":2}".to_vec(), b"{\"c\":3}".to_vec()], "cut {cut}");
    }
    let mut f = Framer::default();
    assert_eq!(f.events(b"event: x\ndata: {\"x\":1}\n\ndata:[DONE]\n\n"), ["{\"x\":1}", "[DONE]"]);
}
