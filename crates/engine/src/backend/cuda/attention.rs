//! Paged attention on the device (kernels/attention.cu): the host checks the batch, lays out one
//! `RowInfo` per query row and the flattened block tables, chooses how many splits each row's context
//! gets, and launches the attention kernel (plus the reduction of splits when there is more than one).
//!
//! Planning (checks, uploads, allocations) and running (launches only) are separate, so a run can be
//! captured in a CUDA graph and replayed (the benchmarks time kernels that way).

use std::marker::PhantomData;
use std::sync::Arc;

use super::{
    cfg, int, shape_err, uint, AttnKernel, CudaBackend, CudaTensor, DevBuf, PrefillShape, ATTN_CHUNK, ATTN_COUNTERS,
    ATTN_KERNELS, ATTN_THREADS,
};
use crate::backend::AttnMeta;
use crate::error::{EngineError, Result};
use crate::weights::DType;
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// Sequences with at least this many new tokens go to the tensor-core prefill kernel (when it applies).
const TC_PREFILL_MIN_ROWS: usize = 16;

/// The tensor-core prefill part of an attention call.
struct PrefillLaunch {
    kernel: String,
    grid: LaunchConfig,
    _tiles: DevBuf,
    tiles_ptr: u64,
    /// The split tiles' merge (`prefill_merge_<hd>`): its grid, the uploaded (first row, rows, split)
    /// triples, the rows of a tile, and the bytes of the partials.
    merge: Option<PrefillMerge>,
}

struct PrefillMerge {
    kernel: String,
    grid: LaunchConfig,
    _merges: DevBuf,
    merges_ptr: u64,
    bm: i32,
    part_bytes: usize,
}

/// Split points of long prefill tiles are multiples of this many keys (every tile shape's step divides it).
const PREFILL_SPLIT_ALIGN: usize = 64;

/// Splits the prefill tiles (`[first row, rows, first position, table offset, first key, key end, part,
/// 0]`) whose walk over the keys is longer than the launch's steps per block slot (`slots` blocks run at
/// once; `heads` blocks per tile; `bn` keys a step) in two: the first half walks the keys before a
/// multiple of [`PREFILL_SPLIT_ALIGN`] no later than the tile's first row (so none of them is masked for
/// any row), the second the rest. Returns the merges (first row, rows, split index): with one long
/// prompt, the causal triangle's last tiles otherwise walk all the keys while most of the GPU idles.
fn split_long_tiles(tiles: &mut Vec<[i32; 8]>, heads: usize, slots: usize, bn: usize) -> Vec<[i32; 3]> {
    let steps = |t: &[i32; 8]| usize::try_from(t[5] - t[4]).unwrap_or(0).div_ceil(bn);
    let per_slot = (tiles.iter().map(steps).sum::<usize>() * heads).div_ceil(slots.max(1));
    let mut merges = Vec::new();
    for i in 0..tiles.len() {
        let t = tiles[i];
        let (end, first) = (usize::try_from(t[5]).unwrap_or(0), usize::try_from(t[2]).unwrap_or(0));
        let split = (end / 2).min(first) / PREFILL_SPLIT_ALIGN * PREFILL_SPLIT_ALIGN;
        if steps(&t) <= per_slot || split == 0 || t[4] != 0 {
            continue;
        }
        let (Ok(split), Ok(p)) = (i32::try_from(split), i32::try_from(merges.len())) else {
            continue;
        };
        tiles[i][5] = split;
        tiles[i][6] = 2 * p;
        tiles.push([t[0], t[1], t[2], t[3], split, t[5], 2 * p + 1, 0]);
        merges.push([t[0], t[1], p]);
    }
    merges
}

/// What an attention call derives from the batch alone, the same for every layer of a forward pass
/// (kept for the pass by [`crate::Backend::forward_scope`]): checks done, row infos and block tables
/// uploaded, kernels and grids chosen.
pub(super) struct AttnShared {
    kernel: String,
    /// Whether any row is left to the paged kernel.
    paged_rows: bool,
    prefill: Option<PrefillLaunch>,
    grid: LaunchConfig,
    /// `attn_reduce`'s grid, when the splits are not merged by their last block.
    reduce_grid: Option<LaunchConfig>,
    /// The split counters' address when the last block of each split row merges (0: none).
    counters: u64,
    rows: DevBuf,
    tables: DevBuf,
    ints: [i32; 7],
    /// Bytes of the split partial outputs and of their (max, sum) pairs (0: no split).
    part_bytes: (usize, usize),
    kv_bytes: usize,
    splits: usize,
}

/// The inputs an [`AttnShared`] was derived from: the sequences (by address: the model passes one slice
/// to every layer), and every shape and setting the checks and grids read.
pub(super) type AttnKey = [usize; 13];

/// An attention call ready to launch: metadata uploaded, output and split buffers allocated.
pub struct AttnPlan<'a> {
    out: CudaTensor,
    shared: Arc<AttnShared>,
    _part_o: Option<DevBuf>,
    _part_ml: Option<DevBuf>,
    /// Split prefill tiles' partials (kernels/prefill.cu) and their address.
    _part_pf: Option<DevBuf>,
    part_pf_ptr: u64,
    ptrs: [u64; 8],
    scale: f32,
    /// Bytes of keys and values the kernel reads (for bandwidth figures).
    pub kv_bytes: usize,
    /// Splits per row (1: no reduction).
    pub splits: usize,
    _inputs: PhantomData<&'a CudaTensor>,
}

impl AttnPlan<'_> {
    /// The paged kernel this call uses (`paged_attention_<head size>_<heads per block>`).
    pub fn kernel_name(&self) -> &str {
        &self.shared.kernel
    }

    /// The output `[rows, heads * head_dim]` (valid after [`CudaBackend::attention_run`]).
    pub fn output(self) -> CudaTensor {
        self.out
    }
}

impl CudaBackend {
    /// Checks and lays out an attention call (see [`crate::backend::Backend::attention`]); what depends on
    /// the batch alone is made once per forward pass.
    pub fn attention_plan<'a>(
        &self,
        q: &'a CudaTensor,
        k_cache: &'a CudaTensor,
        v_cache: &'a CudaTensor,
        meta: &AttnMeta<'_>,
    ) -> Result<AttnPlan<'a>> {
        let (n, qw) = q.rows_cols();
        let ((kr, kc), (vr, vc)) = (k_cache.rows_cols(), v_cache.rows_cols());
        let key: AttnKey = [
            meta.seqs.as_ptr() as usize,
            meta.seqs.len(),
            n,
            qw,
            kr,
            kc,
            vr,
            vc,
            meta.head_dim,
            meta.num_heads,
            meta.num_kv_heads,
            meta.block_size,
            meta.sliding_window.map_or(0, |w| w + 1),
        ];
        let shared = self.per_pass(
            |c| &mut c.attn,
            key,
            || Ok(Arc::new(self.attention_shared(q, k_cache, v_cache, meta)?)),
        )?;
        let out = self.alloc(&[n, qw])?;
        let (part_o, part_ml) = match shared.part_bytes {
            (0, _) => (None, None),
            (o, ml) => (Some(self.bytes(o)?), Some(self.bytes(ml)?)),
        };
        let part_pf = match shared.prefill.as_ref().and_then(|p| p.merge.as_ref()) {
            Some(m) => Some(self.bytes(m.part_bytes)?),
            None => None,
        };
        let ptrs = [
            self.ptr(&out.buf),
            part_o.as_ref().map_or(0, |b| self.ptr(b)),
            part_ml.as_ref().map_or(0, |b| self.ptr(b)),
            self.ptr(&q.buf),
            self.ptr(&k_cache.buf),
            self.ptr(&v_cache.buf),
            self.ptr(&shared.rows),
            self.ptr(&shared.tables),
        ];
        Ok(AttnPlan {
            out,
            kv_bytes: shared.kv_bytes,
            splits: shared.splits,
            shared,
            _part_o: part_o,
            _part_ml: part_ml,
            part_pf_ptr: part_pf.as_ref().map_or(0, |b| self.ptr(b)),
            _part_pf: part_pf,
            ptrs,
            scale: meta.scale,
            _inputs: PhantomData,
        })
    }

    /// The batch's part of an attention plan ([`AttnShared`]).
    fn attention_shared(
        &self,
        q: &CudaTensor,
        k_cache: &CudaTensor,
        v_cache: &CudaTensor,
        meta: &AttnMeta<'_>,
    ) -> Result<AttnShared> {
        let (n, qw) = q.rows_cols();
        let (slots_total, kvw) = k_cache.rows_cols();
        let hd = meta.head_dim;
        if meta.num_kv_heads == 0
            || qw != meta.num_heads * hd
            || kvw != meta.num_kv_heads * hd
            || v_cache.shape != k_cache.shape
            || !meta.num_heads.is_multiple_of(meta.num_kv_heads)
        {
            return Err(shape_err("attention", &q.shape, &k_cache.shape));
        }
        // The smallest block of query heads that holds the GQA group (fewer registers), else 8 at a time.
        let group = meta.num_heads / meta.num_kv_heads;
        let sizes = || {
            ATTN_KERNELS
                .iter()
                .filter(|(d, g)| *d == hd && *g <= self.attn_max_heads)
                .map(|(_, g)| *g)
        };
        let maxg = sizes()
            .filter(|g| *g >= group)
            .min()
            .or_else(|| sizes().max())
            .or_else(|| ATTN_KERNELS.iter().filter(|(d, _)| *d == hd).map(|(_, g)| *g).min())
            .ok_or_else(|| {
                let dims: Vec<usize> = ATTN_KERNELS.iter().map(|(d, _)| *d).collect();
                EngineError::Backend(format!(
                    "head_dim {hd} has no CUDA attention kernel (supported: {dims:?})"
                ))
            })?;
        let family = match self.attn_kernel {
            _ if hd != 128 || maxg < 2 => "",
            AttnKernel::Tensor if self.dtype == DType::F32 => AttnKernel::Lanes8.suffix(),
            k => k.suffix(),
        };
        let kernel = format!("paged_attention_{hd}_{maxg}{family}");
        let bs = meta.block_size;
        let longest = meta
            .seqs
            .iter()
            .filter(|s| s.q_len >= TC_PREFILL_MIN_ROWS)
            .map(|s| s.ctx_before + s.q_len)
            .max()
            .unwrap_or(0);
        let shape = self.prefill_shape.unwrap_or_else(|| PrefillShape::auto(longest));
        let shape = if self.prefill_wide { shape } else { shape.narrow() };
        // Query rows per prefill tile: 16 per warp.
        let pf_bm = 16 * shape.warps();
        let tc_kernel =
            (self.tc_prefill && self.dtype != DType::F32 && (hd == 64 || hd == 128)).then(|| shape.kernel(hd));
        // Validate the whole batch before computing anything (as the CPU backend does).
        let mut rows = vec![-1i32; 2 * n];
        let mut tables: Vec<u32> = Vec::new();
        // Prefill tiles (first row, rows, position of the first row, block table offset, first key, key end,
        // part: see kernels/prefill.cu).
        let mut pf_tiles: Vec<[i32; 8]> = Vec::new();
        let mut paged_rows = false;
        let (mut max_len, mut kv_tokens) = (1usize, 0usize);
        for s in meta.seqs {
            let ctx = s.ctx_before + s.q_len;
            if s.q_start + s.q_len > n || ctx.div_ceil(bs) > s.block_table.len() {
                return Err(EngineError::InvalidBatch(format!(
                    "sequence needs {ctx} cached tokens but has {} blocks of {bs}",
                    s.block_table.len()
                )));
            }
            if s.block_table.iter().any(|&b| (b as usize + 1) * bs > slots_total) {
                return Err(EngineError::InvalidBatch("block id outside the cache".into()));
            }
            let off = int("block table offset", tables.len())?;
            tables.extend_from_slice(s.block_table);
            // Prefill-sized sequences whose context no sliding window cuts go to the tensor cores.
            let uncut = meta.sliding_window.is_none_or(|w| ctx <= w);
            if tc_kernel.is_some() && s.q_len >= TC_PREFILL_MIN_ROWS && uncut {
                for t in (0..s.q_len).step_by(pf_bm) {
                    let rows = pf_bm.min(s.q_len - t);
                    pf_tiles.push([
                        int("row", s.q_start + t)?,
                        int("tile rows", rows)?,
                        int("position", s.ctx_before + t)?,
                        off,
                        0,
                        int("key end", s.ctx_before + t + rows)?,
                        -1,
                        0,
                    ]);
                }
                for i in 0..s.q_len {
                    rows[2 * (s.q_start + i)] = -2;
                    kv_tokens += s.ctx_before + i + 1;
                }
                continue;
            }
            paged_rows = paged_rows || s.q_len > 0;
            for i in 0..s.q_len {
                let pos = s.ctx_before + i;
                let first = match meta.sliding_window {
                    Some(w) if pos + 1 > w => pos + 1 - w,
                    _ => 0,
                };
                max_len = max_len.max(pos + 1 - first);
                kv_tokens += pos + 1 - first;
                rows[2 * (s.q_start + i)] = int("position", pos)?;
                rows[2 * (s.q_start + i) + 1] = off;
            }
        }
        // Split the contexts when the rows alone cannot fill the GPU: aim at `attn_split_target` (8) blocks
        // per multiprocessor, rounding down (a batch that nearly fills the GPU keeps whole contexts: a split
        // costs each block its fixed work and adds the reduction).
        let hchunks = group.div_ceil(maxg);
        // The paged kernel's grid covers rows up to the last one it has work for: in a mixed step the prompt
        // rows (the tensor-core kernel's) come after the decode rows, so their thousands of blocks, which
        // would only return, are not launched.
        let paged_end = rows.chunks(2).rposition(|r| r[0] != -2).map_or(0, |i| i + 1);
        let blocks = (paged_end * meta.num_kv_heads * hchunks).max(1);
        let max_chunks = max_len.div_ceil(ATTN_CHUNK);
        let wanted = ((self.attn_split_target * self.num_sms) / blocks).clamp(1, max_chunks);
        let chunks_per_split = max_chunks.div_ceil(wanted);
        let splits = max_chunks.div_ceil(chunks_per_split);
        // Unsplit: one fixed chunk count (2^24 chunks of 64 tokens, beyond any context), so the launch's
        // arguments do not change as contexts grow and a decode step's CUDA graph stays valid.
        let chunks_per_split = if splits == 1 { 1 << 24 } else { chunks_per_split };
        let part_bytes = if splits > 1 {
            (
                n * meta.num_heads * splits * hd * 4,
                n * meta.num_heads * splits * 2 * 4,
            )
        } else {
            (0, 0)
        };
        let d_rows = self.upload(&rows)?;
        let d_tables = self.upload(&tables)?;
        let prefill = match tc_kernel {
            Some(kernel) if !pf_tiles.is_empty() => {
                let threads = uint("prefill threads", 32 * shape.warps())?;
                let smem = shape.smem_bytes(hd, self.dtype.size());
                let merges = if self.prefill_split {
                    // Blocks of this kernel that run at once on the device.
                    let per_sm = self
                        .funcs
                        .get(kernel.as_str())
                        .and_then(|f| {
                            f.occupancy_max_active_blocks_per_multiprocessor(threads, smem, None)
                                .ok()
                        })
                        .unwrap_or(1)
                        .max(1) as usize;
                    split_long_tiles(&mut pf_tiles, meta.num_heads, per_sm * self.num_sms, shape.keys())
                } else {
                    Vec::new()
                };
                // Longest walks (most keys: the last tiles of each prompt) first, so the causal triangle's
                // long blocks start in the first wave instead of trailing the launch.
                pf_tiles.sort_by_key(|t| std::cmp::Reverse(t[5] - t[4]));
                let d_tiles = self.upload(pf_tiles.as_flattened())?;
                let merge = if merges.is_empty() {
                    None
                } else {
                    let d_merges = self.upload(merges.as_flattened())?;
                    Some(PrefillMerge {
                        kernel: format!("prefill_merge_{hd}"),
                        grid: cfg(
                            (uint("split tiles", merges.len())?, uint("heads", meta.num_heads)?, 1),
                            256,
                            0,
                        ),
                        merges_ptr: self.ptr(&d_merges),
                        _merges: d_merges,
                        bm: int("tile rows", pf_bm)?,
                        part_bytes: 2 * merges.len() * meta.num_heads * pf_bm * (hd + 2) * 4,
                    })
                };
                Some(PrefillLaunch {
                    kernel,
                    grid: cfg(
                        (
                            uint("prefill tiles", pf_tiles.len())?,
                            uint("heads", meta.num_heads)?,
                            1,
                        ),
                        threads,
                        smem,
                    ),
                    tiles_ptr: self.ptr(&d_tiles),
                    _tiles: d_tiles,
                    merge,
                })
            }
            _ => None,
        };
        let ints = [
            int("heads", meta.num_heads)?,
            int("kv heads", meta.num_kv_heads)?,
            int("block size", bs)?,
            meta.sliding_window.map_or(Ok(0), |w| int("sliding window", w))?,
            int("chunks", chunks_per_split)?,
            int("splits", splits)?,
            int("head_dim", hd)?,
        ];
        let rows_dim = uint("rows", paged_end.max(1))?;
        let grid = cfg(
            (
                rows_dim,
                uint("heads", meta.num_kv_heads * hchunks)?,
                uint("splits", splits)?,
            ),
            ATTN_THREADS,
            0,
        );
        // Splits merged by each row's last block when asked and the counters cover the launch, else by
        // attn_reduce.
        let merged = splits > 1 && self.attn_merge && n * meta.num_kv_heads * hchunks <= ATTN_COUNTERS;
        let counters = if merged { self.attn_counters_ptr } else { 0 };
        let reduce_grid = (splits > 1 && !merged)
            .then(|| -> Result<LaunchConfig> {
                Ok(cfg(
                    (rows_dim, uint("heads", meta.num_heads)?, 1),
                    super::row_threads(hd),
                    0,
                ))
            })
            .transpose()?;
        Ok(AttnShared {
            kernel,
            paged_rows,
            prefill,
            grid,
            reduce_grid,
            counters,
            rows: d_rows,
            tables: d_tables,
            ints,
            part_bytes,
            kv_bytes: kv_tokens * meta.num_kv_heads * hd * 2 * self.dtype.size(),
            splits,
        })
    }

    /// Launches a planned attention call (kernel launches only: capturable in a CUDA graph).
    pub fn attention_run(&self, plan: &AttnPlan<'_>) -> Result<()> {
        if plan.out.shape[0] == 0 {
            return Ok(());
        }
        let sh = &plan.shared;
        let [op, po, pm, qp, kp, vp, rp, tp] = &plan.ptrs;
        let [nh, nkv, bs, window, cps, ns, hd] = &sh.ints;
        if let Some(pf) = &sh.prefill {
            launch!(
                self,
                &pf.kernel,
                pf.grid,
                op,
                &plan.part_pf_ptr,
                qp,
                kp,
                vp,
                &pf.tiles_ptr,
                tp,
                nh,
                nkv,
                bs,
                &plan.scale
            );
            if let Some(m) = &pf.merge {
                launch!(self, &m.kernel, m.grid, op, &plan.part_pf_ptr, &m.merges_ptr, nh, &m.bm);
            }
        }
        if !sh.paged_rows {
            return Ok(());
        }
        launch!(
            self,
            &sh.kernel,
            sh.grid,
            op,
            po,
            pm,
            qp,
            kp,
            vp,
            rp,
            tp,
            nh,
            nkv,
            bs,
            window,
            &plan.scale,
            cps,
            ns,
            &sh.counters
        );
        if let Some(grid) = sh.reduce_grid {
            launch!(self, "attn_reduce", grid, op, po, pm, rp, nh, hd, window, cps, ns);
        }
        Ok(())
    }
}
