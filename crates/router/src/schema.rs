//! JSON bodies of the REST API, LoRAX-compatible. Request types reject unknown fields; fields that
//! LoRAX clients send but this build does not support yet (merged adapters, response_format, grammar)
//! are accepted by the schema and refused by validation with a clear message.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::stopping::FinishReason;

/// Generation parameters (`"parameters"` of a generate request). Every field is optional; `null`
/// means absent.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateParameters {
    /// LoRA adapter to apply: a hub repo id or a local path; empty or absent for the base model.
    pub adapter_id: Option<String>,
    /// Where the adapter comes from: "hub" or "local" (absent: `--default-adapter-source`).
    pub adapter_source: Option<String>,
    /// Adapters to merge; not supported yet.
    pub merged_adapters: Option<serde_json::Value>,
    /// Token for private hub adapters (else the `Authorization: Bearer` header's); its Debug form is
    /// redacted, so it is never logged.
    #[schema(value_type = Option<String>, format = Password)]
    pub api_token: Option<Secret>,
    /// Sequences to sample and pick the best of; only 1 is supported.
    pub best_of: Option<i64>,
    /// Softmax temperature (> 0).
    pub temperature: Option<f32>,
    /// Repetition penalty (> 0, 1 = off).
    pub repetition_penalty: Option<f32>,
    /// OpenAI frequency penalty in [-2, 2].
    pub frequency_penalty: Option<f32>,
    /// OpenAI presence penalty in [-2, 2].
    pub presence_penalty: Option<f32>,
    /// Top-k filtering (> 0).
    pub top_k: Option<i64>,
    /// Nucleus sampling mass, 0 < p < 1.
    pub top_p: Option<f32>,
    /// Typical sampling mass, 0 < p < 1.
    pub typical_p: Option<f32>,
    /// Sample instead of greedy decoding.
    pub do_sample: Option<bool>,
    /// Most tokens to generate (> 0).
    pub max_new_tokens: Option<i64>,
    /// Keep generating past end-of-sequence tokens.
    pub ignore_eos_token: Option<bool>,
    /// Prepend the prompt to `generated_text`.
    pub return_full_text: Option<bool>,
    /// Stop sequences.
    pub stop: Option<Vec<String>>,
    /// Keep only the last `truncate` prompt tokens.
    pub truncate: Option<i64>,
    /// Watermarking; only `false` is supported.
    pub watermark: Option<bool>,
    /// Return generation details.
    pub details: Option<bool>,
    /// Return the prompt tokens with their log-probabilities.
    pub decoder_input_details: Option<bool>,
    /// Number of alternative tokens to return with each generated token (1..=10).
    pub return_k_alternatives: Option<i64>,
    /// TGI's name for `return_k_alternatives`.
    pub top_n_tokens: Option<i64>,
    /// `inputs` is a JSON list of messages to render with the chat template (the adapter's own when it
    /// ships one).
    pub apply_chat_template: Option<bool>,
    /// Seed of the sampler's random generator.
    pub seed: Option<u64>,
    /// Structured output; not supported yet.
    pub response_format: Option<serde_json::Value>,
    /// TGI's structured output; not supported yet.
    pub grammar: Option<serde_json::Value>,
}

/// Body of `POST /generate` and `POST /generate_stream`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    /// The prompt.
    #[schema(example = "What is Deep Learning?")]
    pub inputs: String,
    /// Generation parameters.
    #[serde(default)]
    pub parameters: Option<GenerateParameters>,
}

/// Body of `POST /`: a generate request with a `stream` switch.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompatGenerateRequest {
    /// The prompt.
    #[schema(example = "What is Deep Learning?")]
    pub inputs: String,
    /// Generation parameters.
    #[serde(default)]
    pub parameters: Option<GenerateParameters>,
    /// Answer as server-sent events.
    #[serde(default)]
    pub stream: bool,
}

impl From<CompatGenerateRequest> for GenerateRequest {
    fn from(req: CompatGenerateRequest) -> Self {
        Self {
            inputs: req.inputs,
            parameters: req.parameters,
        }
    }
}

/// Body of `POST /tokenize`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenizeRequest {
    /// Text to tokenize.
    pub inputs: String,
    /// Add the tokenizer's special tokens (default true, as generation does).
    #[serde(default)]
    pub add_special_tokens: Option<bool>,
    /// Accepted for TGI compatibility and ignored.
    #[serde(default)]
    pub parameters: Option<serde_json::Value>,
}

/// One token of `POST /tokenize`'s answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct SimpleToken {
    /// Token id.
    pub id: u32,
    /// The input text the token covers.
    pub text: String,
    /// Byte offset of the start of `text` in the input.
    pub start: usize,
    /// Byte offset of the end of `text` in the input.
    pub stop: usize,
}

/// A prompt token (`details.prefill`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PrefillToken {
    /// Token id.
    pub id: u32,
    /// Token text.
    pub text: String,
    /// Log-probability; `null` for the first token.
    pub logprob: Option<f32>,
}

/// An alternative to a generated token.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AlternativeToken {
    /// Token id.
    pub id: u32,
    /// Token text.
    pub text: String,
    /// Log-probability.
    pub logprob: f32,
}

/// A generated token.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Token {
    /// Token id.
    pub id: u32,
    /// Text this token completed (may be empty inside a multi-byte character).
    pub text: String,
    /// Log-probability.
    pub logprob: f32,
    /// Whether it is a special token (`</s>` ...).
    pub special: bool,
    /// Most likely alternatives, when `return_k_alternatives` was set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alternative_tokens: Option<Vec<AlternativeToken>>,
    /// Always false (no speculative decoding); LoRAX clients require the field.
    pub skipped: bool,
}

/// `details` of a non-streamed answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Details {
    /// Why generation stopped.
    pub finish_reason: FinishReason,
    /// Prompt tokens (after truncation).
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub generated_tokens: u32,
    /// Always 0 (no speculative decoding).
    pub skipped_tokens: u32,
    /// The sampler's seed, when sampling.
    pub seed: Option<u64>,
    /// The adapter that served the request; `null` for the base model.
    pub adapter_id: Option<String>,
    /// Prompt tokens with log-probabilities (`decoder_input_details`), else empty.
    pub prefill: Vec<PrefillToken>,
    /// Generated tokens.
    pub tokens: Vec<Token>,
    /// TGI's form of the alternatives: per generated token, its most likely alternatives (when
    /// `return_k_alternatives`/`top_n_tokens` was set).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_tokens: Option<Vec<Vec<Token>>>,
}

/// Answer of `POST /generate`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct GenerateResponse {
    /// The generated text (prompt first with `return_full_text`).
    pub generated_text: String,
    /// Present when `details` was requested.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Details>,
}

/// `details` of the last streamed event.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StreamDetails {
    /// Why generation stopped.
    pub finish_reason: FinishReason,
    /// Prompt tokens (after truncation).
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub generated_tokens: u32,
    /// The sampler's seed, when sampling.
    pub seed: Option<u64>,
    /// The adapter that served the request; `null` for the base model.
    pub adapter_id: Option<String>,
}

/// One server-sent event of `POST /generate_stream`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StreamResponse {
    /// The token of this event.
    pub token: Token,
    /// The whole generated text, on the last event only.
    pub generated_text: Option<String>,
    /// Details, on the last event only.
    pub details: Option<StreamDetails>,
    /// TGI's form of this token's alternatives (when requested).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_tokens: Option<Vec<Token>>,
}

/// Body of every error answer (and of a streamed error event).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct ErrorResponse {
    /// Human-readable message.
    pub error: String,
    /// Stable machine-readable kind: validation, overloaded, generation, unhealthy, ...
    pub error_type: String,
}

/// Answer of `GET /info`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Info {
    /// Model id as given to the launcher.
    pub model_id: String,
    /// Model revision; unknown here.
    pub model_sha: Option<String>,
    /// Compute dtype of the shards.
    pub model_dtype: String,
    /// "cuda" or "cpu".
    pub model_device_type: String,
    /// Pipeline tag; unknown here.
    pub model_pipeline_tag: Option<String>,
    /// Decoder family reported by the shard.
    pub architecture: String,
    /// Number of shards.
    pub num_shards: u32,
    /// Whether adapters can be loaded by the shards.
    pub supports_adapters: bool,
    /// `--max-active-adapters`: most adapters loaded on the shards' device at once.
    pub max_active_adapters: usize,
    /// `--max-concurrent-requests`.
    pub max_concurrent_requests: usize,
    /// Largest `best_of` accepted (always 1).
    pub max_best_of: usize,
    /// `--max-stop-sequences`.
    pub max_stop_sequences: usize,
    /// `--max-input-length`.
    pub max_input_length: u32,
    /// `--max-total-tokens`.
    pub max_total_tokens: u32,
    /// `--waiting-served-ratio`.
    pub waiting_served_ratio: f32,
    /// Effective token capacity of the running batch.
    pub max_batch_total_tokens: u32,
    /// `--max-batch-prefill-tokens`.
    pub max_batch_prefill_tokens: u32,
    /// `--max-waiting-tokens`.
    pub max_waiting_tokens: u32,
    /// `--max-batch-prefill-chunk-tokens`: most prompt tokens per mixed step; 0 when mixed steps and
    /// chunked prefill are off.
    pub max_batch_prefill_chunk_tokens: u32,
    /// `--max-client-batch-size`.
    pub max_client_batch_size: usize,
    /// `--validation-workers`.
    pub validation_workers: usize,
    /// Tokens per KV block.
    pub block_size: u32,
    /// KV blocks of the shard's cache.
    pub num_blocks: u32,
    /// End-of-sequence token ids.
    pub eos_token_ids: Vec<u32>,
    /// Router version.
    pub version: &'static str,
    /// Git revision of the build, when known.
    pub sha: Option<&'static str>,
    /// Docker image label, when known.
    pub docker_label: Option<&'static str>,
    /// Request logger endpoint (not supported).
    pub request_logger_url: Option<String>,
}

/// A credential from a request: deserialized like a string, shown as `***` by Debug.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}
