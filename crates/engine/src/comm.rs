//! Collective communication between tensor-parallel ranks. The model needs one operation, the sum of a
//! tensor across ranks (after the row-parallel projections); [`Communicator`] is that seam. A shard
//! process provides one over its transport (Unix sockets between CPU shard processes, NCCL on GPUs);
//! [`SingleRank`] is the world of one; [`LocalGroup`] joins threads of one process (tests).

use std::sync::{Arc, Condvar, Mutex};

use crate::error::{EngineError, Result};

/// The ranks of one model, summing buffers together.
pub trait Communicator: Send + Sync {
    /// This rank (0-based).
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Replaces `data` by the element-wise sum of every rank's `data` (same length on every rank). Every
    /// rank receives the same bits: the sum is taken in rank order, once.
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()>;
}

/// A world of one rank: the sum is the buffer itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleRank;

impl Communicator for SingleRank {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, _data: &mut [f32]) -> Result<()> {
        Ok(())
    }
}

/// One round of a [`LocalGroup`] all-reduce.
#[derive(Default)]
struct Round {
    /// Contributions by rank for the round in progress.
    parts: Vec<Option<Vec<f32>>>,
    /// The finished sum of the last round, and how many ranks still have to collect it.
    result: Option<(Vec<f32>, usize)>,
}

/// Threads of one process acting as ranks (tests of the sharded model without processes).
pub struct LocalGroup {
    rank: usize,
    world: usize,
    shared: Arc<(Mutex<Round>, Condvar)>,
}

impl LocalGroup {
    /// `world` connected members, rank order.
    pub fn new(world: usize) -> Vec<LocalGroup> {
        let shared = Arc::new((
            Mutex::new(Round {
                parts: vec![None; world],
                result: None,
            }),
            Condvar::new(),
        ));
        (0..world)
            .map(|rank| LocalGroup {
                rank,
                world,
                shared: Arc::clone(&shared),
            })
            .collect()
    }
}

fn poisoned() -> EngineError {
    EngineError::Backend("a rank of the local group panicked".into())
}

impl Communicator for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()> {
        let (lock, cv) = &*self.shared;
        let mut round = lock.lock().map_err(|_| poisoned())?;
        // Wait until the previous round's result has been collected by everyone.
        while round.result.is_some() {
            round = cv.wait(round).map_err(|_| poisoned())?;
        }
        round.parts[self.rank] = Some(data.to_vec());
        if round.parts.iter().all(Option::is_some) {
            let mut sum = vec![0f32; data.len()];
            for part in round.parts.iter_mut() {
                let part = part.take().unwrap_or_default();
                if part.len() != sum.len() {
                    return Err(EngineError::Backend("all-reduce buffers differ in length".into()));
                }
                for (s, v) in sum.iter_mut().zip(part) {
                    *s += v;
                }
            }
            round.result = Some((sum, self.world));
            cv.notify_all();
        }
        loop {
            // This rank's part was taken by the round that produced `result`: collect it.
            let taken = round.parts[self.rank].is_none();
            if let (true, Some((sum, waiting))) = (taken, round.result.as_mut()) {
                data.copy_from_slice(sum);
                *waiting -= 1;
                if *waiting == 0 {
                    round.result = None;
                    cv.notify_all();
                }
                return Ok(());
            }
            round = cv.wait(round).map_err(|_| poisoned())?;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn local_group_sums_in_many_rounds() {
        let members = LocalGroup::new(3);
        let handles: Vec<_> = members
            .into_iter()
            .map(|m| {
                std::thread::spawn(move || {
                    let mut out = Vec::new();
                    for round in 0..50 {
                        let mut v = vec![m.rank() as f32 + round as f32, 1.0];
                        m.all_reduce_sum(&mut v).unwrap();
                        out.push(v);
                    }
                    out
                })
            })
            .collect();
        for h in handles {
            let out = h.join().unwrap();
            for (round, v) in out.iter().enumerate() {
                assert_eq!(v, &vec![3.0 + 3.0 * round as f32, 3.0], "round {round}");
            }
        }
    }
}
