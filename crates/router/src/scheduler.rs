//! The batching task: the single owner of the queue, the running batch and the KV block allocator.
//!
//! Each turn it takes new requests from the [`crate::infer::Infer`] channel, prefills waiting requests
//! when the policy allows (the shard appends them to its running batch), then decodes one step for the
//! whole batch. After every step it turns tokens into text, checks stopping, answers each request's
//! stream, and removes finished and cancelled requests with FilterBatch, which drops their block
//! allocations. A shard failure fails every request of the batch (424), clears the shards' cache and
//! the task carries on with new requests.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use lorax_proto::shard::v1::{Generation, Request, Token};
use tokio::sync::mpsc;

use crate::blocks::{BlockAllocation, BlockAllocator};
use crate::client::{ClientError, ShardClients};
use crate::detokenize::{IncrementalDecoder, TokenDecoder};
use crate::infer::{Entry, GeneratedText, InferError, InferStreamResponse, TokenInfo};
use crate::metrics as m;
use crate::policy::{BatchingPolicy, Candidate};
use crate::stopping::{FinishReason, StoppingCriteria};

/// A request in the running batch.
struct Running {
    entry: Entry,
    /// Returned to the allocator when this entry is dropped.
    _blocks: BlockAllocation,
    decoder: IncrementalDecoder,
    stopping: StoppingCriteria,
    start: Instant,
}

/// The batching task's state.
pub struct Scheduler {
    clients: ShardClients,
    decoder: TokenDecoder,
    policy: BatchingPolicy,
    eos_token_ids: Vec<u32>,
    entries: mpsc::UnboundedReceiver<Entry>,
    queue: VecDeque<Entry>,
    running: BTreeMap<u64, Running>,
    allocator: BlockAllocator,
    next_id: u64,
    steps_since_prefill: u32,
}

impl Scheduler {
    /// A scheduler fed by `entries`, granting `total_blocks` KV blocks.
    pub fn new(
        clients: ShardClients,
        decoder: TokenDecoder,
        policy: BatchingPolicy,
        eos_token_ids: Vec<u32>,
        total_blocks: u32,
        entries: mpsc::UnboundedReceiver<Entry>,
    ) -> Self {
        Self {
            clients,
            decoder,
            policy,
            eos_token_ids,
            entries,
            queue: VecDeque::new(),
            running: BTreeMap::new(),
            allocator: BlockAllocator::new(total_blocks),
            next_id: 0,
            steps_since_prefill: 0,
        }
    }

    /// Serves until every [`crate::infer::Infer`] handle is dropped and all work is done.
    pub async fn run(mut self) {
        while self.receive().await {
            self.prefill().await;
            if !self.running.is_empty() {
                self.decode().await;
            }
            self.publish();
        }
        tracing::info!("batching task stopped");
    }

    /// Moves new requests into the queue and drops queued requests whose client is gone. Waits when
    /// there is nothing to do; `false` once no more requests can arrive and nothing is left.
    async fn receive(&mut self) -> bool {
        while let Ok(entry) = self.entries.try_recv() {
            self.queue.push_back(entry);
        }
        self.queue.retain(|e| !e.response_tx.is_closed());
        if self.running.is_empty() && self.queue.is_empty() {
            self.publish();
            match self.entries.recv().await {
                Some(entry) => self.queue.push_back(entry),
                None => return false,
            }
        }
        true
    }

    fn publish(&mut self) {
        self.allocator.reclaim();
        metrics::gauge!(m::QUEUE_SIZE).set(self.queue.len() as f64);
        metrics::gauge!(m::BATCH_CURRENT_SIZE).set(self.running.len() as f64);
        let reserved: u64 = self
            .running
            .values()
            .map(|r| u64::from(r.entry.request.max_total_tokens()))
            .sum();
        metrics::gauge!(m::BATCH_CURRENT_MAX_TOKENS).set(reserved as f64);
    }

    /// Prefills as many queued requests as the policy admits.
    async fn prefill(&mut self) {
        let candidates = self.queue.iter().map(|e| candidate(&e.request));
        let free = self.allocator.free_blocks();
        let admit = self
            .policy
            .admit(candidates, free, self.running.len(), self.steps_since_prefill);
        if admit == 0 {
            if self.running.is_empty() {
                // Every valid request fits an empty cache (checked at startup), so this is a bug.
                if let Some(entry) = self.queue.pop_front() {
                    tracing::error!(parent: &entry.span, "request does not fit in an empty batch");
                    let _ = entry.response_tx.send(Err(InferError::Generation(
                        "request does not fit in the KV cache".into(),
                    )));
                }
            }
            return;
        }

        let now = Instant::now();
        let mut requests = Vec::with_capacity(admit);
        for _ in 0..admit {
            let Some(entry) = self.queue.pop_front() else { break };
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
            requests.push(Request {
                id,
                input_ids: request.input_ids.clone(),
                blocks: blocks.blocks().to_vec(),
                parameters: Some(request.sampling),
                prefill_logprobs: request.decoder_input_details,
                top_n_tokens: request.top_n_tokens,
                adapter_id: String::new(),
                adapter_source: String::new(),
            });
            metrics::histogram!(m::REQUEST_QUEUE_DURATION).record(now.duration_since(entry.queued).as_secs_f64());
            let decoder = IncrementalDecoder::new(&request.input_ids);
            let stopping = StoppingCriteria::new(request.stopping.clone(), self.eos_token_ids.clone());
            self.running.insert(
                id,
                Running {
                    entry,
                    _blocks: blocks,
                    decoder,
                    stopping,
                    start: now,
                },
            );
        }
        if requests.is_empty() {
            return;
        }
        tracing::debug!(new = requests.len(), running = self.running.len(), "prefill");
        self.publish();
        metrics::counter!(m::BATCH_INFERENCE_COUNT, "method" => "prefill").increment(1);
        let started = Instant::now();
        let expected: Vec<u64> = requests.iter().map(|r| r.id).collect();
        match self.clients.prefill(requests).await {
            Ok(response) => {
                metrics::histogram!(m::BATCH_FORWARD_DURATION, "method" => "prefill")
                    .record(started.elapsed().as_secs_f64());
                self.steps_since_prefill = 0;
                self.handle(response.generations, true, &expected).await;
            }
            Err(e) => {
                metrics::counter!(m::BATCH_INFERENCE_FAILURE, "method" => "prefill").increment(1);
                self.fail_all(e).await;
            }
        }
    }

    /// Advances the running batch by one token.
    async fn decode(&mut self) {
        // Cancelled requests leave before the step, so their blocks are free within one step.
        let before = self.running.len();
        self.running.retain(|_, r| !r.entry.response_tx.is_closed());
        if self.running.len() != before && !self.filter().await {
            return;
        }
        if self.running.is_empty() {
            return;
        }
        metrics::counter!(m::BATCH_INFERENCE_COUNT, "method" => "decode").increment(1);
        metrics::histogram!(m::BATCH_DECODE_SIZE).record(self.running.len() as f64);
        let started = Instant::now();
        let expected: Vec<u64> = self.running.keys().copied().collect();
        match self.clients.decode().await {
            Ok(response) => {
                metrics::histogram!(m::BATCH_FORWARD_DURATION, "method" => "decode")
                    .record(started.elapsed().as_secs_f64());
                self.steps_since_prefill = self.steps_since_prefill.saturating_add(1);
                self.handle(response.generations, false, &expected).await;
            }
            Err(e) => {
                metrics::counter!(m::BATCH_INFERENCE_FAILURE, "method" => "decode").increment(1);
                self.fail_all(e).await;
            }
        }
    }

    /// Turns one step's generations into stream messages and retires finished or cancelled requests.
    /// Every request the step should have advanced gets an answer: one the shard left out is failed
    /// (never left waiting with its blocks), one the shard has but the router does not is filtered out.
    async fn handle(&mut self, generations: Vec<Generation>, prefill: bool, expected: &[u64]) {
        let mut retired = false;
        let mut answered = std::collections::HashSet::with_capacity(generations.len());
        for generation in generations {
            let id = generation.request_id;
            answered.insert(id);
            let Some(running) = self.running.get_mut(&id) else {
                tracing::warn!(id, "shard returned a generation for an unknown request");
                retired = true;
                continue;
            };
            let keep = Self::step(&self.decoder, running, generation, prefill);
            if !keep {
                self.running.remove(&id);
                retired = true;
            }
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
        if retired {
            self.filter().await;
        }
    }

    /// Handles one request's token; `false` when the request leaves the batch.
    fn step(decoder: &TokenDecoder, running: &mut Running, generation: Generation, prefill: bool) -> bool {
        let tx = &running.entry.response_tx;
        if tx.is_closed() {
            return false;
        }
        let Some(token) = generation.token else {
            let _ = tx.send(Err(InferError::Generation("the shard returned no token".into())));
            return false;
        };
        if prefill && running.entry.request.decoder_input_details {
            let prompt = generation
                .prefill_tokens
                .iter()
                .map(|t| token_info(decoder, t))
                .collect();
            if tx.send(Ok(InferStreamResponse::Prefill(prompt))).is_err() {
                return false;
            }
        }
        let before = running.decoder.emitted().len();
        let text = running.decoder.push(decoder, token.id);
        let special = decoder.is_special(token.id);
        let finish = running.stopping.step(token.id, running.decoder.emitted(), before);
        let generated = TokenInfo {
            id: token.id,
            text,
            logprob: token.logprob,
            special,
        };
        let top_tokens = generation.top_tokens.iter().map(|t| token_info(decoder, t)).collect();
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
    async fn fail_all(&mut self, error: ClientError) {
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

/// A token decoded on its own (prompt tokens and alternatives; generated tokens go through the
/// sequence's incremental decoder instead).
fn token_info(decoder: &TokenDecoder, t: &Token) -> TokenInfo {
    TokenInfo {
        id: t.id,
        text: decoder.token_text(t.id),
        logprob: t.logprob,
        special: decoder.is_special(t.id),
    }
}

/// What the batching policy needs to know of a request.
fn candidate(r: &crate::validation::ValidRequest) -> Candidate {
    Candidate {
        input_length: r.input_length(),
        max_total_tokens: r.max_total_tokens(),
    }
}
