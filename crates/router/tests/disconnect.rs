//! Cancellation frees KV blocks: a client that goes away (streaming or not) and a shard failure must
//! bring `lorax_kv_blocks_used` back to 0 and empty the shards' batch long before the generation would
//! have finished. Its own test binary, so no other test's requests share the process-wide metrics.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Deployment, Setup, SseReader};
use serde_json::json;

/// Natural completion would take 1500 steps * 10 ms = 15 s; cancellation must free everything sooner.
const DEADLINE: Duration = Duration::from_secs(8);

async fn assert_all_free(d: &Deployment, what: &str) {
    common::eventually(what, DEADLINE, || async {
        d.metric("lorax_kv_blocks_used").await == Some(0.0) && d.shards.iter().all(|s| s.live().is_empty())
    })
    .await;
}

#[tokio::test]
async fn disconnects_and_failures_free_blocks() {
    let d = Deployment::start(Setup {
        step_delay: Duration::from_millis(10),
        ..Setup::default()
    })
    .await;
    let total = d.metric("lorax_kv_blocks_total").await.expect("total blocks gauge");
    assert_eq!(total, 1024.0);
    assert_eq!(d.metric("lorax_kv_blocks_used").await, Some(0.0));
    let long = json!({"inputs": "Hello", "parameters": {"max_new_tokens": 1500}});

    // 1. A streaming client reads one token and goes away.
    let mut stream = SseReader::new(d.post("/generate_stream", long.clone()).await);
    assert!(stream.next().await.is_some());
    let used = d.metric("lorax_kv_blocks_used").await.expect("used gauge");
    assert_eq!(
        used,
        f64::from((2u32 + 1500).div_ceil(common::BLOCK_SIZE)),
        "blocks of one request"
    );
    drop(stream);
    assert_all_free(&d, "blocks freed after the stream was dropped").await;

    // 2. A plain /generate client times out and closes the connection.
    let decodes_before = d.shards[0].decodes.load(Ordering::SeqCst);
    let url = format!("{}/generate", d.base);
    let http = d.http.clone();
    let body = long.clone();
    let timed_out = http
        .post(&url)
        .json(&body)
        .timeout(Duration::from_millis(500))
        .send()
        .await
        .expect_err("the request cannot finish in 500 ms");
    assert!(timed_out.is_timeout(), "{timed_out}");
    assert!(
        d.shards[0].decodes.load(Ordering::SeqCst) > decodes_before,
        "the request was generating when the client left"
    );
    assert_all_free(&d, "blocks freed after the plain client left").await;

    // 3. A shard failure mid-generation fails the request and frees its blocks.
    let mut stream = SseReader::new(d.post("/generate_stream", long.clone()).await);
    assert!(stream.next().await.is_some());
    d.shards[1].fail_next.store(true, Ordering::SeqCst);
    let mut last = serde_json::Value::Null;
    while let Some(event) = stream.next().await {
        last = event;
    }
    assert_eq!(last["error_type"], "generation", "{last}");
    assert_all_free(&d, "blocks freed after a shard failure").await;

    // 4. Requests finishing normally free their blocks too, and failures are counted.
    let response = d
        .post(
            "/generate",
            json!({"inputs": "Hello", "parameters": {"max_new_tokens": 3}}),
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_all_free(&d, "blocks freed after a normal finish").await;
    let metrics = d.get("/metrics").await.text().await.expect("metrics");
    assert!(
        metrics.contains("lorax_request_failure{err=\"generation\"} 1"),
        "failure counted once:\n{metrics}"
    );
}
