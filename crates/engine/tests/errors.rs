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
