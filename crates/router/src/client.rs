//! gRPC client of the shard processes. [`ShardClients`] connects over Unix sockets to every shard named
//! by rank 0's ServiceDiscovery and sends each call to all of them at once: shards hold replicas of the
//! running batch (tensor parallelism), so they must see the same calls in the same order. Rank 0's
//! answer is returned; any shard failing fails the call. Adapter downloads are the exception: they go
//! to rank 0 only, because the files land in a cache every rank reads.

use std::future::Future;
use std::path::{Path, PathBuf};

use futures::future::join_all;
use lorax_proto::shard::v1::shard_service_client::ShardServiceClient;
use lorax_proto::shard::v1::{
    ClearCacheRequest, DecodeRequest, DecodeResponse, DownloadAdapterRequest, DownloadAdapterResponse,
    FilterBatchRequest, HealthRequest, InfoRequest, InfoResponse, LoadAdapterRequest, OffloadAdapterRequest,
    PrefillRequest, PrefillResponse, Request, ServiceDiscoveryRequest, WarmupRequest,
};
use tonic::transport::Channel;

use crate::adapters::AdapterKey;

/// Errors of the shard client layer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The Unix socket could not be connected.
    #[error("cannot connect to shard at {path}: {message}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Transport error text.
        message: String,
    },
    /// A shard answered with a gRPC error (or the connection broke mid-call).
    #[error("{message}")]
    Status {
        /// The gRPC code; the adapter calls' codes decide the HTTP status of the adapter's requests.
        code: tonic::Code,
        /// The shard's message (or the code's description when the shard gave none).
        message: String,
    },
    /// Rank 0's ServiceDiscovery listed no shard.
    #[error("service discovery returned no shard")]
    NoShards,
}

impl ClientError {
    /// The shard's gRPC code, when a shard answered.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Self::Status { code, .. } => Some(*code),
            Self::Connect { .. } | Self::NoShards => None,
        }
    }
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        let message = match status.message() {
            "" => format!("shard call failed: {:?}", status.code()),
            message => message.to_string(),
        };
        ClientError::Status {
            code: status.code(),
            message,
        }
    }
}

type Client = ShardServiceClient<Channel>;

/// Connects a tonic channel to a Unix socket. The URI is a placeholder required by the HTTP/2 layer;
/// every connection goes to `path`.
async fn connect_uds(path: &Path) -> Result<Client, ClientError> {
    let channel = lorax_proto::uds::connect(path.to_path_buf())
        .await
        .map_err(|e| ClientError::Connect {
            path: path.to_path_buf(),
            message: error_chain(&e),
        })?;
    Ok(ShardServiceClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX))
}

/// `e` followed by its sources, so "transport error" says what the transport error was.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let cause = s.to_string();
        // Layers often repeat their source's text; keep each cause once.
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        source = s.source();
    }
    text
}

/// A shard address from ServiceDiscovery: a socket path, optionally written as `unix://path` or `unix:path`.
fn socket_path(url: &str) -> PathBuf {
    let path = url
        .strip_prefix("unix://")
        .or_else(|| url.strip_prefix("unix:"))
        .unwrap_or(url);
    PathBuf::from(path)
}

/// Clients of every shard, rank 0 first. Cheap to clone (channels are shared).
#[derive(Clone, Debug)]
pub struct ShardClients {
    clients: Vec<Client>,
}

impl ShardClients {
    /// Connects to rank 0 at `master`, asks it for every shard's socket and connects to each.
    pub async fn connect(master: &Path) -> Result<Self, ClientError> {
        let mut master_client = connect_uds(master).await?;
        let urls = master_client
            .service_discovery(ServiceDiscoveryRequest {})
            .await?
            .into_inner()
            .urls;
        if urls.is_empty() {
            return Err(ClientError::NoShards);
        }
        let mut clients = Vec::with_capacity(urls.len());
        for url in &urls {
            clients.push(connect_uds(&socket_path(url)).await?);
        }
        tracing::info!(shards = clients.len(), "connected to shards");
        Ok(Self { clients })
    }

    /// Number of shards.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// Whether there is no shard (never true for a connected set).
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// Runs `call` on every shard concurrently; each shard's result, in rank order.
    async fn call_all<R, F, Fut>(&self, call: F) -> Vec<Result<R, tonic::Status>>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        join_all(self.clients.iter().cloned().map(call))
            .await
            .into_iter()
            .map(|result| result.map(tonic::Response::into_inner))
            .collect()
    }

    /// Runs `call` on every shard concurrently; the first error (in rank order) wins, else rank 0's answer.
    async fn broadcast<R, F, Fut>(&self, call: F) -> Result<R, ClientError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        let mut first = None;
        for result in self.call_all(call).await {
            let answer = result?;
            if first.is_none() {
                first = Some(answer);
            }
        }
        first.ok_or(ClientError::NoShards)
    }

    /// Static facts about the model and rank 0's shard.
    pub async fn info(&self) -> Result<InfoResponse, ClientError> {
        self.broadcast(|mut c| async move { c.info(InfoRequest {}).await })
            .await
    }

    /// Liveness of every shard.
    pub async fn health(&self) -> Result<(), ClientError> {
        self.broadcast(|mut c| async move { c.health(HealthRequest {}).await })
            .await
            .map(|_| ())
    }

    /// Drops every shard's running batch.
    pub async fn clear_cache(&self) -> Result<(), ClientError> {
        self.broadcast(|mut c| async move { c.clear_cache(ClearCacheRequest {}).await })
            .await
            .map(|_| ())
    }

    /// Runs the worst-case prefill once (and, on one shard, a decode step at each row count up to
    /// `max_decode_rows`); returns the prefill tokens rank 0 ran.
    pub async fn warmup(
        &self,
        max_prefill_tokens: u32,
        max_total_tokens: u32,
        max_decode_rows: u32,
    ) -> Result<u32, ClientError> {
        let request = WarmupRequest {
            max_prefill_tokens,
            max_total_tokens,
            max_decode_rows,
        };
        self.broadcast(|mut c| async move { c.warmup(request).await })
            .await
            .map(|r| r.prefill_tokens)
    }

    /// Adds `requests` to the running batch and returns their first tokens.
    pub async fn prefill(&self, requests: Vec<Request>) -> Result<PrefillResponse, ClientError> {
        self.mixed_step(requests, false, 0).await
    }

    /// Adds `requests` to the running batch and runs up to `max_prompt_tokens` prompt tokens (0: every
    /// prompt whole) of the sequences still prefilling; with `decode_running`, also advances every
    /// running sequence by one token in the same forward pass. Returns the tokens of the sequences that
    /// got one and the ids of those still prefilling.
    pub async fn mixed_step(
        &self,
        requests: Vec<Request>,
        decode_running: bool,
        max_prompt_tokens: u32,
    ) -> Result<PrefillResponse, ClientError> {
        let request = PrefillRequest {
            requests,
            decode_running,
            max_prompt_tokens,
        };
        self.broadcast(|mut c| {
            let request = request.clone();
            async move { c.prefill(request).await }
        })
        .await
    }

    /// Advances every sequence of the running batch by one token. With `run_ahead` the shards run the next
    /// decode step right after answering (see `DecodeRequest.run_ahead`).
    pub async fn decode(&self, run_ahead: bool) -> Result<DecodeResponse, ClientError> {
        self.broadcast(|mut c| async move { c.decode(DecodeRequest { run_ahead }).await })
            .await
    }

    /// Keeps only `keep_ids` in the running batch; returns how many sequences remain.
    pub async fn filter_batch(&self, keep_ids: Vec<u64>) -> Result<u32, ClientError> {
        let request = FilterBatchRequest { keep_ids };
        self.broadcast(|mut c| {
            let request = request.clone();
            async move { c.filter_batch(request).await }
        })
        .await
        .map(|r| r.remaining)
    }

    /// Fetches an adapter into the shards' host cache. Only rank 0 is asked: the cache is shared. With
    /// `load` (one shard only: the others would not load it) the shard also loads it when it has a slot
    /// free, and says so in `loaded`; with `stream` too, it may answer before the weights are read
    /// (`streaming`: see the shard proto's DownloadAdapterRequest).
    pub async fn download_adapter(
        &self,
        adapter: &AdapterKey,
        api_token: Option<String>,
        load: bool,
        stream: bool,
    ) -> Result<DownloadAdapterResponse, ClientError> {
        let mut rank0 = self.clients.first().cloned().ok_or(ClientError::NoShards)?;
        let load = load && self.clients.len() == 1;
        let request = DownloadAdapterRequest {
            adapter_id: adapter.id.clone(),
            adapter_source: adapter.source.as_str().to_string(),
            api_token,
            load,
            stream: stream && load,
        };
        Ok(rank0.download_adapter(request).await?.into_inner())
    }

    /// Loads a downloaded adapter on every shard. If some shards fail, it is offloaded again from those
    /// that loaded it (best effort), so no rank keeps an adapter the router counts as not loaded.
    pub async fn load_adapter(&self, adapter: &AdapterKey) -> Result<(), ClientError> {
        let request = LoadAdapterRequest {
            adapter_id: adapter.id.clone(),
            adapter_source: adapter.source.as_str().to_string(),
        };
        let results = self
            .call_all(|mut c| {
                let request = request.clone();
                async move { c.load_adapter(request).await }
            })
            .await;
        // A shard's real error before another's "no room" (which the router would wait out).
        let errors = || results.iter().filter_map(|r| r.as_ref().err());
        let Some(failure) = errors()
            .find(|e| e.code() != tonic::Code::ResourceExhausted)
            .or_else(|| errors().next())
            .cloned()
        else {
            return Ok(());
        };
        let offload = offload_request(adapter);
        for (client, _) in self.clients.iter().zip(&results).filter(|(_, r)| r.is_ok()) {
            if let Err(e) = client.clone().offload_adapter(offload.clone()).await {
                tracing::warn!(adapter = %adapter, "undoing a partial load failed: {}", e.message());
            }
        }
        Err(failure.into())
    }

    /// Releases an adapter's device memory on every shard.
    pub async fn offload_adapter(&self, adapter: &AdapterKey) -> Result<(), ClientError> {
        let request = offload_request(adapter);
        self.broadcast(|mut c| {
            let request = request.clone();
            async move { c.offload_adapter(request).await }
        })
        .await
        .map(|_| ())
    }
}

fn offload_request(adapter: &AdapterKey) -> OffloadAdapterRequest {
    OffloadAdapterRequest {
        adapter_id: adapter.id.clone(),
        adapter_source: adapter.source.as_str().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_paths() {
        assert_eq!(socket_path("/tmp/a"), PathBuf::from("/tmp/a"));
        assert_eq!(socket_path("unix:///tmp/a"), PathBuf::from("/tmp/a"));
        assert_eq!(socket_path("unix:/tmp/a"), PathBuf::from("/tmp/a"));
    }

    #[test]
    fn status_message_is_kept() {
        let err = ClientError::from(tonic::Status::internal("CUDA out of memory"));
        assert_eq!(err.to_string(), "CUDA out of memory");
        assert_eq!(err.code(), Some(tonic::Code::Internal));
        let err = ClientError::from(tonic::Status::not_found(""));
        assert_eq!(err.to_string(), "shard call failed: NotFound");
        assert_eq!(err.code(), Some(tonic::Code::NotFound));
        assert_eq!(ClientError::NoShards.code(), None);
    }
}
