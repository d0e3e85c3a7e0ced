//! The public gRPC API (`lorax.generate.v1.LoraxService`, proto/lorax/generate/v1/generate.proto),
//! served next to the REST API on `--grpc-port`. A gRPC request becomes the REST [`GenerateRequest`] it
//! stands for and takes the REST path: a concurrency slot, the same validation, the batching task and
//! the same metrics. Errors are the REST [`ApiError`]s, sent with the gRPC code of their HTTP status
//! ([`status`]) and their `error_type` in the [`ERROR_TYPE_METADATA`] trailer. With API keys
//! (`--api-key`), every call but `Health` needs one, in the metadata the REST API reads them from
//! ([`crate::auth`]). Dropping a call (the client cancelled or went away) drops its response stream,
//! which cancels the request.

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use futures::Stream;
use lorax_proto::generate::v1 as pb;
use lorax_proto::generate::v1::lorax_service_server::{LoraxService, LoraxServiceServer};
use tokio::net::TcpListener;
use tokio::sync::OwnedSemaphorePermit;
use tonic::metadata::MetadataValue;
use tonic::transport::server::TcpIncoming;
use tonic::{Code, Request, Response, Status};

use crate::adapters::catalog::AdapterInfo;
use crate::auth::{ApiKeys, Credential};
use crate::errors::{ApiError, GENERATION};
use crate::infer::{InferError, InferResponse, InferStreamResponse, ResponseReceiver, TokenInfo};
use crate::metrics as m;
use crate::schema::{GenerateParameters, GenerateRequest, Secret};
use crate::server::{bearer_token, tokens_of, AppState, ResponseShape, Timings};
use crate::stopping::FinishReason;

/// Response metadata (trailer) key carrying the REST `error_type` of a failed call (`validation`,
/// `overloaded`, `adapter_not_found`, ...).
pub const ERROR_TYPE_METADATA: &str = "x-error-type";

/// The gRPC service over the router's shared state.
#[derive(Clone)]
pub struct GrpcService {
    state: AppState,
    keys: Option<ApiKeys>,
}

impl GrpcService {
    /// With API keys, lets a call through only with a key (`x-api-key`, or `authorization: Bearer`,
    /// which is then removed so that it is not taken for a hub token), as the REST guard does.
    fn authorize<T>(&self, request: &mut Request<T>) -> Result<(), Status> {
        let Some(keys) = &self.keys else {
            return Ok(());
        };
        match keys.authorize(&request.metadata().clone().into_headers()) {
            Ok(Credential::Bearer) => {
                request.metadata_mut().remove("authorization");
                Ok(())
            }
            Ok(Credential::Header) => Ok(()),
            Err(error) => {
                tracing::debug!("gRPC call without a valid API key");
                Err(status(&error))
            }
        }
    }
}

/// The tonic service to serve; messages up to `max_message_bytes` are accepted (the REST body limit),
/// and with `keys` every call but `Health` needs one of them.
pub fn service(state: AppState, max_message_bytes: usize, keys: Option<ApiKeys>) -> LoraxServiceServer<GrpcService> {
    LoraxServiceServer::new(GrpcService { state, keys }).max_decoding_message_size(max_message_bytes)
}

/// Serves `service` on `listener` until `shutdown` resolves (in-flight calls finish first).
///
/// # Errors
/// When the server fails (not for individual calls).
pub async fn serve(
    service: LoraxServiceServer<GrpcService>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    // One message per token: without TCP_NODELAY, Nagle's algorithm would hold small messages back.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// The gRPC status of an API error: the code that matches its HTTP status, the message, and the
/// `error_type` in the [`ERROR_TYPE_METADATA`] metadata.
///
/// | HTTP | gRPC |
/// |---|---|
/// | 400, 413, 415, 422 (`validation`, `adapter_invalid`) | `INVALID_ARGUMENT` |
/// | 401 (`unauthorized`: no valid API key) | `UNAUTHENTICATED` |
/// | 403 (`adapter_forbidden`) | `PERMISSION_DENIED` |
/// | 404 (`adapter_not_found`) | `NOT_FOUND` |
/// | 424 `generation` (a shard failed mid-generation) | `ABORTED` |
/// | 424 `adapter_unavailable`, 503 (`unhealthy`) | `UNAVAILABLE` |
/// | 429 (`overloaded`) | `RESOURCE_EXHAUSTED` |
/// | 500 and anything else (`incomplete_generation`) | `INTERNAL` |
pub fn status(error: &ApiError) -> Status {
    let code = match (error.status.as_u16(), error.error_type) {
        (424, GENERATION) => Code::Aborted,
        (400 | 413 | 415 | 422, _) => Code::InvalidArgument,
        (401, _) => Code::Unauthenticated,
        (403, _) => Code::PermissionDenied,
        (404, _) => Code::NotFound,
        (424 | 503, _) => Code::Unavailable,
        (429, _) => Code::ResourceExhausted,
        _ => Code::Internal,
    };
    let mut status = Status::new(code, error.message.clone());
    status
        .metadata_mut()
        .insert(ERROR_TYPE_METADATA, MetadataValue::from_static(error.error_type));
    status
}

/// Counts a failed generate call in `lorax_request_failure` and turns it into its status.
fn failed(error: &ApiError) -> Status {
    error.record();
    status(error)
}

/// The REST request a gRPC request stands for. The `api_token` is the request's, or else the token of
/// an `authorization: Bearer <token>` metadata entry, as on REST.
fn rest_request(request: Request<pb::GenerateRequest>) -> GenerateRequest {
    let bearer = bearer_token(&request.metadata().clone().into_headers());
    let request = request.into_inner();
    let p = request.parameters.unwrap_or_default();
    GenerateRequest {
        inputs: request.inputs,
        parameters: Some(GenerateParameters {
            adapter_id: p.adapter_id,
            adapter_source: p.adapter_source,
            api_token: p.api_token.map(Secret).or(bearer),
            temperature: p.temperature,
            repetition_penalty: p.repetition_penalty,
            frequency_penalty: p.frequency_penalty,
            presence_penalty: p.presence_penalty,
            top_k: p.top_k.map(i64::from),
            top_p: p.top_p,
            typical_p: p.typical_p,
            do_sample: p.do_sample,
            max_new_tokens: p.max_new_tokens.map(i64::from),
            ignore_eos_token: p.ignore_eos_token,
            return_full_text: p.return_full_text,
            stop: Some(p.stop),
            truncate: p.truncate.map(i64::from),
            details: p.details,
            decoder_input_details: p.decoder_input_details,
            return_k_alternatives: p.return_k_alternatives.map(i64::from),
            seed: p.seed,
            apply_chat_template: p.apply_chat_template,
            ..GenerateParameters::default()
        }),
    }
}

fn finish_reason(reason: FinishReason) -> pb::FinishReason {
    match reason {
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::EndOfSequenceToken => pb::FinishReason::EosToken,
        FinishReason::StopSequence => pb::FinishReason::StopSequence,
    }
}

fn token(token: TokenInfo, top: Vec<TokenInfo>, alternatives: bool) -> pb::Token {
    let alternative_tokens = if alternatives {
        top.into_iter()
            .map(|t| pb::AlternativeToken {
                id: t.id,
                text: t.text,
                logprob: t.logprob,
            })
            .collect()
    } else {
        Vec::new()
    };
    pb::Token {
        id: token.id,
        text: token.text,
        logprob: token.logprob,
        special: token.special,
        alternative_tokens,
    }
}

fn generate_response(shape: &ResponseShape, response: InferResponse) -> pb::GenerateResponse {
    let generated = response.generated_text;
    let details = shape.details.then(|| pb::Details {
        finish_reason: finish_reason(generated.finish_reason).into(),
        prompt_tokens: shape.prompt_tokens,
        generated_tokens: generated.generated_tokens,
        seed: generated.seed,
        adapter_id: shape.adapter_id(),
        prefill: response
            .prefill
            .into_iter()
            .map(|(t, _)| pb::PrefillToken {
                id: t.id,
                text: t.text,
                logprob: (!t.logprob.is_nan()).then_some(t.logprob),
            })
            .collect(),
        tokens: response
            .tokens
            .into_iter()
            .map(|(t, top)| token(t, top, shape.alternatives))
            .collect(),
    });
    pb::GenerateResponse {
        generated_text: shape.full_text(generated.text),
        details,
    }
}

fn adapter_state(name: &str) -> (pb::AdapterState, bool) {
    match name {
        "downloading" => (pb::AdapterState::Downloading, false),
        "downloaded" => (pb::AdapterState::Downloaded, false),
        "loading" => (pb::AdapterState::Loading, false),
        "active" => (pb::AdapterState::Active, false),
        "draining" => (pb::AdapterState::Active, true),
        "offloading" => (pb::AdapterState::Offloading, false),
        _ => (pb::AdapterState::Unspecified, false),
    }
}

fn adapter(info: AdapterInfo) -> pb::Adapter {
    let (state, draining) = adapter_state(info.state);
    pb::Adapter {
        adapter_id: info.key.id,
        adapter_source: info.key.source.to_string(),
        state: state.into(),
        draining,
        queued: u32::try_from(info.queued).unwrap_or(u32::MAX),
        running: u32::try_from(info.running).unwrap_or(u32::MAX),
    }
}

/// A streamed call's state; dropping it (the client went away) drops the receiver, which cancels the
/// request, and the concurrency permit.
struct StreamState {
    receiver: ResponseReceiver,
    _permit: OwnedSemaphorePermit,
    shape: ResponseShape,
    start: Instant,
}

/// The next message of a stream: one per token, the last with the text and details; an error ends it.
async fn next_message(
    state: Option<StreamState>,
) -> Option<(Result<pb::GenerateStreamResponse, Status>, Option<StreamState>)> {
    let mut state = state?;
    let message = loop {
        match state.receiver.recv().await {
            Some(Ok(InferStreamResponse::Prefill(_))) => {}
            Some(Ok(InferStreamResponse::Intermediate { token: t, top_tokens })) => {
                let message = pb::GenerateStreamResponse {
                    token: Some(token(t, top_tokens, state.shape.alternatives)),
                    generated_text: None,
                    details: None,
                };
                return Some((Ok(message), Some(state)));
            }
            Some(Ok(InferStreamResponse::End {
                token: t,
                top_tokens,
                generated_text,
                queued,
                start,
            })) => {
                Timings::finish(state.start, queued, start, generated_text.generated_tokens);
                break Ok(pb::GenerateStreamResponse {
                    token: Some(token(t, top_tokens, state.shape.alternatives)),
                    details: Some(pb::Details {
                        finish_reason: finish_reason(generated_text.finish_reason).into(),
                        prompt_tokens: state.shape.prompt_tokens,
                        generated_tokens: generated_text.generated_tokens,
                        seed: generated_text.seed,
                        adapter_id: state.shape.adapter_id(),
                        prefill: Vec::new(),
                        tokens: Vec::new(),
                    }),
                    generated_text: Some(state.shape.full_text(generated_text.text)),
                });
            }
            Some(Err(e)) => break Err(e),
            None => break Err(InferError::IncompleteGeneration),
        }
    };
    let message = message.map_err(|e| {
        let error = ApiError::from(e);
        tracing::error!("generation failed: {}", error.message);
        failed(&error)
    });
    // The last message: the state (receiver, permit) is dropped here.
    Some((message, None))
}

/// A stream of generated tokens.
type TokenStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl LoraxService for GrpcService {
    #[tracing::instrument(skip_all)]
    async fn generate(
        &self,
        mut request: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        self.authorize(&mut request)?;
        let start = Instant::now();
        metrics::counter!(m::REQUEST_COUNT).increment(1);
        let request = rest_request(request);
        let result = async {
            let _permit = self.state.infer.acquire()?;
            // As on REST: `apply_chat_template` rendered, then validated.
            let valid = crate::openai::validate_native(&self.state, request, false).await?;
            let shape = ResponseShape::of(&valid);
            let response = self.state.infer.generate(valid).await?;
            Timings::finish(
                start,
                response.queued,
                response.start,
                response.generated_text.generated_tokens,
            );
            Ok::<_, ApiError>(generate_response(&shape, response))
        }
        .await;
        result.map(Response::new).map_err(|e| failed(&e))
    }

    type GenerateStreamStream = TokenStream;

    #[tracing::instrument(skip_all)]
    async fn generate_stream(
        &self,
        mut request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        self.authorize(&mut request)?;
        let start = Instant::now();
        metrics::counter!(m::REQUEST_COUNT).increment(1);
        let request = rest_request(request);
        let (receiver, permit, shape) = async {
            let permit = self.state.infer.acquire()?;
            let valid = crate::openai::validate_native(&self.state, request, true).await?;
            let shape = ResponseShape::of(&valid);
            let receiver = self.state.infer.queue_stream(valid)?.ready().await?;
            Ok::<_, ApiError>((receiver, permit, shape))
        }
        .await
        .map_err(|e| failed(&e))?;
        let state = StreamState {
            receiver,
            _permit: permit,
            shape,
            start,
        };
        let stream: TokenStream = Box::pin(futures::stream::unfold(Some(state), next_message));
        Ok(Response::new(stream))
    }

    async fn tokenize(
        &self,
        mut request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        self.authorize(&mut request)?;
        let request = request.into_inner();
        let add_special_tokens = request.add_special_tokens.unwrap_or(true);
        let tokens = tokens_of(&self.state, request.inputs, add_special_tokens)
            .await
            .map_err(|e| status(&e))?;
        let tokens = tokens
            .into_iter()
            .map(|t| pb::SimpleToken {
                id: t.id,
                text: t.text,
                start: t.start as u64,
                stop: t.stop as u64,
            })
            .collect();
        Ok(Response::new(pb::TokenizeResponse { tokens }))
    }

    /// Public, as REST `/health`: no API key needed.
    async fn health(&self, _: Request<pb::HealthRequest>) -> Result<Response<pb::HealthResponse>, Status> {
        self.state
            .clients
            .health()
            .await
            .map_err(|e| status(&ApiError::unhealthy(&e)))?;
        Ok(Response::new(pb::HealthResponse {}))
    }

    async fn list_adapters(
        &self,
        mut request: Request<pb::ListAdaptersRequest>,
    ) -> Result<Response<pb::ListAdaptersResponse>, Status> {
        self.authorize(&mut request)?;
        let adapters = self.state.catalog.snapshot().into_iter().map(adapter).collect();
        Ok(Response::new(pb::ListAdaptersResponse { adapters }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::catalog::state_name;
    use crate::adapters::registry::State;
    use crate::adapters::{AdapterError, AdapterFailure, AdapterKey, AdapterSource};
    use crate::validation::ValidationError;

    #[test]
    fn codes_follow_http_statuses() {
        let adapter = |kind| {
            InferError::Adapter(AdapterError {
                kind,
                adapter: AdapterKey::new(AdapterSource::Hub, "org/a"),
                stage: "downloaded",
                no_room: false,
                message: "nope".into(),
            })
        };
        let cases: Vec<(ApiError, Code, &str)> = vec![
            (ValidationError::TopK.into(), Code::InvalidArgument, "validation"),
            (InferError::Overloaded.into(), Code::ResourceExhausted, "overloaded"),
            (
                InferError::Generation("boom".into()).into(),
                Code::Aborted,
                "generation",
            ),
            (InferError::Unavailable.into(), Code::Unavailable, "unhealthy"),
            (
                InferError::IncompleteGeneration.into(),
                Code::Internal,
                "incomplete_generation",
            ),
            (
                ApiError::new(axum::http::StatusCode::UNAUTHORIZED, "unauthorized", "no key"),
                Code::Unauthenticated,
                "unauthorized",
            ),
            (
                adapter(AdapterFailure::NotFound).into(),
                Code::NotFound,
                "adapter_not_found",
            ),
            (
                adapter(AdapterFailure::Forbidden).into(),
                Code::PermissionDenied,
                "adapter_forbidden",
            ),
            (
                adapter(AdapterFailure::Invalid).into(),
                Code::InvalidArgument,
                "adapter_invalid",
            ),
            (
                adapter(AdapterFailure::Unavailable).into(),
                Code::Unavailable,
                "adapter_unavailable",
            ),
        ];
        for (error, code, error_type) in cases {
            let s = status(&error);
            assert_eq!(s.code(), code, "{error:?}");
            assert_eq!(s.message(), error.message);
            let sent = s.metadata().get(ERROR_TYPE_METADATA).expect("error type");
            assert_eq!(sent.to_str().expect("ascii"), error_type);
        }
    }

    #[test]
    fn every_adapter_state_has_a_code() {
        let now = Instant::now();
        let states = [
            State::Downloading,
            State::Downloaded,
            State::Loading,
            State::Active {
                since: now,
                draining: false,
            },
            State::Active {
                since: now,
                draining: true,
            },
            State::Offloading,
        ];
        for state in states {
            let (code, draining) = adapter_state(state_name(state));
            assert_ne!(code, pb::AdapterState::Unspecified, "{state:?}");
            assert_eq!(draining, matches!(state, State::Active { draining: true, .. }));
        }
    }

    #[test]
    fn parameters_become_the_rest_request() {
        let mut request = Request::new(pb::GenerateRequest {
            inputs: "Hi".into(),
            parameters: Some(pb::GenerateParameters {
                adapter_id: Some("org/a".into()),
                top_k: Some(0),
                max_new_tokens: Some(3),
                stop: vec!["x".into()],
                return_k_alternatives: Some(2),
                ..Default::default()
            }),
        });
        request
            .metadata_mut()
            .insert("authorization", MetadataValue::from_static("Bearer hf_meta"));
        let rest = rest_request(request);
        let p = rest.parameters.expect("parameters");
        assert_eq!(rest.inputs, "Hi");
        assert_eq!(p.adapter_id.as_deref(), Some("org/a"));
        assert_eq!(p.top_k, Some(0), "kept, so that validation refuses it as on REST");
        assert_eq!(p.max_new_tokens, Some(3));
        assert_eq!(p.stop, Some(vec!["x".to_string()]));
        assert_eq!(p.return_k_alternatives, Some(2));
        assert_eq!(p.temperature, None);
        assert_eq!(p.api_token, Some(Secret("hf_meta".into())), "the bearer token fills in");

        let mut own = Request::new(pb::GenerateRequest {
            inputs: "Hi".into(),
            parameters: Some(pb::GenerateParameters {
                api_token: Some("mine".into()),
                ..Default::default()
            }),
        });
        own.metadata_mut()
            .insert("authorization", MetadataValue::from_static("Bearer other"));
        let p = rest_request(own).parameters.expect("parameters");
        assert_eq!(p.api_token, Some(Secret("mine".into())), "the request's token wins");
    }
}
