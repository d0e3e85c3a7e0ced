//! The gRPC client of `lorax.generate.v1.LoraxService`. It answers with the same types as the REST
//! [`crate::Client`]; [`GrpcClient::raw`] gives the generated tonic client for anything else.

use futures::StreamExt;
use lorax_proto::generate::v1 as pb;
use lorax_proto::generate::v1::lorax_service_client::LoraxServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};

use crate::types::{GenerateResponse, Parameters, SimpleToken, StreamResponse, TokenStream};
use crate::Error;

/// Metadata key of the API key (the REST header `X-API-Key`).
const API_KEY_METADATA: &str = "x-api-key";

/// A client of the router's gRPC API. Cheap to clone (the channel is shared).
#[derive(Debug, Clone)]
pub struct GrpcClient {
    inner: LoraxServiceClient<Channel>,
    api_key: Option<MetadataValue<Ascii>>,
}

impl GrpcClient {
    /// Connects to the gRPC server at `address` (such as `http://127.0.0.1:50051`).
    ///
    /// # Errors
    /// When `address` is not a valid URI or the server cannot be reached.
    pub async fn connect(address: impl Into<String>) -> Result<Self, Error> {
        let channel = Endpoint::from_shared(address.into())?.connect().await?;
        Ok(Self::new(channel))
    }

    /// A client over an existing channel (for TLS, timeouts or load balancing set up by the caller).
    pub fn new(channel: Channel) -> Self {
        Self {
            inner: LoraxServiceClient::new(channel).max_decoding_message_size(usize::MAX),
            api_key: None,
        }
    }

    /// Sends `key` (as `x-api-key` metadata) with every call, for a server started with `--api-key`.
    ///
    /// # Errors
    /// [`Error::Protocol`] when `key` cannot be sent as metadata (not visible ASCII).
    pub fn with_api_key(mut self, key: &str) -> Result<Self, Error> {
        let value = key
            .parse()
            .map_err(|_| Error::Protocol("an API key must be visible ASCII".into()))?;
        self.api_key = Some(value);
        Ok(self)
    }

    /// `message` with the API key, if any.
    fn call<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(key) = &self.api_key {
            request.metadata_mut().insert(API_KEY_METADATA, key.clone());
        }
        request
    }

    /// The generated tonic client, for calls with metadata or raw messages.
    pub fn raw(&mut self) -> &mut LoraxServiceClient<Channel> {
        &mut self.inner
    }

    fn request(&self, inputs: &str, parameters: &Parameters) -> tonic::Request<pb::GenerateRequest> {
        self.call(pb::GenerateRequest {
            inputs: inputs.to_string(),
            parameters: Some(parameters.into()),
        })
    }

    /// The whole generation of `inputs`.
    ///
    /// # Errors
    /// [`Error::Api`] when the server refuses or fails the request.
    pub async fn generate(&mut self, inputs: &str, parameters: &Parameters) -> Result<GenerateResponse, Error> {
        let request = self.request(inputs, parameters);
        let response = self.inner.generate(request).await?;
        GenerateResponse::try_from(response.into_inner())
    }

    /// The generation of `inputs`, one message per token. Errors before the first token are returned
    /// here; a failure after it ends the stream with an [`Error::Api`] item. Dropping the stream cancels
    /// the call and the request.
    ///
    /// # Errors
    /// [`Error::Api`] when the server refuses the request.
    pub async fn generate_stream(&mut self, inputs: &str, parameters: &Parameters) -> Result<TokenStream, Error> {
        let request = self.request(inputs, parameters);
        let stream = self.inner.generate_stream(request).await?.into_inner();
        Ok(Box::pin(stream.map(|message| StreamResponse::try_from(message?))))
    }

    /// The tokens of `inputs` with their byte spans.
    ///
    /// # Errors
    /// When the server cannot be reached or answers with an error.
    pub async fn tokenize(&mut self, inputs: &str, add_special_tokens: bool) -> Result<Vec<SimpleToken>, Error> {
        let request = self.call(pb::TokenizeRequest {
            inputs: inputs.to_string(),
            add_special_tokens: Some(add_special_tokens),
        });
        let tokens = self.inner.tokenize(request).await?.into_inner().tokens;
        tokens
            .into_iter()
            .map(|t| {
                let offset = |v: u64| usize::try_from(v).map_err(|_| Error::Protocol(format!("offset {v}")));
                Ok(SimpleToken {
                    id: t.id,
                    text: t.text,
                    start: offset(t.start)?,
                    stop: offset(t.stop)?,
                })
            })
            .collect()
    }

    /// `Ok` when the server and every shard are healthy.
    ///
    /// # Errors
    /// [`Error::Api`] (`UNAVAILABLE`, `unhealthy`) when a shard does not answer.
    pub async fn health(&mut self) -> Result<(), Error> {
        let request = self.call(pb::HealthRequest {});
        self.inner.health(request).await?;
        Ok(())
    }

    /// The adapters the server knows, with their states and queues.
    ///
    /// # Errors
    /// When the server cannot be reached or answers with an error.
    pub async fn list_adapters(&mut self) -> Result<Vec<pb::Adapter>, Error> {
        let request = self.call(pb::ListAdaptersRequest {});
        Ok(self.inner.list_adapters(request).await?.into_inner().adapters)
    }
}
