//! The paged KV cache: per layer, keys and values in fixed-size blocks of `block_size` token slots.
//!
//! The cache itself knows nothing of sequences: callers (the router in production) hand each sequence
//! a block table, and the model writes token `p` of a sequence to slot
//! `block_table[p / block_size] * block_size + p % block_size`.

use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};

/// Keys and values of every layer, in blocks.
pub struct KvCache<B: Backend> {
    /// Per layer: keys `[num_blocks * block_size, kv_dim]`.
    pub k: Vec<B::Tensor>,
    /// Per layer: values, same shape.
    pub v: Vec<B::Tensor>,
    /// Number of blocks.
    pub num_blocks: usize,
    /// Token slots per block.
    pub block_size: usize,
}

impl<B: Backend> KvCache<B> {
    /// Allocate `num_blocks` blocks of `block_size` slots for every layer of `cfg` (local heads:
    /// `kv_heads` is the number this shard holds).
    pub fn new(backend: &B, cfg: &ModelConfig, kv_heads: usize, num_blocks: usize, block_size: usize) -> Result<Self> {
        if block_size == 0 || num_blocks == 0 {
            return Err(EngineError::InvalidBatch(
                "the KV cache needs at least one block of one slot".into(),
            ));
        }
        let shape = [num_blocks * block_size, kv_heads * cfg.head_dim];
        let mut k = Vec::with_capacity(cfg.num_layers);
        let mut v = Vec::with_capacity(cfg.num_layers);
        for _ in 0..cfg.num_layers {
            k.push(backend.zeros(&shape)?);
            v.push(backend.zeros(&shape)?);
        }
        Ok(Self {
            k,
            v,
            num_blocks,
            block_size,
        })
    }

    /// Slot of token position `pos` of a sequence with this block table.
    pub fn slot(&self, block_table: &[u32], pos: usize) -> Result<u32> {
        let block = *block_table.get(pos / self.block_size).ok_or_else(|| {
            EngineError::InvalidBatch(format!(
                "position {pos} needs block {} but the block table has {}",
                pos / self.block_size,
                block_table.len()
            ))
        })?;
        if block as usize >= self.num_blocks {
            return Err(EngineError::InvalidBatch(format!(
                "block {block} is outside the cache ({} blocks)",
                self.num_blocks
            )));
        }
        u32::try_from(block as usize * self.block_size + pos % self.block_size)
            .map_err(|_| EngineError::InvalidBatch("cache slot overflows u32".into()))
    }
}

/// A free list of block ids, for callers without a router (tests, benchmarks, tools).
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    free: Vec<u32>,
    block_size: usize,
}

impl BlockAllocator {
    /// All `num_blocks` blocks free.
    pub fn new(num_blocks: u32, block_size: usize) -> Self {
        Self {
            free: (0..num_blocks).rev().collect(),
            block_size,
        }
    }

    /// Blocks for `tokens` tokens, or `None` when not enough are free (nothing is taken then).
    pub fn allocate(&mut self, tokens: usize) -> Option<Vec<u32>> {
        let n = tokens.div_ceil(self.block_size).max(1);
        if n > self.free.len() {
            return None;
        }
        Some(self.free.split_off(self.free.len() - n))
    }

    /// Return blocks.
    pub fn free(&mut self, blocks: &[u32]) {
        self.free.extend_from_slice(blocks);
    }

    /// Number of free blocks.
    pub fn available(&self) -> usize {
        self.free.len()
    }
}
