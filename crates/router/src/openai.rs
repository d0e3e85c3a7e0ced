//! OpenAI-compatible routes: `POST /v1/completions`, `POST /v1/chat/completions` (both streamed as
//! server-sent events ending with `data: [DONE]`, or answered whole) and `GET /v1/models`.
//!
//! A request is translated into the native [`GenerateRequest`] and runs through the same validation,
//! queue and adapter scheduler as `/generate`. `model` picks the adapter: empty, absent or the base
//! model's id means the base model; anything else is an adapter id (source from the LoRAX extension
//! field `adapter_source`, else the router's default). Chat messages become a prompt through the
//! model's chat template ([`crate::chat`]), tokenized without adding special tokens again, as
//! transformers' `apply_chat_template` does. Errors have OpenAI's shape:
//! `{"error": {"message", "type", "param", "code"}}`, with the same status codes as the native API.

use std::convert::Infallible;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::OwnedSemaphorePermit;

use crate::chat::Message;
use crate::errors::{ApiError, VALIDATION};
use crate::infer::{GeneratedText, InferError, InferResponse, InferStreamResponse, ResponseReceiver, TokenInfo};
use crate::metrics as m;
use crate::schema::{GenerateParameters, GenerateRequest, Secret};
use crate::server::{ApiJson, AppState, Timings};
use crate::stopping::FinishReason;
use crate::validation::ValidRequest;

/// Most choices (`n`) one request may ask for.
pub const MAX_N: u32 = 8;
/// Most alternatives per token of completions (`logprobs`).
pub const MAX_LOGPROBS: u32 = 5;
/// Most chat `top_logprobs` (OpenAI's limit; the native routes' `return_k_alternatives` allows as many).
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// An error in OpenAI's shape (same status and `type` = the native `error_type`).
pub struct OpenAiError(pub ApiError);

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let status = self.0.status;
        crate::errors::closing_if_unread(status, (status, Json(openai_error_body(&self.0))).into_response())
    }
}

/// OpenAI's error object. Messages of the shared validation name the native fields: these routes' own
/// names replace them (`max_tokens`; the prompt for `inputs`, which is the rendered messages on chat),
/// and `param` is the first field the message names, as OpenAI's errors give it.
fn openai_error_body(e: &ApiError) -> Value {
    let message = e
        .message
        .replace("`max_new_tokens`", "`max_tokens`")
        .replace("`adapter_id`", "`model`")
        .replace("`inputs` tokens", "prompt tokens")
        .replace("`inputs`", "the prompt");
    // The first request field the message names (not an adapter's id, which messages also quote); of a
    // path (`messages[0].content`), its first field.
    const FIELDS: [&str; 29] = [
        "max_tokens",
        "max_completion_tokens",
        "repetition_penalty",
        "echo",
        "model",
        "temperature",
        "top_p",
        "top_k",
        "n",
        "best_of",
        "suffix",
        "stop",
        "seed",
        "logprobs",
        "top_logprobs",
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
        "messages",
        "prompt",
        "stream",
        "stream_options",
        "user",
        "adapter_source",
        "api_token",
        "ignore_eos_token",
        "response_format",
        "tools",
        "tool_choice",
    ];
    let param = message
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|p| p.split(['.', '[']).next().unwrap_or_default())
        .find(|p| FIELDS.contains(p))
        .map(str::to_string);
    json!({"error": {"message": message, "type": e.error_type, "param": param, "code": e.status.as_u16().to_string()}})
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, VALIDATION, message)
}

/// An OpenAI request body: [`ApiJson`]'s checks (a JSON object within the body limit, with its content type),
/// then `T` read from it with the path of the field that failed in the message (so that `param` names it).
/// Serde loses the path inside the shared fields, which each request flattens in: a failure there is read
/// again from [`CommonParameters`] alone to find its field.
pub struct OpenAiJson<T>(pub T);

impl<T, S> axum::extract::FromRequest<S> for OpenAiJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        // The bytes (within the body limit), then ApiJson's checks on them (content type, syntax, an object;
        // read into nothing), then `T` from the bytes themselves (a map of them would take a repeated field's
        // last value where `T` refuses it). Only a failure reads them into a `Value`, for its message.
        let (parts, body) = req.into_parts();
        let bytes = axum::body::Bytes::from_request(axum::extract::Request::from_parts(parts.clone(), body), state)
            .await
            .map_err(|e| match e.status() {
                StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(e.status(), VALIDATION, "request body is too large"),
                status => ApiError::new(status, VALIDATION, e.body_text()),
            })?;
        let again = axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes.clone()));
        ApiJson::<serde::de::IgnoredAny>::from_request(again, state).await?;
        serde_path_to_error::deserialize::<_, T>(&mut serde_json::Deserializer::from_slice(&bytes))
            .map(Self)
            .map_err(|e| invalid(body_error(&bytes, &e)))
    }
}

/// The message of a body that is a JSON object but not the request: "invalid request body: `field`: serde's
/// reason".
fn body_error(body: &[u8], e: &serde_path_to_error::Error<serde_json::Error>) -> String {
    let (mut path, mut reason) = (e.path().to_string(), e.inner().to_string());
    if path == "." {
        let common = serde_json::from_slice::<Value>(body)
            .map(|v| serde_path_to_error::deserialize::<_, CommonParameters>(&v).err());
        if let Ok(Some(common)) = common {
            (path, reason) = (common.path().to_string(), common.inner().to_string());
        }
    }
    match path.as_str() {
        "." => format!("invalid request body: {reason}"),
        field => format!("invalid request body: `{field}`: {reason}"),
    }
}

/// A string or a list of strings (`stop`).
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(try_from = "Value")]
pub enum OneOrMany {
    /// One string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `value` as a list of `T` (`None` when it is no list, or an entry is no `T`), read in place.
fn list_of<T: serde::de::DeserializeOwned>(value: &Value) -> Option<Vec<T>> {
    value.is_array().then(|| Vec::<T>::deserialize(value).ok()).flatten()
}

impl TryFrom<Value> for OneOrMany {
    type Error = &'static str;

    fn try_from(value: Value) -> Result<Self, Self::Error> {
        match value {
            Value::String(s) => Ok(Self::One(s)),
            v => list_of(&v)
                .map(Self::Many)
                .ok_or("expected a string or a list of strings"),
        }
    }
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` (and no choices) before `[DONE]`.
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields both OpenAI requests share, plus LoRAX's extensions.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
pub struct CommonParameters {
    /// Base model (empty, absent or its id) or an adapter id.
    #[serde(default)]
    pub model: Option<String>,
    /// Most tokens to generate.
    pub max_tokens: Option<i64>,
    /// Softmax temperature; 0 means greedy.
    pub temperature: Option<f32>,
    /// Nucleus sampling mass; 1 means off.
    pub top_p: Option<f32>,
    /// Number of choices (1..=8).
    pub n: Option<u32>,
    /// Stop sequences.
    pub stop: Option<OneOrMany>,
    /// Answer as server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Sampler seed (choice `i` uses `seed + i`).
    pub seed: Option<u64>,
    /// OpenAI presence penalty.
    pub presence_penalty: Option<f32>,
    /// OpenAI frequency penalty.
    pub frequency_penalty: Option<f32>,
    /// End-user id; accepted and ignored.
    pub user: Option<String>,
    /// Token biases: not supported (refused when non-empty).
    #[schema(value_type = Option<Object>)]
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    /// LoRAX extension: source of the adapter named by `model`.
    pub adapter_source: Option<String>,
    /// LoRAX extension: hub token for a private adapter.
    #[schema(value_type = Option<String>, format = Password)]
    pub api_token: Option<Secret>,
    /// LoRAX extension: top-k sampling.
    pub top_k: Option<i64>,
    /// LoRAX extension: repetition penalty.
    pub repetition_penalty: Option<f32>,
    /// LoRAX extension: keep generating past end-of-sequence tokens.
    pub ignore_eos_token: Option<bool>,
}

/// A completion's `prompt`: a string, token ids, or a list of either (a batch: the choices of every prompt,
/// `n` a prompt, in order).
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(try_from = "Value")]
pub enum Prompt {
    /// One text.
    Text(String),
    /// Several texts.
    Texts(Vec<String>),
    /// One prompt as token ids (no special tokens are added).
    Ids(Vec<u32>),
    /// Several prompts as token ids.
    IdLists(Vec<Vec<u32>>),
}

/// One prompt of a completion request.
#[derive(Debug, Clone, PartialEq)]
enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
}

impl TryFrom<Value> for Prompt {
    type Error = &'static str;

    fn try_from(value: Value) -> Result<Self, Self::Error> {
        if let Value::String(s) = value {
            return Ok(Self::Text(s));
        }
        list_of(&value)
            .map(Self::Texts)
            .or_else(|| list_of(&value).map(Self::Ids))
            .or_else(|| list_of(&value).map(Self::IdLists))
            .ok_or("expected a string, a list of strings, a list of token ids or a list of lists of token ids")
    }
}

impl Prompt {
    fn into_inputs(self) -> Vec<PromptInput> {
        match self {
            Self::Text(t) => vec![PromptInput::Text(t)],
            Self::Texts(v) => v.into_iter().map(PromptInput::Text).collect(),
            Self::Ids(ids) => vec![PromptInput::Ids(ids)],
            Self::IdLists(v) => v.into_iter().map(PromptInput::Ids).collect(),
        }
    }
}

/// Body of `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct CompletionRequest {
    /// The prompt: a string, a list of token ids, or a list of either (a batch of prompts).
    #[schema(value_type = Object)]
    pub prompt: Prompt,
    /// Alternatives per token to return (0..=5), with each token's log-probability. With `echo`, the prompt's
    /// tokens come first (the first one's log-probability and alternatives `null`).
    pub logprobs: Option<u32>,
    /// Prepend the prompt to the text (with `max_tokens: 0`, return the prompt alone: prompt scoring).
    #[serde(default)]
    pub echo: bool,
    /// Must be absent or equal to `n`.
    pub best_of: Option<u32>,
    /// Text after the completion: not supported.
    pub suffix: Option<String>,
    /// The shared fields.
    #[serde(flatten)]
    pub common: CommonParameters,
}

/// Content of a chat message: a string or a list of text parts.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(try_from = "Value")]
pub enum ChatContent {
    /// Plain text.
    Text(String),
    /// Parts; only `{"type": "text", "text": ...}` parts are supported.
    Parts(Vec<Value>),
}

impl TryFrom<Value> for ChatContent {
    type Error = &'static str;

    fn try_from(value: Value) -> Result<Self, Self::Error> {
        match value {
            Value::String(s) => Ok(Self::Text(s)),
            Value::Array(parts) => Ok(Self::Parts(parts)),
            _ => Err("expected a string or a list of content parts"),
        }
    }
}

/// A message of a chat request.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// Text.
    #[serde(default)]
    pub content: Option<ChatContent>,
}

/// Body of `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct ChatCompletionRequest {
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Return each token's log-probability.
    #[serde(default)]
    pub logprobs: bool,
    /// Alternatives per token (0..=5); needs `logprobs`.
    pub top_logprobs: Option<u32>,
    /// Newer name of `max_tokens`.
    pub max_completion_tokens: Option<i64>,
    /// Only `{"type": "text"}` is supported.
    pub response_format: Option<Value>,
    /// Tool calling: not supported.
    pub tools: Option<Value>,
    /// Tool choice: only "none" is accepted.
    pub tool_choice: Option<Value>,
    /// The shared fields.
    #[serde(flatten)]
    pub common: CommonParameters,
}

/// What an answer needs to know besides the generations.
struct Plan {
    id: String,
    created: u64,
    model: String,
    requests: Vec<GenerateRequest>,
    add_special_tokens: bool,
    stream: bool,
    include_usage: bool,
    alternatives: u32,
    logprobs: bool,
    /// Each choice's prompt as token ids (`Some` for a prompt given as ids), one entry per request, or empty.
    ids: Vec<Option<Vec<u32>>>,
    /// Which prompt each request's choice is of (usage counts each prompt's tokens once).
    prompt_of: Vec<usize>,
    /// Prepend each choice's prompt to its text.
    echo: bool,
    /// `echo` with `logprobs`: the prompt's tokens, their log-probabilities and alternatives lead the
    /// choice's `logprobs`.
    prompt_logprobs: bool,
    /// `echo` with `max_tokens: 0`: the one token generated (to run the prompt) is not returned.
    drop_generated: bool,
    /// The tokens that end a choice (the model's end-of-sequence tokens; none with `ignore_eos_token`).
    eos: Vec<u32>,
    /// Ids to text (prompt tokens in context) and the tokens' raw bytes (chat logprobs' `bytes`).
    decoder: crate::detokenize::TokenDecoder,
}

impl Plan {
    /// The stop sequences (the same for every choice).
    fn stops(&self) -> &[String] {
        self.requests
            .first()
            .and_then(|r| r.parameters.as_ref())
            .and_then(|p| p.stop.as_deref())
            .unwrap_or_default()
    }

    /// The text a choice of `valid` starts with: its prompt with `echo` (a prompt of token ids decoded).
    fn echo_of<'a>(&self, valid: &'a ValidRequest) -> Option<&'a str> {
        self.echo.then_some(valid.inputs.as_str())
    }

    /// Prompt tokens the request's choices read, each prompt counted once.
    fn prompt_tokens(&self, started: &[(ValidRequest, ResponseReceiver, OwnedSemaphorePermit)]) -> u32 {
        let mut seen = std::collections::HashSet::new();
        started
            .iter()
            .enumerate()
            .filter(|(i, _)| seen.insert(self.prompt_of.get(*i).copied().unwrap_or(0)))
            .map(|(_, (v, _, _))| v.input_length())
            .sum()
    }
}

/// A choice's text as the OpenAI routes return it: the text of the generated tokens but special ones (as
/// the native routes' `generated_text`), without the stop sequence that ended it (OpenAI: the returned
/// text does not contain the stop sequence). Streamed, each chunk carries what the final text keeps for
/// sure: an end of the text that could be the start of a stop sequence waits for the next token.
#[derive(Debug, Default)]
struct ChoiceText {
    /// The non-special tokens' text so far (what the router searches for stop sequences).
    text: String,
    /// Characters in `text`.
    chars: usize,
    /// Bytes of `text` sent.
    sent: usize,
}

impl ChoiceText {
    fn add(&mut self, token: &TokenInfo) {
        let text = token.plain_text();
        self.text.push_str(text);
        self.chars += text.chars().count();
    }

    /// Adds `token`'s text; returns what can be sent now.
    fn push(&mut self, token: &TokenInfo, stops: &[String]) -> String {
        self.add(token);
        let end = self.text.len() - stop_start_len(&self.text[self.sent..], stops);
        let out = self.text[self.sent..end].to_string();
        self.sent = end;
        out
    }

    /// Adds the choice's last token; returns what remains to send of the final text, `generated`'s.
    fn finish(&mut self, token: &TokenInfo, generated: &GeneratedText, stops: &[String]) -> String {
        self.add(token);
        let last = final_text(generated, stops);
        let out = last.get(self.sent..).unwrap_or_default().to_string();
        self.sent = self.sent.max(last.len());
        out
    }
}

/// Bytes of the longest end of `text` that is the start (not the whole) of one of `stops`.
fn stop_start_len(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .filter_map(|stop| {
            (1..stop.len().min(text.len() + 1))
                .rev()
                .find(|&k| stop.is_char_boundary(k) && text.ends_with(&stop[..k]))
        })
        .max()
        .unwrap_or(0)
}

/// The generated text an OpenAI route returns: `generated.text` without the stop sequence it ends with,
/// when one ended it (one that a special token's text matched is not in the text: nothing to cut).
fn final_text<'a>(generated: &'a GeneratedText, stops: &[String]) -> &'a str {
    let text = generated.text.as_str();
    if generated.finish_reason != FinishReason::StopSequence {
        return text;
    }
    stops
        .iter()
        .filter(|stop| text.ends_with(stop.as_str()))
        .map(String::len)
        .max()
        .map_or(text, |n| &text[..text.len() - n])
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn request_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", getrandom::u64().unwrap_or(0))
}

/// OpenAI's sampling parameters as the native request's.
#[derive(Debug, Clone, Copy, PartialEq)]
struct OpenAiSampling {
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    do_sample: bool,
}

impl OpenAiSampling {
    /// `temperature` 0 is greedy decoding whatever `top_p` and `top_k` say (they would sample); `top_p` 1
    /// is no nucleus filter. Without a temperature, one choice is greedy (as LoRAX) and `n` > 1 choices
    /// sample at temperature 1 (OpenAI's default): greedy choices would all be the same text.
    fn of(temperature: Option<f32>, top_p: Option<f32>, top_k: Option<i64>, n: u32) -> Self {
        let greedy = temperature.is_some_and(|t| t <= 0.0);
        if greedy {
            return Self {
                temperature: None,
                top_p: None,
                top_k: None,
                do_sample: false,
            };
        }
        let top_p = top_p.filter(|p| *p < 1.0);
        Self {
            temperature,
            top_p,
            top_k,
            do_sample: temperature.is_some() || top_p.is_some() || top_k.is_some() || n > 1,
        }
    }
}

/// The native requests for `n` choices of one prompt, and the model name to answer with.
fn native(
    state: &AppState,
    common: CommonParameters,
    prompt: String,
    alternatives: u32,
) -> Result<(String, Vec<GenerateRequest>), ApiError> {
    let n = common.n.unwrap_or(1);
    if n == 0 || n > MAX_N {
        return Err(invalid(format!("`n` must be between 1 and {MAX_N}. Given: {n}")));
    }
    // Each choice is a request of its own and takes a place: more than the server allows could never
    // start, and a 429 would invite retries that cannot succeed.
    let places = state.info.max_concurrent_requests;
    if n as usize > places {
        return Err(invalid(format!(
            "`n` must be at most {places}, the requests this server takes at once (each choice is one). Given: {n}"
        )));
    }
    if common.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
        return Err(invalid("`logit_bias` is not supported"));
    }
    let base = &state.info.model_id;
    let (model, adapter_id) = match common.model.as_deref().map(str::trim) {
        None | Some("") => (base.clone(), None),
        Some(m) if m == base => (base.clone(), None),
        Some(m) => (m.to_string(), Some(m.to_string())),
    };
    if common.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
        return Err(invalid("`temperature` must be >= 0.0 and <= 2.0"));
    }
    if common.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
        return Err(invalid("`top_p` must be > 0.0 and <= 1.0"));
    }
    let sampling = OpenAiSampling::of(common.temperature, common.top_p, common.top_k, n);
    // Not the `Authorization: Bearer` token, unlike the native routes: OpenAI clients always send one,
    // often a placeholder (`EMPTY`), which the hub would refuse even for a public adapter.
    let api_token = common.api_token;
    let stop = common.stop.map(OneOrMany::into_vec);
    let requests = (0..u64::from(n))
        .map(|i| GenerateRequest {
            inputs: prompt.clone(),
            parameters: Some(GenerateParameters {
                adapter_id: adapter_id.clone(),
                adapter_source: common.adapter_source.clone(),
                api_token: api_token.clone(),
                temperature: sampling.temperature,
                top_p: sampling.top_p,
                top_k: sampling.top_k,
                do_sample: Some(sampling.do_sample),
                repetition_penalty: common.repetition_penalty,
                frequency_penalty: common.frequency_penalty,
                presence_penalty: common.presence_penalty,
                max_new_tokens: common.max_tokens,
                ignore_eos_token: common.ignore_eos_token,
                stop: stop.clone(),
                seed: common.seed.map(|s| s.wrapping_add(i)),
                details: Some(true),
                top_n_tokens: (alternatives > 0).then_some(i64::from(alternatives)),
                ..GenerateParameters::default()
            }),
        })
        .collect();
    Ok((model, requests))
}

/// Alternatives per token asked by `field`, at most `most` (OpenAI's limits: completions' `logprobs` 5,
/// chat's `top_logprobs` 20).
fn check_alternatives(field: &str, k: u32, most: u32) -> Result<u32, ApiError> {
    if k > most {
        return Err(invalid(format!(
            "`{field}` must be at most {most} (log-probabilities per token). Given: {k}"
        )));
    }
    Ok(k)
}

fn completion_plan(state: &AppState, mut req: CompletionRequest) -> Result<Plan, ApiError> {
    let prompts = req.prompt.into_inputs();
    if prompts.is_empty() {
        return Err(invalid("`prompt` must not be an empty list"));
    }
    let most = state.info.max_client_batch_size;
    if prompts.len() > most {
        return Err(invalid(format!(
            "`prompt` holds {} prompts: at most {most} may be sent in one request (--max-client-batch-size)",
            prompts.len()
        )));
    }
    // `n` alone is checked with the other parameters (`native`).
    let n = req.common.n.unwrap_or(1) as usize;
    let places = state.info.max_concurrent_requests;
    if prompts.len() > 1 && prompts.len().saturating_mul(n) > places {
        return Err(invalid(format!(
            "`prompt` holds {} prompts and `n` is {n}: at most {places} choices may be asked at once, the requests \
             this server takes at once (each choice is one)",
            prompts.len()
        )));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(invalid("`suffix` is not supported"));
    }
    if req.best_of.is_some_and(|b| b != req.common.n.unwrap_or(1)) {
        return Err(invalid("`best_of` other than `n` is not supported"));
    }
    let alternatives = check_alternatives("logprobs", req.logprobs.unwrap_or(0), MAX_LOGPROBS)?;
    let stream = req.common.stream;
    let include_usage = req.common.stream_options.as_ref().is_some_and(|o| o.include_usage);
    // Prompt scoring: the prompt runs (one token is generated, and dropped) for its tokens' logprobs.
    let drop_generated = req.echo && req.common.max_tokens == Some(0);
    if drop_generated {
        req.common.max_tokens = Some(1);
    }
    let prompt_logprobs = req.echo && req.logprobs.is_some();
    let eos = eos_of(state, &req.common);
    let (mut model, mut requests, mut ids, mut prompt_of) = (String::new(), Vec::new(), Vec::new(), Vec::new());
    for (index, prompt) in prompts.into_iter().enumerate() {
        let (text, prompt_ids) = match prompt {
            PromptInput::Text(t) => (t, None),
            PromptInput::Ids(v) => (String::new(), Some(v)),
        };
        let (name, mut choices) = native(state, req.common.clone(), text, alternatives)?;
        for _ in &choices {
            ids.push(prompt_ids.clone());
            prompt_of.push(index);
        }
        model = name;
        requests.append(&mut choices);
    }
    Ok(Plan {
        id: request_id("cmpl"),
        created: now_secs(),
        model,
        requests,
        add_special_tokens: true,
        stream,
        include_usage,
        alternatives,
        logprobs: req.logprobs.is_some(),
        ids,
        prompt_of,
        echo: req.echo,
        prompt_logprobs,
        drop_generated,
        eos,
        decoder: state.validation.token_decoder(),
    })
}

fn message_text(m: &ChatMessage) -> Result<String, ApiError> {
    match &m.content {
        None => Ok(String::new()),
        Some(ChatContent::Text(t)) => Ok(t.clone()),
        Some(ChatContent::Parts(parts)) => {
            let mut text = String::new();
            for p in parts {
                match (
                    p.get("type").and_then(Value::as_str),
                    p.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    _ => return Err(invalid("only text content parts are supported")),
                }
            }
            Ok(text)
        }
    }
}

/// The chat template of the adapter a chat request names (`model`), when it ships one; `None` for the
/// base model, an adapter without a template, or an invalid adapter name (validation reports that).
async fn adapter_template(
    state: &AppState,
    req: &ChatCompletionRequest,
) -> Result<Option<crate::chat::ChatTemplate>, ApiError> {
    let model = req.common.model.as_deref().map(str::trim).unwrap_or_default();
    if model.is_empty() || model == state.info.model_id {
        return Ok(None);
    }
    let parameters = GenerateParameters {
        adapter_id: Some(model.to_string()),
        adapter_source: req.common.adapter_source.clone(),
        api_token: req.common.api_token.clone(),
        ..GenerateParameters::default()
    };
    template_of_adapter(state, &parameters).await
}

/// The chat template shipped by the adapter `parameters` name, if any (see [`adapter_template`]).
pub(crate) async fn template_of_adapter(
    state: &AppState,
    parameters: &GenerateParameters,
) -> Result<Option<crate::chat::ChatTemplate>, ApiError> {
    let Ok(Some(adapter)) = state.validation.adapter_of(parameters) else {
        return Ok(None);
    };
    // The native routes have put an `Authorization: Bearer` token in `api_token` already
    // (`with_bearer_token`); the OpenAI routes take none from it (see `native`).
    let token = parameters.api_token.clone();
    state
        .adapter_templates
        .get(&state.clients, &adapter, token.as_ref())
        .await
        .map_err(|e| ApiError::from(InferError::Adapter(e)))
}

/// A native request (REST or gRPC) validated, its `apply_chat_template` messages rendered first.
pub(crate) async fn validate_native(
    state: &AppState,
    request: GenerateRequest,
    stream: bool,
) -> Result<ValidRequest, ApiError> {
    let (request, add_special_tokens) = apply_chat_template(state, request).await?;
    Ok(state
        .validation
        .validate_prompt(request, stream, add_special_tokens)
        .await?)
}

/// LoRAX's `apply_chat_template: true` on the native routes: `inputs` is a JSON list of messages,
/// rendered with the adapter's or the model's chat template. Returns the request with the rendered
/// prompt and whether special tokens must still be added (false for a rendered prompt).
async fn apply_chat_template(
    state: &AppState,
    mut request: GenerateRequest,
) -> Result<(GenerateRequest, bool), ApiError> {
    let Some(parameters) = request
        .parameters
        .as_mut()
        .filter(|p| p.apply_chat_template == Some(true))
    else {
        return Ok((request, true));
    };
    parameters.apply_chat_template = None;
    let messages: Vec<ChatMessage> = serde_json::from_str(&request.inputs).map_err(|e| {
        invalid(format!(
            "with `apply_chat_template`, `inputs` must be a JSON list of {{\"role\", \"content\"}} messages: {e}"
        ))
    })?;
    if messages.is_empty() {
        return Err(invalid(
            "with `apply_chat_template`, `inputs` must hold at least one message",
        ));
    }
    let own = template_of_adapter(state, parameters).await?;
    request.inputs = render(state, own.as_ref(), &messages).await?;
    Ok((request, false))
}

/// `messages` rendered with `own` (an adapter's template) or else the model's, opening the assistant's turn,
/// by the router's renderer (worker processes of bounded memory in `lorax-router`: `template_worker`).
async fn render(
    state: &AppState,
    own: Option<&crate::chat::ChatTemplate>,
    messages: &[ChatMessage],
) -> Result<String, ApiError> {
    let template = own
        .or(state.chat_template.as_ref())
        .ok_or_else(|| invalid(crate::chat::ChatError::NoTemplate.to_string()))?;
    let messages = messages
        .iter()
        .map(|m| {
            Ok(Message {
                role: m.role.clone(),
                content: message_text(m)?,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    state
        .renderer
        .render(template, messages, true)
        .await
        .map_err(|e| invalid(e.to_string()))
}

async fn chat_plan(
    state: &AppState,
    mut req: ChatCompletionRequest,
    adapter_template: Option<crate::chat::ChatTemplate>,
) -> Result<Plan, ApiError> {
    if req.messages.is_empty() {
        return Err(invalid("`messages` must not be empty"));
    }
    if req.tools.as_ref().is_some_and(|t| !t.is_null()) {
        return Err(invalid("tool calling (`tools`) is not supported"));
    }
    if req.tool_choice.as_ref().is_some_and(|c| c != "none" && !c.is_null()) {
        return Err(invalid("`tool_choice` other than \"none\" is not supported"));
    }
    if let Some(f) = &req.response_format {
        if f.get("type").and_then(Value::as_str) != Some("text") {
            return Err(invalid(
                "`response_format` other than {\"type\": \"text\"} is not supported",
            ));
        }
    }
    if req.top_logprobs.is_some_and(|k| k > 0) && !req.logprobs {
        return Err(invalid("`top_logprobs` needs `logprobs: true`"));
    }
    let alternatives = check_alternatives("top_logprobs", req.top_logprobs.unwrap_or(0), MAX_TOP_LOGPROBS)?;
    let prompt = render(state, adapter_template.as_ref(), &req.messages).await?;
    // The newer name wins where both are given (as vLLM).
    if req.max_completion_tokens.is_some() {
        req.common.max_tokens = req.max_completion_tokens;
    }
    let stream = req.common.stream;
    let include_usage = req.common.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let eos = eos_of(state, &req.common);
    let (model, requests) = native(state, req.common, prompt, alternatives)?;
    Ok(Plan {
        id: request_id("chatcmpl"),
        created: now_secs(),
        model,
        requests,
        add_special_tokens: false,
        stream,
        include_usage,
        alternatives,
        logprobs: req.logprobs,
        ids: Vec::new(),
        prompt_of: Vec::new(),
        echo: false,
        prompt_logprobs: false,
        drop_generated: false,
        eos,
        decoder: state.validation.token_decoder(),
    })
}

/// The tokens that end a choice of a request with these fields.
fn eos_of(state: &AppState, common: &CommonParameters) -> Vec<u32> {
    if common.ignore_eos_token == Some(true) {
        Vec::new()
    } else {
        state.info.eos_token_ids.clone()
    }
}

impl Plan {
    /// A choice's `finish_reason`: `stop` for an end-of-sequence token even when it is the last token allowed
    /// (the native routes say `length` then, as TGI; OpenAI and vLLM say `stop`), `length` for a prompt scored
    /// alone (`drop_generated`).
    fn finish(&self, reason: FinishReason, last: u32) -> &'static str {
        if self.drop_generated {
            "length"
        } else if reason == FinishReason::Length && self.eos.contains(&last) {
            "stop"
        } else {
            finish_reason(reason)
        }
    }
}

fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Length => "length",
        FinishReason::EndOfSequenceToken | FinishReason::StopSequence => "stop",
    }
}

/// Takes a place among --max-concurrent-requests for each of the plan's requests (`place`, taken earlier, is
/// the first's; a request refused for want of places has validated nothing), validates and queues them, then
/// waits for their adapter, so that an adapter failure is an HTTP error rather than an error chunk after a
/// 200. The request's validation time (since `start_time`, to its choices' validation) is recorded once.
async fn start(
    state: &AppState,
    plan: &Plan,
    place: Option<OwnedSemaphorePermit>,
    start_time: Instant,
) -> Result<Vec<(ValidRequest, ResponseReceiver, OwnedSemaphorePermit)>, ApiError> {
    let mut permits = Vec::with_capacity(plan.requests.len());
    permits.extend(place);
    while permits.len() < plan.requests.len() {
        permits.push(state.infer.acquire()?);
    }
    let mut valid = Vec::with_capacity(plan.requests.len());
    for (i, request) in plan.requests.iter().enumerate() {
        let mut v = match plan.ids.get(i).and_then(Option::as_ref) {
            Some(ids) => {
                state
                    .validation
                    .validate_ids(request.clone(), ids.clone(), plan.stream)
                    .await?
            }
            None => {
                state
                    .validation
                    .validate_prompt(request.clone(), plan.stream, plan.add_special_tokens)
                    .await?
            }
        };
        // The prompt's logprobs, streamed too (the first chunk carries them).
        if plan.prompt_logprobs {
            v.decoder_input_details = true;
            v.prefill_top_n = plan.alternatives;
        }
        valid.push(v);
    }
    metrics::histogram!(m::REQUEST_VALIDATION_DURATION).record(start_time.elapsed().as_secs_f64());
    let mut queued = Vec::with_capacity(valid.len());
    for (v, permit) in valid.into_iter().zip(permits) {
        let pending = state.infer.queue_stream(v.clone())?;
        queued.push((v, pending, permit));
    }
    let mut out = Vec::with_capacity(queued.len());
    for (v, pending, permit) in queued {
        // Without `stream` the answer waits for the whole generation anyway.
        out.push((v, pending.ready().await?, permit));
    }
    Ok(out)
}

/// `POST /v1/completions`.
#[utoipa::path(
    post,
    path = "/v1/completions",
    tag = "OpenAI Compatible",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "OpenAI `text_completion` object, or `text_completion` chunks as server-sent \
            events ending with `data: [DONE]` with `\"stream\": true`", content(
            (Object = "application/json"),
            (Object = "text/event-stream")
        )),
        crate::api_doc::OpenAiErrors
    )
)]
#[tracing::instrument(skip_all)]
pub async fn completions(
    State(state): State<AppState>,
    payload: Result<OpenAiJson<CompletionRequest>, ApiError>,
) -> Response {
    let plan = payload.and_then(|OpenAiJson(req)| completion_plan(&state, req));
    respond(state, plan, Kind::Completion, None).await
}

/// `POST /v1/chat/completions`.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "OpenAI Compatible",
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "OpenAI `chat.completion` object, or `chat.completion.chunk` objects as \
            server-sent events ending with `data: [DONE]` with `\"stream\": true`", content(
            (Object = "application/json"),
            (Object = "text/event-stream")
        )),
        crate::api_doc::OpenAiErrors
    )
)]
#[tracing::instrument(skip_all)]
pub async fn chat_completions(
    State(state): State<AppState>,
    payload: Result<OpenAiJson<ChatCompletionRequest>, ApiError>,
) -> Response {
    // A request beyond --max-concurrent-requests gets its 429 at once, not after the fetch of its
    // adapter's template: the fetch holds the place its first choice then runs in.
    let (plan, place) = match payload.and_then(|r| Ok((r, state.infer.acquire()?))) {
        Ok((OpenAiJson(req), place)) => {
            let plan = match adapter_template(&state, &req).await {
                Ok(template) => chat_plan(&state, req, template).await,
                Err(e) => Err(e),
            };
            (plan, Some(place))
        }
        Err(e) => (Err(e), None),
    };
    respond(state, plan, Kind::Chat, place).await
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

async fn respond(
    state: AppState,
    plan: Result<Plan, ApiError>,
    kind: Kind,
    place: Option<OwnedSemaphorePermit>,
) -> Response {
    let start_time = Instant::now();
    metrics::counter!(m::REQUEST_COUNT).increment(1);
    let result = async {
        let plan = plan?;
        let started = start(&state, &plan, place, start_time).await?;
        Ok::<_, ApiError>((plan, started))
    }
    .await;
    let (plan, started) = match result {
        Ok(ok) => ok,
        Err(e) => {
            e.record();
            return OpenAiError(e).into_response();
        }
    };
    if plan.stream {
        return stream_response(plan, started, kind, start_time).into_response();
    }
    let prompt_tokens = plan.prompt_tokens(&started);
    let mut choices = Vec::with_capacity(started.len());
    let (mut completion_tokens, mut longest) = (0, 0);
    // The request's queue and admission times: its first choice's (the choices are queued together).
    let mut times = None;
    for (index, (valid, receiver, permit)) in started.into_iter().enumerate() {
        let response = match crate::infer::collect(receiver).await {
            Ok(r) => r,
            Err(e) => {
                let e = ApiError::from(e);
                e.record();
                return OpenAiError(e).into_response();
            }
        };
        drop(permit);
        times.get_or_insert((response.queued, response.start));
        let generated = if plan.drop_generated {
            0
        } else {
            response.generated_text.generated_tokens
        };
        completion_tokens += generated;
        longest = longest.max(generated);
        choices.push(whole_choice(&plan, kind, index, plan.echo_of(&valid), response));
    }
    if let Some((queued, admitted)) = times {
        Timings::finish_choices(start_time, queued, admitted, completion_tokens, longest);
    }
    let object = match kind {
        Kind::Completion => "text_completion",
        Kind::Chat => "chat.completion",
    };
    Json(json!({
        "id": plan.id,
        "object": object,
        "created": plan.created,
        "model": plan.model,
        "system_fingerprint": crate::VERSION,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    }))
    .into_response()
}

fn usage(prompt: u32, completion: u32) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn whole_choice(plan: &Plan, kind: Kind, index: usize, echo: Option<&str>, r: InferResponse) -> Value {
    let last = r.tokens.last().map_or(u32::MAX, |(t, _)| t.id);
    let finish = plan.finish(r.generated_text.finish_reason, last);
    let generated = if plan.drop_generated {
        ""
    } else {
        final_text(&r.generated_text, plan.stops())
    };
    match kind {
        Kind::Completion => {
            let text = format!("{}{generated}", echo.unwrap_or_default());
            let logprobs = plan.logprobs.then(|| {
                let generated: &[_] = if plan.drop_generated { &[] } else { &r.tokens };
                let prompt = if plan.prompt_logprobs {
                    prompt_in_context(&plan.decoder, echo.unwrap_or_default(), &r.prefill)
                } else {
                    Vec::new()
                };
                completion_logprobs(&prompt, generated, plan.alternatives, echo_chars(echo))
            });
            json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish})
        }
        Kind::Chat => {
            let logprobs = plan
                .logprobs
                .then(|| json!({"content": chat_logprobs(&r.tokens, plan.alternatives, plan.decoder.token_bytes())}));
            json!({
                "index": index,
                "message": {"role": "assistant", "content": generated},
                "logprobs": logprobs,
                "finish_reason": finish,
            })
        }
    }
}

/// The prompt's tokens with their text as it reads in `echo` (the returned prompt), so that each stands at its
/// `text_offset`: the characters its raw bytes complete (a character split over byte tokens comes with its last
/// one; bytes that are no character at all as U+FFFD), SentencePiece's dummy-prefix space dropped where the
/// echo has none, and a special token taking room where the echo holds its text (a prompt written with
/// `<|im_start|>`), none where it does not (the BOS the tokenizer added). Linear in the prompt: raw bytes, no
/// decoding but special tokens'. Where the texts do not line up with `echo` (a tokenizer that normalises the
/// text), every token keeps its own text. An alternative reads as it would in the token's place (its raw
/// bytes: a word's leading space kept, or dropped where the chosen token's was; the chosen token with its
/// text), so that a client can tell whether the prompt's token was the most likely one by comparing texts,
/// as lm-evaluation-harness does; where its bytes are no whole characters, its own text. The batching loop sends these tokens without
/// texts (`Scheduler::step`): they are read here, on the request's task.
fn prompt_in_context(
    decoder: &crate::detokenize::TokenDecoder,
    echo: &str,
    prompt: &[(TokenInfo, Vec<TokenInfo>)],
) -> Vec<(TokenInfo, Vec<TokenInfo>)> {
    let own = |t: &TokenInfo| TokenInfo {
        text: decoder.token_text(t.id),
        ..t.clone()
    };
    // In a token's place, with its SentencePiece space dropped when the chosen token's was; the chosen token
    // itself as it reads.
    let alternatives = |top: &[TokenInfo], chosen: &TokenInfo, dropped_space: bool| {
        top.iter()
            .map(|a| {
                if a.id == chosen.id {
                    return TokenInfo {
                        text: chosen.text.clone(),
                        ..a.clone()
                    };
                }
                let bytes = decoder.token_bytes().of(a.id, "");
                match (a.special, String::from_utf8(bytes)) {
                    (false, Ok(text)) if !text.is_empty() => TokenInfo {
                        text: match text.strip_prefix(' ') {
                            Some(rest) if dropped_space => rest.to_string(),
                            _ => text,
                        },
                        ..a.clone()
                    },
                    _ => own(a),
                }
            })
            .collect::<Vec<_>>()
    };
    let mut rest = echo;
    let mut pending: Vec<u8> = Vec::new();
    let mut out = Vec::with_capacity(prompt.len());
    for (t, top) in prompt {
        if t.special {
            // In the echo (written in the prompt's text): it takes room, as text.
            let t = own(t);
            let written = rest.strip_prefix(t.text.as_str()).filter(|_| !t.text.is_empty());
            if let Some(after) = written {
                rest = after;
            }
            let special = written.is_none();
            let top = alternatives(top, &t, false);
            out.push((TokenInfo { special, ..t }, top));
            continue;
        }
        pending.extend(decoder.token_bytes().of(t.id, &t.text));
        let mut text = String::new();
        loop {
            match std::str::from_utf8(&pending) {
                Ok(done) => {
                    text.push_str(done);
                    pending.clear();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    text.push_str(&String::from_utf8_lossy(&pending[..valid]));
                    match e.error_len() {
                        Some(bad) => {
                            text.push('\u{FFFD}');
                            pending.drain(..valid + bad);
                        }
                        None => {
                            pending.drain(..valid);
                            break;
                        }
                    }
                }
            }
        }
        // SentencePiece's decoder drops the space its normaliser put before the first word.
        let mut dropped_space = false;
        if !rest.starts_with(text.as_str()) {
            if let Some(stripped) = text.strip_prefix(' ').filter(|t| rest.starts_with(*t)) {
                text = stripped.to_string();
                dropped_space = true;
            }
        }
        let Some(after) = rest.strip_prefix(text.as_str()) else {
            return prompt
                .iter()
                .map(|(t, top)| {
                    let t = own(t);
                    let top = alternatives(top, &t, false);
                    (t, top)
                })
                .collect();
        };
        rest = after;
        let t = TokenInfo { text, ..t.clone() };
        let top = alternatives(top, &t, dropped_space);
        out.push((t, top));
    }
    out
}

/// Characters of an echoed prompt (where the generated tokens' text offsets start).
fn echo_chars(echo: Option<&str>) -> usize {
    echo.map_or(0, |e| e.chars().count())
}

/// Completions' `logprobs` object: the echoed prompt's tokens (`prompt`, from text offset 0; the first one has
/// no log-probability, and its `token_logprobs` and `top_logprobs` entries are `null`), then the generated
/// `tokens`, whose text starts at character `offset` of the returned text (after an echoed prompt). A special
/// token's text is not in the returned text: it takes no room.
fn completion_logprobs(
    prompt: &[(TokenInfo, Vec<TokenInfo>)],
    tokens: &[(TokenInfo, Vec<TokenInfo>)],
    alternatives: u32,
    offset: usize,
) -> Value {
    let mut text = Vec::new();
    let mut lps = Vec::new();
    let mut tops = Vec::new();
    let mut offsets = Vec::new();
    // Prompt tokens from offset 0, generated ones from `offset`.
    let mut at = 0;
    for (k, (t, top)) in prompt.iter().chain(tokens).enumerate() {
        if k == prompt.len() {
            at = offset;
        }
        offsets.push(at);
        at += t.plain_text().chars().count();
        text.push(t.text.clone());
        // A prompt's first token has no log-probability (nothing precedes it).
        if (k == 0 && !prompt.is_empty()) || t.logprob.is_nan() {
            lps.push(Value::Null);
            tops.push(Value::Null);
            continue;
        }
        lps.push(json!(t.logprob));
        let map: serde_json::Map<String, Value> = top
            .iter()
            .take(alternatives as usize)
            .map(|a| (a.text.clone(), json!(a.logprob)))
            .collect();
        tops.push(Value::Object(map));
    }
    json!({"tokens": text, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

/// OpenAI's chat `logprobs.content`: each token's text, log-probability and raw bytes (a byte of a
/// character split over tokens as that byte, not the text shown for it), and its alternatives alike.
fn chat_logprobs(
    tokens: &[(TokenInfo, Vec<TokenInfo>)],
    alternatives: u32,
    bytes: &crate::detokenize::TokenBytes,
) -> Vec<Value> {
    tokens
        .iter()
        .map(|(t, top)| {
            let tops: Vec<Value> = top
                .iter()
                .take(alternatives as usize)
                .map(|a| json!({"token": a.text, "logprob": a.logprob, "bytes": bytes.of(a.id, &a.text)}))
                .collect();
            json!({"token": t.text, "logprob": t.logprob, "bytes": bytes.of(t.id, &t.text), "top_logprobs": tops})
        })
        .collect()
}

/// One choice's stream of chunks (`None` item = that choice is done).
struct ChoiceStream {
    index: usize,
    receiver: ResponseReceiver,
    _permit: OwnedSemaphorePermit,
    first: bool,
    text: ChoiceText,
    /// The prompt the first chunk starts with (`echo`).
    echo: Option<String>,
    /// The prompt's tokens with their log-probabilities (`echo` with `logprobs`), for the first chunk.
    prompt: Vec<(TokenInfo, Vec<TokenInfo>)>,
}

/// What a stream of several choices has seen so far.
#[derive(Default)]
struct Tally {
    /// Choices ended.
    done: usize,
    /// Tokens generated in all, and by the longest choice.
    generated: u32,
    longest: u32,
    /// Whether a choice failed (the request is counted as failed once).
    failed: bool,
    /// The request's queue and admission times: its first ended choice's.
    times: Option<(Instant, Instant)>,
}

impl Tally {
    /// The events for `piece` of a stream of `n` choices; records the request's metrics when it ends.
    fn on(
        &mut self,
        piece: Piece,
        plan: &Plan,
        kind: Kind,
        n: usize,
        prompt_tokens: u32,
        start: Instant,
    ) -> Vec<Event> {
        match piece {
            Piece::Chunk(v) => vec![json_event(&v)],
            Piece::Failed(e) => {
                if !self.failed {
                    e.record();
                }
                self.failed = true;
                vec![json_event(&openai_error_body(&e))]
            }
            Piece::Done {
                generated,
                queued,
                admitted,
            } => {
                self.done += 1;
                self.generated += generated;
                self.longest = self.longest.max(generated);
                let (queued, admitted) = *self.times.get_or_insert((queued, admitted));
                if self.done < n {
                    return Vec::new();
                }
                Timings::finish_choices(start, queued, admitted, self.generated, self.longest);
                if self.failed || !plan.include_usage {
                    return Vec::new();
                }
                vec![json_event(&json!({
                    "id": plan.id, "object": chunk_object(kind), "created": plan.created,
                    "model": plan.model, "choices": [], "usage": usage(prompt_tokens, self.generated),
                }))]
            }
        }
    }
}

/// A chunk or the end of one choice.
enum Piece {
    Chunk(Value),
    /// A choice ended: its generated tokens, and when its request was queued and admitted.
    Done {
        generated: u32,
        queued: Instant,
        admitted: Instant,
    },
    Failed(ApiError),
}

fn stream_response(
    plan: Plan,
    started: Vec<(ValidRequest, ResponseReceiver, OwnedSemaphorePermit)>,
    kind: Kind,
    start_time: Instant,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let prompt_tokens = plan.prompt_tokens(&started);
    let n = started.len();
    let plan = std::sync::Arc::new(plan);
    let choices = started
        .into_iter()
        .enumerate()
        .map(|(index, (valid, receiver, permit))| {
            let plan = std::sync::Arc::clone(&plan);
            let echo = plan.echo_of(&valid).map(str::to_string);
            futures::stream::unfold(
                Some(Step::Run(ChoiceStream {
                    index,
                    receiver,
                    _permit: permit,
                    first: true,
                    text: ChoiceText::default(),
                    echo,
                    prompt: Vec::new(),
                })),
                move |s| next_piece(std::sync::Arc::clone(&plan), kind, s),
            )
            .boxed()
        });
    let merged = futures::stream::select_all(choices);
    let mut tally = Tally::default();
    let events = merged
        .map(move |piece| futures::stream::iter(tally.on(piece, &plan, kind, n, prompt_tokens, start_time)))
        .flatten()
        .chain(futures::stream::once(async { Event::default().data("[DONE]") }))
        .map(Ok);
    Sse::new(events).keep_alive(KeepAlive::default())
}

fn chunk_object(kind: Kind) -> &'static str {
    match kind {
        Kind::Completion => "text_completion",
        Kind::Chat => "chat.completion.chunk",
    }
}

fn json_event(v: &Value) -> Event {
    Event::default().data(v.to_string())
}

/// Where one choice's stream is.
enum Step {
    /// Tokens are still coming.
    Run(ChoiceStream),
    /// The last chunk was sent; the end marker (generated tokens, queue and admission times) is next.
    Ending(u32, Instant, Instant),
}

async fn next_piece(plan: std::sync::Arc<Plan>, kind: Kind, step: Option<Step>) -> Option<(Piece, Option<Step>)> {
    let mut s = match step? {
        Step::Ending(generated, queued, admitted) => {
            return Some((
                Piece::Done {
                    generated,
                    queued,
                    admitted,
                },
                None,
            ))
        }
        Step::Run(s) => s,
    };
    loop {
        let (token, top, end) = match s.receiver.recv().await {
            Some(Ok(InferStreamResponse::Prefill(prompt))) => {
                if plan.prompt_logprobs {
                    s.prompt = prompt_in_context(&plan.decoder, s.echo.as_deref().unwrap_or_default(), &prompt);
                }
                continue;
            }
            Some(Ok(InferStreamResponse::Intermediate { token, top_tokens })) => (token, top_tokens, None),
            Some(Ok(InferStreamResponse::End {
                token,
                top_tokens,
                generated_text,
                queued,
                start,
            })) => (token, top_tokens, Some((generated_text, queued, start))),
            Some(Err(e)) => return Some((Piece::Failed(e.into()), None)),
            None => return Some((Piece::Failed(InferError::IncompleteGeneration.into()), None)),
        };
        let finish = end.as_ref().map(|(g, _, _)| plan.finish(g.finish_reason, token.id));
        let offset = echo_chars(s.echo.as_deref()) + s.text.chars;
        let text = match &end {
            None => s.text.push(&token, plan.stops()),
            Some((g, _, _)) => s.text.finish(&token, g, plan.stops()),
        };
        let pair = [(token, top)];
        let choice = match kind {
            Kind::Completion => {
                let (prefix, prompt) = if s.first {
                    (s.echo.as_deref().unwrap_or_default(), std::mem::take(&mut s.prompt))
                } else {
                    ("", Vec::new())
                };
                let (text, generated): (&str, &[_]) = if plan.drop_generated { ("", &[]) } else { (&text, &pair) };
                let logprobs = plan
                    .logprobs
                    .then(|| completion_logprobs(&prompt, generated, plan.alternatives, offset));
                json!({"index": s.index, "text": format!("{prefix}{text}"), "logprobs": logprobs, "finish_reason": finish})
            }
            Kind::Chat => {
                let mut delta = json!({"content": text});
                if s.first {
                    delta["role"] = json!("assistant");
                }
                let logprobs = plan
                    .logprobs
                    .then(|| json!({"content": chat_logprobs(&pair, plan.alternatives, plan.decoder.token_bytes())}));
                json!({"index": s.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
        };
        s.first = false;
        let chunk = json!({
            "id": plan.id, "object": chunk_object(kind), "created": plan.created, "model": plan.model,
            "system_fingerprint": crate::VERSION, "choices": [choice],
        });
        let next = match end {
            None => Step::Run(s),
            Some((g, queued, admitted)) => Step::Ending(
                if plan.drop_generated { 0 } else { g.generated_tokens },
                queued,
                admitted,
            ),
        };
        return Some((Piece::Chunk(chunk), Some(next)));
    }
}

/// `GET /v1/models`: the base model and the adapters the router knows.
#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "OpenAI Compatible",
    responses((status = 200, description = "OpenAI `list` of `model` objects: the base model, then the adapters",
        body = Object,
        example = json!({"object": "list", "data": [{"id": "org/model", "object": "model", "created": 0, "owned_by": "lorax"}]})))
)]
pub async fn models(State(state): State<AppState>) -> Json<Value> {
    // When this router first listed its models: the same on every call.
    static CREATED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let created = *CREATED.get_or_init(now_secs);
    let mut data = vec![json!({"id": state.info.model_id, "object": "model", "created": created, "owned_by": "lorax"})];
    for adapter in state.known_adapters() {
        data.push(json!({"id": adapter, "object": "model", "created": created, "owned_by": "lorax", "parent": state.info.model_id}));
    }
    Json(json!({"object": "list", "data": data}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validation::{check_parameters, ValidationLimits};

    /// Whether the native request made of these OpenAI parameters samples, as validation decides it.
    fn samples(temperature: Option<f32>, top_p: Option<f32>, top_k: Option<i64>, n: u32) -> bool {
        let s = OpenAiSampling::of(temperature, top_p, top_k, n);
        let p = GenerateParameters {
            temperature: s.temperature,
            top_p: s.top_p,
            top_k: s.top_k,
            do_sample: Some(s.do_sample),
            ..GenerateParameters::default()
        };
        let limits = ValidationLimits {
            max_input_length: 10,
            max_total_tokens: 20,
            max_stop_sequences: 4,
            max_new_tokens_default: 10,
            default_adapter_source: crate::adapters::AdapterSource::Hub,
            adapters_supported: true,
            vocab_size: 32000,
            base_model_id: "org/base".into(),
        };
        check_parameters(&p, &limits, false, || 7)
            .expect("valid")
            .sampling
            .is_sampling()
    }

    #[test]
    fn temperature_zero_is_greedy_and_several_choices_sample() {
        assert!(!samples(Some(0.0), Some(0.9), None, 1), "temperature 0 with top_p");
        assert!(!samples(Some(0.0), None, Some(40), 1), "temperature 0 with top_k");
        assert!(!samples(Some(0.0), None, None, 3), "temperature 0 with n = 3");
        assert!(!samples(None, None, None, 1), "no parameters: greedy, as LoRAX");
        assert!(!samples(None, Some(1.0), None, 1), "top_p 1 filters nothing");
        assert!(samples(None, None, None, 2), "n = 2 at OpenAI's default temperature");
        assert!(samples(Some(0.7), None, None, 1));
        assert!(samples(None, Some(0.9), None, 1));
        assert!(samples(None, None, Some(40), 1));
    }

    fn token(text: &str, special: bool) -> TokenInfo {
        TokenInfo {
            id: 0,
            text: text.to_string(),
            logprob: 0.0,
            special,
            held: 0,
        }
    }

    fn generated(text: &str, finish_reason: FinishReason) -> GeneratedText {
        GeneratedText {
            text: text.to_string(),
            generated_tokens: 1,
            finish_reason,
            seed: None,
        }
    }

    /// The chunks a choice streams for `tokens` (text, special), ending with `end`.
    fn streamed(tokens: &[(&str, bool)], stops: &[&str], end: &GeneratedText) -> Vec<String> {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut c = ChoiceText::default();
        let (last, rest) = tokens.split_last().expect("a token");
        let mut out: Vec<String> = rest.iter().map(|(t, s)| c.push(&token(t, *s), &stops)).collect();
        out.push(c.finish(&token(last.0, last.1), end, &stops));
        out
    }

    #[test]
    fn streamed_text_is_the_whole_text_without_special_tokens_or_the_stop() {
        // An end-of-sequence token: its text is in neither form.
        let end = generated("Hi there", FinishReason::EndOfSequenceToken);
        assert_eq!(
            streamed(&[("Hi", false), (" there", false), ("</s>", true)], &[], &end),
            ["Hi", " there", ""]
        );
        // A stop sequence over two tokens: the start of it waits, and the stop is never sent.
        let stops = ["\nUser:"];
        let end = generated("Yes.\nUser:", FinishReason::StopSequence);
        assert_eq!(final_text(&end, &["\nUser:".to_string()]), "Yes.");
        assert_eq!(
            streamed(&[("Yes.", false), ("\nUs", false), ("er:", false)], &stops, &end),
            ["Yes.", "", ""]
        );
        // A held start that turns out not to be the stop is sent with the next token.
        let end = generated("a\nUb", FinishReason::Length);
        assert_eq!(
            streamed(&[("a\n", false), ("U", false), ("b", false)], &stops, &end),
            ["a", "", "\nUb"]
        );
        // A stop sequence that is a special token's text: the text ends before it.
        let end = generated("ok", FinishReason::StopSequence);
        assert_eq!(
            streamed(&[("ok", false), ("<|im_end|>", true)], &["<|im_end|>"], &end),
            ["ok", ""]
        );
        // A special token in the middle of the text adds nothing to it.
        let end = generated("ab", FinishReason::Length);
        assert_eq!(
            streamed(&[("a", false), ("</s>", true), ("b", false)], &[], &end),
            ["a", "", "b"]
        );
        // Two stops, one inside the other: the longest that ends the text is cut.
        let end = generated("xab", FinishReason::StopSequence);
        assert_eq!(final_text(&end, &["b".to_string(), "ab".to_string()]), "x");
        assert_eq!(streamed(&[("x", false), ("ab", false)], &["b", "ab"], &end), ["x", ""]);
        // Multi-byte text: a held start is cut at a character boundary.
        let end = generated("日本語", FinishReason::Length);
        assert_eq!(
            streamed(&[("日本", false), ("語", false)], &["本当"], &end),
            ["日", "本語"]
        );
    }

    /// A special token that comes after an unfinished character carries the held bytes (U+FFFD) first:
    /// they are streamed, counted in the offsets, and the token's own text is not.
    #[test]
    fn text_held_before_a_special_token_is_streamed() {
        let held = TokenInfo {
            held: "\u{FFFD}".len(),
            ..token("\u{FFFD}</s>", true)
        };
        let mut c = ChoiceText::default();
        assert_eq!(c.push(&token("a", false), &[]), "a");
        assert_eq!(c.push(&held, &[]), "\u{FFFD}");
        let end = generated("a\u{FFFD}b", FinishReason::Length);
        assert_eq!(c.finish(&token("b", false), &end, &[]), "b");
        let tokens = vec![(token("a", false), vec![]), (held, vec![]), (token("b", false), vec![])];
        let v = completion_logprobs(&[], &tokens, 0, 0);
        assert_eq!(v["text_offset"], json!([0, 1, 2]));
    }

    /// A prompt position's alternatives read as they would in the token's place: a word's leading space
    /// kept, or dropped with the first word's; the chosen token with the chosen token's text.
    #[test]
    fn prompt_alternatives_read_as_in_the_tokens_place() {
        let decoder = crate::detokenize::TokenDecoder::new(crate::detokenize::tests::fixture_tokenizer());
        let encode = |text: &str, special: bool| {
            let ids = decoder.tokenizer().encode(text, special).expect("encode");
            ids.get_ids().to_vec()
        };
        let ids = encode("Hello world", true);
        let again = *encode("Hello again", false).last().expect("ids");
        assert_eq!(
            decoder.token_text(again),
            "again",
            "a standalone decode drops the space"
        );
        let info = |id: u32| TokenInfo {
            id,
            text: String::new(),
            logprob: -1.0,
            special: decoder.is_special(id),
            held: 0,
        };
        let prompt: Vec<(TokenInfo, Vec<TokenInfo>)> =
            ids.iter().map(|&id| (info(id), vec![info(id), info(again)])).collect();
        let out = prompt_in_context(&decoder, "Hello world", &prompt);
        let texts: Vec<(&str, &str, &str)> = out
            .iter()
            .map(|(t, top)| (t.text.as_str(), top[0].text.as_str(), top[1].text.as_str()))
            .collect();
        assert_eq!(
            texts,
            [
                ("<s>", "<s>", " again"),
                ("Hello", "Hello", "again"),
                (" world", " world", " again")
            ]
        );
    }

    #[test]
    fn completion_offsets_count_characters_after_the_echo() {
        let tokens = vec![
            (token("é", false), vec![]),
            (token("</s>", true), vec![]),
            (token("x", false), vec![]),
        ];
        let v = completion_logprobs(&[], &tokens, 0, 5);
        assert_eq!(v["text_offset"], json!([5, 6, 6]));
    }
}
