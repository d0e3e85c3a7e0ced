//! Test harness: in-process fake shards (tonic servers on temporary Unix sockets, deterministic tokens:
//! next = (last + 1 + adapter offset) % vocab, offset 0 for the base model) and the real router
//! application served on 127.0.0.1:0, spoken to over HTTP with reqwest (and its gRPC API on another
//! port). Waiting is done by polling with
//! a deadline, never by sleeping.
//!
//! The fakes implement the adapter calls with the real shard's contract, strictly enough to catch router
//! bugs: a [`FakeHub`] shared by all ranks (the shared host cache) counts downloads and can fail or hold
//! them; each rank has its own loaded set, bounded by a device capacity. Prefill with an adapter not
//! loaded, Offload of an adapter a running sequence uses, Load beyond capacity or before download are
//! refused with the contract's codes and counted in [`FakeState::adapter_errors`].
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use futures::StreamExt;
use lorax_proto::shard::v1::shard_service_server::{ShardService, ShardServiceServer};
use lorax_proto::shard::v1::{
    ClearCacheRequest, ClearCacheResponse, DecodeRequest, DecodeResponse, DownloadAdapterRequest,
    DownloadAdapterResponse, FilterBatchRequest, FilterBatchResponse, Generation, HealthRequest, HealthResponse,
    InfoRequest, InfoResponse, LoadAdapterRequest, LoadAdapterResponse, OffloadAdapterRequest, OffloadAdapterResponse,
    PrefillRequest, PrefillResponse, ServiceDiscoveryRequest, ServiceDiscoveryResponse, Token, TopTokens,
    WarmupRequest, WarmupResponse,
};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Code, Request, Response, Status};

/// Vocabulary of the fixture tokenizer.
pub const VOCAB: u32 = 32000;
/// `</s>` of the fixture tokenizer.
pub const EOS: u32 = 2;
/// The chat template of the fake adapters whose id contains "templated".
pub const ADAPTER_CHAT_TEMPLATE: &str =
    "ADAPTER{% for m in messages %} {{ m['role'] }}: {{ m['content'] }}{% endfor %} =>";

/// KV block size the fakes report.
pub const BLOCK_SIZE: u32 = 16;
/// Last prompt token of "Hello" (`<s> ▁Hello`).
pub const HELLO_LAST: u32 = 22557;

/// An adapter as the fakes key it: (source, id).
type AdapterKey = (String, String);

/// Token offset of an adapter's sequences: 0 for the base model (id ""), else 1..=997 from the id, so
/// tests can tell which adapter produced a token.
pub fn adapter_offset(id: &str) -> u32 {
    if id.is_empty() {
        return 0;
    }
    // FNV-1a: stable across runs, unlike the std hasher.
    let hash = id
        .bytes()
        .fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    1 + hash % 997
}

/// The `n` tokens the fakes generate for `adapter` ("" = base) after a prompt ending in `last`.
pub fn fake_tokens_for(adapter: &str, last: u32, n: u32) -> Vec<u32> {
    let offset = adapter_offset(adapter);
    let mut token = last;
    (0..n)
        .map(|_| {
            token = next_token(token, offset);
            token
        })
        .collect()
}

/// One sequence in a fake shard's batch.
#[derive(Debug, Clone)]
struct Seq {
    /// The prompt, and how many of its tokens have run (fewer while it is prefilling in chunks).
    prompt: Vec<u32>,
    ran: usize,
    prefill_logprobs: bool,
    prefill_top_n: u32,
    last: u32,
    blocks: Vec<u32>,
    top_n: u32,
    adapter: Option<AdapterKey>,
    offset: u32,
}

/// The adapter files all fake shards share (the real shards' host cache), with knobs to fail or hold
/// downloads.
#[derive(Debug, Default)]
pub struct FakeHub {
    state: Mutex<HubState>,
}

#[derive(Debug, Default)]
struct HubState {
    /// DownloadAdapter calls by adapter id (failed ones included).
    downloads: HashMap<String, usize>,
    /// Downloaded adapters.
    cached: HashSet<AdapterKey>,
    /// Download failures to inject, by id: code and message (`{token}` is replaced by the token sent).
    failures: HashMap<String, (Code, String)>,
    /// Held downloads, by id: they finish when the value turns true.
    gates: HashMap<String, watch::Sender<bool>>,
    /// api_token of each download, by id.
    tokens: HashMap<String, Vec<Option<String>>>,
    /// DownloadAdapter calls that reached a rank other than 0.
    misrouted: usize,
}

impl FakeHub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().expect("hub lock")
    }

    /// DownloadAdapter calls for `id` so far (started, finished or failed).
    pub fn downloads(&self, id: &str) -> usize {
        self.lock().downloads.get(id).copied().unwrap_or(0)
    }

    /// DownloadAdapter calls over all adapters.
    pub fn total_downloads(&self) -> usize {
        self.lock().downloads.values().sum()
    }

    /// DownloadAdapter calls that went to a rank other than 0.
    pub fn misrouted(&self) -> usize {
        self.lock().misrouted
    }

    /// The api_token of each download of `id`.
    pub fn tokens(&self, id: &str) -> Vec<Option<String>> {
        self.lock().tokens.get(id).cloned().unwrap_or_default()
    }

    /// Makes downloads of `id` fail with `code`; `{token}` in `message` becomes the token sent.
    pub fn fail(&self, id: &str, code: Code, message: &str) {
        self.lock().failures.insert(id.to_string(), (code, message.to_string()));
    }

    /// Lets downloads of `id` succeed again.
    pub fn clear_failure(&self, id: &str) {
        self.lock().failures.remove(id);
    }

    /// Holds downloads of `id` until [`Self::release`] (a slow hub).
    pub fn hold(&self, id: &str) {
        self.lock().gates.insert(id.to_string(), watch::channel(false).0);
    }

    /// Finishes the held downloads of `id`.
    pub fn release(&self, id: &str) {
        if let Some(gate) = self.lock().gates.remove(id) {
            gate.send_replace(true);
        }
    }

    async fn download(&self, rank: u32, request: DownloadAdapterRequest) -> Result<DownloadAdapterResponse, Status> {
        let id = request.adapter_id.clone();
        let gate = {
            let mut hub = self.lock();
            if rank != 0 {
                hub.misrouted += 1;
            }
            *hub.downloads.entry(id.clone()).or_default() += 1;
            hub.tokens
                .entry(id.clone())
                .or_default()
                .push(request.api_token.clone());
            hub.gates.get(&id).map(watch::Sender::subscribe)
        };
        if let Some(mut gate) = gate {
            // Err means the gate was dropped by `release`, which set it first.
            let _ = gate.wait_for(|open| *open).await;
        }
        let mut hub = self.lock();
        if let Some((code, message)) = hub.failures.get(&id) {
            let token = request.api_token.as_deref().unwrap_or("");
            return Err(Status::new(*code, message.replace("{token}", token)));
        }
        // Adapters whose id contains "templated" ship their own chat template; "badtemplate", one that does
        // not compile; "badconfig", a tokenizer_config.json that is not JSON.
        let tokenizer_config = if id.contains("templated") {
            Some(serde_json::json!({"chat_template": ADAPTER_CHAT_TEMPLATE, "bos_token": "<s>"}).to_string())
        } else if id.contains("badtemplate") {
            Some(serde_json::json!({"chat_template": "{% for m in messages %}{{ m['content'] }"}).to_string())
        } else if id.contains("badconfig") {
            Some("{\"chat_template\": ".to_string())
        } else {
            None
        };
        hub.cached.insert((request.adapter_source, id));
        Ok(DownloadAdapterResponse {
            size_bytes: 1024,
            warnings: vec![],
            rank: 8,
            tokenizer_config,
            ..Default::default()
        })
    }

    fn is_cached(&self, key: &AdapterKey) -> bool {
        self.lock().cached.contains(key)
    }
}

/// A fake streamed load's outcome: None while its weights are "read".
type StreamOutcome = Option<Result<(), String>>;

/// Observable state of one fake shard.
#[derive(Debug, Default)]
pub struct FakeState {
    batch: Mutex<BTreeMap<u64, Seq>>,
    /// A decode step run ahead of the router's next call (`DecodeRequest.run_ahead`), as the real shard
    /// does: the next Decode answers with it, a Prefill puts its tokens first, FilterBatch drops removed
    /// sequences' tokens from it. Locked after `batch`.
    ahead: Mutex<Option<Vec<Generation>>>,
    /// Decode steps run ahead so far.
    pub ahead_steps: AtomicUsize,
    /// Fail the next Prefill or Decode with "injected failure".
    pub fail_next: AtomicBool,
    /// Leave the first sequence out of the next Decode response (a misbehaving shard).
    pub drop_next_generation: AtomicBool,
    /// Answer Health with an error.
    pub unhealthy: AtomicBool,
    /// Prefill calls seen.
    pub prefills: AtomicUsize,
    /// Decode calls seen.
    pub decodes: AtomicUsize,
    /// Prefill calls that also decoded the running batch (mixed steps).
    pub mixed_steps: AtomicUsize,
    /// `max_prompt_tokens` of each mixed step, in call order.
    pub mixed_budgets: Mutex<Vec<u32>>,
    /// Requests ever prefilled.
    pub prefilled_requests: AtomicUsize,
    /// Most sequences ever in the batch at once.
    pub max_batch: AtomicUsize,
    /// Block-table errors detected (double allocation, too few blocks).
    pub block_errors: AtomicUsize,
    /// Adapters loaded on this rank.
    loaded: Mutex<HashSet<AdapterKey>>,
    /// Load failures to inject on this rank, by adapter id.
    load_failures: Mutex<HashMap<String, (Code, String)>>,
    /// Adapter ids ("" for the base model) of the requests of each Prefill call, in call order.
    prefill_adapters: Mutex<Vec<Vec<String>>>,
    /// Most adapters ever loaded at once.
    pub max_loaded: AtomicUsize,
    /// LoadAdapter calls that succeeded.
    pub loads: AtomicUsize,
    /// DownloadAdapter calls that also loaded the adapter.
    pub download_loads: AtomicUsize,
    /// Loads refused as out of device memory.
    pub memory_refusals: AtomicUsize,
    /// OffloadAdapter calls that succeeded.
    pub offloads: AtomicUsize,
    /// Adapter contract violations by the router (see the module docs).
    pub adapter_errors: AtomicUsize,
    /// Streamed loads (a download with `load` and `stream`, answered `streaming`) whose outcome LoadAdapter
    /// has not yet collected: None while their weights are "read". As the real shard: a Prefill that names
    /// one waits for its read and fails if it failed.
    streams: Mutex<HashMap<AdapterKey, watch::Sender<StreamOutcome>>>,
    /// Adapter ids whose streamed reads the test ends ([`FakeState::end_stream`]); others end at once.
    held_streams: Mutex<HashSet<String>>,
    /// Downloads answered `streaming`.
    pub streamed: AtomicUsize,
    /// Prefill calls that named an adapter whose streamed read had not ended.
    pub prefills_while_streaming: AtomicUsize,
    /// `stream` of each download with `load`, in call order.
    pub stream_asked: Mutex<Vec<bool>>,
}

impl FakeState {
    /// Ids of the sequences in the batch.
    pub fn live(&self) -> Vec<u64> {
        self.batch.lock().expect("lock").keys().copied().collect()
    }

    /// Ids of the sequences whose prompt has not fully run (chunked prefill).
    pub fn prefilling(&self) -> Vec<u64> {
        let batch = self.batch.lock().expect("lock");
        batch
            .iter()
            .filter(|(_, s)| s.ran < s.prompt.len())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Ids of the adapters loaded on this rank, sorted.
    pub fn loaded(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.loaded.lock().expect("lock").iter().map(|k| k.1.clone()).collect();
        ids.sort();
        ids
    }

    /// Adapter ids of each Prefill call's requests ("" for the base model).
    pub fn prefill_adapters(&self) -> Vec<Vec<String>> {
        self.prefill_adapters.lock().expect("lock").clone()
    }

    /// Holds the streamed reads of `id` until [`FakeState::end_stream`].
    pub fn hold_stream(&self, id: &str) {
        self.held_streams.lock().expect("lock").insert(id.to_string());
    }

    /// Ends the held streamed read of `id` with `outcome` (an error fails the Prefill that waits for it and
    /// LoadAdapter, and unloads the adapter); `false` if none was under way.
    pub fn end_stream(&self, id: &str, outcome: Result<(), String>) -> bool {
        self.held_streams.lock().expect("lock").remove(id);
        let streams = self.streams.lock().expect("lock");
        let Some((key, tx)) = streams.iter().find(|(k, _)| k.1 == id) else {
            return false;
        };
        if outcome.is_err() {
            self.loaded.lock().expect("lock").remove(key);
        }
        tx.send_replace(Some(outcome));
        true
    }

    /// Makes LoadAdapter of `id` fail on this rank.
    pub fn fail_load(&self, id: &str, code: Code, message: &str) {
        self.load_failures
            .lock()
            .expect("lock")
            .insert(id.to_string(), (code, message.to_string()));
    }

    fn violation(&self, status: Status) -> Status {
        self.adapter_errors.fetch_add(1, Ordering::SeqCst);
        status
    }
}

/// A fake shard.
#[derive(Clone)]
struct FakeShard {
    state: Arc<FakeState>,
    rank: u32,
    urls: Vec<String>,
    num_blocks: u32,
    step_delay: Duration,
    hub: Arc<FakeHub>,
    adapter_capacity: usize,
    /// Adapters the device memory holds: a load beyond it is refused as out of device memory
    /// (RESOURCE_EXHAUSTED, not a contract breach: the router cannot know the memory).
    memory_capacity: usize,
    supports_adapters: bool,
}

fn next_token(last: u32, offset: u32) -> u32 {
    (last + 1 + offset) % VOCAB
}

impl FakeShard {
    /// Loads `key` on this rank, with the real shard's refusals (counted as the router's mistakes).
    fn load_here(&self, key: (String, String)) -> Result<(), Status> {
        if let Some((code, message)) = self.state.load_failures.lock().expect("lock").get(&key.1) {
            return Err(Status::new(*code, message.clone()));
        }
        if !self.hub.is_cached(&key) {
            return Err(self.state.violation(Status::failed_precondition(format!(
                "adapter {} was not downloaded",
                key.1
            ))));
        }
        let mut loaded = self.state.loaded.lock().expect("lock");
        if loaded.contains(&key) {
            return Err(self.state.violation(Status::failed_precondition(format!(
                "adapter {} is already loaded",
                key.1
            ))));
        }
        if loaded.len() >= self.memory_capacity {
            self.state.memory_refusals.fetch_add(1, Ordering::SeqCst);
            return Err(Status::resource_exhausted(
                "out of device memory: CUDA allocating 1024 bytes",
            ));
        }
        if loaded.len() >= self.adapter_capacity {
            return Err(self
                .state
                .violation(Status::resource_exhausted("the adapter device tier is full")));
        }
        loaded.insert(key);
        self.state.max_loaded.fetch_max(loaded.len(), Ordering::SeqCst);
        Ok(())
    }

    fn generation(id: u64, seq: &Seq, prefill: Option<&[u32]>) -> Generation {
        let token = next_token(seq.last, seq.offset);
        // An adapter named "...overflow..." makes the model's logits NaN, as an adapter whose scale
        // overflows does: the samplers then give the chosen token a logprob of -inf (the engine's
        // `sampling::tests::non_finite_logits_give_the_chosen_token_minus_infinity`).
        let overflows = seq.adapter.as_ref().is_some_and(|a| a.1.contains("overflow"));
        Generation {
            request_id: id,
            token: Some(Token {
                id: token,
                logprob: if overflows { f32::NEG_INFINITY } else { -0.25 },
            }),
            top_tokens: (0..seq.top_n)
                .map(|i| Token {
                    id: next_token(seq.last, seq.offset + i),
                    logprob: -0.25 - i as f32,
                })
                .collect(),
            prefill_tokens: prefill
                .map(|ids| {
                    ids.iter()
                        .enumerate()
                        .map(|(i, &id)| Token {
                            id,
                            logprob: if i == 0 { f32::NAN } else { -1.0 },
                        })
                        .collect()
                })
                .unwrap_or_default(),
            // Alternatives of prompt token i > 0: the token itself first, then others less likely.
            prefill_top_tokens: prefill
                .filter(|_| seq.prefill_top_n > 0)
                .map(|ids| {
                    ids.iter()
                        .enumerate()
                        .map(|(i, &id)| TopTokens {
                            tokens: if i == 0 {
                                Vec::new()
                            } else {
                                (0..seq.prefill_top_n)
                                    .map(|k| Token {
                                        id: if k == 0 { id } else { next_token(id, k) },
                                        logprob: -1.0 - k as f32,
                                    })
                                    .collect()
                            },
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// One decode step of every sequence whose prompt has run (the first left out when
    /// `drop_next_generation` is set).
    fn step(&self, batch: &mut BTreeMap<u64, Seq>) -> Vec<Generation> {
        let mut generations = Vec::new();
        let mut drop_one = self.state.drop_next_generation.swap(false, Ordering::SeqCst);
        for (&id, seq) in batch.iter_mut().filter(|(_, s)| s.ran == s.prompt.len()) {
            if std::mem::take(&mut drop_one) {
                continue;
            }
            generations.push(Self::generation(id, seq, None));
            seq.last = next_token(seq.last, seq.offset);
        }
        generations
    }

    fn check_failure(&self) -> Result<(), Status> {
        if self.state.fail_next.swap(false, Ordering::SeqCst) {
            return Err(Status::internal(format!("injected failure on rank {}", self.rank)));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl ShardService for FakeShard {
    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(InfoResponse {
            model_id: "fake".into(),
            architecture: "llama".into(),
            vocab_size: VOCAB,
            max_position_embeddings: 4096,
            eos_token_ids: vec![EOS],
            bos_token_id: Some(1),
            device: "cpu (fake)".into(),
            dtype: "float32".into(),
            block_size: BLOCK_SIZE,
            num_blocks: self.num_blocks,
            rank: self.rank,
            world_size: self.urls.len() as u32,
            supports_adapters: self.supports_adapters,
        }))
    }

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        if self.state.unhealthy.load(Ordering::SeqCst) {
            return Err(Status::unavailable("fake shard is unhealthy"));
        }
        Ok(Response::new(HealthResponse {}))
    }

    async fn service_discovery(
        &self,
        _: Request<ServiceDiscoveryRequest>,
    ) -> Result<Response<ServiceDiscoveryResponse>, Status> {
        Ok(Response::new(ServiceDiscoveryResponse {
            urls: self.urls.clone(),
        }))
    }

    async fn clear_cache(&self, _: Request<ClearCacheRequest>) -> Result<Response<ClearCacheResponse>, Status> {
        self.state.batch.lock().expect("lock").clear();
        *self.state.ahead.lock().expect("lock") = None;
        Ok(Response::new(ClearCacheResponse {}))
    }

    async fn warmup(&self, request: Request<WarmupRequest>) -> Result<Response<WarmupResponse>, Status> {
        Ok(Response::new(WarmupResponse {
            prefill_tokens: request.into_inner().max_prefill_tokens,
        }))
    }

    async fn prefill(&self, request: Request<PrefillRequest>) -> Result<Response<PrefillResponse>, Status> {
        self.state.prefills.fetch_add(1, Ordering::SeqCst);
        self.check_failure()?;
        let PrefillRequest {
            requests,
            decode_running,
            max_prompt_tokens,
        } = request.into_inner();
        if decode_running {
            self.state.mixed_steps.fetch_add(1, Ordering::SeqCst);
            self.state.mixed_budgets.lock().expect("lock").push(max_prompt_tokens);
            // A mixed step is a forward pass over the running batch too.
            if !self.step_delay.is_zero() {
                tokio::time::sleep(self.step_delay).await;
            }
        }
        self.state
            .prefill_adapters
            .lock()
            .expect("lock")
            .push(requests.iter().map(|r| r.adapter_id.clone()).collect());
        // Streamed adapters still being read: the step waits for their reads (and fails with them). A step
        // that decodes running sequences must not wait for a disk.
        let reading: Vec<watch::Receiver<StreamOutcome>> = {
            let streams = self.state.streams.lock().expect("lock");
            requests
                .iter()
                .filter_map(|r| streams.get(&(r.adapter_source.clone(), r.adapter_id.clone())))
                .map(watch::Sender::subscribe)
                .filter(|rx| rx.borrow().is_none())
                .collect()
        };
        if !reading.is_empty() {
            self.state.prefills_while_streaming.fetch_add(1, Ordering::SeqCst);
            if decode_running && !self.state.batch.lock().expect("lock").is_empty() {
                return Err(self.state.violation(Status::failed_precondition(
                    "a step with running sequences names an adapter whose weights are still being read",
                )));
            }
            for mut rx in reading {
                let outcome = rx.wait_for(Option::is_some).await.map(|o| o.clone()).ok().flatten();
                if let Some(Err(message)) = outcome {
                    return Err(Status::internal(format!(
                        "a streamed adapter's weights did not all arrive: {message}"
                    )));
                }
            }
        }
        {
            let loaded = self.state.loaded.lock().expect("lock");
            for r in requests.iter().filter(|r| !r.adapter_id.is_empty()) {
                if !loaded.contains(&(r.adapter_source.clone(), r.adapter_id.clone())) {
                    return Err(self.state.violation(Status::failed_precondition(format!(
                        "adapter {} ({}) is not loaded",
                        r.adapter_id, r.adapter_source
                    ))));
                }
            }
        }
        let mut batch = self.state.batch.lock().expect("lock");
        let mut used: HashSet<u32> = batch.values().flat_map(|s| s.blocks.iter().copied()).collect();
        for r in requests {
            let needed = (r.input_ids.len() as u32 + 1).div_ceil(BLOCK_SIZE) as usize;
            if r.blocks.len() < needed
                || r.blocks.iter().any(|b| !used.insert(*b) || *b >= self.num_blocks)
                || batch.contains_key(&r.id)
            {
                self.state.block_errors.fetch_add(1, Ordering::SeqCst);
                return Err(Status::invalid_argument(format!(
                    "bad block table for request {}",
                    r.id
                )));
            }
            let seq = Seq {
                prompt: r.input_ids.clone(),
                ran: 0,
                prefill_logprobs: r.prefill_logprobs,
                prefill_top_n: r.prefill_top_n,
                last: *r.input_ids.last().expect("non-empty prompt"),
                blocks: r.blocks.clone(),
                top_n: r.top_n_tokens,
                adapter: (!r.adapter_id.is_empty()).then(|| (r.adapter_source.clone(), r.adapter_id.clone())),
                offset: adapter_offset(&r.adapter_id),
            };
            batch.insert(r.id, seq);
            self.state.prefilled_requests.fetch_add(1, Ordering::SeqCst);
        }
        self.state.max_batch.fetch_max(batch.len(), Ordering::SeqCst);
        // As the engine's step: in batch order, decode rows for the running sequences (when asked) and
        // the prompt budget to the prefilling ones, oldest first.
        let mut budget = if max_prompt_tokens == 0 {
            usize::MAX
        } else {
            max_prompt_tokens as usize
        };
        // A step run ahead comes first: its tokens precede this step's.
        let mut generations = self.state.ahead.lock().expect("lock").take().unwrap_or_default();
        let mut prefilling_ids = Vec::new();
        for (&id, seq) in batch.iter_mut() {
            if seq.ran < seq.prompt.len() {
                let n = (seq.prompt.len() - seq.ran).min(budget);
                budget -= n;
                seq.ran += n;
                if seq.ran < seq.prompt.len() {
                    prefilling_ids.push(id);
                    continue;
                }
                let prompt = seq.prefill_logprobs.then_some(seq.prompt.as_slice());
                generations.push(Self::generation(id, seq, prompt));
            } else if decode_running {
                generations.push(Self::generation(id, seq, None));
            } else {
                continue;
            }
            seq.last = next_token(seq.last, seq.offset);
        }
        Ok(Response::new(PrefillResponse {
            generations,
            forward_ns: 1000,
            prefilling_ids,
            handler_ns: 2000,
            received_unix_ns: 0,
        }))
    }

    async fn decode(&self, request: Request<DecodeRequest>) -> Result<Response<DecodeResponse>, Status> {
        let run_ahead = request.into_inner().run_ahead;
        self.state.decodes.fetch_add(1, Ordering::SeqCst);
        // Simulated forward-pass time (not synchronisation: tests never wait on it).
        if !self.step_delay.is_zero() {
            tokio::time::sleep(self.step_delay).await;
        }
        self.check_failure()?;
        let mut batch = self.state.batch.lock().expect("lock");
        let mut ahead = self.state.ahead.lock().expect("lock");
        // The step run ahead when there is one, else this one now; then the next one ahead if asked.
        let generations = match ahead.take() {
            Some(g) => g,
            None => self.step(&mut batch),
        };
        if run_ahead && batch.values().any(|s| s.ran == s.prompt.len()) {
            *ahead = Some(self.step(&mut batch));
            self.state.ahead_steps.fetch_add(1, Ordering::SeqCst);
        }
        Ok(Response::new(DecodeResponse {
            generations,
            forward_ns: 1000,
            handler_ns: 2000,
            received_unix_ns: 0,
        }))
    }

    async fn filter_batch(
        &self,
        request: Request<FilterBatchRequest>,
    ) -> Result<Response<FilterBatchResponse>, Status> {
        let keep: HashSet<u64> = request.into_inner().keep_ids.into_iter().collect();
        let mut batch = self.state.batch.lock().expect("lock");
        batch.retain(|id, _| keep.contains(id));
        if let Some(g) = self.state.ahead.lock().expect("lock").as_mut() {
            g.retain(|g| keep.contains(&g.request_id));
        }
        Ok(Response::new(FilterBatchResponse {
            remaining: batch.len() as u32,
        }))
    }

    async fn download_adapter(
        &self,
        request: Request<DownloadAdapterRequest>,
    ) -> Result<Response<DownloadAdapterResponse>, Status> {
        let request = request.into_inner();
        let (load, stream, key) = (
            request.load,
            request.stream,
            (request.adapter_source.clone(), request.adapter_id.clone()),
        );
        let mut response = self.hub.download(self.rank, request).await?;
        if load {
            if self.urls.len() > 1 {
                // Only rank 0 downloads: the other ranks would not load it.
                return Err(self
                    .state
                    .violation(Status::invalid_argument("a download with load on more than one shard")));
            }
            self.state.stream_asked.lock().expect("lock").push(stream);
            match self.load_here(key.clone()) {
                Ok(()) if stream => {
                    response.loaded = true;
                    response.streaming = true;
                    response.device_bytes = 4096;
                    self.state.download_loads.fetch_add(1, Ordering::SeqCst);
                    self.state.streamed.fetch_add(1, Ordering::SeqCst);
                    let held = self.state.held_streams.lock().expect("lock").contains(&key.1);
                    let (tx, _) = watch::channel((!held).then_some(Ok(())));
                    self.state.streams.lock().expect("lock").insert(key, tx);
                }
                Ok(()) => {
                    response.loaded = true;
                    response.device_bytes = 4096;
                    self.state.download_loads.fetch_add(1, Ordering::SeqCst);
                }
                // No slot free: downloaded only, as the real shard answers (but the router held a slot
                // for it, so this is the router's mistake).
                // Out of device memory: downloaded only, and said so (as the real shard answers).
                Err(status)
                    if status.code() == Code::ResourceExhausted
                        && status.message().starts_with("out of device memory") =>
                {
                    response.load_refused = true;
                }
                Err(status) if status.code() == Code::ResourceExhausted => {}
                Err(status) => return Err(status),
            }
        }
        Ok(Response::new(response))
    }

    async fn load_adapter(
        &self,
        request: Request<LoadAdapterRequest>,
    ) -> Result<Response<LoadAdapterResponse>, Status> {
        let r = request.into_inner();
        let key = (r.adapter_source, r.adapter_id);
        let stream = self
            .state
            .streams
            .lock()
            .expect("lock")
            .get(&key)
            .map(watch::Sender::subscribe);
        if let Some(mut done) = stream {
            // A streamed load: answer when its read ends.
            let outcome = done.wait_for(Option::is_some).await.map(|o| o.clone()).ok().flatten();
            self.state.streams.lock().expect("lock").remove(&key);
            return match outcome {
                Some(Err(message)) => Err(Status::invalid_argument(message)),
                _ => Ok(Response::new(LoadAdapterResponse { device_bytes: 0 })),
            };
        }
        self.load_here(key)?;
        self.state.loads.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(LoadAdapterResponse { device_bytes: 4096 }))
    }

    async fn offload_adapter(
        &self,
        request: Request<OffloadAdapterRequest>,
    ) -> Result<Response<OffloadAdapterResponse>, Status> {
        let r = request.into_inner();
        let key = (r.adapter_source, r.adapter_id);
        let batch = self.state.batch.lock().expect("lock");
        if batch.values().any(|s| s.adapter.as_ref() == Some(&key)) {
            return Err(self.state.violation(Status::failed_precondition(format!(
                "adapter {} is used by a running sequence",
                key.1
            ))));
        }
        if !self.state.loaded.lock().expect("lock").remove(&key) {
            return Err(self
                .state
                .violation(Status::failed_precondition(format!("adapter {} is not loaded", key.1))));
        }
        self.state.offloads.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(OffloadAdapterResponse {}))
    }
}

/// Settings of a test deployment.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Number of fake shards.
    pub shards: u32,
    /// KV blocks per shard.
    pub num_blocks: u32,
    /// Simulated time of a decode step.
    pub step_delay: Duration,
    /// Extra router flags.
    pub flags: Vec<String>,
    /// The adapter files every shard shares.
    pub hub: Arc<FakeHub>,
    /// Most adapters each shard can hold loaded.
    pub adapter_capacity: usize,
    /// Adapters each shard's device memory holds (loads beyond: out of device memory).
    pub memory_capacity: usize,
    /// What the shards' Info says about adapters.
    pub supports_adapters: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            shards: 2,
            num_blocks: 1024,
            step_delay: Duration::ZERO,
            flags: Vec::new(),
            hub: Arc::default(),
            adapter_capacity: 1000,
            memory_capacity: usize::MAX,
            supports_adapters: true,
        }
    }
}

/// A running router in front of fake shards.
pub struct Deployment {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// `http://127.0.0.1:PORT` of the public gRPC API.
    pub grpc: String,
    /// HTTP client.
    pub http: reqwest::Client,
    /// The fakes' states, rank order.
    pub shards: Vec<Arc<FakeState>>,
    /// The fakes' shared adapter files.
    pub hub: Arc<FakeHub>,
    _dir: tempfile::TempDir,
}

/// Path of the fixture tokenizer directory.
pub fn tokenizer_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/tokenizer"))
}

impl Deployment {
    /// Starts `setup.shards` fake shards and the router.
    pub async fn start(setup: Setup) -> Self {
        match Self::try_start(setup).await {
            Ok(deployment) => deployment,
            Err(e) => panic!("router did not start: {e}"),
        }
    }

    /// Starts `setup.shards` fake shards and the router; the router's start-up error if it fails.
    pub async fn try_start(setup: Setup) -> Result<Self, lorax_router::RouterError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths: Vec<PathBuf> = (0..setup.shards)
            .map(|r| dir.path().join(format!("shard-{r}")))
            .collect();
        let urls: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        let mut shards = Vec::new();
        for (rank, path) in paths.iter().enumerate() {
            let state = Arc::new(FakeState::default());
            let fake = FakeShard {
                state: Arc::clone(&state),
                rank: rank as u32,
                urls: urls.clone(),
                num_blocks: setup.num_blocks,
                step_delay: setup.step_delay,
                hub: Arc::clone(&setup.hub),
                adapter_capacity: setup.adapter_capacity,
                memory_capacity: setup.memory_capacity,
                supports_adapters: setup.supports_adapters,
            };
            let listener = UnixListener::bind(path).expect("bind fake shard socket");
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(ShardServiceServer::new(fake))
                    .serve_with_incoming(UnixListenerStream::new(listener)),
            );
            shards.push(state);
        }

        let mut argv: Vec<String> = vec![
            "lorax-router".into(),
            "--master-shard-uds-path".into(),
            urls[0].clone(),
            "--tokenizer-path".into(),
            tokenizer_dir().display().to_string(),
            "--model-id".into(),
            "fake/model".into(),
        ];
        argv.extend(setup.flags.iter().cloned());
        let args = lorax_router::Args::try_parse_from(argv).expect("router flags");
        let app = lorax_router::build(&args).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app.http).await });
        let grpc_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let grpc = format!("http://{}", grpc_listener.local_addr().expect("addr"));
        tokio::spawn(lorax_router::grpc::serve(
            app.grpc,
            grpc_listener,
            std::future::pending(),
        ));
        Ok(Self {
            base,
            grpc,
            http: reqwest::Client::new(),
            shards,
            hub: setup.hub,
            _dir: dir,
        })
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .expect("request sent")
    }

    /// `POST path` with a JSON body, answered 200 with a JSON body: that body.
    pub async fn post_ok(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        let response = self.post(path, body).await;
        assert_eq!(response.status(), 200, "{path}");
        response.json().await.expect("JSON body")
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("request sent")
    }

    /// `/generate` of "Hello" with details for `adapter` ("" = the base model): the status and the JSON
    /// body.
    pub async fn generate_with(&self, adapter: &str, max_new_tokens: u32) -> (u16, serde_json::Value) {
        self.spawn_generate(adapter, max_new_tokens)
            .await
            .expect("request task")
    }

    /// [`Self::generate_with`] in a spawned task, so the test can go on while it waits.
    pub fn spawn_generate(
        &self,
        adapter: &str,
        max_new_tokens: u32,
    ) -> tokio::task::JoinHandle<(u16, serde_json::Value)> {
        let http = self.http.clone();
        let url = format!("{}/generate", self.base);
        let body = serde_json::json!({"inputs": "Hello", "parameters": {
            "adapter_id": adapter, "max_new_tokens": max_new_tokens, "details": true
        }});
        tokio::spawn(async move {
            let response = http.post(url).json(&body).send().await.expect("request sent");
            let status = response.status().as_u16();
            (status, response.json().await.expect("JSON body"))
        })
    }

    /// Fails the test if any shard saw an adapter contract violation or a bad block table, or a
    /// download went to a rank other than 0.
    pub fn assert_no_violations(&self) {
        for (rank, shard) in self.shards.iter().enumerate() {
            assert_eq!(
                shard.adapter_errors.load(Ordering::SeqCst),
                0,
                "adapter violations on rank {rank}"
            );
            assert_eq!(
                shard.block_errors.load(Ordering::SeqCst),
                0,
                "block errors on rank {rank}"
            );
        }
        assert_eq!(self.hub.misrouted(), 0, "downloads sent to ranks other than 0");
    }

    /// The value of an unlabelled metric in /metrics, if present.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = self.get("/metrics").await.text().await.expect("metrics body");
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }
}

/// The status and JSON body of an error answer.
pub async fn error_of(response: reqwest::Response) -> (u16, serde_json::Value) {
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON error body"))
}

/// Fails the test unless `body` is a generation of `n` tokens by `adapter` ("" = base) after "Hello".
pub fn assert_generated_by(body: &serde_json::Value, adapter: &str, n: u32) {
    let ids: Vec<u32> = body["details"]["tokens"]
        .as_array()
        .unwrap_or_else(|| panic!("no tokens in {body}"))
        .iter()
        .map(|t| t["id"].as_u64().expect("token id") as u32)
        .collect();
    assert_eq!(
        ids,
        fake_tokens_for(adapter, HELLO_LAST, n),
        "tokens of {adapter:?}: {body}"
    );
    let expected = if adapter.is_empty() {
        serde_json::Value::Null
    } else {
        adapter.into()
    };
    assert_eq!(body["details"]["adapter_id"], expected, "{body}");
}

/// Tokens of `prompt` as the router counts them (`/tokenize`).
pub async fn tokens(d: &Deployment, prompt: &str) -> usize {
    let tokenized: serde_json::Value = d
        .post("/tokenize", serde_json::json!({"inputs": prompt}))
        .await
        .json()
        .await
        .expect("json");
    tokenized.as_array().expect("tokens").len()
}

/// Polls `check` until it returns true, failing after `deadline`.
pub async fn eventually<F, Fut>(what: &str, deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if check().await {
            return;
        }
        assert!(tokio::time::Instant::now() < until, "timed out waiting for: {what}");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads server-sent events from a streaming response.
pub struct SseReader {
    stream: futures::stream::BoxStream<'static, reqwest::Result<axum::body::Bytes>>,
    buffer: Vec<u8>,
}

impl SseReader {
    /// Wraps a 200 SSE response.
    pub fn new(response: reqwest::Response) -> Self {
        Self {
            stream: response.bytes_stream().boxed(),
            buffer: Vec::new(),
        }
    }

    /// The next `data:` payload as JSON; `None` at the end of the stream.
    pub async fn next(&mut self) -> Option<serde_json::Value> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let event = String::from_utf8(event).expect("utf-8 event");
                let data: String = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim_start)
                    .collect();
                if data.is_empty() {
                    continue; // keep-alive comment
                }
                if data == "[DONE]" {
                    // OpenAI streams end with this non-JSON marker.
                    return Some(serde_json::Value::String(data));
                }
                return Some(serde_json::from_str(&data).expect("event is JSON"));
            }
            let chunk = self.stream.next().await?.expect("stream chunk");
            self.buffer.extend_from_slice(&chunk);
        }
    }

    /// Every remaining event.
    pub async fn collect(mut self) -> Vec<serde_json::Value> {
        let mut events = Vec::new();
        while let Some(e) = self.next().await {
            events.push(e);
        }
        events
    }
}
