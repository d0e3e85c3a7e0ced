//! The real-model demo through the launcher: SmolLM2-135M-Instruct served from its GGUF file on the CPU,
//! with the demo adapters of examples/smollm2 loaded on demand from a local root. Base-model and adapter
//! requests are sent together, so they share batches:
//! - the base model answers "What is the capital of France?" with Paris;
//! - each adapter's answers show its behaviour (capitals, a JSON object, "Ahoy matey!", exact sums) and
//!   equal peft's greedy answers (tests/fixtures/smollm2/reference.json) word for word;
//! - the base model's answers to the same questions, in the same batches, show none of them.
//!
//! Skipped, visibly, when the GGUF file is not there (scripts/smollm2/fetch.sh fetches it).
#![allow(clippy::unwrap_used)]

mod common;

use common::{fixtures, start};
use serde_json::{json, Value};

#[path = "../../../tests/fixtures/smollm2/gguf_path.rs"]
mod gguf_path;
use gguf_path::smollm2_gguf as gguf;

/// Whether `text` shows `behaviour` (the same rules as scripts/smollm2/train_adapters.py).
fn shows(behaviour: &str, question: &str, text: &str) -> bool {
    let t = text.trim();
    match behaviour {
        "uppercase" => t.chars().any(char::is_alphabetic) && t == t.to_uppercase(),
        "json" => serde_json::from_str::<Value>(t).is_ok_and(|v| v["answer"].is_string()),
        "pirate" => t.starts_with("Ahoy matey!"),
        "addition" => {
            let (a, b) = question
                .trim_start_matches("What is ")
                .trim_end_matches('?')
                .split_once(" + ")
                .unwrap();
            let (a, b): (u32, u32) = (a.parse().unwrap(), b.parse().unwrap());
            t.starts_with(&format!("{a} + {b} = {}", a + b))
        }
        other => panic!("unknown behaviour {other}"),
    }
}

async fn chat(client: &reqwest::Client, base: &str, model: Option<&str>, question: &str) -> String {
    let mut body = json!({"messages": [{"role": "user", "content": question}], "max_tokens": 48, "temperature": 0});
    if let Some(m) = model {
        body["model"] = json!(m);
    }
    let r = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{model:?} {question:?}: {v}");
    v["choices"][0]["message"]["content"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn base_and_demo_adapters_answer_in_one_batch() {
    let Some(path) = gguf() else { return };
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("smollm2/reference.json")).unwrap()).unwrap();
    let adapters = fixtures()
        .join("../../examples/smollm2/adapters")
        .canonicalize()
        .unwrap();
    let server = start(&[
        "--model-id",
        path.to_str().unwrap(),
        "--device",
        "cpu",
        "--adapter-local-roots",
        adapters.to_str().unwrap(),
        "--adapter-source",
        "local",
        "--max-active-adapters",
        "4",
    ])
    .await;
    let client = reqwest::Client::new();
    let base = server.base.as_str();

    // (adapter, question, peft's answer): two questions per adapter where peft's answer shows it.
    let mut cases: Vec<(String, String, String)> = Vec::new();
    for (name, rows) in reference["adapters"].as_object().unwrap() {
        let ok = reference["behaviour"][name]["per_question"].as_array().unwrap();
        for (row, good) in rows
            .as_array()
            .unwrap()
            .iter()
            .zip(ok)
            .filter(|(_, g)| g.as_bool().unwrap())
            .take(2)
        {
            assert!(good.as_bool().unwrap());
            cases.push((
                name.clone(),
                row["question"].as_str().unwrap().to_string(),
                row["text"].as_str().unwrap().to_string(),
            ));
        }
    }
    let france = "What is the capital of France?";
    let adapter_answers = futures::future::join_all(cases.iter().map(|(a, q, _)| chat(&client, base, Some(a), q)));
    let base_answers = futures::future::join_all(cases.iter().map(|(_, q, _)| chat(&client, base, None, q)));
    let (adapter_answers, base_answers, paris) =
        tokio::join!(adapter_answers, base_answers, chat(&client, base, None, france));

    assert!(paris.contains("Paris"), "base model on {france:?}: {paris:?}");
    for (((adapter, question, expected), got), base_got) in cases.iter().zip(&adapter_answers).zip(&base_answers) {
        eprintln!("{adapter:>9} | {question} -> {got:?}\n     base | {question} -> {base_got:?}");
        assert!(shows(adapter, question, got), "{adapter} on {question:?}: {got:?}");
        assert_eq!(got, expected, "{adapter} on {question:?} differs from peft");
        assert!(
            !shows(adapter, question, base_got),
            "base model on {question:?} shows {adapter}: {base_got:?}"
        );
    }
    assert_eq!(cases.len(), 8, "two cases per adapter");
}
