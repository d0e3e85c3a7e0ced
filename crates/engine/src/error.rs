//! The engine's one error type. Input (files, configs, requests) never panics: it ends up here.

use std::path::PathBuf;

/// Everything the engine can refuse or fail at.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A file that must exist does not (or cannot be read).
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is not valid JSON or lacks a required field.
    #[error("invalid model config {path}: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The architecture in `config.json` is not one this engine implements.
    #[error("unsupported architecture {0:?}: supported are llama, mistral, qwen2 (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)")]
    UnsupportedArchitecture(String),
    /// A weights file is not valid safetensors, or its index is inconsistent.
    #[error("corrupt weights {path}: {reason}")]
    CorruptWeights {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor the model needs is not in any weights file.
    #[error("missing tensor {0:?} in the checkpoint")]
    MissingTensor(String),
    /// A tensor has the wrong shape for the config.
    #[error("tensor {name:?} has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        /// Tensor name.
        name: String,
        /// Shape in the file.
        actual: Vec<usize>,
        /// Shape the config implies.
        expected: Vec<usize>,
    },
    /// A tensor's dtype is not one of bf16/f16/f32.
    #[error("tensor {name:?} has unsupported dtype {dtype}: only bf16, f16 and f32 are supported")]
    UnsupportedDtype {
        /// Tensor name.
        name: String,
        /// The dtype found.
        dtype: String,
    },
    /// A tensor cannot be split evenly for tensor parallelism.
    #[error("tensor {name:?} dimension {dim} of size {size} cannot be split across {world_size} shards")]
    Unshardable {
        /// Tensor name.
        name: String,
        /// Dimension split.
        dim: usize,
        /// Its size.
        size: usize,
        /// Number of shards.
        world_size: usize,
    },
    /// A request or batch is inconsistent (unknown sequence, block table too short, token out of vocab...).
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    /// A LoRA adapter that cannot be served: unsupported format or feature, pickle-only weights, a rank
    /// above the maximum, tensors that do not belong to the base model.
    #[error("invalid adapter: {0}")]
    InvalidAdapter(String),
    /// A sequence names an adapter that is not loaded on this device.
    #[error("adapter {0:?} is not loaded")]
    AdapterNotLoaded(String),
    /// The backend failed (device errors).
    #[error("backend error: {0}")]
    Backend(String),
    /// The device had no memory left for an allocation (what was being allocated).
    #[error("out of device memory: {0}")]
    DeviceMemory(String),
}

/// Result with [`EngineError`].
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
