//! Tensor parallelism on GPUs: dummy weights made on the device equal the host's values (rounded to
//! the storage type), NCCL sums device tensors across two GPUs, and a dummy model split over two GPUs
//! (NCCL all-reduce) gives the one-GPU logits and greedy tokens. Without a device, or with fewer than
//! two GPUs or no NCCL for the two-GPU tests, each test prints `SKIPPED: ...` and returns.
#![allow(clippy::unwrap_used)]

mod common;
mod cuda_common;

use std::path::Path;
use std::sync::Arc;

use cuda_common::{backend, rel_err, round, say};
use lorax_engine::backend::cuda::nccl;
use lorax_engine::comm::{Communicator, LocalGroup, SingleRank};
use lorax_engine::dummy::{fill_for, DummySpec};
use lorax_engine::weights::DType;
use lorax_engine::{Backend, CacheConfig, CudaBackend, Engine, LoadFormat};

/// Two devices and NCCL, or why not (printed as SKIPPED).
fn two_gpus() -> Option<usize> {
    let why = match CudaBackend::probe() {
        Err(why) => format!("no CUDA device ({why})"),
        Ok(n) if n < 2 => format!("{n} CUDA device, two needed"),
        Ok(_) if !nccl::nccl_present() => "NCCL (libnccl.so) not found".into(),
        Ok(n) => return Some(n),
    };
    say(&format!("SKIPPED: {why}"));
    None
}

#[test]
fn dummy_weights_on_the_device_equal_the_host_values() {
    for dtype in [DType::BF16, DType::F32] {
        let Some(b) = backend(dtype) else { return };
        for (name, full, split) in [
            ("model.layers.0.self_attn.q_proj.weight", vec![96, 80], None),
            ("model.layers.0.self_attn.q_proj.weight", vec![96, 80], Some((0, 1, 2))),
            ("model.layers.3.mlp.down_proj.weight", vec![64, 300], Some((1, 2, 3))),
            ("model.embed_tokens.weight", vec![1000, 64], None),
            ("model.norm.weight", vec![64], None),
        ] {
            let spec = DummySpec::new(name, &full, split, fill_for(11, name, full[full.len() - 1])).unwrap();
            let got = b.to_f32(&b.dummy_weight(&spec).unwrap()).unwrap();
            let want = round(dtype, &spec.host_values());
            assert_eq!(b.shape(&b.dummy_weight(&spec).unwrap()), spec.shape.as_slice());
            assert!(
                got == want,
                "{dtype:?} {name} {split:?}: device values differ from the host's"
            );
        }
        say(&format!("dummy weights {dtype:?}: device == host, bit for bit"));
    }
}

#[test]
fn nccl_sums_device_tensors_across_two_gpus() {
    if two_gpus().is_none() {
        return;
    }
    for dtype in [DType::F32, DType::BF16] {
        // A fresh id per group.
        let id = nccl::unique_id().unwrap();
        let handles: Vec<_> = LocalGroup::new(2)
            .into_iter()
            .map(|member| {
                std::thread::spawn(move || {
                    let rank = member.rank();
                    let mut b = CudaBackend::new(rank, dtype).unwrap();
                    b.attach_nccl(&id, rank, 2).unwrap();
                    let n = 8192 + 3;
                    let v: Vec<f32> = (0..n).map(|i| ((i % 97) as f32) * (rank as f32 + 1.0) / 64.0).collect();
                    let mut t = b.tensor_from_f32(&[1, n], &v).unwrap();
                    for _ in 0..3 {
                        b.all_reduce_sum(&mut t, &member).unwrap();
                    }
                    let sum = b.to_f32(&t).unwrap();
                    // Latency of the sums a 8192-wide model makes (two per layer), at batch 1 and 64.
                    let mut timings = Vec::new();
                    for rows in [1, 64] {
                        let mut x = b.tensor_from_f32(&[rows, 8192], &vec![0.5; rows * 8192]).unwrap();
                        b.all_reduce_sum(&mut x, &member).unwrap();
                        b.synchronize().unwrap();
                        let t0 = std::time::Instant::now();
                        for _ in 0..200 {
                            b.all_reduce_sum(&mut x, &member).unwrap();
                        }
                        b.synchronize().unwrap();
                        timings.push((rows, t0.elapsed().as_secs_f64() / 200.0 * 1e6));
                    }
                    (sum, timings)
                })
            })
            .collect();
        let (outs, timings): (Vec<Vec<f32>>, Vec<_>) = handles.into_iter().map(|h| h.join().unwrap()).unzip();
        // x and 2x summed three times: 3x, 6x, 12x (bf16 rounds some of these multiples of 1/64).
        let want: Vec<f32> = (0..outs[0].len()).map(|i| ((i % 97) as f32) * 12.0 / 64.0).collect();
        assert_eq!(outs[0], outs[1], "{dtype:?}: ranks got different bits");
        let err = rel_err(&outs[0], &want);
        assert!(err < 1e-2, "{dtype:?}: rel err {err:e}");
        say(&format!(
            "nccl all-reduce {dtype:?} over 2 GPUs: rel err {err:.1e}, ranks bit-identical; rank 0 time per sum: {}",
            timings[0]
                .iter()
                .map(|(rows, us)| format!("[{rows} x 8192] {us:.1} us"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
}

const CACHE: CacheConfig = CacheConfig {
    num_blocks: 256,
    block_size: 16,
};

fn config(dir: &Path) {
    let cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 6,
        "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128, "vocab_size": 4096,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
}

/// Last-position logits of three prompts, and 32 greedy tokens for all of them in one batch.
fn run(e: &mut Engine<CudaBackend>) -> (Vec<Vec<f32>>, Vec<Vec<u32>>) {
    let prompts: Vec<Vec<u32>> = vec![vec![1, 77, 900, 4000, 12], (1..200).collect(), vec![1, 2, 3]];
    common::last_logits_and_greedy(e, CACHE, &prompts, 32)
}

#[test]
fn dummy_model_over_nccl_on_two_gpus_matches_one_gpu() {
    if two_gpus().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    config(dir.path());
    let format = LoadFormat::Dummy { seed: 3 };
    for dtype in [DType::F32, DType::BF16] {
        let mut one = Engine::load_with_format(
            CudaBackend::new(0, dtype).unwrap(),
            dir.path(),
            CACHE,
            Arc::new(SingleRank),
            format,
        )
        .unwrap();
        let (one_logits, one_greedy) = run(&mut one);
        drop(one);
        let id = nccl::unique_id().unwrap();
        let handles: Vec<_> = LocalGroup::new(2)
            .into_iter()
            .map(|member| {
                let path = dir.path().to_path_buf();
                std::thread::spawn(move || {
                    let rank = member.rank();
                    let mut b = CudaBackend::new(rank, dtype).unwrap();
                    b.attach_nccl(&id, rank, 2).unwrap();
                    let comm: Arc<dyn Communicator> = Arc::new(member);
                    run(&mut Engine::load_with_format(b, &path, CACHE, comm, format).unwrap())
                })
            })
            .collect();
        let ranks: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(ranks[0], ranks[1], "{dtype:?}: the two ranks disagree");
        let (logits, greedy) = &ranks[0];
        let worst = logits
            .iter()
            .zip(&one_logits)
            .map(|(a, b)| rel_err(a, b))
            .fold(0f64, f64::max);
        let same: usize = greedy
            .iter()
            .zip(&one_greedy)
            .map(|(a, b)| a.iter().zip(b).take_while(|(x, y)| x == y).count())
            .sum();
        say(&format!(
            "TP=2 (NCCL) vs TP=1 dummy model {dtype:?}: logits rel err {worst:.2e}, greedy {same}/{} leading tokens equal",
            32 * greedy.len()
        ));
        // bf16: both sides round every activation to 8 bits (the goldens' bf16 bound vs f32 is 5e-2).
        let bound = if dtype == DType::F32 { 1e-4 } else { 1e-1 };
        assert!(worst < bound, "{dtype:?}: logits rel err {worst:e} vs one GPU");
        if dtype == DType::F32 {
            assert_eq!(greedy, &one_greedy, "f32: greedy tokens differ from one GPU");
        }
    }
}
