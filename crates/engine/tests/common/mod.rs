//! Shared helpers for the golden tests: fixture paths, reading golden tensors, error metrics.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::PathBuf;

use safetensors::{Dtype, SafeTensors};

pub fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
}

/// A golden file's tensors: f32 ones as f32, i64 ones as i64, with shapes.
pub struct Golden {
    pub f32s: HashMap<String, (Vec<usize>, Vec<f32>)>,
    pub i64s: HashMap<String, Vec<i64>>,
}

impl Golden {
    pub fn open(path: PathBuf) -> Self {
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut f32s = HashMap::new();
        let mut i64s = HashMap::new();
        for (name, view) in st.tensors() {
            match view.dtype() {
                Dtype::F32 => {
                    let v = view
                        .data()
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                        .collect();
                    f32s.insert(name, (view.shape().to_vec(), v));
                }
                Dtype::I64 => {
                    let v = view
                        .data()
                        .chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                        .collect();
                    i64s.insert(name, v);
                }
                d => panic!("unexpected dtype {d:?} for {name}"),
            }
        }
        Self { f32s, i64s }
    }

    pub fn f(&self, name: &str) -> &(Vec<usize>, Vec<f32>) {
        self.f32s
            .get(name)
            .unwrap_or_else(|| panic!("golden tensor {name} missing"))
    }

    pub fn ids(&self, name: &str) -> Vec<u32> {
        self.i64s
            .get(name)
            .unwrap_or_else(|| panic!("golden tensor {name} missing"))
            .iter()
            .map(|&v| u32::try_from(v).unwrap())
            .collect()
    }

    /// Row `r` of a 2-D f32 tensor.
    pub fn row(&self, name: &str, r: usize) -> &[f32] {
        let (shape, v) = self.f(name);
        &v[r * shape[1]..(r + 1) * shape[1]]
    }
}

/// ‖a − b‖ / ‖b‖.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (num / den).sqrt()
}

/// `row` restricted to the vocabulary subset.
pub fn subset(row: &[f32], sub: &[u32]) -> Vec<f32> {
    sub.iter().map(|&i| row[i as usize]).collect()
}

/// `n_new` greedy tokens for each prompt, all prompts in one batch (prefill, then decode steps), base
/// model, cache blocks from `alloc`.
pub fn greedy_batch<B: lorax_engine::Backend>(
    e: &mut lorax_engine::Engine<B>,
    alloc: &mut lorax_engine::kv_cache::BlockAllocator,
    prompts: &[Vec<u32>],
    n_new: usize,
) -> Vec<Vec<u32>> {
    use lorax_engine::{Batch, NewSequence, SamplingParams};
    let news = prompts
        .iter()
        .enumerate()
        .map(|(i, ids)| NewSequence {
            id: i as u64,
            input_ids: ids.clone(),
            block_table: alloc.allocate(ids.len() + n_new).unwrap(),
            params: SamplingParams::default(),
            prefill_logprobs: false,
            prefill_top_n: 0,
            adapter: None,
        })
        .collect();
    let mut batch = Batch::default();
    let mut greedy = vec![Vec::new(); prompts.len()];
    for g in e.prefill(&mut batch, news).unwrap() {
        greedy[g.id as usize].push(g.choice.token);
    }
    while greedy[0].len() < n_new {
        for g in e.decode(&mut batch).unwrap() {
            greedy[g.id as usize].push(g.choice.token);
        }
    }
    greedy
}

/// Each prompt's last-position logits (a forward pass each), then [`greedy_batch`].
pub fn last_logits_and_greedy<B: lorax_engine::Backend>(
    e: &mut lorax_engine::Engine<B>,
    cache: lorax_engine::CacheConfig,
    prompts: &[Vec<u32>],
    n_new: usize,
) -> (Vec<Vec<f32>>, Vec<Vec<u32>>) {
    let mut alloc = lorax_engine::kv_cache::BlockAllocator::new(cache.num_blocks as u32, cache.block_size);
    let mut last = Vec::new();
    for ids in prompts {
        let table = alloc.allocate(ids.len()).unwrap();
        last.push(e.logits(&[(ids, 0, &table)], &[false]).unwrap().remove(0));
        alloc.free(&table);
    }
    let greedy = greedy_batch(e, &mut alloc, prompts, n_new);
    (last, greedy)
}

/// The Mistral-7B shape (the GPU benchmarks' model), written to `dir/config.json`.
pub fn mistral_7b(dir: &std::path::Path) -> lorax_engine::ModelConfig {
    let cfg = serde_json::json!({
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 32000,
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 32768,
        "tie_word_embeddings": false, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "bfloat16"
    });
    let path = dir.join("config.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    lorax_engine::ModelConfig::from_file(&path).unwrap()
}

/// A random rank-`r` PEFT LoRA adapter of the q/k/v/o projections of `cfg` in `dir`, stored as `dtype`,
/// values in [-0.1, 0.1) from `seed`.
pub fn write_qkvo_adapter(
    dir: &std::path::Path,
    cfg: &lorax_engine::ModelConfig,
    r: usize,
    dtype: lorax_engine::weights::DType,
    seed: u64,
) {
    write_adapter_of(dir, cfg, r, dtype, seed, false);
}

/// [`write_qkvo_adapter`], with the MLP's gate/up/down projections too when `mlp` (every linear layer, as
/// PEFT's `target_modules="all-linear"` gives).
pub fn write_adapter_of(
    dir: &std::path::Path,
    cfg: &lorax_engine::ModelConfig,
    r: usize,
    dtype: lorax_engine::weights::DType,
    seed: u64,
    mlp: bool,
) {
    use lorax_engine::weights::DType;
    use safetensors::tensor::TensorView;
    std::fs::create_dir_all(dir).unwrap();
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut value = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
    };
    let (h, q, kv, f) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);
    let mut modules = vec![
        ("self_attn.q_proj", h, q),
        ("self_attn.k_proj", h, kv),
        ("self_attn.v_proj", h, kv),
        ("self_attn.o_proj", q, h),
    ];
    if mlp {
        modules.extend([("mlp.gate_proj", h, f), ("mlp.up_proj", h, f), ("mlp.down_proj", f, h)]);
    }
    let mut tensors = Vec::new();
    for l in 0..cfg.num_layers {
        for &(m, inp, out) in &modules {
            let p = format!("base_model.model.model.layers.{l}.{m}");
            for (ab, shape) in [("lora_A", vec![r, inp]), ("lora_B", vec![out, r])] {
                let values: Vec<f32> = (0..shape.iter().product()).map(|_| value()).collect();
                tensors.push(lorax_engine::weights::HostTensor::from_values(
                    &format!("{p}.{ab}.weight"),
                    dtype,
                    shape,
                    &values,
                ));
            }
        }
    }
    let st_dtype = match dtype {
        DType::BF16 => Dtype::BF16,
        DType::F16 => Dtype::F16,
        DType::F32 => Dtype::F32,
    };
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                TensorView::new(st_dtype, t.shape.clone(), &t.data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("adapter_model.safetensors")).unwrap();
    let targets: Vec<&str> = modules.iter().map(|(m, ..)| m.rsplit('.').next().unwrap()).collect();
    let config = serde_json::json!({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": targets, "bias": "none"
    });
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
}

/// Drops `path` from the page cache (after syncing it, so that its pages are clean).
#[cfg(target_os = "linux")]
pub fn drop_cached(path: &std::path::Path) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: a valid descriptor; the advice only drops clean cached pages.
    assert_eq!(
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) },
        0
    );
}

#[cfg(not(target_os = "linux"))]
pub fn drop_cached(_: &std::path::Path) {}

/// Asserts that two uploads of one adapter hold the same pairs: equal shapes, the same values bit for bit,
/// the same scales. Returns the number of pairs.
pub fn assert_same_adapter<B: lorax_engine::Backend>(
    backend: &B,
    a: &lorax_engine::lora::DeviceAdapter<B>,
    b: &lorax_engine::lora::DeviceAdapter<B>,
) -> usize {
    let bits = |t: &B::Tensor| -> Vec<u32> { backend.to_f32(t).unwrap().iter().map(|v| v.to_bits()).collect() };
    let mut pairs = 0;
    for (l, (x, y)) in a.layers.iter().zip(&b.layers).enumerate() {
        for (t, (x, y)) in x.iter().zip(y).enumerate() {
            match (x, y) {
                (Some(x), Some(y)) => {
                    for (u, v) in [(&x.a, &y.a), (&x.b, &y.b)] {
                        assert_eq!(backend.shape(u), backend.shape(v), "layer {l} target {t}");
                        assert_eq!(bits(u), bits(v), "layer {l} target {t}");
                    }
                    assert_eq!(x.scale.to_bits(), y.scale.to_bits(), "layer {l} target {t}");
                    pairs += 1;
                }
                (None, None) => {}
                _ => panic!("layer {l} target {t}: in one upload only"),
            }
        }
    }
    pairs
}
