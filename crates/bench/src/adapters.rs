//! Random PEFT LoRA adapters for a base model, for benchmarks with many adapters.
//!
//! Each adapter is a folder with `adapter_config.json` and `adapter_model.safetensors`, named as peft
//! names them (`base_model.model.model.layers.{l}.self_attn.q_proj.lora_A.weight`). A is uniform in
//! ±1/√in and B uniform in ±0.01, so every adapter changes the output (a zero B would make it a no-op)
//! without swamping the base model. Values come from a SplitMix64 stream per adapter: a thousand rank-16
//! adapters for a 7B model are generated at disk speed.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use lorax_engine::config::ModelConfig;
use lorax_engine::weights::DType;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// What to generate.
#[derive(Clone, Debug)]
pub struct AdapterSpec {
    /// LoRA rank.
    pub rank: usize,
    /// lora_alpha.
    pub alpha: f64,
    /// Target projections: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.
    pub targets: Vec<String>,
    /// Storage type: float16, bfloat16 or float32.
    pub dtype: String,
    /// `base_model_name_or_path` written in the config.
    pub base_model: String,
}

/// (input width, output width, module path) of a target projection.
fn dims(cfg: &ModelConfig, target: &str) -> anyhow::Result<(usize, usize, &'static str)> {
    let (h, q, kv, f) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);
    Ok(match target {
        "q_proj" => (h, q, "self_attn"),
        "k_proj" => (h, kv, "self_attn"),
        "v_proj" => (h, kv, "self_attn"),
        "o_proj" => (q, h, "self_attn"),
        "gate_proj" => (h, f, "mlp"),
        "up_proj" => (h, f, "mlp"),
        "down_proj" => (f, h, "mlp"),
        other => bail!("unknown target {other:?} (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"),
    })
}

struct SplitMix(u64);

impl SplitMix {
    /// Uniform in [-1, 1).
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        ((z >> 40) as f32) * (2.0 / (1u64 << 24) as f32) - 1.0
    }
}

/// Writes adapter number `index` (seeded by `seed` and `index`) for the model `cfg` into `dir`.
pub fn write_adapter(dir: &Path, cfg: &ModelConfig, spec: &AdapterSpec, seed: u64, index: u64) -> anyhow::Result<()> {
    let (dtype, stored) = match spec.dtype.as_str() {
        "float16" | "f16" => (Dtype::F16, DType::F16),
        "bfloat16" | "bf16" => (Dtype::BF16, DType::BF16),
        "float32" | "f32" => (Dtype::F32, DType::F32),
        other => bail!("dtype {other:?}: use float16, bfloat16 or float32"),
    };
    let mut rng = SplitMix(seed ^ index.wrapping_mul(0xa076_1d64_78bd_642f));
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for layer in 0..cfg.num_layers {
        for target in &spec.targets {
            let (input, output, module) = dims(cfg, target)?;
            let prefix = format!("base_model.model.model.layers.{layer}.{module}.{target}");
            let a_scale = 1.0 / (input as f32).sqrt();
            let a: Vec<f32> = (0..spec.rank * input).map(|_| rng.next() * a_scale).collect();
            let b: Vec<f32> = (0..output * spec.rank).map(|_| rng.next() * 0.01).collect();
            let (a, b) = (stored.encode(&a), stored.encode(&b));
            tensors.push((format!("{prefix}.lora_A.weight"), vec![spec.rank, input], a));
            tensors.push((format!("{prefix}.lora_B.weight"), vec![output, spec.rank], b));
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let views = tensors
        .iter()
        .map(|(name, shape, data)| Ok((name.clone(), TensorView::new(dtype, shape.clone(), data)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, &dir.join("adapter_model.safetensors"))?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": spec.base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "target_modules": spec.targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
    });
    std::fs::write(dir.join("adapter_config.json"), serde_json::to_vec_pretty(&config)?)?;
    Ok(())
}

/// Writes `count` adapters named by `name_template` (`{i}` is the number) under `out`, in parallel over
/// `threads` threads; returns their folders.
pub fn write_adapters(
    out: &Path,
    cfg: &ModelConfig,
    spec: &AdapterSpec,
    count: usize,
    name_template: &str,
    seed: u64,
    threads: usize,
) -> anyhow::Result<Vec<PathBuf>> {
    let dirs: Vec<PathBuf> = (0..count)
        .map(|i| out.join(name_template.replace("{i}", &i.to_string())))
        .collect();
    let threads = threads.clamp(1, count.max(1));
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let dirs = &dirs;
                s.spawn(move || -> anyhow::Result<()> {
                    for (i, dir) in dirs.iter().enumerate().skip(t).step_by(threads) {
                        write_adapter(dir, cfg, spec, seed, i as u64)?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| match h.join() {
            Ok(r) => r,
            Err(_) => bail!("an adapter-writing thread panicked"),
        })
    })?;
    Ok(dirs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lorax_engine::lora::HostAdapter;

    #[test]
    fn generated_adapters_load_and_differ() {
        let cfg = ModelConfig::from_file(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/models/llama/config.json"
        )))
        .expect("config");
        let tmp = tempfile::tempdir().expect("tmp");
        let spec = AdapterSpec {
            rank: 4,
            alpha: 8.0,
            targets: ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
                .map(String::from)
                .to_vec(),
            dtype: "float16".into(),
            base_model: "test".into(),
        };
        let dirs = write_adapters(tmp.path(), &cfg, &spec, 5, "a-{i}", 1, 2).expect("write");
        assert_eq!(dirs.len(), 5);
        let a0 = std::fs::read(dirs[0].join("adapter_model.safetensors")).expect("a0");
        let a1 = std::fs::read(dirs[1].join("adapter_model.safetensors")).expect("a1");
        assert_ne!(a0, a1, "adapters must differ");
        for d in &dirs {
            let host = HostAdapter::load(d, &cfg, 64).expect("peft adapter loads in the engine");
            assert_eq!(host.max_rank, 4);
            assert!(host.bytes > 0);
        }
        let bad = AdapterSpec {
            targets: vec!["lm_head".into()],
            ..spec
        };
        assert!(write_adapter(&tmp.path().join("x"), &cfg, &bad, 1, 0).is_err());
    }
}
