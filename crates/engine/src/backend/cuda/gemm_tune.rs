//! Linear layers of decode-sized row counts on the fastest of cuBLASLt's candidate algorithms.
//!
//! For a product of a few dozen to a few hundred rows with a wide weight, cuBLAS's default algorithm
//! leaves bandwidth unused: on the H200 at 128 rows the Mistral-7B shape's q/k/v and o products ran at
//! 55-60% of the copy bandwidth (bench/NOTES.md, session 13), its tiles covering a third of the
//! multiprocessors without splitting the inner dimension. The first time a weight shape reaches
//! `linear` with at most [`POINTS`]' last row count, this times, at each of [`POINTS`] rows, cuBLAS's
//! default and up to [`CANDIDATES`] of cuBLASLt's heuristic algorithms (split-K ones among them) on
//! scratch inputs, flushing the L2 cache before each run (each layer of a model reads its own weights
//! from memory), and keeps the fastest. A product of `m` rows then runs on the choice of the smallest
//! point of at least `m` rows, if `cublasLtMatmulAlgoCheck` accepts it for `m`; a product of more rows
//! (a prompt) stays on cuBLAS's default.
//!
//! Tuning synchronises the stream and takes 140-430 ms per shape on the H200. It happens on the first
//! product of a shape, before any graph records it: in the shard, the warm-up prefill reaches every
//! linear layer.
//!
//! Off by default (`LORAX_CUDA_GEMM_TUNE=1` turns it on; `always` takes the fastest candidate even where
//! the default is faster, for tests). On the H200 (bench/NOTES.md, session 14) cuBLAS's default already
//! runs Hopper kernels with split-K where it pays: the candidates beat it by 0-9% on some shapes and
//! points and by nothing on the rest, a 128-row decode step of the Mistral-7B shape went from 8.27-8.38
//! to 8.11-8.24 ms, and choices made by timing can differ between runs, so a restarted server could
//! round differently (greedy outputs then differ where two tokens nearly tie; an f32 graph test with a
//! backend per run diverged from its eager run, most likely for this reason).

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cudarc::cublaslt::sys as lt;
use cudarc::driver::sys as drv_sys;

use super::{drv, graph, CudaBackend};
use crate::error::{EngineError, Result};
use crate::weights::DType;

/// Row counts the algorithms are timed at; a product of `m` rows uses the first point of at least `m`.
pub const POINTS: [usize; 14] = [8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256];
/// cuBLASLt heuristic candidates timed per point.
const CANDIDATES: usize = 16;
/// Timed runs per candidate (the median counts).
const RUNS: usize = 5;
/// A candidate must beat cuBLAS's default by this fraction to be chosen (the runs' spread is smaller).
const MIN_GAIN: f64 = 0.03;

/// A weight shape: `[n, k]`, output rows `n` elements apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct GemmShape {
    pub n: usize,
    pub k: usize,
}

/// What one shape's tuning measured at one point (microseconds, medians).
#[derive(Clone, Debug)]
pub struct TunedPoint {
    pub rows: usize,
    pub default_us: f64,
    pub best_us: f64,
    /// Which heuristic candidate won (`None`: cuBLAS's default).
    pub chosen: Option<usize>,
    pub candidates: usize,
}

/// One shape's tuning, for reports.
#[derive(Clone, Debug)]
pub struct TunedShape {
    pub n: usize,
    pub k: usize,
    pub points: Vec<TunedPoint>,
    pub millis: f64,
}

struct Handle(lt::cublasLtHandle_t);
struct Desc(lt::cublasLtMatmulDesc_t);
struct Layout(lt::cublasLtMatrixLayout_t);
struct Pref(lt::cublasLtMatmulPreference_t);

// SAFETY: cuBLASLt handles and descriptors are plain host objects, usable from any thread one call at a
// time; every use here holds the tuner's lock or the engine's (one step at a time).
unsafe impl Send for Handle {}
unsafe impl Sync for Handle {}
unsafe impl Send for Desc {}
unsafe impl Sync for Desc {}
unsafe impl Send for Layout {}
unsafe impl Sync for Layout {}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtCreate, destroyed once.
        let _ = unsafe { lt::cublasLtDestroy(self.0) };
    }
}
impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtMatmulDescCreate, destroyed once.
        let _ = unsafe { lt::cublasLtMatmulDescDestroy(self.0) };
    }
}
impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtMatrixLayoutCreate, destroyed once.
        let _ = unsafe { lt::cublasLtMatrixLayoutDestroy(self.0) };
    }
}
impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtMatmulPreferenceCreate, destroyed once.
        let _ = unsafe { lt::cublasLtMatmulPreferenceDestroy(self.0) };
    }
}

fn lt_err(what: &str, s: lt::cublasStatus_t) -> EngineError {
    EngineError::Backend(format!("cuBLASLt {what}: {s:?}"))
}

fn check(what: &str, s: lt::cublasStatus_t) -> Result<()> {
    if s == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(lt_err(what, s))
    }
}

/// A product's cuBLASLt call: descriptors for its exact row count, and the algorithm.
pub(crate) struct LtPlan {
    desc: Desc,
    a: Layout,
    b: Layout,
    d: Layout,
    algo: lt::cublasLtMatmulAlgo_t,
}

impl LtPlan {
    /// `y[m, n] = x[m, k] · w[n, k]ᵀ` in cuBLAS's column-major view (as `gemm_into`): A = w as `[k, n]`
    /// transposed, B = x as `[k, m]`, D = y as `[n, m]` with `ldy` apart.
    fn new(
        dt: lt::cudaDataType,
        (m, n, k, ldy): (usize, usize, usize, usize),
        algo: lt::cublasLtMatmulAlgo_t,
    ) -> Result<Self> {
        let layout = |rows: usize, cols: usize, ld: usize| -> Result<Layout> {
            let mut l = std::ptr::null_mut();
            // SAFETY: writes one layout handle into `l`.
            check("layout", unsafe {
                lt::cublasLtMatrixLayoutCreate(&raw mut l, dt, rows as u64, cols as u64, ld as i64)
            })?;
            Ok(Layout(l))
        };
        let mut d = std::ptr::null_mut();
        // SAFETY: writes one descriptor handle into `d`.
        check("matmul descriptor", unsafe {
            lt::cublasLtMatmulDescCreate(
                &raw mut d,
                lt::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                lt::cudaDataType::CUDA_R_32F,
            )
        })?;
        let desc = Desc(d);
        let trans_a: i32 = 1; // CUBLAS_OP_T
                              // SAFETY: TRANSA takes a cublasOperation_t, an int32.
        check("TRANSA", unsafe {
            lt::cublasLtMatmulDescSetAttribute(
                desc.0,
                lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                (&raw const trans_a).cast::<c_void>(),
                4,
            )
        })?;
        Ok(Self {
            desc,
            a: layout(k, n, k)?,
            b: layout(k, m, k)?,
            d: layout(n, m, ldy)?,
            algo,
        })
    }
}

struct State {
    /// Per shape and point, the chosen algorithm (`None`: cuBLAS's default).
    choices: HashMap<GemmShape, Vec<Option<lt::cublasLtMatmulAlgo_t>>>,
    /// Per shape and exact row count, the plan (`None`: cuBLAS's default).
    plans: HashMap<(GemmShape, usize), Option<Arc<LtPlan>>>,
    reports: Vec<TunedShape>,
}

/// The tuned choices of one backend.
pub(crate) struct Tuner {
    handle: Handle,
    dt: lt::cudaDataType,
    /// A candidate is chosen when it beats the default by this fraction.
    min_gain: f64,
    state: Mutex<State>,
}

/// Whether and how `linear` tunes its decode-sized products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmTuning {
    /// cuBLAS's default for every product (the default setting).
    Off,
    /// The fastest of the default and the candidates.
    On,
    /// The fastest candidate even where the default is faster (for tests: the cuBLASLt path runs).
    Always,
}

impl GemmTuning {
    /// `LORAX_CUDA_GEMM_TUNE`: `1` on, `always` for tests, else off.
    pub fn from_env() -> Self {
        match std::env::var("LORAX_CUDA_GEMM_TUNE").as_deref() {
            Ok("1") => Self::On,
            Ok("always") => Self::Always,
            _ => Self::Off,
        }
    }
}

impl Tuner {
    /// A tuner for `mode`, unless it is off or the cuBLASLt library is missing (then `linear` stays on
    /// cuBLAS's default; the missing library is logged).
    pub(crate) fn new(dtype: DType, mode: GemmTuning) -> Option<Self> {
        if mode == GemmTuning::Off {
            return None;
        }
        // SAFETY: only tries to open the library.
        if !unsafe { lt::is_culib_present() } {
            tracing::warn!("the cuBLASLt library (libcublasLt.so) is not installed: decode GEMMs stay untuned");
            return None;
        }
        let mut h = std::ptr::null_mut();
        // SAFETY: writes one handle into `h`.
        if let Err(e) = check("handle", unsafe { lt::cublasLtCreate(&raw mut h) }) {
            tracing::warn!("decode GEMMs stay untuned: {e}");
            return None;
        }
        let dt = match dtype {
            DType::BF16 => lt::cudaDataType::CUDA_R_16BF,
            DType::F16 => lt::cudaDataType::CUDA_R_16F,
            DType::F32 => lt::cudaDataType::CUDA_R_32F,
        };
        Some(Self {
            handle: Handle(h),
            dt,
            min_gain: if mode == GemmTuning::Always {
                f64::NEG_INFINITY
            } else {
                MIN_GAIN
            },
            state: Mutex::new(State {
                choices: HashMap::new(),
                plans: HashMap::new(),
                reports: Vec::new(),
            }),
        })
    }
}

/// The point whose choice a product of `m` rows uses.
pub(crate) fn point_of(m: usize) -> Option<usize> {
    POINTS.iter().position(|&p| p >= m)
}

impl CudaBackend {
    /// Tune decode-sized `linear` products or not (default: `LORAX_CUDA_GEMM_TUNE`, else off); forgets what
    /// was tuned. Graphs recorded before keep their products.
    pub fn set_gemm_tuning(&mut self, mode: GemmTuning) {
        self.tuner = Tuner::new(self.dtype, mode);
    }

    /// What tuning measured so far, one entry per weight shape.
    pub fn gemm_tuning(&self) -> Vec<TunedShape> {
        self.tuner
            .as_ref()
            .and_then(|t| t.state.lock().ok().map(|s| s.reports.clone()))
            .unwrap_or_default()
    }

    /// The tuned plan of `linear`'s product `y[m, n] = x[m, k] · w[n, k]ᵀ`, if any: only with every pointer
    /// 256-byte aligned (what cuBLASLt's heuristics assume).
    pub(super) fn tuned_plan(
        &self,
        (m, n, k): (usize, usize, usize),
        (yp, xp, wp): (u64, u64, u64),
    ) -> Result<Option<Arc<LtPlan>>> {
        if self.tuner.is_none() || [yp, xp, wp].iter().any(|p| p % 256 != 0) {
            return Ok(None);
        }
        self.lt_plan(GemmShape { n, k }, m, wp)
    }

    /// The cuBLASLt plan of a `linear` product of `m` rows with weight `wp` of `shape` (tuning the shape
    /// on its first product), or `None` for cuBLAS's default. Pointers must be 256-byte aligned.
    pub(super) fn lt_plan(&self, shape: GemmShape, m: usize, wp: u64) -> Result<Option<Arc<LtPlan>>> {
        let Some(t) = &self.tuner else { return Ok(None) };
        let mut guard = t
            .state
            .lock()
            .map_err(|_| EngineError::Backend("GEMM tuner lock poisoned".into()))?;
        let st = &mut *guard;
        if let Some(p) = st.plans.get(&(shape, m)) {
            return Ok(p.clone());
        }
        if let Entry::Vacant(slot) = st.choices.entry(shape) {
            // Capture follows a record pass of the same products, which tuned them; never tune into a capture.
            if graph::mode() == graph::Mode::Capture {
                return Ok(None);
            }
            let started = Instant::now();
            let (choice, points) = match self.tune_shape(t, shape, wp) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(
                        n = shape.n,
                        k = shape.k,
                        "GEMM tuning failed, cuBLAS's default kept: {e}"
                    );
                    (vec![None; POINTS.len()], Vec::new())
                }
            };
            let millis = started.elapsed().as_secs_f64() * 1e3;
            tracing::info!(
                n = shape.n,
                k = shape.k,
                millis,
                "GEMM shape tuned: {}",
                points
                    .iter()
                    .map(|p| format!("{}:{:.1}/{:.1}", p.rows, p.default_us, p.best_us))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            slot.insert(choice);
            st.reports.push(TunedShape {
                n: shape.n,
                k: shape.k,
                points,
                millis,
            });
        }
        // A shape is tuned on its first product whatever its rows (the shard's warm-up prefill runs
        // thousands), but only products of at most the last point's rows use the choices.
        let Some(pi) = point_of(m) else { return Ok(None) };
        let plan = match st.choices.get(&shape).and_then(|c| c[pi]) {
            None => None,
            Some(algo) => {
                let plan = LtPlan::new(t.dt, (m, shape.n, shape.k, shape.n), algo)?;
                // SAFETY: all-zero bits are a valid heuristic result (plain integers and floats).
                let mut res: lt::cublasLtMatmulHeuristicResult_t = unsafe { std::mem::zeroed() };
                // SAFETY: the descriptors and the algorithm are live; `res` receives one result.
                let ok = unsafe {
                    lt::cublasLtMatmulAlgoCheck(
                        t.handle.0,
                        plan.desc.0,
                        plan.a.0,
                        plan.b.0,
                        plan.d.0,
                        plan.d.0,
                        &raw const plan.algo,
                        &raw mut res,
                    )
                };
                (ok == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS && res.workspaceSize <= self.blas_ws_bytes)
                    .then(|| Arc::new(plan))
            }
        };
        st.plans.insert((shape, m), plan.clone());
        Ok(plan)
    }

    /// Runs a plan: `y = x · wᵀ` (the caller checked the pointers against the plan's sizes).
    pub(super) fn lt_matmul(&self, plan: &LtPlan, (yp, xp, wp): (u64, u64, u64)) -> Result<()> {
        let t = self
            .tuner
            .as_ref()
            .ok_or_else(|| EngineError::Backend("a cuBLASLt plan without a tuner".into()))?;
        self.lt_run(t, plan, (yp, xp, wp))
    }

    fn lt_run(&self, t: &Tuner, plan: &LtPlan, (yp, xp, wp): (u64, u64, u64)) -> Result<()> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        self.ctx.bind_to_thread().map_err(|e| drv("bind context", e))?;
        // SAFETY: w, x and y hold the plan's n·k, m·k and m·ldy elements (the caller checked); the workspace
        // is the backend's (`blas_ws_bytes`, which the plan's algorithm fits), used on this stream alone;
        // alpha and beta are f32 as the descriptor's scale type says.
        check("matmul", unsafe {
            lt::cublasLtMatmul(
                t.handle.0,
                plan.desc.0,
                (&raw const alpha).cast::<c_void>(),
                wp as *const c_void,
                plan.a.0,
                xp as *const c_void,
                plan.b.0,
                (&raw const beta).cast::<c_void>(),
                yp as *const c_void,
                plan.d.0,
                yp as *mut c_void,
                plan.d.0,
                &raw const plan.algo,
                self.blas_ws_ptr as *mut c_void,
                self.blas_ws_bytes,
                self.stream.cu_stream() as lt::cudaStream_t,
            )
        })?;
        self.after_launch("cublasLt matmul")
    }

    /// Times cuBLAS's default and cuBLASLt's candidates at every point for one shape; returns each
    /// point's choice and what was measured.
    fn tune_shape(
        &self,
        t: &Tuner,
        shape: GemmShape,
        wp: u64,
    ) -> Result<(Vec<Option<lt::cublasLtMatmulAlgo_t>>, Vec<TunedPoint>)> {
        let GemmShape { n, k } = shape;
        let es = self.dtype.size();
        let max_m = POINTS[POINTS.len() - 1];
        let l2 = self
            .ctx
            .attribute(drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
            .map_err(|e| drv("L2 size", e))?;
        let s = &self.stream;
        s.synchronize().map_err(|e| drv("synchronise before GEMM tuning", e))?;
        let mut flush = s
            .alloc_zeros::<u8>(2 * usize::try_from(l2).unwrap_or(0).max(4 << 20))
            .map_err(|e| drv("GEMM tuning flush buffer", e))?;
        let xs = s
            .alloc_zeros::<u8>(max_m * k * es)
            .map_err(|e| drv("GEMM tuning input", e))?;
        let ys = s
            .alloc_zeros::<u8>(max_m * n * es)
            .map_err(|e| drv("GEMM tuning output", e))?;
        let (xp, yp) = (self.slice_ptr(&xs), self.slice_ptr(&ys));
        let timing = Some(drv_sys::CUevent_flags::CU_EVENT_DEFAULT);
        let events = (0..2 * RUNS)
            .map(|_| self.ctx.new_event(timing))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| drv("timing events", e))?;
        let mut time = |run: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
            run()?; // once untimed: first-use costs
            for r in 0..RUNS {
                s.memset_zeros(&mut flush).map_err(|e| drv("L2 flush", e))?;
                events[2 * r].record(s).map_err(|e| drv("event", e))?;
                run()?;
                events[2 * r + 1].record(s).map_err(|e| drv("event", e))?;
            }
            let mut us = (0..RUNS)
                .map(|r| {
                    events[2 * r]
                        .elapsed_ms(&events[2 * r + 1])
                        .map(|ms| f64::from(ms) * 1e3)
                })
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| drv("event timing", e))?;
            us.sort_by(f64::total_cmp);
            Ok(us[RUNS / 2])
        };
        let mut pref = std::ptr::null_mut();
        // SAFETY: writes one preference handle into `pref`.
        check("preference", unsafe {
            lt::cublasLtMatmulPreferenceCreate(&raw mut pref)
        })?;
        let pref = Pref(pref);
        let ws = self.blas_ws_bytes as u64;
        // SAFETY: MAX_WORKSPACE_BYTES takes a u64.
        check("workspace preference", unsafe {
            lt::cublasLtMatmulPreferenceSetAttribute(
                pref.0,
                lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&raw const ws).cast::<c_void>(),
                8,
            )
        })?;
        let (mut choices, mut points) = (Vec::new(), Vec::new());
        for &m in &POINTS {
            let default_us = time(&mut || self.cublas_gemm((m, n, k), (yp, xp, wp), n, (1.0, 0.0)))?;
            let probe = LtPlan::new(t.dt, (m, n, k, n), lt::cublasLtMatmulAlgo_t { data: [0; 8] })?;
            // SAFETY: all-zero bits are valid heuristic results (plain integers and floats).
            let mut found: [lt::cublasLtMatmulHeuristicResult_t; CANDIDATES] = unsafe { std::mem::zeroed() };
            let mut count = 0i32;
            // SAFETY: the descriptors are live; `found` has room for CANDIDATES results.
            let st = unsafe {
                lt::cublasLtMatmulAlgoGetHeuristic(
                    t.handle.0,
                    probe.desc.0,
                    probe.a.0,
                    probe.b.0,
                    probe.d.0,
                    probe.d.0,
                    pref.0,
                    CANDIDATES as i32,
                    found.as_mut_ptr(),
                    &raw mut count,
                )
            };
            let found = if st == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                &found[..usize::try_from(count).unwrap_or(0).min(CANDIDATES)]
            } else {
                &found[..0]
            };
            let mut best: Option<(usize, f64)> = None;
            for (i, cand) in found.iter().enumerate() {
                if cand.state != lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS || cand.workspaceSize > self.blas_ws_bytes {
                    continue;
                }
                let plan = LtPlan::new(t.dt, (m, n, k, n), cand.algo)?;
                // A candidate that fails to run is skipped, not fatal.
                if let Ok(us) = time(&mut || self.lt_run(t, &plan, (yp, xp, wp))) {
                    if best.is_none_or(|(_, b)| us < b) {
                        best = Some((i, us));
                    }
                }
            }
            let chosen = best.filter(|&(_, us)| us < default_us * (1.0 - t.min_gain));
            choices.push(chosen.map(|(i, _)| found[i].algo));
            points.push(TunedPoint {
                rows: m,
                default_us,
                best_us: chosen.map_or(default_us, |(_, us)| us),
                chosen: chosen.map(|(i, _)| i),
                candidates: found.len(),
            });
        }
        s.synchronize().map_err(|e| drv("GEMM tuning", e))?;
        Ok((choices, points))
    }
}
