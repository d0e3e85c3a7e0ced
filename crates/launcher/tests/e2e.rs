//! Process-level tests: the real launcher spawns real shard and router processes on a free port and
//! the tests speak HTTP to them. Outputs are checked against the transformers golden fixtures (the
//! embedded model is the llama fixture), not against our own earlier output.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{bucket, generate, golden, metric, pid_of_shard, start};
use futures::StreamExt;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_transformers_tokens_batches_validates_and_stops_on_sigterm() {
    let g = golden();
    let mut server = start(&[]).await;
    let base = server.base.clone();
    let client = reqwest::Client::new();

    // The router's tokenizer agrees with the fixture's prompt ids (Python tokenizers).
    for (p, ids) in g.prompts.iter().zip(&g.prompt_ids) {
        let v: Value = client
            .post(format!("{base}/tokenize"))
            .json(&json!({"inputs": p}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let got: Vec<u32> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_u64().unwrap() as u32)
            .collect();
        assert_eq!(&got, ids, "tokenization of {p:?}");
    }

    // Alone: 32 greedy tokens identical to transformers'.
    for (p, want) in g.prompts.iter().zip(&g.greedy) {
        assert_eq!(&generate(&client, &base, p, 32).await, want, "{p:?} alone");
    }

    // Continuous batching: a long stream is running; the four prompts (different lengths) arrive
    // concurrently, join its batch, and still give transformers' tokens.
    let long = common::running_stream(&client, &base, &g.prompts[2]).await;
    let futs = g.prompts.iter().map(|p| generate(&client, &base, p, 32));
    let all = futures::future::join_all(futs).await;
    for ((p, want), got) in g.prompts.iter().zip(&g.greedy).zip(&all) {
        assert_eq!(got, want, "{p:?} joining a running batch");
    }
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let single = bucket(&text, "lorax_batch_decode_size_bucket", "1");
    let total = bucket(&text, "lorax_batch_decode_size_bucket", "+Inf");
    assert!(
        total - single >= 31.0,
        "decode steps shared by 2+ requests: {} of {total}",
        total - single
    );

    // The long stream's client disconnects: its KV blocks are freed (visible in /metrics).
    assert!(metric(&client, &base, "lorax_kv_blocks_used").await.unwrap() > 0.0);
    drop(long);
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&client, &base, "lorax_kv_blocks_used").await != Some(0.0) {
        assert!(Instant::now() < deadline, "blocks were not freed after the disconnect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Streaming gives the same tokens, one event each, the last carrying generated_text.
    let r = client
        .post(format!("{base}/generate_stream"))
        .json(&json!({"inputs": g.prompts[1], "parameters": {"max_new_tokens": 32, "ignore_eos_token": true}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    let events: Vec<Value> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| serde_json::from_str(d.trim()).unwrap())
        .collect();
    let ids: Vec<u32> = events
        .iter()
        .map(|e| e["token"]["id"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(ids, g.greedy[1]);
    assert!(events.last().unwrap()["generated_text"].is_string());
    assert_eq!(events.last().unwrap()["details"]["finish_reason"], "length");

    // Bad parameters: 422 with error_type validation, and the server keeps serving.
    for params in [
        json!({"temperature": 0.0}),
        json!({"top_p": 1.5}),
        json!({"top_k": -1}),
        json!({"max_new_tokens": 100000}),
        json!({"repetition_penalty": 0}),
        json!({"typical_p": 0}),
        json!({"stop": ["a", "b", "c", "d", "e"]}),
        json!({"no_such_parameter": 1}),
        json!({"adapter_id": "some/adapter", "adapter_source": "s3"}),
    ] {
        let r = client
            .post(format!("{base}/generate"))
            .json(&json!({"inputs": "Hello", "parameters": params}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 422, "{params}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error_type"], "validation", "{params}: {v}");
    }
    let r = client
        .post(format!("{base}/generate"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error());

    assert_eq!(generate(&client, &base, &g.prompts[0], 32).await, g.greedy[0]);

    // SIGTERM: everything stops, exit code 0, shard gone.
    let shard = pid_of_shard(&server.uds_dir).expect("shard process not found");
    nix_kill(server.child.id() as i32, "TERM");
    let status = wait_exit(&mut server.child, Duration::from_secs(30));
    assert!(status.success(), "launcher exit after SIGTERM: {status}");
    assert!(
        !Path::new(&format!("/proc/{shard}")).exists() || is_zombie(shard),
        "shard {shard} still running"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_running_stream_finish() {
    // Time enough for the whole stream on a slow machine (it takes about a second here).
    let mut server = start(&["--shutdown-grace-s", "60"]).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let want = 480;
    let long = json!({"inputs": "Hello", "parameters": {"max_new_tokens": want, "ignore_eos_token": true}});
    let r = client
        .post(format!("{}/generate_stream", server.base))
        .json(&long)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    // SIGTERM with the stream running: the router finishes it before the shards are stopped.
    nix_kill(server.child.id() as i32, "TERM");
    let before = String::from_utf8_lossy(&first).matches("data:").count();
    assert!(
        before < want,
        "the stream was still running at SIGTERM ({before} events before it)"
    );
    let mut rest = Vec::new();
    while let Some(chunk) = body.next().await {
        rest.extend_from_slice(&chunk.expect("the stream ends cleanly"));
    }
    let rest = String::from_utf8(rest).unwrap();
    let events: Vec<Value> = rest
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| serde_json::from_str(d.trim()).unwrap())
        .collect();
    let last = events.last().unwrap();
    assert!(events.iter().all(|e| e.get("error").is_none()), "{last}");
    assert_eq!(last["details"]["generated_tokens"], want, "{last}");
    let status = wait_exit(&mut server.child, Duration::from_secs(30));
    assert!(status.success(), "launcher exit after SIGTERM: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_shard_ends_the_launcher_with_failure() {
    let mut server = start(&[]).await;
    let shard = pid_of_shard(&server.uds_dir).expect("shard process not found");
    // Requests in flight when the shard dies: a stream that has started and a plain request.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let long = json!({"inputs": "Hello", "parameters": {"max_new_tokens": 500, "ignore_eos_token": true}});
    let stream = client
        .post(format!("{}/generate_stream", server.base))
        .json(&long)
        .send()
        .await
        .unwrap();
    let mut stream = stream.bytes_stream();
    stream.next().await.unwrap().unwrap();
    let plain = tokio::spawn({
        let (client, url, body) = (client.clone(), format!("{}/generate", server.base), long.clone());
        async move {
            let r = client.post(url).json(&body).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&client, &server.base, "lorax_batch_current_size").await != Some(2.0) {
        assert!(Instant::now() < deadline, "the plain request never joined the batch");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    nix_kill(shard, "KILL");
    // Each gets a clear error (424 generation), not a hang or a silent cut.
    let (status, body) = plain.await.unwrap();
    assert_eq!(
        (status, body["error_type"].as_str()),
        (424, Some("generation")),
        "{body}"
    );
    let mut rest = Vec::new();
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    let rest = String::from_utf8_lossy(&rest);
    let last = rest
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .next_back()
        .unwrap();
    let last: Value = serde_json::from_str(last.trim()).unwrap();
    assert_eq!(last["error_type"], "generation", "{last}");
    let status = wait_exit(&mut server.child, Duration::from_secs(30));
    assert!(
        !status.success(),
        "launcher should fail when a shard dies, got {status}"
    );
}

fn nix_kill(pid: i32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.contains(") Z "))
        .unwrap_or(true)
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "process did not exit in time");
        std::thread::sleep(Duration::from_millis(50));
    }
}
