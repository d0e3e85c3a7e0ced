//! Request validation: parameter ranges (LoRAX's rules and messages), tokenization on blocking
//! threads, truncation and the token limits. The result, a [`ValidRequest`], is all the batching loop
//! needs.

use std::sync::Arc;

use lorax_proto::shard::v1::SamplingParameters;
use tokenizers::{Encoding, Tokenizer, TruncationDirection};
use tokio::sync::Semaphore;

use crate::adapters::{AdapterKey, AdapterSource};
use crate::metrics as m;
use crate::pieces::{self, PieceEncoder};
use crate::schema::{GenerateParameters, GenerateRequest, Secret};
use crate::stopping::StoppingParameters;

/// Largest `return_k_alternatives`.
pub const MAX_ALTERNATIVES: i64 = 20;

/// Longest stop sequence, in bytes. Each is searched for in a request's text after every token, in the
/// batching loop that every request waits on: four stops of 500 KB cost 6 ms a token and a sequence.
pub const MAX_STOP_SEQUENCE_BYTES: usize = 1024;

/// Tokens `/tokenize` answers for, unless `--max-total-tokens` is larger (an answer of about 6 MB).
pub const TOKENIZE_MAX_TOKENS: u32 = 1 << 17;
/// Longest accepted `adapter_id`, in bytes (hub ids are far shorter; paths rarely come close).
pub const MAX_ADAPTER_ID_BYTES: usize = 256;
/// Longest part of a rejected value repeated in an error message, in characters.
const ECHO_CHARS: usize = 64;

/// Why a request is invalid (422, error_type "validation").
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    /// An adapter was requested but the shards cannot load adapters.
    #[error("the shards of this deployment do not support adapters (got `{0}`); send requests to the base model")]
    AdaptersUnsupported(String),
    /// `merged_adapters` was given.
    #[error("`merged_adapters` is not supported by this build; name one adapter with `adapter_id`")]
    MergedAdapters,
    /// `adapter_source` is not one of the accepted values.
    #[error("`adapter_source` must be one of {accepted}. Given: {0:?}", accepted = AdapterSource::ACCEPTED)]
    AdapterSource(String),
    /// `adapter_id` longer than [`MAX_ADAPTER_ID_BYTES`].
    #[error("`adapter_id` must be at most {MAX_ADAPTER_ID_BYTES} bytes. Given: {0} bytes")]
    AdapterIdLength(usize),
    /// `adapter_id` with a control character (NUL, newline, ...).
    #[error("`adapter_id` must not contain control characters")]
    AdapterIdControl,
    /// A parameter this build does not implement.
    #[error("`{0}` is not supported by this build yet")]
    Unsupported(&'static str),
    /// `best_of` other than 1.
    #[error("`best_of` != 1 is not supported. Given: {0}")]
    BestOf(i64),
    /// `watermark` true.
    #[error("`watermark` is not supported")]
    Watermark,
    /// `temperature` <= 0, or infinite.
    #[error("`temperature` must be strictly positive and finite")]
    Temperature,
    /// `repetition_penalty` <= 0, or infinite.
    #[error("`repetition_penalty` must be strictly positive and finite")]
    RepetitionPenalty,
    /// `frequency_penalty` outside [-2, 2].
    #[error("`frequency_penalty` must be >= -2.0 and <= 2.0")]
    FrequencyPenalty,
    /// `presence_penalty` outside [-2, 2].
    #[error("`presence_penalty` must be >= -2.0 and <= 2.0")]
    PresencePenalty,
    /// `top_p` outside (0, 1).
    #[error("`top_p` must be > 0.0 and < 1.0")]
    TopP,
    /// `typical_p` outside (0, 1).
    #[error("`typical_p` must be > 0.0 and < 1.0")]
    TypicalP,
    /// `top_k` <= 0.
    #[error("`top_k` must be strictly positive")]
    TopK,
    /// `return_k_alternatives` outside 1..=20, or TGI's `top_n_tokens` outside 0..=20 (0: none), named as sent.
    #[error("`{0}` must be >= {1} and <= {MAX_ALTERNATIVES}. Given: {2}")]
    ReturnKAlternatives(&'static str, i64, i64),
    /// `max_new_tokens` <= 0.
    #[error("`max_new_tokens` must be strictly positive")]
    NegativeMaxNewTokens,
    /// Too many stop sequences.
    #[error("`stop` supports up to {0} stop sequences. Given: {1}")]
    StopSequence(usize, usize),
    /// An empty stop sequence.
    #[error("`stop` sequences must not be empty")]
    EmptyStopSequence,
    /// `/tokenize` of more tokens than it answers for.
    #[error("the input is {1} tokens; /tokenize answers for at most {0}")]
    TokenizeLength(u32, usize),
    /// A stop sequence longer than [`MAX_STOP_SEQUENCE_BYTES`].
    #[error("`stop` sequences must be at most {MAX_STOP_SEQUENCE_BYTES} bytes long. Given: {0}")]
    LongStopSequence(usize),
    /// `truncate` outside 1..=max_input_length.
    #[error("`truncate` must be strictly positive and at most {0}. Given: {1}")]
    Truncate(u32, i64),
    /// `decoder_input_details` on a stream.
    #[error("`decoder_input_details` == true is not supported when streaming tokens")]
    PrefillDetailsStream,
    /// Empty `inputs`.
    #[error("`inputs` cannot be empty")]
    EmptyInput,
    /// Prompt too long.
    #[error("`inputs` must have at most {0} tokens. Given: {1}")]
    InputLength(u32, usize),
    /// A prompt token the model has no embedding for (a tokenizer larger than the model's vocabulary).
    #[error("`inputs` holds token id {0}, outside the model's vocabulary of {1} tokens")]
    TokenOutsideVocabulary(u32, u32),
    /// Prompt + max_new_tokens too long.
    #[error("`inputs` tokens + `max_new_tokens` must be <= {0}. Given: {1} `inputs` tokens and {2} `max_new_tokens`")]
    MaxTotalTokens(u32, usize, i64),
    /// The tokenizer failed.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
}

/// Limits and defaults from the command line and the shards.
#[derive(Debug, Clone)]
pub struct ValidationLimits {
    /// Longest prompt in tokens.
    pub max_input_length: u32,
    /// Longest prompt + new tokens.
    pub max_total_tokens: u32,
    /// Most stop sequences.
    pub max_stop_sequences: usize,
    /// Upper bound of the default `max_new_tokens`.
    pub max_new_tokens_default: u32,
    /// Source of an adapter whose request gives no `adapter_source`.
    pub default_adapter_source: AdapterSource,
    /// Whether the shards can load adapters (else requests naming one are refused).
    pub adapters_supported: bool,
    /// The model's vocabulary size: prompt token ids must be below it.
    pub vocab_size: u32,
    /// The base model's id: an `adapter_id` naming it means the base model (as LoRAX, and as the OpenAI
    /// routes' `model`).
    pub base_model_id: String,
}

/// A request that passed validation.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    /// The prompt as sent (for `return_full_text`).
    pub inputs: String,
    /// Prompt token ids after truncation.
    pub input_ids: Vec<u32>,
    /// Next-token parameters for the shard (seed resolved).
    pub sampling: SamplingParameters,
    /// Alternatives per generated token.
    pub top_n_tokens: u32,
    /// Return prompt tokens with log-probabilities.
    pub decoder_input_details: bool,
    /// With `decoder_input_details`: alternatives per prompt token (the OpenAI completions' `echo` with
    /// `logprobs`; 0 on the native routes).
    pub prefill_top_n: u32,
    /// When to stop.
    pub stopping: StoppingParameters,
    /// Return details.
    pub details: bool,
    /// Prepend the prompt to the answer.
    pub return_full_text: bool,
    /// The adapter to apply; `None` for the base model.
    pub adapter: Option<AdapterKey>,
    /// Token for downloading a private adapter (redacted in Debug).
    pub api_token: Option<Secret>,
}

impl ValidRequest {
    /// Prompt length in tokens.
    pub fn input_length(&self) -> u32 {
        u32::try_from(self.input_ids.len()).unwrap_or(u32::MAX)
    }

    /// Tokens this request may occupy: prompt + max_new_tokens.
    pub fn max_total_tokens(&self) -> u32 {
        self.input_length().saturating_add(self.stopping.max_new_tokens)
    }
}

/// Parameters checked before tokenization (everything but the token limits).
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedParameters {
    /// Next-token parameters (seed resolved).
    pub sampling: SamplingParameters,
    /// Alternatives per token.
    pub top_n_tokens: u32,
    /// Requested `max_new_tokens`, if any (> 0).
    pub max_new_tokens: Option<i64>,
    /// Left truncation, if any.
    pub truncate: Option<usize>,
    /// Stop sequences.
    pub stop_sequences: Vec<String>,
    /// Keep going past EOS.
    pub ignore_eos_token: bool,
    /// Return details.
    pub details: bool,
    /// Return prompt log-probabilities.
    pub decoder_input_details: bool,
    /// Prepend the prompt.
    pub return_full_text: bool,
    /// The adapter; `None` for the base model.
    pub adapter: Option<AdapterKey>,
}

/// Validates everything that does not need the tokenizer. `random_seed` supplies the seed of a
/// sampling request that gives none.
pub fn check_parameters(
    p: &GenerateParameters,
    limits: &ValidationLimits,
    stream: bool,
    random_seed: impl FnOnce() -> u64,
) -> Result<CheckedParameters, ValidationError> {
    let adapter = check_adapter(p, limits)?;
    if p.response_format.is_some() {
        return Err(ValidationError::Unsupported("response_format"));
    }
    if p.grammar.is_some() {
        return Err(ValidationError::Unsupported("grammar"));
    }
    if p.apply_chat_template == Some(true) {
        return Err(ValidationError::Unsupported("apply_chat_template"));
    }
    if let Some(best_of) = p.best_of.filter(|&b| b != 1) {
        return Err(ValidationError::BestOf(best_of));
    }
    if p.watermark == Some(true) {
        return Err(ValidationError::Watermark);
    }
    let temperature = p.temperature.unwrap_or(1.0);
    // Floats beyond f32's range arrive as infinities: refused like zero.
    if temperature <= 0.0 || !temperature.is_finite() {
        return Err(ValidationError::Temperature);
    }
    let repetition_penalty = p.repetition_penalty.unwrap_or(1.0);
    if repetition_penalty <= 0.0 || !repetition_penalty.is_finite() {
        return Err(ValidationError::RepetitionPenalty);
    }
    let frequency_penalty = p.frequency_penalty.unwrap_or(0.0);
    if !(-2.0..=2.0).contains(&frequency_penalty) {
        return Err(ValidationError::FrequencyPenalty);
    }
    let presence_penalty = p.presence_penalty.unwrap_or(0.0);
    if !(-2.0..=2.0).contains(&presence_penalty) {
        return Err(ValidationError::PresencePenalty);
    }
    let top_p = match p.top_p {
        // Written so that NaN (which the gRPC API can carry) is refused too.
        Some(v) if !(v > 0.0 && v < 1.0) => return Err(ValidationError::TopP),
        Some(v) => v,
        None => 1.0,
    };
    let typical_p = match p.typical_p {
        Some(v) if !(v > 0.0 && v < 1.0) => return Err(ValidationError::TypicalP),
        Some(v) => v,
        None => 1.0,
    };
    let top_k = match p.top_k {
        Some(v) if v <= 0 => return Err(ValidationError::TopK),
        Some(v) => u32::try_from(v).unwrap_or(u32::MAX),
        None => 0,
    };
    // LoRAX's `return_k_alternatives` from 1; TGI's `top_n_tokens` from 0 (none), as TGI takes it.
    let top_n_tokens = match (p.return_k_alternatives, p.top_n_tokens) {
        (Some(v), _) => ("return_k_alternatives", 1, v),
        (None, Some(v)) => ("top_n_tokens", 0, v),
        (None, None) => ("", 0, 0),
    };
    let top_n_tokens = match top_n_tokens {
        (field, least, v) if !(least..=MAX_ALTERNATIVES).contains(&v) => {
            return Err(ValidationError::ReturnKAlternatives(field, least, v))
        }
        (.., v) => u32::try_from(v).unwrap_or(0),
    };
    if let Some(v) = p.max_new_tokens {
        if v <= 0 {
            return Err(ValidationError::NegativeMaxNewTokens);
        }
    }
    let stop_sequences = p.stop.clone().unwrap_or_default();
    if stop_sequences.len() > limits.max_stop_sequences {
        return Err(ValidationError::StopSequence(
            limits.max_stop_sequences,
            stop_sequences.len(),
        ));
    }
    if stop_sequences.iter().any(String::is_empty) {
        return Err(ValidationError::EmptyStopSequence);
    }
    if let Some(long) = stop_sequences.iter().find(|s| s.len() > MAX_STOP_SEQUENCE_BYTES) {
        return Err(ValidationError::LongStopSequence(long.len()));
    }
    let truncate = match p.truncate {
        Some(v) if v <= 0 || v > i64::from(limits.max_input_length) => {
            return Err(ValidationError::Truncate(limits.max_input_length, v))
        }
        Some(v) => Some(usize::try_from(v).unwrap_or(usize::MAX)),
        None => None,
    };
    let decoder_input_details = p.decoder_input_details.unwrap_or(false);
    if stream && decoder_input_details {
        return Err(ValidationError::PrefillDetailsStream);
    }

    let mut sampling = SamplingParameters {
        temperature,
        top_k,
        top_p,
        typical_p,
        do_sample: p.do_sample.unwrap_or(false),
        seed: 0,
        repetition_penalty,
        frequency_penalty,
        presence_penalty,
    };
    sampling.seed = match p.seed {
        Some(seed) => seed,
        None if sampling.is_sampling() => random_seed(),
        None => 0,
    };
    Ok(CheckedParameters {
        sampling,
        top_n_tokens,
        max_new_tokens: p.max_new_tokens,
        truncate,
        stop_sequences,
        ignore_eos_token: p.ignore_eos_token.unwrap_or(false),
        details: p.details.unwrap_or(false),
        decoder_input_details,
        return_full_text: p.return_full_text.unwrap_or(false),
        adapter,
    })
}

/// The adapter a request names: `None` for the base model (`adapter_id` absent, empty, or the base model's id).
/// `adapter_source` is checked even without an adapter, so a typo is never silently ignored.
fn check_adapter(p: &GenerateParameters, limits: &ValidationLimits) -> Result<Option<AdapterKey>, ValidationError> {
    if p.merged_adapters.is_some() {
        return Err(ValidationError::MergedAdapters);
    }
    let source = match p.adapter_source.as_deref() {
        None | Some("") => limits.default_adapter_source,
        Some(given) => AdapterSource::parse(given)
            .ok_or_else(|| ValidationError::AdapterSource(given.chars().take(ECHO_CHARS).collect()))?,
    };
    let Some(id) = p
        .adapter_id
        .as_deref()
        .filter(|id| !id.is_empty() && *id != limits.base_model_id)
    else {
        return Ok(None);
    };
    if id.len() > MAX_ADAPTER_ID_BYTES {
        return Err(ValidationError::AdapterIdLength(id.len()));
    }
    if id.chars().any(char::is_control) {
        return Err(ValidationError::AdapterIdControl);
    }
    if !limits.adapters_supported {
        return Err(ValidationError::AdaptersUnsupported(id.to_string()));
    }
    Ok(Some(AdapterKey::new(source, id)))
}

/// Applies truncation and the token limits to a tokenized prompt; returns the prompt ids and the
/// effective `max_new_tokens`.
pub fn check_lengths(
    mut encoding: Encoding,
    checked: &CheckedParameters,
    limits: &ValidationLimits,
) -> Result<(Vec<u32>, u32), ValidationError> {
    if let Some(truncate) = checked.truncate {
        if truncate < encoding.len() {
            encoding.truncate(truncate, 0, TruncationDirection::Left);
        }
    }
    let input_ids = encoding.get_ids().to_vec();
    let input_length = input_ids.len();
    if input_length == 0 {
        return Err(ValidationError::EmptyInput);
    }
    if input_length > limits.max_input_length as usize {
        return Err(ValidationError::InputLength(limits.max_input_length, input_length));
    }
    // A tokenizer may have tokens (an added pad or special token) past the model's embeddings: the shard
    // would refuse the whole batch the prompt joins, so the request is refused here, alone.
    if let Some(&id) = input_ids.iter().find(|&&id| id >= limits.vocab_size) {
        return Err(ValidationError::TokenOutsideVocabulary(id, limits.vocab_size));
    }
    let room = limits.max_total_tokens as usize - input_length.min(limits.max_total_tokens as usize);
    let max_new_tokens = match checked.max_new_tokens {
        Some(n) => {
            if input_length as u64 + n.unsigned_abs() > u64::from(limits.max_total_tokens) {
                return Err(ValidationError::MaxTotalTokens(
                    limits.max_total_tokens,
                    input_length,
                    n,
                ));
            }
            u32::try_from(n).unwrap_or(u32::MAX)
        }
        None => limits
            .max_new_tokens_default
            .min(u32::try_from(room).unwrap_or(u32::MAX)),
    };
    if max_new_tokens == 0 {
        // Only reachable when max_input_length >= max_total_tokens, which startup refuses.
        return Err(ValidationError::MaxTotalTokens(
            limits.max_total_tokens,
            input_length,
            0,
        ));
    }
    Ok((input_ids, max_new_tokens))
}

/// Inputs of more than this many bytes per token of the longest answer (and at least
/// [`LONG_INPUT_MIN_BYTES`]) are tokenized in a lane of their own, one at a time
/// ([`Validation::long_input_bytes`]).
const LONG_INPUT_BYTES_PER_TOKEN: usize = 8;
const LONG_INPUT_MIN_BYTES: usize = 64 << 10;

/// Validates requests; tokenization runs on at most `workers` blocking threads at a time, and inputs far
/// longer than any prompt the model takes (a body of up to 2 MiB took 0.7 s to tokenize) one at a time in
/// a lane of their own, in one pass: a stream of them cannot hold every worker (or the piece pool) and
/// delay everyone else's first token. They are still tokenized whole, so their answer (a length error, or
/// their truncation) is exact.
#[derive(Clone)]
pub struct Validation {
    tokenizer: Arc<Tokenizer>,
    /// Ids to text (the OpenAI routes' prompt tokens) and the tokens' raw bytes (OpenAI chat logprobs).
    decoder: crate::detokenize::TokenDecoder,
    /// Prompts word by word, long ones in pieces on a pool of its own, where the tokenizer allows it
    /// (crate::pieces).
    pieces: Option<Arc<PieceEncoder>>,
    workers: Arc<Semaphore>,
    /// The lane of inputs longer than [`Validation::long_input_bytes`]: one permit.
    long_lane: Arc<Semaphore>,
    limits: ValidationLimits,
}

impl std::fmt::Debug for Validation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Validation")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Validation {
    /// Validation with `tokenizer`, `workers` concurrent tokenizations and `limits`.
    pub fn new(tokenizer: Arc<Tokenizer>, workers: usize, limits: ValidationLimits) -> Self {
        Self {
            pieces: PieceEncoder::for_tokenizer(Arc::clone(&tokenizer), pieces::default_threads()).map(Arc::new),
            decoder: crate::detokenize::TokenDecoder::new(Arc::clone(&tokenizer)),
            tokenizer,
            workers: Arc::new(Semaphore::new(workers)),
            long_lane: Arc::new(Semaphore::new(1)),
            limits,
        }
    }

    /// The tokenizer's ids to text, and raw bytes of each token ([`crate::detokenize::TokenDecoder`]).
    pub fn token_decoder(&self) -> crate::detokenize::TokenDecoder {
        self.decoder.clone()
    }

    /// Tokenizes `inputs` off the async workers: in place on the multi-threaded runtime
    /// (`block_in_place` moves this worker's other tasks to another thread), else on a blocking thread.
    /// In place saves the two thread wake-ups of a blocking task, about 0.2 ms of every request's latency.
    /// Inputs of more than [`TOKENIZE_MAX_TOKENS`] tokens (or `--max-total-tokens`, where larger) are
    /// refused: the answer takes some 50 bytes a token, and 2 MiB of rare text made a 102 MB answer.
    /// Longer than any prompt, as clients tokenize texts to cut prompts from them (lorax-bench does).
    pub async fn tokenize(&self, inputs: String, add_special_tokens: bool) -> Result<Encoding, ValidationError> {
        let encoding = self.encode(inputs, add_special_tokens, false).await?;
        let (n, limit) = (
            encoding.get_ids().len(),
            self.limits.max_total_tokens.max(TOKENIZE_MAX_TOKENS),
        );
        if n > limit as usize {
            return Err(ValidationError::TokenizeLength(limit, n));
        }
        Ok(encoding)
    }

    /// [`Validation::tokenize`]; `prompt`: only the ids and special tokens are needed, so the text may be
    /// encoded word by word (a long one in pieces on a thread pool) where the tokenizer allows it
    /// (crate::pieces), its offsets then not those of one pass.
    async fn encode(
        &self,
        inputs: String,
        add_special_tokens: bool,
        prompt: bool,
    ) -> Result<Encoding, ValidationError> {
        // /tokenize answers up to TOKENIZE_MAX_TOKENS, longer than any prompt: its bound scales with that.
        let long = inputs.len() > self.long_input_bytes(prompt);
        let lane = if long { &self.long_lane } else { &self.workers };
        let _permit = lane
            .acquire()
            .await
            .map_err(|_| ValidationError::Tokenizer("tokenizer workers are shut down".into()))?;
        let tokenizer = Arc::clone(&self.tokenizer);
        let split = self.pieces.as_ref().filter(|_| prompt && !long).cloned();
        let encode = move || match split {
            Some(pe) => pe.encode(&inputs, add_special_tokens),
            None => tokenizer.encode(inputs, add_special_tokens),
        };
        let encoding = match tokio::runtime::Handle::current().runtime_flavor() {
            // A tokenizer panic fails the request (422), as it did in a blocking task.
            tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(encode)))
                    .map_err(|_| ValidationError::Tokenizer("the tokenizer panicked".into()))?
            }
            _ => tokio::task::spawn_blocking(encode)
                .await
                .map_err(|e| ValidationError::Tokenizer(e.to_string()))?,
        };
        encoding.map_err(|e| ValidationError::Tokenizer(e.to_string()))
    }

    /// Bytes beyond which an input is tokenized in the long lane: [`LONG_INPUT_BYTES_PER_TOKEN`] per token
    /// of the longest answer (a prompt: `--max-total-tokens`; `/tokenize`: [`TOKENIZE_MAX_TOKENS`] where
    /// larger), at least [`LONG_INPUT_MIN_BYTES`].
    fn long_input_bytes(&self, prompt: bool) -> usize {
        let tokens = match prompt {
            true => self.limits.max_total_tokens,
            false => self.limits.max_total_tokens.max(TOKENIZE_MAX_TOKENS),
        };
        (tokens as usize)
            .saturating_mul(LONG_INPUT_BYTES_PER_TOKEN)
            .max(LONG_INPUT_MIN_BYTES)
    }

    /// The adapter `parameters` name (with the default source applied), checked as validation checks it.
    pub fn adapter_of(&self, parameters: &GenerateParameters) -> Result<Option<AdapterKey>, ValidationError> {
        check_adapter(parameters, &self.limits)
    }

    /// Validates a generate request (`stream`: for /generate_stream).
    pub async fn validate(&self, request: GenerateRequest, stream: bool) -> Result<ValidRequest, ValidationError> {
        self.validate_prompt(request, stream, true).await
    }

    /// [`Validation::validate`], tokenizing the prompt with or without the tokenizer's special tokens
    /// (a prompt rendered by a chat template already has them).
    pub async fn validate_prompt(
        &self,
        request: GenerateRequest,
        stream: bool,
        add_special_tokens: bool,
    ) -> Result<ValidRequest, ValidationError> {
        self.validate_input(request, None, stream, add_special_tokens).await
    }

    /// [`Validation::validate_prompt`] for a prompt given as token ids (the OpenAI completions' `prompt`):
    /// the same checks, without tokenizing; no special tokens are added. `inputs` becomes the ids' text.
    pub async fn validate_ids(
        &self,
        request: GenerateRequest,
        ids: Vec<u32>,
        stream: bool,
    ) -> Result<ValidRequest, ValidationError> {
        self.validate_input(request, Some(ids), stream, false).await
    }

    /// The prompt is `request.inputs`, tokenized (with special tokens if asked), or `ids` when given.
    async fn validate_input(
        &self,
        mut request: GenerateRequest,
        ids: Option<Vec<u32>>,
        stream: bool,
        add_special_tokens: bool,
    ) -> Result<ValidRequest, ValidationError> {
        let mut parameters = request.parameters.take().unwrap_or_default();
        let checked = check_parameters(&parameters, &self.limits, stream, random_seed)?;
        let api_token = checked.adapter.as_ref().and(parameters.api_token.take());
        let given = ids.is_some();
        let encoding = match ids {
            None if request.inputs.is_empty() => return Err(ValidationError::EmptyInput),
            None => self.encode(request.inputs.clone(), add_special_tokens, true).await?,
            Some(ids) if ids.is_empty() => return Err(ValidationError::EmptyInput),
            Some(ids) => pieces::encoding_of_ids(ids),
        };
        // Truncation (`truncate`), the length limits and the vocabulary.
        let (input_ids, max_new_tokens) = check_lengths(encoding, &checked, &self.limits)?;
        if given {
            let tokenizer = Arc::clone(&self.tokenizer);
            let text_ids = input_ids.clone();
            // Special tokens take no room in the text (as in the OpenAI routes' `text_offset`).
            request.inputs = tokio::task::spawn_blocking(move || tokenizer.decode(&text_ids, true))
                .await
                .map_err(|_| ValidationError::Tokenizer("the tokenizer panicked".into()))?
                .map_err(|e| ValidationError::Tokenizer(e.to_string()))?;
        }
        metrics::histogram!(m::REQUEST_INPUT_LENGTH).record(input_ids.len() as f64);
        metrics::histogram!(m::REQUEST_MAX_NEW_TOKENS).record(f64::from(max_new_tokens));
        Ok(ValidRequest {
            inputs: request.inputs,
            input_ids,
            sampling: checked.sampling,
            top_n_tokens: checked.top_n_tokens,
            decoder_input_details: checked.decoder_input_details,
            prefill_top_n: 0,
            stopping: StoppingParameters {
                max_new_tokens,
                stop_sequences: checked.stop_sequences,
                ignore_eos_token: checked.ignore_eos_token,
            },
            details: checked.details,
            return_full_text: checked.return_full_text,
            adapter: checked.adapter,
            api_token,
        })
    }
}

/// A seed from the operating system's generator (a fixed fallback if it is unavailable).
fn random_seed() -> u64 {
    getrandom::u64().unwrap_or(0x9E37_79B9_7F4A_7C15)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detokenize::tests::fixture_tokenizer;

    fn limits() -> ValidationLimits {
        ValidationLimits {
            max_input_length: 10,
            max_total_tokens: 16,
            max_stop_sequences: 2,
            max_new_tokens_default: 100,
            default_adapter_source: AdapterSource::Hub,
            adapters_supported: true,
            vocab_size: 32000,
            base_model_id: "org/base".into(),
        }
    }

    fn params(json: serde_json::Value) -> GenerateParameters {
        serde_json::from_value(json).expect("parameters")
    }

    fn check(json: serde_json::Value) -> Result<CheckedParameters, ValidationError> {
        check_parameters(&params(json), &limits(), false, || 42)
    }

    #[test]
    fn defaults_are_greedy() {
        let c = check(serde_json::json!({})).expect("valid");
        assert!(!c.sampling.is_sampling());
        assert_eq!(c.sampling.seed, 0);
        assert_eq!(c.sampling.temperature, 1.0);
        assert_eq!(c.sampling.top_p, 1.0);
        assert_eq!(c.sampling.typical_p, 1.0);
        assert_eq!(c.sampling.top_k, 0);
        assert_eq!(c.sampling.repetition_penalty, 1.0);
        assert_eq!(c.top_n_tokens, 0);
        // TGI's `top_n_tokens: 0` is none, as TGI takes it.
        assert_eq!(
            check(serde_json::json!({"top_n_tokens": 0}))
                .expect("valid")
                .top_n_tokens,
            0
        );
        assert_eq!(
            check(serde_json::json!({"top_n_tokens": 3}))
                .expect("valid")
                .top_n_tokens,
            3
        );
        assert!(!c.details && !c.decoder_input_details && !c.return_full_text && !c.ignore_eos_token);
    }

    #[test]
    fn sampling_gets_a_seed() {
        let c = check(serde_json::json!({"temperature": 0.5})).expect("valid");
        assert!(c.sampling.is_sampling());
        assert_eq!(c.sampling.seed, 42);
        let c = check(serde_json::json!({"do_sample": true, "seed": 7})).expect("valid");
        assert!(c.sampling.is_sampling());
        assert_eq!(c.sampling.seed, 7);
        let c = check(serde_json::json!({"top_k": 5})).expect("valid");
        assert!(c.sampling.is_sampling());
    }

    #[test]
    fn lorax_client_payload_is_accepted() {
        // What lorax-client's `Parameters(...).dict()` sends for a plain generate call.
        let c = check(serde_json::json!({
            "adapter_id": null, "adapter_source": null, "merged_adapters": null, "api_token": null,
            "do_sample": false, "max_new_tokens": 20, "ignore_eos_token": false, "repetition_penalty": null,
            "return_full_text": false, "stop": [], "seed": null, "temperature": null, "top_k": null,
            "top_p": null, "truncate": null, "typical_p": null, "best_of": null, "watermark": false,
            "details": true, "decoder_input_details": false, "return_k_alternatives": null,
            "response_format": null
        }))
        .expect("valid");
        assert_eq!(c.max_new_tokens, Some(20));
        assert!(c.details);
    }

    #[test]
    fn each_bad_parameter_has_its_error() {
        use serde_json::json;
        use ValidationError as E;
        let cases: Vec<(serde_json::Value, ValidationError)> = vec![
            (json!({"merged_adapters": {"ids": ["a"]}}), E::MergedAdapters),
            (
                json!({"adapter_id": "a/b", "adapter_source": "s3"}),
                E::AdapterSource("s3".into()),
            ),
            (json!({"adapter_source": "HUB"}), E::AdapterSource("HUB".into())),
            (json!({"adapter_id": "a".repeat(257)}), E::AdapterIdLength(257)),
            (json!({"adapter_id": "org/a\u{0}b"}), E::AdapterIdControl),
            (json!({"adapter_id": "org/a\nb"}), E::AdapterIdControl),
            (
                json!({"response_format": {"type": "json_object"}}),
                E::Unsupported("response_format"),
            ),
            (json!({"grammar": {"type": "json"}}), E::Unsupported("grammar")),
            (
                json!({"apply_chat_template": true}),
                E::Unsupported("apply_chat_template"),
            ),
            (json!({"best_of": 2}), E::BestOf(2)),
            (json!({"best_of": 0}), E::BestOf(0)),
            (json!({"watermark": true}), E::Watermark),
            (json!({"temperature": 0.0}), E::Temperature),
            (json!({"temperature": -1.0}), E::Temperature),
            (json!({"repetition_penalty": 0.0}), E::RepetitionPenalty),
            (json!({"temperature": 1e39}), E::Temperature),
            (json!({"repetition_penalty": 1e39}), E::RepetitionPenalty),
            (json!({"frequency_penalty": 2.5}), E::FrequencyPenalty),
            (json!({"presence_penalty": -2.5}), E::PresencePenalty),
            (json!({"top_p": 0.0}), E::TopP),
            (json!({"top_p": 1.0}), E::TopP),
            (json!({"typical_p": 1.0}), E::TypicalP),
            (json!({"typical_p": -0.1}), E::TypicalP),
            (json!({"top_k": 0}), E::TopK),
            (json!({"top_k": -3}), E::TopK),
            (
                json!({"return_k_alternatives": 0}),
                E::ReturnKAlternatives("return_k_alternatives", 1, 0),
            ),
            (
                json!({"return_k_alternatives": 21}),
                E::ReturnKAlternatives("return_k_alternatives", 1, 21),
            ),
            (
                json!({"top_n_tokens": 21}),
                E::ReturnKAlternatives("top_n_tokens", 0, 21),
            ),
            (
                json!({"top_n_tokens": -1}),
                E::ReturnKAlternatives("top_n_tokens", 0, -1),
            ),
            (json!({"max_new_tokens": 0}), E::NegativeMaxNewTokens),
            (json!({"max_new_tokens": -5}), E::NegativeMaxNewTokens),
            (json!({"stop": ["a", "b", "c"]}), E::StopSequence(2, 3)),
            (json!({"stop": [""]}), E::EmptyStopSequence),
            (json!({"stop": ["x".repeat(1025)]}), E::LongStopSequence(1025)),
            (json!({"truncate": 0}), E::Truncate(10, 0)),
            (json!({"truncate": 11}), E::Truncate(10, 11)),
        ];
        for (json, expected) in cases {
            assert_eq!(check(json.clone()), Err(expected), "{json}");
        }
        // NaN, which only the gRPC API can send, is out of every range.
        for set in [
            |p: &mut GenerateParameters| p.top_p = Some(f32::NAN),
            |p: &mut GenerateParameters| p.typical_p = Some(f32::NAN),
            |p: &mut GenerateParameters| p.temperature = Some(f32::NAN),
            |p: &mut GenerateParameters| p.repetition_penalty = Some(f32::NAN),
            |p: &mut GenerateParameters| p.frequency_penalty = Some(f32::NAN),
            |p: &mut GenerateParameters| p.presence_penalty = Some(f32::NAN),
        ] {
            let mut p = params(json!({}));
            set(&mut p);
            assert!(check_parameters(&p, &limits(), false, || 0).is_err(), "{p:?}");
        }
        let p = params(json!({"decoder_input_details": true}));
        assert_eq!(
            check_parameters(&p, &limits(), true, || 0),
            Err(E::PrefillDetailsStream)
        );
        assert!(check_parameters(&p, &limits(), false, || 0).is_ok());
    }

    #[test]
    fn empty_adapter_id_or_the_base_models_means_base_model() {
        let c = check(serde_json::json!({"adapter_id": "", "adapter_source": "hub"})).expect("valid");
        assert_eq!(c.adapter, None);
        assert_eq!(check(serde_json::json!({})).expect("valid").adapter, None);
        // The base model's own id (as LoRAX; the OpenAI routes' `model` is read the same way).
        assert_eq!(limits().base_model_id, "org/base");
        assert_eq!(
            check(serde_json::json!({"adapter_id": "org/base"}))
                .expect("valid")
                .adapter,
            None
        );
        let c = check(serde_json::json!({"adapter_id": "org/base2"})).expect("valid");
        assert_eq!(c.adapter, Some(AdapterKey::new(AdapterSource::Hub, "org/base2")));
    }

    #[test]
    fn adapters_with_and_without_source() {
        let c = check(serde_json::json!({"adapter_id": "org/a"})).expect("valid");
        assert_eq!(c.adapter, Some(AdapterKey::new(AdapterSource::Hub, "org/a")));
        let c = check(serde_json::json!({"adapter_id": "/data/a", "adapter_source": "local"})).expect("valid");
        assert_eq!(c.adapter, Some(AdapterKey::new(AdapterSource::Local, "/data/a")));
        let c = check(serde_json::json!({"adapter_id": "x", "adapter_source": ""})).expect("valid");
        assert_eq!(c.adapter, Some(AdapterKey::new(AdapterSource::Hub, "x")));
        let longest = "a".repeat(MAX_ADAPTER_ID_BYTES);
        assert!(check(serde_json::json!({ "adapter_id": longest })).is_ok());

        let local_default = ValidationLimits {
            default_adapter_source: AdapterSource::Local,
            ..limits()
        };
        let c = check_parameters(
            &params(serde_json::json!({"adapter_id": "x"})),
            &local_default,
            false,
            || 0,
        )
        .expect("valid");
        assert_eq!(c.adapter, Some(AdapterKey::new(AdapterSource::Local, "x")));
    }

    #[test]
    fn adapter_messages_are_clear() {
        let e = check(serde_json::json!({"adapter_id": "x", "adapter_source": "pbase"})).expect_err("bad source");
        assert_eq!(
            e.to_string(),
            "`adapter_source` must be one of \"hub\", \"local\". Given: \"pbase\""
        );
        let e = check(serde_json::json!({"adapter_source": "s".repeat(1000)})).expect_err("bad source");
        assert!(e.to_string().len() < 200, "the echo is cut short: {e}");
        let e = check(serde_json::json!({"merged_adapters": {}})).expect_err("refused");
        assert!(e.to_string().contains("`merged_adapters` is not supported"), "{e}");
        let unsupported = ValidationLimits {
            adapters_supported: false,
            ..limits()
        };
        let e = check_parameters(
            &params(serde_json::json!({"adapter_id": "x/y"})),
            &unsupported,
            false,
            || 0,
        )
        .expect_err("refused");
        assert!(e.to_string().contains("do not support adapters"), "{e}");
    }

    #[tokio::test]
    async fn api_token_is_kept_for_adapters_only_and_never_shown() {
        let v = validation(8, 20);
        let with_adapter = v
            .validate(
                request(
                    "Hello",
                    serde_json::json!({"adapter_id": "org/private", "api_token": "hf_SECRET"}),
                ),
                false,
            )
            .await
            .expect("valid");
        assert_eq!(with_adapter.api_token, Some(Secret("hf_SECRET".into())));
        let debug = format!("{with_adapter:?}");
        assert!(!debug.contains("hf_SECRET"), "{debug}");
        assert!(debug.contains("org/private"), "{debug}");
        let base = v
            .validate(request("Hello", serde_json::json!({"api_token": "hf_SECRET"})), false)
            .await
            .expect("valid");
        assert_eq!(base.api_token, None, "the base model needs no token");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let r: Result<GenerateParameters, _> = serde_json::from_value(serde_json::json!({"max_tokens": 3}));
        assert!(r.is_err());
        let r: Result<GenerateRequest, _> = serde_json::from_value(serde_json::json!({"inputs": "a", "extra": 1}));
        assert!(r.is_err());
    }

    fn validation(max_input_length: u32, max_total_tokens: u32) -> Validation {
        Validation::new(
            fixture_tokenizer(),
            1,
            ValidationLimits {
                max_input_length,
                max_total_tokens,
                max_stop_sequences: 4,
                max_new_tokens_default: 100,
                default_adapter_source: AdapterSource::Hub,
                adapters_supported: true,
                vocab_size: 32000,
                base_model_id: "org/base".into(),
            },
        )
    }

    fn request(inputs: &str, parameters: serde_json::Value) -> GenerateRequest {
        serde_json::from_value(serde_json::json!({"inputs": inputs, "parameters": parameters})).expect("request")
    }

    /// An input far longer than any prompt waits for the long lane only: while the lane is taken, short
    /// prompts are served on the one worker, and the long input is answered (exactly, as too long) once
    /// the lane is free.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn inputs_far_longer_than_any_prompt_wait_in_a_lane_of_their_own() {
        use futures::FutureExt;
        let v = validation(8, 20);
        assert_eq!(v.long_input_bytes(true), LONG_INPUT_MIN_BYTES);
        assert_eq!(v.long_input_bytes(false), 8 * TOKENIZE_MAX_TOKENS as usize);
        let long = "word ".repeat(LONG_INPUT_MIN_BYTES / 5 + 1);
        let held = Arc::clone(&v.long_lane).acquire_owned().await.expect("lane");
        let mut waiting = Box::pin(v.validate(request(&long, serde_json::json!({})), false));
        assert!(
            (&mut waiting).now_or_never().is_none(),
            "the long input did not wait for its lane"
        );
        for _ in 0..3 {
            let ok = v
                .validate(request("Hello world", serde_json::json!({})), false)
                .await
                .expect("a short prompt is served while the long lane is taken");
            assert_eq!(ok.input_ids, vec![1, 22557, 1526]);
        }
        drop(held);
        let e = waiting.await.expect_err("too long");
        assert!(
            matches!(e, ValidationError::InputLength(8, n) if n > LONG_INPUT_MIN_BYTES / 5),
            "{e:?}"
        );
        // Just under the bound, an input takes the workers' lane.
        let v = validation(8, 20);
        let _held = Arc::clone(&v.long_lane).acquire_owned().await.expect("lane");
        let under = "a".repeat(LONG_INPUT_MIN_BYTES);
        let bounded = std::time::Duration::from_secs(60);
        let e = tokio::time::timeout(bounded, v.validate(request(&under, serde_json::json!({})), false))
            .await
            .expect("an input under the bound waited for the long lane")
            .expect_err("too long");
        assert!(matches!(e, ValidationError::InputLength(8, _)), "{e:?}");
    }

    #[tokio::test]
    async fn prompt_tokens_outside_the_models_vocabulary_are_refused() {
        // "Hello world" = <s> ▁Hello ▁world = [1, 22557, 1526], against a model of 22557 tokens.
        let mut v = validation(8, 20);
        v.limits.vocab_size = 22557;
        let e = v
            .validate(request("Hello world", serde_json::json!({})), false)
            .await
            .expect_err("outside");
        assert_eq!(e, ValidationError::TokenOutsideVocabulary(22557, 22557));
        v.limits.vocab_size = 22558;
        assert!(v
            .validate(request("Hello world", serde_json::json!({})), false)
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn token_limits() {
        let v = validation(8, 20);
        // "Hello world" = <s> ▁Hello ▁world: 3 tokens.
        let ok = v
            .validate(request("Hello world", serde_json::json!({})), false)
            .await
            .expect("valid");
        assert_eq!(ok.input_ids, vec![1, 22557, 1526]);
        assert_eq!(ok.stopping.max_new_tokens, 17, "default = min(100, 20 - 3)");

        let e = v
            .validate(request("Hello world", serde_json::json!({"max_new_tokens": 18})), false)
            .await
            .expect_err("too long");
        assert_eq!(e, ValidationError::MaxTotalTokens(20, 3, 18));
        assert!(v
            .validate(request("Hello world", serde_json::json!({"max_new_tokens": 17})), false)
            .await
            .is_ok());

        let long = "one two three four five six seven eight nine ten";
        let e = v
            .validate(request(long, serde_json::json!({})), false)
            .await
            .expect_err("long");
        assert!(matches!(e, ValidationError::InputLength(8, n) if n > 8), "{e:?}");

        let e = v
            .validate(request("", serde_json::json!({})), false)
            .await
            .expect_err("empty");
        assert_eq!(e, ValidationError::EmptyInput);
    }

    /// A long prompt (encoded word by word, in pieces on the pool) has the ids of one pass,
    /// truncated too; `tokenize` (offsets for /tokenize) stays one pass.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn long_prompts_have_the_ids_of_one_pass() {
        let v = validation(8000, 8100);
        assert!(v.pieces.is_some(), "the fixture tokenizer is encoded word by word");
        let long: String = (0..1500)
            .map(|i| ["ka", "lorem </s>", "ipsum,", "sol\n", "  mar"][i % 5])
            .collect::<Vec<_>>()
            .join(" ");
        let whole = fixture_tokenizer().encode(long.as_str(), true).expect("encode");
        let ok = v
            .validate(request(&long, serde_json::json!({})), false)
            .await
            .expect("valid");
        assert_eq!(ok.input_ids.as_slice(), whole.get_ids());
        let ok = v
            .validate(request(&long, serde_json::json!({"truncate": 700})), false)
            .await
            .expect("valid");
        assert_eq!(ok.input_ids.as_slice(), &whole.get_ids()[whole.len() - 700..]);
        let tokens = v.tokenize(long.clone(), true).await.expect("tokenize");
        assert_eq!(tokens.get_offsets(), whole.get_offsets());
    }

    #[tokio::test]
    async fn truncate_keeps_the_last_tokens() {
        let v = validation(8, 20);
        let long = "one two three four five six seven eight nine ten";
        let full = v.tokenize(long.to_string(), true).await.expect("tokenize");
        let ok = v
            .validate(request(long, serde_json::json!({"truncate": 4})), false)
            .await
            .expect("valid after truncation");
        assert_eq!(ok.input_ids.as_slice(), &full.get_ids()[full.len() - 4..]);
        assert_eq!(ok.inputs, long, "the original text is kept for return_full_text");
    }

    #[tokio::test]
    async fn default_max_new_tokens_is_capped_by_the_flag() {
        let v = validation(8, 2048);
        let ok = v
            .validate(request("Hello", serde_json::json!({})), false)
            .await
            .expect("valid");
        assert_eq!(ok.stopping.max_new_tokens, 100);
    }
}
