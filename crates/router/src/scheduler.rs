//! The batching task: the single owner of the queues, the adapters' states, the running batch and the
//! KV block allocator.
//!
//! Each turn it takes new requests from the [`crate::infer::Infer`] channel and adapter results from
//! the adapter tasks, starts the adapter downloads, loads and offloads they call for (in spawned tasks,
//! see [`crate::adapters`]), admits waiting requests of the base model and of active adapters when the
//! policy allows (the shard appends them to its running batch), and runs one step. With mixed steps (the
//! default) that is one Prefill call that decodes the running requests and runs up to
//! `--max-batch-prefill-chunk-tokens` prompt tokens of the requests still prefilling (chunked prefill; a
//! request gets nothing until its whole prompt has run; with nothing decoding, prompts run whole), or a plain
//! Decode when no prompt is left to run.
//! Without them (TGI's scheduling) a Prefill of whole prompts when the ratio rule allows, then a Decode.
//! After every step it turns tokens into text, checks stopping, answers each request's stream, and
//! removes finished and cancelled requests (prefilling ones too) with FilterBatch, which drops their
//! block allocations and adapter leases. A shard failure fails every request of the batch (424), clears
//! the shards' cache (adapters stay loaded) and the task carries on with new requests.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use lorax_proto::shard::v1::{Generation, Request, Token};
use tokio::sync::mpsc;

use crate::adapters::catalog::AdapterCatalog;
use crate::adapters::registry::{AdapterLease, Registry, State};
use crate::adapters::tasks::{self, log_download, AdapterEvent, AdapterTasks};
use crate::adapters::{metric_label, AdapterError, AdapterFailure, AdapterKey};
use crate::blocks::{BlockAllocation, BlockAllocator};
use crate::client::{ClientError, ShardClients};
use crate::detokenize::{IncrementalDecoder, TokenDecoder};
use crate::infer::{Entry, GeneratedText, InferError, InferStreamResponse, TokenInfo};
use crate::metrics as m;
use crate::policy::{BatchingPolicy, Candidate};
use crate::stopping::{FinishReason, StoppingCriteria};

/// When a shard call began, on the monotonic clock and on the Unix clock the shard's timestamps use.
#[derive(Clone, Copy)]
struct Started {
    at: Instant,
    unix_ns: u64,
}

impl Started {
    fn now() -> Self {
        Self {
            at: Instant::now(),
            unix_ns: lorax_proto::shard::v1::unix_time_ns(),
        }
    }
}

/// The shard's own account of a call (rank 0's under tensor parallelism).
#[derive(Clone, Copy)]
struct ShardTiming {
    /// The engine step, seconds.
    forward_s: f64,
    /// The handler from its first line to its answer, seconds.
    handler_s: f64,
    /// When the handler began, nanoseconds since the Unix epoch (0: not sent).
    received_unix_ns: u64,
}

impl ShardTiming {
    #[allow(clippy::cast_precision_loss)]
    fn of(forward_ns: u64, handler_ns: u64, received_unix_ns: u64) -> Self {
        Self {
            forward_s: forward_ns as f64 * 1e-9,
            handler_s: handler_ns as f64 * 1e-9,
            received_unix_ns,
        }
    }
}

/// A successful step call: its generations, the requests that must get a token, the shard's timing.
struct Reply {
    generations: Vec<Generation>,
    expected: Vec<u64>,
    timing: ShardTiming,
}

/// A request in the running batch.
struct Running {
    entry: Entry,
    /// Returned to the allocator when this entry is dropped.
    _blocks: BlockAllocation,
    /// Keeps the adapter loaded while the request runs; released when this entry is dropped.
    _adapter: Option<AdapterLease>,
    /// `lorax_adapter_generated_tokens` of the request's adapter.
    tokens_counter: metrics::Counter,
    decoder: IncrementalDecoder,
    stopping: StoppingCriteria,
    start: Instant,
    /// No token yet: the prompt (or part of it, chunked) is still to run.
    prefilling: bool,
}

/// What the batching task is configured with.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Batching rules.
    pub policy: BatchingPolicy,
    /// End-of-sequence tokens of the model.
    pub eos_token_ids: Vec<u32>,
    /// KV blocks the router may grant.
    pub total_blocks: u32,
    /// Most adapters loading, loaded or offloading at once (`--max-active-adapters`).
    pub max_active_adapters: usize,
    /// `--adapter-cycle-time-s`.
    pub adapter_cycle_time: Duration,
    /// Adapters already loaded on every shard (`--preloaded-adapter-ids`), with their bytes.
    pub preloaded_adapters: Vec<(AdapterKey, u64)>,
    /// Where the known adapters are published for readers (`/v1/models`, gRPC `ListAdapters`).
    pub catalog: AdapterCatalog,
}

/// The batching task's state.
pub struct Scheduler {
    clients: ShardClients,
    decoder: TokenDecoder,
    policy: BatchingPolicy,
    eos_token_ids: Vec<u32>,
    entries: mpsc::UnboundedReceiver<Entry>,
    /// False once every [`crate::infer::Infer`] handle is gone.
    entries_open: bool,
    queues: Registry<Entry>,
    catalog: AdapterCatalog,
    adapter_tasks: AdapterTasks,
    adapter_events: mpsc::UnboundedReceiver<AdapterEvent>,
    running: BTreeMap<u64, Running>,
    allocator: BlockAllocator,
    next_id: u64,
    steps_since_prefill: u32,
    /// Whether decode calls ask the shards to run the next step ahead (`LORAX_RUN_AHEAD=0`: never; for
    /// measuring what it gains).
    run_ahead: bool,
    /// The last call was a Decode that asked the shards to run the next step ahead: they hold (or are
    /// computing) a step whose tokens this task has not seen.
    ahead: bool,
    /// Slow handlings of a step's results logged in the current second.
    slow_log: LogBudget,
    /// Adapters whose streamed load's read has not ended (its `Streamed` event has not come).
    streaming: std::collections::HashSet<AdapterKey>,
}

/// A step's results handled in at least this long, and in over half the shard call's time (while the shard
/// runs the next step ahead, shorter handling costs nothing), are logged ("slow step handling").
const SLOW_HANDLING: Duration = Duration::from_millis(3);

/// At most `PER_SECOND` log lines a second; the others are counted into the next line allowed.
#[derive(Default)]
struct LogBudget {
    window: Option<Instant>,
    used: u32,
    dropped: u64,
}

impl LogBudget {
    const PER_SECOND: u32 = 10;

    /// `Some(lines dropped since the last allowed)` when a line may be logged at `now`.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        if self
            .window
            .is_none_or(|w| now.duration_since(w) >= Duration::from_secs(1))
        {
            self.window = Some(now);
            self.used = 0;
        }
        if self.used >= Self::PER_SECOND {
            self.dropped += 1;
            return None;
        }
        self.used += 1;
        Some(std::mem::take(&mut self.dropped))
    }
}

/// What handling a step's results did: requests retired, and the FilterBatch call's time (zero when none
/// was made).
struct Handled {
    retired: usize,
    filter: Duration,
    /// What the handling's synchronous part (everything before the filter call) took of this thread's
    /// CPU, and how often the kernel took the CPU from it meanwhile (`None` where unknown): a slow
    /// handling with little CPU time and some involuntary switches waited for a core, one whose CPU time
    /// is most of it did the work. Two `getrusage` calls a step: 0.33 us each on the development machine.
    cpu: Option<(Duration, std::os::raw::c_long)>,
}

/// This thread's CPU time (user and system) and its involuntary context switches so far (Linux's
/// `getrusage(RUSAGE_THREAD)`); `None` elsewhere or on failure.
fn thread_usage() -> Option<(Duration, std::os::raw::c_long)> {
    #[cfg(target_os = "linux")]
    {
        use nix::sys::resource::{getrusage, UsageWho};
        use nix::sys::time::TimeValLike;
        let u = getrusage(UsageWho::RUSAGE_THREAD).ok()?;
        let us = u.user_time().num_microseconds() + u.system_time().num_microseconds();
        Some((
            Duration::from_micros(u64::try_from(us).ok()?),
            u.involuntary_context_switches(),
        ))
    }
    #[cfg(not(target_os = "linux"))]
    None
}

impl Scheduler {
    /// A scheduler fed by `entries`.
    pub fn new(
        clients: ShardClients,
        decoder: TokenDecoder,
        config: SchedulerConfig,
        entries: mpsc::UnboundedReceiver<Entry>,
    ) -> Self {
        let (adapter_tasks, adapter_events) = AdapterTasks::new(clients.clone());
        let mut queues = Registry::new(config.max_active_adapters, config.adapter_cycle_time);
        let now = Instant::now();
        for (adapter, bytes) in config.preloaded_adapters {
            queues.insert_active(adapter, bytes, now);
        }
        Self {
            clients,
            decoder,
            policy: config.policy,
            eos_token_ids: config.eos_token_ids,
            entries,
            entries_open: true,
            queues,
            catalog: config.catalog,
            adapter_tasks,
            adapter_events,
            running: BTreeMap::new(),
            allocator: BlockAllocator::new(config.total_blocks),
            next_id: 0,
            steps_since_prefill: 0,
            run_ahead: std::env::var("LORAX_RUN_AHEAD").map_or(true, |v| v != "0"),
            ahead: false,
            slow_log: LogBudget::default(),
            streaming: std::collections::HashSet::new(),
        }
    }

    /// Serves until every [`crate::infer::Infer`] handle is dropped and all work is done.
    pub async fn run(mut self) {
        while self.receive().await {
            if self.policy.mixed() {
                self.mixed_step().await;
            } else {
                self.prefill().await;
                if !self.running.is_empty() {
                    self.decode().await;
                }
            }
            self.publish();
        }
        tracing::info!("batching task stopped");
    }

    /// Takes in new requests and adapter results, drops queued requests whose client is gone and
    /// starts the adapter calls the queues call for. Waits (on both channels) while nothing can be
    /// prefilled or decoded; `false` once no more requests can arrive and none is left.
    async fn receive(&mut self) -> bool {
        loop {
            loop {
                match self.entries.try_recv() {
                    Ok(entry) => self.enqueue(entry),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        self.entries_open = false;
                        break;
                    }
                }
            }
            while let Ok(event) = self.adapter_events.try_recv() {
                self.on_adapter_event(event);
            }
            self.queues.retain(|e| !e.response_tx.is_closed());
            for action in self.queues.plan(Instant::now()) {
                self.adapter_tasks.start(action);
            }
            if !self.running.is_empty() || self.queues.has_prefill_candidates() {
                return true;
            }
            if !self.entries_open && self.queues.queued() == 0 {
                return false;
            }
            self.publish();
            tokio::select! {
                entry = self.entries.recv(), if self.entries_open => match entry {
                    Some(entry) => self.enqueue(entry),
                    None => self.entries_open = false,
                },
                Some(event) = self.adapter_events.recv() => self.on_adapter_event(event),
                else => return false,
            }
        }
    }

    /// Queues a new request; the first request for an unknown adapter starts its download.
    fn enqueue(&mut self, mut entry: Entry) {
        let adapter = entry.request.adapter.clone();
        if adapter.as_ref().is_none_or(|a| self.queues.checked(a)) {
            entry.ready();
        }
        let api_token = entry.request.api_token.clone();
        if self.queues.push(adapter.as_ref(), entry, Instant::now()) {
            if let Some(adapter) = adapter {
                // With one shard and a slot free, the download loads it too: one call, and the upload
                // runs beside the read of its files. When no stream is decoding, the load streams: its
                // prompt's pass then runs beside the read of the weights, layer by layer (the shard
                // answers once the header is checked), and no stream's tokens wait for the disk.
                let load = self.clients.len() == 1 && self.queues.claim_for_download(&adapter, Instant::now());
                let stream = load && self.running.is_empty();
                tracing::info!(adapter = %adapter, load, stream, "downloading adapter");
                self.adapter_tasks.download(adapter, api_token, load, stream);
            }
        }
    }

    /// Applies the result of an adapter call to the adapter's state; a failure fails (only) the
    /// requests waiting for that adapter.
    fn on_adapter_event(&mut self, event: AdapterEvent) {
        match event {
            AdapterEvent::Downloaded { adapter, response } => {
                log_download(&adapter, &response);
                let bytes = tasks::device_bytes(&response);
                self.queues.set_bytes(&adapter, bytes);
                let now = Instant::now();
                let too_big = self.queues.never_fits(bytes, now).filter(|_| !response.loaded);
                let out_of_memory = |why: String| AdapterError {
                    kind: AdapterFailure::Unavailable,
                    adapter: adapter.clone(),
                    stage: "loaded",
                    message: format!("out of device memory: {why}"),
                    no_room: false,
                };
                if let Some(limit) = too_big {
                    // It would clear the device of every other adapter and still not fit.
                    self.fail_adapter(&out_of_memory(format!(
                        "it takes {bytes} bytes, and an adapter of {limit} bytes found no room on a device with no \
                         other adapter loaded"
                    )));
                } else if response.loaded && response.streaming {
                    self.on_streaming(&adapter);
                } else if response.loaded {
                    self.on_loaded(&adapter);
                } else if !response.load_refused {
                    self.on_checked(&adapter);
                    self.queues.downloaded(&adapter);
                } else if self.queues.load_refused(&adapter, now) {
                    self.on_checked(&adapter);
                    self.on_no_room(&adapter, "out of device memory");
                } else {
                    self.fail_adapter(&out_of_memory(format!(
                        "it takes {bytes} bytes, and found no room on a device with no other adapter loaded"
                    )));
                }
            }
            AdapterEvent::Loaded { adapter } => self.on_loaded(&adapter),
            AdapterEvent::Streamed { adapter, result } => {
                self.streaming.remove(&adapter);
                self.on_streamed(&adapter, result);
            }
            // Its requests waited for the read (streams were decoding when its download answered).
            AdapterEvent::Offloaded { adapter, error } => {
                match error {
                    None => tracing::info!(adapter = %adapter, "adapter offloaded"),
                    Some(e) => tracing::error!(adapter = %adapter, "offloading failed, counted as offloaded: {e}"),
                }
                self.queues.offloaded(&adapter);
            }
            AdapterEvent::Failed(error)
                if error.no_room && self.queues.load_refused(&error.adapter, Instant::now()) =>
            {
                self.on_no_room(&error.adapter, &error.message);
            }
            AdapterEvent::Failed(error) => self.fail_adapter(&error),
        }
    }

    /// The adapter's download (or a load) succeeded: the streams waiting for it may send their headers,
    /// and later requests for it need not wait ([`Scheduler::enqueue`]).
    fn on_checked(&mut self, adapter: &AdapterKey) {
        for entry in self.queues.mark_checked(adapter) {
            entry.ready();
        }
    }

    /// Fails the requests waiting for an adapter and forgets it (the next request downloads it again).
    fn fail_adapter(&mut self, error: &AdapterError) {
        let (_, error_type) = crate::errors::adapter_status(error.kind);
        metrics::counter!(m::ADAPTER_LOAD_FAILURES, "err" => error_type).increment(1);
        let waiting = self.queues.fail(&error.adapter);
        tracing::warn!(requests = waiting.len(), "{error}");
        for entry in waiting {
            let _ = entry.response_tx.send(Err(InferError::Adapter(error.clone())));
        }
    }

    /// A load refused for want of device memory: its requests wait while idle adapters are offloaded to
    /// make room (Registry::plan).
    fn on_no_room(&self, adapter: &AdapterKey, why: &str) {
        tracing::warn!(
            adapter = %adapter,
            "the device has no room for the adapter; it waits for other adapters to be offloaded: {why}"
        );
        metrics::counter!(m::ADAPTER_LOAD_FAILURES, "err" => "no_room").increment(1);
    }

    /// The adapter is on the (one) shard, its weights still being read (a streamed download): its requests
    /// may run now if no stream is decoding (their steps wait on the shard for the weights, layer by
    /// layer); else they wait for the read's end, so that no decoding stream's step waits for the disk.
    fn on_streaming(&mut self, adapter: &AdapterKey) {
        self.adapter_tasks.await_stream(adapter.clone());
        self.streaming.insert(adapter.clone());
        if self.running.is_empty() {
            self.on_loaded(adapter);
        } else {
            self.on_checked(adapter);
        }
    }

    /// A streamed load's read ended: its requests run now if they waited for it; a failed read (the shard
    /// unloaded the adapter, and the step that used it failed) fails its queue and forgets it.
    fn on_streamed(&mut self, adapter: &AdapterKey, result: Result<(), AdapterError>) {
        match result {
            Ok(()) if self.queues.state(adapter) == Some(State::Loading) => self.on_loaded(adapter),
            Ok(()) => tracing::info!(adapter = %adapter, "the streamed adapter's weights have all arrived"),
            Err(error) => self.fail_adapter(&error),
        }
    }

    /// The adapter is on every shard (by its LoadAdapter, or by its download).
    fn on_loaded(&mut self, adapter: &AdapterKey) {
        self.on_checked(adapter);
        if let Some(took) = self.queues.loaded(adapter, Instant::now()) {
            metrics::histogram!(m::ADAPTER_LOAD_DURATION).record(took.as_secs_f64());
            tracing::info!(adapter = %adapter, seconds = took.as_secs_f64(), "adapter loaded");
        }
    }

    fn publish(&mut self) {
        self.allocator.reclaim();
        metrics::gauge!(m::QUEUE_SIZE).set(self.queues.queued() as f64);
        metrics::gauge!(m::ACTIVE_ADAPTERS).set(self.queues.active() as f64);
        self.catalog.refresh(self.queues.list());
        metrics::gauge!(m::BATCH_CURRENT_SIZE).set(self.running.len() as f64);
        let reserved: u64 = self
            .running
            .values()
            .map(|r| u64::from(r.entry.request.max_total_tokens()))
            .sum();
        metrics::gauge!(m::BATCH_CURRENT_MAX_TOKENS).set(reserved as f64);
    }

    /// Prefills as many queued requests (base model and active adapters, oldest first) as the policy
    /// admits.
    async fn prefill(&mut self) {
        let admit = self.admit_ahead().await;
        let now = Instant::now();
        if admit == 0 {
            if self.running.is_empty() {
                self.refuse_unfittable(now);
            }
            return;
        }

        let requests = self.admit(admit, now);
        if requests.is_empty() {
            return;
        }
        tracing::debug!(new = requests.len(), running = self.running.len(), "prefill");
        self.publish();
        metrics::counter!(m::BATCH_INFERENCE_COUNT, "method" => "prefill").increment(1);
        metrics::histogram!(m::BATCH_NEXT_SIZE).record(requests.len() as f64);
        let started = Started::now();
        let expected: Vec<u64> = requests.iter().map(|r| r.id).collect();
        self.ahead = false;
        let result = self.clients.prefill(requests).await;
        let result = result.map(|r| Reply {
            timing: ShardTiming::of(r.forward_ns, r.handler_ns, r.received_unix_ns),
            generations: r.generations,
            expected,
        });
        if self.conclude("prefill", started, result).await {
            self.steps_since_prefill = 0;
        }
    }

    /// Ends a step whose shard call began at `started`: records the call's, the shard's (engine and
    /// handler, as the shard reports them) and the step's durations and hands the generations out, or fails
    /// every request when the call failed. `true` when the call succeeded.
    async fn conclude(&mut self, method: &'static str, started: Started, result: Result<Reply, ClientError>) -> bool {
        match result {
            Ok(reply) => {
                let call = started.at.elapsed().as_secs_f64();
                metrics::histogram!(m::BATCH_FORWARD_DURATION, "method" => method).record(call);
                let t = reply.timing;
                metrics::histogram!(m::BATCH_SHARD_DURATION, "method" => method).record(t.forward_s);
                metrics::histogram!(m::BATCH_SHARD_HANDLER_DURATION, "method" => method).record(t.handler_s);
                // The request's way there from the two hosts' clocks (one host: the same clock); the way back
                // is what remains of the call. Skipped when the shard sent no clock or the clocks disagree.
                if let Some(there) = t
                    .received_unix_ns
                    .checked_sub(started.unix_ns)
                    .filter(|_| t.received_unix_ns > 0)
                {
                    #[allow(clippy::cast_precision_loss)]
                    let there = there as f64 * 1e-9;
                    if there + t.handler_s <= call {
                        metrics::histogram!(m::BATCH_SHARD_SEND_DURATION, "method" => method).record(there);
                        metrics::histogram!(m::BATCH_SHARD_RETURN_DURATION, "method" => method)
                            .record(call - there - t.handler_s);
                    }
                }
                let (handling, tokens) = (Instant::now(), reply.generations.len());
                let handled = self.handle(reply.generations, &reply.expected).await;
                let took = handling.elapsed();
                if took >= SLOW_HANDLING && took.as_secs_f64() > call / 2.0 {
                    if let Some(dropped) = self.slow_log.allow(Instant::now()) {
                        tracing::info!(
                            method,
                            ms = format!("{:.1}", took.as_secs_f64() * 1e3),
                            tokens,
                            retired = handled.retired,
                            filter_ms = format!("{:.1}", handled.filter.as_secs_f64() * 1e3),
                            cpu_ms = handled.cpu.map(|(c, _)| format!("{:.1}", c.as_secs_f64() * 1e3)),
                            involuntary_switches = handled.cpu.map(|(_, n)| n),
                            running = self.running.len(),
                            unlogged_before = dropped,
                            "slow step handling (tokens to their streams, retirements, the filter call)"
                        );
                    }
                }
                metrics::histogram!(m::BATCH_INFERENCE_DURATION, "method" => method)
                    .record(started.at.elapsed().as_secs_f64());
                metrics::counter!(m::BATCH_INFERENCE_SUCCESS, "method" => method).increment(1);
                true
            }
            Err(e) => {
                metrics::counter!(m::BATCH_INFERENCE_FAILURE, "method" => method).increment(1);
                self.fail_all(e).await;
                false
            }
        }
    }

    /// Fails the first candidate when none can be admitted into an empty batch. Every valid request fits
    /// an empty cache (checked at startup), so this is a bug, answered rather than left waiting forever.
    fn refuse_unfittable(&mut self, now: Instant) {
        if let Some((entry, _)) = self.queues.pop_candidate(now) {
            tracing::error!(parent: &entry.span, "request does not fit in an empty batch");
            let _ = entry.response_tx.send(Err(InferError::Generation(
                "request does not fit in the KV cache".into(),
            )));
        }
    }

    /// Takes the first `admit` prefill candidates off the queues into the running batch (blocks
    /// allocated, still prefilling) and returns their shard requests.
    fn admit(&mut self, admit: usize, now: Instant) -> Vec<Request> {
        let mut requests = Vec::with_capacity(admit);
        for _ in 0..admit {
            let Some((mut entry, lease)) = self.queues.pop_candidate(now) else {
                break;
            };
            // Told at its adapter's download already; this keeps the rule that a stream hears before its
            // first token.
            entry.ready();
            let Some(blocks) = self
                .allocator
                .allocate(self.policy.blocks_needed(candidate(&entry.request)))
            else {
                // `admit` counted free blocks just now, so this is a bug: fail the request rather than
                // requeue it (which could spin forever on an empty batch).
                tracing::error!(parent: &entry.span, "admitted request found no free blocks");
                let _ = entry.response_tx.send(Err(InferError::Generation(
                    "internal error: no KV-cache blocks for an admitted request".into(),
                )));
                break;
            };
            let id = self.next_id;
            self.next_id += 1;
            let request = &entry.request;
            let (adapter_id, adapter_source) = match &request.adapter {
                Some(adapter) => (adapter.id.clone(), adapter.source.as_str().to_string()),
                None => (String::new(), String::new()),
            };
            requests.push(Request {
                id,
                input_ids: request.input_ids.clone(),
                blocks: blocks.blocks().to_vec(),
                parameters: Some(request.sampling),
                prefill_logprobs: request.decoder_input_details,
                prefill_top_n: request.prefill_top_n,
                top_n_tokens: request.top_n_tokens,
                adapter_id,
                adapter_source,
            });
            metrics::histogram!(m::REQUEST_QUEUE_DURATION).record(now.duration_since(entry.queued).as_secs_f64());
            let label = metric_label(request.adapter.as_ref());
            metrics::counter!(m::ADAPTER_REQUEST_COUNT, "adapter" => label.clone()).increment(1);
            let tokens_counter = metrics::counter!(m::ADAPTER_GENERATED_TOKENS, "adapter" => label);
            let decoder = IncrementalDecoder::new(&request.input_ids);
            let stopping = StoppingCriteria::new(request.stopping.clone(), self.eos_token_ids.clone());
            self.running.insert(
                id,
                Running {
                    entry,
                    _blocks: blocks,
                    _adapter: lease,
                    tokens_counter,
                    decoder,
                    stopping,
                    start: now,
                    prefilling: true,
                },
            );
        }
        requests
    }

    /// Drops the requests whose client is gone (prefilling ones too) and tells the shards; `false` if
    /// that failed (then everything was failed).
    async fn drop_cancelled(&mut self) -> bool {
        let before = self.running.len();
        self.running.retain(|_, r| !r.entry.response_tx.is_closed());
        self.running.len() == before || self.filter().await
    }

    /// One mixed step: admits what the policy allows, then, when some prompt is left to run, one Prefill
    /// call that runs up to `max_batch_prefill_chunk_tokens` prompt tokens (all admitted ones under a
    /// backlog: [`BatchingPolicy::step_prompt_budget`]) and decodes the
    /// running requests in the same forward pass; otherwise a plain decode step (CUDA graphs on the shard).
    async fn mixed_step(&mut self) {
        // Cancelled requests leave before the step, so their blocks are free within one step.
        if !self.drop_cancelled().await {
            return;
        }
        // A prompt admitted under the prompt budget with none of its rows run yet, of an adapter whose streamed
        // read has not ended, would make a step with decode rows wait for the disk: the streams decode alone
        // until the read's outcome comes (once a step has run any of its rows, the read had ended).
        let decoding = self.running.values().filter(|r| !r.prefilling).count();
        let streaming = |r: &Running| {
            r.prefilling
                && r.entry
                    .request
                    .adapter
                    .as_ref()
                    .is_some_and(|a| self.streaming.contains(a))
        };
        if decoding > 0 && self.running.values().any(streaming) {
            // Not run ahead: the prompt joins the first step after the read's outcome.
            self.decode_step(false).await;
            return;
        }
        let admit = self.admit_ahead().await;
        let now = Instant::now();
        if admit == 0 && self.running.is_empty() {
            self.refuse_unfittable(now);
            return;
        }
        let requests = self.admit(admit, now);
        let prefilling = self.running.values().filter(|r| r.prefilling).count();
        if prefilling == 0 {
            // Nothing was admitted: the shards may run the next step ahead.
            self.decode_step(self.run_ahead).await;
            return;
        }
        let decoding = self.running.len() - prefilling;
        let method = if decoding > 0 { "mixed" } else { "prefill" };
        tracing::debug!(new = requests.len(), prefilling, decoding, "{method} step");
        self.publish();
        metrics::counter!(m::BATCH_INFERENCE_COUNT, "method" => method).increment(1);
        if !requests.is_empty() {
            metrics::histogram!(m::BATCH_NEXT_SIZE).record(requests.len() as f64);
        }
        if decoding > 0 {
            metrics::histogram!(m::BATCH_DECODE_SIZE, "method" => method).record(decoding as f64);
        }
        let started = Started::now();
        let in_step: Vec<u64> = self.running.keys().copied().collect();
        // Chunks keep a long prompt from stalling the running streams; with none decoding, or with a whole
        // prefill budget's worth queued behind the admitted prompts, the admitted prompts run whole.
        let queued = self.queues.prefillable_items().map(|e| e.request.input_length());
        let budget = self.policy.step_prompt_budget(decoding, queued);
        self.ahead = false;
        let result = self.clients.mixed_step(requests, decoding > 0, budget).await;
        // Every request of the step gets a token, except those whose prompt is still running.
        let result = result.map(|response| {
            let still: std::collections::HashSet<u64> = response.prefilling_ids.iter().copied().collect();
            let expected = in_step.into_iter().filter(|id| !still.contains(id)).collect();
            Reply {
                timing: ShardTiming::of(response.forward_ns, response.handler_ns, response.received_unix_ns),
                generations: response.generations,
                expected,
            }
        });
        self.conclude(method, started, result).await;
    }

    /// Prompt tokens of the requests still prefilling.
    fn prefilling_tokens(&self) -> u32 {
        self.running
            .values()
            .filter(|r| r.prefilling)
            .map(|r| r.entry.request.input_length())
            .fold(0, u32::saturating_add)
    }

    /// How many queued requests the policy admits now (mixed steps or whole-prompt prefills, as configured).
    fn admission(&mut self) -> usize {
        let free = self.allocator.free_blocks();
        let candidates = self.queues.prefill_candidates().map(|e| candidate(&e.request));
        if self.policy.mixed() {
            self.policy.admit_mixed(candidates, free, self.prefilling_tokens())
        } else {
            self.policy
                .admit(candidates, free, self.running.len(), self.steps_since_prefill)
        }
    }

    /// [`Self::admission`], collecting first a step the shards ran ahead when some request is admitted: a
    /// Decode call that runs nothing ahead hands its tokens out at once, so the running streams get them
    /// when the step ends, not after the prompt's step too (the shard would put them ahead of the Prefill's
    /// own, one step late). The admission is then decided again, as requests may have finished.
    async fn admit_ahead(&mut self) -> usize {
        let admit = self.admission();
        if admit == 0 || !self.ahead {
            return admit;
        }
        self.decode_step(false).await;
        self.admission()
    }

    /// Advances the running batch by one token (whole-prompt scheduling, after the prefill's turn).
    async fn decode(&mut self) {
        // The shard runs the next step while this one's answer travels and is handled, unless a request
        // would be admitted now: its prefill would then wait for that step.
        let run_ahead = self.run_ahead && self.admission() == 0;
        self.decode_step(run_ahead).await;
    }

    /// One Decode call, asking the shards to run the next step ahead or not.
    async fn decode_step(&mut self, run_ahead: bool) {
        // Whatever happens below, no step the router has not seen is left: an empty batch was filtered to
        // nothing (the shards dropped the step's tokens), a failure cleared the shards.
        self.ahead = false;
        // Cancelled requests leave before the step, so their blocks are free within one step.
        if !self.drop_cancelled().await {
            return;
        }
        if self.running.is_empty() {
            return;
        }
        metrics::counter!(m::BATCH_INFERENCE_COUNT, "method" => "decode").increment(1);
        metrics::histogram!(m::BATCH_DECODE_SIZE, "method" => "decode").record(self.running.len() as f64);
        let started = Started::now();
        let expected: Vec<u64> = self
            .running
            .iter()
            .filter(|(_, r)| !r.prefilling)
            .map(|(&id, _)| id)
            .collect();
        let result = self.clients.decode(run_ahead).await.map(|r| Reply {
            timing: ShardTiming::of(r.forward_ns, r.handler_ns, r.received_unix_ns),
            generations: r.generations,
            expected,
        });
        let ok = self.conclude("decode", started, result).await;
        self.ahead = ok && run_ahead;
        if ok {
            self.steps_since_prefill = self.steps_since_prefill.saturating_add(1);
        }
    }

    /// Turns one step's generations into stream messages and retires finished or cancelled requests.
    /// Every request the step should have advanced gets an answer: one the shard left out is failed
    /// (never left waiting with its blocks), one the shard has but the router does not is filtered out.
    async fn handle(&mut self, generations: Vec<Generation>, expected: &[u64]) -> Handled {
        let usage = thread_usage();
        let mut retired = false;
        let before = self.running.len();
        let mut answered = std::collections::HashSet::with_capacity(generations.len());
        // A request may get two tokens in one answer (a step the shard ran ahead, then this one's), in order.
        let mut by_id: std::collections::HashMap<u64, Vec<Generation>> =
            std::collections::HashMap::with_capacity(generations.len());
        for generation in generations {
            let id = generation.request_id;
            answered.insert(id);
            if self.running.contains_key(&id) {
                by_id.entry(id).or_default().push(generation);
            } else {
                tracing::warn!(id, "shard returned a generation for an unknown request");
                retired = true;
            }
        }
        // Each request's token (detokenising, stop checks, the send to its stream), one after another on
        // this thread. Spreading them over the rayon pool (sessions 8-28) saved about 0.15 ms of a 128-row
        // step's handling on an idle host (session 8), but a handling then waits for pool threads to wake:
        // on a busy host its tail grows past a step (examples/handoff.rs), and serving runs logged
        // handlings of 3-11 ms (bench/NOTES.md session 29). On one thread, one of session 30's three hosts
        // still logged 49 of 3-13.5 ms, cause unknown: the log line's `cpu_ms` and `involuntary_switches`
        // are there to tell. While the shards run the next step ahead, a handling of a few tenths of a
        // millisecond costs the step nothing.
        let decoder = &self.decoder;
        // Tokens after the one that ends a request are dropped.
        let done: Vec<u64> = self
            .running
            .iter_mut()
            .filter_map(|(&id, running)| by_id.remove(&id).map(|g| (id, running, g)))
            .filter_map(|(id, running, generations)| {
                generations
                    .into_iter()
                    .any(|generation| !Self::step(decoder, running, generation))
                    .then_some(id)
            })
            .collect();
        for id in done {
            self.running.remove(&id);
            retired = true;
        }
        for id in expected.iter().filter(|id| !answered.contains(id)) {
            if let Some(running) = self.running.remove(id) {
                tracing::error!(id, "shard returned no token for a request in the batch");
                let _ = running.entry.response_tx.send(Err(InferError::Generation(
                    "the shard returned no token for this request".into(),
                )));
                retired = true;
            }
        }
        // Counted before the filter: a failed one fails (and empties) the whole batch.
        let left = before.saturating_sub(self.running.len());
        // No await before this point, so all of it ran on this thread.
        let cpu = usage
            .zip(thread_usage())
            .map(|((c0, s0), (c1, s1))| (c1.saturating_sub(c0), s1 - s0));
        let mut filter = Duration::ZERO;
        if retired {
            let t = Instant::now();
            self.filter().await;
            filter = t.elapsed();
        }
        Handled {
            retired: left,
            filter,
            cpu,
        }
    }

    /// Handles one request's token (its first one comes with the prompt's details, when asked); `false`
    /// when the request leaves the batch.
    fn step(decoder: &TokenDecoder, running: &mut Running, generation: Generation) -> bool {
        let tx = &running.entry.response_tx;
        if tx.is_closed() {
            return false;
        }
        let Some(token) = generation.token else {
            let _ = tx.send(Err(InferError::Generation("the shard returned no token".into())));
            return false;
        };
        if !token.logprob.is_finite() {
            // The request's logits were not all numbers (an adapter whose lora_alpha or weights overflow, an
            // f16 activation past its range): the samplers then give the chosen token a logprob of -inf (a
            // log-sum-exp that is not finite), which a chosen token never has otherwise. Its tokens would be
            // meaningless, so it fails, alone.
            let _ = tx.send(Err(not_a_number(running.entry.request.adapter.as_ref())));
            return false;
        }
        let first = std::mem::take(&mut running.prefilling);
        if first && running.entry.request.decoder_input_details {
            // Each prompt token with its alternatives (when asked: one entry per token, else none). With
            // alternatives (the OpenAI completions' echo) the route reads the texts, off this loop: here they
            // would cost a decode per token and per alternative of a whole prompt.
            let info = |t: &Token| {
                if running.entry.request.prefill_top_n > 0 {
                    TokenInfo {
                        id: t.id,
                        text: String::new(),
                        logprob: t.logprob,
                        special: decoder.is_special(t.id),
                        held: 0,
                    }
                } else {
                    token_info(decoder, t)
                }
            };
            let tops = &generation.prefill_top_tokens;
            let tops = (tops.len() == generation.prefill_tokens.len()).then_some(tops);
            let prompt = generation
                .prefill_tokens
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let top = tops.map(|tops| tops[i].tokens.iter().map(info).collect());
                    (info(t), top.unwrap_or_default())
                })
                .collect();
            if tx.send(Ok(InferStreamResponse::Prefill(prompt))).is_err() {
                return false;
            }
        }
        running.tokens_counter.increment(1);
        let before = running.decoder.emitted().len();
        // Alternatives read in the sequence's context, as the chosen token does.
        let alternatives: Vec<u32> = generation.top_tokens.iter().map(|t| t.id).collect();
        let pushed = running.decoder.push_with_alternatives(decoder, token.id, &alternatives);
        let top_tokens = generation
            .top_tokens
            .iter()
            .zip(pushed.alternatives)
            .map(|(t, text)| TokenInfo {
                id: t.id,
                text,
                logprob: t.logprob,
                special: decoder.is_special(t.id),
                held: 0,
            })
            .collect();
        let special = decoder.is_special(token.id);
        let (text, held) = (pushed.text, pushed.held);
        let finish = running.stopping.step(
            token.id,
            running.decoder.emitted(),
            before,
            special.then_some(&text[held..]),
        );
        let generated = TokenInfo {
            id: token.id,
            text,
            logprob: token.logprob,
            special,
            held,
        };
        let message = match finish {
            None => InferStreamResponse::Intermediate {
                token: generated,
                top_tokens,
            },
            Some(finish_reason) => {
                let text = match (
                    finish_reason,
                    running.stopping.text_through_stop(running.decoder.emitted()),
                ) {
                    (FinishReason::StopSequence, Some(text)) => text.to_string(),
                    _ => running.decoder.text(decoder),
                };
                let request = &running.entry.request;
                let generated_text = GeneratedText {
                    text,
                    generated_tokens: running.stopping.generated_tokens(),
                    finish_reason,
                    seed: request.sampling.is_sampling().then_some(request.sampling.seed),
                };
                tracing::debug!(parent: &running.entry.span, ?finish_reason, tokens = generated_text.generated_tokens, "finished");
                InferStreamResponse::End {
                    token: generated,
                    top_tokens,
                    generated_text,
                    queued: running.entry.queued,
                    start: running.start,
                }
            }
        };
        tx.send(Ok(message)).is_ok() && finish.is_none()
    }

    /// Tells the shards which requests remain; `false` if that failed (then everything was failed).
    async fn filter(&mut self) -> bool {
        let keep: Vec<u64> = self.running.keys().copied().collect();
        match self.clients.filter_batch(keep).await {
            Ok(_) => {
                self.allocator.reclaim();
                true
            }
            Err(e) => {
                self.fail_all(e).await;
                false
            }
        }
    }

    /// Fails every running request with the shard's message, frees their blocks and clears the shards.
    /// Adapters whose streamed read has not ended take no new requests until it has: the failure may be
    /// that read's (the shard then unloads the adapter, and its `Streamed` event fails its queue).
    async fn fail_all(&mut self, error: ClientError) {
        for adapter in &self.streaming {
            self.queues.suspend(adapter);
        }
        let message = error.to_string();
        tracing::error!(requests = self.running.len(), "shard call failed: {message}");
        // Shards drop their batch before anyone hears of the failure or the blocks are reused.
        if let Err(e) = self.clients.clear_cache().await {
            tracing::error!("clearing the shards' cache after a failure also failed: {e}");
        }
        for (_, running) in std::mem::take(&mut self.running) {
            let _ = running
                .entry
                .response_tx
                .send(Err(InferError::Generation(message.clone())));
        }
        self.steps_since_prefill = 0;
        self.publish();
    }
}

/// The error of a request whose logits came back NaN or infinite: its adapter's fault (422 `adapter_invalid`) when it has
/// one, else the model's (424 `generation`).
fn not_a_number(adapter: Option<&AdapterKey>) -> InferError {
    const WHY: &str = "the model's output for this request is not a number (NaN or infinite logits)";
    match adapter {
        Some(adapter) => InferError::Adapter(AdapterError {
            kind: AdapterFailure::Invalid,
            adapter: adapter.clone(),
            stage: "used",
            message: format!("{WHY}: its weights or its lora_alpha may overflow the values the model can hold"),
            no_room: false,
        }),
        None => InferError::Generation(WHY.to_string()),
    }
}

/// A prompt token decoded on its own (generated tokens and their alternatives go through the sequence's
/// incremental decoder instead).
fn token_info(decoder: &TokenDecoder, t: &Token) -> TokenInfo {
    TokenInfo {
        id: t.id,
        text: decoder.token_text(t.id),
        logprob: t.logprob,
        special: decoder.is_special(t.id),
        held: 0,
    }
}

/// What the batching policy needs to know of a request.
fn candidate(r: &crate::validation::ValidRequest) -> Candidate {
    Candidate {
        input_length: r.input_length(),
        max_total_tokens: r.max_total_tokens(),
    }
}

#[cfg(test)]
mod tests {
    use super::LogBudget;
    use std::time::{Duration, Instant};

    /// Spins until `thread_usage` says this thread has spent `cpu` more (10 s at most); the usage then.
    #[cfg(target_os = "linux")]
    fn spin_for(cpu: Duration) -> (Duration, std::os::raw::c_long) {
        let (c0, _) = super::thread_usage().expect("getrusage(RUSAGE_THREAD) works on Linux");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut x = 0u64;
        loop {
            for i in 0..100_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
            let now = super::thread_usage().expect("getrusage(RUSAGE_THREAD)");
            if now.0 >= c0 + cpu || Instant::now() > deadline {
                return now;
            }
        }
    }

    /// The slow-handling log's CPU time is the handling thread's own: it grows by what this thread
    /// computes (20 ms here, whatever else the host runs), not by another thread's 50 ms while this one
    /// waits on a channel; the switch count never goes back.
    #[cfg(target_os = "linux")]
    #[test]
    fn thread_usage_counts_this_threads_cpu_time() {
        let (c0, s0) = super::thread_usage().expect("getrusage(RUSAGE_THREAD) works on Linux");
        let (c1, s1) = spin_for(Duration::from_millis(20));
        assert!(
            c1 >= c0 + Duration::from_millis(20),
            "10 s of spinning added only {:?} of CPU time",
            c1 - c0
        );
        assert!(s1 >= s0, "involuntary switches went from {s0} to {s1}");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(spin_for(Duration::from_millis(50))));
        let theirs = rx.recv().expect("the spinning thread answers");
        let (c2, _) = super::thread_usage().expect("getrusage(RUSAGE_THREAD)");
        assert!(
            theirs.0 >= Duration::from_millis(50),
            "the other thread spent {:?}",
            theirs.0
        );
        assert!(
            c2 < c1 + Duration::from_millis(20),
            "waiting on a channel while another thread spun 50 ms cost this one {:?}",
            c2 - c1
        );
    }

    #[test]
    fn slow_handling_logs_are_bounded_a_second_and_count_what_they_drop() {
        let mut b = LogBudget::default();
        let t0 = Instant::now();
        let allowed = (0..LogBudget::PER_SECOND + 4)
            .filter_map(|_| b.allow(t0 + Duration::from_millis(10)))
            .collect::<Vec<_>>();
        assert_eq!(allowed, vec![0; LogBudget::PER_SECOND as usize]);
        assert_eq!(b.allow(t0 + Duration::from_millis(900)), None);
        assert_eq!(
            b.allow(t0 + Duration::from_millis(1010)),
            Some(5),
            "a new second reports the 5 dropped"
        );
        assert_eq!(b.allow(t0 + Duration::from_millis(1020)), Some(0));
    }
}
