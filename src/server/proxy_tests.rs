//! The provider chain over real HTTP: an upstream zoe-llm (the tiny model, served on a loopback
//! port) behind a front with no engines of its own or with a local fallback; a fake upstream
//! that dies mid-stream.

use std::sync::Arc;

use serde_json::{json, Value};

use super::tests::{get, ndjson, post, sse, state, state_with, Reply, GREEDY};
use super::{AppState, ServeConfig, Shared};
use crate::provider::{Providers, RouteConfig, UpstreamConfig, UpstreamKind};

/// Serves `st` on a free loopback port until the task is aborted.
async fn serve_upstream(st: Shared) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        axum::serve(listener, super::router(st)).await.unwrap();
    });
    (url, task)
}

fn upstream(name: &str, kind: UpstreamKind, url: &str) -> UpstreamConfig {
    let mut c = UpstreamConfig::new(name, kind, url);
    c.connect_timeout = std::time::Duration::from_millis(500);
    c.first_token_timeout = std::time::Duration::from_secs(20);
    c.idle_timeout = std::time::Duration::from_secs(5);
    c.retries = 1;
    c.breaker_failures = 2;
    c
}

/// A front over the test registry with `providers` instead of local-only.
fn front(local: bool, ups: &[UpstreamConfig], routes: &[RouteConfig]) -> Shared {
    let st = state_with(ServeConfig::default());
    let st = Arc::try_unwrap(st).ok().expect("fresh state");
    Arc::new(AppState { providers: Providers::new(local, ups, routes), ..st })
}

fn provider(r: &Reply) -> &str {
    r.headers.get("x-zoe-provider").map_or("", |v| v.to_str().unwrap())
}

fn chat_body(stream: bool) -> Value {
    json!({ "model": "tiny", "messages": [{ "role": "user", "content": "hello" }], "stream": stream, "options": GREEDY(6) })
}

#[tokio::test]
async fn ollama_requests_pass_through_with_streaming_intact() {
    let direct_state = state();
    let (url, _task) = serve_upstream(direct_state.clone()).await;
    let pi = front(false, &[upstream("pi", UpstreamKind::Ollama, &url)], &[]);
    let direct = post(&state(), "/api/chat", chat_body(true)).await;
    let via = post(&pi, "/api/chat", chat_body(true)).await;
    assert_eq!(via.status, 200, "{}", via.text());
    assert_eq!(provider(&via), "pi");
    let (d, v) = (ndjson(&direct), ndjson(&via));
    assert_eq!(d.len(), v.len(), "one line per upstream line");
    let content =
        |ls: &[Value]| ls.iter().map(|l| l["message"]["content"].as_str().unwrap().to_owned()).collect::<Vec<_>>();
    assert_eq!(content(&d), content(&v));
    assert_eq!(v.last().unwrap()["eval_count"], 6);
    // Not streamed, and /api/generate, and /api/show.
    let whole = post(&pi, "/api/chat", chat_body(false)).await.json();
    assert_eq!(whole["message"]["content"].as_str().unwrap(), content(&d).concat());
    let g =
        post(&pi, "/api/generate", json!({ "model": "tiny", "prompt": "hi", "stream": false, "options": GREEDY(3) }))
            .await;
    assert_eq!((g.status.as_u16(), g.json()["eval_count"].clone()), (200, json!(3)));
    assert_eq!(post(&pi, "/api/show", json!({ "model": "tiny" })).await.status, 200);
    // Listings: the upstream's models (the front has none of its own), in each dialect.
    let up_tags = get(&direct_state, "/api/tags").await.json()["models"].clone();
    assert!(!up_tags.as_array().unwrap().is_empty());
    assert_eq!(get(&pi, "/api/tags").await.json()["models"], up_tags);
    let ps_names = |v: Value| v["models"].as_array().unwrap().iter().map(|m| m["name"].clone()).collect::<Vec<_>>();
    let up_ps = ps_names(get(&direct_state, "/api/ps").await.json());
    assert!(!up_ps.is_empty());
    assert_eq!(ps_names(get(&pi, "/api/ps").await.json()), up_ps);
    let name = up_tags[0]["name"].as_str().unwrap().to_owned();
    let cards = get(&pi, "/v1/models").await.json();
    assert_eq!(cards["data"][0]["id"], name.as_str());
    assert_eq!(cards["data"][0]["owned_by"], "pi");
    assert_eq!(get(&pi, &format!("/v1/models/{name}")).await.json()["id"], name.as_str());
    assert_eq!(get(&pi, "/v1/models/nope").await.status, 404);
    // The upstream's client errors come back as they are.
    let bad =
        post(&pi, "/api/chat", json!({ "model": "tiny", "messages": [{ "role": "wizard", "content": "x" }] })).await;
    assert_eq!(bad.status, 400);
    assert!(bad.error().contains("messages[0].role"), "{}", bad.text());
    // A name the upstream lacks: its 404, with why.
    let missing = post(&pi, "/api/chat", json!({ "model": "nope", "messages": [] })).await;
    assert_eq!(missing.status, 404, "{}", missing.text());
    assert!(missing.error().contains("nope"), "{}", missing.text());
}

#[tokio::test]
async fn openai_requests_are_translated_for_an_ollama_upstream() {
    let (url, _task) = serve_upstream(state()).await;
    let pi = front(false, &[upstream("pi", UpstreamKind::Ollama, &url)], &[]);
    let want =
        post(&state(), "/api/chat", chat_body(false)).await.json()["message"]["content"].as_str().unwrap().to_owned();
    let body = |stream: bool| {
        json!({ "model": "tiny", "messages": [{ "role": "user", "content": "hello" }], "stream": stream,
                "temperature": 0, "max_tokens": 6, "stream_options": if stream { json!({ "include_usage": true }) } else { Value::Null } })
    };
    let r = post(&pi, "/v1/chat/completions", body(false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], want.as_str());
    assert_eq!(v["usage"]["completion_tokens"], 6);
    let s = post(&pi, "/v1/chat/completions", body(true)).await;
    let events = sse(&s);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, want);
    assert_eq!(chunks[chunks.len() - 2]["choices"][0]["finish_reason"], "length");
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 6);
    // Completions and embeddings too.
    let c = post(&pi, "/v1/completions", json!({ "model": "tiny", "prompt": "hi", "max_tokens": 3, "temperature": 0 }))
        .await;
    assert_eq!((c.status.as_u16(), c.json()["usage"]["completion_tokens"].clone()), (200, json!(3)), "{}", c.text());
    let e = post(&pi, "/v1/embeddings", json!({ "model": "tiny", "input": ["a", "b"] })).await;
    assert_eq!(e.status, 200, "{}", e.text());
    assert_eq!(e.json()["data"].as_array().unwrap().len(), 2);
    // What the translation cannot carry is a 400 naming the field, before anything is sent.
    let n2 = post(&pi, "/v1/chat/completions", json!({ "model": "tiny", "n": 2, "messages": [] })).await;
    assert_eq!((n2.status.as_u16(), n2.json()["error"]["param"].clone()), (400, json!("n")));
}

#[tokio::test]
async fn ollama_requests_are_translated_for_an_openai_upstream() {
    let (url, _task) = serve_upstream(state()).await;
    let vllm = front(false, &[upstream("vllm", UpstreamKind::Openai, &format!("{url}/v1"))], &[]);
    let want =
        post(&state(), "/api/chat", chat_body(false)).await.json()["message"]["content"].as_str().unwrap().to_owned();
    let v = post(&vllm, "/api/chat", chat_body(false)).await;
    assert_eq!(v.status, 200, "{}", v.text());
    assert_eq!(v.json()["message"]["content"], want.as_str());
    let lines = ndjson(&post(&vllm, "/api/chat", chat_body(true)).await);
    let text: String = lines.iter().filter_map(|l| l["message"]["content"].as_str()).collect();
    assert_eq!(text, want);
    let last = lines.last().unwrap();
    assert_eq!(
        (last["done"].clone(), last["done_reason"].clone(), last["eval_count"].clone()),
        (json!(true), json!("length"), json!(6))
    );
    // OpenAI clients pass straight through.
    let o = post(&vllm, "/v1/chat/completions", json!({ "model": "tiny", "messages": [{ "role": "user", "content": "hello" }], "temperature": 0, "max_tokens": 6 })).await;
    assert_eq!(o.json()["choices"][0]["message"]["content"], want.as_str());
}

#[tokio::test]
async fn a_down_upstream_opens_its_breaker_and_the_fallback_serves() {
    // A port nothing listens on (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let route =
        RouteConfig { model: "tiny".into(), providers: vec!["pi".into(), "local".into()], upstream_model: None };
    let st = front(true, &[upstream("pi", UpstreamKind::Ollama, &url)], &[route]);
    let r = post(&st, "/api/chat", chat_body(false)).await;
    assert_eq!((r.status.as_u16(), provider(&r)), (200, "local"), "{}", r.text());
    // Two failed attempts (a try and its retry) opened the breaker: /health says so.
    let h = get(&st, "/health").await;
    assert_eq!(h.status, 200);
    let hv = h.json();
    assert_eq!(hv["status"], "degraded");
    assert_eq!(hv["providers"][0]["breaker"], "open", "{hv}");
    assert!(hv["providers"][0]["last_error"].as_str().unwrap().contains("error sending request"), "{hv}");
    let m = get(&st, "/metrics").await.text();
    assert!(m.contains("zoe_upstream_up{upstream=\"pi\"} 0"), "{m}");
    // While open, requests go straight to the fallback without trying the upstream.
    let up = st.providers.upstream("pi").unwrap().clone();
    let failures = up.failures.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(provider(&post(&st, "/api/chat", chat_body(false)).await), "local");
    assert_eq!(up.failures.load(std::sync::atomic::Ordering::Relaxed), failures);
    assert_eq!(up.skipped.load(std::sync::atomic::Ordering::Relaxed), 1);
    // The upstream comes back on that port; the next probe closes the breaker.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let upstream_state = state();
    let _task = tokio::spawn(async move { axum::serve(listener, super::router(upstream_state)).await.unwrap() });
    up.probe().await.unwrap();
    assert_eq!(get(&st, "/health").await.json()["providers"][0]["breaker"], "closed");
    let back = post(&st, "/api/chat", chat_body(false)).await;
    assert_eq!((back.status.as_u16(), provider(&back)), (200, "pi"), "{}", back.text());
}

#[tokio::test]
async fn nothing_to_serve_is_404_or_503_with_the_reason() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut only_llava = upstream("vision", UpstreamKind::Ollama, &format!("http://127.0.0.1:{port}"));
    only_llava.models = vec!["llava*".into()];
    let st = front(false, &[only_llava], &[]);
    let r = post(&st, "/api/chat", chat_body(false)).await;
    assert_eq!(r.status, 404);
    assert!(r.error().contains("no provider serves it"), "{}", r.text());
    let o = post(&st, "/v1/chat/completions", json!({ "model": "tiny", "messages": [] })).await;
    assert_eq!(o.status, 404);
    // The one provider is down: 503 naming it and why, quickly (connection refused).
    let t = std::time::Instant::now();
    let down =
        post(&st, "/api/chat", json!({ "model": "llava:7b", "messages": [{ "role": "user", "content": "x" }] })).await;
    assert_eq!(down.status, 503, "{}", down.text());
    assert!(down.error().contains("vision: ") && down.error().contains("llava:7b"), "{}", down.text());
    assert!(t.elapsed() < std::time::Duration::from_secs(10));
    // Without local engines and with every upstream down, /health is 503.
    let _ = post(&st, "/api/chat", json!({ "model": "llava:7b", "messages": [] })).await;
    let h = get(&st, "/health").await;
    assert_eq!(h.status, 503, "{}", h.text());
}

/// An upstream that sends the headers and `lines`, then drops the connection mid-body.
async fn dying_upstream(lines: Vec<String>, sse: bool) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let lines = lines.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let _ = sock.read(&mut buf).await;
                let ct = if sse { "text/event-stream" } else { "application/x-ndjson" };
                let head = format!("HTTP/1.1 200 OK\r\ncontent-type: {ct}\r\ntransfer-encoding: chunked\r\n\r\n");
                let _ = sock.write_all(head.as_bytes()).await;
                for l in lines {
                    let _ = sock.write_all(format!("{:x}\r\n{l}\r\n", l.len()).as_bytes()).await;
                    let _ = sock.flush().await;
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                // Killed: no final chunk, the socket just closes.
            });
        }
    });
    url
}

#[tokio::test]
async fn an_upstream_killed_mid_stream_ends_the_stream_with_an_error() {
    let line = |t: &str| {
        format!("{}\n", json!({ "model": "tiny", "message": { "role": "assistant", "content": t }, "done": false }))
    };
    let url = dying_upstream(vec![line("Hel"), line("lo")], false).await;
    let st = front(false, &[upstream("pi", UpstreamKind::Ollama, &url)], &[]);
    // Ollama client: the two lines as sent, then an error line.
    let r = post(&st, "/api/chat", chat_body(true)).await;
    let ls = ndjson(&r);
    assert_eq!(ls.len(), 3, "{}", r.text());
    assert_eq!(ls[1]["message"]["content"], "lo");
    assert!(ls[2]["error"].as_str().unwrap().starts_with("upstream pi: the stream broke off"), "{}", r.text());
    // OpenAI client (translated): the content, an error event, [DONE].
    let s = post(
        &st,
        "/v1/chat/completions",
        json!({ "model": "tiny", "messages": [{ "role": "user", "content": "x" }], "stream": true }),
    )
    .await;
    let events = sse(&s);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let err: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert!(err["error"]["message"].as_str().unwrap().contains("broke off"), "{}", s.text());
    let text: String = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(text, "Hello");
    // An OpenAI upstream dying mid-SSE, behind an Ollama client.
    let chunk = |t: &str| {
        format!(
            "data: {}\n\n",
            json!({ "choices": [{ "index": 0, "delta": { "content": t }, "finish_reason": null }] })
        )
    };
    let url = dying_upstream(vec![chunk("Hi")], true).await;
    let st = front(false, &[upstream("vllm", UpstreamKind::Openai, &url)], &[]);
    let r = post(&st, "/api/chat", chat_body(true)).await;
    let ls = ndjson(&r);
    assert_eq!(ls[0]["message"]["content"], "Hi");
    assert!(ls.last().unwrap()["error"].as_str().unwrap().contains("upstream vllm"), "{}", r.text());
}

#[tokio::test]
async fn a_local_model_that_cannot_serve_falls_back_to_an_upstream_under_another_name() {
    // "absent" is known here but not pulled (local 404); the route sends it up as "tiny" and
    // the answer comes back under the client's name, streamed or not.
    let (url, _task) = serve_upstream(state()).await;
    let route = RouteConfig {
        model: "absent".into(),
        providers: vec!["local".into(), "pi".into()],
        upstream_model: Some("tiny".into()),
    };
    let st = front(true, &[upstream("pi", UpstreamKind::Ollama, &url)], &[route]);
    let body = |stream: bool| json!({ "model": "absent", "messages": [{ "role": "user", "content": "hello" }], "stream": stream, "options": GREEDY(4) });
    let r = post(&st, "/api/chat", body(false)).await;
    assert_eq!((r.status.as_u16(), provider(&r)), (200, "pi"), "{}", r.text());
    assert_eq!(r.json()["model"], "absent");
    let lines = ndjson(&post(&st, "/api/chat", body(true)).await);
    assert!(lines.iter().all(|l| l["model"] == "absent"), "{lines:?}");
    assert_eq!(lines.last().unwrap()["eval_count"], 4);
    let o = post(&st, "/v1/chat/completions", json!({ "model": "absent", "messages": [{ "role": "user", "content": "hello" }], "max_tokens": 4, "stream": true })).await;
    let chunks: Vec<Value> = sse(&o).iter().filter_map(|e| serde_json::from_str(e).ok()).collect();
    assert!(!chunks.is_empty() && chunks.iter().all(|c| c["model"] == "absent"), "{}", o.text());
    // A model this machine serves never leaves it.
    let local = post(&st, "/api/chat", chat_body(false)).await;
    assert_eq!(provider(&local), "local");
    // Logprobs do not survive translation: a 400 rather than silently none.
    let lp = post(
        &st,
        "/v1/chat/completions",
        json!({ "model": "absent", "messages": [{ "role": "user", "content": "x" }], "logprobs": true }),
    )
    .await;
    assert_eq!((lp.status.as_u16(), lp.json()["error"]["param"].clone()), (400, json!("logprobs")));
}

/// An upstream that accepts and then sends `head` (maybe nothing) and never anything more.
async fn stalling_upstream(head: &'static str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let _ = sock.read(&mut buf).await;
                let _ = sock.write_all(head.as_bytes()).await;
                // Holds the connection open, silent.
                tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
                drop(sock);
            });
        }
    });
    url
}

#[tokio::test]
async fn a_silent_upstream_times_out_before_and_after_the_first_token() {
    let ms = std::time::Duration::from_millis;
    // Never answers: each try waits first_token_timeout, then the chain is exhausted: 503.
    let url = stalling_upstream("").await;
    let mut up = upstream("pi", UpstreamKind::Ollama, &url);
    (up.first_token_timeout, up.retries) = (ms(300), 1);
    let st = front(false, &[up], &[]);
    let r = post(&st, "/api/chat", chat_body(false)).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.error().contains("no answer within 300ms"), "{}", r.text());
    // Answers one line, then nothing: idle_timeout ends the stream with an error line.
    let line =
        json!({ "model": "tiny", "message": { "role": "assistant", "content": "Hi" }, "done": false }).to_string();
    let head: &'static str = Box::leak(
        format!("HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{line}\n\r\n", line.len() + 1)
            .into_boxed_str(),
    );
    let url = stalling_upstream(head).await;
    let mut up = upstream("pi", UpstreamKind::Ollama, &url);
    up.idle_timeout = ms(300);
    let st = front(false, &[up], &[]);
    let ls = ndjson(&post(&st, "/api/chat", chat_body(true)).await);
    assert_eq!(ls.len(), 2, "{ls:?}");
    assert_eq!(ls[0]["message"]["content"], "Hi");
    assert!(ls[1]["error"].as_str().unwrap().contains("the stream stalled"), "{ls:?}");
}

#[tokio::test]
async fn a_local_model_that_fails_to_load_falls_back_to_the_upstream() {
    // The vision case: the local model cannot come up (503), the chain's upstream serves.
    let (url, _task) = serve_upstream(state()).await;
    let source = super::tests::TestSource { fail_from: 1, ..super::tests::TestSource::new(1234) };
    let st = super::tests::state_from(ServeConfig::default(), &[super::tests::TINY], source);
    let st = Arc::try_unwrap(st).ok().expect("fresh state");
    let route =
        RouteConfig { model: "tiny".into(), providers: vec!["local".into(), "pi".into()], upstream_model: None };
    let st = Arc::new(AppState {
        providers: Providers::new(true, &[upstream("pi", UpstreamKind::Ollama, &url)], &[route]),
        ..st
    });
    let r = post(&st, "/api/chat", chat_body(false)).await;
    assert_eq!((r.status.as_u16(), provider(&r)), (200, "pi"), "{}", r.text());
    // Without the upstream in its chain, the local failure is the answer.
    let alone = Arc::try_unwrap(super::tests::state_from(
        ServeConfig::default(),
        &[super::tests::TINY],
        super::tests::TestSource { fail_from: 1, ..super::tests::TestSource::new(1234) },
    ))
    .ok()
    .unwrap();
    let alone = Arc::new(alone);
    let r = post(&alone, "/api/chat", chat_body(false)).await;
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(r.error().contains("refuses load"), "{}", r.text());
}
