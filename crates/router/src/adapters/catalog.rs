//! A read-only view of the adapters the router knows, for `/v1/models` and the public gRPC
//! `ListAdapters`. The batching task owns the real state ([`super::registry`]) and refreshes this copy
//! after every turn; readers never wait on the batching task.

use std::sync::{Arc, RwLock};

use super::registry::State;
use super::AdapterKey;

/// One adapter as the catalog shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterInfo {
    /// Source and id.
    pub key: AdapterKey,
    /// `downloading`, `downloaded`, `loading`, `active`, `draining` or `offloading`.
    pub state: &'static str,
    /// Requests waiting in its queue.
    pub queued: usize,
    /// Requests of the running batch using it.
    pub running: usize,
}

/// The name of a registry state.
pub fn state_name(state: State) -> &'static str {
    match state {
        State::Downloading => "downloading",
        State::Downloaded => "downloaded",
        State::Loading => "loading",
        State::Active { draining: false, .. } => "active",
        State::Active { draining: true, .. } => "draining",
        State::Offloading => "offloading",
    }
}

/// Shared, cheaply cloned snapshot of the known adapters (sorted by source, then id).
#[derive(Debug, Clone, Default)]
pub struct AdapterCatalog(Arc<RwLock<Vec<AdapterInfo>>>);

impl AdapterCatalog {
    /// The adapters known at the batching task's last turn.
    pub fn snapshot(&self) -> Vec<AdapterInfo> {
        self.0.read().map(|v| v.clone()).unwrap_or_default()
    }

    /// Brings the snapshot up to date with `adapters` (in key order; the batching task calls this every
    /// turn). Compared in place: nothing is allocated or written unless something changed.
    pub(crate) fn refresh<'a>(
        &self,
        adapters: impl ExactSizeIterator<Item = (&'a AdapterKey, &'static str, usize, usize)> + Clone,
    ) {
        let same = |current: &Vec<AdapterInfo>| {
            current.len() == adapters.len()
                && current
                    .iter()
                    .zip(adapters.clone())
                    .all(|(c, (key, state, queued, running))| {
                        c.key == *key && c.state == state && c.queued == queued && c.running == running
                    })
        };
        if self.0.read().map(|current| same(&current)).unwrap_or(false) {
            return;
        }
        let fresh = adapters
            .map(|(key, state, queued, running)| AdapterInfo {
                key: key.clone(),
                state,
                queued,
                running,
            })
            .collect();
        if let Ok(mut current) = self.0.write() {
            *current = fresh;
        }
    }
}
