//! Model configuration from a Hugging Face `config.json` (Llama 2/3/3.1, Mistral, Qwen2).
//!
//! Both rope layouts are read: the classic `rope_theta` + `rope_scaling` and transformers 5's
//! `rope_parameters` (which folds the two together).

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{EngineError, Result};

/// The decoder families this engine implements; they differ only in details listed here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2 / 3 / 3.1 (`LlamaForCausalLM`).
    Llama,
    /// Mistral (`MistralForCausalLM`): Llama plus an optional sliding window.
    Mistral,
    /// Qwen2 (`Qwen2ForCausalLM`): Llama plus q/k/v biases.
    Qwen2,
}

/// How rotary frequencies are scaled for long contexts.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        /// Divisor of every frequency.
        factor: f32,
    },
    /// Llama 3.1's piecewise scaling of low frequencies.
    Llama3 {
        /// Divisor of low frequencies.
        factor: f32,
        /// Wavelengths longer than `original_max_position_embeddings / low_freq_factor` are fully scaled.
        low_freq_factor: f32,
        /// Wavelengths shorter than `original_max_position_embeddings / high_freq_factor` are unscaled.
        high_freq_factor: f32,
        /// Context length the model was pretrained with.
        original_max_position_embeddings: f32,
    },
    /// One divisor per frequency (GGUF files store Llama 3.1's scaling this way, as `rope_freqs.weight`).
    Factors(Vec<f32>),
}

/// Everything the engine needs to know about a checkpoint's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Decoder family.
    pub architecture: Architecture,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA when fewer than query heads).
    pub num_kv_heads: usize,
    /// Width of one head (may differ from hidden_size / num_heads).
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// RoPE base.
    pub rope_theta: f32,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Longest context the model supports.
    pub max_position_embeddings: usize,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2, Llama with attention_bias).
    pub qkv_bias: bool,
    /// o_proj carries a bias (Llama with attention_bias).
    pub o_bias: bool,
    /// gate/up/down carry biases (Llama with mlp_bias).
    pub mlp_bias: bool,
    /// Sliding-window attention width, when the model uses one.
    pub sliding_window: Option<usize>,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens (some models list several).
    pub eos_token_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Raw {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f32>,
    rope_theta: Option<f32>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    hidden_act: Option<String>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<Value>,
}

impl ModelConfig {
    /// Positions the model serves: `max_position_embeddings`, times the factor of linear position
    /// interpolation (whose configs keep the pretrained length; Llama 3.1's and per-frequency scaling
    /// state the extended length itself).
    pub fn max_positions(&self) -> usize {
        match self.rope_scaling {
            RopeScaling::Linear { factor } if factor > 1.0 => {
                #[allow(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    clippy::cast_precision_loss
                )]
                let n = (self.max_position_embeddings as f64 * f64::from(factor)) as usize;
                n
            }
            _ => self.max_position_embeddings,
        }
    }

    /// Read `config.json` from a file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text).map_err(|e| match e {
            EngineError::Config { reason, .. } => EngineError::Config {
                path: path.to_path_buf(),
                reason,
            },
            other => other,
        })
    }

    /// Parse the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let bad = |reason: String| EngineError::Config {
            path: "config.json".into(),
            reason,
        };
        let raw: Raw = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let arch_name = raw
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .or_else(|| raw.model_type.clone())
            .unwrap_or_default();
        let architecture = match (arch_name.as_str(), raw.model_type.as_deref()) {
            ("LlamaForCausalLM", _) | (_, Some("llama")) => Architecture::Llama,
            ("MistralForCausalLM", _) | (_, Some("mistral")) => Architecture::Mistral,
            ("Qwen2ForCausalLM", _) | (_, Some("qwen2")) => Architecture::Qwen2,
            _ => return Err(EngineError::UnsupportedArchitecture(arch_name)),
        };
        if let Some(act) = raw.hidden_act.as_deref() {
            if act != "silu" {
                return Err(bad(format!("hidden_act {act:?} is not supported (only silu)")));
            }
        }
        if raw.num_attention_heads == 0 || raw.hidden_size == 0 || raw.num_hidden_layers == 0 {
            return Err(bad(
                "hidden_size, num_attention_heads and num_hidden_layers must be > 0".into(),
            ));
        }
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if num_kv_heads == 0 || !raw.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {num_kv_heads}",
                raw.num_attention_heads
            )));
        }
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / raw.num_attention_heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(bad(format!("head_dim {head_dim} must be even and > 0")));
        }
        let (rope_theta, rope_scaling) = parse_rope(&raw).map_err(bad)?;
        let sliding_window = match architecture {
            Architecture::Qwen2 if raw.use_sliding_window != Some(true) => None,
            _ => raw.sliding_window,
        };
        let eos_token_ids = match &raw.eos_token_id {
            None | Some(Value::Null) => vec![],
            Some(Value::Number(n)) => vec![n
                .as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| bad("eos_token_id".into()))?],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_u64()
                        .and_then(|v| u32::try_from(v).ok())
                        .ok_or_else(|| bad("eos_token_id".into()))
                })
                .collect::<Result<_>>()?,
            Some(other) => return Err(bad(format!("eos_token_id {other} is not a token id"))),
        };
        let attention_bias = raw.attention_bias.unwrap_or(false);
        Ok(Self {
            architecture,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias: architecture == Architecture::Qwen2 || attention_bias,
            o_bias: attention_bias,
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            sliding_window,
            bos_token_id: raw.bos_token_id,
            eos_token_ids,
        })
    }

    /// Query width (num_heads * head_dim).
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Key/value width (num_kv_heads * head_dim).
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// RoPE inverse frequencies (head_dim / 2 of them), computed in f32 as transformers does.
    pub fn inv_freq(&self) -> Vec<f32> {
        let dim = self.head_dim;
        #[allow(clippy::cast_precision_loss)]
        let base: Vec<f32> = (0..dim / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f32 / dim as f32))
            .collect();
        match &self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Factors(factors) => base.iter().zip(factors).map(|(f, d)| f / d).collect(),
            &RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
            &RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        if wavelen < high_wavelen || wavelen > low_wavelen {
                            scaled
                        } else {
                            let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        }
                    })
                    .collect()
            }
        }
    }
}

fn parse_rope(raw: &Raw) -> std::result::Result<(f32, RopeScaling), String> {
    // transformers >= 5: everything in rope_parameters; older: rope_theta + rope_scaling.
    let params = raw
        .rope_parameters
        .as_ref()
        .or(raw.rope_scaling.as_ref())
        .filter(|v| !v.is_null());
    let theta = params
        .and_then(|p| p.get("rope_theta"))
        .and_then(Value::as_f64)
        .map(|t| t as f32)
        .or(raw.rope_theta)
        .unwrap_or(10000.0);
    let Some(p) = params else {
        return Ok((theta, RopeScaling::None));
    };
    let kind = p
        .get("rope_type")
        .or_else(|| p.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| -> std::result::Result<f32, String> {
        p.get(key)
            .and_then(Value::as_f64)
            .map(|v| v as f32)
            .ok_or_else(|| format!("rope scaling {kind:?} needs a numeric {key:?}"))
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: num("factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        },
        other => {
            return Err(format!(
                "rope scaling type {other:?} is not supported (default, linear, llama3)"
            ))
        }
    };
    Ok((theta, scaling))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const LLAMA31_CLASSIC: &str = r#"{
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
      "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
      "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
      "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": false,
      "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192, "rope_type": "llama3"},
      "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu"}"#;

    #[test]
    fn parses_classic_llama31() {
        let c = ModelConfig::from_json(LLAMA31_CLASSIC).unwrap();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!(c.head_dim, 128);
        assert_eq!(c.num_kv_heads, 8);
        assert!((c.rope_theta - 500000.0).abs() < 1e-3);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if (factor - 8.0).abs() < 1e-6));
        assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
        // The highest frequency is unscaled, the lowest divided by the factor.
        let f = c.inv_freq();
        assert!((f[0] - 1.0).abs() < 1e-6);
        let unscaled = 1.0 / 500000f32.powf(126.0 / 128.0);
        assert!((f[63] - unscaled / 8.0).abs() / unscaled < 1e-5);
    }

    /// The positions a model serves: linear interpolation's configs keep the pretrained length (vicuna's
    /// 16k models: 4096 with factor 4), Llama 3.1's state the extended one.
    #[test]
    fn max_positions_count_linear_interpolation() {
        let linear = LLAMA31_CLASSIC
            .replace(
                "\"max_position_embeddings\": 131072",
                "\"max_position_embeddings\": 4096",
            )
            .replace(
                r#"{"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192, "rope_type": "llama3"}"#,
                r#"{"factor": 4.0, "type": "linear"}"#,
            );
        let c = ModelConfig::from_json(&linear).unwrap();
        assert!(
            matches!(c.rope_scaling, RopeScaling::Linear { .. }),
            "{:?}",
            c.rope_scaling
        );
        assert_eq!(c.max_positions(), 16384);
        assert_eq!(ModelConfig::from_json(LLAMA31_CLASSIC).unwrap().max_positions(), 131072);
    }

    #[test]
    fn llama2_defaults() {
        let c = ModelConfig::from_json(
            r#"{"architectures":["LlamaForCausalLM"],"vocab_size":32000,"hidden_size":4096,
            "intermediate_size":11008,"num_hidden_layers":32,"num_attention_heads":32,"eos_token_id":2}"#,
        )
        .unwrap();
        assert_eq!(c.num_kv_heads, 32);
        assert_eq!(c.rope_scaling, RopeScaling::None);
        assert!((c.rope_theta - 10000.0).abs() < 1e-6);
        assert_eq!(c.eos_token_ids, vec![2]);
    }

    #[test]
    fn refuses_unknown_architecture_and_bad_shapes() {
        let e = ModelConfig::from_json(
            r#"{"architectures":["GPT2LMHeadModel"],"model_type":"gpt2","vocab_size":1,"hidden_size":8,
            "intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2}"#,
        )
        .unwrap_err();
        assert!(
            matches!(e, EngineError::UnsupportedArchitecture(ref a) if a == "GPT2LMHeadModel"),
            "{e}"
        );
        let e = ModelConfig::from_json(
            r#"{"model_type":"llama","vocab_size":1,"hidden_size":8,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":3,"num_key_value_heads":2}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("multiple"), "{e}");
        let e = ModelConfig::from_json("{not json").unwrap_err();
        assert!(matches!(e, EngineError::Config { .. }), "{e}");
        let e = ModelConfig::from_json(
            r#"{"model_type":"llama","vocab_size":1,"hidden_size":8,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":2,"rope_scaling":{"type":"yarn","factor":4.0}}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("yarn"), "{e}");
    }

    #[test]
    fn qwen2_has_qkv_bias_and_no_window_unless_enabled() {
        let c = ModelConfig::from_json(
            r#"{"architectures":["Qwen2ForCausalLM"],"vocab_size":10,"hidden_size":8,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":2,"sliding_window":4096,"use_sliding_window":false,
            "rope_parameters":{"rope_theta":1000000.0,"rope_type":"default"}}"#,
        )
        .unwrap();
        assert!(c.qkv_bias && !c.o_bias);
        assert_eq!(c.sliding_window, None);
        assert!((c.rope_theta - 1e6).abs() < 1.0);
    }
}
