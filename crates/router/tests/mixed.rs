//! Mixed steps against fake shards, with a one-token prompt budget per step: on an idle server a prompt runs
//! whole in one step (nobody waits for it); a request joining a running
//! stream is prefilled over many mixed steps (the running stream keeps getting tokens), gets its whole
//! prompt details with its first token, and a client that leaves while its request is still prefilling
//! frees its blocks and its place in the shards' batch; while requests queue behind admitted prompts (a
//! backlog), a step runs those prompts whole. Its own test binary, so no other test's requests share the
//! process-wide metrics.

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
    let prompt_len = tokens(&d, &prompt).await;
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

#[tokio::test]
async fn a_backlog_runs_admitted_prompts_whole() {
    // One prompt of about 30 tokens fits the prefill budget of 40 at a time: the others queue behind it.
    let d = Deployment::start(Setup {
        step_delay: Duration::from_millis(2),
        flags: [
            "--max-batch-prefill-chunk-tokens",
            "1",
            "--max-batch-prefill-tokens",
            "40",
            "--max-input-length",
            "40",
            "--max-total-tokens",
            "64",
        ]
        .map(String::from)
        .to_vec(),
        ..Setup::default()
    })
    .await;
    let long = json!({"inputs": "Hello", "parameters": {"max_new_tokens": 60}});
    let mut running = SseReader::new(d.post("/generate_stream", long).await);
    assert!(running.next().await.is_some());
    let prompt = "The capital of France is Paris. ".repeat(4);
    // Two such prompts queued must reach the budget of 40 and one must not.
    let prompt_len = tokens(&d, &prompt).await;
    assert!((20..40).contains(&prompt_len), "{prompt_len} prompt tokens");
    let burst: Vec<_> = (0..3)
        .map(|_| {
            let body = json!({"inputs": prompt, "parameters": {"max_new_tokens": 2, "details": true}});
            let post = d.post("/generate", body);
            async move {
                let response = post.await;
                assert_eq!(response.status(), 200);
                let v: serde_json::Value = response.json().await.expect("json");
                assert_eq!(v["details"]["generated_tokens"], 2, "{v}");
            }
        })
        .collect();
    futures::future::join_all(burst).await;
    let budgets = d.shards[0].mixed_budgets.lock().expect("lock").clone();
    // Whatever the arrival order, one step sees the other two (60 tokens) queued behind the admitted
    // prompt; after it, at most one prompt is queued.
    assert_eq!(
        budgets.iter().filter(|&&b| b == 40).count(),
        1,
        "one backlog step runs the admitted prompt whole: {budgets:?}"
    );
    assert!(
        budgets.contains(&1),
        "the last prompt, with nobody queued behind it, runs in chunks: {budgets:?}"
    );
    drop(running);
}

/// Tokens of `prompt` as the router counts them (`/tokenize`).
async fn tokens(d: &Deployment, prompt: &str) -> usize {
    let tokenized: serde_json::Value = d
        .post("/tokenize", json!({"inputs": prompt}))
        .await
        .json()
        .await
        .expect("json");
    tokenized.as_array().expect("tokens").len()
}
