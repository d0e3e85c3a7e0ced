//! CUDA graphs for decode steps.
//!
//! A decode step launches about 15 kernels per layer (and uploads a few small metadata arrays), so at
//! small batches the GPU waits on the host's launches. [`CudaBackend::graph_step`] runs the model's forward
//! pass through a captured graph instead:
//!
//! 1. **Record.** The forward pass runs with launches switched off: every op does its host work (checks,
//!    metadata) as usual, but its outputs come from a bump-allocated *work arena*, its uploads are written
//!    into a pinned host mirror of a bump-allocated *metadata arena*, and each launch's kernel, grid and
//!    arguments (each GEMM's shape and pointers, each memset) go into a signature.
//! 2. **Replay.** If a graph with that signature was captured before, the metadata mirror is copied to the
//!    device in one copy and the graph is launched.
//! 3. **Capture.** Otherwise the forward pass runs again under stream capture (the same op order gives the
//!    same arena offsets, so the same pointers), is instantiated, kept (least recently used go first), and
//!    launched as in 2. Only a signature seen before is captured: the first step with a new one runs
//!    eagerly. A capture keeps the device waiting while the host captures and instantiates the pass (8-15
//!    ms a capture in session 27's serving logs), and a batch that shrinks as its requests finish passes
//!    through a new row count nearly every step, paying for graphs it never replays (`cuda_graphs`,
//!    a batch of 128 losing 6 a step on an H200: 17.03 ms a step capturing at once, 7.06 at the second
//!    sighting).
//!
//! 4. **Ahead.** While a replayed step runs, the engine may record the next one
//!    ([`CudaBackend::graph_prepare`]: the same batch, each sequence one token further on, its token ids
//!    not known yet). If the next step turns out to have those inputs, [`CudaBackend::graph_prepared`]
//!    writes its token ids into the recorded metadata and replays, so the record pass's host time is
//!    spent while the device is busy instead of between steps. Any other record pass forgets the
//!    recorded one (it overwrites the mirror).
//! 5. **Fed.** A pure decode step whose next step was recorded ahead samples on the device and launches
//!    that step at once ([`CudaBackend::graph_feed`]): after the sampling kernel come the copy of its
//!    tokens to pinned memory, the metadata copy, `feed_tokens` (each chosen token written into its
//!    sequence's token row) and the graph, so the device runs the next step while the host hands the
//!    tokens out. The engine uses it for each row whose inputs are those it was launched with; where it
//!    serves every decode row of a step with prompt tokens, those wait for the next step (`Engine::step`).
//!    On by default (`LORAX_CUDA_GRAPH_FEED=0` turns it off). Like graphs and steps recorded ahead, only on
//!    one rank: a tensor-parallel engine runs its decode steps eagerly.
//!
//! Equal signatures mean the same kernels with the same grids, scalar arguments and pointers; what changes
//! between replays is the metadata's content (tokens, positions, cache slots, block tables, LoRA segment
//! tables), which the copy refreshes. Upload sizes are rounded up to powers of two, so that a block table
//! growing by one block does not change the layout; a decode step's block tables are uploaded at a size
//! set by its rows and its longest table (`attention::decode_tables_len`), not by the contexts' total. (The
//! LoRA records' table has the size of its padded record count, which the grids also take.) The arena memory is never reused within a step, and
//! one step runs at a time, so all graphs share the two arenas.
//!
//! The mode is per thread: another thread using the backend meanwhile (say, uploading an adapter) is not
//! recorded or captured, and must use its own stream.
//!
//! The engine pads a decode step's rows to [`CudaBackend::graph_rows`] (rows that write no keys or
//! values and whose outputs are dropped), so a batch whose size wanders as requests finish and join
//! replays a few graphs rather than capturing one per size.
//!
//! Switches: `LORAX_CUDA_GRAPHS=0` turns graphs off; `LORAX_CUDA_GRAPH_AHEAD=0` records no step ahead;
//! `LORAX_CUDA_GRAPH_FEED=0` launches no decode step from the sampling before it (5); `LORAX_CUDA_GRAPH_MAX_BATCH`
//! (default 256) is the
//! largest batch that uses them; `LORAX_CUDA_GRAPH_CACHE` (default 64) the graphs kept;
//! `LORAX_CUDA_GRAPH_CAPTURE_AFTER` (default 2) the step with a signature at which its graph is captured
//! (the steps before run eagerly; 1: at once). A limit that is not a whole number in its range, or a switch set to
//! anything but `1` or `0`, is a start-up error.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cudarc::driver::{result as drv_result, sys as drv_sys, CudaGraph, CudaSlice, PinnedHostSlice, PushKernelArg};

use super::{cfg, drv, int, plain_bytes, uint, CudaBackend, CudaTensor, DevBuf};
use crate::error::{EngineError, Result};
use cudarc::driver::CudaEvent;

/// How ops on this thread treat launches, allocations and uploads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Launch, allocate and upload as usual.
    Eager,
    /// Launch nothing; allocate and upload into the arenas; sign every launch.
    Record,
    /// As `Record`, but launches go into the stream's capture.
    Capture,
}

thread_local! {
    static MODE: Cell<Mode> = const { Cell::new(Mode::Eager) };
    /// The signature of the pass being recorded or captured on this thread (FNV-1a over launch bytes):
    /// per thread like the mode, so signing takes no lock.
    static SIG: Cell<u64> = const { Cell::new(FNV_OFFSET) };
}

/// This thread's signature so far.
fn signature() -> u64 {
    SIG.with(Cell::get)
}

/// This thread's mode.
pub(crate) fn mode() -> Mode {
    MODE.with(Cell::get)
}

/// Runs `f` with this thread's launches, allocations and uploads eager (done on the stream, not recorded),
/// then gives the thread its mode back: device work a recorded step needs done before its replay rather than
/// inside its graph. Not while capturing (the stream would capture it).
pub(crate) fn eagerly<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(Mode);
    impl Drop for Restore {
        fn drop(&mut self) {
            MODE.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(mode());
    MODE.with(|c| c.set(Mode::Eager));
    f()
}

/// Sets this thread's mode until dropped (then back to eager, also on early returns).
struct ModeGuard;

impl ModeGuard {
    fn set(m: Mode) -> Self {
        MODE.with(|c| c.set(m));
        Self
    }
}

impl Drop for ModeGuard {
    fn drop(&mut self) {
        MODE.with(|c| c.set(Mode::Eager));
    }
}

/// Arena allocations are aligned to this many bytes.
const ALIGN: usize = 256;

/// Signatures [`Inner::seen`] remembers.
const SEEN_KEPT: usize = 1024;

struct Arena {
    owner: Arc<CudaSlice<u8>>,
    base: u64,
    cap: usize,
}

/// A captured graph; only touched under the engine's lock (one step at a time).
struct Captured(CudaGraph);
// SAFETY: the graph is used from one thread at a time (under `Graphs::inner`'s lock); CUDA graph
// handles are not tied to the thread that made them.
unsafe impl Send for Captured {}

struct Inner {
    work: Option<Arena>,
    meta: Option<Arena>,
    /// Pinned host mirror of the metadata arena (same capacity).
    host: Option<PinnedHostSlice<u8>>,
    host_ptr: usize,
    work_used: usize,
    meta_used: usize,
    graphs: HashMap<u64, (Captured, u64)>,
    /// Signatures seen but not captured yet: how many steps had each, and when the last did (the replay
    /// clock). At most [`SEEN_KEPT`]; the longest unseen go first.
    seen: HashMap<u64, (usize, u64)>,
    /// Steps run eagerly because their signature had not been seen often enough to capture.
    uncaptured_steps: u64,
    clock: u64,
    replays: u64,
    captures: u64,
    /// Host time spent capturing and instantiating graphs, all captures together.
    capture_time: std::time::Duration,
    /// A copy of the mirror may still be in flight: wait for `copied` before writing it again.
    copy_pending: bool,
    /// Recorded on the stream after the last copy from the mirror.
    copied: Option<CudaEvent>,
    /// Where the pass being recorded put its token ids in the mirror (offset, bytes); `None` also when
    /// it uploaded them twice (then it cannot be replayed with other tokens).
    tokens_at: Option<(usize, usize)>,
    /// Token uploads in the pass being recorded.
    token_uploads: u32,
    /// A step recorded ahead ([`CudaBackend::graph_prepare`]), whose metadata is in the mirror.
    prepared: Option<Prepared>,
    /// Replays of steps recorded ahead.
    ahead_replays: u64,
    /// Replays of steps recorded ahead launched by the step before's sampling ([`CudaBackend::graph_feed`]).
    fed_replays: u64,
    /// Timing events around the last three replays (made at the first replay).
    timing: Option<ReplayTiming>,
}

/// Timing events recorded on the stream around each replay, in a ring of three: once replay n is launched,
/// replay n - 1's graph has run (its step's tokens were waited for), so its device time is read, and with replay
/// n - 2's end, the device's gap before it (the step before's sampling and copy back, then the device idle until
/// the metadata copy and the launch), when the two were consecutive steps: no other engine step began
/// between them ([`Graphs::count_step`]; eager steps and steps with prompt tokens are counted too).
struct ReplayTiming {
    start: [CudaEvent; 3],
    end: [CudaEvent; 3],
    /// The engine steps begun before each slot's replay (its own included).
    serial: [u64; 3],
    /// Replays timed so far.
    n: u64,
    /// `n` when the events were last read ([`CudaBackend::read_replay_timing`]).
    read: u64,
}

impl Inner {
    /// Counts a step whose signature `sig` has no graph (after its replay was tried, so `clock` is this
    /// step's): `true` when it is the `capture_after`-th such step, and the graph should be captured now;
    /// otherwise the step is counted as run eagerly.
    fn sighted(&mut self, sig: u64, capture_after: usize) -> bool {
        let now = self.clock;
        let count = self.seen.get(&sig).map_or(0, |&(n, _)| n) + 1;
        if count >= capture_after {
            self.seen.remove(&sig);
            return true;
        }
        if !self.seen.contains_key(&sig) && self.seen.len() >= SEEN_KEPT {
            if let Some(old) = self.seen.iter().min_by_key(|(_, &(_, t))| t).map(|(&k, _)| k) {
                self.seen.remove(&old);
            }
        }
        self.seen.insert(sig, (count, now));
        self.uncaptured_steps += 1;
        false
    }
}

impl ReplayTiming {
    /// After replay n was recorded: replay n - 1's device time, and the device's gap between replay n - 2's
    /// end and replay n - 1's start when they were consecutive steps (nanoseconds; `None` where not yet
    /// known, or not complete).
    fn last(&self) -> (Option<u64>, Option<u64>) {
        let ns = |a: &CudaEvent, b: &CudaEvent| -> Option<u64> {
            if !(a.is_complete() && b.is_complete()) {
                return None;
            }
            let ms = a.elapsed_ms(b).ok()?;
            (ms >= 0.0).then(|| (f64::from(ms) * 1e6) as u64)
        };
        if self.n < 2 {
            return (None, None);
        }
        let j = ((self.n - 2) % 3) as usize;
        let device = ns(&self.start[j], &self.end[j]);
        let gap = if self.n >= 3 {
            let k = ((self.n - 3) % 3) as usize;
            (self.serial[j] == self.serial[k] + 1)
                .then(|| ns(&self.end[k], &self.start[j]))
                .flatten()
        } else {
            None
        };
        (device, gap)
    }
}

/// Token ids a replay takes from the device ([`CudaBackend::graph_feed`]): `n` words `stride` apart from `src`,
/// written to the rows `slots` (a device array of `n`) of `dst` (the metadata arena's token slot).
struct Feed {
    dst: u64,
    src: u64,
    slots: u64,
    n: usize,
    stride: usize,
}

/// A step recorded ahead of its turn.
struct Prepared {
    sig: u64,
    out: CudaTensor,
    meta_used: usize,
    tokens_at: (usize, usize),
    record_ns: u64,
}

/// Host time of graph steps, reported at info level every [`CLOCK_REPORT_STEPS`] steps ("graph steps:
/// host time"): the record pass (the forward pass's host work), the LoRA and attention plans within it,
/// and the replay (signature lookup, metadata copy, launch), per step.
#[derive(Default)]
pub(crate) struct StepClock {
    steps: AtomicU64,
    record_ns: AtomicU64,
    lora_ns: AtomicU64,
    attn_ns: AtomicU64,
    replay_ns: AtomicU64,
    meta_bytes: AtomicU64,
    /// Steps whose record pass ran while the step before was on the device.
    ahead: AtomicU64,
    /// Device time of replayed graphs (timing events around the launch), and how many were timed.
    device_ns: AtomicU64,
    device_steps: AtomicU64,
    /// The device's gap before a replay that followed another at once (the step before's sampling and copy
    /// back, then idle until the launch), and how many were timed.
    gap_ns: AtomicU64,
    gap_steps: AtomicU64,
    /// The device times and gaps counted since the backend started (never reset by the reports).
    device_all_ns: AtomicU64,
    device_all_steps: AtomicU64,
    gap_all_steps: AtomicU64,
}

/// Graph steps per host-time report.
const CLOCK_REPORT_STEPS: u64 = 256;

fn nanos(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

impl StepClock {
    /// Counts a LoRA (`lora`) or attention plan begun at `since`, when made by a graph step's record pass.
    pub(crate) fn plan(&self, lora: bool, since: Instant) {
        if mode() == Mode::Record {
            let c = if lora { &self.lora_ns } else { &self.attn_ns };
            c.fetch_add(nanos(since), Ordering::Relaxed);
        }
    }

    /// Counts a replay's device time and the gap before it (nanoseconds), where they were timed.
    fn device(&self, device: Option<u64>, gap: Option<u64>) {
        if let Some(d) = device {
            self.device_ns.fetch_add(d, Ordering::Relaxed);
            self.device_steps.fetch_add(1, Ordering::Relaxed);
            self.device_all_ns.fetch_add(d, Ordering::Relaxed);
            self.device_all_steps.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(g) = gap {
            self.gap_ns.fetch_add(g, Ordering::Relaxed);
            self.gap_steps.fetch_add(1, Ordering::Relaxed);
            self.gap_all_steps.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts one graph step (its record pass, made `ahead` of its turn or not, and its replay) and
    /// reports every CLOCK_REPORT_STEPS.
    fn step(&self, record_ns: u64, replay_ns: u64, meta: usize, ahead: bool) {
        self.record_ns.fetch_add(record_ns, Ordering::Relaxed);
        self.ahead.fetch_add(u64::from(ahead), Ordering::Relaxed);
        self.replay_ns.fetch_add(replay_ns, Ordering::Relaxed);
        self.meta_bytes.fetch_add(meta as u64, Ordering::Relaxed);
        if self.steps.fetch_add(1, Ordering::Relaxed) + 1 < CLOCK_REPORT_STEPS {
            return;
        }
        let per = |c: &AtomicU64| c.swap(0, Ordering::Relaxed) as f64 / CLOCK_REPORT_STEPS as f64;
        let mean = |c: &AtomicU64, n: &AtomicU64| {
            let n = n.swap(0, Ordering::Relaxed);
            (c.swap(0, Ordering::Relaxed) as f64 / n.max(1) as f64 / 1e3, n)
        };
        let (device_us, device_steps) = mean(&self.device_ns, &self.device_steps);
        let (gap_us, gap_steps) = mean(&self.gap_ns, &self.gap_steps);
        self.steps.store(0, Ordering::Relaxed);
        tracing::info!(
            steps = CLOCK_REPORT_STEPS,
            record_us = format!("{:.0}", per(&self.record_ns) / 1e3),
            lora_plan_us = format!("{:.0}", per(&self.lora_ns) / 1e3),
            attention_plan_us = format!("{:.0}", per(&self.attn_ns) / 1e3),
            replay_us = format!("{:.0}", per(&self.replay_ns) / 1e3),
            metadata_kb = format!("{:.0}", per(&self.meta_bytes) / 1024.0),
            ahead = self.ahead.swap(0, Ordering::Relaxed),
            device_us = format!("{device_us:.0}"),
            device_steps,
            gap_us = format!("{gap_us:.0}"),
            gap_steps,
            "graph steps: host time"
        );
    }
}

/// The graph state of a backend.
pub(crate) struct Graphs {
    inner: Mutex<Inner>,
    enabled: AtomicBool,
    /// Largest batch that uses graphs; lowered when an arena for a larger one cannot be allocated.
    max_batch: AtomicUsize,
    max_graphs: usize,
    /// The step with a signature at which its graph is captured (1: the first; the steps before run
    /// eagerly).
    capture_after: AtomicUsize,
    /// Rows of the step in progress (for the message and limit after a failed arena allocation).
    step_rows: AtomicUsize,
    /// Whether the engine may record a step ahead ([`CudaBackend::graph_prepare`]).
    ahead: AtomicBool,
    /// Whether a step recorded ahead may be launched by the sampling of the step before, its tokens gathered
    /// on the device ([`CudaBackend::graph_feed`]; on unless `LORAX_CUDA_GRAPH_FEED=0`: with it on, and prompts waiting
    /// for the step after one launched ahead, session 49 met every bench.sh target except the peft ratio;
    /// bench/NOTES.md sessions 48-49).
    feed: AtomicBool,
    /// Engine steps begun so far ([`Graphs::count_step`]).
    steps_begun: AtomicU64,
    /// Whether replays are timed with events (`LORAX_CUDA_GRAPH_TIMING=0` turns it off).
    timing: bool,
    /// Host time of graph steps.
    pub(crate) clock: StepClock,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// A value that can be part of a launch's signature.
pub(crate) trait SigArg {
    /// Adds its bytes to the signature being recorded.
    fn sign_into(&self, graphs: &Graphs);
}

impl SigArg for u64 {
    fn sign_into(&self, graphs: &Graphs) {
        graphs.sign(&self.to_le_bytes());
    }
}

impl SigArg for i32 {
    fn sign_into(&self, graphs: &Graphs) {
        graphs.sign(&i64::from(*self).to_le_bytes());
    }
}

impl SigArg for u32 {
    fn sign_into(&self, graphs: &Graphs) {
        graphs.sign(&u64::from(*self).to_le_bytes());
    }
}

impl SigArg for f32 {
    fn sign_into(&self, graphs: &Graphs) {
        graphs.sign(&u64::from(self.to_bits()).to_le_bytes());
    }
}

impl Graphs {
    /// The graph state, with the `LORAX_CUDA_GRAPH*` switches read; a limit that is not a whole number in
    /// its range is an error naming the variable.
    pub(crate) fn from_env() -> Result<Self> {
        Ok(Self {
            inner: Mutex::new(Inner {
                work: None,
                meta: None,
                host: None,
                host_ptr: 0,
                work_used: 0,
                meta_used: 0,
                graphs: HashMap::new(),
                seen: HashMap::new(),
                uncaptured_steps: 0,
                clock: 0,
                replays: 0,
                captures: 0,
                capture_time: std::time::Duration::ZERO,
                copy_pending: false,
                copied: None,
                tokens_at: None,
                token_uploads: 0,
                prepared: None,
                ahead_replays: 0,
                fed_replays: 0,
                timing: None,
            }),
            enabled: AtomicBool::new(super::env_switch("LORAX_CUDA_GRAPHS", ["1", "0"], true)?),
            max_batch: AtomicUsize::new(super::env_count("LORAX_CUDA_GRAPH_MAX_BATCH", 256, 0..=1 << 16)?),
            max_graphs: super::env_count("LORAX_CUDA_GRAPH_CACHE", 64, 1..=1 << 16)?,
            capture_after: AtomicUsize::new(super::env_count("LORAX_CUDA_GRAPH_CAPTURE_AFTER", 2, 1..=1 << 16)?),
            step_rows: AtomicUsize::new(0),
            ahead: AtomicBool::new(super::env_switch("LORAX_CUDA_GRAPH_AHEAD", ["1", "0"], true)?),
            feed: AtomicBool::new(super::env_switch("LORAX_CUDA_GRAPH_FEED", ["1", "0"], true)?),
            steps_begun: AtomicU64::new(0),
            timing: super::env_switch("LORAX_CUDA_GRAPH_TIMING", ["1", "0"], true)?,
            clock: StepClock::default(),
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>> {
        self.inner
            .lock()
            .map_err(|_| EngineError::Backend("CUDA graph state poisoned".into()))
    }

    /// Adds bytes to the signature of the step being recorded or captured (on this thread).
    pub(crate) fn sign(&self, bytes: &[u8]) {
        SIG.with(|c| {
            let mut h = c.get();
            for &b in bytes {
                h = (h ^ u64::from(b)).wrapping_mul(FNV_PRIME);
            }
            c.set(h);
        });
    }

    /// `n` bytes of the work arena (a placeholder past its end while recording; the step then grows the
    /// arena and records again).
    pub(crate) fn alloc(&self, n: usize) -> Result<DevBuf> {
        let mut g = self.lock()?;
        let off = g.work_used;
        g.work_used += n.max(1).next_multiple_of(ALIGN);
        Ok(match &g.work {
            Some(a) if off + n <= a.cap => DevBuf::part(&a.owner, a.base, off, n),
            _ => DevBuf::Part {
                owner: None,
                ptr: off as u64,
                len: n,
            },
        })
    }

    /// `data` placed in the metadata arena: written into the host mirror now, copied to the device before
    /// the graph runs. The slot is rounded up to a power of two (at least 256 bytes).
    pub(crate) fn upload(&self, data: &[u8]) -> Result<DevBuf> {
        self.place(data, false)
    }

    /// As [`Graphs::upload`], for the pass's token ids: where they went is kept, so that a step recorded
    /// ahead can be replayed with other ids.
    pub(crate) fn upload_tokens(&self, data: &[u8]) -> Result<DevBuf> {
        self.place(data, true)
    }

    fn place(&self, data: &[u8], tokens: bool) -> Result<DevBuf> {
        let mut g = self.lock()?;
        let slot = data.len().max(ALIGN).next_power_of_two();
        let off = g.meta_used;
        g.meta_used += slot;
        if tokens {
            g.token_uploads += 1;
            g.tokens_at = (g.token_uploads == 1).then_some((off, data.len()));
        }
        self.sign(&(slot as u64).to_le_bytes());
        match &g.meta {
            Some(a) if off + slot <= a.cap => {
                // SAFETY: the mirror holds `a.cap` bytes at host_ptr and no copy from it is in flight
                // (`begin` waited for the last one); `off + len <= cap`.
                unsafe {
                    std::ptr::copy_nonoverlapping(data.as_ptr(), (g.host_ptr as *mut u8).add(off), data.len());
                }
                Ok(DevBuf::part(&a.owner, a.base, off, data.len()))
            }
            _ => Ok(DevBuf::Part {
                owner: None,
                ptr: off as u64,
                len: data.len(),
            }),
        }
    }

    /// Counts an engine step begun ([`crate::Backend::step_started`]), so that two replays with one step
    /// begun between them are consecutive steps.
    pub(crate) fn count_step(&self) {
        self.steps_begun.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether a decode step of `rows` rows should go through a graph.
    pub(crate) fn wanted(&self, rows: usize) -> bool {
        self.enabled.load(Ordering::Relaxed) && rows > 0 && rows <= self.max_batch.load(Ordering::Relaxed)
    }
}

/// A graph step's row count for a batch of `rows`: exact up to 4 (the skinny-GEMM kernels' sizes), then
/// rounded up to a multiple of 8: at most 7 padding rows, and 36 sizes up to 256 rows. (Powers of two up to
/// 128 rows, for fewer new signatures where a batch ramps or drains, were measured no faster in session 48
/// and removed: `git show 288a7c9:crates/engine/src/backend/cuda/graph.rs`.)
fn bucket(rows: usize) -> usize {
    if rows <= 4 {
        rows
    } else {
        rows.next_multiple_of(8)
    }
}

/// The distinct [`bucket`]s of 1 to `max` rows, largest first.
fn warmup_rows(max: usize) -> Vec<usize> {
    let mut rows: Vec<usize> = (1..=max).map(bucket).filter(|&b| b <= max).collect();
    rows.dedup();
    rows.reverse();
    rows
}

impl CudaBackend {
    /// The rows a decode step of `rows` rows runs with: [`bucket`]'s up to the largest graph batch, also
    /// when graphs are off (`LORAX_CUDA_GRAPHS=0` then changes no result, only how steps launch).
    pub fn graph_rows(&self, rows: usize) -> usize {
        let padded = bucket(rows);
        if padded <= self.graphs.max_batch.load(Ordering::Relaxed) {
            padded
        } else {
            rows
        }
    }

    /// Runs one forward pass `f` through a CUDA graph when it can (see the module docs), else eagerly.
    /// The result is the same either way; a graph failure turns graphs off for this backend, with a
    /// warning, and the step runs eagerly.
    pub fn graph_step(&self, rows: usize, f: &mut dyn FnMut() -> Result<CudaTensor>) -> Result<CudaTensor> {
        if !self.graphs.wanted(rows) || self.poison || self.sync_each || mode() != Mode::Eager {
            return f();
        }
        self.graphs.step_rows.store(rows, Ordering::Relaxed);
        match self.try_graph_step(f) {
            Ok(Ok(t)) => Ok(t),
            // The forward pass itself failed (bad input): the same error as eagerly.
            Ok(Err(e)) => Err(e),
            Err(e) => {
                self.graphs_off(&e);
                f()
            }
        }
    }

    /// Turns graphs off after the failure `e` (decode steps then run eagerly) and drops their state.
    fn graphs_off(&self, e: &EngineError) {
        tracing::warn!("CUDA graphs turned off after a failure, decode steps run eagerly: {e}");
        self.graphs.enabled.store(false, Ordering::Relaxed);
        if let Ok(mut g) = self.graphs.lock() {
            // A copy from the mirror may be in flight (a launch that failed after it, perhaps before its
            // event was recorded): let the stream finish before the pinned memory goes. A rare path.
            if g.copy_pending {
                let _ = self.stream.synchronize();
            }
            g.copy_pending = false;
            g.graphs.clear();
            g.work = None;
            g.meta = None;
            g.host = None;
            g.prepared = None;
        }
    }

    /// Outer error: a graph failure (fall back); inner: the forward pass's own error.
    fn try_graph_step(&self, f: &mut dyn FnMut() -> Result<CudaTensor>) -> Result<Result<CudaTensor>> {
        // Whether this step's capture is due (counted once: growing the arenas changes the signature).
        let mut due = false;
        for _ in 0..2 {
            let recording = Instant::now();
            let (out, sig, work, meta) = match self.record_pass(f)? {
                Ok(pass) => pass,
                Err(e) => return Ok(Err(e)),
            };
            if !self.arenas_fit(work, meta)? {
                drop(out);
                // Growing drops every graph: only for a step whose capture is due (the signature recorded
                // past the arenas' end is the same each time for a shape), not for a batch seen once.
                if !due && !self.capture_due(sig)? {
                    return Ok(f());
                }
                due = true;
                if let Err(e) = self.grow_arenas(work, meta) {
                    // Out of device memory for this batch's arena: smaller batches keep their graphs.
                    let rows = self.graphs.step_rows.load(Ordering::Relaxed);
                    self.graphs.max_batch.store(rows / 2, Ordering::Relaxed);
                    tracing::warn!(
                        rows,
                        "no memory for a CUDA graph arena, graphs only up to batch {}: {e}",
                        rows / 2
                    );
                    return Ok(f());
                }
                continue;
            }
            let record_ns = nanos(recording);
            let replaying = Instant::now();
            if self.replay(sig)? {
                self.graphs.clock.step(record_ns, nanos(replaying), meta, false);
                return Ok(Ok(out));
            }
            drop(out);
            if !due && !self.capture_due(sig)? {
                // New (or rare) so far: eagerly, as a step without graphs would run.
                let plan = self.last_lora_plan.load(Ordering::Relaxed);
                tracing::debug!(
                    sig = format!("{sig:016x}"),
                    rows = self.graphs.step_rows.load(Ordering::Relaxed),
                    work,
                    meta,
                    lora_records = plan >> 32,
                    lora_rows = plan & 0xffff_ffff,
                    "graph step run eagerly: a signature not seen often enough"
                );
                return Ok(f());
            }
            let captured = self.capture(sig, f);
            self.graphs.clock.step(record_ns, 0, meta, false);
            return captured;
        }
        Err(EngineError::Backend(
            "the graph arenas did not fit after growing".into(),
        ))
    }

    /// Counts a step of signature `sig` that has no graph: whether its capture is due now
    /// (`LORAX_CUDA_GRAPH_CAPTURE_AFTER`; otherwise the step runs eagerly).
    fn capture_due(&self, sig: u64) -> Result<bool> {
        let after = self.graphs.capture_after.load(Ordering::Relaxed);
        Ok(self.graphs.lock()?.sighted(sig, after))
    }

    /// Runs `f` as a record pass (launching nothing): its output, signature and arena bytes used. Outer
    /// error: the graph state; inner: `f`'s own.
    fn record_pass(
        &self,
        f: &mut dyn FnMut() -> Result<CudaTensor>,
    ) -> Result<Result<(CudaTensor, u64, usize, usize)>> {
        self.begin_pass()?;
        let _mode = ModeGuard::set(Mode::Record);
        let out = match f() {
            Ok(t) => t,
            Err(e) => return Ok(Err(e)),
        };
        let g = self.graphs.lock()?;
        Ok(Ok((out, signature(), g.work_used, g.meta_used)))
    }

    /// Resets the arenas' offsets and the signature, forgets a step recorded ahead; waits for the last
    /// copy from the host mirror (not for the kernels after it: a step may still run).
    fn begin_pass(&self) -> Result<()> {
        let mut g = self.graphs.lock()?;
        Self::wait_copy(&mut g)?;
        g.work_used = 0;
        g.meta_used = 0;
        g.tokens_at = None;
        g.token_uploads = 0;
        g.prepared = None;
        drop(g);
        self.last_lora_plan.store(0, Ordering::Relaxed);
        SIG.with(|c| c.set(FNV_OFFSET));
        Ok(())
    }

    /// Waits until the last copy from the host mirror has been made.
    fn wait_copy(g: &mut Inner) -> Result<()> {
        if g.copy_pending {
            if let Some(ev) = &g.copied {
                ev.synchronize().map_err(|e| drv("waiting for the metadata copy", e))?;
            }
            g.copy_pending = false;
        }
        Ok(())
    }

    /// Records the next decode step's forward pass `f` ahead of its turn, while the step before may still
    /// run on the device (see the module docs): `f` is the pass with placeholder token ids. Kept only when
    /// it can replay a captured graph as it is (no capture, no arena growth: those wait for the step
    /// itself); returns whether it was kept. A failing `f` is not an error here: the step, run normally,
    /// reports it.
    pub fn graph_prepare(&self, rows: usize, f: &mut dyn FnMut() -> Result<CudaTensor>) -> Result<bool> {
        self.read_replay_timing()?;
        if !self.graphs.ahead.load(Ordering::Relaxed)
            || !self.graphs.wanted(rows)
            || self.poison
            || self.sync_each
            || mode() != Mode::Eager
        {
            return Ok(false);
        }
        let recording = Instant::now();
        let (out, sig, work, meta) = match self.record_pass(f)? {
            Ok(pass) => pass,
            Err(e) => {
                tracing::debug!("a decode step recorded ahead failed (the step itself will run): {e}");
                return Ok(false);
            }
        };
        let record_ns = nanos(recording);
        if !self.arenas_fit(work, meta)? {
            return Ok(false);
        }
        let mut g = self.graphs.lock()?;
        let (Some(tokens_at), true) = (g.tokens_at, g.graphs.contains_key(&sig)) else {
            return Ok(false);
        };
        g.prepared = Some(Prepared {
            sig,
            out,
            meta_used: meta,
            tokens_at,
            record_ns,
        });
        Ok(true)
    }

    /// Launches the step recorded ahead by [`CudaBackend::graph_prepare`] with `tokens` as its token ids,
    /// if one is kept (no record pass since) and its ids are as many; `None` otherwise (the caller runs
    /// the step normally). The caller vouches that the step's inputs besides the ids are those recorded.
    /// A failed replay turns graphs off, as in [`CudaBackend::graph_step`], and returns `None`.
    pub fn graph_prepared(&self, tokens: &[u32]) -> Result<Option<CudaTensor>> {
        let replaying = Instant::now();
        let Some(p) = self.graphs.lock()?.prepared.take() else {
            return Ok(None);
        };
        // Switched off since it was recorded (an A/B between steps): the step runs as the switches say.
        if !self.graphs.enabled.load(Ordering::Relaxed) || !self.graphs.ahead.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let bytes = plain_bytes(tokens);
        {
            let mut g = self.graphs.lock()?;
            let (off, len) = p.tokens_at;
            let cap = g.meta.as_ref().map_or(0, |a| a.cap);
            if len != bytes.len() || g.meta_used != p.meta_used || off + len > cap || g.host.is_none() {
                return Ok(None);
            }
            Self::wait_copy(&mut g)?;
            // SAFETY: the mirror holds `cap` bytes at host_ptr, `off + len <= cap`, and no copy from it is
            // in flight (waited for above).
            unsafe {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), (g.host_ptr as *mut u8).add(off), len);
            }
        }
        self.replay_prepared(p, None, replaying)
    }

    /// Replays the step recorded ahead `p` (fed its ids by `feed`, else with the mirror's) and counts it: its
    /// logits, or `None` without its graph; a failed replay turns graphs off, as in [`CudaBackend::graph_step`].
    fn replay_prepared(&self, p: Prepared, feed: Option<&Feed>, replaying: Instant) -> Result<Option<CudaTensor>> {
        match self.replay_with(p.sig, feed) {
            Ok(true) => {
                let mut g = self.graphs.lock()?;
                if feed.is_some() {
                    g.fed_replays += 1;
                } else {
                    g.ahead_replays += 1;
                }
                drop(g);
                self.graphs.clock.step(p.record_ns, nanos(replaying), p.meta_used, true);
                Ok(Some(p.out))
            }
            Ok(false) => Ok(None),
            Err(e) => {
                self.graphs_off(&e);
                Ok(None)
            }
        }
    }

    /// Launches the step recorded ahead by [`CudaBackend::graph_prepare`] with token ids that are still on the
    /// device: token row `slots[k]` takes the word at `src + 4 k stride` (a sampling launch's output, which is
    /// queued before this), other rows (padding) their placeholders. The metadata is copied from the mirror, then
    /// a small kernel writes the ids over the placeholders, then the graph is launched; nothing waits. Its logits,
    /// or `None` (nothing kept, feeding off, or a slot past its rows; a failed replay turns graphs off as in
    /// [`CudaBackend::graph_step`]). The caller vouches that the step's inputs besides the ids are those recorded
    /// and that row `slots[k]` is the sequence whose id is the k-th at `src`.
    pub fn graph_feed(&self, src: u64, slots: &[u32], stride: usize) -> Result<Option<CudaTensor>> {
        // Launched (and its ids uploaded) on the stream now: never inside a record pass or a capture.
        if !self.graph_feed_on() || mode() != Mode::Eager {
            return Ok(None);
        }
        let replaying = Instant::now();
        let Some(p) = self.graphs.lock()?.prepared.take() else {
            return Ok(None);
        };
        if !self.graphs.enabled.load(Ordering::Relaxed) || !self.graphs.ahead.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let dst = {
            let g = self.graphs.lock()?;
            let (off, len) = p.tokens_at;
            let Some(meta) = g.meta.as_ref() else {
                return Ok(None);
            };
            let rows = len / 4;
            if slots.is_empty()
                || slots.iter().any(|&r| r as usize >= rows)
                || g.meta_used != p.meta_used
                || off + len > meta.cap
                || g.host.is_none()
            {
                return Ok(None);
            }
            meta.base + off as u64
        };
        // Eager (stream-ordered, staged) upload: before the feed kernel that reads it.
        let index = self.upload(slots)?;
        let feed = Feed {
            dst,
            src,
            slots: self.ptr(&index),
            n: slots.len(),
            stride,
        };
        self.replay_prepared(p, Some(&feed), replaying)
    }

    fn arenas_fit(&self, work: usize, meta: usize) -> Result<bool> {
        let g = self.graphs.lock()?;
        Ok(g.work.as_ref().is_some_and(|a| work <= a.cap) && g.meta.as_ref().is_some_and(|a| meta <= a.cap))
    }

    /// Arenas large enough for `work` and `meta` bytes (a quarter of headroom, never smaller than before, so
    /// steps of different shapes do not take turns regrowing them); every graph captured so far pointed into
    /// the old ones and is dropped.
    fn grow_arenas(&self, work: usize, meta: usize) -> Result<()> {
        let mut g = self.graphs.lock()?;
        let work_cap = (work + work / 4)
            .max(g.work.as_ref().map_or(0, |a| a.cap))
            .next_multiple_of(1 << 20);
        let meta_cap = (meta + meta / 4)
            .max(g.meta.as_ref().map_or(0, |a| a.cap))
            .next_multiple_of(1 << 16);
        g.graphs.clear();
        g.work = None;
        g.meta = None;
        g.host = None;
        // SAFETY: arena memory is written by the kernels of a step before they read it.
        let w = unsafe { self.stream.alloc::<u8>(work_cap) }
            .map_err(|e| drv(&format!("allocating a {work_cap}-byte graph arena"), e))?;
        // SAFETY: as above; the metadata arena is filled by the copy from the mirror before each replay.
        let m = unsafe { self.stream.alloc::<u8>(meta_cap) }.map_err(|e| drv("allocating the metadata arena", e))?;
        // SAFETY: plain bytes; written before they are copied.
        let mut host = unsafe { self.ctx.alloc_pinned::<u8>(meta_cap) }.map_err(|e| drv("pinned metadata", e))?;
        let host_ptr = host.as_mut_ptr().map_err(|e| drv("pinned metadata", e))? as usize;
        let (wb, mb) = (self.slice_ptr(&w), self.slice_ptr(&m));
        g.work = Some(Arena {
            owner: Arc::new(w),
            base: wb,
            cap: work_cap,
        });
        g.meta = Some(Arena {
            owner: Arc::new(m),
            base: mb,
            cap: meta_cap,
        });
        g.host = Some(host);
        g.host_ptr = host_ptr;
        tracing::debug!(work_cap, meta_cap, "CUDA graph arenas sized");
        Ok(())
    }

    /// Copies the metadata mirror to the device and launches the graph of `sig`, if there is one.
    fn replay(&self, sig: u64) -> Result<bool> {
        self.replay_with(sig, None)
    }

    /// [`CudaBackend::replay`], with the token ids of `feed` written over the copied metadata before the launch. A
    /// fed replay is launched before the engine begins its step, so its step is counted as the next one.
    fn replay_with(&self, sig: u64, feed: Option<&Feed>) -> Result<bool> {
        let mut g = self.graphs.lock()?;
        g.clock += 1;
        let now = g.clock;
        let Some(entry) = g.graphs.get_mut(&sig) else {
            return Ok(false);
        };
        entry.1 = now;
        let used = g.meta_used;
        let (Some(meta), Some(_)) = (&g.meta, &g.host) else {
            return Err(EngineError::Backend("graph replay without arenas".into()));
        };
        if used > 0 {
            // SAFETY: the mirror holds meta.cap >= used bytes at host_ptr (pinned), the arena as many.
            let src = unsafe { std::slice::from_raw_parts(g.host_ptr as *const u8, used) };
            unsafe { drv_result::memcpy_htod_async(meta.base, src, self.stream.cu_stream()) }
                .map_err(|e| drv("copying graph metadata", e))?;
            // In flight from here on (also if what follows fails).
            g.copy_pending = true;
            if g.copied.is_none() {
                g.copied = Some(self.ctx.new_event(None).map_err(|e| drv("creating an event", e))?);
            }
            if let Some(ev) = &g.copied {
                ev.record(&self.stream)
                    .map_err(|e| drv("recording the metadata copy", e))?;
            }
        }
        if let Some(f) = feed {
            let (dst, src, slots) = (&f.dst, &f.src, &f.slots);
            let (n, stride) = (int("fed rows", f.n)?, int("sampling stride", f.stride)?);
            launch!(
                self,
                "feed_tokens",
                cfg((uint("fed rows", f.n.div_ceil(256))?, 1, 1), 256, 0),
                dst,
                src,
                slots,
                &n,
                &stride
            );
        }
        if g.timing.is_none() && self.graphs.timing {
            let ev = || self.ctx.new_event(Some(drv_sys::CUevent_flags::CU_EVENT_DEFAULT));
            let three = || -> std::result::Result<[CudaEvent; 3], _> { Ok([ev()?, ev()?, ev()?]) };
            g.timing = Some(ReplayTiming {
                start: three().map_err(|e| drv("creating timing events", e))?,
                end: three().map_err(|e| drv("creating timing events", e))?,
                serial: [0; 3],
                n: 0,
                read: 0,
            });
        }
        let slot = g.timing.as_ref().map_or(0, |t| (t.n % 3) as usize);
        if let Some(t) = &g.timing {
            t.start[slot]
                .record(&self.stream)
                .map_err(|e| drv("recording a replay's start", e))?;
        }
        let graph = &g
            .graphs
            .get(&sig)
            .ok_or_else(|| EngineError::Backend("graph vanished".into()))?
            .0
             .0;
        graph.launch().map_err(|e| drv("graph launch", e))?;
        g.copy_pending = true;
        g.replays += 1;
        if let Some(t) = &mut g.timing {
            t.end[slot]
                .record(&self.stream)
                .map_err(|e| drv("recording a replay's end", e))?;
            t.serial[slot] = self.graphs.steps_begun.load(Ordering::Relaxed) + u64::from(feed.is_some());
            t.n += 1;
        }
        Ok(true)
    }

    /// Reads the replay timing events once for each replay ([`ReplayTiming::last`]) into the graph report. Called
    /// from the record ahead ([`CudaBackend::graph_prepare`]), while the step just launched runs, so that its dozen
    /// driver calls (event queries and elapsed times) are not counted in the replay's host time or the engine's
    /// `forward_us`. (Their cost there was not measured apart: session 46's replays read 56-120 µs with them in the
    /// replay, session 45's 46-67 without, on other machines.)
    fn read_replay_timing(&self) -> Result<()> {
        let mut g = self.graphs.lock()?;
        let Some(t) = &mut g.timing else { return Ok(()) };
        if t.read == t.n {
            return Ok(());
        }
        t.read = t.n;
        let (device, gap) = t.last();
        self.graphs.clock.device(device, gap);
        Ok(())
    }

    /// Captures the forward pass as the graph of `sig` and replays it.
    fn capture(&self, sig: u64, f: &mut dyn FnMut() -> Result<CudaTensor>) -> Result<Result<CudaTensor>> {
        let started = std::time::Instant::now();
        self.begin_pass()?;
        self.stream
            .begin_capture(drv_sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| drv("begin capture", e))?;
        let out = {
            let _mode = ModeGuard::set(Mode::Capture);
            f()
        };
        let graph = self.stream.end_capture(drv_sys::CUgraphInstantiate_flags(0));
        let out = match out {
            Ok(t) => t,
            // Recording the same input succeeded, so this is the capture's doing.
            Err(e) => return Err(EngineError::Backend(format!("forward pass under capture: {e}"))),
        };
        let graph = graph
            .map_err(|e| drv("end capture", e))?
            .ok_or_else(|| EngineError::Backend("stream capture produced no graph".into()))?;
        {
            let mut g = self.graphs.lock()?;
            if signature() != sig {
                return Err(EngineError::Backend(
                    "the captured forward pass differs from the recorded one".into(),
                ));
            }
            if g.graphs.len() >= self.graphs.max_graphs {
                if let Some(old) = g.graphs.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| *k) {
                    g.graphs.remove(&old);
                }
            }
            let now = g.clock;
            g.graphs.insert(sig, (Captured(graph), now));
            g.captures += 1;
            g.capture_time += started.elapsed();
            // Each capture, with what makes its signature (for finding what changes between steps).
            let plan = self.last_lora_plan.load(Ordering::Relaxed);
            tracing::debug!(
                sig = format!("{sig:016x}"),
                rows = self.graphs.step_rows.load(Ordering::Relaxed),
                work = g.work_used,
                meta = g.meta_used,
                lora_records = plan >> 32,
                lora_rows = plan & 0xffff_ffff,
                ms = format!("{:.1}", started.elapsed().as_secs_f64() * 1e3),
                "CUDA graph capture"
            );
            if g.captures == 1 || g.captures.is_power_of_two() {
                tracing::info!(
                    captures = g.captures,
                    replays = g.replays,
                    uncaptured = g.uncaptured_steps,
                    kept = g.graphs.len(),
                    capture_ms = format!("{:.0}", g.capture_time.as_secs_f64() * 1e3),
                    "CUDA graph captured"
                );
            }
        }
        if !self.replay(sig)? {
            return Err(EngineError::Backend("the captured graph is missing".into()));
        }
        Ok(Ok(out))
    }

    /// (graphs captured, replays) so far.
    pub fn graph_counts(&self) -> (u64, u64) {
        self.graphs.lock().map_or((0, 0), |g| (g.captures, g.replays))
    }

    /// The padded row counts of decode steps up to the largest graph batch, largest first
    /// ([`crate::backend::Backend::decode_warmup_rows`]).
    pub fn graph_warmup_rows(&self) -> Vec<usize> {
        warmup_rows(self.graphs.max_batch.load(Ordering::Relaxed))
    }

    /// How graph steps ran so far ([`crate::backend::Backend::step_counts`]).
    pub fn graph_step_counts(&self) -> crate::backend::StepCounts {
        self.graphs.lock().map_or_else(
            |_| crate::backend::StepCounts::default(),
            |g| crate::backend::StepCounts {
                replays: g.replays,
                ahead_replays: g.ahead_replays,
                fed_replays: g.fed_replays,
                captures: g.captures,
                uncaptured: g.uncaptured_steps,
            },
        )
    }

    /// Replays timed on the device so far (each replay's graph, read once the next one is launched), their mean
    /// device time in milliseconds (0 before any), and the gaps timed (between replays of consecutive
    /// steps).
    pub fn graph_device_time(&self) -> (u64, f64, u64) {
        let c = &self.graphs.clock;
        let n = c.device_all_steps.load(Ordering::Relaxed);
        (
            n,
            c.device_all_ns.load(Ordering::Relaxed) as f64 / n.max(1) as f64 / 1e6,
            c.gap_all_steps.load(Ordering::Relaxed),
        )
    }

    /// Replays of steps recorded ahead ([`CudaBackend::graph_prepared`]) so far, of the replays.
    pub fn graph_ahead_replays(&self) -> u64 {
        self.graphs.lock().map_or(0, |g| g.ahead_replays)
    }

    /// Forgets every captured graph and every signature counted towards a capture, after the stream is
    /// idle (a benchmark's fresh start: the next steps pay for their captures again).
    pub fn clear_graphs(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| drv("synchronize", e))?;
        let mut g = self.graphs.lock()?;
        g.copy_pending = false;
        g.prepared = None;
        g.graphs.clear();
        g.seen.clear();
        Ok(())
    }

    /// Captures a signature's graph at its `n`-th step (at least 1; `LORAX_CUDA_GRAPH_CAPTURE_AFTER`,
    /// default 2); the steps before run eagerly.
    pub fn set_graph_capture_after(&self, n: usize) {
        self.graphs.capture_after.store(n.max(1), Ordering::Relaxed);
    }

    /// Lets the sampling of a decode step launch the step recorded ahead with the tokens it chose, on the device
    /// (on by default; `LORAX_CUDA_GRAPH_FEED=0` turns it off; it needs steps recorded ahead, so one rank).
    pub fn set_graph_feed(&self, on: bool) {
        self.graphs.feed.store(on, Ordering::Relaxed);
    }

    /// Whether a decode step's sampling may launch the step recorded ahead ([`CudaBackend::set_graph_feed`]).
    pub fn graph_feed_on(&self) -> bool {
        self.graphs.feed.load(Ordering::Relaxed)
    }

    /// Replays launched by the step before's sampling ([`CudaBackend::graph_feed`]) so far.
    pub fn graph_fed_replays(&self) -> u64 {
        self.graphs.lock().map_or(0, |g| g.fed_replays)
    }

    /// Lets the engine record decode steps ahead (on by default unless `LORAX_CUDA_GRAPH_AHEAD=0`).
    pub fn set_graph_ahead(&self, on: bool) {
        self.graphs.ahead.store(on, Ordering::Relaxed);
    }

    /// Turns decode-step graphs on or off (on by default unless `LORAX_CUDA_GRAPHS=0`).
    pub fn set_graphs(&self, on: bool) {
        self.graphs.enabled.store(on, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::{bucket, warmup_rows, Graphs, SEEN_KEPT};

    #[test]
    fn the_warm_up_names_each_bucket_once_largest_first() {
        let rows = warmup_rows(256);
        assert_eq!(rows.len(), 4 + 32);
        assert_eq!(&rows[..3], &[256, 248, 240]);
        assert_eq!(&rows[rows.len() - 5..], &[8, 4, 3, 2, 1]);
        assert!(rows.iter().all(|&r| bucket(r) == r));
        // A largest batch that is not a bucket leaves out the bucket above it.
        assert_eq!(warmup_rows(13), [8, 4, 3, 2, 1]);
        assert!(warmup_rows(0).is_empty());
    }

    #[test]
    fn signatures_are_captured_at_their_nth_step_and_rare_ones_are_forgotten() {
        let graphs = Graphs::from_env().expect("the graph switches");
        let mut g = graphs.lock().expect("the graph state");
        // Captured at once, as before the count.
        assert!(g.sighted(1, 1));
        assert_eq!(g.uncaptured_steps, 0);
        // The default: the first step with a signature runs eagerly, the second captures.
        assert!(!g.sighted(2, 2));
        assert!(g.sighted(2, 2));
        assert_eq!(g.uncaptured_steps, 1);
        assert!(!g.seen.contains_key(&2), "a captured signature is not counted any more");
        // Counts are per signature.
        assert!(!g.sighted(3, 3));
        assert!(!g.sighted(4, 3));
        assert!(!g.sighted(3, 3));
        assert!(g.sighted(3, 3));
        assert!(!g.sighted(4, 3));
        assert!(g.sighted(4, 3));
        assert_eq!(g.uncaptured_steps, 5);
        // Bounded: the signatures seen longest ago go first.
        for sig in 100..100 + SEEN_KEPT as u64 + 10 {
            g.clock += 1;
            assert!(!g.sighted(sig, 2));
        }
        assert_eq!(g.seen.len(), SEEN_KEPT);
        assert!(!g.seen.contains_key(&100) && !g.seen.contains_key(&109));
        assert!(g.seen.contains_key(&110));
        g.clock += 1;
        assert!(!g.sighted(100, 2), "a forgotten signature starts its count again");
        // (and took the place of the oldest, 110)
        assert!(!g.seen.contains_key(&110));
        assert!(g.sighted(111, 2));
    }

    #[test]
    fn buckets_cover_every_batch_with_bounded_padding() {
        let mut sizes = std::collections::BTreeSet::new();
        for rows in 1..=256 {
            let b = bucket(rows);
            assert!(b >= rows && b - rows < 8, "{rows} rows in a bucket of {b}");
            if rows <= 4 {
                assert_eq!(b, rows, "small batches run exactly");
            } else {
                assert_eq!(b % 8, 0, "{rows} rows in a bucket of {b}");
            }
            assert_eq!(bucket(b), b, "a bucket is its own bucket");
            sizes.insert(b);
        }
        assert_eq!(sizes.len(), 4 + 32, "{sizes:?}");
    }
}
