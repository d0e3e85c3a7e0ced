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
use crate::backend::{AttnMeta, NO_SLOT};
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
/// to every layer), every shape and setting the checks and grids read, and whether the rotary embedding
/// is fused in.
pub(super) type AttnKey = [usize; 14];

/// The extra arguments of a `_tcr` launch (rotary embedding and cache writes inside attention): the row
/// stride of the fused q/k/v input, the frequencies', slots' and caches' addresses.
struct RopeArgs {
    q_stride: i32,
    ptrs: [u64; 4],
    _uploads: Arc<[DevBuf; 3]>,
}

/// An attention call ready to launch: metadata uploaded, output and split buffers allocated.
pub struct AttnPlan<'a> {
    out: CudaTensor,
    shared: Arc<AttnShared>,
    _part_o: Option<DevBuf>,
    _part_ml: Option<DevBuf>,
    ptrs: [u64; 8],
    rope: Option<RopeArgs>,
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
        self.plan_with(q, n, qw, k_cache, v_cache, meta, None)
    }

    /// The plan of a `_tcr` launch (see [`crate::Backend::rope_attention`]): `qkv` `[n, q_dim + 2·kv_dim]` or
    /// wider (rows are read by their width; columns past the values are not read),
    /// the pass's positions and slots (checked against the block tables) and their uploads.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_plan_rope<'a>(
        &self,
        qkv: &'a CudaTensor,
        q_dim: usize,
        k_cache: &'a CudaTensor,
        v_cache: &'a CudaTensor,
        meta: &AttnMeta<'_>,
        host: (&[u32], &[u32]),
        uploads: &Arc<[DevBuf; 3]>,
    ) -> Result<AttnPlan<'a>> {
        let (n, width) = qkv.rows_cols();
        let mut plan = self.plan_with(qkv, n, q_dim, k_cache, v_cache, meta, Some(host))?;
        let [_, d_freq, d_slots] = &**uploads;
        plan.rope = Some(RopeArgs {
            q_stride: int("q/k/v width", width)?,
            ptrs: [
                self.ptr(d_freq),
                self.ptr(d_slots),
                self.ptr(&k_cache.buf),
                self.ptr(&v_cache.buf),
            ],
            _uploads: Arc::clone(uploads),
        });
        Ok(plan)
    }

    /// An attention plan for queries `q` (`n` rows of `qw` query elements: the start of each row when `rope`
    /// is given, the rest of the row being keys and values).
    #[allow(clippy::too_many_arguments)]
    fn plan_with<'a>(
        &self,
        q: &'a CudaTensor,
        n: usize,
        qw: usize,
        k_cache: &'a CudaTensor,
        v_cache: &'a CudaTensor,
        meta: &AttnMeta<'_>,
        rope: Option<(&[u32], &[u32])>,
    ) -> Result<AttnPlan<'a>> {
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
            usize::from(rope.is_some()),
        ];
        let shared = self.per_pass(
            |c| &mut c.attn,
            key,
            || {
                Ok(Arc::new(self.attention_shared(
                    (n, qw),
                    k_cache,
                    v_cache,
                    meta,
                    rope,
                )?))
            },
        )?;
        let out = self.alloc(&[n, qw])?;
        let (part_o, part_ml) = match shared.part_bytes {
            (0, _) => (None, None),
            (o, ml) => (Some(self.bytes(o)?), Some(self.bytes(ml)?)),
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
            ptrs,
            rope: None,
            scale: meta.scale,
            _inputs: PhantomData,
        })
    }

    /// The batch's part of an attention plan ([`AttnShared`]).
    fn attention_shared(
        &self,
        (n, qw): (usize, usize),
        k_cache: &CudaTensor,
        v_cache: &CudaTensor,
        meta: &AttnMeta<'_>,
        rope: Option<(&[u32], &[u32])>,
    ) -> Result<AttnShared> {
        let (slots_total, kvw) = k_cache.rows_cols();
        let shape_err = |what: &str| shape_err(what, &[n, qw], &k_cache.shape);
        let hd = meta.head_dim;
        if meta.num_kv_heads == 0
            || qw != meta.num_heads * hd
            || kvw != meta.num_kv_heads * hd
            || v_cache.shape != k_cache.shape
            || !meta.num_heads.is_multiple_of(meta.num_kv_heads)
        {
            return Err(shape_err("attention"));
        }
        let group = meta.num_heads / meta.num_kv_heads;
        let maxg = self.attn_heads_per_block(hd, group)?;
        let hchunks = group.div_ceil(maxg);
        let kernel = match rope {
            None => format!("paged_attention_{hd}_{maxg}{}", self.attn_family(hd, maxg)),
            // CudaBackend::rope_fused asked the same rule before choosing this path.
            Some(_) => match self.attn_rope_heads(hd, group) {
                Some(g) => format!("paged_attention_{hd}_{g}_tcr"),
                None => return Err(shape_err("attention with rotary embedding on the tensor cores")),
            },
        };
        if let Some((positions, slots)) = rope {
            // The kernel takes each row's position from its context and writes the new token's key and value
            // to the slot its block table gives: the pass's own positions and slots must say the same.
            for s in meta.seqs {
                if s.q_len > 1 {
                    return Err(shape_err("attention with rotary embedding (decode rows only)"));
                }
                if s.q_len == 0 {
                    continue;
                }
                let (pos, bs) = (s.ctx_before, meta.block_size);
                let block = s.block_table.get(pos / bs).map(|&b| b as usize * bs + pos % bs);
                let slot = slots.get(s.q_start).copied();
                if positions.get(s.q_start).map(|&p| p as usize) != Some(pos)
                    || !(slot == Some(NO_SLOT) || slot.map(|x| x as usize) == block)
                {
                    return Err(EngineError::InvalidBatch(format!(
                        "row {}: position {:?} and slot {slot:?} disagree with its context {pos} and block table",
                        s.q_start,
                        positions.get(s.q_start)
                    )));
                }
            }
            // A row of no sequence is written by no block: it must be one that rope_kv_write would not write
            // either.
            let mut covered = vec![false; n];
            for s in meta.seqs {
                covered[s.q_start..(s.q_start + s.q_len).min(n)].fill(true);
            }
            if let Some(row) = (0..n).find(|&r| !covered[r] && slots.get(r).is_some_and(|&x| x != NO_SLOT)) {
                return Err(EngineError::InvalidBatch(format!(
                    "row {row} belongs to no sequence but has a cache slot"
                )));
            }
        }
        let bs = meta.block_size;
        // The launch's prefill tiles of 128 rows, for the choice of tile shape.
        let tiles128 = meta
            .seqs
            .iter()
            .filter(|s| s.q_len >= TC_PREFILL_MIN_ROWS)
            .map(|s| s.q_len.div_ceil(128))
            .sum();
        let shape = self.prefill_shape.unwrap_or_else(|| PrefillShape::auto(tiles128));
        let shape = if self.prefill_wide { shape } else { shape.narrow() };
        // The prefill kernel (name, query rows a tile, threads, dynamic shared memory): the Hopper one at head
        // size 128 when it is on, else the tensor-core kernel's shape.
        let tc_kernel = (self.tc_prefill && self.dtype != DType::F32 && (hd == 64 || hd == 128)).then(|| {
            if let (128, Some(choice)) = (hd, self.prefill_sm90) {
                // By the launch's longest prompt, keys cached before it included.
                let keys = meta
                    .seqs
                    .iter()
                    .filter(|s| s.q_len >= TC_PREFILL_MIN_ROWS)
                    .map(|s| s.ctx_before + s.q_len)
                    .max()
                    .unwrap_or(0);
                let form = choice.form(keys);
                (
                    form.kernel.to_string(),
                    super::PREFILL_SM90_ROWS,
                    form.threads(),
                    form.smem(),
                )
            } else {
                (
                    shape.kernel(hd),
                    shape.rows(),
                    32 * shape.warps() as u32,
                    shape.smem_bytes(hd, self.dtype.size()),
                )
            }
        });
        // Query rows per prefill tile.
        let pf_bm = tc_kernel.as_ref().map_or(1, |k| k.1);
        // Validate the whole batch before computing anything (as the CPU backend does).
        let mut rows = vec![-1i32; 2 * n];
        let mut tables: Vec<u32> = Vec::new();
        // Prefill tiles (first row, rows, position of the first row, block table offset).
        let mut pf_tiles: Vec<[i32; 4]> = Vec::new();
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
                    pf_tiles.push([
                        int("row", s.q_start + t)?,
                        int("tile rows", pf_bm.min(s.q_len - t))?,
                        int("position", s.ctx_before + t)?,
                        off,
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
        // Contexts split as `split_plan` says, for one wave of `attn_split_target` blocks per
        // multiprocessor (3: the tensor-core kernel's resident blocks). The paged kernel's grid covers rows up to the last one it has work for: in a mixed step the prompt
        // rows (the tensor-core kernel's) come after the decode rows, so their thousands of blocks, which
        // would only return, are not launched.
        let paged_end = rows.chunks(2).rposition(|r| r[0] != -2).map_or(0, |i| i + 1);
        let blocks = paged_end * meta.num_kv_heads * hchunks;
        let max_chunks = max_len.div_ceil(ATTN_CHUNK);
        let slots = self.attn_split_target * self.num_sms;
        let (splits, chunks_per_split) = split_plan(blocks, max_chunks, slots, self.attn_split_min_chunks);
        // The split rows' partial outputs: only the paged kernel's rows (the grid's x), not a mixed step's
        // prompt rows after them, whose thousands of rows times a wave's splits would not fit the device.
        let part_bytes = if splits > 1 {
            (
                paged_end * meta.num_heads * splits * hd * 4,
                paged_end * meta.num_heads * splits * 2 * 4,
            )
        } else {
            (0, 0)
        };
        let d_rows = self.upload(&rows)?;
        // Decode-shaped (a row a sequence): the tables padded so that their upload's size does not move with
        // the contexts (a graph step's signature includes each upload's size).
        if meta.seqs.iter().all(|s| s.q_len <= 1) {
            let longest = meta.seqs.iter().map(|s| s.block_table.len()).max().unwrap_or(0);
            tables.resize(decode_tables_len(meta.seqs.len(), longest, tables.len()), 0);
        }
        let d_tables = self.upload(&tables)?;
        let prefill = match tc_kernel {
            Some((kernel, _, threads, smem)) if !pf_tiles.is_empty() => {
                // Longest tiles (most keys: the last of each prompt) first, and every head's tile before
                // any head's next one (kernels/prefill.cu), so the causal triangle's long blocks start in the first
                // wave instead of trailing the launch.
                pf_tiles.sort_by_key(|t| std::cmp::Reverse(t[1] + t[2]));
                let d_tiles = self.upload(pf_tiles.as_flattened())?;
                Some(PrefillLaunch {
                    kernel,
                    grid: cfg(
                        (uint("prefill blocks", pf_tiles.len() * meta.num_heads)?, 1, 1),
                        threads,
                        smem,
                    ),
                    tiles_ptr: self.ptr(&d_tiles),
                    _tiles: d_tiles,
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

    /// Query heads per block of the paged kernel at head size `hd` for a GQA group of `group`: the smallest
    /// block that holds the group (fewer registers), else the largest within the per-block limit (the
    /// group then takes several blocks).
    pub(super) fn attn_heads_per_block(&self, hd: usize, group: usize) -> Result<usize> {
        let sizes = || {
            ATTN_KERNELS
                .iter()
                .filter(|(d, g)| *d == hd && *g <= self.attn_max_heads)
                .map(|(_, g)| *g)
        };
        sizes()
            .filter(|g| *g >= group)
            .min()
            .or_else(|| sizes().max())
            .or_else(|| ATTN_KERNELS.iter().filter(|(d, _)| *d == hd).map(|(_, g)| *g).min())
            .ok_or_else(|| {
                let dims: Vec<usize> = ATTN_KERNELS.iter().map(|(d, _)| *d).collect();
                EngineError::Backend(format!(
                    "head_dim {hd} has no CUDA attention kernel (supported: {dims:?})"
                ))
            })
    }

    /// The paged kernel family (name suffix) that runs blocks of `maxg` query heads at head size `hd`: the
    /// chosen family (`LORAX_CUDA_ATTN`) at head size 128 with 2 or more heads a block (the tensor-core
    /// one falls back to `_l8` for f32 storage), the plain kernel otherwise.
    fn attn_family(&self, hd: usize, maxg: usize) -> &'static str {
        match self.attn_kernel {
            _ if hd != 128 || maxg < 2 => "",
            AttnKernel::Tensor if self.dtype == DType::F32 => AttnKernel::Lanes8.suffix(),
            k => k.suffix(),
        }
    }

    /// Query heads per block of the `_tcr` kernel (rotary embedding and cache writes inside attention) for
    /// a GQA group of `group` at head size `hd`: `Some` where the tensor-core family runs the group and one
    /// block holds all of it, so that exactly one block writes each KV head's cache slot.
    pub(super) fn attn_rope_heads(&self, hd: usize, group: usize) -> Option<usize> {
        let maxg = self.attn_heads_per_block(hd, group).ok()?;
        (maxg >= group && self.attn_family(hd, maxg) == AttnKernel::Tensor.suffix()).then_some(maxg)
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
        }
        if !sh.paged_rows {
            return Ok(());
        }
        // The paged kernel's arguments, then a `_tcr` launch's own.
        macro_rules! paged {
            ($($more:expr),*) => {
                launch!(
                    self, &sh.kernel, sh.grid, op, po, pm, qp, kp, vp, rp, tp, nh, nkv, bs, window, &plan.scale, cps, ns,
                    &sh.counters $(, $more)*
                )
            };
        }
        match &plan.rope {
            Some(r) => {
                let [fp, sp, kw, vw] = &r.ptrs;
                paged!(&r.q_stride, fp, sp, kw, vw);
            }
            None => paged!(),
        }
        if let Some(grid) = sh.reduce_grid {
            launch!(self, "attn_reduce", grid, op, po, pm, rp, nh, hd, window, cps, ns);
        }
        Ok(())
    }
}

/// Fewest chunks of [`ATTN_CHUNK`] tokens in a split of a row whose blocks already fill a wave (1024
/// tokens: shorter splits cost more in each block's fixed work and the reduction than they win), unless
/// `LORAX_CUDA_ATTN_SPLIT_MIN_CHUNKS` says otherwise.
pub(super) const SPLIT_MIN_CHUNKS: usize = 16;

/// The entries a decode step's block tables are uploaded with: `seqs` tables of at most `longest` blocks hold
/// `total` entries, padded to `seqs` times `longest` rounded up to a power of two where that is at most four
/// times `total` (else `total`). Uploads are placed in power-of-two slots and a graph step's signature holds
/// each slot's size, so tables sized by their total alone changed a step's signature whenever the total
/// crossed a power of two as contexts grew (a batch of 88 decode rows took two graphs, session 46); padded,
/// the size moves only with the row count and the longest table's power of two. Padding a few long tables
/// among many short ones would copy mostly zeros each step, hence the bound.
pub(super) fn decode_tables_len(seqs: usize, longest: usize, total: usize) -> usize {
    let padded = seqs * longest.next_power_of_two();
    if padded <= 4 * total {
        padded.max(total)
    } else {
        total
    }
}

/// The launch's splits (its grid's z) and the chunks of [`ATTN_CHUNK`] tokens in each, for `blocks` blocks
/// per split (rows × KV heads × head chunks), contexts of at most `max_chunks` chunks and `slots` resident
/// blocks (one wave: the split target times the multiprocessors); a split of a batch that fills a wave
/// takes at least `min_chunks` chunks ([`SPLIT_MIN_CHUNKS`]). Each row then runs the splits its own
/// context needs; its blocks of the splits past those return at once.
///
/// - Fewer blocks than a wave: as many splits as one wave holds (rounding down), *whatever the contexts*,
///   each of `max_chunks / splits` chunks rounded up. A batch that nearly fills the GPU keeps whole
///   contexts (a split costs each block its fixed work and adds the reduction). The grid does not follow
///   the longest context, so the launch, and with it a decode step's CUDA graph, changes only when that
///   context crosses a multiple of `splits` chunks: for one row of 8 KV heads on the H200 (49 splits) once
///   in 3136 tokens. (Before, the grid had one split a chunk up to 49, and a single stream's decode graph
///   was captured again every 64 tokens: a step run eagerly and a capture each time.)
/// - A wave or more: as [`wanted_splits`] says.
/// - No blocks (a step of prompt rows only, which the prefill kernel takes): one split. (Splitting a small
///   batch's short contexts too, rather than only those past one chunk, keeps a new stream's launch the same
///   from its first decode step; its partials stay within a wave's worth, being sized by the paged rows.)
/// - One split: a fixed chunk count (2^24 chunks, beyond any context), so the launch's arguments do not
///   change as contexts grow.
pub(super) fn split_plan(blocks: usize, max_chunks: usize, slots: usize, min_chunks: usize) -> (usize, usize) {
    let (slots, max_chunks) = (slots.max(1), max_chunks.max(1));
    let splits = if blocks == 0 {
        1
    } else if blocks < slots {
        slots / blocks
    } else {
        let wanted = wanted_splits(blocks, max_chunks, slots, min_chunks.max(1));
        max_chunks.div_ceil(max_chunks.div_ceil(wanted))
    };
    if splits == 1 {
        (1, 1 << 24)
    } else {
        (splits, max_chunks.div_ceil(splits))
    }
}

/// How many splits to aim at for each row's context when `blocks` blocks per split (rows × KV heads ×
/// head chunks) fill at least one wave of `slots` resident blocks, for contexts of at most `max_chunks`
/// chunks: long contexts split when that fills the last wave better, by more than 5 points of the waves'
/// occupancy per step up (64 rows of 4096 tokens at 8 KV heads, 512 blocks against 396 on the H200: one
/// split fills its two waves to 65% and ran at 75% of the copy bandwidth, two fill three waves to 86% and
/// ran at 87%, three fill four to 97% and ran at 93%: `cuda_bench decode_attention_benchmarks`,
/// bench/NOTES.md session 18 calls 5-6). The longest context's parts keep at least `min_chunks` chunks (a
/// row's last part may be shorter), so at the default [`SPLIT_MIN_CHUNKS`] a batch whose longest context is
/// under 32 chunks (1985 tokens; the serving benchmark's are 512-768) never splits here. Such a split step's launch changes as
/// contexts grow, so its decode graph is captured again now and then.
fn wanted_splits(blocks: usize, max_chunks: usize, slots: usize, min_chunks: usize) -> usize {
    #[allow(clippy::cast_precision_loss)]
    let filled = |s: usize| (blocks * s) as f64 / ((blocks * s).div_ceil(slots) * slots) as f64;
    let mut best = 1;
    for s in 2..=(max_chunks / min_chunks).min(64) {
        if filled(s) > filled(best) + 0.05 {
            best = s;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::{decode_tables_len, SPLIT_MIN_CHUNKS};

    fn split_plan(blocks: usize, max_chunks: usize, slots: usize) -> (usize, usize) {
        super::split_plan(blocks, max_chunks, slots, SPLIT_MIN_CHUNKS)
    }

    #[test]
    fn decode_tables_keep_one_size_while_contexts_grow() {
        // 96 sequences of 33 to 48 blocks (the benchmark's 512 to 768 tokens): one slot size throughout, where
        // their totals alone (3168 to 4608 entries) would take slots of 4096 and 8192.
        let slot =
            |seqs: usize, longest: usize, total: usize| decode_tables_len(seqs, longest, total).next_power_of_two();
        let sizes: std::collections::BTreeSet<usize> = (33..=48).map(|blocks| slot(96, blocks, 96 * blocks)).collect();
        assert_eq!(sizes.len(), 1, "{sizes:?}");
        // 88 rows whose totals fall either side of 4096 (session 46's two graphs): one size.
        assert_eq!(slot(88, 48, 3960), slot(88, 48, 4200));
        // Never fewer than the tables hold.
        assert!(decode_tables_len(3, 5, 15) >= 15);
        // One long table among short ones: no padding (128 x 2048 would be 42 times the entries).
        assert_eq!(decode_tables_len(128, 2048, 127 * 33 + 2048), 127 * 33 + 2048);
    }

    /// The H200's one wave of the tensor-core kernel: 3 blocks on each of 132 multiprocessors.
    const WAVE: usize = 3 * 132;
    const UNSPLIT: (usize, usize) = (1, 1 << 24);

    #[test]
    fn contexts_split_to_fill_waves() {
        // Few rows: as many splits as fit one wave (8 rows x 8 KV heads: 6; one row: 49), whatever the
        // contexts; each split takes its share of the longest.
        assert_eq!(split_plan(64, 512, WAVE), (6, 86));
        assert_eq!(split_plan(8, 10, WAVE), (49, 1));
        assert_eq!(split_plan(8, 2, WAVE), (49, 1));
        assert_eq!(split_plan(8, 1, WAVE), (49, 1));
        // No paged rows at all (a prompt-only step): one split.
        assert_eq!(split_plan(0, 1, WAVE), UNSPLIT);
        assert_eq!(split_plan(0, 40, WAVE), UNSPLIT);
        assert_eq!(split_plan(128, 10, WAVE), (3, 4));
        // A batch that nearly fills the wave keeps whole contexts.
        assert_eq!(split_plan(256, 10, WAVE), UNSPLIT);
        // A wave or more of short contexts: whole (the serving shapes: 86 and 128 rows of 640 tokens, 256 of
        // 1024).
        assert_eq!(split_plan(688, 10, WAVE), UNSPLIT);
        assert_eq!(split_plan(1024, 10, WAVE), UNSPLIT);
        assert_eq!(split_plan(2048, 16, WAVE), UNSPLIT);
        // 64 rows of 4096 tokens: one split fills 65% of two waves, two 86% of three, three 97% of four.
        assert_eq!(split_plan(512, 64, WAVE), (3, 22));
        // Splits of at least 16 chunks: 2048 tokens allow two.
        assert_eq!(split_plan(512, 32, WAVE), (2, 16));
        // Already well filled: 396 blocks are exactly one wave.
        assert_eq!(split_plan(WAVE, 512, WAVE), UNSPLIT);
    }

    /// Every row's context is covered by the launch's splits, and a split past a row's context holds none
    /// of it (the kernels return there).
    #[test]
    fn the_splits_cover_every_context() {
        for blocks in [1, 8, 16, 64, 128, 200, 396, 512, 1024] {
            for max_chunks in 1..300 {
                let (splits, chunks) = split_plan(blocks, max_chunks, WAVE);
                assert!(splits * chunks >= max_chunks, "{blocks} blocks, {max_chunks} chunks");
                assert!(splits == 1 || (splits - 1) * chunks < max_chunks || blocks < WAVE);
            }
        }
    }

    /// The launch of a batch smaller than a wave stays the same while its longest context grows by up to
    /// `splits` chunks, so a decode graph is captured again once in that many chunks, not at each: one
    /// row of 8 KV heads keeps its launch from the first token to 3136 (49 chunks).
    #[test]
    fn a_growing_context_keeps_a_small_batch_launch() {
        let launches = |blocks: usize, chunks: std::ops::RangeInclusive<usize>| {
            let mut plans: Vec<_> = chunks.map(|c| split_plan(blocks, c, WAVE)).collect();
            plans.dedup();
            plans.len()
        };
        assert_eq!(launches(8, 1..=49), 1);
        assert_eq!(launches(8, 1..=98), 2);
        // 8 rows (6 splits): a change each 6 chunks (384 tokens) over a 256-token decode at most once.
        assert_eq!(launches(64, 8..=12), 1);
        assert_eq!(launches(64, 12..=13), 2);
    }
}
