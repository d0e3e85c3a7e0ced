//! Bad checkpoints and bad batches give typed errors, never panics.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::fixtures;
use lorax_engine::weights::Weights;
use lorax_engine::{CacheConfig, CpuBackend, Engine, EngineError};

const CACHE: CacheConfig = CacheConfig {
    num_blocks: 16,
    block_size: 4,
};

/// A copy of the mistral fixture (single file) that a test may damage.
fn copy_model(dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("models/mistral").join(f), dst.join(f)).unwrap();
    }
}

fn load(dir: &Path) -> EngineError {
    match Engine::load(CpuBackend, dir, CACHE) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn missing_files_are_io_errors() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(matches!(load(tmp.path()), EngineError::Io { .. }));
    std::fs::copy(
        fixtures().join("models/mistral/config.json"),
        tmp.path().join("config.json"),
    )
    .unwrap();
    std::fs::write(tmp.path().join("pytorch_model.bin"), b"pickle").unwrap();
    let e = load(tmp.path());
    assert!(e.to_string().contains("pickle"), "{e}");
}

#[test]
fn truncated_or_garbage_weights_are_corrupt() {
    let tmp = tempfile::tempdir().unwrap();
    copy_model(tmp.path());
    let w = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(load(tmp.path()), EngineError::CorruptWeights { .. }));
    std::fs::write(&w, b"\xff\xff\xff\xff\xff\xff\xff\xffnot a header").unwrap();
    assert!(matches!(load(tmp.path()), EngineError::CorruptWeights { .. }));
}

#[test]
fn unknown_architecture_and_bad_config() {
    let tmp = tempfile::tempdir().unwrap();
    copy_model(tmp.path());
    let cfg = tmp.path().join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("MistralForCausalLM", "FalconForCausalLM")
            .replace("\"mistral\"", "\"falcon\""),
    )
    .unwrap();
    assert!(matches!(load(tmp.path()), EngineError::UnsupportedArchitecture(ref a) if a == "FalconForCausalLM"));
    std::fs::write(&cfg, "{").unwrap();
    assert!(matches!(load(tmp.path()), EngineError::Config { .. }));
}

fn write_safetensors(path: &Path, tensors: Vec<(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)>) {
    let views: HashMap<String, safetensors::tensor::TensorView<'_>> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                (*n).to_string(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn unsupported_dtype_and_shape_mismatch_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("model.safetensors");
    write_safetensors(
        &p,
        vec![
            ("ints", safetensors::Dtype::I32, vec![2], vec![0; 8]),
            ("floats", safetensors::Dtype::F32, vec![2, 3], vec![0; 24]),
        ],
    );
    let w = Weights::from_files(&[p]).unwrap();
    assert!(matches!(w.get("ints"), Err(EngineError::UnsupportedDtype { ref name, .. }) if name == "ints"));
    assert!(matches!(
        w.get_checked("floats", &[3, 2]),
        Err(EngineError::ShapeMismatch { .. })
    ));
    assert!(matches!(w.get("absent"), Err(EngineError::MissingTensor(ref n)) if n == "absent"));
    assert_eq!(w.get_checked("floats", &[2, 3]).unwrap().to_f32(), vec![0.0; 6]);
}

#[test]
fn bad_batches_are_refused_without_panicking() {
    let mut e = Engine::load(CpuBackend, &fixtures().join("models/mistral"), CACHE).unwrap();
    // Token outside the vocabulary.
    let r = e.logits(&[(&[1, 40000], 0, &[0])], &[false]);
    assert!(matches!(r, Err(EngineError::InvalidBatch(_))), "{r:?}");
    // Block table too short for the tokens.
    let r = e.logits(&[(&[1, 2, 3, 4, 5], 0, &[0])], &[false]);
    assert!(matches!(r, Err(EngineError::InvalidBatch(_))), "{r:?}");
    // Block id outside the cache.
    let r = e.logits(&[(&[1, 2], 0, &[99])], &[false]);
    assert!(matches!(r, Err(EngineError::InvalidBatch(_))), "{r:?}");
    // Empty sequence.
    let r = e.logits(&[(&[], 0, &[0])], &[false]);
    assert!(matches!(r, Err(EngineError::InvalidBatch(_))), "{r:?}");
    // Still serves afterwards.
    assert_eq!(e.logits(&[(&[1, 2], 0, &[0])], &[false]).unwrap().len(), 1);
}

/// An adapter comes from whoever published it. Its `rank_pattern` keys (regular expressions) are bounded
/// in number, length and compiled size, and a weights file larger than any adapter within the rank limit
/// can be is refused before it is read: each of these once let one adapter take gigabytes of a shard's
/// memory. A parsed adapter counts the host memory it holds, its file's header included.
#[test]
fn hostile_adapter_files_are_refused_cheaply() {
    use lorax_engine::lora::HostAdapter;
    let cfg = lorax_engine::ModelConfig::from_file(&fixtures().join("models/llama/config.json")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixtures().join("adapters/lora-r8").join(f), dir.join(f)).unwrap();
    }
    let weights = dir.join("adapter_model.safetensors");
    let on_disk = std::fs::metadata(&weights).unwrap().len() as usize;
    let good = HostAdapter::load(dir, &cfg, 64).unwrap();
    assert!(good.held_bytes >= on_disk, "{} < {on_disk}", good.held_bytes);
    assert!(good.bytes < good.held_bytes, "{} vs {}", good.bytes, good.held_bytes);

    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    let with_patterns = |patterns: serde_json::Value| {
        let mut c = config.clone();
        c["rank_pattern"] = patterns;
        std::fs::write(dir.join("adapter_config.json"), c.to_string()).unwrap();
        let started = std::time::Instant::now();
        let Err(e) = HostAdapter::load(dir, &cfg, 64) else {
            panic!("loaded")
        };
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        e.to_string()
    };
    let many: serde_json::Map<String, serde_json::Value> = (0..1025)
        .map(|i| (format!("layers.{i}.q_proj"), serde_json::json!(8)))
        .collect();
    let e = with_patterns(serde_json::Value::Object(many));
    assert!(e.contains("at most 1024"), "{e}");
    let e = with_patterns(serde_json::json!({ "x".repeat(2000): 8 }));
    assert!(e.contains("at most 1024"), "{e}");
    // Unicode classes repeated: 11 MB compiled each under regex's default limit.
    let e = with_patterns(serde_json::json!({ r"\w{200}0": 8 }));
    assert!(e.contains("usable regular expression"), "{e}");
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();

    // A 64 GiB file (sparse: nothing is written) for a model whose adapters take a few MB at rank 64.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_len(64 << 30)
        .unwrap();
    let started = std::time::Instant::now();
    let Err(e) = HostAdapter::load(dir, &cfg, 64) else {
        panic!("a 64 GiB adapter file loaded")
    };
    let e = e.to_string();
    assert!(e.contains("more than the"), "{e}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}
