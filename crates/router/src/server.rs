//! HTTP routes (axum): LoRAX's REST API (`/generate`, `/generate_stream`, `/`), `/health`, `/info`,
//! `/tokenize` and `/metrics`. Handlers take a concurrency slot first (so an overloaded server answers
//! 429 at once, before spending tokenization on the request, as LoRAX does), validate, hand the request
//! to [`Infer`] and shape the answer; a dropped handler or SSE body drops the request's response stream,
//! which cancels the request in the batching task. Generate answers name the adapter that served them
//! (`x-adapter-id`, `x-adapter-source`, `details.adapter_id`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, FromRequest, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use futures::Stream;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::sync::OwnedSemaphorePermit;

use crate::adapters::AdapterKey;
use crate::api_doc::{self, BodyErrors, GenerateErrors, Routes};
use crate::client::ShardClients;
use crate::errors::ApiError;
use crate::infer::{Infer, InferError, InferStreamResponse, ResponseReceiver, TokenInfo};
use crate::metrics as m;
use crate::schema::{
    AlternativeToken, CompatGenerateRequest, Details, ErrorResponse, GenerateRequest, GenerateResponse, Info,
    PrefillToken, Secret, SimpleToken, StreamDetails, StreamResponse, Token, TokenizeRequest,
};
use crate::validation::{ValidRequest, Validation};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// Handle to the batching task.
    pub infer: Infer,
    /// Request validation and tokenization.
    pub validation: Validation,
    /// Shard clients (health checks).
    pub clients: ShardClients,
    /// The /info answer.
    pub info: Arc<Info>,
    /// Renders /metrics.
    pub metrics: PrometheusHandle,
    /// The model's chat template, if its tokenizer_config.json has one.
    pub chat_template: Option<crate::chat::ChatTemplate>,
    /// The adapters the router knows (refreshed by the batching task).
    pub catalog: crate::adapters::catalog::AdapterCatalog,
    /// Chat templates shipped by adapters, fetched on first use.
    pub adapter_templates: crate::adapters::templates::AdapterTemplates,
    /// Where chat templates render.
    pub renderer: crate::template_worker::Renderer,
}

impl AppState {
    /// Ids of the adapters the router knows, as OpenAI model names.
    pub fn known_adapters(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.catalog.snapshot().into_iter().map(|a| a.key.id).collect();
        ids.dedup();
        ids
    }
}

/// Every route the application serves. Register routes here only: `api_doc`'s test holds the OpenAPI
/// document (the handlers' `#[utoipa::path]` attributes) to this list.
pub fn routes() -> Routes<AppState> {
    Routes::default()
        .post("/", compat_generate)
        .post("/generate", generate)
        .post("/generate_stream", generate_stream)
        .get("/health", health)
        .get("/info", info)
        .post("/tokenize", tokenize)
        .get("/metrics", render_metrics)
        .post("/v1/completions", crate::openai::completions)
        .post("/v1/chat/completions", crate::openai::chat_completions)
        .get("/v1/models", crate::openai::models)
        .get("/api-doc/openapi.json", api_doc::openapi_json)
        .get("/docs", api_doc::swagger_ui)
        .get("/docs/{file}", api_doc::swagger_asset)
}

/// The application: [`routes`], each request in an `http_request` span ([`crate::telemetry::http_span`]),
/// request bodies limited to `body_limit_bytes`.
pub fn router(state: AppState, body_limit_bytes: usize) -> Router {
    routes()
        .into_router()
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit_bytes))
        .layer(axum::middleware::from_fn(crate::telemetry::http_span))
        .with_state(state)
}

/// Any path the router does not serve: 404 `not_found`, in the API's error shape ([`error_for`]).
pub(crate) async fn not_found(uri: axum::http::Uri) -> Response {
    let error = ApiError::new(
        StatusCode::NOT_FOUND,
        crate::errors::NOT_FOUND,
        format!("no route {}", uri.path().chars().take(128).collect::<String>()),
    );
    error_for(uri.path(), error)
}

/// A served path with a method it does not take: 405 `method_not_allowed` ([`error_for`]).
async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let error = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        crate::errors::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    );
    error_for(uri.path(), error)
}

/// `error` answered in the shape of `path`'s API: OpenAI's (`{"error": {"message", "type", ...}}`) under
/// `/v1/`, the native `{"error", "error_type"}` elsewhere.
pub(crate) fn error_for(path: &str, error: ApiError) -> Response {
    match path.starts_with("/v1/") {
        true => crate::openai::OpenAiError(error).into_response(),
        false => error.into_response(),
    }
}

/// `Json<T>` whose rejections (bad JSON, wrong shape, wrong content type, too large) are [`ApiError`]s.
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<ObjectOnly<T>>::from_request(req, state).await {
            Ok(Json(ObjectOnly(value))) => Ok(Self(value)),
            Err(rejection) => Err(rejection.into()),
        }
    }
}

/// `T` read from a JSON object only: serde's derived structs also take an array of their fields in order,
/// which no client means (`["Hello", {"max_new_tokens": 2}]` was served as a request).
struct ObjectOnly<T>(T);

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for ObjectOnly<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Object<T>(std::marker::PhantomData<T>);
        impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for Object<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        deserializer
            .deserialize_map(Object(std::marker::PhantomData))
            .map(ObjectOnly)
    }
}

/// Counts a request and, when it failed, its error.
fn counted<T>(result: Result<T, ApiError>) -> Result<T, ApiError> {
    if let Err(e) = &result {
        e.record();
    }
    result
}

/// The request with its `api_token`, or else the token of an `Authorization: Bearer <token>` header
/// (LoRAX clients send the hub token either way).
fn with_bearer_token(mut request: GenerateRequest, headers: &HeaderMap) -> GenerateRequest {
    let parameters = request.parameters.get_or_insert_with(Default::default);
    if parameters.api_token.is_none() {
        parameters.api_token = bearer_token(headers);
    }
    request
}

/// The token of an `Authorization: Bearer <token>` header.
pub(crate) fn bearer_token(headers: &HeaderMap) -> Option<Secret> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| Secret(token.to_string()))
}

/// `POST /generate`: the whole generation as one JSON object.
#[utoipa::path(
    post,
    path = "/generate",
    tag = "LoRAX",
    request_body = GenerateRequest,
    responses(
        (status = 200, description = "The generation", body = GenerateResponse),
        GenerateErrors
    )
)]
#[tracing::instrument(skip_all)]
async fn generate(
    State(state): State<AppState>,
    headers: HeaderMap,
    payload: Result<ApiJson<GenerateRequest>, ApiError>,
) -> Result<(HeaderMap, Json<GenerateResponse>), ApiError> {
    let start = Instant::now();
    metrics::counter!(m::REQUEST_COUNT).increment(1);
    counted(async { generate_inner(&state, with_bearer_token(payload?.0, &headers), start).await }.await)
}

async fn generate_inner(
    state: &AppState,
    request: GenerateRequest,
    start: Instant,
) -> Result<(HeaderMap, Json<GenerateResponse>), ApiError> {
    let _permit = state.infer.acquire()?;
    // The Authorization header's token is already in `api_token` (with_bearer_token).
    let valid = crate::openai::validate_native(state, request, false).await?;
    let validation_time = start.elapsed();
    metrics::histogram!(m::REQUEST_VALIDATION_DURATION).record(validation_time.as_secs_f64());
    let shape = ResponseShape::of(&valid);
    let response = state.infer.generate(valid).await?;

    let timings = Timings::finish(
        start,
        response.queued,
        response.start,
        response.generated_text.generated_tokens,
    );
    let mut headers = timings.headers(validation_time);
    insert_header(&mut headers, "x-prompt-tokens", shape.prompt_tokens);
    insert_header(
        &mut headers,
        "x-generated-tokens",
        response.generated_text.generated_tokens,
    );
    shape.adapter_headers(&mut headers);

    let details = shape.details.then(|| Details {
        finish_reason: response.generated_text.finish_reason,
        prompt_tokens: shape.prompt_tokens,
        generated_tokens: response.generated_text.generated_tokens,
        skipped_tokens: 0,
        seed: response.generated_text.seed,
        adapter_id: shape.adapter_id(),
        prefill: response
            .prefill
            .into_iter()
            .map(|(t, _)| PrefillToken {
                id: t.id,
                text: t.text,
                logprob: (!t.logprob.is_nan()).then_some(t.logprob),
            })
            .collect(),
        top_tokens: shape
            .alternatives
            .then(|| response.tokens.iter().map(|(_, top)| top_token_list(top)).collect()),
        tokens: response
            .tokens
            .into_iter()
            .map(|(token, top)| api_token(token, top, shape.alternatives))
            .collect(),
    });
    tracing::info!(
        tokens = response.generated_text.generated_tokens,
        total_ms = timings.total.as_millis() as u64,
        "generated"
    );
    Ok((
        headers,
        Json(GenerateResponse {
            generated_text: shape.full_text(response.generated_text.text),
            details,
        }),
    ))
}

/// What the answer should contain, taken from the request before it is handed over (REST and gRPC).
pub(crate) struct ResponseShape {
    /// Whether `details` were asked for.
    pub(crate) details: bool,
    /// Whether tokens carry their alternatives.
    pub(crate) alternatives: bool,
    /// Prompt tokens after truncation.
    pub(crate) prompt_tokens: u32,
    prompt: Option<String>,
    adapter: Option<AdapterKey>,
}

impl ResponseShape {
    pub(crate) fn of(request: &ValidRequest) -> Self {
        Self {
            // Prefill details come in `details` (LoRAX: asking for them asks for the details).
            details: request.details || request.decoder_input_details,
            alternatives: request.top_n_tokens > 0,
            prompt_tokens: request.input_length(),
            prompt: request.return_full_text.then(|| request.inputs.clone()),
            adapter: request.adapter.clone(),
        }
    }

    /// `x-adapter-id` and `x-adapter-source` naming the adapter that serves the request (none for the
    /// base model).
    fn adapter_headers(&self, headers: &mut HeaderMap) {
        if let Some(adapter) = &self.adapter {
            insert_header(headers, "x-adapter-id", &adapter.id);
            insert_header(headers, "x-adapter-source", adapter.source);
        }
    }

    /// `details.adapter_id`.
    pub(crate) fn adapter_id(&self) -> Option<String> {
        self.adapter.as_ref().map(|a| a.id.clone())
    }

    /// `generated_text`, after the prompt with `return_full_text`.
    pub(crate) fn full_text(&self, generated: String) -> String {
        match &self.prompt {
            Some(prompt) => format!("{prompt}{generated}"),
            None => generated,
        }
    }
}

/// Per-request durations; recording them into the histograms happens once, in `finish`.
pub(crate) struct Timings {
    total: Duration,
    queue: Duration,
    inference: Duration,
    per_token: Duration,
}

impl Timings {
    /// Records one answered request of one sequence (it ended now) that generated `generated_tokens`
    /// tokens, queued at `queued` and admitted at `admitted`.
    pub(crate) fn finish(start: Instant, queued: Instant, admitted: Instant, generated_tokens: u32) -> Self {
        Self::finish_choices(start, queued, admitted, generated_tokens, generated_tokens)
    }

    /// [`Timings::finish`] for a request of several sequences decoded side by side (OpenAI's `n`):
    /// `generated_tokens` in all, `longest` in the longest (the time per token is the inference time over
    /// it: the sequences' tokens came in the same steps).
    pub(crate) fn finish_choices(
        start: Instant,
        queued: Instant,
        admitted: Instant,
        generated_tokens: u32,
        longest: u32,
    ) -> Self {
        let now = Instant::now();
        let inference = now.saturating_duration_since(admitted);
        let timings = Self {
            total: now.saturating_duration_since(start),
            queue: admitted.saturating_duration_since(queued),
            inference,
            per_token: inference / longest.max(1),
        };
        metrics::histogram!(m::REQUEST_DURATION).record(timings.total.as_secs_f64());
        metrics::histogram!(m::REQUEST_INFERENCE_DURATION).record(timings.inference.as_secs_f64());
        metrics::histogram!(m::REQUEST_MEAN_TIME_PER_TOKEN).record(timings.per_token.as_secs_f64());
        metrics::histogram!(m::REQUEST_GENERATED_TOKENS).record(f64::from(generated_tokens));
        metrics::counter!(m::REQUEST_SUCCESS).increment(1);
        timings
    }

    fn headers(&self, validation: Duration) -> HeaderMap {
        let mut headers = HeaderMap::new();
        insert_header(&mut headers, "x-total-time", self.total.as_millis());
        insert_header(&mut headers, "x-validation-time", validation.as_millis());
        insert_header(&mut headers, "x-queue-time", self.queue.as_millis());
        insert_header(&mut headers, "x-inference-time", self.inference.as_millis());
        insert_header(&mut headers, "x-time-per-token", self.per_token.as_millis());
        headers
    }
}

fn insert_header(headers: &mut HeaderMap, name: &'static str, value: impl std::fmt::Display) {
    if let Ok(value) = HeaderValue::from_str(&value.to_string()) {
        headers.insert(name, value);
    }
}

/// Alternatives as TGI lists them (`top_tokens`): full tokens, best first.
fn top_token_list(top: &[TokenInfo]) -> Vec<Token> {
    top.iter().map(|t| api_token(t.clone(), Vec::new(), false)).collect()
}

fn api_token(token: TokenInfo, top: Vec<TokenInfo>, alternatives: bool) -> Token {
    Token {
        id: token.id,
        text: token.text,
        logprob: token.logprob,
        special: token.special,
        alternative_tokens: alternatives.then(|| {
            top.into_iter()
                .map(|t| AlternativeToken {
                    id: t.id,
                    text: t.text,
                    logprob: t.logprob,
                })
                .collect()
        }),
        skipped: false,
    }
}

/// `POST /generate_stream`: one server-sent event per token; the last carries the text and details.
/// Errors before the first event are plain HTTP errors; later ones are an `{"error", "error_type"}` event.
#[utoipa::path(
    post,
    path = "/generate_stream",
    tag = "LoRAX",
    request_body = GenerateRequest,
    responses(
        (status = 200, description = "Server-sent events, one per token; a failure after the first event is an \
            `ErrorResponse` event", content_type = "text/event-stream", body = StreamResponse),
        GenerateErrors
    )
)]
#[tracing::instrument(skip_all)]
async fn generate_stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    payload: Result<ApiJson<GenerateRequest>, ApiError>,
) -> Result<(HeaderMap, Sse<impl Stream<Item = Result<Event, Infallible>>>), ApiError> {
    let start = Instant::now();
    metrics::counter!(m::REQUEST_COUNT).increment(1);
    let (receiver, permit, shape) = counted(
        async {
            let request = with_bearer_token(payload?.0, &headers);
            let permit = state.infer.acquire()?;
            let valid = crate::openai::validate_native(&state, request, true).await?;
            metrics::histogram!(m::REQUEST_VALIDATION_DURATION).record(start.elapsed().as_secs_f64());
            let shape = ResponseShape::of(&valid);
            // Its headers wait for its adapter: an adapter failure is then an HTTP error.
            let receiver = state.infer.queue_stream(valid)?.ready().await?;
            Ok::<_, ApiError>((receiver, permit, shape))
        }
        .await,
    )?;
    let mut response_headers = HeaderMap::new();
    shape.adapter_headers(&mut response_headers);
    let stream = StreamState {
        receiver,
        _permit: permit,
        shape,
        start,
    };
    let sse = Sse::new(futures::stream::unfold(Some(stream), next_event)).keep_alive(KeepAlive::default());
    Ok((response_headers, sse))
}

/// The SSE body's state; dropping it (client gone) drops the receiver and the concurrency permit.
struct StreamState {
    receiver: ResponseReceiver,
    _permit: OwnedSemaphorePermit,
    shape: ResponseShape,
    start: Instant,
}

async fn next_event(state: Option<StreamState>) -> Option<(Result<Event, Infallible>, Option<StreamState>)> {
    let mut state = state?;
    loop {
        let event = match state.receiver.recv().await {
            Some(Ok(InferStreamResponse::Prefill(_))) => continue,
            Some(Ok(InferStreamResponse::Intermediate { token, top_tokens })) => {
                let event = json_event(&StreamResponse {
                    top_tokens: state.shape.alternatives.then(|| top_token_list(&top_tokens)),
                    token: api_token(token, top_tokens, state.shape.alternatives),
                    generated_text: None,
                    details: None,
                });
                return Some((Ok(event), Some(state)));
            }
            Some(Ok(InferStreamResponse::End {
                token,
                top_tokens,
                generated_text,
                queued,
                start,
            })) => {
                Timings::finish(state.start, queued, start, generated_text.generated_tokens);
                json_event(&StreamResponse {
                    top_tokens: state.shape.alternatives.then(|| top_token_list(&top_tokens)),
                    token: api_token(token, top_tokens, state.shape.alternatives),
                    details: Some(StreamDetails {
                        finish_reason: generated_text.finish_reason,
                        prompt_tokens: state.shape.prompt_tokens,
                        generated_tokens: generated_text.generated_tokens,
                        seed: generated_text.seed,
                        adapter_id: state.shape.adapter_id(),
                    }),
                    generated_text: Some(state.shape.full_text(generated_text.text)),
                })
            }
            Some(Err(e)) => error_event(e.into()),
            None => error_event(InferError::IncompleteGeneration.into()),
        };
        // The last event: the state (receiver, permit) is dropped here.
        return Some((Ok(event), None));
    }
}

fn error_event(error: ApiError) -> Event {
    error.record();
    tracing::error!("generation failed: {}", error.message);
    json_event(&error.body())
}

fn json_event<T: Serialize>(value: &T) -> Event {
    Event::default().json_data(value).unwrap_or_else(|e| {
        Event::default().data(format!(
            r#"{{"error":"cannot serialize event: {e}","error_type":"incomplete_generation"}}"#
        ))
    })
}

/// `POST /`: `{"inputs", "parameters", "stream"}`; streams, or answers a one-element JSON array.
#[utoipa::path(
    post,
    path = "/",
    tag = "LoRAX",
    request_body = CompatGenerateRequest,
    responses(
        (status = 200, description = "A one-element array of the generation, or server-sent events with \
            `\"stream\": true`", content(
            (Vec<GenerateResponse> = "application/json"),
            (StreamResponse = "text/event-stream")
        )),
        GenerateErrors
    )
)]
async fn compat_generate(
    State(state): State<AppState>,
    headers: HeaderMap,
    payload: Result<ApiJson<CompatGenerateRequest>, ApiError>,
) -> Response {
    match payload {
        Err(e) => {
            metrics::counter!(m::REQUEST_COUNT).increment(1);
            e.record();
            e.into_response()
        }
        Ok(ApiJson(request)) if request.stream => generate_stream(State(state), headers, Ok(ApiJson(request.into())))
            .await
            .into_response(),
        Ok(ApiJson(request)) => match generate(State(state), headers, Ok(ApiJson(request.into()))).await {
            Ok((headers, Json(response))) => (headers, Json(vec![response])).into_response(),
            Err(e) => e.into_response(),
        },
    }
}

/// `GET /health`: 200 when every shard answers Health, else 503.
#[utoipa::path(
    get,
    path = "/health",
    tag = "Observability",
    responses(
        (status = 200, description = "Every shard answers"),
        (status = 503, description = "A shard does not answer (`unhealthy`)", body = ErrorResponse)
    )
)]
async fn health(State(state): State<AppState>) -> Result<StatusCode, ApiError> {
    state
        .clients
        .health()
        .await
        .map(|()| StatusCode::OK)
        .map_err(|e| ApiError::unhealthy(&e))
}

/// `GET /info`: model and router configuration.
#[utoipa::path(
    get,
    path = "/info",
    tag = "Observability",
    responses((status = 200, description = "Model and router configuration", body = Info))
)]
async fn info(State(state): State<AppState>) -> Json<Info> {
    Json((*state.info).clone())
}

/// `POST /tokenize`: the prompt's tokens with their byte spans.
#[utoipa::path(
    post,
    path = "/tokenize",
    tag = "Tokenization",
    request_body = TokenizeRequest,
    responses((status = 200, description = "The tokens", body = Vec<SimpleToken>), BodyErrors)
)]
async fn tokenize(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<TokenizeRequest>,
) -> Result<Json<Vec<SimpleToken>>, ApiError> {
    let add_special_tokens = request.add_special_tokens.unwrap_or(true);
    Ok(Json(tokens_of(&state, request.inputs, add_special_tokens).await?))
}

/// The tokens of `inputs` with their byte spans (REST and gRPC tokenize). A tokenization holds a place
/// among `--max-concurrent-requests` as a generation does (429 when none is free): its input can take a
/// tokenizer worker for most of a second.
pub(crate) async fn tokens_of(
    state: &AppState,
    inputs: String,
    add_special_tokens: bool,
) -> Result<Vec<SimpleToken>, ApiError> {
    let _permit = state.infer.acquire()?;
    let encoding = state.validation.tokenize(inputs.clone(), add_special_tokens).await?;
    let tokens = encoding
        .get_ids()
        .iter()
        .zip(encoding.get_offsets())
        .map(|(&id, &(start, stop))| SimpleToken {
            id,
            text: inputs.get(start..stop).unwrap_or_default().to_string(),
            start,
            stop,
        })
        .collect();
    Ok(tokens)
}

/// `GET /metrics`: Prometheus text format, or with `?format=json` the same samples as JSON.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "Observability",
    params(("format" = Option<String>, Query, description = "`text` (default: Prometheus text format) or `json`")),
    responses(
        (status = 200, description = "The metrics", content(
            (String = "text/plain"),
            (crate::metrics_json::MetricsJson = "application/json")
        )),
        (status = 422, description = "Unknown `format` (`validation`)", body = ErrorResponse)
    )
)]
async fn render_metrics(
    State(state): State<AppState>,
    query: Result<Query<MetricsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let query = match query {
        Ok(Query(query)) => query,
        Err(rejection) => {
            return ApiError::new(rejection.status(), crate::errors::VALIDATION, rejection.body_text()).into_response()
        }
    };
    let json = match query.format.as_deref() {
        None | Some("text") => false,
        Some("json") => true,
        Some(other) => {
            return ApiError {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                message: format!("`format` must be `text` or `json`. Given: `{other}`"),
                error_type: crate::errors::VALIDATION,
            }
            .into_response()
        }
    };
    state.metrics.run_upkeep();
    let text = state.metrics.render();
    if json {
        return Json(crate::metrics_json::parse(&text)).into_response();
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// Query of `GET /metrics`.
#[derive(Debug, Default, serde::Deserialize)]
struct MetricsQuery {
    /// `text` or `json`.
    format: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(authorization: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(authorization).expect("header"),
        );
        headers
    }

    fn token_of(request: &GenerateRequest) -> Option<String> {
        request.parameters.as_ref()?.api_token.as_ref().map(|t| t.0.clone())
    }

    #[test]
    fn bearer_header_supplies_a_missing_api_token() {
        let bare: GenerateRequest = serde_json::from_value(serde_json::json!({"inputs": "x"})).expect("request");
        let with = with_bearer_token(bare.clone(), &headers("Bearer hf_abc"));
        assert_eq!(token_of(&with).as_deref(), Some("hf_abc"));
        let with = with_bearer_token(bare.clone(), &headers("bearer  hf_abc "));
        assert_eq!(token_of(&with).as_deref(), Some("hf_abc"));
        for ignored in ["Basic dXNlcjpwYXNz", "Bearer", "Bearer  ", "hf_abc"] {
            let without = with_bearer_token(bare.clone(), &headers(ignored));
            assert_eq!(token_of(&without), None, "{ignored:?}");
        }
        assert_eq!(token_of(&with_bearer_token(bare, &HeaderMap::new())), None);

        let own: GenerateRequest =
            serde_json::from_value(serde_json::json!({"inputs": "x", "parameters": {"api_token": "mine"}}))
                .expect("request");
        let kept = with_bearer_token(own, &headers("Bearer other"));
        assert_eq!(token_of(&kept).as_deref(), Some("mine"), "the body's token wins");
    }
}
