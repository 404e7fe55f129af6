//! Images through both dialects on the tiny transformers-made Qwen2-VL (tests/fixtures/
//! qwen2_vl_tiny) with a byte-level test tokenizer whose vision tokens sit at the checkpoint's
//! ids: requests with images answer, bad images are 400s that say what is wrong, the same image
//! again skips the vision tower, and a client that hangs up stops the tower.

use std::io::Cursor;

use axum::http::StatusCode;
use base64::Engine as _;
use serde_json::{json, Value};

use super::tests::{post, state_from, TestSource, SLOW_VL, TINY, TINY_VL};
use super::ServeConfig;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A `w`×`h` RGB gradient as PNG.
fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, ((x + y) * 3) as u8]));
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A well-formed PNG of a few dozen bytes whose header claims `w`×`h`: 16 zero bytes of image
/// data (a stored zlib block), then the end chunk. Decoding it would allocate `w·h·3` bytes.
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let chunk = |out: &mut Vec<u8>, kind: &[u8], data: &[u8]| {
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend((data.len() as u32).to_be_bytes());
        out.extend(&body);
        out.extend(crc32(&body).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    // zlib: header, one final stored block of 16 zeros, Adler-32 of 16 zeros (= 0x00100001).
    let mut idat = vec![0x78, 0x01, 0x01, 16, 0, !16u8, 0xff];
    idat.extend([0u8; 16]);
    idat.extend([0x00, 0x10, 0x00, 0x01]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &idat);
    chunk(&mut out, b"IEND", &[]);
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

fn state() -> super::Shared {
    state_from(ServeConfig::default(), &[TINY, TINY_VL], TestSource::new(1))
}

#[tokio::test]
async fn image_requests_answer_in_both_dialects() {
    let st = state();
    let image = b64(&png(56, 84));
    let greedy = json!({"temperature": 0, "num_predict": 4});
    let v = post(
        &st,
        "/api/chat",
        json!({"model": "tiny-vl", "stream": false, "options": greedy,
               "messages": [{"role": "user", "content": "what is this?", "images": [image]}]}),
    )
    .await
    .json();
    assert_eq!(v["done"], true, "{v}");
    // 56×84 → a 4×6 patch grid → 6 image tokens, on top of the text.
    let with_image = v["prompt_eval_count"].as_u64().unwrap();
    let text_only = post(
        &st,
        "/api/chat",
        json!({"model": "tiny-vl", "stream": false, "options": greedy,
               "messages": [{"role": "user", "content": "what is this?"}]}),
    )
    .await
    .json()["prompt_eval_count"]
        .as_u64()
        .unwrap();
    assert_eq!(with_image, text_only + 1 + 6 + 1, "vision_start, 6 pads, vision_end: {v}");
    let answer = v["message"]["content"].as_str().unwrap().to_owned();

    // OpenAI: the same image as a data URL content part gives the same greedy answer.
    let v = post(
        &st,
        "/v1/chat/completions",
        json!({"model": "tiny-vl", "temperature": 0, "max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{image}")}}
        ]}]}),
    )
    .await
    .json();
    assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
    assert_eq!(v["usage"]["prompt_tokens"].as_u64(), Some(with_image), "{v}");
    // Text before the image here, after it in the Ollama message: the prompts differ, the count
    // does not. /api/generate puts the image before the prompt like /api/chat.
    let g = post(
        &st,
        "/api/generate",
        json!({"model": "tiny-vl", "prompt": "what is this?", "images": [image], "stream": false, "options": greedy}),
    )
    .await
    .json();
    assert_eq!((g["response"].as_str(), g["prompt_eval_count"].as_u64()), (Some(answer.as_str()), Some(with_image)));
}

#[tokio::test]
async fn the_same_image_again_skips_the_tower() {
    let st = state();
    let ask = |images: Vec<String>| {
        json!({"model": "tiny-vl", "stream": false, "options": {"temperature": 0, "num_predict": 3},
               "messages": [{"role": "user", "content": "what is this?", "images": images}]})
    };
    let image = b64(&png(56, 84));
    let first = post(&st, "/api/chat", ask(vec![image.clone()])).await.json();
    let handle = st.engines.handle("tiny-vl").expect("loaded");
    let vision = handle.vision.as_ref().expect("a vision model");
    let (_, entries, hits, misses) = vision.cache_stats();
    assert_eq!((entries, hits, misses), (1, 0, 1));

    // The next turn of the conversation resends the image: same answer, no tower run.
    let again = post(&st, "/api/chat", ask(vec![image.clone()])).await.json();
    assert_eq!(again["message"], first["message"]);
    let (_, entries, hits, misses) = vision.cache_stats();
    assert_eq!((entries, hits, misses), (1, 1, 1));

    // Another image is another entry.
    post(&st, "/api/chat", ask(vec![b64(&png(84, 56)), image.clone()])).await.json();
    let (_, entries, hits, misses) = vision.cache_stats();
    assert_eq!((entries, hits, misses), (2, 2, 2));

    // /metrics shows the same counts for the vision model, and no vision series for the text one.
    let text = json!({"model": "tiny", "stream": false, "options": {"num_predict": 1},
                      "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(post(&st, "/api/chat", text).await.json()["done"], true);
    let metrics = super::metrics::render(&st);
    for line in [
        "zoe_vision_cache_hits_total{model_name=\"tiny-vl\"} 2",
        "zoe_vision_cache_misses_total{model_name=\"tiny-vl\"} 2",
        "zoe_vision_cache_entries{model_name=\"tiny-vl\"} 2",
        "zoe_vision_encoding{model_name=\"tiny-vl\"} 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} missing from:\n{metrics}");
    }
    let bytes = metrics.lines().find_map(|l| l.strip_prefix("zoe_vision_cache_bytes{model_name=\"tiny-vl\"} "));
    assert!(bytes.is_some_and(|b| b.parse::<u64>().unwrap() > 0), "{metrics}");
    assert!(metrics.contains("zoe_engine_alive{model_name=\"tiny\"} 1"), "{metrics}");
    assert!(!metrics.contains("zoe_vision_cache_hits_total{model_name=\"tiny\"}"), "{metrics}");
}

#[tokio::test]
async fn a_request_sets_its_own_pixel_budget() {
    let st = state();
    let image = b64(&png(224, 224)); // 16×16 patches: 64 image tokens at the model's budget
    let ollama = |options: Value| json!({"model": "tiny-vl", "prompt": "x", "images": [image], "stream": false, "options": options});
    let openai = |kwargs: Option<Value>| {
        let mut body = json!({"model": "tiny-vl", "max_tokens": 1, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{image}")}}]}]});
        if let Some(k) = kwargs {
            body["mm_processor_kwargs"] = k;
        }
        body
    };
    let tokens = |v: &Value| v["prompt_eval_count"].as_u64().or(v["usage"]["prompt_tokens"].as_u64()).unwrap();

    let full = post(&st, "/api/generate", ollama(json!({"num_predict": 1}))).await.json();
    // max_pixels 3136 = 56×56: a 4×4 patch grid, 4 image tokens instead of 64.
    let small = post(&st, "/api/generate", ollama(json!({"num_predict": 1, "max_pixels": 3136}))).await.json();
    assert_eq!(tokens(&full) - tokens(&small), 60, "{full}\n{small}");
    // min_pixels enlarges: 448×448 = 1024 patches, 256 tokens.
    let large = post(&st, "/api/generate", ollama(json!({"num_predict": 1, "min_pixels": 448 * 448}))).await.json();
    assert_eq!(tokens(&large) - tokens(&full), 192, "{large}");
    let full = post(&st, "/v1/chat/completions", openai(None)).await.json();
    let small = post(&st, "/v1/chat/completions", openai(Some(json!({"max_pixels": 3136})))).await.json();
    assert_eq!(tokens(&full) - tokens(&small), 60, "{full}\n{small}");
    // Each size is its own tower output: the cache holds three.
    let vision = st.engines.handle("tiny-vl").unwrap().vision.clone().unwrap();
    assert_eq!(vision.cache_stats().1, 3);

    let refused: [(&str, Value, &str); 6] = [
        ("/api/generate", ollama(json!({"max_pixels": 100})), "options.max_pixels = 100 is less than 784 pixels"),
        (
            "/api/generate",
            ollama(json!({"max_pixels": 99_999_999})),
            "options.max_pixels = 99999999 is more than the model's max_pixels of 12845056",
        ),
        (
            "/api/generate",
            ollama(json!({"min_pixels": 10_000, "max_pixels": 5_000})),
            "min_pixels 10000 is more than max_pixels 5000",
        ),
        (
            "/v1/chat/completions",
            openai(Some(json!({"fps": 2}))),
            "mm_processor_kwargs.fps is not supported: mm_processor_kwargs takes min_pixels and max_pixels",
        ),
        (
            "/v1/chat/completions",
            openai(Some(json!({"max_pixels": "big"}))),
            "mm_processor_kwargs.max_pixels must be an integer",
        ),
        (
            "/v1/chat/completions",
            openai(Some(json!({"min_pixels": 10}))),
            "mm_processor_kwargs.min_pixels = 10 is less than",
        ),
    ];
    for (path, body, want) in refused {
        let r = post(&st, path, body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {}", r.text());
        assert!(r.error().contains(want), "{path}: {:?} lacks {want:?}", r.error());
    }
}

/// A client that hangs up while its image is in the vision tower stops the tower at its next
/// block: the request's future is dropped, and the run is abandoned (nothing is cached, where a
/// finished run would have been).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_up_while_the_tower_runs_stops_it() {
    use tokio::io::AsyncWriteExt;
    let st = state_from(ServeConfig::default(), &[TINY, SLOW_VL], TestSource::new(1));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = super::router(st.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let body = json!({"model": "slow-vl", "prompt": "what is this?", "images": [b64(&png(448, 448))], "stream": false})
        .to_string();
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST /api/generate HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(request.as_bytes()).await.unwrap();

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let vision = loop {
        if let Some(v) = st.engines.handle("slow-vl").and_then(|h| h.vision.clone()) {
            if v.encoding() == 1 {
                break v;
            }
        }
        assert!(std::time::Instant::now() < deadline, "the tower never started");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    drop(conn);
    while vision.encoding() > 0 {
        assert!(std::time::Instant::now() < deadline, "the tower is still running 30 s after the hang-up");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let (_, entries, _, _) = vision.cache_stats();
    assert_eq!(entries, 0, "the tower ran to the end for a client that had gone");
    server.abort();
}

#[tokio::test]
async fn bad_images_are_400s_that_say_what_is_wrong() {
    let st = state();
    let good = png(56, 84);
    let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec();
    let cases: Vec<(String, &str)> = vec![
        (b64(&good[..good.len() / 2]), "images[0]"),
        (b64(&png_claiming(0, 0)), "images[0]"),
        (b64(&png_claiming(30000, 30000)), "30000x30000 = 900000000 pixels, more than the limit"),
        ("not base64!".into(), "not valid base64"),
        (b64(&gif), "GIF"),
        (b64(&[]), "images[0]"),
    ];
    for (img, want) in cases {
        for path in ["/api/generate", "/v1/chat/completions"] {
            let body = if path == "/api/generate" {
                json!({"model": "tiny-vl", "prompt": "x", "images": [img], "stream": false})
            } else {
                json!({"model": "tiny-vl", "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{img}")}}]}]})
            };
            let r = post(&st, path, body).await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {}", r.text());
            let e = r.error();
            eprintln!("{path}: {e}");
            let want = if path != "/api/generate" && want == "images[0]" { "image_url" } else { want };
            assert!(e.contains(want), "{path}: {e:?} lacks {want:?}");
        }
    }
    // A text model refuses images outright; a raw prompt cannot place them.
    let r = post(&st, "/api/generate", json!({"model": "tiny", "prompt": "x", "images": [b64(&good)]})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.error().contains("does not support vision"), "{}", r.error());
    let r = post(&st, "/api/generate", json!({"model": "tiny-vl", "prompt": "x", "raw": true, "images": [b64(&good)]}))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.error().contains("chat template"), "{}", r.error());
    // Too many images, and images that do not fit the context, are refused before the tower runs.
    let nine: Vec<String> = (0..9).map(|_| b64(&good)).collect();
    let r = post(&st, "/api/generate", json!({"model": "tiny-vl", "prompt": "x", "images": nine})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.error().contains("9 images in one request: at most 8"), "{}", r.error());
    let big = b64(&png(1400, 1400)); // 2500 image tokens > the 512-token context
    let r = post(&st, "/api/generate", json!({"model": "tiny-vl", "prompt": "x", "images": [big]})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.error().contains("but the context is 512"), "{}", r.error());
    // The model still answers afterwards.
    let v: Value = post(
        &st,
        "/api/generate",
        json!({"model": "tiny-vl", "prompt": "x", "images": [b64(&good)],
        "stream": false, "options": {"num_predict": 2}}),
    )
    .await
    .json();
    assert_eq!(v["done"], true, "{v}");
}

/// Serves `png` at /img.png, 404 elsewhere, and 21 MiB at /big, on a local port; returns the
/// base URL. One thread, one connection at a time, for the test's few requests.
fn image_server(png: Vec<u8>) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut line = String::new();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            reader.read_line(&mut line).unwrap();
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap() == 0 || h == "\r\n" {
                    break;
                }
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
            let (status, body) = match path.as_str() {
                "/img.png" => ("200 OK", png.clone()),
                "/big" => ("200 OK", vec![0u8; 21 << 20]),
                _ => ("404 Not Found", Vec::new()),
            };
            let head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn image_urls_are_fetched_only_when_enabled_and_within_limits() {
    let base = image_server(png(56, 84));
    let body = |url: String| {
        json!({"model": "tiny-vl", "max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": url}}]}]})
    };
    // Off by default.
    let r = post(&state(), "/v1/chat/completions", body(format!("{base}/img.png"))).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.error().contains("enable image_url_fetch"), "{}", r.error());

    let config = ServeConfig { image_url_fetch: true, ..ServeConfig::default() };
    let st = state_from(config, &[TINY, TINY_VL], TestSource::new(1));
    let v = post(&st, "/v1/chat/completions", body(format!("{base}/img.png"))).await.json();
    let data_url = format!("data:image/png;base64,{}", b64(&png(56, 84)));
    let same = post(&st, "/v1/chat/completions", body(data_url)).await.json();
    assert_eq!(v["usage"]["prompt_tokens"], same["usage"]["prompt_tokens"], "{v}");
    for (path, want) in [("/missing.png", "HTTP 404"), ("/big", "larger than 20971520 bytes")] {
        let r = post(&st, "/v1/chat/completions", body(format!("{base}{path}"))).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}");
        assert!(r.error().contains(want) && r.error().contains("image_url"), "{path}: {}", r.error());
    }
    // A text model refuses before fetching anything.
    let r = post(
        &st,
        "/v1/chat/completions",
        json!({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": format!("{base}/img.png")}}]}]}),
    )
    .await;
    assert!(r.error().contains("does not support vision"), "{}", r.error());
}
