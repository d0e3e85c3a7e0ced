//! The REST client: `POST /generate`, `POST /generate_stream` (server-sent events), `GET /health`,
//! `GET /info` and `POST /tokenize`. Error answers (`{"error", "error_type"}`) become [`Error::Api`].

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::sse::SseParser;
use crate::types::{GenerateResponse, Info, Parameters, SimpleToken, StreamResponse, TokenStream};
use crate::{ApiError, Error};

/// A client of the router's REST API. Cheap to clone (the connection pool is shared).
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    api_key: Option<String>,
}

#[derive(Serialize)]
struct GenerateRequest<'a> {
    inputs: &'a str,
    parameters: &'a Parameters,
}

#[derive(Serialize)]
struct TokenizeRequest<'a> {
    inputs: &'a str,
    add_special_tokens: bool,
}

/// The router's error body.
#[derive(Deserialize)]
struct ErrorBody {
    error: String,
    error_type: Option<String>,
}

/// An event of `/generate_stream`: a token, or the error that ends the stream.
#[derive(Deserialize)]
#[serde(untagged)]
enum Event {
    Error(ErrorBody),
    Token(Box<StreamResponse>),
}

impl Client {
    /// A client of the server at `base_url` (such as `http://127.0.0.1:3000`).
    ///
    /// # Errors
    /// When the HTTP client cannot be built (no TLS backend, for instance).
    pub fn new(base_url: impl Into<String>) -> Result<Self, Error> {
        Ok(Self::with_http_client(base_url, reqwest::Client::builder().build()?))
    }

    /// A client of the server at `base_url` that sends through `http` (for timeouts, proxies, headers).
    pub fn with_http_client(base_url: impl Into<String>, http: reqwest::Client) -> Self {
        let base = base_url.into().trim_end_matches('/').to_string();
        Self {
            http,
            base,
            api_key: None,
        }
    }

    /// Sends `key` (as `X-API-Key`) with every request, for a server started with `--api-key`. The
    /// `Authorization` header stays free for hub tokens.
    #[must_use]
    pub fn with_api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.with_key(self.http.get(format!("{}{path}", self.base)))
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.with_key(self.http.post(format!("{}{path}", self.base)))
    }

    fn with_key(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(key) => request.header("x-api-key", key),
            None => request,
        }
    }

    /// The whole generation of `inputs`.
    ///
    /// # Errors
    /// [`Error::Api`] when the server refuses or fails the request.
    pub async fn generate(&self, inputs: &str, parameters: &Parameters) -> Result<GenerateResponse, Error> {
        let request = GenerateRequest { inputs, parameters };
        let response = checked(self.post("/generate").json(&request).send().await?).await?;
        Ok(response.json().await?)
    }

    /// The generation of `inputs`, one message per token. Errors before the first token are returned
    /// here; a failure after it ends the stream with an [`Error::Api`] item. Dropping the stream closes
    /// the connection, which cancels the request.
    ///
    /// # Errors
    /// [`Error::Api`] when the server refuses the request.
    pub async fn generate_stream(&self, inputs: &str, parameters: &Parameters) -> Result<TokenStream, Error> {
        let request = GenerateRequest { inputs, parameters };
        let response = checked(self.post("/generate_stream").json(&request).send().await?).await?;
        let state = StreamState {
            bytes: response.bytes_stream().map(|chunk| chunk.map(|c| c.to_vec())).boxed(),
            parser: SseParser::default(),
        };
        Ok(Box::pin(futures::stream::unfold(Some(state), next_event)))
    }

    /// `Ok` when the server and every shard are healthy.
    ///
    /// # Errors
    /// [`Error::Api`] (503, `unhealthy`) when a shard does not answer.
    pub async fn health(&self) -> Result<(), Error> {
        checked(self.get("/health").send().await?).await?;
        Ok(())
    }

    /// The model and the server's configuration.
    ///
    /// # Errors
    /// When the server cannot be reached or answers with an error.
    pub async fn info(&self) -> Result<Info, Error> {
        let response = checked(self.get("/info").send().await?).await?;
        Ok(response.json().await?)
    }

    /// The tokens of `inputs` with their byte spans.
    ///
    /// # Errors
    /// When the server cannot be reached or answers with an error.
    pub async fn tokenize(&self, inputs: &str, add_special_tokens: bool) -> Result<Vec<SimpleToken>, Error> {
        let request = TokenizeRequest {
            inputs,
            add_special_tokens,
        };
        let response = checked(self.post("/tokenize").json(&request).send().await?).await?;
        Ok(response.json().await?)
    }
}

/// The response if it is a success, else its error body as [`Error::Api`].
async fn checked(response: reqwest::Response) -> Result<reqwest::Response, Error> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let text = response.text().await?;
    let (message, error_type) = match serde_json::from_str::<ErrorBody>(&text) {
        Ok(body) => (body.error, body.error_type),
        Err(_) => (text, None),
    };
    Err(Error::Api(ApiError {
        error_type,
        message,
        http_status: Some(status.as_u16()),
        grpc_code: None,
    }))
}

struct StreamState {
    /// The body's chunks (copied out of reqwest's buffers: they are small, and this crate then needs no
    /// `bytes` dependency).
    bytes: futures::stream::BoxStream<'static, reqwest::Result<Vec<u8>>>,
    parser: SseParser,
}

async fn next_event(state: Option<StreamState>) -> Option<(Result<StreamResponse, Error>, Option<StreamState>)> {
    let mut state = state?;
    loop {
        if let Some(data) = state.parser.next_data() {
            return Some(match serde_json::from_str::<Event>(&data) {
                Ok(Event::Token(message)) => (Ok(*message), Some(state)),
                Ok(Event::Error(body)) => (
                    Err(Error::Api(ApiError {
                        error_type: body.error_type,
                        message: body.error,
                        http_status: None,
                        grpc_code: None,
                    })),
                    None,
                ),
                Err(e) => (Err(Error::Protocol(format!("bad event {data:?}: {e}"))), None),
            });
        }
        match state.bytes.next().await {
            Some(Ok(chunk)) => state.parser.push(&chunk),
            Some(Err(e)) => return Some((Err(e.into()), None)),
            None if state.parser.has_partial() => {
                return Some((Err(Error::Protocol("the stream ended inside an event".into())), None))
            }
            None => return None,
        }
    }
}
