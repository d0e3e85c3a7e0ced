//! A backlog against fake shards: while a whole `--max-batch-prefill-tokens` of prompts queues behind the
//! admitted ones, a mixed step runs the admitted prompts whole instead of one chunk. Its own test binary:
//! the metrics recorder is process-wide, and `mixed.rs` reads the KV block gauge, which this test's
//! requests would move (they did, in a CI run, when both tests shared a binary).

mod common;

use std::time::Duration;

use common::{Deployment, Setup, SseReader};
use serde_json::json;

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
    let prompt_len = common::tokens(&d, &prompt).await;
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
