//! The router over real HTTP against in-process fake shards: generation, streaming, the compat route,
//! stopping, validation and error mapping, overload (429), shard failures (424), health, info,
//! tokenize and metrics.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{error_of, Deployment, Setup, SseReader, EOS};
use serde_json::{json, Value};

/// Expected continuation text of `prompt_ids` followed by `generated` (decoded in context).
fn continuation(prompt_ids: &[u32], generated: &[u32]) -> String {
    let tokenizer = lorax_router::load_tokenizer(&common::tokenizer_dir()).expect("tokenizer");
    let prefix = tokenizer.decode(prompt_ids, false).expect("decode");
    let all: Vec<u32> = prompt_ids.iter().chain(generated).copied().collect();
    let full = tokenizer.decode(&all, false).expect("decode");
    full[prefix.len()..].to_string()
}

/// Fake tokens after a prompt ending in `last`.
fn fake_tokens(last: u32, n: u32) -> Vec<u32> {
    (1..=n).map(|i| last + i).collect()
}

const HELLO: [u32; 2] = [1, 22557];

#[tokio::test]
async fn generate_with_details() {
    let d = Deployment::start(Setup::default()).await;
    let response = d
        .post(
            "/generate",
            json!({"inputs": "Hello", "parameters": {
                "max_new_tokens": 5, "details": true, "decoder_input_details": true, "return_k_alternatives": 2
            }}),
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-generated-tokens"], "5");
    assert_eq!(response.headers()["x-prompt-tokens"], "2");
    let body: Value = response.json().await.expect("json");
    let generated = fake_tokens(HELLO[1], 5);
    assert_eq!(body["generated_text"], continuation(&HELLO, &generated));
    let details = &body["details"];
    assert_eq!(details["finish_reason"], "length");
    assert_eq!(details["generated_tokens"], 5);
    assert_eq!(details["prompt_tokens"], 2);
    assert_eq!(details["skipped_tokens"], 0);
    assert_eq!(details["seed"], Value::Null, "greedy requests report no seed");
    let ids: Vec<u64> = details["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t["id"].as_u64().expect("id"))
        .collect();
    assert_eq!(ids, generated.iter().map(|&t| u64::from(t)).collect::<Vec<_>>());
    let text: String = details["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t["text"].as_str().expect("text"))
        .collect();
    assert_eq!(body["generated_text"], text);
    let first = &details["tokens"][0];
    assert_eq!(first["special"], false);
    assert_eq!(first["skipped"], false);
    assert_eq!(first["logprob"], -0.25);
    assert_eq!(first["alternative_tokens"].as_array().expect("alternatives").len(), 2);
    let prefill = details["prefill"].as_array().expect("prefill");
    assert_eq!(prefill.len(), 2);
    assert_eq!(prefill[0]["id"], 1);
    assert_eq!(prefill[0]["text"], "<s>");
    assert_eq!(prefill[0]["logprob"], Value::Null);
    assert_eq!(prefill[1]["logprob"], -1.0);

    // Every shard saw the prefill (the same call goes to all ranks).
    for shard in &d.shards {
        assert_eq!(shard.prefilled_requests.load(Ordering::SeqCst), 1);
        assert_eq!(shard.block_errors.load(Ordering::SeqCst), 0);
    }
}

#[tokio::test]
async fn plain_generate_and_full_text_and_sampling_seed() {
    let d = Deployment::start(Setup::default()).await;
    let body: Value = d
        .post(
            "/generate",
            json!({"inputs": "Hello", "parameters": {"max_new_tokens": 3}}),
        )
        .await
        .json()
        .await
        .expect("json");
    assert!(body.get("details").is_none(), "no details unless asked: {body}");
    let text = body["generated_text"].as_str().expect("text").to_string();

    let body: Value = d
        .post(
            "/generate",
            json!({"inputs": "Hello", "parameters": {"max_new_tokens": 3, "return_full_text": true}}),
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(body["generated_text"], format!("Hello{text}"));

    let body: Value = d
        .post(
            "/generate",
            json!({"inputs": "Hello", "parameters": {"max_new_tokens": 2, "details": true, "do_sample": true, "seed": 7}}),
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(body["details"]["seed"], 7);
    let body: Value = d
        .post(
            "/generate",
            json!({"inputs": "Hello", "parameters": {"max_new_tokens": 2, "details": true, "temperature": 0.5}}),
        )
        .await
        .json()
        .await
        .expect("json");
    assert!(
        body["details"]["seed"].is_u64(),
        "sampling without a seed gets a random one: {body}"
    );
}

#[tokio::test]
async fn stream_events() {
    let d = Deployment::start(Setup::default()).await;
    let response = d
        .post(
            "/generate_stream",
            json!({"inputs": "Hello", "parameters": {"max_new_tokens": 4}}),
        )
        .await;
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .expect("header")
        .starts_with("text/event-stream"));
    let events = SseReader::new(response).collect().await;
    assert_eq!(events.len(), 4, "{events:?}");
    for e in &events[..3] {
        assert_eq!(e["generated_text"], Value::Null);
        assert_eq!(e["details"], Value::Null);
    }
    let last = &events[3];
    let generated = fake_tokens(HELLO[1], 4);
    assert_eq!(last["generated_text"], continuation(&HELLO, &generated));
    assert_eq!(last["details"]["finish_reason"], "length");
    assert_eq!(last["details"]["generated_tokens"], 4);
    assert_eq!(last["details"]["prompt_tokens"], 2);
    let streamed: String = events
        .iter()
        .map(|e| e["token"]["text"].as_str().expect("token text"))
        .collect();
    assert_eq!(last["generated_text"], streamed);
    let ids: Vec<u64> = events.iter().map(|e| e["token"]["id"].as_u64().expect("id")).collect();
    assert_eq!(ids, generated.iter().map(|&t| u64::from(t)).collect::<Vec<_>>());
}

#[tokio::test]
async fn compat_route() {
    let d = Deployment::start(Setup::default()).await;
    let response = d
        .post(
            "/",
            json!({"inputs": "Hello", "parameters": {"max_new_tokens": 2}, "stream": false}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    let array = body.as_array().expect("a one-element array");
    assert_eq!(array.len(), 1);
    assert_eq!(
        array[0]["generated_text"],
        continuation(&HELLO, &fake_tokens(HELLO[1], 2))
    );

    let response = d
        .post(
            "/",
            json!({"inputs": "Hello", "parameters": {"max_new_tokens": 2}, "stream": true}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let events = SseReader::new(response).collect().await;
    assert_eq!(events.len(), 2);

    // Without "stream" and without "parameters".
    let response = d.post("/", json!({"inputs": "Hello"})).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn eos_and_ignore_eos() {
    let d = Deployment::start(Setup::default()).await;
    // "<s>" is the BOS special token, so the prompt is [1, 1] and the fake's next token is 2 = </s>.
    let body: Value = d
        .post(
            "/generate",
            json!({"inputs": "<s>", "parameters": {"max_new_tokens": 10, "details": true}}),
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(body["details"]["finish_reason"], "eos_token", "{body}");
    assert_eq!(body["details"]["generated_tokens"], 1);
    assert_eq!(body["details"]["tokens"][0]["id"], EOS);
    assert_eq!(body["details"]["tokens"][0]["special"], true);
    assert_eq!(body["details"]["tokens"][0]["text"], "</s>");
    assert_eq!(body["generated_text"], "", "special tokens are not part of the text");

    let body: Value = d
        .post(
            "/generate",
            json!({"inputs": "<s>", "parameters": {"max_new_tokens": 3, "details": true, "ignore_eos_token": true}}),
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(body["details"]["finish_reason"], "length");
    assert_eq!(body["details"]["generated_tokens"], 3);

    // A stop sequence that is a special token's text stops at that token (ignored as end of sequence).
    let body = d
        .post_ok(
            "/generate",
            json!({"inputs": "<s>", "parameters": {"max_new_tokens": 3, "details": true, "ignore_eos_token": true,
                "stop": ["</s>"]}}),
        )
        .await;
    assert_eq!(body["details"]["finish_reason"], "stop_sequence", "{body}");
    assert_eq!(body["details"]["generated_tokens"], 1);
    assert_eq!(body["generated_text"], "");
}

#[tokio::test]
async fn prompt_details_come_with_the_details() {
    let d = Deployment::start(Setup::default()).await;
    let body = d
        .post_ok(
            "/generate",
            json!({"inputs": "Hello", "parameters": {"max_new_tokens": 2, "decoder_input_details": true}}),
        )
        .await;
    let prefill = body["details"]["prefill"].as_array().expect("details.prefill");
    assert_eq!(prefill.len(), 2, "<s> Hello: {body}");
}

#[tokio::test]
async fn stop_sequences() {
    let d = Deployment::start(Setup::default()).await;
    let body: Value = d
        .post(
            "/generate",
            json!({"inputs": "Hello", "parameters": {"max_new_tokens": 12, "details": true}}),
        )
        .await
        .json()
        .await
        .expect("json");
    let full = body["generated_text"].as_str().expect("text").to_string();
    // A stop sequence made of the text of tokens 4 and 5 (trimmed), found in the middle of the output.
    let tokens = body["details"]["tokens"].as_array().expect("tokens");
    let stop = format!(
        "{}{}",
        tokens[3]["text"].as_str().expect("text"),
        tokens[4]["text"].as_str().expect("text")
    )
    .trim()
    .to_string();
    assert!(!stop.is_empty());
    let end = full.find(&stop).expect("stop occurs") + stop.len();

    let body: Value = d
        .post(
            "/generate",
            json!({"inputs": "Hello", "parameters": {"max_new_tokens": 12, "details": true, "stop": [stop, "never-appears"]}}),
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(body["details"]["finish_reason"], "stop_sequence", "{body}");
    assert_eq!(
        body["generated_text"],
        full[..end],
        "text up to and including the stop sequence"
    );
    assert_eq!(body["details"]["generated_tokens"], 5);
}

#[tokio::test]
async fn validation_and_body_errors() {
    let d = Deployment::start(Setup {
        flags: vec![
            "--max-input-length".into(),
            "8".into(),
            "--max-total-tokens".into(),
            "16".into(),
        ],
        ..Setup::default()
    })
    .await;
    let cases = [
        (
            json!({"inputs": "Hello", "parameters": {"adapter_id": "org/adapter", "adapter_source": "s3"}}),
            422,
            "`adapter_source` must be one of \"hub\", \"local\"",
        ),
        (
            json!({"inputs": "Hello", "parameters": {"adapter_id": "org/a\u{1b}[31m"}}),
            422,
            "control characters",
        ),
        (
            json!({"inputs": "Hello", "parameters": {"adapter_id": "x".repeat(300)}}),
            422,
            "at most 256 bytes",
        ),
        (
            json!({"inputs": "Hello", "parameters": {"merged_adapters": {"ids": ["a", "b"]}}}),
            422,
            "`merged_adapters` is not supported",
        ),
        (
            json!({"inputs": "Hello", "parameters": {"max_tokens": 3}}),
            422,
            "unknown field",
        ),
        (json!({"inputs": "Hello", "extra": true}), 422, "unknown field"),
        (json!({"parameters": {}}), 422, "missing field `inputs`"),
        (json!({"inputs": 3}), 422, "invalid type"),
        (json!({"inputs": ""}), 422, "`inputs` cannot be empty"),
        (
            json!({"inputs": "Hello", "parameters": {"temperature": 0}}),
            422,
            "temperature",
        ),
        (json!({"inputs": "Hello", "parameters": {"top_p": 1.0}}), 422, "top_p"),
        (json!({"inputs": "Hello", "parameters": {"best_of": 2}}), 422, "best_of"),
        (
            json!({"inputs": "Hello", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}),
            422,
            "stop",
        ),
        (
            json!({"inputs": "one two three four five six seven eight nine"}),
            422,
            "`inputs` must have at most 8 tokens",
        ),
        (
            json!({"inputs": "Hello", "parameters": {"max_new_tokens": 15}}),
            422,
            "must be <= 16",
        ),
    ];
    for (body, status, needle) in cases {
        let (got, error) = error_of(d.post("/generate", body.clone()).await).await;
        assert_eq!(got, status, "{body} -> {error}");
        assert_eq!(error["error_type"], "validation", "{body} -> {error}");
        assert!(
            error["error"].as_str().expect("message").contains(needle),
            "{body} -> {error}"
        );
    }
    // Same errors on the streaming route, as HTTP errors before any event.
    let (status, error) = error_of(
        d.post(
            "/generate_stream",
            json!({"inputs": "Hello", "parameters": {"adapter_id": "a/b", "adapter_source": "pbase"}}),
        )
        .await,
    )
    .await;
    assert_eq!((status, error["error_type"].as_str()), (422, Some("validation")));
    let (status, _) = error_of(
        d.post(
            "/generate_stream",
            json!({"inputs": "Hello", "parameters": {"decoder_input_details": true}}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 422);

    // Malformed JSON: 400; not JSON: 415; too large: 413. All with our error shape.
    let url = format!("{}/generate", d.base);
    let response = d
        .http
        .post(&url)
        .header("content-type", "application/json")
        .body("{\"inputs\": ")
        .send()
        .await
        .expect("sent");
    let (status, error) = error_of(response).await;
    assert_eq!(
        (status, error["error_type"].as_str()),
        (400, Some("validation")),
        "{error}"
    );
    let response = d.http.post(&url).body("inputs=Hello").send().await.expect("sent");
    let (status, error) = error_of(response).await;
    assert_eq!(
        (status, error["error_type"].as_str()),
        (415, Some("validation")),
        "{error}"
    );
    let huge = json!({"inputs": "x".repeat(3 * 1024 * 1024)});
    let (status, error) = error_of(d.post("/generate", huge).await).await;
    assert_eq!(
        (status, error["error_type"].as_str()),
        (413, Some("validation")),
        "{error}"
    );
}

#[tokio::test]
async fn overload_gives_429() {
    let d = Deployment::start(Setup {
        step_delay: Duration::from_millis(20),
        flags: vec!["--max-concurrent-requests".into(), "2".into()],
        ..Setup::default()
    })
    .await;
    let long = json!({"inputs": "Hello", "parameters": {"max_new_tokens": 500}});
    let mut first = SseReader::new(d.post("/generate_stream", long.clone()).await);
    let mut second = SseReader::new(d.post("/generate_stream", long.clone()).await);
    assert!(first.next().await.is_some());
    assert!(second.next().await.is_some());

    let (status, error) = error_of(d.post("/generate", long.clone()).await).await;
    assert_eq!(status, 429);
    assert_eq!(error["error_type"], "overloaded");
    let (status, _) = error_of(d.post("/generate_stream", long.clone()).await).await;
    assert_eq!(status, 429);

    // Freeing a slot (client gone) lets the next request in.
    drop(first);
    common::eventually("a slot frees up", Duration::from_secs(10), || async {
        d.post(
            "/generate",
            json!({"inputs": "Hello", "parameters": {"max_new_tokens": 1}}),
        )
        .await
        .status()
            == 200
    })
    .await;
    drop(second);
}

#[tokio::test]
async fn shard_failure_gives_424_and_recovers() {
    let d = Deployment::start(Setup {
        step_delay: Duration::from_millis(5),
        ..Setup::default()
    })
    .await;
    // Rank 1 fails: any shard's error fails the call.
    d.shards[1].fail_next.store(true, Ordering::SeqCst);
    let (status, error) = error_of(
        d.post(
            "/generate",
            json!({"inputs": "Hello", "parameters": {"max_new_tokens": 5}}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 424, "{error}");
    assert_eq!(error["error_type"], "generation");
    assert!(
        error["error"]
            .as_str()
            .expect("message")
            .contains("injected failure on rank 1"),
        "{error}"
    );
    for shard in &d.shards {
        assert!(shard.live().is_empty(), "ClearCache emptied the batch");
    }

    // Mid-stream failure: an error event.
    let mut stream = SseReader::new(
        d.post(
            "/generate_stream",
            json!({"inputs": "Hello", "parameters": {"max_new_tokens": 1000}}),
        )
        .await,
    );
    assert!(stream.next().await.expect("first token")["token"].is_object());
    d.shards[0].fail_next.store(true, Ordering::SeqCst);
    let mut last = Value::Null;
    while let Some(event) = stream.next().await {
        last = event;
    }
    assert_eq!(last["error_type"], "generation", "{last}");
    assert!(last["error"]
        .as_str()
        .expect("message")
        .contains("injected failure on rank 0"));

    // The router keeps serving.
    let response = d
        .post(
            "/generate",
            json!({"inputs": "Hello", "parameters": {"max_new_tokens": 2}}),
        )
        .await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn concurrent_requests_are_batched() {
    let d = Deployment::start(Setup {
        step_delay: Duration::from_millis(2),
        ..Setup::default()
    })
    .await;
    let requests = (0..8).map(|i| {
        let d = &d;
        async move {
            let body: Value = d
                .post(
                    "/generate",
                    json!({"inputs": "Hello", "parameters": {"max_new_tokens": 20 + i, "details": true}}),
                )
                .await
                .json()
                .await
                .expect("json");
            assert_eq!(body["details"]["generated_tokens"], 20 + i, "{body}");
            assert_eq!(
                body["generated_text"],
                continuation(&HELLO, &fake_tokens(HELLO[1], 20 + i as u32))
            );
        }
    });
    futures::future::join_all(requests).await;
    let shard = &d.shards[0];
    assert!(shard.max_batch.load(Ordering::SeqCst) > 1, "requests shared a batch");
    assert!(
        shard.ahead_steps.load(Ordering::SeqCst) > 0,
        "the router asked for decode steps run ahead"
    );
    assert_eq!(shard.block_errors.load(Ordering::SeqCst), 0);
    common::eventually("the batch empties", Duration::from_secs(5), || async {
        d.shards.iter().all(|s| s.live().is_empty())
    })
    .await;
}

#[tokio::test]
async fn health_info_tokenize_metrics() {
    let d = Deployment::start(Setup::default()).await;
    assert_eq!(d.get("/health").await.status(), 200);
    d.shards[1].unhealthy.store(true, Ordering::SeqCst);
    let (status, error) = error_of(d.get("/health").await).await;
    assert_eq!(
        (status, error["error_type"].as_str()),
        (503, Some("unhealthy")),
        "{error}"
    );
    d.shards[1].unhealthy.store(false, Ordering::SeqCst);
    assert_eq!(d.get("/health").await.status(), 200);

    let info: Value = d.get("/info").await.json().await.expect("json");
    assert_eq!(info["model_id"], "fake/model");
    assert_eq!(info["model_dtype"], "float32");
    assert_eq!(info["model_device_type"], "cpu");
    assert_eq!(info["max_concurrent_requests"], 128);
    assert_eq!(info["max_input_length"], 1024);
    assert_eq!(info["max_total_tokens"], 2048);
    assert_eq!(info["block_size"], common::BLOCK_SIZE);
    assert_eq!(info["num_blocks"], 1024);
    assert_eq!(info["max_batch_total_tokens"], 1024 * common::BLOCK_SIZE);
    assert_eq!(info["num_shards"], 2);
    assert_eq!(info["validation_workers"], 2);
    assert_eq!(info["sha"], Value::Null);
    assert_eq!(info["docker_label"], Value::Null);
    assert!(info["version"].is_string());

    let tokens: Value = d
        .post("/tokenize", json!({"inputs": "Hello world"}))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        tokens,
        json!([
            {"id": 1, "text": "", "start": 0, "stop": 0},
            {"id": 22557, "text": "Hello", "start": 0, "stop": 5},
            {"id": 1526, "text": " world", "start": 5, "stop": 11}
        ])
    );

    let response = d
        .post(
            "/generate",
            json!({"inputs": "Hello", "parameters": {"max_new_tokens": 1}}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let text = d.get("/metrics").await.text().await.expect("metrics");
    for name in [
        "lorax_request_count",
        "lorax_request_success",
        "lorax_request_duration_bucket",
        "lorax_request_queue_duration_bucket",
        "lorax_request_inference_duration_bucket",
        "lorax_request_input_length_bucket",
        "lorax_request_generated_tokens_bucket",
        "lorax_batch_forward_duration_bucket{method=\"prefill\"",
        "lorax_queue_size",
        "lorax_batch_current_size",
        "lorax_batch_current_max_tokens",
        "lorax_kv_blocks_used",
        "lorax_kv_blocks_total",
    ] {
        assert!(text.contains(name), "/metrics lacks {name}:\n{text}");
    }
}

/// A shard that leaves a sequence out of its answer must not leave that request hanging with its
/// blocks: it fails with 424 and the batch is cleaned up.
#[tokio::test]
async fn a_missing_generation_fails_the_request_instead_of_hanging() {
    let d = Deployment::start(Setup::default()).await;
    for shard in &d.shards {
        shard.drop_next_generation.store(true, Ordering::SeqCst);
    }
    let (status, error) = error_of(
        d.post(
            "/generate",
            json!({"inputs": "Hello", "parameters": {"max_new_tokens": 5}}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 424, "{error}");
    assert!(
        error["error"].as_str().expect("message").contains("no token"),
        "{error}"
    );
    common::eventually("the shards' batch is empty", Duration::from_secs(10), || async {
        d.shards.iter().all(|s| s.live().is_empty())
    })
    .await;
    // The server keeps serving.
    let ok = d
        .post(
            "/generate",
            json!({"inputs": "Hello", "parameters": {"max_new_tokens": 3}}),
        )
        .await;
    assert_eq!(ok.status(), 200);
}

/// Requests that join while another decodes (the router collects the step the shard ran ahead before each
/// Prefill, whose tokens then come first) and that end at different steps (FilterBatch drops their tokens
/// from a step run ahead) each get exactly their own tokens, no more and none lost.
#[tokio::test]
async fn steps_run_ahead_give_each_request_exactly_its_tokens() {
    let d = Deployment::start(Setup {
        step_delay: Duration::from_millis(1),
        ..Setup::default()
    })
    .await;
    let long = d.spawn_generate("", 80);
    common::eventually("the first request decodes ahead", Duration::from_secs(10), || async {
        d.shards[0].ahead_steps.load(Ordering::SeqCst) > 0
    })
    .await;
    let short: Vec<_> = (1..=8).map(|n| (n, d.spawn_generate("", n))).collect();
    for (n, handle) in short {
        let (status, body) = handle.await.expect("request task");
        assert_eq!(status, 200, "{body}");
        common::assert_generated_by(&body, "", n);
    }
    let (status, body) = long.await.expect("request task");
    assert_eq!(status, 200, "{body}");
    common::assert_generated_by(&body, "", 80);
    assert!(
        d.shards[0].prefills.load(Ordering::SeqCst) > 1,
        "requests joined a running batch"
    );
    d.assert_no_violations();
    common::eventually("the batch empties", Duration::from_secs(5), || async {
        d.shards.iter().all(|s| s.live().is_empty())
    })
    .await;
}
