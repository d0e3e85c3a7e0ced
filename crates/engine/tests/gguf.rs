//! GGUF models: the tiny fixture of tests/fixtures/gguf (every supported ggml type, written by the PyPI
//! package `gguf`) read back tensor by tensor against that package's own dequantizer, the configuration
//! from its metadata, and a forward pass identical to the same weights loaded from safetensors.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;

use common::fixtures;
use lorax_engine::config::{Architecture, ModelConfig};
use lorax_engine::weights::Weights;
use lorax_engine::{CacheConfig, CpuBackend, Engine};
use lorax_gguf::GgufFile;

fn fnv1a64(values: &[f32]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in values {
        for b in v.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

fn tiny() -> std::path::PathBuf {
    fixtures().join("gguf").join("tiny-llama.gguf")
}

fn open() -> (ModelConfig, Weights) {
    let g = GgufFile::open(&tiny()).unwrap();
    let cfg = lorax_engine::gguf::config(&g).unwrap();
    let w = Weights::from_gguf(g, &cfg);
    (cfg, w)
}

#[test]
fn config_comes_from_the_metadata() {
    let (cfg, _) = open();
    assert_eq!(cfg.architecture, Architecture::Llama);
    assert_eq!((cfg.hidden_size, cfg.intermediate_size, cfg.num_layers), (256, 256, 2));
    assert_eq!((cfg.num_heads, cfg.num_kv_heads, cfg.head_dim), (4, 2, 64));
    assert_eq!(cfg.vocab_size, 299);
    assert_eq!(cfg.rope_theta, 10000.0);
    assert_eq!(cfg.max_position_embeddings, 512);
    assert!(!cfg.tie_word_embeddings);
    assert_eq!(cfg.bos_token_id, Some(1));
    assert_eq!(cfg.eos_token_ids, vec![2]);
}

/// Every tensor, dequantized and (q/k) un-permuted, equals bit for bit what the `gguf` package's
/// dequantizer plus transformers' reverse permutation give (hashes recorded by make_fixture.py).
#[test]
fn every_type_dequantizes_like_the_reference() {
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("gguf/reference.json")).unwrap()).unwrap();
    let tensors = reference["tensors"].as_object().unwrap();
    let (_, w) = open();
    let mut names: Vec<&str> = w.names();
    names.sort_unstable();
    let mut expected: Vec<&str> = tensors.keys().map(String::as_str).collect();
    expected.sort_unstable();
    assert_eq!(names, expected);
    let mut types = BTreeMap::new();
    for (name, r) in tensors {
        let t = w.get(name).unwrap();
        let shape: Vec<usize> = r["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(t.shape, shape, "{name}");
        let values = t.to_f32();
        assert!(values.iter().all(|v| v.is_finite()), "{name}");
        assert_eq!(
            fnv1a64(&values),
            r["fnv1a64"].as_str().unwrap(),
            "{name} ({})",
            r["type"]
        );
        *types.entry(r["type"].as_str().unwrap().to_string()).or_insert(0) += 1;
    }
    // The fixture really covers every type the server claims to read.
    for ty in [
        "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    ] {
        assert!(types.contains_key(ty), "fixture has no {ty} tensor");
    }
}

/// The GGUF model computes exactly what the same weights and configuration do from safetensors.
#[test]
fn forward_pass_equals_the_same_weights_from_safetensors() {
    let (_, w) = open();
    let dir = tempfile::tempdir().unwrap();
    let owned: Vec<(String, Vec<usize>, Vec<u8>)> = w
        .names()
        .into_iter()
        .map(|n| {
            let t = w.get(n).unwrap();
            (n.to_string(), t.shape.clone(), t.data.into_owned())
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
        .iter()
        .map(|(n, shape, data)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 299, "hidden_size": 256,
            "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512,
            "tie_word_embeddings": false, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}"#,
    )
    .unwrap();
    let cache = CacheConfig {
        num_blocks: 64,
        block_size: 16,
    };
    let mut a = Engine::load(CpuBackend, &tiny(), cache).unwrap();
    let mut b = Engine::load(CpuBackend, dir.path(), cache).unwrap();
    assert_eq!(a.config(), b.config());
    let ids: Vec<u32> = (0..40).map(|i| (i * 37 + 5) % 299).collect();
    let table: Vec<u32> = vec![3, 1, 2];
    let la = a.logits(&[(&ids, 0, &table)], &[true]).unwrap();
    let lb = b.logits(&[(&ids, 0, &table)], &[true]).unwrap();
    assert_eq!(la, lb);
    assert!(la.iter().flatten().all(|v| v.is_finite()));
    // Not a constant function: different prompts give different last logits.
    let other: Vec<u32> = (0..40).map(|i| (i * 11 + 3) % 299).collect();
    let lc = a.logits(&[(&other, 0, &table)], &[false]).unwrap();
    assert_ne!(la.last(), lc.last());
}

#[test]
fn unsupported_and_corrupt_files_are_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("broken.gguf");
    let bytes = std::fs::read(tiny()).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = Engine::load(
        CpuBackend,
        &p,
        CacheConfig {
            num_blocks: 8,
            block_size: 16,
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("broken.gguf") && e.contains("outside the file"), "{e}");
}
