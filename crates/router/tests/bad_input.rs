//! Hostile and broken requests against the real router app (fake shards): wrong types, unknown and
//! duplicate fields, empty and oversized bodies, integers that overflow, non-finite floats, deep
//! nesting, bytes that are not UTF-8, wrong content types, unknown routes and methods, bodies cut off
//! mid-way. Each one must get a 4xx with an `error_type` within a client timeout (never a 5xx, a
//! panic or a hung connection), while a healthy stream and healthy requests running meanwhile are
//! served as if nothing happened. `http.rs` covers the ordinary validation messages; this file covers
//! what a fuzzer or a broken client sends.

mod common;

use std::time::Duration;

use common::{eventually, Deployment, Setup, SseReader};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every answer must come within this (a hung connection fails the test instead of hanging it).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);
/// `--body-limit-bytes` of the deployment under test.
const BODY_LIMIT: usize = 64 * 1024;

/// Sends `body` with `content_type` and returns (status, JSON body or Null).
async fn send(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    content_type: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> (u16, Value) {
    let mut request = http.request(method, url).body(body);
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{url}: no answer within {CLIENT_TIMEOUT:?}: {e}"));
    let status = response.status().as_u16();
    let bytes = response.bytes().await.expect("body");
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// Fails unless the answer is `status` with an `{"error", "error_type": error_type}` body.
fn assert_error(what: &str, got: &(u16, Value), status: u16, error_type: &str) {
    let (got_status, body) = got;
    assert!(
        (400..500).contains(got_status),
        "{what}: expected a 4xx, got {got_status} {body}"
    );
    assert_eq!(*got_status, status, "{what}: {body}");
    assert_eq!(body["error_type"], error_type, "{what}: {body}");
    assert!(
        body["error"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: no message: {body}"
    );
}

/// Request bodies (as raw bytes) that must be refused, with the expected status and a word of the
/// message. The same bodies go to `/generate`, `/generate_stream` and `/`.
fn generate_cases() -> Vec<(&'static str, Vec<u8>, u16, &'static str)> {
    let big = i64::MAX;
    let json_cases: Vec<(&'static str, Value, u16, &'static str)> = vec![
        // Wrong shapes and types.
        // A body is an object: serde would also read a struct from an array of its fields in order.
        ("array body", json!([]), 422, "expected a JSON object"),
        (
            "array of the fields",
            json!(["Hello", {"max_new_tokens": 2}]),
            422,
            "expected a JSON object",
        ),
        ("null body", json!(null), 422, "invalid type"),
        ("string body", json!("Hello"), 422, "invalid type"),
        ("number body", json!(42), 422, "invalid type"),
        ("empty object", json!({}), 422, "missing field `inputs`"),
        ("null inputs", json!({"inputs": null}), 422, "invalid type"),
        ("array inputs", json!({"inputs": ["Hello"]}), 422, "invalid type"),
        (
            "object inputs",
            json!({"inputs": {"text": "Hello"}}),
            422,
            "invalid type",
        ),
        (
            "array parameters",
            json!({"inputs": "Hi", "parameters": []}),
            422,
            "expected struct",
        ),
        (
            "string parameters",
            json!({"inputs": "Hi", "parameters": "fast"}),
            422,
            "invalid type",
        ),
        (
            "string max_new_tokens",
            json!({"inputs": "Hi", "parameters": {"max_new_tokens": "5"}}),
            422,
            "invalid type",
        ),
        (
            "float max_new_tokens",
            json!({"inputs": "Hi", "parameters": {"max_new_tokens": 5.5}}),
            422,
            "invalid type",
        ),
        (
            "bool temperature",
            json!({"inputs": "Hi", "parameters": {"temperature": true}}),
            422,
            "invalid type",
        ),
        (
            "string temperature",
            json!({"inputs": "Hi", "parameters": {"temperature": "0.5"}}),
            422,
            "invalid type",
        ),
        (
            "negative seed",
            json!({"inputs": "Hi", "parameters": {"seed": -1}}),
            422,
            "invalid value",
        ),
        (
            "float seed",
            json!({"inputs": "Hi", "parameters": {"seed": 1.5}}),
            422,
            "invalid type",
        ),
        (
            "string stop",
            json!({"inputs": "Hi", "parameters": {"stop": "a"}}),
            422,
            "invalid type",
        ),
        (
            "numeric stop",
            json!({"inputs": "Hi", "parameters": {"stop": [1]}}),
            422,
            "invalid type",
        ),
        (
            "string do_sample",
            json!({"inputs": "Hi", "parameters": {"do_sample": "yes"}}),
            422,
            "invalid type",
        ),
        (
            "numeric adapter_id",
            json!({"inputs": "Hi", "parameters": {"adapter_id": 7}}),
            422,
            "invalid type",
        ),
        (
            "object api_token",
            json!({"inputs": "Hi", "parameters": {"api_token": {"a": 1}}}),
            422,
            "invalid type",
        ),
        // Unknown fields are refused, at both levels, whatever their case.
        (
            "capitalised parameters",
            json!({"inputs": "Hi", "Parameters": {}}),
            422,
            "unknown field",
        ),
        (
            "camelCase parameter",
            json!({"inputs": "Hi", "parameters": {"maxNewTokens": 5}}),
            422,
            "unknown field",
        ),
        (
            "OpenAI parameter",
            json!({"inputs": "Hi", "parameters": {"n": 2}}),
            422,
            "unknown field",
        ),
        // Empty, and out of range (including integers that overflow i64 and the token limits).
        ("empty inputs", json!({"inputs": ""}), 422, "cannot be empty"),
        (
            "i64::MAX max_new_tokens",
            json!({"inputs": "Hi", "parameters": {"max_new_tokens": big}}),
            422,
            "max_new_tokens",
        ),
        (
            "i64::MIN max_new_tokens",
            json!({"inputs": "Hi", "parameters": {"max_new_tokens": i64::MIN}}),
            422,
            "max_new_tokens",
        ),
        (
            "zero max_new_tokens",
            json!({"inputs": "Hi", "parameters": {"max_new_tokens": 0}}),
            422,
            "max_new_tokens",
        ),
        (
            "i64::MAX truncate",
            json!({"inputs": "Hi", "parameters": {"truncate": big}}),
            422,
            "truncate",
        ),
        (
            "negative truncate",
            json!({"inputs": "Hi", "parameters": {"truncate": -3}}),
            422,
            "truncate",
        ),
        (
            "negative top_k",
            json!({"inputs": "Hi", "parameters": {"top_k": -1}}),
            422,
            "top_k",
        ),
        (
            "i64::MIN top_k",
            json!({"inputs": "Hi", "parameters": {"top_k": i64::MIN}}),
            422,
            "top_k",
        ),
        (
            "11 alternatives",
            json!({"inputs": "Hi", "parameters": {"return_k_alternatives": 21}}),
            422,
            "return_k_alternatives",
        ),
        (
            "negative alternatives",
            json!({"inputs": "Hi", "parameters": {"top_n_tokens": -1}}),
            422,
            "`top_n_tokens`",
        ),
        (
            "negative temperature",
            json!({"inputs": "Hi", "parameters": {"temperature": -0.5}}),
            422,
            "temperature",
        ),
        (
            "negative repetition_penalty",
            json!({"inputs": "Hi", "parameters": {"repetition_penalty": -1}}),
            422,
            "repetition_penalty",
        ),
        (
            "frequency_penalty 2.5",
            json!({"inputs": "Hi", "parameters": {"frequency_penalty": 2.5}}),
            422,
            "frequency_penalty",
        ),
        (
            "presence_penalty -3",
            json!({"inputs": "Hi", "parameters": {"presence_penalty": -3}}),
            422,
            "presence_penalty",
        ),
        (
            "top_p 0",
            json!({"inputs": "Hi", "parameters": {"top_p": 0}}),
            422,
            "top_p",
        ),
        (
            "typical_p 1",
            json!({"inputs": "Hi", "parameters": {"typical_p": 1}}),
            422,
            "typical_p",
        ),
        (
            "best_of 0",
            json!({"inputs": "Hi", "parameters": {"best_of": 0}}),
            422,
            "best_of",
        ),
        (
            "watermark",
            json!({"inputs": "Hi", "parameters": {"watermark": true}}),
            422,
            "watermark",
        ),
        (
            "five stop sequences",
            json!({"inputs": "Hi", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}),
            422,
            "stop",
        ),
        (
            "a thousand stop sequences",
            json!({"inputs": "Hi", "parameters": {"stop": vec!["x"; 1000]}}),
            422,
            "stop",
        ),
        (
            "an empty stop sequence",
            json!({"inputs": "Hi", "parameters": {"stop": [""]}}),
            422,
            "stop",
        ),
        (
            "grammar",
            json!({"inputs": "Hi", "parameters": {"grammar": {"type": "json", "value": {}}}}),
            422,
            "grammar",
        ),
        // A prompt far over --max-input-length (but under the body limit).
        (
            "long prompt",
            json!({"inputs": "hello ".repeat(5000)}),
            422,
            "must have at most",
        ),
        // Floats that overflow f32 become infinite: refused, never passed to the shards.
        (
            "infinite temperature",
            json!({"inputs": "Hi", "parameters": {"temperature": 1e39}}),
            422,
            "temperature",
        ),
        (
            "infinite repetition_penalty",
            json!({"inputs": "Hi", "parameters": {"repetition_penalty": 1e39}}),
            422,
            "repetition_penalty",
        ),
    ];
    let mut cases: Vec<(&'static str, Vec<u8>, u16, &'static str)> = json_cases
        .into_iter()
        .map(|(what, body, status, needle)| (what, body.to_string().into_bytes(), status, needle))
        .collect();
    let raw: Vec<(&'static str, Vec<u8>, u16, &'static str)> = vec![
        ("empty body", Vec::new(), 400, "EOF"),
        ("truncated JSON", b"{\"inputs\": \"Hel".to_vec(), 400, "EOF"),
        ("trailing garbage", b"{\"inputs\": \"Hi\"} x".to_vec(), 400, "trailing"),
        (
            "single quotes",
            b"{'inputs': 'Hi'}".to_vec(),
            400,
            "key must be a string",
        ),
        ("comment", b"{\"inputs\": \"Hi\" /* c */}".to_vec(), 400, "expected"),
        (
            "NaN literal",
            b"{\"inputs\": \"Hi\", \"parameters\": {\"temperature\": NaN}}".to_vec(),
            400,
            "expected value",
        ),
        (
            "duplicate field",
            b"{\"inputs\": \"a\", \"inputs\": \"b\"}".to_vec(),
            422,
            "duplicate field",
        ),
        (
            "u64 overflow",
            b"{\"inputs\": \"Hi\", \"parameters\": {\"seed\": 18446744073709551616}}".to_vec(),
            422,
            "invalid type",
        ),
        (
            "i64 overflow",
            b"{\"inputs\": \"Hi\", \"parameters\": {\"max_new_tokens\": 9223372036854775808}}".to_vec(),
            422,
            "invalid value",
        ),
        // Not UTF-8: raw bytes 0xff 0xfe inside a string, a lone surrogate escape, a Latin-1 body.
        (
            "non-UTF-8 bytes",
            b"{\"inputs\": \"\xff\xfe\"}".to_vec(),
            400,
            "invalid unicode",
        ),
        (
            "lone surrogate",
            b"{\"inputs\": \"\\ud800\"}".to_vec(),
            400,
            "hex escape",
        ),
        (
            "Latin-1 body",
            b"{\"inputs\": \"caf\xe9\"}".to_vec(),
            400,
            "invalid unicode",
        ),
        (
            "UTF-8 byte order mark",
            b"\xef\xbb\xbf{\"inputs\": \"Hi\"}".to_vec(),
            400,
            "expected value",
        ),
        (
            "NUL byte outside a string",
            b"{\"inputs\": \"Hi\"\x00}".to_vec(),
            400,
            "expected",
        ),
        // Nesting far deeper than serde_json's recursion limit: an error, not a stack overflow.
        (
            "30k nested arrays",
            format!(
                "{{\"inputs\": \"Hi\", \"parameters\": {{\"grammar\": {}{}}}}}",
                "[".repeat(30_000),
                "]".repeat(30_000)
            )
            .into_bytes(),
            400,
            "recursion limit",
        ),
    ];
    cases.extend(raw);
    cases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_4xx_while_healthy_ones_are_served() {
    let d = Deployment::start(Setup {
        step_delay: Duration::from_millis(3),
        flags: vec![
            "--body-limit-bytes".into(),
            BODY_LIMIT.to_string(),
            "--max-input-length".into(),
            "1000".into(),
            "--max-total-tokens".into(),
            "2048".into(),
        ],
        ..Setup::default()
    })
    .await;
    let http = reqwest::Client::builder()
        .timeout(CLIENT_TIMEOUT)
        .build()
        .expect("client");

    // A healthy stream runs through the whole battery, and healthy requests keep coming meanwhile.
    const HEALTHY_TOKENS: u64 = 1500;
    let stream = http
        .post(format!("{}/generate_stream", d.base))
        .json(&json!({"inputs": "Hello", "parameters": {"max_new_tokens": HEALTHY_TOKENS, "ignore_eos_token": true}}))
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .expect("stream");
    assert_eq!(stream.status(), 200);
    let mut stream = SseReader::new(stream);
    assert!(stream.next().await.is_some(), "the healthy stream started");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let healthy = {
        let (http, url, stop) = (http.clone(), format!("{}/generate", d.base), stop.clone());
        tokio::spawn(async move {
            let mut served = 0u32;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let response = http
                    .post(&url)
                    .json(&json!({"inputs": "Hello", "parameters": {"max_new_tokens": 3}}))
                    .send()
                    .await
                    .expect("healthy request answered");
                assert_eq!(response.status(), 200, "a healthy request failed");
                served += 1;
            }
            served
        })
    };

    let json_type = Some("application/json");
    let mut wrong = Vec::new();
    for route in ["/generate", "/generate_stream", "/"] {
        let url = format!("{}{route}", d.base);
        for (what, body, status, needle) in generate_cases() {
            let (got, answer) = send(&http, reqwest::Method::POST, &url, json_type, body).await;
            let message = answer["error"].as_str().unwrap_or_default();
            if got != status || answer["error_type"] != "validation" || !message.contains(needle) {
                wrong.push(format!(
                    "{route} {what}: expected {status} with {needle:?}, got {got} {answer}"
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{} wrong answers:\n{}", wrong.len(), wrong.join("\n"));
    // The compat route's own field has a type too.
    let got = send(
        &http,
        reqwest::Method::POST,
        &format!("{}/", d.base),
        json_type,
        json!({"inputs": "Hi", "stream": "yes"}).to_string(),
    )
    .await;
    assert_error("/ string stream", &got, 422, "validation");

    // /tokenize: the same body handling.
    let tokenize = format!("{}/tokenize", d.base);
    for (what, body, status) in [
        ("wrong type", json!({"inputs": 1}).to_string().into_bytes(), 422),
        (
            "unknown field",
            json!({"inputs": "a", "x": 1}).to_string().into_bytes(),
            422,
        ),
        ("non-UTF-8", b"{\"inputs\": \"\xff\"}".to_vec(), 400),
        ("empty body", Vec::new(), 400),
    ] {
        let got = send(&http, reqwest::Method::POST, &tokenize, json_type, body).await;
        assert_error(&format!("/tokenize {what}"), &got, status, "validation");
    }

    // Content types: only JSON (with or without parameters, or a +json type) is read.
    let generate = format!("{}/generate", d.base);
    let small = json!({"inputs": "Hello", "parameters": {"max_new_tokens": 2}}).to_string();
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        Some("application/jsonx"),
        Some("json"),
    ] {
        let got = send(&http, reqwest::Method::POST, &generate, content_type, small.clone()).await;
        assert_error(&format!("content type {content_type:?}"), &got, 415, "validation");
    }
    for content_type in ["application/json; charset=utf-8", "application/vnd.lorax+json"] {
        let (status, body) = send(
            &http,
            reqwest::Method::POST,
            &generate,
            Some(content_type),
            small.clone(),
        )
        .await;
        assert_eq!(status, 200, "{content_type}: {body}");
    }

    // Bodies over --body-limit-bytes: 413, announced by Content-Length or streamed in chunks.
    let over = json!({"inputs": "x".repeat(BODY_LIMIT)}).to_string();
    let got = send(&http, reqwest::Method::POST, &generate, json_type, over.clone()).await;
    assert_error("body over the limit", &got, 413, "validation");
    // A repeated field is refused on the OpenAI routes too, their own fields and the shared ones alike.
    for body in [
        r#"{"prompt": "a", "prompt": "b"}"#,
        r#"{"prompt": "a", "model": "x", "model": ""}"#,
    ] {
        let url = format!("{}/v1/completions", d.base);
        let (got, answer) = send(&http, reqwest::Method::POST, &url, json_type, body.as_bytes().to_vec()).await;
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(
            got == 422 && message.contains("duplicate field"),
            "{body}: {got} {answer}"
        );
    }
    // The server closes the connection after a body it did not read, and says so.
    for path in ["/generate", "/v1/completions"] {
        let r = http
            .post(format!("{}{path}", d.base))
            .header("content-type", "application/json")
            .body(over.clone())
            .send()
            .await
            .expect("sent");
        assert_eq!(r.status(), 413, "{path}");
        assert_eq!(
            r.headers().get("connection").map(|v| v.as_bytes()),
            Some(&b"close"[..]),
            "{path}"
        );
    }
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = over.into_bytes().chunks(4096).map(|c| Ok(c.to_vec())).collect();
    let chunked = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
    let got = send(&http, reqwest::Method::POST, &generate, json_type, chunked).await;
    assert_error("chunked body over the limit", &got, 413, "validation");
    // Just under the limit is read (and refused for its length in tokens, not its size).
    let under = json!({"inputs": "x ".repeat(BODY_LIMIT / 2 - 64)}).to_string();
    assert!(under.len() < BODY_LIMIT);
    let got = send(&http, reqwest::Method::POST, &generate, json_type, under).await;
    assert_error("body under the limit, prompt too long", &got, 422, "validation");

    // Unknown routes and methods get the same error shape.
    let got = send(
        &http,
        reqwest::Method::POST,
        &format!("{}/no/such/route", d.base),
        json_type,
        small.clone(),
    )
    .await;
    assert_error("unknown route", &got, 404, "not_found");
    let got = send(&http, reqwest::Method::GET, &generate, None, Vec::new()).await;
    assert_error("GET /generate", &got, 405, "method_not_allowed");
    let got = send(
        &http,
        reqwest::Method::DELETE,
        &format!("{}/info", d.base),
        None,
        Vec::new(),
    )
    .await;
    assert_error("DELETE /info", &got, 405, "method_not_allowed");
    // Under /v1/ they come in OpenAI's error shape, as the routes' own errors do.
    for (method, path, status, error_type) in [
        (reqwest::Method::GET, "/v1/chat/completions", 405, "method_not_allowed"),
        (reqwest::Method::POST, "/v1/no/such/route", 404, "not_found"),
    ] {
        let (got, body) = send(&http, method, &format!("{}{path}", d.base), json_type, small.clone()).await;
        assert_eq!(
            (got, body["error"]["type"].as_str()),
            (status, Some(error_type)),
            "{path}: {body}"
        );
        assert!(body["error"]["message"].is_string(), "{path}: {body}");
    }
    // A bad query string.
    let got = send(
        &http,
        reqwest::Method::GET,
        &format!("{}/metrics?format=yaml", d.base),
        None,
        Vec::new(),
    )
    .await;
    assert_error("/metrics?format=yaml", &got, 422, "validation");
    let got = send(
        &http,
        reqwest::Method::GET,
        &format!("{}/metrics?format=json&format=text", d.base),
        None,
        Vec::new(),
    )
    .await;
    assert_error("/metrics with a repeated format", &got, 400, "validation");

    // Raw sockets: a body cut off before its Content-Length, a request line of garbage, a header
    // section that never ends. The server must answer or close, never crash.
    let address = d.base.trim_start_matches("http://").to_string();
    for (what, bytes) in [
        (
            "body shorter than Content-Length",
            b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"inputs\":".to_vec(),
        ),
        ("garbage request line", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n".to_vec()),
        ("binary header", b"POST /generate HTTP/1.1\r\nhost: \xff\xfe\r\ncontent-length: 2\r\n\r\n{}".to_vec()),
    ] {
        let mut socket = tokio::net::TcpStream::connect(&address).await.expect("connect");
        socket.write_all(&bytes).await.expect("write");
        // Half-close: the server sees the end of the input and must answer or close.
        socket.shutdown().await.expect("shutdown");
        let mut answer = Vec::new();
        let read = tokio::time::timeout(CLIENT_TIMEOUT, socket.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "{what}: the connection hung");
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 4"),
            "{what}: {answer}"
        );
    }

    // Odd but valid prompts are served.
    for inputs in ["\u{0}", " ", "\u{10FFFF}", "مرحبا", "👩‍👩‍👧‍👦", "\r\n\t"] {
        let (status, body) = send(
            &http,
            reqwest::Method::POST,
            &generate,
            json_type,
            json!({"inputs": inputs, "parameters": {"max_new_tokens": 2}}).to_string(),
        )
        .await;
        assert_eq!(status, 200, "{inputs:?}: {body}");
    }

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let served = healthy.await.expect("healthy requests");
    assert!(served > 0, "no healthy request was served during the battery");
    let mut tokens = 1u64;
    let mut last = Value::Null;
    while let Some(event) = stream.next().await {
        tokens += 1;
        last = event;
    }
    assert_eq!(last["details"]["finish_reason"], "length", "{last}");
    assert_eq!(tokens, HEALTHY_TOKENS, "the healthy stream lost tokens");
    // The last event reaches the client before the router's FilterBatch reaches the shards.
    eventually(
        "every sequence left the shards' batches",
        Duration::from_secs(10),
        || async { d.shards.iter().all(|s| s.live().is_empty()) },
    )
    .await;
    d.assert_no_violations();
    let metrics = d.get("/metrics").await.text().await.expect("metrics");
    assert!(
        !metrics.contains("err=\"incomplete_generation\"") && !metrics.contains("err=\"generation\""),
        "a hostile request caused a server-side failure:\n{metrics}"
    );
    println!("{served} healthy requests served during the battery");
}

/// `/tokenize` answers for at most `TOKENIZE_MAX_TOKENS` tokens (an answer of about 50 bytes a token: 2 MiB
/// of rare text made a 102 MB answer): 300 KB of rare characters (byte tokens) get 422 with their count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_refuses_inputs_past_its_answer_limit() {
    let d = Deployment::start(Setup::default()).await;
    let http = reqwest::Client::new();
    let tokenize = format!("{}/tokenize", d.base);
    let inputs = "\u{4e00}\u{9fa5}\u{3400}".repeat(34_000);
    let r = http
        .post(&tokenize)
        .json(&json!({ "inputs": inputs }))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 422);
    let v: Value = r.json().await.expect("JSON");
    assert_eq!(v["error_type"], "validation", "{v}");
    let message = v["error"].as_str().expect("message");
    assert!(
        message.contains(&format!("at most {}", lorax_router::validation::TOKENIZE_MAX_TOKENS)),
        "{message}"
    );
    // An input within the limit is answered.
    let r = http
        .post(&tokenize)
        .json(&json!({ "inputs": "hello ".repeat(5_000) }))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert!(r.json::<Vec<Value>>().await.expect("tokens").len() >= 5_000);
}
