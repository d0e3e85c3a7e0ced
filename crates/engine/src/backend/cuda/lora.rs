//! SGMV LoRA on the device (kernels/lora.cu): the host checks the segments, writes one `LoraSeg` record
//! per non-empty segment (A and B device pointers, rows, rank, scale, the columns of y it adds into, and
//! its rows of the intermediate: one set per distinct first column, as the parts of a fused projection
//! share the rows of x), sizes the tiles to the largest rank
//! and launches shrink then expand. Rows outside every segment are never touched. When every segment has
//! at most 64 rows and ranks are at most 64 (decode), the BGMV pair runs instead, on chunks of at most 4
//! rows of each segment: a block per (chunk, rank index) for the shrink and a thread per output column for
//! the expand, no atomics; the chunk count is padded to a power of two so graphs survive a changing mix.
//!
//! Planning (checks, uploads, allocations) and running (a memset and two launches) are separate, so a
//! run can be captured in a CUDA graph and replayed (the benchmarks time kernels that way).

use std::marker::PhantomData;

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{cfg, int, shape_err, uint, CudaBackend, CudaTensor, DevBuf, LORA_ROWS, SMEM_LIMIT};
use crate::backend::LoraSegment;
use crate::error::{EngineError, Result};

/// BGMV limits and block sizes (BG_ROWS, BG_RANK, BG_SHRINK_THREADS in kernels/lora.cu).
const BG_ROWS: usize = 4;
const BG_RANK: usize = 64;
/// Longest segment BGMV takes (in chunks of BG_ROWS rows); longer ones (prompts) go to SGMV's row tiles.
const BG_SPLIT_MAX: usize = 64;
const BG_SHRINK_THREADS: u32 = 128;
const BG_EXPAND_THREADS: u32 = 256;

/// `struct LoraSeg` of kernels/lora.cu (48 bytes, no padding).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct LoraSeg {
    /// `lora_A` and `lora_B` device pointers.
    a: u64,
    b: u64,
    /// First row of x and y, rows.
    start: i32,
    len: i32,
    rank: i32,
    scale: f32,
    /// First column of y, and columns.
    col: i32,
    cols: i32,
    /// First row of the intermediate.
    trow: i32,
    pad: i32,
}

impl super::Plain for LoraSeg {}

/// A LoRA product ready to launch: segment table uploaded, intermediate allocated.
pub struct LoraPlan<'a> {
    _table: DevBuf,
    tmp: DevBuf,
    tmp_bytes: usize,
    shrink: LaunchConfig,
    expand: LaunchConfig,
    ptrs: [u64; 4],
    ints: [i32; 7],
    /// Bytes of adapter weights the kernels read (each segment's A and B once).
    pub weight_bytes: usize,
    /// The decode-shaped kernels (bgmv_*) rather than SGMV.
    pub bgmv: bool,
    _io: PhantomData<&'a mut CudaTensor>,
}

impl CudaBackend {
    /// Checks and lays out `y[rows] += scale · (x[rows] · aᵀ) · bᵀ` for each segment (see
    /// [`crate::backend::Backend::lora`]); `None` when there is nothing to do.
    pub fn lora_plan<'a>(
        &self,
        y: &'a mut CudaTensor,
        x: &'a CudaTensor,
        segments: &[LoraSegment<'a, CudaTensor>],
    ) -> Result<Option<LoraPlan<'a>>> {
        let (n, k) = x.rows_cols();
        let (ny, out) = y.rows_cols();
        if n != ny {
            return Err(shape_err("lora", &x.shape, &y.shape));
        }
        let (mut rmax, mut max_len, mut max_cols, mut weight_bytes) = (0usize, 0usize, 0usize, 0usize);
        // The distinct first columns (a fused projection's parts), in order: part p's segments keep their
        // intermediate in rows p·n .. (p + 1)·n.
        let mut parts: Vec<usize> = Vec::new();
        for seg in segments {
            let (r, ka) = seg.a.rows_cols();
            let (ob, rb) = seg.b.rows_cols();
            if ka != k || seg.col + ob > out || rb != r || seg.start + seg.len > n || r == 0 || ob == 0 {
                return Err(EngineError::Backend(format!(
                    "lora: segment rows {}..{} of {n}, columns from {}, x {:?}, y {:?}, a {:?}, b {:?}",
                    seg.start,
                    seg.start + seg.len,
                    seg.col,
                    x.shape,
                    y.shape,
                    seg.a.shape,
                    seg.b.shape
                )));
            }
            if seg.len > 0 {
                rmax = rmax.max(r);
                max_len = max_len.max(seg.len);
                max_cols = max_cols.max(ob);
                if !parts.contains(&seg.col) {
                    parts.push(seg.col);
                }
                weight_bytes += (seg.a.numel() + seg.b.numel()) * self.dtype.size();
            }
        }
        if max_len == 0 || k == 0 || out == 0 {
            return Ok(None);
        }
        // BGMV (the decode shape) takes segments as records of at most BG_ROWS rows: a popular adapter's
        // rows become several records, whose repeated reads of the same weights come from L2.
        let bgmv = self.lora_bgmv && max_len <= BG_SPLIT_MAX && rmax <= BG_RANK;
        let rows_per_record = if bgmv { BG_ROWS } else { usize::MAX };
        // Every field below is at most parts·n, out or rmax: checked to fit an i32 once here.
        int("intermediate rows", parts.len() * n)?;
        int("out features", out)?;
        int("rank", rmax)?;
        let mut table: Vec<LoraSeg> = Vec::with_capacity(segments.len());
        for seg in segments.iter().filter(|s| s.len > 0) {
            let (a, b) = (self.ptr(&seg.a.buf), self.ptr(&seg.b.buf));
            let (rank, cols) = (seg.a.rows_cols().0 as i32, seg.b.rows_cols().0 as i32);
            let trow = parts.iter().position(|&c| c == seg.col).unwrap_or(0) * n;
            for c in (0..seg.len).step_by(rows_per_record.min(seg.len)) {
                table.push(LoraSeg {
                    a,
                    b,
                    start: (seg.start + c) as i32,
                    len: rows_per_record.min(seg.len - c) as i32,
                    rank,
                    scale: seg.scale,
                    col: seg.col as i32,
                    cols,
                    trow: (trow + seg.start + c) as i32,
                    pad: 0,
                });
            }
        }
        if bgmv {
            // Empty records (no rows, rank 0) pad the count to a power of two, so the grid, and with it a
            // decode step's CUDA graph, stays the same while the batch's mix of adapters changes within
            // that bound.
            table.resize(table.len().next_power_of_two(), LoraSeg::default());
        }
        let nseg = table.len();
        let tmp_rows = parts.len() * n;
        if bgmv {
            let tmp = self.bytes(tmp_rows * rmax * 4)?;
            let d_table = self.upload(&table)?;
            let segs = uint("segments", nseg)?;
            return Ok(Some(LoraPlan {
                ptrs: [self.ptr(&tmp), self.ptr(&x.buf), self.ptr(&y.buf), self.ptr(&d_table)],
                ints: [
                    int("in features", k)?,
                    int("out features", out)?,
                    int("rank", rmax)?,
                    0,
                    0,
                    0,
                    0,
                ],
                shrink: cfg((segs, uint("rank", rmax)?, 1), BG_SHRINK_THREADS, 0),
                expand: cfg(
                    (
                        segs,
                        uint("column tiles", max_cols.div_ceil(BG_EXPAND_THREADS as usize))?,
                        1,
                    ),
                    BG_EXPAND_THREADS,
                    0,
                ),
                tmp_bytes: 0,
                tmp,
                _table: d_table,
                weight_bytes,
                bgmv: true,
                _io: PhantomData,
            }));
        }
        // Row tiles no taller than the longest segment: decode (one row per segment) stages one x row.
        let rt = LORA_ROWS.min(max_len);
        let too_large = || EngineError::Backend(format!("LoRA rank {rmax} is too large for the SGMV kernels"));
        let tiles = max_len.div_ceil(rt);
        // The largest k-chunk (a multiple of 32) whose A chunk and x tile fit in shared memory, and the
        // widest column tile whose B tile and intermediate rows fit; both then shrink until the grid has
        // two blocks per multiprocessor (few segments, e.g. one adapter for the whole batch, would leave
        // most of the GPU idle). Smaller tiles cut the same weights finer: each element is still read once.
        let enough = 2 * self.num_sms;
        let mut kc = [512usize, 256, 128, 64, 32]
            .into_iter()
            .find(|kc| (rmax + rt) * (kc + 1) * 4 <= SMEM_LIMIT)
            .ok_or_else(too_large)?;
        while kc > 32 && nseg * k.div_ceil(kc) * tiles < enough {
            kc /= 2;
        }
        let mut ot = [256usize, 128, 64, 32]
            .into_iter()
            .find(|ot| ot * (rmax + 1) * 4 + rt * rmax * 4 <= SMEM_LIMIT)
            .ok_or_else(too_large)?;
        while ot > 32 && nseg * max_cols.div_ceil(ot) * tiles < enough {
            ot /= 2;
        }
        // Lanes per shrink output: enough that a block's 256 threads all work on small problems.
        let outs = rt.min(max_len) * rmax;
        let ksub = (256 / outs.max(1)).clamp(1, 32);
        let ksub = 1usize << (usize::BITS - 1 - ksub.leading_zeros());
        // Zeroed by each run (the shrink accumulates into it with atomics).
        // SAFETY: uninitialised until lora_run's memset, which precedes every kernel that reads it.
        let tmp = self.bytes(tmp_rows * rmax * 4)?;
        let d_table = self.upload(&table)?;
        let tiles = uint("row tiles", tiles)?;
        let segs = uint("segments", nseg)?;
        Ok(Some(LoraPlan {
            ptrs: [self.ptr(&tmp), self.ptr(&x.buf), self.ptr(&y.buf), self.ptr(&d_table)],
            ints: [
                int("in features", k)?,
                int("out features", out)?,
                int("rank", rmax)?,
                int("k chunk", kc)?,
                int("column tile", ot)?,
                int("row tile", rt)?,
                int("lanes", ksub)?,
            ],
            shrink: cfg(
                (segs, uint("k chunks", k.div_ceil(kc))?, tiles),
                256,
                (rmax + rt) * (kc + 1) * 4,
            ),
            expand: cfg(
                (segs, uint("column tiles", max_cols.div_ceil(ot))?, tiles),
                256,
                ot * (rmax + 1) * 4 + rt * rmax * 4,
            ),
            tmp_bytes: tmp_rows * rmax * 4,
            tmp,
            _table: d_table,
            weight_bytes,
            bgmv: false,
            _io: PhantomData,
        }))
    }

    /// Launches a planned LoRA product: zero the intermediate, shrink, expand (capturable in a graph).
    pub fn lora_run(&self, plan: &LoraPlan<'_>) -> Result<()> {
        let [tp, xp, yp, sp] = &plan.ptrs;
        let [ki, oi, ri, kci, oti, rti, ksi] = &plan.ints;
        if plan.bgmv {
            launch!(self, "bgmv_shrink", plan.shrink, tp, xp, sp, ki, ri);
            launch!(self, "bgmv_expand", plan.expand, yp, tp, sp, oi, ri);
            return Ok(());
        }
        self.memset_zero(self.ptr(&plan.tmp), plan.tmp_bytes)?;
        launch!(self, "sgmv_shrink", plan.shrink, tp, xp, sp, ki, ri, kci, rti, ksi);
        launch!(self, "sgmv_expand", plan.expand, yp, tp, sp, oi, ri, oti, rti);
        Ok(())
    }
}
