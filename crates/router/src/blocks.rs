//! KV-cache block allocation. The router owns the block tables: it hands each admitted request the ids
//! of the blocks that cover its prompt and all its new tokens, and sends them to every shard, so all
//! shards agree on where each sequence lives.
//!
//! The [`BlockAllocator`] is owned by the batching task (no locks). Each grant is a [`BlockAllocation`]
//! guard whose `Drop` sends the ids back over a channel; the allocator takes them back on its next
//! [`BlockAllocator::reclaim`], so a finished, failed or cancelled request cannot leak blocks.

use tokio::sync::mpsc;

use crate::metrics as m;

/// Number of `block_size`-token blocks needed for `tokens` tokens.
pub fn blocks_for(tokens: u32, block_size: u32) -> u32 {
    tokens.div_ceil(block_size.max(1))
}

/// Free-list allocator of the block ids `0..total`.
#[derive(Debug)]
pub struct BlockAllocator {
    /// Free ids, a stack: granted from the end, returned ids pushed back on it.
    free: Vec<u32>,
    total: u32,
    returns_tx: mpsc::UnboundedSender<Vec<u32>>,
    returns_rx: mpsc::UnboundedReceiver<Vec<u32>>,
}

impl BlockAllocator {
    /// An allocator of the blocks `0..total`, all free.
    pub fn new(total: u32) -> Self {
        let (returns_tx, returns_rx) = mpsc::unbounded_channel();
        let allocator = Self {
            free: (0..total).rev().collect(),
            total,
            returns_tx,
            returns_rx,
        };
        metrics::gauge!(m::KV_BLOCKS_TOTAL).set(f64::from(total));
        allocator.publish();
        allocator
    }

    /// Free blocks, counting those returned since the last reclaim.
    pub fn free_blocks(&mut self) -> u32 {
        self.reclaim();
        self.free_len()
    }

    /// Blocks currently granted.
    pub fn used_blocks(&mut self) -> u32 {
        self.reclaim();
        self.total - self.free_len()
    }

    fn free_len(&self) -> u32 {
        u32::try_from(self.free.len()).unwrap_or(u32::MAX)
    }

    /// Grants `n` blocks, or `None` (granting nothing) when fewer than `n` are free.
    pub fn allocate(&mut self, n: u32) -> Option<BlockAllocation> {
        self.reclaim();
        let n = n as usize;
        if n > self.free.len() {
            return None;
        }
        let blocks = self.free.split_off(self.free.len() - n);
        self.publish();
        Some(BlockAllocation {
            blocks,
            returns: self.returns_tx.clone(),
        })
    }

    /// Takes back the blocks of every guard dropped so far.
    pub fn reclaim(&mut self) {
        let mut any = false;
        while let Ok(blocks) = self.returns_rx.try_recv() {
            self.free.extend(blocks);
            any = true;
        }
        if any {
            self.publish();
        }
    }

    fn publish(&self) {
        metrics::gauge!(m::KV_BLOCKS_USED).set(f64::from(self.total - self.free_len()));
    }
}

/// Blocks granted to one request; returned to the allocator when dropped.
#[derive(Debug)]
pub struct BlockAllocation {
    blocks: Vec<u32>,
    returns: mpsc::UnboundedSender<Vec<u32>>,
}

impl BlockAllocation {
    /// The granted block ids.
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }
}

impl Drop for BlockAllocation {
    fn drop(&mut self) {
        let blocks = std::mem::take(&mut self.blocks);
        if !blocks.is_empty() {
            // Fails only when the allocator itself is gone, and then there is nothing to return to.
            let _ = self.returns.send(blocks);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn blocks_for_rounds_up() {
        assert_eq!(blocks_for(0, 16), 0);
        assert_eq!(blocks_for(1, 16), 1);
        assert_eq!(blocks_for(16, 16), 1);
        assert_eq!(blocks_for(17, 16), 2);
        assert_eq!(blocks_for(2048, 16), 128);
    }

    #[test]
    fn grants_distinct_blocks_and_refuses_when_short() {
        let mut a = BlockAllocator::new(10);
        let x = a.allocate(4).expect("4 of 10");
        let y = a.allocate(6).expect("6 of 6");
        assert!(a.allocate(1).is_none());
        let all: HashSet<u32> = x.blocks().iter().chain(y.blocks()).copied().collect();
        assert_eq!(all.len(), 10);
        assert!(all.iter().all(|&b| b < 10));
        assert_eq!(a.used_blocks(), 10);
    }

    #[test]
    fn drop_returns_blocks() {
        let mut a = BlockAllocator::new(8);
        let x = a.allocate(5).expect("5 of 8");
        assert_eq!(a.free_blocks(), 3);
        assert!(a.allocate(4).is_none(), "a refused grant takes nothing");
        assert_eq!(a.free_blocks(), 3);
        drop(x);
        assert_eq!(a.free_blocks(), 8);
        assert_eq!(a.used_blocks(), 0);
        let y = a.allocate(8).expect("everything again");
        assert_eq!(y.blocks().len(), 8);
    }

    #[test]
    fn guard_dropped_elsewhere_is_reclaimed() {
        let mut a = BlockAllocator::new(4);
        let x = a.allocate(4).expect("all");
        std::thread::spawn(move || drop(x)).join().expect("thread");
        assert_eq!(a.free_blocks(), 4);
    }

    #[test]
    fn zero_blocks() {
        let mut a = BlockAllocator::new(0);
        assert!(a.allocate(1).is_none());
        let empty = a.allocate(0).expect("nothing is always available");
        assert!(empty.blocks().is_empty());
    }
}
