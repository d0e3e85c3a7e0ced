//! `--load-format dummy` on the CPU: a model made from config.json alone loads, is deterministic, keeps
//! its activations finite and sane through a deep stack, and tensor-parallel ranks (each generating only
//! its own slices) serve the same model as one rank: equal logits (1e-4) and greedy tokens. Also the
//! adapters of every linear layer that the GPU profiler's `-all` scenarios write.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

mod common;

use common::rel_err;
use lorax_engine::comm::{Communicator, LocalGroup, SingleRank};
use lorax_engine::{CacheConfig, CpuBackend, Engine, LoadFormat};

const CACHE: CacheConfig = CacheConfig {
    num_blocks: 128,
    block_size: 8,
};
const N_NEW: usize = 24;

/// A Llama-shaped config (GQA 4/2, untied head) with `layers` layers; no weight files beside it.
fn config_dir(layers: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
        "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2
    });
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    dir
}

fn dummy(seed: u64) -> LoadFormat {
    LoadFormat::Dummy { seed }
}

fn load(dir: &Path, comm: Arc<dyn Communicator>, seed: u64) -> Engine<CpuBackend> {
    Engine::load_with_format(CpuBackend, dir, CACHE, comm, dummy(seed)).unwrap()
}

fn run(e: &mut Engine<CpuBackend>, prompts: &[Vec<u32>]) -> (Vec<Vec<f32>>, Vec<Vec<u32>>) {
    common::last_logits_and_greedy(e, CACHE, prompts, N_NEW)
}

fn prompts() -> Vec<Vec<u32>> {
    vec![vec![1, 17, 300, 42, 9], vec![1, 5], (1..40).collect()]
}

#[test]
fn dummy_model_is_deterministic_and_sane_through_many_layers() {
    let dir = config_dir(48);
    let (a, ga) = run(&mut load(dir.path(), Arc::new(SingleRank), 1), &prompts());
    let (b, gb) = run(&mut load(dir.path(), Arc::new(SingleRank), 1), &prompts());
    assert_eq!(a, b, "same seed, same logits");
    assert_eq!(ga, gb);
    let (c, _) = run(&mut load(dir.path(), Arc::new(SingleRank), 2), &prompts());
    assert!(rel_err(&c[0], &a[0]) > 0.1, "another seed is another model");
    for row in &a {
        assert!(row.iter().all(|v| v.is_finite()));
        let rms = (row.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / row.len() as f64).sqrt();
        // Unit-RMS hidden state times an lm_head of ±1/sqrt(hidden): logits of RMS about 0.6.
        assert!((0.1..5.0).contains(&rms), "logit RMS {rms} after 48 layers");
    }
    // Different prompts give different next-token distributions.
    assert!(rel_err(&a[0], &a[1]) > 0.01);
    // No weight file was needed.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn dummy_model_shards_serve_the_one_rank_model() {
    let dir = config_dir(3);
    let (one_logits, one_greedy) = run(&mut load(dir.path(), Arc::new(SingleRank), 7), &prompts());
    for world in [2, 4] {
        let handles: Vec<_> = LocalGroup::new(world)
            .into_iter()
            .map(|member| {
                let path = dir.path().to_path_buf();
                std::thread::spawn(move || run(&mut load(&path, Arc::new(member), 7), &prompts()))
            })
            .collect();
        for (rank, h) in handles.into_iter().enumerate() {
            let (logits, greedy) = h.join().unwrap();
            for (p, row) in logits.iter().enumerate() {
                let err = rel_err(row, &one_logits[p]);
                assert!(err < 1e-4, "TP={world} rank {rank} p{p}: rel err {err:e} vs one rank");
            }
            assert_eq!(greedy, one_greedy, "TP={world} rank {rank}: greedy tokens");
        }
    }
}

/// The profiler's `-all` scenarios (cuda_graphs) write adapters of every linear layer with
/// `common::write_adapter_of`: such an adapter parses with all seven targets in every layer, at the written
/// rank, and loads into the engine; a q/k/v/o one has only those four.
#[test]
fn adapters_of_every_linear_layer_load_with_all_targets() {
    use lorax_engine::lora::{HostAdapter, NUM_TARGETS};
    let dir = config_dir(3);
    let mut e = load(dir.path(), Arc::new(SingleRank), 1);
    for (mlp, targets) in [(true, NUM_TARGETS), (false, 4)] {
        let a = dir.path().join(format!("adapter-{mlp}"));
        common::write_adapter_of(&a, e.config(), 8, lorax_engine::weights::DType::BF16, 3, mlp);
        let host = HostAdapter::load(&a, e.config(), 64).unwrap();
        assert_eq!(host.max_rank, 8);
        for (l, layer) in host.layers.iter().enumerate() {
            assert_eq!(layer.iter().flatten().count(), targets, "layer {l}, mlp {mlp}");
        }
        e.load_adapter(&format!("a-{mlp}"), &host).unwrap();
    }
}
