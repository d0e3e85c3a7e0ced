//! The continuous-batching policy as pure functions: which queued requests to prefill, and (without mixed
//! steps, TGI's rules) whether they are worth interrupting the running batch's decoding for. With mixed
//! steps a prefill no longer stalls the running batch for a whole prompt (its prompts run in chunks of at
//! most `max_batch_prefill_chunk_tokens` per step, next to the decode rows), so requests are admitted as
//! soon as blocks and the prefill token budget allow; while a whole budget's worth of prompts waits in the
//! queue behind the admitted ones (a backlog), a step runs all admitted prompts (`step_prompt_budget`).

use crate::blocks::blocks_for;

/// Batching knobs, from the command line and the shard's KV-cache geometry.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchingPolicy {
    /// Most prompt tokens in one Prefill call.
    pub max_batch_prefill_tokens: u32,
    /// Decode steps after which waiting requests are prefilled regardless of the ratio.
    pub max_waiting_tokens: u32,
    /// A prefill while a batch runs must add at least `floor(ratio * running)` requests.
    pub waiting_served_ratio: f32,
    /// Tokens per KV block.
    pub block_size: u32,
    /// Most prompt tokens run in one step while requests decode, unless under a backlog (chunked prefill,
    /// mixed with the decode rows of the running batch); 0 turns mixed steps off (separate Prefill and
    /// Decode calls, whole prompts).
    pub max_batch_prefill_chunk_tokens: u32,
}

/// What the policy needs to know about a queued request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Prompt tokens.
    pub input_length: u32,
    /// Prompt + max_new_tokens.
    pub max_total_tokens: u32,
}

impl BatchingPolicy {
    /// KV blocks a request needs for its prompt and all its new tokens.
    pub fn blocks_needed(&self, candidate: Candidate) -> u32 {
        blocks_for(candidate.max_total_tokens, self.block_size)
    }

    /// Smallest number of new requests a prefill must add now; `None` when any number will do (nothing
    /// is running, or the waiters have waited `max_waiting_tokens` decode steps).
    pub fn min_new_requests(&self, running: usize, steps_since_prefill: u32) -> Option<usize> {
        if running == 0 || steps_since_prefill >= self.max_waiting_tokens {
            None
        } else {
            // Truncation is the rule (TGI floors the product).
            Some((running as f32 * self.waiting_served_ratio).floor() as usize)
        }
    }

    /// How many requests from the head of the queue (in order) to prefill: stop at the first whose
    /// prompt would overflow the prefill token budget or whose blocks are not free. FIFO, so a large
    /// request at the head is not starved by smaller ones behind it.
    pub fn select(&self, queue: impl IntoIterator<Item = Candidate>, free_blocks: u32) -> usize {
        let mut prefill_tokens = 0u32;
        let mut blocks = 0u32;
        let mut taken = 0;
        for candidate in queue {
            let next_tokens = prefill_tokens.saturating_add(candidate.input_length);
            let next_blocks = blocks.saturating_add(self.blocks_needed(candidate));
            if next_tokens > self.max_batch_prefill_tokens || next_blocks > free_blocks {
                break;
            }
            prefill_tokens = next_tokens;
            blocks = next_blocks;
            taken += 1;
        }
        taken
    }

    /// Whether steps mix decode rows with chunks of prompts.
    pub fn mixed(&self) -> bool {
        self.max_batch_prefill_chunk_tokens > 0
    }

    /// Number of requests to admit into a mixed step: `select` with the prefill token budget less the
    /// prompt tokens of the requests admitted earlier whose prompts are still running (`pending_tokens`),
    /// so at most `max_batch_prefill_tokens` prompt tokens wait in the batch. No ratio rule: admission
    /// does not interrupt decoding.
    pub fn admit_mixed(
        &self,
        queue: impl IntoIterator<Item = Candidate>,
        free_blocks: u32,
        pending_tokens: u32,
    ) -> usize {
        let budget = Self {
            max_batch_prefill_tokens: self.max_batch_prefill_tokens.saturating_sub(pending_tokens),
            ..self.clone()
        };
        budget.select(queue, free_blocks)
    }

    /// Whether the requests still queued after admission hold at least `max_batch_prefill_tokens` prompt
    /// tokens: another whole budget's worth waits behind the admitted prompts (a backlog). A group that
    /// the budget admits at once, or nearly, is not one: its prompts still run in chunks. Stops reading
    /// the queue once the sum is reached.
    fn backlog(&self, queued_prompt_tokens: impl IntoIterator<Item = u32>) -> bool {
        let mut sum = 0u32;
        queued_prompt_tokens.into_iter().any(|tokens| {
            sum = sum.saturating_add(tokens);
            sum >= self.max_batch_prefill_tokens
        })
    }

    /// Most prompt tokens one mixed step runs, given the requests decoding in it and the prompt lengths
    /// of those still queued after admission (read only while some decode). While requests decode, a
    /// chunk (`max_batch_prefill_chunk_tokens`) keeps new prompts from stalling them for long. With
    /// nothing decoding nobody waits, and under a backlog ([`Self::backlog`]) the server is behind on
    /// prompts: then the step runs up to `max_batch_prefill_tokens`, so a burst reaches its first tokens in
    /// fewer, larger steps, each paying for the decode rows once (as vLLM's token budget of 8192 on large
    /// GPUs does).
    pub fn step_prompt_budget(&self, decoding: usize, queued_prompt_tokens: impl IntoIterator<Item = u32>) -> u32 {
        if decoding > 0 && !self.backlog(queued_prompt_tokens) {
            self.max_batch_prefill_chunk_tokens
        } else {
            self.max_batch_prefill_tokens.max(self.max_batch_prefill_chunk_tokens)
        }
    }

    /// Number of requests to prefill now, or 0 to keep decoding: `select`, then the ratio rule.
    pub fn admit(
        &self,
        queue: impl IntoIterator<Item = Candidate>,
        free_blocks: u32,
        running: usize,
        steps_since_prefill: u32,
    ) -> usize {
        let selected = self.select(queue, free_blocks);
        match self.min_new_requests(running, steps_since_prefill) {
            Some(min) if selected < min => 0,
            _ => selected,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> BatchingPolicy {
        BatchingPolicy {
            max_batch_prefill_tokens: 100,
            max_waiting_tokens: 20,
            waiting_served_ratio: 1.2,
            block_size: 16,
            max_batch_prefill_chunk_tokens: 0,
        }
    }

    fn c(input_length: u32, max_total_tokens: u32) -> Candidate {
        Candidate {
            input_length,
            max_total_tokens,
        }
    }

    #[test]
    fn select_respects_prefill_budget() {
        let p = policy();
        assert_eq!(p.select([c(40, 50), c(40, 50), c(40, 50)], 1000), 2);
        assert_eq!(p.select([c(100, 110)], 1000), 1);
        assert_eq!(p.select([c(101, 110)], 1000), 0);
    }

    #[test]
    fn select_respects_free_blocks_in_order() {
        let p = policy();
        // 50 tokens = 4 blocks; 16 tokens = 1 block.
        assert_eq!(p.select([c(10, 50), c(10, 50)], 7), 1);
        // FIFO: the small one behind a large one that does not fit waits too.
        assert_eq!(p.select([c(10, 200), c(10, 16)], 5), 0);
        assert_eq!(p.select([c(10, 16), c(10, 16)], 2), 2);
        assert_eq!(p.select(std::iter::empty(), 10), 0);
    }

    #[test]
    fn ratio_rule() {
        let p = policy();
        assert_eq!(p.min_new_requests(0, 0), None);
        assert_eq!(p.min_new_requests(1, 0), Some(1));
        assert_eq!(p.min_new_requests(10, 5), Some(12));
        assert_eq!(p.min_new_requests(10, 20), None, "waited max_waiting_tokens steps");
    }

    #[test]
    fn admit_combines_selection_and_ratio() {
        let p = policy();
        let small = c(5, 16);
        // Empty batch: anything that fits.
        assert_eq!(p.admit([small], 100, 0, 0), 1);
        // One running: a single waiter may join at once (floor(1.2) = 1).
        assert_eq!(p.admit([small], 100, 1, 0), 1);
        // Ten running: 3 waiters are not enough (need 12) ...
        assert_eq!(p.admit([small; 3], 100, 10, 3), 0);
        // ... unless they waited long enough ...
        assert_eq!(p.admit([small; 3], 100, 10, 20), 3);
        // ... or enough of them are waiting.
        assert_eq!(p.admit([small; 12], 100, 10, 3), 12);
        // Nothing fits: nothing to do.
        assert_eq!(p.admit([small], 0, 0, 100), 0);
    }

    #[test]
    fn admit_mixed_ignores_the_ratio_and_counts_pending_prompts() {
        let p = BatchingPolicy {
            max_batch_prefill_chunk_tokens: 32,
            ..policy()
        };
        assert!(p.mixed() && !policy().mixed());
        let small = c(5, 16);
        // Ten running would need 12 waiters under the ratio rule; a mixed step takes what fits.
        assert_eq!(p.admit_mixed([small; 3], 100, 0), 3);
        // 90 prompt tokens still running leave room for two more of 5 tokens.
        assert_eq!(p.admit_mixed([small; 3], 100, 90), 2);
        assert_eq!(p.admit_mixed([small], 100, 200), 0);
        assert_eq!(p.admit_mixed([small; 3], 2, 0), 2, "free blocks still bound admission");
    }

    #[test]
    fn step_budget_is_a_chunk_unless_nobody_decodes_or_requests_back_up() {
        let p = BatchingPolicy {
            max_batch_prefill_chunk_tokens: 32,
            ..policy()
        };
        assert_eq!(p.step_prompt_budget(5, [60]), 32, "decoding, no backlog: a chunk");
        assert_eq!(
            p.step_prompt_budget(5, [60, 40]),
            100,
            "backlog: every admitted prompt token"
        );
        assert_eq!(p.step_prompt_budget(0, []), 100, "nothing decoding: whole prompts");
        let wide = BatchingPolicy {
            max_batch_prefill_chunk_tokens: 300,
            ..policy()
        };
        assert_eq!(wide.step_prompt_budget(0, [100]), 300, "never below the chunk");
    }

    #[test]
    fn a_backlog_is_a_whole_budget_queued() {
        let p = policy();
        assert!(!p.backlog([]));
        assert!(!p.backlog([40, 59]), "99 of 100 tokens queued");
        assert!(p.backlog([40, 60]));
        assert!(p.backlog([100, u32::MAX]), "sums saturate");
    }
}
