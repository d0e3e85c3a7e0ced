//! lorax-engine: everything a shard computes, with no networking.
//!
//! Model configuration (`config`), safetensors weights with tensor-parallel slicing (`weights`), the
//! backend seam (`backend`: CPU and CUDA), the one Llama-family decoder (`model`), the paged KV cache
//! (`kv_cache`), PEFT LoRA adapters (`lora`), batches of sequences (`batch`) and next-token choice (`sampling`).

pub mod backend;
pub mod batch;
pub mod comm;
pub mod config;
pub mod dummy;
pub mod engine;
pub mod error;
pub mod gguf;
pub mod kv_cache;
pub mod lora;
pub mod model;
pub mod sampling;
pub mod weights;

pub use backend::cpu::{CpuBackend, CpuTensor};
pub use backend::cuda::{CudaBackend, CudaTensor};
pub use backend::{Backend, StepCounts};
pub use config::{Architecture, ModelConfig, RopeScaling};
pub use engine::{
    Batch, CacheConfig, Engine, FeedCounts, Generation, LoadFormat, NewSequence, PromptToken, StepOptions,
};
pub use error::{EngineError, Result};
pub use sampling::{Choice, Sampler, SamplingParams};
