//! The adapter shard calls. Each runs in its own spawned task, so a slow hub or a long load never blocks
//! the batching loop, the base model or other adapters; the result comes back to the batching task as
//! an [`AdapterEvent`] on a channel it selects on. The same calls, awaited in place, preload adapters
//! at startup.

use lorax_proto::shard::v1::DownloadAdapterResponse;
use tokio::sync::mpsc;

use super::registry::Action;
use super::{AdapterError, AdapterFailure, AdapterKey};
use crate::client::{ClientError, ShardClients};
use crate::schema::Secret;

/// The outcome of an adapter call, for the batching task.
#[derive(Debug)]
pub enum AdapterEvent {
    /// The files are in the shards' host cache (and, when the download was asked to load it and
    /// `response.loaded` says so, the adapter is on the device).
    Downloaded {
        /// The adapter.
        adapter: AdapterKey,
        /// Rank 0's answer (size, rank, warnings, loaded).
        response: DownloadAdapterResponse,
    },
    /// Every shard loaded it.
    Loaded {
        /// The adapter.
        adapter: AdapterKey,
    },
    /// A streamed load (`response.streaming` of its download) read all its weights (`Ok`), or failed: the
    /// shard unloaded it, and the step that used it failed.
    Streamed {
        /// The adapter.
        adapter: AdapterKey,
        /// The read's outcome.
        result: Result<(), AdapterError>,
    },
    /// The offload finished (`error`: it failed; the adapter is treated as offloaded anyway).
    Offloaded {
        /// The adapter.
        adapter: AdapterKey,
        /// The shard's error, if any.
        error: Option<ClientError>,
    },
    /// The download or the load failed: the adapter's queued requests fail with this error.
    Failed(AdapterError),
}

/// Starts adapter calls in spawned tasks; cheap to clone.
#[derive(Debug, Clone)]
pub struct AdapterTasks {
    clients: ShardClients,
    events: mpsc::UnboundedSender<AdapterEvent>,
}

impl AdapterTasks {
    /// Tasks calling `clients`, and the receiver of their events.
    pub fn new(clients: ShardClients) -> (Self, mpsc::UnboundedReceiver<AdapterEvent>) {
        let (events, receiver) = mpsc::unbounded_channel();
        (Self { clients, events }, receiver)
    }

    /// Downloads `adapter` with the token of the request that asked for it first; with `load`, the shard
    /// also loads it when it has a slot free (the registry holds one for it), and with `stream` may answer
    /// before its weights are read.
    pub fn download(&self, adapter: AdapterKey, api_token: Option<Secret>, load: bool, stream: bool) {
        self.spawn(|clients| async move {
            match download(&clients, &adapter, api_token.as_ref(), load, stream).await {
                Ok(response) => AdapterEvent::Downloaded { adapter, response },
                Err(e) => AdapterEvent::Failed(e),
            }
        });
    }

    /// Waits for a streamed load's read to end (the shard's LoadAdapter answers then).
    pub fn await_stream(&self, adapter: AdapterKey) {
        self.spawn(|clients| async move {
            let result = load(&clients, &adapter).await;
            AdapterEvent::Streamed { adapter, result }
        });
    }

    /// Starts what the registry planned.
    pub fn start(&self, action: Action) {
        match action {
            Action::Load(adapter) => self.spawn(|clients| async move {
                match load(&clients, &adapter).await {
                    Ok(()) => AdapterEvent::Loaded { adapter },
                    Err(e) => AdapterEvent::Failed(e),
                }
            }),
            Action::Offload(adapter) => self.spawn(|clients| async move {
                let error = clients.offload_adapter(&adapter).await.err();
                AdapterEvent::Offloaded { adapter, error }
            }),
        }
    }

    fn spawn<F, Fut>(&self, call: F)
    where
        F: FnOnce(ShardClients) -> Fut,
        Fut: std::future::Future<Output = AdapterEvent> + Send + 'static,
    {
        let events = self.events.clone();
        let call = call(self.clients.clone());
        tokio::spawn(async move {
            // Fails only when the batching task is gone, and then nobody waits for the result.
            let _ = events.send(call.await);
        });
    }
}

/// Fetches `adapter` into the host cache (rank 0), and with `load` onto the device when a slot is free.
pub async fn download(
    clients: &ShardClients,
    adapter: &AdapterKey,
    api_token: Option<&Secret>,
    load: bool,
    stream: bool,
) -> Result<DownloadAdapterResponse, AdapterError> {
    clients
        .download_adapter(adapter, api_token.map(|t| t.0.clone()), load, stream)
        .await
        .map_err(|e| {
            // A download that also loads fails its load with the load's codes (a full device, an
            // offload meanwhile, an upload error).
            let loading = load
                && matches!(
                    e.code(),
                    Some(tonic::Code::ResourceExhausted | tonic::Code::Aborted | tonic::Code::Internal)
                );
            adapter_error(adapter, if loading { "loaded" } else { "downloaded" }, &e, api_token)
        })
}

/// Loads a downloaded `adapter` on every shard.
pub async fn load(clients: &ShardClients, adapter: &AdapterKey) -> Result<(), AdapterError> {
    clients
        .load_adapter(adapter)
        .await
        .map_err(|e| adapter_error(adapter, "loaded", &e, None))
}

/// Downloads and loads each of `adapters` in turn (startup: `--preloaded-adapter-ids`); returns each one's
/// bytes, as its download answered.
pub async fn preload(clients: &ShardClients, adapters: &[AdapterKey]) -> Result<Vec<(AdapterKey, u64)>, AdapterError> {
    let mut loaded = Vec::with_capacity(adapters.len());
    for adapter in adapters {
        let response = download(clients, adapter, None, true, false).await?;
        log_download(adapter, &response);
        if !response.loaded {
            load(clients, adapter).await?;
        }
        tracing::info!(adapter = %adapter, "adapter preloaded");
        loaded.push((adapter.clone(), device_bytes(&response)));
    }
    Ok(loaded)
}

/// The device bytes of a downloaded adapter, as the shard reckons them (`upload_bytes`), or its bytes as
/// stored (a shard that does not say).
pub fn device_bytes(response: &DownloadAdapterResponse) -> u64 {
    match response.upload_bytes {
        0 => response.size_bytes,
        b => b,
    }
}

/// Logs a finished download and the shard's warnings about it.
pub fn log_download(adapter: &AdapterKey, response: &DownloadAdapterResponse) {
    for warning in &response.warnings {
        tracing::warn!(adapter = %adapter, "{warning}");
    }
    tracing::info!(
        adapter = %adapter,
        bytes = response.size_bytes,
        rank = response.rank,
        loaded = response.loaded,
        "adapter downloaded"
    );
}

/// The typed failure of an adapter call. A shard that echoes the request's token (in a URL, say) does
/// not get it into the message, which reaches clients and logs.
fn adapter_error(
    adapter: &AdapterKey,
    stage: &'static str,
    error: &ClientError,
    api_token: Option<&Secret>,
) -> AdapterError {
    let mut message = error.to_string();
    if let Some(token) = api_token.filter(|t| !t.0.is_empty()) {
        message = message.replace(&token.0, "***");
    }
    // The shard's RESOURCE_EXHAUSTED also says "no slot free" (a slot the router counts as free, after a
    // failed offload): only the device's own memory is waited for.
    let no_room = stage == "loaded"
        && error.code() == Some(tonic::Code::ResourceExhausted)
        && message.contains("out of device memory");
    AdapterError {
        kind: AdapterFailure::from_code(error.code()),
        adapter: adapter.clone(),
        stage,
        message,
        no_room,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::AdapterSource;

    #[test]
    fn errors_keep_the_kind_and_hide_the_token() {
        let adapter = AdapterKey::new(AdapterSource::Hub, "org/private");
        let token = Secret("hf_secret".into());
        let error = ClientError::from(tonic::Status::permission_denied(
            "401 from https://hub/api?token=hf_secret",
        ));
        let e = adapter_error(&adapter, "downloaded", &error, Some(&token));
        assert_eq!(e.kind, AdapterFailure::Forbidden);
        assert_eq!(e.message, "401 from https://hub/api?token=***");
        let text = e.to_string();
        assert!(!text.contains("hf_secret"), "{text}");
        assert!(text.contains("`org/private` (hub) could not be downloaded"), "{text}");
    }
}
