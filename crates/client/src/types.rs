//! Requests and answers, shared by both transports: the REST API's JSON shapes (docs/api.md), and their
//! conversions to and from the gRPC messages.

use std::pin::Pin;

use futures::Stream;
use lorax_proto::generate::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::Error;

/// How to generate. Every field is optional; `None` takes the server's default (docs/api.md).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Parameters {
    /// LoRA adapter: a hub repo id or a local path; `None` or empty for the base model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter_id: Option<String>,
    /// `"hub"` or `"local"`; `None`: the server's default source.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter_source: Option<String>,
    /// Token for a private hub adapter (used by the server only to download it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_token: Option<String>,
    /// Softmax temperature (> 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Repetition penalty (> 0; 1 is off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f32>,
    /// Frequency penalty in [-2, 2].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f32>,
    /// Presence penalty in [-2, 2].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f32>,
    /// Keep only the k most likely tokens (> 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    /// Nucleus sampling mass, 0 < p < 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Typical sampling mass, 0 < p < 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub typical_p: Option<f32>,
    /// Sample instead of greedy decoding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub do_sample: Option<bool>,
    /// Most tokens to generate (> 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_new_tokens: Option<u32>,
    /// Keep generating past end-of-sequence tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ignore_eos_token: Option<bool>,
    /// Put the prompt in front of the generated text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub return_full_text: Option<bool>,
    /// Stop sequences.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// Keep only the last `truncate` prompt tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub truncate: Option<u32>,
    /// Return [`GenerateResponse::details`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<bool>,
    /// Return the prompt tokens with log-probabilities (not on streams).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decoder_input_details: Option<bool>,
    /// Alternatives per generated token (1 to 10).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub return_k_alternatives: Option<u32>,
    /// Seed of the sampler.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

impl From<&Parameters> for pb::GenerateParameters {
    fn from(p: &Parameters) -> Self {
        Self {
            adapter_id: p.adapter_id.clone(),
            adapter_source: p.adapter_source.clone(),
            api_token: p.api_token.clone(),
            temperature: p.temperature,
            repetition_penalty: p.repetition_penalty,
            frequency_penalty: p.frequency_penalty,
            presence_penalty: p.presence_penalty,
            top_k: p.top_k,
            top_p: p.top_p,
            typical_p: p.typical_p,
            do_sample: p.do_sample,
            max_new_tokens: p.max_new_tokens,
            ignore_eos_token: p.ignore_eos_token,
            return_full_text: p.return_full_text,
            stop: p.stop.clone(),
            truncate: p.truncate,
            details: p.details,
            decoder_input_details: p.decoder_input_details,
            return_k_alternatives: p.return_k_alternatives,
            seed: p.seed,
            apply_chat_template: None,
        }
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// `max_new_tokens` tokens were generated.
    Length,
    /// The model produced an end-of-sequence token.
    EosToken,
    /// The generated text contains a stop sequence.
    StopSequence,
}

/// A prompt token (`details.prefill`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PrefillToken {
    /// Token id.
    pub id: u32,
    /// Token text.
    pub text: String,
    /// Log-probability; `None` for the first prompt token.
    pub logprob: Option<f32>,
}

/// An alternative to a generated token.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AlternativeToken {
    /// Token id.
    pub id: u32,
    /// Token text.
    pub text: String,
    /// Log-probability.
    pub logprob: f32,
}

/// A generated token.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Token {
    /// Token id.
    pub id: u32,
    /// The text this token completed (may be empty inside a multi-byte character).
    pub text: String,
    /// Log-probability.
    pub logprob: f32,
    /// Whether it is a special token.
    pub special: bool,
    /// The most likely tokens at this position, with `return_k_alternatives`; else empty.
    #[serde(default)]
    pub alternative_tokens: Vec<AlternativeToken>,
}

/// About a whole generation.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Details {
    /// Why generation stopped.
    pub finish_reason: FinishReason,
    /// Prompt tokens (after truncation).
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub generated_tokens: u32,
    /// The sampler's seed; `None` for greedy requests.
    pub seed: Option<u64>,
    /// The adapter that served the request; `None` for the base model.
    pub adapter_id: Option<String>,
    /// Prompt tokens with log-probabilities (with `decoder_input_details`).
    #[serde(default)]
    pub prefill: Vec<PrefillToken>,
    /// Every generated token.
    pub tokens: Vec<Token>,
}

/// A whole generation.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct GenerateResponse {
    /// The generated text (after the prompt with `return_full_text`).
    pub generated_text: String,
    /// With `details: true`.
    pub details: Option<Details>,
}

/// The details of a stream's last message.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct StreamDetails {
    /// Why generation stopped.
    pub finish_reason: FinishReason,
    /// Prompt tokens (after truncation).
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub generated_tokens: u32,
    /// The sampler's seed; `None` for greedy requests.
    pub seed: Option<u64>,
    /// The adapter that served the request; `None` for the base model.
    pub adapter_id: Option<String>,
}

/// One message of a stream: a token, and on the last message the whole text and the details.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct StreamResponse {
    /// The token of this message.
    pub token: Token,
    /// The whole generated text, on the last message only.
    pub generated_text: Option<String>,
    /// On the last message only.
    pub details: Option<StreamDetails>,
}

/// The messages of a streamed generation; an error ends it.
pub type TokenStream = Pin<Box<dyn Stream<Item = Result<StreamResponse, Error>> + Send>>;

/// A token of a tokenized text.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SimpleToken {
    /// Token id.
    pub id: u32,
    /// The slice of the input the token covers.
    pub text: String,
    /// Byte offset of its start in the input.
    pub start: usize,
    /// Byte offset of its end in the input.
    pub stop: usize,
}

/// The server's model and configuration (`GET /info`): the main fields, and the others in `other`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Info {
    /// The model id as given to the launcher.
    pub model_id: String,
    /// The decoder family.
    pub architecture: String,
    /// Compute dtype of the shards.
    pub model_dtype: String,
    /// `cuda` or `cpu`.
    pub model_device_type: String,
    /// Whether requests may name adapters.
    pub supports_adapters: bool,
    /// Longest prompt in tokens.
    pub max_input_length: u32,
    /// Longest prompt + generated tokens.
    pub max_total_tokens: u32,
    /// The server's version.
    pub version: String,
    /// Every other field of the answer.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

fn finish_reason(value: i32) -> Result<FinishReason, Error> {
    match pb::FinishReason::try_from(value) {
        Ok(pb::FinishReason::Length) => Ok(FinishReason::Length),
        Ok(pb::FinishReason::EosToken) => Ok(FinishReason::EosToken),
        Ok(pb::FinishReason::StopSequence) => Ok(FinishReason::StopSequence),
        _ => Err(Error::Protocol(format!("unknown finish_reason {value}"))),
    }
}

impl From<pb::Token> for Token {
    fn from(t: pb::Token) -> Self {
        Self {
            id: t.id,
            text: t.text,
            logprob: t.logprob,
            special: t.special,
            alternative_tokens: t
                .alternative_tokens
                .into_iter()
                .map(|a| AlternativeToken {
                    id: a.id,
                    text: a.text,
                    logprob: a.logprob,
                })
                .collect(),
        }
    }
}

impl TryFrom<pb::Details> for Details {
    type Error = Error;

    fn try_from(d: pb::Details) -> Result<Self, Error> {
        Ok(Self {
            finish_reason: finish_reason(d.finish_reason)?,
            prompt_tokens: d.prompt_tokens,
            generated_tokens: d.generated_tokens,
            seed: d.seed,
            adapter_id: d.adapter_id,
            prefill: d
                .prefill
                .into_iter()
                .map(|t| PrefillToken {
                    id: t.id,
                    text: t.text,
                    logprob: t.logprob,
                })
                .collect(),
            tokens: d.tokens.into_iter().map(Token::from).collect(),
        })
    }
}

impl TryFrom<pb::GenerateResponse> for GenerateResponse {
    type Error = Error;

    fn try_from(r: pb::GenerateResponse) -> Result<Self, Error> {
        Ok(Self {
            generated_text: r.generated_text,
            details: r.details.map(Details::try_from).transpose()?,
        })
    }
}

impl TryFrom<pb::GenerateStreamResponse> for StreamResponse {
    type Error = Error;

    fn try_from(r: pb::GenerateStreamResponse) -> Result<Self, Error> {
        let token = r
            .token
            .ok_or_else(|| Error::Protocol("a stream message without a token".into()))?;
        let details = match r.details {
            Some(d) => Some(StreamDetails {
                finish_reason: finish_reason(d.finish_reason)?,
                prompt_tokens: d.prompt_tokens,
                generated_tokens: d.generated_tokens,
                seed: d.seed,
                adapter_id: d.adapter_id,
            }),
            None => None,
        };
        Ok(Self {
            token: token.into(),
            generated_text: r.generated_text,
            details,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_leave_out_what_is_unset() {
        let p = Parameters {
            max_new_tokens: Some(5),
            stop: vec!["\n".into()],
            ..Parameters::default()
        };
        assert_eq!(
            serde_json::to_value(&p).expect("json"),
            serde_json::json!({"max_new_tokens": 5, "stop": ["\n"]})
        );
        let grpc = pb::GenerateParameters::from(&p);
        assert_eq!(grpc.max_new_tokens, Some(5));
        assert_eq!(grpc.stop, ["\n"]);
        assert_eq!(grpc.temperature, None);
    }

    #[test]
    fn rest_and_grpc_answers_read_the_same() {
        let rest: GenerateResponse = serde_json::from_value(serde_json::json!({
            "generated_text": " a",
            "details": {"finish_reason": "eos_token", "prompt_tokens": 2, "generated_tokens": 1, "skipped_tokens": 0,
                "seed": null, "adapter_id": "org/a",
                "prefill": [{"id": 1, "text": "<s>", "logprob": null}],
                "tokens": [{"id": 7, "text": " a", "logprob": -0.5, "special": false, "skipped": false}]}
        }))
        .expect("REST answer");
        let grpc = GenerateResponse::try_from(pb::GenerateResponse {
            generated_text: " a".into(),
            details: Some(pb::Details {
                finish_reason: pb::FinishReason::EosToken.into(),
                prompt_tokens: 2,
                generated_tokens: 1,
                seed: None,
                adapter_id: Some("org/a".into()),
                prefill: vec![pb::PrefillToken {
                    id: 1,
                    text: "<s>".into(),
                    logprob: None,
                }],
                tokens: vec![pb::Token {
                    id: 7,
                    text: " a".into(),
                    logprob: -0.5,
                    special: false,
                    alternative_tokens: vec![],
                }],
            }),
        })
        .expect("gRPC answer");
        assert_eq!(rest, grpc);
        let bad = pb::GenerateResponse {
            generated_text: String::new(),
            details: Some(pb::Details::default()),
        };
        assert!(matches!(GenerateResponse::try_from(bad), Err(Error::Protocol(_))));
    }
}
