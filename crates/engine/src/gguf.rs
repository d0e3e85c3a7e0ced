//! Models from one GGUF file (llama.cpp's format): the configuration from its metadata, the tensors
//! under their transformers names, dequantized to f32 when read.
//!
//! llama.cpp's converter permutes the rows of q_proj and k_proj (its RoPE pairs adjacent elements, the
//! transformers one pairs the two halves of a head); [`Weights`] undoes that when it reads them, as
//! transformers' own GGUF loader does. Architectures: `llama` (Llama, Mistral and their fine-tunes) and
//! `qwen2` (no permutation, q/k/v biases).

use lorax_gguf::{GgufError, GgufFile, Value};

use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::error::{EngineError, Result};

pub(crate) fn engine_error(e: GgufError) -> EngineError {
    match e {
        GgufError::Io { path, source } => EngineError::Io { path, source },
        GgufError::Corrupt { path, reason } => EngineError::CorruptWeights { path, reason },
        GgufError::MissingTensor(name) => EngineError::MissingTensor(name),
        GgufError::UnsupportedType { name, ty } => EngineError::UnsupportedDtype {
            name,
            dtype: format!("{ty}; GGUF types supported: {}", lorax_gguf::quant::SUPPORTED),
        },
    }
}

/// How a transformers tensor name is read from the file.
#[derive(Clone, Debug)]
pub(crate) struct Source {
    /// The GGUF tensor's name.
    pub gguf_name: String,
    /// Undo llama.cpp's q/k row permutation with this many heads.
    pub unpermute_heads: Option<usize>,
}

/// The transformers name of a GGUF tensor and how to read it; `None` for tensors the model does not use.
pub(crate) fn hf_name(gguf_name: &str, cfg: &ModelConfig) -> Option<(String, Option<usize>)> {
    let permute = cfg.architecture != Architecture::Qwen2;
    Some(match gguf_name {
        "token_embd.weight" => ("model.embed_tokens.weight".into(), None),
        "output_norm.weight" => ("model.norm.weight".into(), None),
        "output.weight" => ("lm_head.weight".into(), None),
        _ => {
            let rest = gguf_name.strip_prefix("blk.")?;
            let (layer, rest) = rest.split_once('.')?;
            let layer: usize = layer.parse().ok()?;
            let (module, kind) = rest.rsplit_once('.')?;
            if kind != "weight" && kind != "bias" {
                return None;
            }
            let (hf, heads) = match module {
                "attn_norm" => ("input_layernorm", None),
                "ffn_norm" => ("post_attention_layernorm", None),
                "attn_q" => ("self_attn.q_proj", permute.then_some(cfg.num_heads)),
                "attn_k" => ("self_attn.k_proj", permute.then_some(cfg.num_kv_heads)),
                "attn_v" => ("self_attn.v_proj", None),
                "attn_output" => ("self_attn.o_proj", None),
                "ffn_gate" => ("mlp.gate_proj", None),
                "ffn_up" => ("mlp.up_proj", None),
                "ffn_down" => ("mlp.down_proj", None),
                _ => return None,
            };
            (format!("model.layers.{layer}.{hf}.{kind}"), heads)
        }
    })
}

/// Undoes llama.cpp's permutation of q/k rows: stored row `h·d + 2i + p` is row `h·d + p·d/2 + i` of the
/// transformers weight (head `h` of `heads`, `d` rows per head). Works on weights and biases alike.
pub(crate) fn unpermute(values: &[f32], rows: usize, heads: usize) -> Result<Vec<f32>> {
    if heads == 0 || !rows.is_multiple_of(2 * heads) || !values.len().is_multiple_of(rows) {
        return Err(EngineError::CorruptWeights {
            path: "gguf".into(),
            reason: format!("{rows} q/k rows cannot be split into {heads} rotary heads"),
        });
    }
    let cols = values.len() / rows;
    let d = rows / heads;
    let mut out = vec![0f32; values.len()];
    for h in 0..heads {
        for i in 0..d / 2 {
            for p in 0..2 {
                let src = h * d + 2 * i + p;
                let dst = h * d + p * (d / 2) + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&values[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(out)
}

fn meta_usize(g: &GgufFile, key: &str) -> Result<usize> {
    g.get_u64(key)
        .and_then(|v| usize::try_from(v).ok())
        .ok_or_else(|| config_error(g, format!("metadata {key} is missing or not a count")))
}

fn config_error(g: &GgufFile, reason: String) -> EngineError {
    EngineError::Config {
        path: g.path().to_path_buf(),
        reason,
    }
}

/// The model configuration in the metadata of `g`.
pub fn config(g: &GgufFile) -> Result<ModelConfig> {
    let arch = g
        .architecture()
        .ok_or_else(|| config_error(g, "metadata general.architecture is missing".into()))?;
    let architecture = match arch {
        "llama" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        other => {
            return Err(EngineError::UnsupportedArchitecture(format!(
                "{other} (GGUF general.architecture; llama and qwen2 are supported)"
            )))
        }
    };
    let key = |k: &str| format!("{arch}.{k}");
    let hidden_size = meta_usize(g, &key("embedding_length"))?;
    let num_heads = meta_usize(g, &key("attention.head_count"))?;
    if num_heads == 0 || hidden_size % num_heads != 0 {
        return Err(config_error(
            g,
            format!("{num_heads} heads do not divide width {hidden_size}"),
        ));
    }
    let num_kv_heads = match g.get(&key("attention.head_count_kv")) {
        None => num_heads,
        Some(v) => v.as_u64().and_then(|v| usize::try_from(v).ok()).ok_or_else(|| {
            config_error(
                g,
                "attention.head_count_kv varies by layer, which is not supported".into(),
            )
        })?,
    };
    let head_dim = match g.get_u64(&key("attention.key_length")) {
        Some(k) => k as usize,
        None => hidden_size / num_heads,
    };
    let vocab_size = match g.get_u64(&key("vocab_size")) {
        Some(v) => v as usize,
        None => g
            .get("tokenizer.ggml.tokens")
            .and_then(Value::as_array)
            .map(<[Value]>::len)
            .or_else(|| g.tensor("token_embd.weight").map(|t| t.shape()[0]))
            .ok_or_else(|| config_error(g, "no vocabulary size in the metadata".into()))?,
    };
    let rope_scaling = match (g.get_str(&key("rope.scaling.type")), g.tensor("rope_freqs.weight")) {
        (_, Some(_)) => {
            let factors = g.tensor_f32("rope_freqs.weight").map_err(engine_error)?;
            if factors.len() != head_dim / 2 {
                return Err(config_error(
                    g,
                    format!(
                        "rope_freqs.weight has {} factors, expected {}",
                        factors.len(),
                        head_dim / 2
                    ),
                ));
            }
            RopeScaling::Factors(factors)
        }
        (None | Some("none"), None) => RopeScaling::None,
        (Some("linear"), None) => RopeScaling::Linear {
            factor: g.get_f64(&key("rope.scaling.factor")).unwrap_or(1.0) as f32,
        },
        (Some(other), None) => return Err(config_error(g, format!("rope scaling {other:?} is not supported"))),
    };
    let eos = g.get_u64("tokenizer.ggml.eos_token_id").map(|v| v as u32);
    let eot = g.get_u64("tokenizer.ggml.eot_token_id").map(|v| v as u32);
    let mut eos_token_ids: Vec<u32> = eos.into_iter().chain(eot).collect();
    eos_token_ids.dedup();
    let qkv_bias = g.tensor("blk.0.attn_q.bias").is_some();
    Ok(ModelConfig {
        architecture,
        vocab_size,
        hidden_size,
        intermediate_size: meta_usize(g, &key("feed_forward_length"))?,
        num_layers: meta_usize(g, &key("block_count"))?,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: g.get_f64(&key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5) as f32,
        rope_theta: g.get_f64(&key("rope.freq_base")).unwrap_or(10000.0) as f32,
        rope_scaling,
        max_position_embeddings: g.get_u64(&key("context_length")).map_or(4096, |v| v as usize),
        tie_word_embeddings: g.tensor("output.weight").is_none(),
        qkv_bias,
        o_bias: g.tensor("blk.0.attn_output.bias").is_some(),
        mlp_bias: g.tensor("blk.0.ffn_up.bias").is_some(),
        sliding_window: None,
        bos_token_id: g.get_u64("tokenizer.ggml.bos_token_id").map(|v| v as u32),
        eos_token_ids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(heads, 2, d/2, cols).swapaxes(1, 2): stored row h·d + 2i + p holds
        // original row h·d + p·d/2 + i.
        let (heads, d, cols) = (3, 8, 2);
        let rows = heads * d;
        let original: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let mut stored = vec![0f32; rows * cols];
        for h in 0..heads {
            for p in 0..2 {
                for i in 0..d / 2 {
                    let src = h * d + p * (d / 2) + i;
                    let dst = h * d + 2 * i + p;
                    stored[dst * cols..(dst + 1) * cols].copy_from_slice(&original[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_ne!(stored, original);
        assert_eq!(unpermute(&stored, rows, heads).expect("unpermute"), original);
        assert!(unpermute(&stored, rows, 5).is_err());
    }
}
