//! Chat templates that adapters ship (their own `tokenizer_config.json`). A chat request for an adapter
//! needs its template before the prompt can be rendered and validated, so the first such request asks
//! rank 0 for the adapter (DownloadAdapter returns the file) and the answer is kept for the router's
//! life. Concurrent requests for the same adapter share that one call and its outcome, a failure too; a
//! failure is not kept, so the next request retries (and a failed adapter leaves nothing in the map). The
//! shard's download is cached (hub cache, host tier), so the batching task's own DownloadAdapter for the
//! same adapter fetches nothing twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::future::{BoxFuture, FutureExt, Shared};

use super::tasks::download;
use super::{AdapterError, AdapterKey};
use crate::chat::ChatTemplate;
use crate::client::ShardClients;
use crate::schema::Secret;

type Fetch = Shared<BoxFuture<'static, Result<Option<ChatTemplate>, AdapterError>>>;

/// An adapter's template: fetched, or being fetched.
#[derive(Clone)]
enum Entry {
    Known(Option<ChatTemplate>),
    Fetching(Fetch),
}

/// Adapter chat templates, fetched once per adapter.
#[derive(Clone, Default)]
pub struct AdapterTemplates {
    entries: Arc<Mutex<HashMap<AdapterKey, Entry>>>,
}

impl std::fmt::Debug for AdapterTemplates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdapterTemplates").finish_non_exhaustive()
    }
}

impl AdapterTemplates {
    /// The chat template `adapter` ships, or `None` when it has none (or an unusable one, logged).
    pub async fn get(
        &self,
        clients: &ShardClients,
        adapter: &AdapterKey,
        api_token: Option<&Secret>,
    ) -> Result<Option<ChatTemplate>, AdapterError> {
        let fetch = {
            let mut entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match entries.get(adapter) {
                Some(Entry::Known(template)) => return Ok(template.clone()),
                Some(Entry::Fetching(fetch)) => fetch.clone(),
                None => {
                    let (clients, key, token) = (clients.clone(), adapter.clone(), api_token.cloned());
                    let fetch = async move {
                        let response = download(&clients, &key, token.as_ref()).await?;
                        Ok(parse(&key, response.tokenizer_config.as_deref()))
                    }
                    .boxed()
                    .shared();
                    entries.insert(adapter.clone(), Entry::Fetching(fetch.clone()));
                    fetch
                }
            }
        };
        let result = fetch.clone().await;
        let mut entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // The first waiter back records the outcome (unless a newer fetch took the place meanwhile).
        if matches!(entries.get(adapter), Some(Entry::Fetching(f)) if f.ptr_eq(&fetch)) {
            match &result {
                Ok(template) => {
                    entries.insert(adapter.clone(), Entry::Known(template.clone()));
                }
                Err(_) => {
                    entries.remove(adapter);
                }
            }
        }
        result
    }
}

fn parse(adapter: &AdapterKey, config: Option<&str>) -> Option<ChatTemplate> {
    let value: serde_json::Value = match serde_json::from_str(config?) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(adapter = %adapter, "the adapter's tokenizer_config.json is not JSON ({e}); using the base template");
            return None;
        }
    };
    match ChatTemplate::from_tokenizer_config(&value) {
        Ok(template) => template,
        Err(e) => {
            tracing::warn!(adapter = %adapter, "the adapter's chat template cannot be used ({e}); using the base template");
            None
        }
    }
}
