//! Mixed steps and chunked prefill through the real launcher, shard and router: concurrent requests
//! with long prompts joining a running stream give the same text, tokens, alternatives and prompt tokens,
//! and logprobs within 1e-4 (a product's rounding depends on how many rows its batch has), with a
//! 7-token prompt budget per step (every prompt cut in several chunks that do not divide it, run next to
//! the running requests' decode rows) as with mixing and chunking off (whole-prompt Prefill calls, then
//! Decode calls).
#![allow(clippy::unwrap_used)]

mod common;

use common::{golden, start};
use serde_json::{json, Value};

/// Eight prompts of about 40 to 180 tokens.
fn prompts() -> Vec<String> {
    let g = golden();
    (0..8)
        .map(|i| {
            let mut p = g.prompts[2].repeat(i % 4 + 1);
            p.push(' ');
            p.push_str(&g.prompts[i % 4]);
            p
        })
        .collect()
}

/// Every request's answer (greedy, with details) while a long stream runs, and the `mixed` step count.
async fn run(extra: &[&str]) -> (Vec<Value>, f64) {
    let server = start(extra).await;
    let base = server.base.clone();
    let client = reqwest::Client::new();
    let long = common::running_stream(&client, &base, &golden().prompts[1]).await;
    let requests = prompts().into_iter().enumerate().map(|(i, p)| {
        let client = client.clone();
        let url = format!("{base}/generate");
        async move {
            let mut body = json!({"inputs": p, "parameters": {
                "max_new_tokens": 24, "ignore_eos_token": true, "details": true,
                "decoder_input_details": i % 2 == 0,
            }});
            if i % 3 > 0 {
                body["parameters"]["top_n_tokens"] = json!(i % 3);
            }
            let r = client.post(url).json(&body).send().await.unwrap();
            let status = r.status();
            let v = r.json::<Value>().await.unwrap();
            assert_eq!(status, 200, "request {i}: {v}");
            v
        }
    });
    let answers = futures::future::join_all(requests).await;
    drop(long);
    let mixed = common::metric(&client, &base, "lorax_batch_inference_count{method=\"mixed\"}")
        .await
        .unwrap_or(0.0);
    (answers, mixed)
}

/// `got` is `want` except that fractional numbers (logprobs) may differ by 1e-4; `path` names the place.
fn assert_close(got: &Value, want: &Value, path: &str) {
    match (got, want) {
        (Value::Number(a), Value::Number(b)) if a.is_f64() || b.is_f64() => {
            let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
            assert!((a - b).abs() <= 1e-4, "{path}: {a} vs {b}");
        }
        (Value::Array(a), Value::Array(b)) => {
            assert_eq!(a.len(), b.len(), "{path}: length");
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert_close(x, y, &format!("{path}[{i}]"));
            }
        }
        (Value::Object(a), Value::Object(b)) => {
            assert_eq!(
                a.keys().collect::<Vec<_>>(),
                b.keys().collect::<Vec<_>>(),
                "{path}: fields"
            );
            for (k, x) in a {
                assert_close(x, &b[k], &format!("{path}.{k}"));
            }
        }
        _ => assert_eq!(got, want, "{path}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_mixed_steps_give_the_same_answers_as_whole_prefills() {
    let (chunked, mixed_steps) = run(&["--max-batch-prefill-chunk-tokens", "7"]).await;
    let (plain, plain_mixed) = run(&["--max-batch-prefill-chunk-tokens", "0"]).await;
    assert!(mixed_steps > 0.0, "no mixed step ran with chunking on");
    assert_eq!(plain_mixed, 0.0, "a mixed step ran with chunking off");
    for (i, (c, p)) in chunked.iter().zip(&plain).enumerate() {
        assert_eq!(c["details"]["generated_tokens"], 24, "request {i}: {c}");
        let prompt_tokens = c["details"]["prefill"].as_array().map_or(0, Vec::len);
        assert_eq!(prompt_tokens > 30, i % 2 == 0, "request {i}'s prompt details: {c}");
        assert_close(c, p, &format!("request {i}"));
    }
}
