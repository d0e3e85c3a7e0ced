//! Side streams ("lanes") for work that may run beside the main stream within one step.
//!
//! A decode-sized cuBLAS GEMM (tens to a few hundred rows) is bound by reading its weights, yet cuBLAS gives
//! the q/k/v, o and down shapes too few blocks to keep the copy bandwidth busy (54-68% of it at 128 rows,
//! bench/NOTES.md sessions 14 and 19). Run as pieces of whole output-feature ranges, each piece on a lane of
//! its own, the products share the multiprocessors: [`CudaBackend::gemm_pieces`].
//!
//! **Ordering.** [`CudaBackend::fork`] makes lanes `1..=n` wait for the main stream's work so far (an event
//! recorded on it); [`CudaBackend::join`] makes the main stream wait for theirs. Launches between the two on a
//! lane ([`CudaBackend::on_lane`]: this thread's kernels and GEMMs go to that lane's stream and cuBLAS handle)
//! run beside the main stream's. Under a graph capture the same calls make the lanes part of the capture, a
//! fork and a join in the graph; while recording they only sign the step (`fork`/`join` and the lane count),
//! so that graphs with and without them differ.
//!
//! **Memory.** Eager allocations are stream-ordered on the main stream, so work on a lane must only touch
//! buffers allocated before the fork and kept alive past the join: then the lane waits for their allocation,
//! and their free (on the main stream) waits for the lane. The pieces of [`CudaBackend::gemm_pieces`] write
//! disjoint columns of one output allocated before the fork, read inputs made before it, and allocate nothing
//! (their cuBLAS handles have workspaces of their own, set at start-up).
//!
//! Kernels on a lane are launched without programmatic dependent launch (its edge names only the same
//! stream's previous kernel, which on a lane is an earlier step's).
//!
//! `LORAX_CUDA_GEMM_PIECES` (default 1: off; 2-4) sets the pieces of decode-sized GEMMs (more rows than the
//! gemv kernels take and at most [`PIECES_MAX_ROWS`]), each at least [`PIECE_MIN_FEATURES`] output features.

use std::cell::Cell;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::{sys as blas_sys, CudaBlas};
use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr};

use super::{drv, graph, CudaBackend};
use crate::error::{EngineError, Result};

/// GEMMs of at most this many rows may run as pieces (larger ones keep the multiprocessors busy alone).
pub const PIECES_MAX_ROWS: usize = 256;
/// The fewest output features of a piece.
pub const PIECE_MIN_FEATURES: usize = 1024;
/// The most pieces (lanes + the main stream).
pub const MAX_PIECES: usize = 4;
/// Bytes of each lane's cuBLAS workspace.
const LANE_WORKSPACE: usize = 16 << 20;

thread_local! {
    /// The lane this thread's launches go to (0: the main stream).
    static LANE: Cell<usize> = const { Cell::new(0) };
}

/// The lane this thread's launches go to now (0: the main stream).
pub(crate) fn lane() -> usize {
    LANE.with(Cell::get)
}

/// A side stream with its own cuBLAS handle (and workspace) and the event its work is joined by.
pub(crate) struct Lane {
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) blas: CudaBlas,
    done: CudaEvent,
    _workspace: CudaSlice<u8>,
}

/// The lanes of a backend and the event that forks them from the main stream.
pub(crate) struct Lanes {
    pub(crate) lanes: Vec<Lane>,
    fork: Option<CudaEvent>,
    /// The fewest output features of a GEMM's piece ([`PIECE_MIN_FEATURES`]; tests of small models lower it).
    pub(crate) min_features: usize,
}

impl Lanes {
    /// `n` lanes on `ctx` (none: no streams, handles or events at all).
    pub(crate) fn new(ctx: &Arc<CudaContext>, n: usize) -> Result<Self> {
        let mut lanes = Vec::with_capacity(n);
        for i in 0..n {
            let stream = ctx.new_stream().map_err(|e| drv("lane stream", e))?;
            let blas = CudaBlas::new(Arc::clone(&stream))
                .map_err(|e| EngineError::Backend(format!("cuBLAS handle of lane {}: {e:?}", i + 1)))?;
            let workspace = stream
                .alloc_zeros::<u8>(LANE_WORKSPACE)
                .map_err(|e| drv("allocating a lane's cuBLAS workspace", e))?;
            let (ws, _sync) = workspace.device_ptr(&stream);
            // SAFETY: the workspace lives as long as the handle (both in the lane) and holds LANE_WORKSPACE
            // bytes.
            unsafe { blas_sys::cublasSetWorkspace_v2(*blas.handle(), ws as *mut c_void, LANE_WORKSPACE) }
                .result()
                .map_err(|e| EngineError::Backend(format!("cuBLAS workspace of lane {}: {e:?}", i + 1)))?;
            drop(_sync);
            let done = ctx.new_event(None).map_err(|e| drv("lane event", e))?;
            lanes.push(Lane {
                stream,
                blas,
                done,
                _workspace: workspace,
            });
        }
        let fork = if n > 0 {
            Some(ctx.new_event(None).map_err(|e| drv("fork event", e))?)
        } else {
            None
        };
        Ok(Self {
            lanes,
            fork,
            min_features: PIECE_MIN_FEATURES,
        })
    }
}

/// Pieces of a GEMM of `rows` rows and `features` output features, at most `pieces`, each of at least
/// `min_features` features (see [`piece_range`]); 1 when the rows are not decode-sized.
pub fn pieces_for(rows: usize, features: usize, pieces: usize, min_features: usize) -> usize {
    if rows > PIECES_MAX_ROWS {
        return 1;
    }
    let mut p = pieces.clamp(1, MAX_PIECES);
    while p > 1 && features / p < min_features.max(64) {
        p -= 1;
    }
    p
}

/// The output features of piece `i` of `p` over `features`: `[start, end)`, in whole multiples of 64 (the last
/// piece takes what remains), so that every piece's columns start 128-byte aligned.
pub fn piece_range(features: usize, p: usize, i: usize) -> (usize, usize) {
    let per = features.div_ceil(p).div_ceil(64) * 64;
    let start = (i * per).min(features);
    let end = if i + 1 == p {
        features
    } else {
        ((i + 1) * per).min(features)
    };
    (start, end)
}

impl CudaBackend {
    /// The stream this thread's launches go to now.
    pub(crate) fn lane_stream(&self) -> &Arc<CudaStream> {
        match lane() {
            0 => &self.stream,
            i => &self.lanes.lanes[i - 1].stream,
        }
    }

    /// The cuBLAS handle of this thread's lane.
    pub(crate) fn lane_blas(&self) -> &CudaBlas {
        match lane() {
            0 => &self.blas,
            i => &self.lanes.lanes[i - 1].blas,
        }
    }

    /// Lanes `1..=n` wait for the main stream's work so far.
    pub(crate) fn fork(&self, n: usize) -> Result<()> {
        let n = self.check_lanes(n)?;
        let mode = graph::mode();
        if mode != graph::Mode::Eager {
            self.graphs.sign(b"fork");
            self.graphs.sign(&(n as u64).to_le_bytes());
            if mode == graph::Mode::Record {
                return Ok(());
            }
        }
        let Some(fork) = &self.lanes.fork else {
            return Ok(());
        };
        fork.record(&self.stream).map_err(|e| drv("recording the fork", e))?;
        for l in &self.lanes.lanes[..n] {
            l.stream.wait(fork).map_err(|e| drv("a lane waiting for the fork", e))?;
        }
        Ok(())
    }

    /// The main stream waits for lanes `1..=n`'s work so far.
    pub(crate) fn join(&self, n: usize) -> Result<()> {
        let n = self.check_lanes(n)?;
        let mode = graph::mode();
        if mode != graph::Mode::Eager {
            self.graphs.sign(b"join");
            self.graphs.sign(&(n as u64).to_le_bytes());
            if mode == graph::Mode::Record {
                return Ok(());
            }
        }
        for l in &self.lanes.lanes[..n] {
            l.done.record(&l.stream).map_err(|e| drv("recording a lane's end", e))?;
            self.stream.wait(&l.done).map_err(|e| drv("joining a lane", e))?;
        }
        Ok(())
    }

    fn check_lanes(&self, n: usize) -> Result<usize> {
        if n > self.lanes.lanes.len() {
            return Err(EngineError::Backend(format!(
                "{n} lanes asked for, {} made",
                self.lanes.lanes.len()
            )));
        }
        Ok(n)
    }

    /// Runs `f` with this thread's launches on lane `i` (0: the main stream), between a [`CudaBackend::fork`]
    /// and a [`CudaBackend::join`] that cover it. `f` must allocate nothing (see the module's notes).
    pub(crate) fn on_lane<R>(&self, i: usize, f: impl FnOnce() -> Result<R>) -> Result<R> {
        if i > self.lanes.lanes.len() {
            return Err(EngineError::Backend(format!("lane {i} of {}", self.lanes.lanes.len())));
        }
        let before = LANE.with(|l| l.replace(i));
        let r = f();
        LANE.with(|l| l.set(before));
        r
    }

    /// Pieces this backend splits a GEMM of `rows` x `features` into (1: whole).
    pub(crate) fn gemm_pieces_for(&self, rows: usize, features: usize) -> usize {
        if lane() != 0 || self.lanes.lanes.is_empty() {
            return 1;
        }
        pieces_for(rows, features, self.lanes.lanes.len() + 1, self.lanes.min_features)
    }

    /// Decode-sized GEMMs in `pieces` pieces (1: whole) of at least `min_features` output features each
    /// (as `LORAX_CUDA_GEMM_PIECES`, whose pieces have at least [`PIECE_MIN_FEATURES`]; for tests and
    /// comparisons). Makes the lanes anew.
    pub fn set_gemm_pieces(&mut self, pieces: usize, min_features: usize) -> Result<()> {
        if !(1..=MAX_PIECES).contains(&pieces) {
            return Err(EngineError::Backend(format!("{pieces} GEMM pieces: 1 to {MAX_PIECES}")));
        }
        self.stream.synchronize().map_err(|e| drv("synchronize", e))?;
        self.lanes = Lanes::new(&self.ctx, pieces - 1)?;
        self.lanes.min_features = min_features;
        Ok(())
    }

    /// `y[m, n] = x · wᵀ` ([`CudaBackend::gemm_into`]) as [`CudaBackend::gemm_pieces_for`] pieces of whole
    /// output-feature ranges: piece i > 0 on lane i, piece 0 on the main stream, forked and joined around them.
    /// `y`, `x` and `w` are device addresses of dense matrices the caller checked for the whole product.
    pub(crate) fn gemm_pieces(&self, (m, n, k): (usize, usize, usize), (yp, xp, wp): (u64, u64, u64)) -> Result<()> {
        let p = self.gemm_pieces_for(m, n);
        if p <= 1 {
            return self.gemm_into((m, n, k), (yp, xp, wp), n, (1.0, 0.0));
        }
        let size = self.dtype.size() as u64;
        let piece = |i: usize| {
            let (s, e) = piece_range(n, p, i);
            if e == s {
                return Ok(());
            }
            self.gemm_into(
                (m, e - s, k),
                (yp + s as u64 * size, xp, wp + (s * k) as u64 * size),
                n,
                (1.0, 0.0),
            )
        };
        self.fork(p - 1)?;
        for i in 1..p {
            self.on_lane(i, || piece(i))?;
        }
        piece(0)?;
        self.join(p - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_features_in_aligned_ranges() {
        for features in [1024, 2048, 4096, 4160, 6144, 6240, 14336, 28672] {
            for p in 1..=MAX_PIECES {
                let mut next = 0;
                for i in 0..p {
                    let (s, e) = piece_range(features, p, i);
                    assert_eq!(s, next, "{features} features, {p} pieces: piece {i} starts at {s}");
                    assert!(s % 64 == 0, "{features}/{p}: piece {i} starts at {s}");
                    next = e;
                }
                assert_eq!(next, features, "{features} features in {p} pieces end at {next}");
            }
        }
    }

    #[test]
    fn only_decode_sized_products_of_wide_enough_pieces_split() {
        let min = PIECE_MIN_FEATURES;
        assert_eq!(pieces_for(128, 6144, 4, min), 4);
        assert_eq!(pieces_for(128, 6144, 2, min), 2);
        assert_eq!(pieces_for(257, 6144, 4, min), 1, "prefill-sized rows stay whole");
        assert_eq!(
            pieces_for(128, 3000, 4, min),
            2,
            "pieces of at least PIECE_MIN_FEATURES"
        );
        assert_eq!(pieces_for(128, 1500, 4, min), 1);
        assert_eq!(pieces_for(64, 4096, 9, min), MAX_PIECES);
        assert_eq!(pieces_for(8, 4096, 1, min), 1);
        assert_eq!(pieces_for(8, 256, 4, 64), 4, "tests' small models");
        assert_eq!(pieces_for(8, 100, 4, 0), 1, "at least 64 features a piece");
    }
}
