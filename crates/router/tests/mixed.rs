//! Mixed steps against fake shards, with a one-token prompt budget per step: on an idle server a prompt runs
//! whole in one step (nobody waits for it); a request joining a running
//! stream is prefilled over many mixed steps (the running stream keeps getting tokens), gets its whole
//! prompt details with its first token, and a client that leaves while its request is still prefilling
//! frees its blocks and its place in the shards' batch. Its own test binary with a single test, so no other
//! test's requests share the process-wide metrics (its block count reads them).

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Deployment, Setup, SseReader};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(8);

#[tokio::test]
async fn prompts_run_in_chunks_next_to_running_streams() {
    let d = Deployment::start(Setup {
        step_delay: Duration::from_millis(5),
        flags: vec!["--max-batch-prefill-chunk-tokens".into(), "1".into()],
        ..Setup::default()
    })
    .await;
    let blocks = |tokens: u32| f64::from(tokens.div_ceil(common::BLOCK_SIZE));
    let prompt = "The capital of France is Paris. ".repeat(12);
    // Nothing runs: the prompt is not cut in chunks, it runs whole in one Prefill call.
    let alone = json!({"inputs": prompt, "parameters": {"max_new_tokens": 3}});
    let response = d.post("/generate", alone).await;
    assert_eq!(response.status(), 200);
    let prefills = |i: usize| d.shards[i].prefills.load(Ordering::SeqCst);
    assert_eq!(
        (prefills(0), prefills(1)),
        (1, 1),
        "one whole-prompt Prefill on each shard"
    );
    assert_eq!(d.shards[0].mixed_steps.load(Ordering::SeqCst), 0);
    // A long stream runs.
    let long = json!({"inputs": "Hello", "parameters": {"max_new_tokens": 1500}});
    let mut running = SseReader::new(d.post("/generate_stream", long).await);
    assert!(running.next().await.is_some());

    // A request with a long prompt joins: one prompt token per step, so it stays prefilling for many
    // steps while the stream goes on. Its client leaves before its first token.
    let joining = json!({"inputs": prompt, "parameters": {"max_new_tokens": 20}});
    let leaving = SseReader::new(d.post("/generate_stream", joining).await);
    common::eventually("the request is prefilling on every shard", DEADLINE, || async {
        d.shards.iter().all(|s| s.prefilling().len() == 1)
    })
    .await;
    let mixed_before = d.shards[0].mixed_steps.load(Ordering::SeqCst);
    assert!(mixed_before > 0, "the prompt runs in mixed steps");
    assert!(running.next().await.is_some(), "the running stream goes on meanwhile");
    assert_eq!(d.shards[0].live().len(), 2);
    drop(leaving);
    common::eventually("the prefilling request left the batch", DEADLINE, || async {
        d.shards
            .iter()
            .all(|s| s.live().len() == 1 && s.prefilling().is_empty())
            && d.metric("lorax_kv_blocks_used").await == Some(blocks(2 + 1500))
    })
    .await;

    // A request that stays: all its prompt details with its first token, every token after it.
    let response = d
        .post(
            "/generate",
            json!({"inputs": prompt, "parameters": {"max_new_tokens": 20, "details": true, "decoder_input_details": true}}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let v: serde_json::Value = response.json().await.expect("json");
    let prompt_len = common::tokens(&d, &prompt).await;
    assert!(prompt_len > 40, "{prompt_len} prompt tokens");
    assert_eq!(
        v["details"]["prefill"].as_array().expect("prefill").len(),
        prompt_len,
        "{v}"
    );
    assert_eq!(v["details"]["generated_tokens"], 20, "{v}");
    assert!(
        d.shards[0].mixed_steps.load(Ordering::SeqCst) >= mixed_before + prompt_len,
        "one prompt token per mixed step"
    );
    drop(running);
    common::eventually("everything freed", DEADLINE, || async {
        d.metric("lorax_kv_blocks_used").await == Some(0.0) && d.shards.iter().all(|s| s.live().is_empty())
    })
    .await;
    let metrics = d.get("/metrics").await.text().await.expect("metrics");
    assert!(
        metrics.contains("lorax_batch_inference_count{method=\"mixed\"}"),
        "{metrics}"
    );
}
