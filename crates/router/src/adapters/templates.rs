//! Chat templates that adapters ship (their own `tokenizer_config.json`). A chat request for an adapter
//! needs its template before the prompt can be rendered and validated, so the first such request asks
//! rank 0 for the adapter (DownloadAdapter returns the file) and the answer is kept (within
//! 64 MiB of template text: past it, other adapters' templates are fetched again when next
//! asked for). Requests for the same adapter with the same hub token that come while it is being fetched share
//! that one call and its outcome, a failure too (a request with another token makes its own call: the
//! token may be what decides). The call runs in a task of its own, which records the outcome even if every
//! request waiting for it has gone; a failure is not kept (the next request retries) and leaves no entry.
//! The shard's download is cached (hub cache, host tier), so the batching task's own DownloadAdapter for
//! the same adapter fetches nothing twice.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use futures::future::{BoxFuture, FutureExt, Shared};

use super::tasks::download;
use super::{AdapterError, AdapterFailure, AdapterKey};
use crate::chat::ChatTemplate;
use crate::client::ShardClients;
use crate::schema::Secret;

type Outcome = Result<Option<ChatTemplate>, AdapterError>;

/// An adapter's template: fetched, or being fetched (call `id`, with the hub token it was made with).
#[derive(Clone)]
enum Entry {
    Known(Option<ChatTemplate>),
    Fetching {
        id: u64,
        token: Option<Secret>,
        fetch: Shared<BoxFuture<'static, Outcome>>,
    },
}

/// Adapter chat templates, fetched once per adapter.
#[derive(Clone, Default)]
pub struct AdapterTemplates {
    entries: Arc<Mutex<HashMap<AdapterKey, Entry>>>,
    calls: Arc<AtomicU64>,
}

impl std::fmt::Debug for AdapterTemplates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdapterTemplates").finish_non_exhaustive()
    }
}

impl AdapterTemplates {
    /// The chat template `adapter` ships, or `None` when it has none; an unusable one is an error
    /// ([`parse`]).
    pub async fn get(
        &self,
        clients: &ShardClients,
        adapter: &AdapterKey,
        api_token: Option<&Secret>,
    ) -> Result<Option<ChatTemplate>, AdapterError> {
        let (clients, key, token) = (clients.clone(), adapter.clone(), api_token.cloned());
        self.get_with(adapter, api_token, move || async move {
            let response = download(&clients, &key, token.as_ref(), false, false).await?;
            parse(&key, response.tokenizer_config.as_deref())
        })
        .await
    }

    /// [`AdapterTemplates::get`] with `call` as the shard call (run only when no answer is known or
    /// being fetched with the same token).
    async fn get_with<F, Fut>(&self, adapter: &AdapterKey, api_token: Option<&Secret>, call: F) -> Outcome
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        // The shared call to wait for, or (`Err`) `call` back for a call of this request's own.
        let fetch = {
            let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
            match entries.get(adapter) {
                Some(Entry::Known(template)) => return Ok(template.clone()),
                Some(Entry::Fetching { token, fetch, .. }) if token.as_ref() == api_token => Ok(fetch.clone()),
                // Being fetched with another token: a call of this request's own (below).
                Some(Entry::Fetching { .. }) => Err(call),
                None => {
                    let id = self.calls.fetch_add(1, Ordering::Relaxed);
                    let (map, key) = (Arc::clone(&self.entries), adapter.clone());
                    let task = tokio::spawn(call());
                    let fetch = async move {
                        let outcome = task.await.unwrap_or_else(|e| {
                            Err(AdapterError {
                                kind: AdapterFailure::Unavailable,
                                adapter: key.clone(),
                                stage: "downloaded",
                                no_room: false,
                                message: format!("the template fetch failed: {e}"),
                            })
                        });
                        let mut entries = map.lock().unwrap_or_else(PoisonError::into_inner);
                        // Unless a newer call took the place meanwhile.
                        if matches!(entries.get(&key), Some(Entry::Fetching { id: current, .. }) if *current == id) {
                            match &outcome {
                                Ok(template) => remember(&mut entries, key, template.clone()),
                                Err(_) => {
                                    entries.remove(&key);
                                }
                            }
                        }
                        outcome
                    }
                    .boxed()
                    .shared();
                    // Driven to its end (and its outcome recorded) even if every request leaves.
                    tokio::spawn(fetch.clone());
                    entries.insert(
                        adapter.clone(),
                        Entry::Fetching {
                            id,
                            token: api_token.cloned(),
                            fetch: fetch.clone(),
                        },
                    );
                    Ok(fetch)
                }
            }
        };
        let call = match fetch {
            Ok(fetch) => return fetch.await,
            Err(call) => call,
        };
        let outcome = call().await;
        if let Ok(template) = &outcome {
            let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
            remember(&mut entries, adapter.clone(), template.clone());
        }
        outcome
    }
}

/// Bytes of template text the router keeps for adapters (a template may be up to 1 MiB, and clients may
/// name thousands of adapters); past it, other adapters' known templates are forgotten, to be fetched
/// again (from the shard's caches) when next asked for.
const KEPT_TEMPLATE_BYTES: usize = 64 << 20;

/// The template text a known entry keeps.
fn kept_bytes(entry: &Entry) -> usize {
    match entry {
        Entry::Known(Some(template)) => template.source().len(),
        _ => 0,
    }
}

/// Records `adapter`'s template, forgetting other known templates while more than [`KEPT_TEMPLATE_BYTES`]
/// are kept.
fn remember(entries: &mut HashMap<AdapterKey, Entry>, adapter: AdapterKey, template: Option<ChatTemplate>) {
    entries.insert(adapter.clone(), Entry::Known(template));
    let mut kept: usize = entries.values().map(kept_bytes).sum();
    while kept > KEPT_TEMPLATE_BYTES {
        let Some((other, bytes)) = entries
            .iter()
            .filter(|(key, entry)| **key != adapter && kept_bytes(entry) > 0)
            .map(|(key, entry)| (key.clone(), kept_bytes(entry)))
            .next()
        else {
            break;
        };
        entries.remove(&other);
        kept -= bytes;
    }
}

/// The chat template of an adapter's `tokenizer_config.json`: `None` without the file or without a
/// `chat_template` in it (the model's template is used then). A file that is not JSON, or a template that
/// does not compile, is an invalid adapter for chat (422 `adapter_invalid`): rendering with the model's
/// template instead would give the adapter prompts in a format it was not trained on.
fn parse(adapter: &AdapterKey, config: Option<&str>) -> Outcome {
    let Some(config) = config else { return Ok(None) };
    let invalid = |message: String| AdapterError {
        kind: AdapterFailure::Invalid,
        adapter: adapter.clone(),
        stage: "used for chat",
        no_room: false,
        message,
    };
    let value: serde_json::Value =
        serde_json::from_str(config).map_err(|e| invalid(format!("its tokenizer_config.json is not JSON: {e}")))?;
    ChatTemplate::from_tokenizer_config(&value).map_err(|e| invalid(format!("its chat template cannot be used: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::AdapterSource;
    use std::sync::atomic::AtomicUsize;
    use tokio::sync::Notify;

    fn failure(adapter: &AdapterKey) -> AdapterError {
        AdapterError {
            kind: AdapterFailure::Forbidden,
            adapter: adapter.clone(),
            stage: "downloaded",
            no_room: false,
            message: "refused".into(),
        }
    }

    /// Lets every spawned task run until it waits (one thread: deterministic).
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn waiters_share_one_call_and_its_failure_and_a_failure_is_not_kept() {
        let templates = AdapterTemplates::default();
        let adapter = AdapterKey::new(AdapterSource::Hub, "org/t");
        let calls = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Notify::new());
        let token = Secret("hf_a".into());
        let mut waiters = Vec::new();
        for _ in 0..3 {
            let (templates, adapter, calls, gate, token) = (
                templates.clone(),
                adapter.clone(),
                Arc::clone(&calls),
                Arc::clone(&gate),
                token.clone(),
            );
            waiters.push(tokio::spawn(async move {
                let key = adapter.clone();
                templates
                    .get_with(&adapter, Some(&token), move || {
                        calls.fetch_add(1, Ordering::SeqCst);
                        async move {
                            gate.notified().await;
                            Err(failure(&key))
                        }
                    })
                    .await
            }));
        }
        settle().await;
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one call for three requests");
        gate.notify_one();
        for w in waiters {
            let outcome = w.await.expect("task");
            assert_eq!(outcome.err(), Some(failure(&adapter)), "each shares the failure");
        }
        assert!(
            templates.entries.lock().expect("lock").is_empty(),
            "a failure leaves no entry"
        );
        // The next request calls again, and its answer is kept.
        let answer = templates.get_with(&adapter, Some(&token), || async { Ok(None) }).await;
        assert!(matches!(answer, Ok(None)));
        let again = templates
            .get_with(&adapter, None, || async { panic!("an answer is known: no call") })
            .await;
        assert!(matches!(again, Ok(None)));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn another_token_calls_on_its_own_and_an_abandoned_call_still_records() {
        let templates = AdapterTemplates::default();
        let adapter = AdapterKey::new(AdapterSource::Hub, "org/private");
        let gate = Arc::new(Notify::new());
        let held = {
            let (templates, adapter, gate) = (templates.clone(), adapter.clone(), Arc::clone(&gate));
            tokio::spawn(async move {
                templates
                    .get_with(&adapter, None, move || async move {
                        gate.notified().await;
                        Ok(None)
                    })
                    .await
            })
        };
        settle().await;
        // A request with a token does not wait for (or share) the tokenless call.
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let own = templates
            .get_with(&adapter, Some(&Secret("hf_b".into())), move || {
                counted.fetch_add(1, Ordering::SeqCst);
                async { Ok(None) }
            })
            .await;
        assert!(own.is_ok());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // The first request leaves; its call still ends and is recorded.
        held.abort();
        gate.notify_one();
        settle().await;
        let entries = templates.entries.lock().expect("lock");
        assert!(matches!(entries.get(&adapter), Some(Entry::Known(None))));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn known_templates_are_kept_within_their_byte_budget() {
        let templates = AdapterTemplates::default();
        // 100 adapters with 1 MiB templates: at most 64 MiB of them stay known, the newest among them.
        let text = format!("{{{{ '{}' }}}}", "x".repeat((1 << 20) - 10));
        for i in 0..100 {
            let adapter = AdapterKey::new(AdapterSource::Hub, format!("org/t{i}"));
            let template = ChatTemplate::new(&text, "", "").expect("template");
            let got = templates
                .get_with(&adapter, None, move || async move { Ok(Some(template)) })
                .await;
            assert!(matches!(got, Ok(Some(_))));
        }
        let entries = templates.entries.lock().expect("lock");
        let kept: usize = entries.values().map(kept_bytes).sum();
        assert!(kept <= KEPT_TEMPLATE_BYTES, "{kept}");
        assert!(entries.len() >= 60 && entries.len() < 100, "{} entries", entries.len());
        assert!(entries.contains_key(&AdapterKey::new(AdapterSource::Hub, "org/t99")));
    }
}
