//! The running batch: the sequences a shard advances together, each with its tokens, how many of them
//! are cached, its block table, adapter and sampler. A sequence joins while its prompt is not yet (fully)
//! cached: it is *prefilling* until [`crate::Engine::step`] has run its whole prompt (in one step or in
//! chunks over several), and only then gets its first token and joins the decode rows.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::sampling::{Choice, Sampler, SamplingParams};

/// The next [`Sequence::uid`].
static NEXT_UID: AtomicU64 = AtomicU64::new(1);

/// A sequence to add to a batch.
#[derive(Clone, Debug)]
pub struct NewSequence {
    /// Caller's id, unique within the batch.
    pub id: u64,
    /// Prompt token ids.
    pub input_ids: Vec<u32>,
    /// Cache blocks covering the prompt and every token that may be generated.
    pub block_table: Vec<u32>,
    /// Next-token parameters.
    pub params: SamplingParams,
    /// Also return the log-probability of each prompt token.
    pub prefill_logprobs: bool,
    /// With `prefill_logprobs`: alternatives to return with each prompt token (its most likely tokens).
    pub prefill_top_n: u32,
    /// Key of a loaded adapter ([`crate::Engine::load_adapter`]) applied to this sequence; `None` for the base model.
    pub adapter: Option<String>,
}

/// A prompt token with its log-probability under the model (none for the first token).
#[derive(Clone, Debug, PartialEq)]
pub struct PromptToken {
    /// Token id.
    pub id: u32,
    /// log p(token | previous tokens).
    pub logprob: Option<f32>,
    /// The most likely tokens at this position, `(token, logprob)` best first (ties: lower id first):
    /// `prefill_top_n` of them (none for the first token).
    pub top: Vec<(u32, f32)>,
}

/// One step's output for one sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// Sequence id.
    pub id: u64,
    /// The token chosen, its logprob and alternatives.
    pub choice: Choice,
    /// Prompt tokens with logprobs (with a sequence's first token, when asked).
    pub prefill: Option<Vec<PromptToken>>,
}

/// A sequence in a running batch.
pub struct Sequence {
    /// Caller's id.
    pub id: u64,
    /// Prompt and generated tokens.
    pub tokens: Vec<u32>,
    /// How many of `tokens` are in the KV cache.
    pub cached: usize,
    /// Prompt tokens: the sequence is prefilling while `cached < prompt_len`.
    pub prompt_len: usize,
    /// Cache blocks.
    pub block_table: Vec<u32>,
    /// Adapter key, `None` for the base model.
    pub adapter: Option<String>,
    /// The prompt tokens' logprobs computed so far (first token first), when asked; handed out with the
    /// first generated token.
    pub(crate) prompt_logprobs: Option<Vec<PromptToken>>,
    /// Alternatives per prompt token (with `prompt_logprobs`).
    pub(crate) prompt_top_n: u32,
    pub(crate) sampler: Sampler,
    /// Unique in the process (caller ids may be reused): a decode step launched ahead knows its rows' sequences
    /// by it.
    pub(crate) uid: u64,
}

impl Sequence {
    /// A sequence that has run nothing yet (prefilling, nothing cached).
    pub(crate) fn new(s: NewSequence) -> Self {
        let sampler = Sampler::new(s.params, &s.input_ids);
        let prompt_logprobs = s.prefill_logprobs.then(|| {
            s.input_ids
                .first()
                .map(|&id| PromptToken {
                    id,
                    logprob: None,
                    top: Vec::new(),
                })
                .into_iter()
                .collect()
        });
        Self {
            id: s.id,
            prompt_len: s.input_ids.len(),
            tokens: s.input_ids,
            cached: 0,
            block_table: s.block_table,
            adapter: s.adapter,
            prompt_logprobs,
            prompt_top_n: s.prefill_top_n,
            sampler,
            uid: NEXT_UID.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Whether part of the prompt is still to run (no token generated yet).
    pub fn is_prefilling(&self) -> bool {
        self.cached < self.prompt_len
    }
}

/// The sequences being decoded together.
#[derive(Default)]
pub struct Batch {
    /// Sequences, in the order they were added.
    pub seqs: Vec<Sequence>,
}

impl Batch {
    /// Keep only the sequences whose ids are listed (prefilling ones included).
    pub fn filter(&mut self, keep: &[u64]) {
        self.seqs.retain(|s| keep.contains(&s.id));
    }

    /// Ids of the sequences, in order.
    pub fn ids(&self) -> Vec<u64> {
        self.seqs.iter().map(|s| s.id).collect()
    }

    /// Ids of the sequences whose prompt is not fully cached yet, in order.
    pub fn prefilling_ids(&self) -> Vec<u64> {
        self.seqs.iter().filter(|s| s.is_prefilling()).map(|s| s.id).collect()
    }

    /// Whether a sequence of the batch (prefilling or not) uses the adapter `key`.
    pub fn uses_adapter(&self, key: &str) -> bool {
        self.seqs.iter().any(|s| s.adapter.as_deref() == Some(key))
    }

    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    /// No sequences.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }
}
