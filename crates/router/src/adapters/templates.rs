//! Chat templates that adapters ship (their own `tokenizer_config.json`). A chat request for an adapter
//! needs its template before the prompt can be rendered and validated, so the first such request asks
//! rank 0 for the adapter (DownloadAdapter returns the file) and the answer is kept for the router's
//! life. Concurrent requests for the same adapter share that one call; a failed call is not kept, so the
//! next request retries. The shard's download is cached (hub cache, host tier), so the batching task's own
//! DownloadAdapter for the same adapter fetches nothing twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OnceCell;

use super::tasks::download;
use super::{AdapterError, AdapterKey};
use crate::chat::ChatTemplate;
use crate::client::ShardClients;
use crate::schema::Secret;

type Cell = Arc<OnceCell<Option<ChatTemplate>>>;

/// Adapter chat templates, fetched once per adapter.
#[derive(Clone, Default)]
pub struct AdapterTemplates {
    cells: Arc<Mutex<HashMap<AdapterKey, Cell>>>,
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
        let cell = {
            let mut cells = self.cells.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            Arc::clone(cells.entry(adapter.clone()).or_default())
        };
        let template = cell
            .get_or_try_init(|| async {
                let response = download(clients, adapter, api_token).await?;
                Ok::<_, AdapterError>(parse(adapter, response.tokenizer_config.as_deref()))
            })
            .await?;
        Ok(template.clone())
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
