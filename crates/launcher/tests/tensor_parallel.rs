//! Tensor parallelism through the real processes: `--num-shard 2` starts two CPU shard processes that
//! each hold half of the model and sum their partial results over the Unix-socket all-reduce. Answers
//! equal transformers' (base model) and peft's (adapters), in one mixed batch.
#![allow(clippy::unwrap_used)]

mod common;

use common::{fixtures, golden, peft_greedy, start};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_cpu_shards_match_transformers_and_peft() {
    let roots = format!("--adapter-local-roots={}", fixtures().join("adapters").display());
    let server = start(&["--num-shard", "2", &roots]).await;
    let client = reqwest::Client::new();
    let info: Value = client
        .get(format!("{}/info", server.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["num_shards"], 2, "{info}");
    let g = golden();
    let mut handles = Vec::new();
    for p in 0..g.prompts.len() {
        for adapter in [None, Some("lora-r16-all"), Some("rslora-r16-patterns")] {
            let (client, base, inputs) = (client.clone(), server.base.clone(), g.prompts[p].clone());
            handles.push(tokio::spawn(async move {
                let mut params = json!({"max_new_tokens": 32, "details": true, "ignore_eos_token": true});
                if let Some(a) = adapter {
                    params["adapter_id"] = json!(a);
                    params["adapter_source"] = json!("local");
                }
                let r = client
                    .post(format!("{base}/generate"))
                    .json(&json!({"inputs": inputs, "parameters": params}))
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let v: Value = r.json().await.unwrap();
                (p, adapter, status, v)
            }));
        }
    }
    for h in handles {
        let (p, adapter, status, v) = h.await.unwrap();
        assert_eq!(status, 200, "p{p} {adapter:?}: {v}");
        let ids: Vec<u32> = v["details"]["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_u64().unwrap() as u32)
            .collect();
        let expect = match adapter {
            Some(a) => peft_greedy(a, p),
            None => g.greedy[p].clone(),
        };
        assert_eq!(ids, expect, "p{p} {adapter:?} with two shards");
    }
}

/// The same group meeting over TCP (`--master-addr`/`--master-port`, the multi-host rendezvous).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_cpu_shards_meet_over_tcp() {
    let port = common::free_port().to_string();
    let server = start(&["--num-shard", "2", "--master-addr", "127.0.0.1", "--master-port", &port]).await;
    let g = golden();
    let ids = common::generate(&reqwest::Client::new(), &server.base, &g.prompts[2], 32).await;
    assert_eq!(ids, g.greedy[2], "two shards over TCP");
    assert!(
        server.log_text().contains("Tcp(\"127.0.0.1:"),
        "the shards should have met over TCP"
    );
}

/// `--load-format dummy`: a model directory with only config.json and tokenizer.json serves (random
/// weights made from the config), and two CPU shards, each generating only its own slices, answer with
/// the one-shard model's greedy tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dummy_weights_serve_and_two_shards_match_one() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("models/llama/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    std::fs::copy(
        fixtures().join("tokenizer/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let model = dir.path().to_str().unwrap();
    let g = golden();
    let client = reqwest::Client::new();
    let mut tokens = Vec::new();
    for shards in ["1", "2"] {
        let server = start(&["--model-id", model, "--load-format", "dummy", "--num-shard", shards]).await;
        let mut answers = Vec::new();
        for p in [0, 2] {
            answers.push(common::generate(&client, &server.base, &g.prompts[p], 24).await);
        }
        assert!(answers.iter().all(|a| a.len() == 24));
        tokens.push(answers);
    }
    assert_eq!(tokens[0], tokens[1], "two dummy shards vs one");
    assert_ne!(
        tokens[0][0],
        g.greedy[0][..24],
        "dummy weights are not the checkpoint's"
    );
}
