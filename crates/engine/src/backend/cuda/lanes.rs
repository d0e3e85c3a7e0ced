//! A side stream ("lane") for work that may run beside the main stream within one step.
//!
//! A step with several adapters runs each projection's LoRA shrink (`x · Aᵀ`, lora.rs) after the projection's
//! GEMM, although it reads only the GEMM's input. At decode sizes cuBLAS's GEMM leaves multiprocessors and
//! bandwidth unused (54-81% of the copy bandwidth at 128 rows, bench/NOTES.md sessions 14 and 19), and the
//! shrink, a few microseconds of few blocks, can run beside it: [`CudaBackend::lora_project`] forks the lane,
//! launches the shrinks on it, runs the GEMM on the main stream, joins, and expands
//! (`LORAX_CUDA_LORA_OVERLAP`).
//!
//! **Ordering.** [`CudaBackend::fork`] makes the lane wait for the main stream's work so far (an event
//! recorded on it); [`CudaBackend::join`] makes the main stream wait for the lane's. Launches between the two
//! on the lane ([`CudaBackend::on_lane`]: this thread's kernels and GEMMs go to the lane's stream and cuBLAS
//! handle) run beside the main stream's. Under a graph capture the same calls make the lane part of the
//! capture, a fork and a join in the graph; while recording they only sign the step (`fork`, `join`), so
//! that graphs with and without them differ.
//!
//! The lane (a stream, a cuBLAS handle with a 16 MiB workspace, two events) is made when the overlap is first
//! turned on, at start-up or by [`CudaBackend::set_lora_overlap`] (never inside a graph capture).
//!
//! **Memory.** Eager allocations are stream-ordered on the main stream, so work on a lane must only touch
//! buffers allocated before the fork and kept alive past the join: then the lane waits for their allocation,
//! and their free (on the main stream) waits for the lane. The shrinks read x and the step's table and write
//! intermediates that the plan allocated before the fork; they allocate nothing.
//!
//! Kernels on a lane are launched without programmatic dependent launch (its edge names only the same
//! stream's previous kernel, which on a lane is an earlier step's).
//!
//! Tried and dropped (session 40): decode-sized GEMMs as pieces of output features, one on each of up to
//! three lanes. cuBLAS's whole product was faster at every size (b128 steps 9.72 ms whole, 10.03-10.80 in
//! 2-4 pieces; bench/results/2026-12-06-s40-2).

use std::cell::Cell;
use std::ffi::c_void;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use cudarc::cublas::{sys as blas_sys, CudaBlas};
use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr};

use super::{drv, graph, CudaBackend};
use crate::error::{EngineError, Result};

/// Bytes of the lane's cuBLAS workspace.
const LANE_WORKSPACE: usize = 16 << 20;

thread_local! {
    /// Whether this thread's launches go to the lane (else the main stream).
    static ON_LANE: Cell<bool> = const { Cell::new(false) };
}

/// Whether this thread's launches go to the lane now.
pub(crate) fn on_lane() -> bool {
    ON_LANE.with(Cell::get)
}

/// The side stream, its own cuBLAS handle (and workspace), and the events that fork it from the main stream
/// and join it back.
pub(crate) struct Lane {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    forked: CudaEvent,
    done: CudaEvent,
    _workspace: CudaSlice<u8>,
}

impl Lane {
    pub(crate) fn new(ctx: &Arc<CudaContext>) -> Result<Self> {
        let stream = ctx.new_stream().map_err(|e| drv("lane stream", e))?;
        let blas = CudaBlas::new(Arc::clone(&stream))
            .map_err(|e| EngineError::Backend(format!("the lane's cuBLAS: {e:?}")))?;
        let workspace = stream
            .alloc_zeros::<u8>(LANE_WORKSPACE)
            .map_err(|e| drv("allocating the lane's cuBLAS workspace", e))?;
        let (ws, sync) = workspace.device_ptr(&stream);
        // SAFETY: the workspace lives as long as the handle (both in the lane) and holds LANE_WORKSPACE bytes.
        unsafe { blas_sys::cublasSetWorkspace_v2(*blas.handle(), ws as *mut c_void, LANE_WORKSPACE) }
            .result()
            .map_err(|e| EngineError::Backend(format!("the lane's cuBLAS workspace: {e:?}")))?;
        drop(sync);
        Ok(Self {
            forked: ctx.new_event(None).map_err(|e| drv("lane event", e))?,
            done: ctx.new_event(None).map_err(|e| drv("lane event", e))?,
            stream,
            blas,
            _workspace: workspace,
        })
    }
}

impl CudaBackend {
    /// The lane, where it was made and this thread launches on it.
    fn current_lane(&self) -> Option<&Lane> {
        if on_lane() {
            self.lane.get()
        } else {
            None
        }
    }

    /// The stream this thread's launches go to now.
    pub(crate) fn lane_stream(&self) -> &Arc<CudaStream> {
        self.current_lane().map_or(&self.stream, |l| &l.stream)
    }

    /// The cuBLAS handle of the stream this thread's launches go to now.
    pub(crate) fn lane_blas(&self) -> &CudaBlas {
        self.current_lane().map_or(&self.blas, |l| &l.blas)
    }

    fn made_lane(&self) -> Result<&Lane> {
        self.lane
            .get()
            .ok_or_else(|| EngineError::Backend("the side stream was not made (LORAX_CUDA_LORA_OVERLAP)".into()))
    }

    /// Signs `what` into a graph step; `true` when the mode launches (eager or capture).
    fn lane_sign(&self, what: &[u8]) -> bool {
        let mode = graph::mode();
        if mode != graph::Mode::Eager {
            self.graphs.sign(what);
        }
        mode != graph::Mode::Record
    }

    /// The lane waits for the main stream's work so far.
    pub(crate) fn fork(&self) -> Result<()> {
        let lane = self.made_lane()?;
        if self.lane_sign(b"fork") {
            lane.forked
                .record(&self.stream)
                .map_err(|e| drv("recording the fork", e))?;
            lane.stream
                .wait(&lane.forked)
                .map_err(|e| drv("the lane waiting for the fork", e))?;
        }
        Ok(())
    }

    /// The main stream waits for the lane's work so far.
    pub(crate) fn join(&self) -> Result<()> {
        let lane = self.made_lane()?;
        if self.lane_sign(b"join") {
            lane.done
                .record(&lane.stream)
                .map_err(|e| drv("recording the lane's end", e))?;
            self.stream.wait(&lane.done).map_err(|e| drv("joining the lane", e))?;
        }
        Ok(())
    }

    /// Runs `f` with this thread's launches on the lane, between a [`CudaBackend::fork`] and a
    /// [`CudaBackend::join`] that cover it. `f` must allocate nothing (see the module's notes).
    pub(crate) fn on_lane<R>(&self, f: impl FnOnce() -> Result<R>) -> Result<R> {
        self.made_lane()?;
        let before = ON_LANE.with(|l| l.replace(true));
        let r = f();
        ON_LANE.with(|l| l.set(before));
        r
    }

    /// Whether steps with several adapters run their LoRA shrinks on the lane beside the projections' GEMMs
    /// now (`LORAX_CUDA_LORA_OVERLAP`; never from the lane itself).
    pub(crate) fn lora_overlap(&self) -> bool {
        self.lora_overlap_on.load(Ordering::Relaxed) && !on_lane() && self.lane.get().is_some()
    }

    /// Turns [`CudaBackend::lora_overlap`] on or off (as `LORAX_CUDA_LORA_OVERLAP`; for tests and comparisons),
    /// making the lane the first time it is turned on. Not while a step is being recorded or captured.
    pub fn set_lora_overlap(&self, on: bool) -> Result<()> {
        if on && self.lane.get().is_none() {
            let _ = self.lane.set(Lane::new(&self.ctx)?);
        }
        self.lora_overlap_on.store(on, Ordering::Relaxed);
        Ok(())
    }
}
