//! SGMV LoRA on the device (kernels/lora.cu): the host checks the segments, writes one `LoraSeg` record
//! per non-empty segment (A and B device pointers, rows, rank, scale, the columns of y it adds into, and
//! its rows of the intermediate: one set per distinct first column, as the parts of a fused projection
//! share the rows of x), sizes the tiles to the largest rank
//! and launches shrink then expand. Rows outside every segment are never touched. When every segment has
//! at most 64 rows and ranks are at most 64 (decode), the BGMV pair runs instead, on chunks of at most 4
//! rows of each segment: a block per (chunk, rank index) for the shrink and a thread per output column for
//! the expand, no atomics; the chunk count is padded to a power of two so graphs survive a changing mix.
//! A forward pass's per-step plan (`make_lora_step`, `lora_step_layer`) runs the `_ix` pair instead, whose
//! shrink also cuts the input features into chunks ([`shrink_chunk`]) with one intermediate partial per
//! chunk, summed by the expand (`LORAX_CUDA_LORA_KSPLIT=0`: the earlier `_ix0` pair, for comparisons).
//! In a pass of more than 256 rows the plan puts segments of more than 64 rows (prompt chunks) on the
//! tensor-core prompt pair (`lora_shrink_pf*` + `lora_expand_pf`, records of 64 rows, the same partials);
//! with it off (`LORAX_CUDA_LORA_PROMPT=gemm`) or in f32, such passes run layer by layer, prompt chunks as
//! cuBLAS GEMMs.
//!
//! Planning (checks, uploads, allocations) and running (a few launches a layer) are separate, so a
//! run can be captured in a CUDA graph and replayed (the benchmarks time kernels that way).

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cudarc::driver::{result as drv_result, LaunchConfig, PushKernelArg};

use super::{cfg, drv, graph, int, shape_err, uint, CudaBackend, CudaTensor, DevBuf, LORA_ROWS, SMEM_LIMIT};
use crate::backend::{Backend, LoraRows, LoraSegment};
use crate::error::{EngineError, Result};
use crate::lora::{LoraWeights, Target, NUM_TARGETS};

/// BGMV limits and block sizes (BG_ROWS, BG_RANK, BG_SHRINK_THREADS in kernels/lora.cu).
const BG_ROWS: usize = 4;
pub(super) const BG_RANK: usize = 64;
/// Longest segment BGMV takes (in chunks of BG_ROWS rows); longer ones (prompts) go to SGMV's row tiles.
const BG_SPLIT_MAX: usize = 64;
const BG_SHRINK_THREADS: u32 = 128;
const BG_EXPAND_THREADS: u32 = 256;
/// The k-split shrink `bgmv_shrink_ix` (BG_KWARPS, BG_KV, BG_KC_BYTES in kernels/lora.cu): warps per block,
/// 16-byte vectors of A per lane per group, bytes of one row of x a block stages; and the number of
/// chunks it aims at. Its expand `bgmv_expand_ix` takes two columns per thread, and its blocks per
/// multiprocessor (`__launch_bounds__`).
const BG_KWARPS: u32 = 8;
const BG_KV: usize = 4;
const BG_KC_BYTES: usize = 4096;
const BG_KSPLIT: usize = 8;
/// 16-byte vectors of each row each lane of the tensor-core shrink loads in a chunk (BG_TC_SLICES in
/// kernels/lora.cu): a row's four lanes cover 32 elements with each.
const BG_TC_SLICES: usize = 4;
const BG_EXPAND_COLS: usize = 2;
const BG_EXPAND_BLOCKS_PER_SM: usize = 3;

/// Columns of one tile of `bgmv_expand_ix` (two per thread).
const EXPAND_TILE: usize = BG_EXPAND_COLS * BG_EXPAND_THREADS as usize;

/// Rows of one record of `bgmv_expand_vx` (BE_ROWS in kernels/lora.cu): the shrink's records of a segment
/// merged, so that B is read once for up to this many rows.
pub(super) const EXPAND_VX_ROWS: usize = 16;

/// Columns one thread of `bgmv_expand_vx` takes (BE_V: one 8-byte access of y) for elements of `size` bytes.
fn expand_vx_cols(size: usize) -> usize {
    8 / size
}

/// Whether `bgmv_expand_vx` can add into y (rows of `out` elements of `size` bytes at device address `y`)
/// for parts at first columns `firsts` of `widths` columns: its 8-byte accesses need every part's first
/// column and width, and y's row width, whole multiples of a thread's columns, and y 8-byte aligned.
fn expand_vx_fits(size: usize, out: usize, y: u64, firsts: &[i32], widths: &[usize]) -> bool {
    let whole = |c: usize| c.is_multiple_of(expand_vx_cols(size));
    whole(out)
        && y.is_multiple_of(8)
        && firsts.iter().all(|&c| usize::try_from(c).is_ok_and(whole))
        && widths.iter().all(|&c| whole(c))
}

/// The expand's grid for `records` records and parts of `part_cols` columns in groups of `ct` tiles of
/// `tile` columns (lora.cu's `bgmv_expand_ix`/`_iy`/`_vx`), and its (e1, e2, tiles per block) arguments.
fn expand_grid(records: usize, part_cols: &[usize], tile: usize, ct: usize) -> Result<(LaunchConfig, [i32; 3])> {
    let [e1, e2, total] = expand_groups(part_cols, tile, ct);
    let grid = cfg(
        (uint("records", records)?, uint("column groups", total)?, 1),
        BG_EXPAND_THREADS,
        0,
    );
    Ok((
        grid,
        [
            int("column groups", e1)?,
            int("column groups", e2)?,
            int("tiles per block", ct)?,
        ],
    ))
}

/// `bgmv_expand_ix`'s grid along y for parts of `part_cols` columns (at most 3) at `ct` tiles of `tile`
/// columns a group (`bgmv_expand_vx`: 1): `[e1, e2, total]`, where part 0's groups are y < e1, part 1's
/// e1 <= y < e2 and part 2's e2 <= y < total (the kernels' mapping; a missing part has no groups).
pub(super) fn expand_groups(part_cols: &[usize], tile: usize, ct: usize) -> [usize; 3] {
    let groups = |p: usize| part_cols.get(p).map_or(0, |c| c.div_ceil(tile).div_ceil(ct.max(1)));
    [groups(0), groups(0) + groups(1), groups(0) + groups(1) + groups(2)]
}

/// Column tiles each block of `bgmv_expand_ix` walks, for `tiles` column tiles a record (all its parts), `rows`
/// rows with an adapter in `records` (padded) records, on `sms` multiprocessors.
/// - Records of one row each (distinct adapters): the most (at most 8) that still leave a whole wave of
///   blocks, so that each block pays its record's lookups and intermediate rows once for several tiles; 1
///   when the tiles fill fewer than two waves as they are. The last wave may be part-empty (128 records:
///   q/k/v 640 blocks, 1.6 waves of 396; o 512, 1.3 waves).
/// - Records of two rows or more on average (adapters shared by several rows): 1. Each tile is then several
///   rows' work, and more blocks of one tile ran faster: gate/up's expand (28672 columns) at 32 records of
///   4 rows took 23.0-27.0 us at one tile a block against 31.9-34.2 at the 4 of the rule above, and 26.8-30.2
///   at 2 (bench/NOTES.md session 31; the q/k/v and o expands get 1 there either way). Rows without an
///   adapter do not count: they are no record's work.
///
/// A decode graph's grid can take either value for one padded record count (a new signature, captured once).
pub(super) fn expand_tiles(tiles: usize, rows: usize, records: usize, sms: usize) -> usize {
    if rows >= 2 * records {
        return 1;
    }
    (records * tiles / (BG_EXPAND_BLOCKS_PER_SM * sms).max(1)).clamp(1, 8)
}

/// The k-chunk of the split shrink (kernels/lora.cu, `bgmv_shrink_ix`) for rows of `k` elements of `size`
/// bytes: all of `k` when it is at most one group (32 lanes × BG_KV 16-byte vectors: 1024 elements of 2 bytes,
/// 512 of 4), else whole groups, about `k / BG_KSPLIT` each, at most BG_KC_BYTES of a row (the block's shared
/// memory): 4096 of bf16 → 4 chunks of 1024, 14336 → 7 of 2048. The shrink writes one partial per chunk.
fn shrink_chunk(k: usize, size: usize) -> usize {
    let group = 32 * BG_KV * (16 / size);
    if k <= group {
        return k;
    }
    (k.div_ceil(BG_KSPLIT).div_ceil(group) * group).min(BG_KC_BYTES / size)
}

/// The chunk of the tensor-core shrink (kernels/lora.cu, `bgmv_shrink_tc*`, 16-bit storage): BG_TC_KC =
/// BG_KWARPS warps × BG_TC_SLICES vectors × 32 elements (1024), or all of `k` when it is shorter: 4096 → 4
/// chunks, 14336 → 14.
fn shrink_chunk_tc(k: usize) -> usize {
    k.min(BG_KWARPS as usize * BG_TC_SLICES * 32)
}

/// `bgmv_shrink_tc1`, `_tc2` or `_tc4`: the tensor-core shrink whose tiles of 16 rank rows hold rank `rmax`
/// (at most BG_RANK).
fn shrink_tc_kernel(rmax: usize) -> &'static str {
    match rmax {
        0..=16 => "bgmv_shrink_tc1",
        17..=32 => "bgmv_shrink_tc2",
        _ => "bgmv_shrink_tc4",
    }
}

/// The prompt pair on the tensor cores (kernels/lora.cu, `lora_shrink_pf*` + `lora_expand_pf`): rows of a
/// record, warps of a block, and columns of one expand block (PF_ROWS, PF_WARPS, PF_COLS).
const PF_ROWS: usize = 64;
const PF_WARPS: u32 = 8;
const PF_COLS: usize = 256;

/// Most k-chunks (partials) of `lora_shrink_pf*`, which each block of `lora_expand_pf` sums.
const PF_MAX_CHUNKS: usize = 16;

/// The k-chunk of `lora_shrink_pf*` for rows of `k` elements when a chunk has `blocks` blocks (records ×
/// parts), on `sms` multiprocessors: as many chunks as make two blocks a multiprocessor, at least BG_KSPLIT
/// and at most PF_MAX_CHUNKS, each whole 64-element pieces (a block's two halves are whole 32-element
/// stretches). A 512-row prompt's q/k/v (8 records × 3 parts) on 132 multiprocessors: 4096 → 11 chunks of
/// 384; its o (8 × 1): 16 of 256.
fn prompt_chunk(k: usize, blocks: usize, sms: usize) -> usize {
    let chunks = (2 * sms).div_ceil(blocks.max(1)).clamp(BG_KSPLIT, PF_MAX_CHUNKS);
    k.div_ceil(chunks).next_multiple_of(64).max(64)
}

/// `lora_shrink_pf2`, `_pf4` or `_pf8`: the prompt shrink whose 2, 4 or 8 tiles of 8 rank rows hold rank
/// `rmax` (at most BG_RANK).
fn prompt_shrink_kernel(rmax: usize) -> &'static str {
    match rmax {
        0..=16 => "lora_shrink_pf2",
        17..=32 => "lora_shrink_pf4",
        _ => "lora_shrink_pf8",
    }
}

/// Segments of more rows than this run as cuBLAS GEMMs ([`CudaBackend::lora_gemm_segments`]; BGMV's
/// limit, so that the rest of a mixed step's segments stay on BGMV).
pub(super) const GEMM_MIN_ROWS: usize = BG_SPLIT_MAX;

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

/// `struct LoraRef` of kernels/lora.cu: one (layer, target)'s pair in an adapter's index (32 bytes).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct LoraRef {
    a: u64,
    b: u64,
    rank: i32,
    scale: f32,
    cols: i32,
    pad: i32,
}

impl super::Plain for LoraRef {}

/// `struct LoraRec` of kernels/lora.cu: at most BG_ROWS rows of a step (PF_ROWS for the prompt pair) and
/// their adapter's index
/// (16 bytes).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct LoraRec {
    index: u64,
    start: i32,
    len: i32,
}

impl super::Plain for LoraRec {}

/// Largest forward pass (rows) whose plan runs every segment on the `_ix` pair (decode steps). A larger
/// pass's plan cuts its segments of more than GEMM_MIN_ROWS rows (prompt chunks) into records of PF_ROWS
/// rows for the tensor-core prompt pair, and the rest into `_ix` records as before.
pub(super) const STEP_MAX_ROWS: usize = 256;

/// The expand records of `bgmv_expand_vx`: consecutive records of `recs` (the shrink's, in order) that name
/// the same index and continue each other's rows, merged while they stay within `max_rows` rows.
fn merge_records(recs: &[LoraRec], max_rows: usize) -> Vec<LoraRec> {
    let mut out: Vec<LoraRec> = Vec::with_capacity(recs.len());
    for r in recs {
        match out.last_mut() {
            Some(m) if m.index == r.index && m.start + m.len == r.start && (m.len + r.len) as usize <= max_rows => {
                m.len += r.len
            }
            _ => out.push(*r),
        }
    }
    out
}

/// An uploaded adapter's device table of its LoRA pairs, `LoraRef[layers][NUM_TARGETS]`
/// ([`crate::Backend::lora_index`]), with what a step's plan checks without reading it back.
pub struct CudaLoraIndex {
    table: DevBuf,
    /// Unique to this index (never reused): whose `lora_A` rows a [`LoraGemm`] group's reserved rows hold.
    id: u64,
    layers: usize,
    max_rank: usize,
    /// Per target: the largest rank of its pairs (0 where it has none).
    ranks: [usize; NUM_TARGETS],
    /// Per target: (in features, columns) of its pairs (the same in every layer that has one).
    dims: [Option<(usize, usize)>; NUM_TARGETS],
}

impl std::fmt::Debug for CudaLoraIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaLoraIndex")
            .field("layers", &self.layers)
            .field("max_rank", &self.max_rank)
            .field("dims", &self.dims)
            .finish_non_exhaustive()
    }
}

/// A forward pass's LoRA plan ([`crate::Backend::lora_step`]): its rows in records of at most BG_ROWS
/// rows naming their adapter's index, uploaded once; each layer launches the two `_ix` kernels (or `_ix0`),
/// or the `_ix` shrink and `bgmv_expand_vx`. The table holds the shrink's `records` (padded), then, when
/// `expand_vx`, as many expand records of `bgmv_expand_vx` (merged, then padded to the same count, so its
/// grid is the same). A pass with prompt chunks also has `prompt`: records of at most PF_ROWS rows for the
/// prompt pair, launched first (and `records` is 0 when no other segment has an adapter).
pub struct CudaLoraStep {
    table: DevBuf,
    records: usize,
    rows: usize,
    /// Rows with an adapter (the records' rows).
    adapter_rows: usize,
    /// The table holds `bgmv_expand_vx`'s records too (made while `LORAX_CUDA_LORA_EXPAND=vx`).
    expand_vx: bool,
    rmax: usize,
    layers: usize,
    /// Per target: (in features, columns) where some adapter of the step has it.
    dims: [Option<(usize, usize)>; NUM_TARGETS],
    /// The prompt pair's records of at most PF_ROWS rows (`lora_shrink_pf*` + `lora_expand_pf`), where the
    /// pass has prompt chunks; `records` is then 0 when no other segment has an adapter.
    prompt: Option<(DevBuf, usize)>,
    /// The [`LoraGemm`] groups (bit g: group g) whose reserved rows hold this step's one adapter's `lora_A`
    /// rows: their projections take the shrink in the GEMM ([`CudaBackend::lora_project_in_gemm`]).
    pub(super) in_gemm: u32,
}

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
    /// The device index of an adapter's pairs; `None` when it has none, or when a target's pairs differ
    /// in shape between layers (its steps then take the per-layer path).
    pub(super) fn make_lora_index(
        &self,
        layers: &[[Option<LoraWeights<Self>>; NUM_TARGETS]],
    ) -> Result<Option<CudaLoraIndex>> {
        let mut refs = vec![LoraRef::default(); layers.len() * NUM_TARGETS];
        let mut dims: [Option<(usize, usize)>; NUM_TARGETS] = [None; NUM_TARGETS];
        let mut max_rank = 0;
        let mut ranks = [0usize; NUM_TARGETS];
        for (l, layer) in layers.iter().enumerate() {
            for (t, w) in layer.iter().enumerate() {
                let Some(w) = w else { continue };
                let ((rank, k), (cols, rb)) = (w.a.rows_cols(), w.b.rows_cols());
                if rb != rank || rank == 0 || cols == 0 || *dims[t].get_or_insert((k, cols)) != (k, cols) {
                    return Ok(None);
                }
                max_rank = max_rank.max(rank);
                ranks[t] = ranks[t].max(rank);
                refs[l * NUM_TARGETS + t] = LoraRef {
                    a: self.ptr(&w.a.buf),
                    b: self.ptr(&w.b.buf),
                    rank: int("rank", rank)?,
                    scale: w.scale,
                    cols: int("columns", cols)?,
                    pad: 0,
                };
            }
        }
        if max_rank == 0 {
            return Ok(None);
        }
        // On the upload stream, as the adapter's weights (this may run beside a step; see
        // crate::engine::AdapterUploader), and finished before the index is handed out.
        let bytes = super::plain_bytes(&refs);
        let table = self
            .upload_stream
            .clone_htod(bytes)
            .map_err(|e| drv("uploading a LoRA index", e))?;
        self.upload_stream
            .synchronize()
            .map_err(|e| drv("uploading a LoRA index", e))?;
        Ok(Some(CudaLoraIndex {
            table: DevBuf::Own(table),
            id: INDEX_IDS.fetch_add(1, Ordering::Relaxed),
            layers: layers.len(),
            max_rank,
            ranks,
            dims,
        }))
    }

    /// A pass's plan (see [`CudaLoraStep`]): a decode-sized pass's segments in `_ix` records; a larger
    /// pass's (more than STEP_MAX_ROWS rows) segments of more than GEMM_MIN_ROWS rows in prompt records,
    /// the rest in `_ix` records. `None` sends it down the per-layer path: BGMV off, a larger pass with the
    /// prompt pair off or f32 storage, an adapter without an index, ranks above BG_RANK, or adapters whose
    /// pairs for one target differ in shape.
    pub(super) fn make_lora_step(&self, rows: usize, segments: &[LoraRows<'_, Self>]) -> Result<Option<CudaLoraStep>> {
        // A pass with prompt chunks: the tensor-core prompt pair for 16-bit storage, unless turned off.
        let large = rows > self.lora_prompt_rows;
        if !self.lora_bgmv || (large && !(self.lora_prompt_tc && self.dtype.size() == 2)) {
            return Ok(None);
        }
        let mut pf: Vec<LoraRec> = Vec::new();
        let (mut rmax, mut layers) = (0, usize::MAX);
        let mut dims: [Option<(usize, usize)>; NUM_TARGETS] = [None; NUM_TARGETS];
        let mut recs: Vec<LoraRec> = Vec::with_capacity(rows.div_ceil(BG_ROWS) + segments.len());
        // The one adapter of every segment, when there is one and its weights have all arrived (the shrink
        // inside the GEMM copies every layer's rows at once).
        let mut single: Option<&CudaLoraIndex> = None;
        let mut one = true;
        for seg in segments.iter().filter(|s| s.len > 0) {
            let Some(ix) = &seg.adapter.index else { return Ok(None) };
            one &= seg.adapter.gate.as_ref().is_none_or(|g| g.done()) && single.is_none_or(|s| s.id == ix.id);
            single = Some(ix);
            if seg.start + seg.len > rows {
                return Err(EngineError::Backend(format!(
                    "lora: segment rows {}..{} of {rows}",
                    seg.start,
                    seg.start + seg.len
                )));
            }
            for (d, e) in dims.iter_mut().zip(ix.dims) {
                match (*d, e) {
                    (Some(a), Some(b)) if a != b => return Ok(None),
                    (None, Some(b)) => *d = Some(b),
                    _ => {}
                }
            }
            rmax = rmax.max(ix.max_rank);
            layers = layers.min(ix.layers);
            let index = self.ptr(&ix.table);
            if large && seg.len > self.lora_prompt_segment {
                for c in (0..seg.len).step_by(PF_ROWS) {
                    pf.push(LoraRec {
                        index,
                        start: int("row", seg.start + c)?,
                        len: int("rows", PF_ROWS.min(seg.len - c))?,
                    });
                }
                continue;
            }
            for c in (0..seg.len).step_by(BG_ROWS) {
                recs.push(LoraRec {
                    index,
                    start: int("row", seg.start + c)?,
                    len: int("rows", BG_ROWS.min(seg.len - c))?,
                });
            }
        }
        if (recs.is_empty() && pf.is_empty()) || rmax > BG_RANK {
            return Ok(None);
        }
        let prompt = if pf.is_empty() {
            None
        } else {
            self.lora_prompt_plans
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Some((self.upload(&pf)?, pf.len()))
        };
        // Padded with empty records to a power of two, so that a decode graph's grids stay the same while
        // the batch's mix of adapters changes within that bound (none when only prompt chunks have adapters).
        let adapter_rows = recs.iter().map(|r| r.len as usize).sum();
        let expand = self.lora_expand_vx.then(|| merge_records(&recs, self.lora_expand_rows));
        let records = if recs.is_empty() {
            0
        } else {
            recs.len().next_power_of_two()
        };
        recs.resize(records, LoraRec::default());
        if let Some(expand) = &expand {
            recs.extend_from_slice(expand);
            recs.resize(2 * records, LoraRec::default());
        }
        self.last_lora_plan.store(
            ((records as u64) << 32) | adapter_rows as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        let in_gemm = match single {
            Some(ix) if one && prompt.is_none() && records > 0 => self.lora_gemm_ready(ix)?,
            _ => 0,
        };
        Ok(Some(CudaLoraStep {
            table: self.upload(&recs)?,
            records,
            rows,
            adapter_rows,
            expand_vx: expand.is_some(),
            rmax,
            layers,
            dims,
            prompt,
            in_gemm,
        }))
    }

    /// One layer's LoRA products of a planned step: for the `parts` some adapter of the step has, shrink
    /// then expand on the prompt pair's records (`lora_*_pf*`), then on the `_ix` records (`bgmv_*_ix`):
    /// two launches for each kind the plan has (see kernels/lora.cu).
    pub(super) fn lora_step_layer(
        &self,
        y: &mut CudaTensor,
        x: &CudaTensor,
        step: &CudaLoraStep,
        layer: usize,
        parts: &[(Target, usize)],
    ) -> Result<()> {
        let (n, k) = x.rows_cols();
        let (ny, out) = y.rows_cols();
        if n != ny || n != step.rows || layer >= step.layers {
            return Err(EngineError::Backend(format!(
                "lora_layer: x {:?}, y {:?}, layer {layer}, for a step of {} rows and {} layers",
                x.shape, y.shape, step.rows, step.layers
            )));
        }
        let mut targets = [0i32; 3];
        let mut cols = [0i32; 3];
        let mut part_cols = [0usize; 3];
        let (mut used, mut max_cols) = (0, 0);
        for &(target, col) in parts {
            let Some((kin, c)) = step.dims[target.index()] else {
                continue;
            };
            if kin != k || col + c > out || used == 3 {
                return Err(EngineError::Backend(format!(
                    "lora_layer: {target:?} pairs of {kin} -> {c} at column {col} for x {:?}, y {:?} ({} parts)",
                    x.shape,
                    y.shape,
                    parts.len()
                )));
            }
            targets[used] = int("target", target.index())?;
            cols[used] = int("column", col)?;
            part_cols[used] = c;
            max_cols = max_cols.max(c);
            used += 1;
        }
        if used == 0 || k == 0 {
            return Ok(());
        }
        let [t0, t1, t2] = &targets;
        let [c0, c1, c2] = &cols;
        let (li, ni, ki, oi, ri) = (
            int("layer", layer)?,
            int("rows", n)?,
            int("in features", k)?,
            int("out features", out)?,
            int("rank", step.rmax)?,
        );
        let parts = uint("parts", used)?;
        let (xp, yp, sp) = (self.ptr(&x.buf), self.ptr(&y.buf), self.ptr(&step.table));
        // The launches the k-split shrinks (`_ix`, `_tc*`, `lora_shrink_pf*`) share, and those `bgmv_expand_vx` and
        // `lora_expand_pf` share: the same parameters but for the intermediate, the records and the chunking.
        let shrink_run = |name: &str, grid: LaunchConfig, tp: u64, table: u64, pstride: i32, kc: i32| -> Result<()> {
            launch!(self, name, grid, &tp, &xp, &table, &li, t0, t1, t2, &ni, &pstride, &ki, &ri, &kc);
            Ok(())
        };
        let expand_run =
            |name: &str, grid: LaunchConfig, [tp, table]: [u64; 2], [e1, e2]: [i32; 2], pstride: i32, ks: i32| {
                launch!(
                    self, name, grid, &yp, &tp, &table, &li, t0, t1, t2, c0, c1, c2, &e1, &e2, &ni, &pstride, &oi, &ri,
                    &ks
                );
                Ok::<(), EngineError>(())
            };
        if let Some((table, records)) = &step.prompt {
            // The prompt pair: partials laid out as the `_ix` pair's, in an intermediate of their own.
            let kc = prompt_chunk(k, records * used, self.num_sms);
            let chunks = k.div_ceil(kc);
            let tmp = self.bytes(chunks * used * n * step.rmax * 4)?;
            int("intermediate rows", chunks * used * n)?;
            let (tp, pp) = (self.ptr(&tmp), self.ptr(table));
            let (pstride, kci, ksi) = (
                int("intermediate rows", used * n)?,
                int("k chunk", kc)?,
                int("k chunks", chunks)?,
            );
            let recs = uint("records", *records)?;
            let shrink = cfg((recs, uint("k chunks", chunks)?, parts), PF_WARPS * 32, 0);
            let [e1, e2, total] = expand_groups(&part_cols[..used], PF_COLS, 1);
            let (e1, e2) = (int("column groups", e1)?, int("column groups", e2)?);
            let expand = cfg((recs, uint("column groups", total)?, 1), PF_WARPS * 32, 0);
            shrink_run(prompt_shrink_kernel(step.rmax), shrink, tp, pp, pstride, kci)?;
            expand_run("lora_expand_pf", expand, [tp, pp], [e1, e2], pstride, ksi)?;
        }
        if step.records == 0 {
            return Ok(());
        }
        let recs = uint("records", step.records)?;
        if !self.lora_ksplit {
            let tmp = self.bytes(used * n * step.rmax * 4)?;
            let tp = self.ptr(&tmp);
            let shrink = cfg((recs, uint("rank", step.rmax)?, parts), BG_SHRINK_THREADS, 0);
            let tiles = uint("column tiles", max_cols.div_ceil(BG_EXPAND_THREADS as usize))?;
            let expand = cfg((recs, tiles, parts), BG_EXPAND_THREADS, 0);
            launch!(
                self,
                "bgmv_shrink_ix0",
                shrink,
                &tp,
                &xp,
                &sp,
                &li,
                t0,
                t1,
                t2,
                &ni,
                &ki,
                &ri
            );
            launch!(
                self,
                "bgmv_expand_ix0",
                expand,
                &yp,
                &tp,
                &sp,
                &li,
                t0,
                t1,
                t2,
                c0,
                c1,
                c2,
                &ni,
                &oi,
                &ri
            );
            return Ok(());
        }
        // One partial per k-chunk: chunk c's part p keeps row r of the pass in row (c · parts + p) · n + r of
        // the intermediate (`pstride` = parts · n rows per chunk); every entry the expand reads is written by
        // the shrink of the same layer, so nothing is zeroed.
        // The shrink on the tensor cores for 16-bit storage (LORAX_CUDA_LORA_SHRINK=simt: on the CUDA cores,
        // as f32 always runs).
        let (kc, shrink_name) = if self.lora_shrink_tc && self.dtype.size() == 2 {
            (shrink_chunk_tc(k), shrink_tc_kernel(step.rmax))
        } else {
            (shrink_chunk(k, self.dtype.size()), "bgmv_shrink_ix")
        };
        let chunks = k.div_ceil(kc);
        let tmp = self.bytes(chunks * used * n * step.rmax * 4)?;
        let tp = self.ptr(&tmp);
        let (pstride, kci, ksi) = (
            int("intermediate rows", used * n)?,
            int("k chunk", kc)?,
            int("k chunks", chunks)?,
        );
        int("intermediate rows", chunks * used * n)?;
        let shrink = cfg((recs, uint("k chunks", chunks)?, parts), BG_KWARPS * 32, 0);
        // The parts' column groups end to end along the grid's y: part p's groups start at e_p.
        let size = self.dtype.size();
        let vx = step.expand_vx && expand_vx_fits(size, out, yp, &cols[..used], &part_cols[..used]);
        let (tile, ct) = if vx {
            (expand_vx_cols(size) * BG_EXPAND_THREADS as usize, 1)
        } else {
            (EXPAND_TILE, self.ix_expand_tiles(step, &part_cols[..used]))
        };
        let (expand, [e1, e2, cti]) = expand_grid(step.records, &part_cols[..used], tile, ct)?;
        shrink_run(shrink_name, shrink, tp, sp, pstride, kci)?;
        if vx {
            // The expand records follow the shrink's in the table (16 bytes each).
            let ep = sp + 16 * step.records as u64;
            return expand_run("bgmv_expand_vx", expand, [tp, ep], [e1, e2], pstride, ksi);
        }
        launch!(
            self,
            "bgmv_expand_ix",
            expand,
            &yp,
            &tp,
            &sp,
            &li,
            t0,
            t1,
            t2,
            c0,
            c1,
            c2,
            &e1,
            &e2,
            &cti,
            &ni,
            &pstride,
            &oi,
            &ri,
            &ksi
        );
        Ok(())
    }

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
            let (r, ob) = seg.check(|t| &t.shape, &x.shape, &y.shape)?;
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

    /// `y[rows] += scale · (x[rows] · aᵀ) · bᵀ` for each of `segs` as cuBLAS GEMMs, the intermediate
    /// `[len, rank]` in the storage type (as PEFT keeps `lora_A`'s output): a prompt chunk's rows run at
    /// the GEMM rate instead of SGMV's per-segment tiles and atomics. Products of one shape go to cuBLAS as
    /// one batched call: the shrinks of segments of equal length and rank, the expands of those that also
    /// share their width and scale (a chunk of equal prompts with q/k/v of a few adapters: two or three
    /// calls instead of two per segment and target; on the H200 each small GEMM took 3-7 µs plus a split-K
    /// reduction, about 220 µs a layer for four prompts of 512 rows, bench/NOTES.md session 12).
    pub(super) fn lora_gemm_segments(
        &self,
        y: &mut CudaTensor,
        x: &CudaTensor,
        segs: &[LoraSegment<'_, CudaTensor>],
    ) -> Result<()> {
        let ((n, k), (ny, out)) = (x.rows_cols(), y.rows_cols());
        if n != ny {
            return Err(shape_err("lora", &x.shape, &y.shape));
        }
        let mut dims = Vec::with_capacity(segs.len());
        for seg in segs {
            dims.push(seg.check(|t| &t.shape, &x.shape, &y.shape)?);
        }
        let live: Vec<usize> = (0..segs.len()).filter(|&i| segs[i].len > 0).collect();
        if live.is_empty() || k == 0 {
            return Ok(());
        }
        // One intermediate for all of them, each segment's [len, rank] at its own 16-byte aligned offset
        // (cuBLAS's batched calls need every matrix 16-byte aligned; see gemm_group).
        let size = self.dtype.size() as u64;
        let align = 16 / self.dtype.size();
        let mut offs = vec![0u64; segs.len()];
        let mut total = 0;
        for &i in &live {
            offs[i] = total as u64 * size;
            total = (total + segs[i].len * dims[i].0).next_multiple_of(align);
        }
        let tmp = self.bytes(total * self.dtype.size())?;
        let tp = self.ptr(&tmp);
        let (xp, yp) = (self.ptr(&x.buf), self.ptr(&y.buf));
        // Groups of one shape, in first-seen order.
        let group = |key: &dyn Fn(usize) -> [u64; 4]| -> Vec<Vec<usize>> {
            let mut groups: Vec<([u64; 4], Vec<usize>)> = Vec::new();
            for &i in &live {
                let kk = key(i);
                match groups.iter_mut().find(|(g, _)| *g == kk) {
                    Some((_, v)) => v.push(i),
                    None => groups.push((kk, vec![i])),
                }
            }
            groups.into_iter().map(|(_, v)| v).collect()
        };
        // tmp[len, r] = x[rows] · aᵀ.
        for g in group(&|i| [segs[i].len as u64, dims[i].0 as u64, 0, 0]) {
            let (len, r) = (segs[g[0]].len, dims[g[0]].0);
            let ptrs: Vec<[u64; 3]> = g
                .iter()
                .map(|&i| {
                    [
                        tp + offs[i],
                        xp + (segs[i].start * k) as u64 * size,
                        self.ptr(&segs[i].a.buf),
                    ]
                })
                .collect();
            self.gemm_group((len, r, k), &ptrs, r, (1.0, 0.0))?;
        }
        // y[rows, col ..] += scale · tmp · bᵀ.
        for g in group(&|i| {
            [
                segs[i].len as u64,
                dims[i].0 as u64,
                dims[i].1 as u64,
                u64::from(segs[i].scale.to_bits()),
            ]
        }) {
            let (len, (r, cols), scale) = (segs[g[0]].len, dims[g[0]], segs[g[0]].scale);
            let ptrs: Vec<[u64; 3]> = g
                .iter()
                .map(|&i| {
                    let y0 = yp + (segs[i].start * out + segs[i].col) as u64 * size;
                    [y0, tp + offs[i], self.ptr(&segs[i].b.buf)]
                })
                .collect();
            self.gemm_group((len, cols, r), &ptrs, out, (scale, 1.0))?;
        }
        Ok(())
    }

    /// Several products of one shape as one batched call; one product, or products whose matrices or rows
    /// are not all 16-byte aligned, as plain GEMMs (a batched call reads its pointers on the device, where cuBLAS
    /// cannot check them, and expects 16-byte alignment for 16-bit types: an odd segment length at an odd
    /// rank, or an odd column offset, would fault).
    fn gemm_group(
        &self,
        (m, n, k): (usize, usize, usize),
        ptrs: &[[u64; 3]],
        ldy: usize,
        ab: (f32, f32),
    ) -> Result<()> {
        let es = self.dtype.size();
        let aligned = ptrs.iter().flatten().all(|p| p.is_multiple_of(16))
            && (k * es).is_multiple_of(16)
            && (ldy * es).is_multiple_of(16);
        if ptrs.len() > 1 && aligned {
            return self.gemm_batched((m, n, k), ptrs, ldy, ab);
        }
        for p in ptrs {
            self.gemm_into((m, n, k), (p[0], p[1], p[2]), ldy, ab)?;
        }
        Ok(())
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

/// The rank slot of each part of the shrinks inside the q/k/v and o GEMMs (`LORAX_CUDA_LORA_IN_GEMM`'s
/// default): 96 rows past the q/k/v weight, 32 past o's. Measured on an H100 (bench/NOTES.md session 39,
/// call 1): [128, 4096] x [6240, 4096]ᵀ took 21.55 µs against 21.30-21.46 for the weight alone, where the
/// shrink it replaces (`bgmv_shrink_tc1`) took 5.8 µs (session 31).
pub(super) const IN_GEMM_RANK: usize = 32;

/// The rank slot is a multiple of this, so that the wide rows stay whole 16-byte vectors for the kernels
/// that read them (the fused rotary attention loads them so without a check).
pub(super) const IN_GEMM_ALIGN: usize = 8;

/// Ids of [`CudaLoraIndex`]es (0 is no adapter's).
static INDEX_IDS: AtomicU64 = AtomicU64::new(1);

/// The LoRA shrink inside a projection's GEMM. At load, a projection's weight (q/k/v fused, and o) gets
/// `parts × slot` zeroed rows past its own, in one allocation ([`CudaBackend::lora_gemm_register`]). A
/// planned pass (a decode step, or a pass of up to 256 rows without prompt chunks on the prompt pair) whose
/// rows with an adapter all take one adapter, with pairs of every part of the
/// projection of ranks of at most `slot`, copies that adapter's `lora_A` rows of every layer into them
/// (`lora_gemm_rows`, one launch, only when they hold another adapter's), so the projection's one GEMM over
/// the longer weight gives the product and, in the columns past it, each row's `x · Aᵀ` (rows of the base
/// model get columns nobody reads). The expand (`bgmv_expand_iy`) reads those columns in place of the
/// shrink's partials. Each step's products then take one launch less a projection.
#[derive(Default)]
pub struct LoraGemm {
    groups: Vec<GemmGroup>,
    /// Passes planned with some group's rows ready, and copies of an adapter's rows.
    pub(super) steps: u64,
    pub(super) copies: u64,
}

/// The registered weights of one shape and list of parts, one per layer.
struct GemmGroup {
    targets: Vec<Target>,
    /// Rows of the weight itself, and its input features.
    out: usize,
    k: usize,
    slot: usize,
    /// Per layer: the whole allocation as the weight the GEMM takes, `[out + targets.len() × slot, k]` (the
    /// weight's rows, then the reserved ones).
    full: Vec<Option<CudaTensor>>,
    /// `u64[layers]` on the device: each layer's first reserved row (made at first use).
    table: Option<DevBuf>,
    /// Id of the index whose rows the reserved rows hold (0: zeros).
    resident: u64,
}

impl CudaBackend {
    /// [`crate::Backend::lora_gemm_weight`]: `w` `[out, k]` copied into an allocation with `targets.len() ×
    /// lora_in_gemm` zeroed rows past its own; returns the weight as a range of it. `w` itself where the
    /// shrink inside the GEMM is off or the parts are not 1-3.
    pub(super) fn lora_gemm_register(&self, w: CudaTensor, layer: usize, targets: &[Target]) -> Result<CudaTensor> {
        let slot = self.lora_in_gemm;
        if slot == 0 || targets.is_empty() || targets.len() > 3 || w.shape.len() != 2 || w.numel() == 0 {
            return Ok(w);
        }
        let (out, k) = w.rows_cols();
        let size = self.dtype.size();
        let (own, reserved) = (out * k * size, targets.len() * slot * k * size);
        let full = self.alloc(&[out + targets.len() * slot, k])?;
        let DevBuf::Own(slice) = full.buf else {
            return Ok(w);
        };
        let base = self.slice_ptr(&slice);
        // SAFETY: `slice` holds own + reserved bytes and `w` holds own bytes (its shape, checked above); both
        // are device memory of this context, ordered on this stream.
        unsafe { drv_result::memcpy_dtod_async(base, self.ptr(&w.buf), own, self.stream.cu_stream()) }
            .map_err(|e| drv("copying a weight past which LoRA rows go", e))?;
        self.memset_zero(base + own as u64, reserved)?;
        let owner = Arc::new(slice);
        let full = CudaTensor {
            shape: vec![out + targets.len() * slot, k],
            buf: DevBuf::Part {
                owner: Some(owner.clone()),
                ptr: base,
                len: own + reserved,
            },
        };
        let mut g = self.lora_gemm_lock()?;
        let gi = match g
            .groups
            .iter()
            .position(|x| x.targets == targets && (x.out, x.k, x.slot) == (out, k, slot))
        {
            Some(i) => i,
            None => {
                g.groups.push(GemmGroup {
                    targets: targets.to_vec(),
                    out,
                    k,
                    slot,
                    full: Vec::new(),
                    table: None,
                    resident: 0,
                });
                g.groups.len() - 1
            }
        };
        let grp = &mut g.groups[gi];
        if grp.full.len() <= layer {
            grp.full.resize_with(layer + 1, || None);
        }
        grp.full[layer] = Some(full);
        grp.table = None;
        grp.resident = 0;
        Ok(CudaTensor {
            shape: w.shape.clone(),
            buf: DevBuf::Part {
                owner: Some(owner),
                ptr: base,
                len: own,
            },
        })
    }

    /// Column tiles each block of `bgmv_expand_ix`/`_iy` walks for a step's parts of `part_cols` columns
    /// (`LORAX_CUDA_LORA_EXPAND_TILES`, or as many as keep one wave of blocks).
    fn ix_expand_tiles(&self, step: &CudaLoraStep, part_cols: &[usize]) -> usize {
        let tiles: usize = part_cols.iter().map(|c| c.div_ceil(EXPAND_TILE)).sum();
        self.lora_expand_tiles
            .unwrap_or_else(|| expand_tiles(tiles, step.adapter_rows, step.records, self.num_sms))
    }

    fn lora_gemm_lock(&self) -> Result<std::sync::MutexGuard<'_, LoraGemm>> {
        self.lora_gemm_rows
            .lock()
            .map_err(|_| EngineError::Backend("the LoRA GEMM rows were poisoned by a panic".into()))
    }

    /// The groups (a bit each) whose reserved rows hold adapter `ix`'s `lora_A` rows, copied now where they
    /// held another's: those whose every layer is registered, where the adapter has pairs of every part (in
    /// some layer: a layer without gets zero rows, and its expand blocks skip it), of ranks within the
    /// group's slot and with the weight's input features. (An adapter without some part, such as k in a q/v
    /// adapter, could take it too, with that part's rows zero; it is left out because the golden rsLoRA
    /// adapter, q alone among them at scales 4 and 16, then read 0.107 of relative logit error in bf16 against
    /// the bound of 0.1, 0.086 on the usual path: bench/NOTES.md session 39.) The copy is device work done
    /// before the step's own, also while a graph step is being recorded; a capture always follows its step's
    /// recording, which made the rows ready.
    fn lora_gemm_ready(&self, ix: &CudaLoraIndex) -> Result<u32> {
        let mut g = self.lora_gemm_lock()?;
        let mut mask = 0u32;
        let mut copies = 0;
        for (gi, grp) in g.groups.iter_mut().enumerate().take(32) {
            let fits = grp
                .targets
                .iter()
                .all(|t| ix.ranks[t.index()] <= grp.slot && ix.dims[t.index()].is_some_and(|(kin, _)| kin == grp.k));
            let layers = grp.full.len();
            if !fits || ix.layers < layers || grp.full.iter().any(Option::is_none) {
                continue;
            }
            if grp.resident != ix.id {
                if graph::mode() == graph::Mode::Capture {
                    return Err(EngineError::Backend(
                        "lora: a captured step's LoRA rows were not copied when it was recorded".into(),
                    ));
                }
                let parts = grp.targets.len();
                let mut t = [0i32; 3];
                for (p, target) in grp.targets.iter().enumerate() {
                    t[p] = int("target", target.index())?;
                }
                let [t0, t1, t2] = t;
                let (si, ki) = (int("rank slot", grp.slot)?, int("in features", grp.k)?);
                let own = (grp.out * grp.k * self.dtype.size()) as u64;
                graph::eagerly(|| -> Result<()> {
                    if grp.table.is_none() {
                        let rows: Vec<u64> = grp.full.iter().flatten().map(|t| self.ptr(&t.buf) + own).collect();
                        grp.table = Some(self.upload(&rows)?);
                    }
                    let dst = self.ptr(
                        grp.table
                            .as_ref()
                            .ok_or_else(|| EngineError::Backend("no table".into()))?,
                    );
                    let index = self.ptr(&ix.table);
                    let grid = cfg((uint("layers", layers)?, uint("rows", parts * grp.slot)?, 1), 256, 0);
                    launch!(self, "lora_gemm_rows", grid, &dst, &index, &t0, &t1, &t2, &si, &ki);
                    Ok(())
                })?;
                grp.resident = ix.id;
                copies += 1;
            }
            mask |= 1 << gi;
        }
        g.copies += copies;
        if mask != 0 {
            g.steps += 1;
        }
        Ok(mask)
    }

    /// The projection `x · wᵀ` of a step whose shrink runs in the GEMM (`step.in_gemm` has the group of
    /// `parts`' targets, and `w` is that group's weight of layer `layer`): the GEMM over `w`'s rows and the
    /// reserved ones, then `bgmv_expand_iy` from the columns past the product. `None` otherwise.
    pub(super) fn lora_project_in_gemm(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        step: &CudaLoraStep,
        layer: usize,
        parts: &[(Target, usize)],
    ) -> Result<Option<CudaTensor>> {
        let (y, out, slot, used) = {
            let g = self.lora_gemm_lock()?;
            let found = g.groups.iter().enumerate().find(|(gi, grp)| {
                step.in_gemm >> gi & 1 == 1
                    && parts.len() == grp.targets.len()
                    && parts.iter().zip(&grp.targets).all(|(p, t)| p.0 == *t)
            });
            let Some((_, grp)) = found else {
                return Ok(None);
            };
            let Some(full) = grp.full.get(layer).and_then(Option::as_ref) else {
                return Ok(None);
            };
            if self.ptr(&full.buf) != self.ptr(&w.buf) || w.shape != [grp.out, grp.k] {
                return Ok(None);
            }
            (self.linear(x, full, None)?, grp.out, grp.slot, grp.targets.len())
        };
        let n = x.rows_cols().0;
        let width = out + used * slot;
        if n != step.rows || layer >= step.layers {
            return Err(EngineError::Backend(format!(
                "lora_project: x {:?}, layer {layer}, for a step of {} rows and {} layers",
                x.shape, step.rows, step.layers
            )));
        }
        if step.records == 0 || n == 0 {
            return Ok(Some(y));
        }
        let planning = std::time::Instant::now();
        // Each part's columns are the projection's up to the next part's first; the step's adapter has pairs of
        // every part (`lora_gemm_ready`), of those columns.
        let (mut targets, mut cols, mut part_cols) = ([0i32; 3], [0i32; 3], [0usize; 3]);
        for (p, &(target, col)) in parts.iter().enumerate() {
            let end = parts.get(p + 1).map_or(out, |next| next.1);
            let c = end.saturating_sub(col);
            if end > out || step.dims[target.index()].is_none_or(|(_, pc)| pc != c) {
                return Err(EngineError::Backend(format!(
                    "lora_project: {target:?} pairs of {:?} at column {col} of {out} (the part's {c} columns)",
                    step.dims[target.index()]
                )));
            }
            targets[p] = int("target", target.index())?;
            cols[p] = int("column", col)?;
            part_cols[p] = c;
        }
        let [t0, t1, t2] = &targets;
        let [c0, c1, c2] = &cols;
        let ct = self.ix_expand_tiles(step, &part_cols[..used]);
        let (expand, [e1, e2, cti]) = expand_grid(step.records, &part_cols[..used], EXPAND_TILE, ct)?;
        let (li, ni, ti, oi, si) = (
            int("layer", layer)?,
            int("rows", n)?,
            int("first LoRA column", out)?,
            int("out features", width)?,
            int("rank slot", slot)?,
        );
        let (yp, sp) = (self.ptr(&y.buf), self.ptr(&step.table));
        launch!(
            self,
            "bgmv_expand_iy",
            expand,
            &yp,
            &sp,
            &li,
            t0,
            t1,
            t2,
            c0,
            c1,
            c2,
            &e1,
            &e2,
            &cti,
            &ni,
            &ti,
            &oi,
            &si
        );
        self.graphs.clock.plan(true, planning);
        Ok(Some(y))
    }
}

#[cfg(test)]
mod tests {
    use super::{
        expand_groups, expand_tiles, expand_vx_cols, expand_vx_fits, merge_records, prompt_chunk, shrink_chunk,
        LoraRec, BG_EXPAND_THREADS, EXPAND_TILE, PF_MAX_CHUNKS,
    };

    /// The expand's groups, walked as kernels/lora.cu `bgmv_expand_ix` walks them (part from y against e1
    /// and e2, first tile at group · ct, tiles up to the part's width), cover every column of every part
    /// exactly once, and no block starts past its part's end.
    #[test]
    fn expand_groups_cover_each_part_once() {
        for parts in [
            &[4096usize, 1024, 1024][..],
            &[4096],
            &[1024, 4096],
            &[14336],
            &[600, 1, 513],
        ] {
            for ct in 1..=8 {
                let [e1, e2, total] = expand_groups(parts, EXPAND_TILE, ct);
                let mut seen: Vec<Vec<u32>> = parts.iter().map(|&c| vec![0; c]).collect();
                for y in 0..total {
                    let p = if y >= e2 { 2 } else { usize::from(y >= e1) };
                    let group = y - [0, e1, e2][p];
                    let first = group * ct * EXPAND_TILE;
                    let cols = parts[p];
                    assert!(first < cols, "{parts:?} ct {ct}: block {y} starts at {first} of {cols}");
                    for n in &mut seen[p][first..cols.min(first + ct * EXPAND_TILE)] {
                        *n += 1;
                    }
                }
                assert!(seen.iter().flatten().all(|&n| n == 1), "{parts:?} ct {ct}");
            }
        }
        assert_eq!(expand_groups(&[4096, 1024, 1024], EXPAND_TILE, 3), [3, 4, 5]);
        assert_eq!(expand_groups(&[4096], EXPAND_TILE, 2), [4, 4, 4]);
        // bgmv_expand_vx: tiles of 1024 columns (bf16), one a block.
        assert_eq!(expand_groups(&[4096, 1024, 1024], 1024, 1), [4, 5, 6]);
        assert_eq!(expand_groups(&[14336, 14336], 1024, 1), [14, 28, 28]);
        assert_eq!(expand_vx_cols(2) * BG_EXPAND_THREADS as usize, 1024);
        assert_eq!(expand_vx_cols(4) * BG_EXPAND_THREADS as usize, 512);
    }

    /// Where `bgmv_expand_vx` runs: the shapes of cuda_kernels' `lora_step_matches_cpu` (q/k/v 1024/256/256
    /// and o 2560, so that its vx layers do run vx) and the Mistral shapes fit in every storage type; a
    /// part's first column, a width or a row width off a thread's columns, or y off 8 bytes, does not.
    #[test]
    fn expand_vx_fits_whole_accesses_only() {
        for size in [2, 4] {
            assert!(expand_vx_fits(size, 1536, 256, &[0, 1024, 1280], &[1024, 256, 256]));
            assert!(expand_vx_fits(size, 2560, 0, &[0], &[2560]));
            assert!(expand_vx_fits(size, 6144, 512, &[0, 4096, 5120], &[4096, 1024, 1024]));
            assert!(expand_vx_fits(size, 28672, 512, &[0, 14336], &[14336, 14336]));
            assert!(!expand_vx_fits(size, 1537, 256, &[0], &[1536]), "row width");
            assert!(!expand_vx_fits(size, 1536, 260, &[0], &[1536]), "y's address");
        }
        // 2 columns a thread in f32, 4 in bf16/f16.
        assert!(expand_vx_fits(4, 1536, 8, &[0, 2], &[2, 1534]));
        assert!(
            !expand_vx_fits(2, 1536, 8, &[0, 2], &[2, 1534]),
            "first column and width"
        );
        assert!(!expand_vx_fits(2, 1536, 8, &[0], &[1534]), "width");
    }

    /// The prompt shrink's chunks: whole 64-element pieces, 8 to 16 of them (never more: the expand sums
    /// at most PF_MAX_CHUNKS partials), as many as give two blocks a multiprocessor.
    #[test]
    fn prompt_chunks_fill_the_device_within_their_bounds() {
        assert_eq!(prompt_chunk(4096, 24, 132), 384);
        assert_eq!(prompt_chunk(4096, 8, 132), 256);
        assert_eq!(prompt_chunk(4096, 1000, 132), 512);
        assert_eq!(prompt_chunk(14336, 8, 132), 896);
        assert_eq!(prompt_chunk(100, 8, 132), 64);
        for k in [64, 100, 1000, 4096, 4100, 14336] {
            for blocks in [1, 3, 8, 24, 64, 4000] {
                let kc = prompt_chunk(k, blocks, 132);
                assert!(
                    kc.is_multiple_of(64) && k.div_ceil(kc) <= PF_MAX_CHUNKS,
                    "k {k}, {blocks} blocks: {kc}"
                );
            }
        }
    }

    /// A whole wave of blocks at least (3 a multiprocessor), at most 8 tiles a block.
    #[test]
    fn expand_tiles_keep_a_wave() {
        // 128 one-row records (distinct adapters): q/k/v, o.
        assert_eq!(expand_tiles(12, 128, 128, 132), 3);
        assert_eq!(expand_tiles(8, 128, 128, 132), 2);
        assert_eq!(expand_tiles(12, 32, 32, 132), 1);
        assert_eq!(expand_tiles(1 << 13, 128, 128, 132), 8);
        assert_eq!(expand_tiles(5, 1, 1, 0), 5);
        // Records of 4 rows (one adapter for 128 rows): gate/up's 56 tiles a record would walk 4 a block.
        assert_eq!(expand_tiles(56, 128, 32, 132), 1);
        assert_eq!(expand_tiles(56, 64, 32, 132), 1);
        assert_eq!(expand_tiles(56, 63, 32, 132), 4);
    }

    /// The expand's records: a segment's records merged up to the limit, in order, never across adapters or
    /// a gap in the rows; every row of the shrink's records in exactly one.
    #[test]
    fn expand_records_merge_within_a_segment() {
        let rec = |index: u64, start: i32, len: i32| LoraRec { index, start, len };
        // 40 rows of adapter 1 (records of 4), 3 rows of 2, 1 row of 1 after a gap, 6 rows of 1.
        let mut recs: Vec<LoraRec> = (0..10).map(|i| rec(1, 4 * i, 4)).collect();
        recs.push(rec(2, 40, 3));
        recs.extend([rec(1, 45, 1), rec(1, 46, 4), rec(1, 50, 2)]);
        let got = |max: usize| -> Vec<(u64, i32, i32)> {
            merge_records(&recs, max)
                .iter()
                .map(|r| (r.index, r.start, r.len))
                .collect()
        };
        assert_eq!(got(16), [(1, 0, 16), (1, 16, 16), (1, 32, 8), (2, 40, 3), (1, 45, 7)]);
        assert_eq!(got(8).len(), 7);
        assert_eq!(got(4).len(), recs.len(), "records of 4 rows stay as they are at 4");
        for max in [4, 8, 12, 16] {
            let merged = merge_records(&recs, max);
            assert!(merged.iter().all(|r| r.len as usize <= max));
            let rows = |v: &[LoraRec]| -> Vec<(u64, i32)> {
                v.iter()
                    .flat_map(|r| (r.start..r.start + r.len).map(move |x| (r.index, x)))
                    .collect()
            };
            assert_eq!(rows(&merged), rows(&recs), "max {max}");
        }
    }

    /// Chunks are whole 16-byte vectors (whole groups when there is more than one), fit the kernel's shared
    /// memory and cover the row.
    #[test]
    fn shrink_chunks_fit_and_cover() {
        assert_eq!(shrink_chunk(4096, 2), 1024);
        assert_eq!(shrink_chunk(14336, 2), 2048);
        assert_eq!(shrink_chunk(4096, 4), 512);
        assert_eq!(shrink_chunk(1000, 2), 1000);
        for size in [2, 4] {
            for k in (1..40_000).step_by(7) {
                let kc = shrink_chunk(k, size);
                assert!(kc > 0 && kc * size <= 4096, "k {k}: chunk {kc}");
                if k > 32 * 4 * 16 / size {
                    assert_eq!(kc % (32 * 4 * 16 / size), 0, "k {k}: chunk {kc}");
                    assert!(k.div_ceil(kc) <= 8 || kc * size == 4096, "k {k}: chunk {kc}");
                }
            }
        }
    }
}
