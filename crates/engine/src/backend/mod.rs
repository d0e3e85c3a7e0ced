//! The device seam. The model is written once against [`Backend`]; each backend owns its tensor type
//! and implements the handful of operations a Llama-family decoder needs: `cpu` (f32, the reference and
//! CI path) and `cuda` (bf16/f16/f32 storage, cuBLAS and NVRTC kernels; built everywhere, since the CUDA
//! libraries are loaded at run time, and usable where a driver and a GPU are present).

pub mod cpu;
pub mod cuda;

use crate::error::Result;
use crate::lora::{DeviceAdapter, LoraWeights, PieceSink, Target, NUM_TARGETS};
use crate::weights::{DType, HostTensor};

/// The cache slot of a row whose key and value are written nowhere (a padding row of a decode step).
pub const NO_SLOT: u32 = u32::MAX;

/// The shape of the parts' concatenation along their first dimension ([`Backend::concat_rows`]).
pub fn concat_shape<'a>(mut parts: impl Iterator<Item = &'a [usize]>) -> Result<Vec<usize>> {
    let first = parts
        .next()
        .ok_or_else(|| crate::EngineError::Backend("concat_rows of nothing".into()))?;
    let mut shape = first.to_vec();
    if shape.is_empty() {
        return Err(crate::EngineError::Backend("concat_rows of a scalar".into()));
    }
    for p in parts {
        if p.len() != first.len() || p[1..] != first[1..] {
            return Err(crate::EngineError::Backend(format!(
                "concat_rows: incompatible shapes {first:?} and {p:?}"
            )));
        }
        shape[0] += p[0];
    }
    Ok(shape)
}

/// Checks [`Backend::rope_kv_write`]'s arguments (shapes of the fused projection `qkv` and of the
/// caches, lengths, slots in the cache or [`NO_SLOT`]); returns (rows, q_dim, kv_dim). `q_dim`, where given,
/// is the queries' width, and the rows may be wider than `q_dim + 2·kv_dim` (columns past them are not read);
/// else it is what the row's width leaves.
pub fn check_rope_kv_write(
    qkv: &[usize],
    k_cache: &[usize],
    v_cache: &[usize],
    head_dim: usize,
    q_dim: Option<usize>,
    (positions, inv_freq, slots): (&[u32], &[f32], &[u32]),
) -> Result<(usize, usize, usize)> {
    let rows_cols = |s: &[usize]| match s {
        [] => (1, 1),
        [c] => (1, *c),
        [r @ .., c] => (r.iter().product::<usize>(), *c),
    };
    let ((n, width), (slots_total, kv_dim)) = (rows_cols(qkv), rows_cols(k_cache));
    let q = q_dim.unwrap_or_else(|| width.saturating_sub(2 * kv_dim));
    if head_dim == 0
        || !head_dim.is_multiple_of(2)
        || kv_dim == 0
        || width < q + 2 * kv_dim
        || !q.is_multiple_of(head_dim)
        || kv_dim % head_dim != 0
        || n != positions.len()
        || n != slots.len()
        || inv_freq.len() != head_dim / 2
        || v_cache != k_cache
    {
        return Err(crate::EngineError::Backend(format!(
            "rope_kv_write: {n} rows of width {width}, {} positions, {} slots, cache {k_cache:?}, head_dim {head_dim}",
            positions.len(),
            slots.len(),
        )));
    }
    if let Some(&s) = slots.iter().find(|&&s| s as usize >= slots_total && s != NO_SLOT) {
        return Err(crate::EngineError::InvalidBatch(format!(
            "cache slot {s} is outside the cache ({slots_total})"
        )));
    }
    Ok((n, q, kv_dim))
}

/// One sequence's slice of a flattened batch, as attention sees it (borrowing the caller's block table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnSeq<'a> {
    /// Row of this sequence's first new token in the flattened batch.
    pub q_start: usize,
    /// Number of new tokens (prompt length at prefill, 1 at decode).
    pub q_len: usize,
    /// Tokens already in the cache before this call (the new tokens follow them).
    pub ctx_before: usize,
    /// Cache blocks of this sequence, in order.
    pub block_table: &'a [u32],
}

/// Everything attention needs besides tensors; built once per forward pass.
#[derive(Clone, Copy, Debug)]
pub struct AttnMeta<'a> {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Head width.
    pub head_dim: usize,
    /// Tokens per cache block.
    pub block_size: usize,
    /// Softmax scale (head_dim^-0.5).
    pub scale: f32,
    /// Keys further back than this are not attended (Mistral's sliding window).
    pub sliding_window: Option<usize>,
    /// The sequences of the batch, in row order.
    pub seqs: &'a [AttnSeq<'a>],
}

/// One segment of a batched LoRA product (SGMV): consecutive rows of the batch that share an adapter.
#[derive(Debug)]
pub struct LoraSegment<'a, T> {
    /// First row.
    pub start: usize,
    /// Number of rows.
    pub len: usize,
    /// `lora_A` `[r, in]`.
    pub a: &'a T,
    /// `lora_B` `[out, r]`.
    pub b: &'a T,
    /// Multiplier of the product.
    pub scale: f32,
    /// First column of `y` the product adds into: it covers `y`'s columns `col .. col + b.rows` (a fused
    /// projection's part, such as the keys of q/k/v; 0 for a whole projection).
    pub col: usize,
}

impl<T> LoraSegment<'_, T> {
    /// Checks the segment against `x` `[n, k]` and `y` `[n, out]` (`shape` gives a tensor's shape): `a`
    /// `[r, k]`, `b` `[cols, r]`, its rows within n and columns within out, r and cols not 0. Returns
    /// (r, cols).
    pub fn check(&self, shape: impl Fn(&T) -> &[usize], x: &[usize], y: &[usize]) -> Result<(usize, usize)> {
        let rows_cols = |s: &[usize]| match s {
            [] => (1, 1),
            [r @ .., c] => (r.iter().product(), *c),
        };
        let ((n, k), (_, out)) = (rows_cols(x), rows_cols(y));
        let ((r, ka), (cols, rb)) = (rows_cols(shape(self.a)), rows_cols(shape(self.b)));
        if ka != k || rb != r || self.col + cols > out || self.start + self.len > n || r == 0 || cols == 0 {
            return Err(crate::error::EngineError::Backend(format!(
                "lora: segment rows {}..{} of {n}, columns from {}, x {x:?}, y {y:?}, a {:?}, b {:?}",
                self.start,
                self.start + self.len,
                self.col,
                shape(self.a),
                shape(self.b)
            )));
        }
        Ok((r, cols))
    }
}

// By hand: the derives would ask `T: Clone`, and a segment only borrows its tensors.
impl<T> Clone for LoraSegment<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for LoraSegment<'_, T> {}

/// Consecutive rows of a forward pass that share an adapter, for [`Backend::lora_step`].
pub struct LoraRows<'a, B: Backend> {
    /// First row.
    pub start: usize,
    /// Number of rows.
    pub len: usize,
    /// Their adapter.
    pub adapter: &'a DeviceAdapter<B>,
}

/// A tensor of an adapter's weights file, for [`FileUpload::finish`].
#[derive(Debug, Clone)]
pub struct FileTensor<'a> {
    /// Its bytes' place in the file.
    pub range: std::ops::Range<usize>,
    /// Element type.
    pub dtype: DType,
    /// Row-major shape.
    pub shape: &'a [usize],
}

/// An adapter's weights file copied to the device while it is read ([`Backend::begin_file_upload`]): the
/// reader gives it the file's length, then every piece as it arrives ([`PieceSink`]), and the adapter's
/// tensors are then ranges of the copy.
pub trait FileUpload<T>: PieceSink + Send {
    /// The tensors at these ranges of the file, in order, usable by later device work, once the whole file
    /// has come. An error when a piece could not be copied, or a tensor cannot be used where it lies (its
    /// type is not the backend's, or its place is misaligned): the adapter is then uploaded after the read.
    fn finish(self: Box<Self>, tensors: &[FileTensor<'_>]) -> Result<Vec<T>>;
    /// The tensors at these ranges of the file (`layer_of` each, of `num_layers`; the file's data from
    /// `data_start`), placed now, after `start` and before the pieces come, with the gate that device
    /// work reading them waits on ([`crate::lora::AdapterGate`]). An error when they cannot be used in
    /// place (as [`FileUpload::finish`] says) or the upload cannot stream. The default cannot.
    fn early(
        &self,
        data_start: usize,
        tensors: &[FileTensor<'_>],
        layer_of: &[usize],
        num_layers: usize,
    ) -> Result<(Vec<T>, std::sync::Arc<dyn crate::lora::AdapterGate>)> {
        let _ = (data_start, tensors, layer_of, num_layers);
        Err(crate::error::EngineError::Backend("this upload cannot stream".into()))
    }
    /// Ends an upload made [`FileUpload::early`]: the read and the checks' outcome, which the gate then
    /// reports; returns the gate's outcome (an earlier failure, a stall, counts over `outcome`). Waits for
    /// the copies (as dropping the upload does).
    fn end(self: Box<Self>, outcome: Result<()>) -> Result<()> {
        outcome
    }
}

/// How a backend's decode steps ran so far ([`Backend::step_counts`]): through a captured graph (`replays`,
/// of which `ahead_replays` were recorded while the step before ran and `fed_replays` launched by the step before),
/// with a graph captured for them
/// (`captures`), or eagerly because their shape was new (`uncaptured`); steps counted in none ran eagerly
/// as usual.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepCounts {
    pub replays: u64,
    pub ahead_replays: u64,
    /// Replays launched by the step before's sampling, with its tokens gathered on the device
    /// ([`Backend::sample_feeding`]).
    pub fed_replays: u64,
    pub captures: u64,
    pub uncaptured: u64,
}

impl StepCounts {
    /// How a step that moved the counts from `before` to `self` ran.
    pub fn how_since(&self, before: &StepCounts) -> &'static str {
        if self.captures > before.captures {
            "captured a graph"
        } else if self.uncaptured > before.uncaptured {
            "eager, a new shape"
        } else if self.fed_replays > before.fed_replays {
            "launched the next step with its tokens"
        } else if self.ahead_replays > before.ahead_replays {
            "replayed, recorded ahead"
        } else if self.replays > before.replays {
            "replayed"
        } else {
            "eager"
        }
    }
}

/// Operations of a decoder forward pass on one device. Tensors are row-major, 2-D `[rows, cols]` unless
/// said otherwise; weights are `[out, in]` as in Hugging Face checkpoints.
pub trait Backend: Send + Sync + Sized + 'static {
    /// The backend's tensor (device memory on accelerators).
    type Tensor: Send + Sync + std::fmt::Debug;
    /// What a backend keeps of an uploaded adapter for [`Backend::lora_step`] (CUDA: a device table of each
    /// (layer, target)'s LoRA pair); `()` where it keeps nothing.
    type LoraIndex: Send + Sync + std::fmt::Debug;
    /// A forward pass's LoRA plan ([`Backend::lora_step`]); `()` where there is none.
    type LoraStep;

    /// Human-readable device name, for logs and /info.
    fn name(&self) -> String;
    /// Upload a weight from its checkpoint bytes (any supported storage dtype).
    fn weight(&self, t: &HostTensor<'_>) -> Result<Self::Tensor>;
    /// Upload many weights at once (an adapter's), in order: equal to [`Backend::weight`] on each. Unlike
    /// the other methods, it may run on another thread while forward passes run (the shard uploads
    /// adapters outside its engine lock), so it must not disturb device work in flight, and the tensors
    /// must be usable by later work when it returns: the CUDA backend copies on a stream of its own and
    /// waits for the copy. The default calls `weight` on each.
    fn upload_many(&self, tensors: &[HostTensor<'_>]) -> Result<Vec<Self::Tensor>> {
        tensors.iter().map(|t| self.weight(t)).collect()
    }
    /// A [`FileUpload`] for an adapter file about to be read, where the backend copies pieces to the device
    /// as they are read (an upload that overlaps the read, so a cold adapter is ready about when its file
    /// has been read). Like `upload_many`, it runs beside forward passes. `None` (the default): the adapter
    /// goes up after the read, with `upload_many`.
    fn begin_file_upload(&self) -> Option<Box<dyn FileUpload<Self::Tensor> + '_>> {
        None
    }
    /// A tensor from f32 host values.
    fn tensor_from_f32(&self, shape: &[usize], data: &[f32]) -> Result<Self::Tensor>;
    /// Copy a tensor back to the host as f32.
    fn to_f32(&self, t: &Self::Tensor) -> Result<Vec<f32>>;
    /// A zero-filled tensor (KV cache allocation).
    fn zeros(&self, shape: &[usize]) -> Result<Self::Tensor>;
    /// Shape of a tensor.
    fn shape<'a>(&self, t: &'a Self::Tensor) -> &'a [usize];

    /// Rows of `table` `[vocab, hidden]` selected by `ids`.
    fn embedding(&self, table: &Self::Tensor, ids: &[u32]) -> Result<Self::Tensor>;
    /// `x · wᵀ (+ bias)`: `x` `[n, in]`, `w` `[out, in]` → `[n, out]`.
    fn linear(&self, x: &Self::Tensor, w: &Self::Tensor, bias: Option<&Self::Tensor>) -> Result<Self::Tensor>;
    /// RMSNorm of each row, times `w`.
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Tensor, eps: f32) -> Result<Self::Tensor>;
    /// Fused residual add and RMSNorm: `residual += x`, returns `rms_norm(residual)`. A backend whose
    /// [`Backend::lora_project`] gives wide outputs reads `x`'s first columns where it is wider.
    fn add_rms_norm(
        &self,
        residual: &mut Self::Tensor,
        x: &Self::Tensor,
        w: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor>;
    /// `dst += src`.
    fn add_assign(&self, dst: &mut Self::Tensor, src: &Self::Tensor) -> Result<()>;
    /// `silu(x[:, :f]) · x[:, f:]` of `x` `[n, 2f]` (the fused gate/up projection's output) → `[n, f]`.
    fn silu_mul(&self, gate_up: &Self::Tensor) -> Result<Self::Tensor>;
    /// `silu(x · w[..f]ᵀ) · (x · w[f..2f]ᵀ)` in one product, as `silu_mul(linear(x, w[..2f]))` rounds it, where
    /// the backend has such a product for this shape; `None` (the default) where it has not, and the caller
    /// runs the two.
    fn linear_silu_mul(&self, _x: &Self::Tensor, _w: &Self::Tensor, _f: usize) -> Result<Option<Self::Tensor>> {
        Ok(None)
    }
    /// `y += x · w[..cols]ᵀ` (`cols` = y's columns), the product rounded to the storage type before the add (as
    /// `add_rms_norm` adds `linear`'s output), where the backend has such a product for this shape: returns
    /// whether it ran (false, the default: the caller runs `linear` and the add).
    fn linear_add(&self, _x: &Self::Tensor, _w: &Self::Tensor, _y: &mut Self::Tensor) -> Result<bool> {
        Ok(false)
    }
    /// The attention inputs from a fused projection `qkv` `[n, q_dim + 2·kv_dim]` (queries, keys, values):
    /// rotary embedding (Hugging Face's rotate-half layout; row `i` at position `positions[i]`) of the
    /// queries and keys, keys and values written to cache slots (`block * block_size + offset`) of `k_cache`,
    /// `v_cache` `[num_blocks * block_size, kv_dim]` (which fix kv_dim; a row whose slot is [`NO_SLOT`] is
    /// written nowhere). Returns the rotated queries `[n, q_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn rope_kv_write(
        &self,
        qkv: &Self::Tensor,
        k_cache: &mut Self::Tensor,
        v_cache: &mut Self::Tensor,
        head_dim: usize,
        positions: &[u32],
        inv_freq: &[f32],
        slots: &[u32],
    ) -> Result<Self::Tensor>;
    /// [`Backend::rope_kv_write`] and then [`Backend::attention`] of its queries: what the model runs at
    /// every layer. The default makes the two calls; a backend with a fused form for some batches (the CUDA
    /// backend's decode steps) runs those as one. The same effects and result either way, except the output
    /// of a row whose slot is [`NO_SLOT`] (a padding row, whose output is discarded): the fused form attends
    /// over its new key and value, the two calls over whatever its unwritten slot holds. A backend whose
    /// [`Backend::lora_project`] gives wide outputs takes `qkv` rows wider than `q_dim + 2·kv_dim` here (the
    /// queries' width is `meta`'s heads times `head_dim`); the default passes `qkv` on as it is.
    #[allow(clippy::too_many_arguments)]
    fn rope_attention(
        &self,
        qkv: &Self::Tensor,
        k_cache: &mut Self::Tensor,
        v_cache: &mut Self::Tensor,
        head_dim: usize,
        positions: &[u32],
        inv_freq: &[f32],
        slots: &[u32],
        meta: &AttnMeta<'_>,
    ) -> Result<Self::Tensor> {
        let q = self.rope_kv_write(qkv, k_cache, v_cache, head_dim, positions, inv_freq, slots)?;
        self.attention(&q, k_cache, v_cache, meta)
    }
    /// `[a; b; …]`: the parts one after another along their first dimension (equal other dimensions;
    /// vectors simply concatenated), as one new tensor (fused projection weights and biases are made at
    /// load time this way).
    fn concat_rows(&self, parts: &[&Self::Tensor]) -> Result<Self::Tensor>;
    /// Causal attention of the new tokens `q` `[n, heads * head_dim]` over each sequence's cached keys and
    /// values (which already include the new tokens). Returns `[n, heads * head_dim]`.
    fn attention(
        &self,
        q: &Self::Tensor,
        k_cache: &Self::Tensor,
        v_cache: &Self::Tensor,
        meta: &AttnMeta<'_>,
    ) -> Result<Self::Tensor>;
    /// Batched LoRA (SGMV shrink then expand): for each segment,
    /// `y[rows, col .. col + b.rows] += scale · (x[rows] · aᵀ) · bᵀ`. `x` `[n, in]`, `y` `[n, out]`; rows
    /// outside every segment (base-model rows) are untouched and segments may have different ranks and
    /// column ranges (the parts of a fused projection in one call; segments that share rows must not share
    /// columns). Each segment's adapter weights are read once.
    fn lora(&self, y: &mut Self::Tensor, x: &Self::Tensor, segments: &[LoraSegment<'_, Self::Tensor>]) -> Result<()>;
    /// An uploaded adapter's index for [`Backend::lora_step`] (made once, when it is uploaded); `None`
    /// (the default) where the backend has no per-step plan.
    fn lora_index(&self, layers: &[[Option<LoraWeights<Self>>; NUM_TARGETS]]) -> Result<Option<Self::LoraIndex>> {
        let _ = layers;
        Ok(None)
    }
    /// The LoRA plan of a whole forward pass of `rows` rows, made once before its first layer so that
    /// each layer's products ([`Backend::lora_layer`]) take no per-segment host work; `None` (the
    /// default, or a batch the backend's plan does not suit) means every layer calls [`Backend::lora`].
    fn lora_step(&self, rows: usize, segments: &[LoraRows<'_, Self>]) -> Result<Option<Self::LoraStep>> {
        let _ = (rows, segments);
        Ok(None)
    }
    /// [`Backend::lora`] for layer `layer` of a planned step: for each segment of the plan and each part
    /// `(target, first column of y)` its adapter has in that layer, `y[rows, col ..] += scale · (x[rows] ·
    /// aᵀ) · bᵀ` with that (layer, target)'s pair.
    fn lora_layer(
        &self,
        y: &mut Self::Tensor,
        x: &Self::Tensor,
        step: &Self::LoraStep,
        layer: usize,
        parts: &[(Target, usize)],
    ) -> Result<()> {
        let _ = (y, x, step, layer, parts);
        Err(crate::EngineError::Backend(
            "lora_layer without a step plan from lora_step".into(),
        ))
    }
    /// Room past a projection's weight `w` (layer `layer`, parts `targets` in order: q/k/v fused, or o) for an
    /// adapter's `lora_A` rows, so that [`Backend::lora_project`] may compute the product and the LoRA shrink
    /// in one GEMM. Returns the weight to keep: the same product as `w` for [`Backend::linear`]. The default
    /// keeps `w`.
    fn lora_gemm_weight(&self, w: Self::Tensor, layer: usize, targets: &[Target]) -> Result<Self::Tensor> {
        let _ = (layer, targets);
        Ok(w)
    }
    /// `x·wᵀ (+ bias)`, then the planned step's LoRA terms of `parts` ([`Backend::linear`], then
    /// [`Backend::lora_layer`]). Where `w` is a weight [`Backend::lora_gemm_weight`] gave back, the result
    /// may have more columns than `w` has rows (the backend's scratch, past the product's): the caller asked
    /// for that room only for projections it reads by their first columns ([`Backend::rope_attention`] does,
    /// by its heads, and [`Backend::add_rms_norm`]).
    fn lora_project(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        step: &Self::LoraStep,
        layer: usize,
        parts: &[(Target, usize)],
    ) -> Result<Self::Tensor> {
        let mut y = self.linear(x, w, bias)?;
        self.lora_layer(&mut y, x, step, layer, parts)?;
        Ok(y)
    }
    /// For each `(row, task)`, from row `row` of `logits` `[rows, vocab]`: the next token chosen by the
    /// task's sampler (exactly as [`crate::Sampler::choose`], recorded in its history), or a given
    /// token's log-probability under the raw logits. Each row serves one task. The default copies the
    /// logits to the host and samples there; a backend that samples on the device overrides it, so
    /// only a few bytes per row come back.
    fn sample(
        &self,
        logits: &Self::Tensor,
        tasks: &mut [(usize, crate::sampling::SampleTask<'_>)],
    ) -> Result<Vec<crate::sampling::Sampled>> {
        let vocab = self.shape(logits).last().copied().unwrap_or(0);
        let mut host = self.to_f32(logits)?;
        crate::sampling::sample_host(&mut host, vocab, tasks)
    }
    /// [`Backend::sample`]; with `feed`, a backend that can also launches the decode step kept by the last
    /// [`Backend::decode_prepare`] with the tokens chosen here as its token ids, on the device, before it waits for
    /// them, so that the next step runs while the host hands these tokens out. The engine gives `feed` only when
    /// the tasks are one [`crate::sampling::SampleTask::Choose`] per sequence of the prepared step, in its order:
    /// `feed[k]` is the prepared step's token row that takes task `k`'s token (rows are grouped by adapter, so not
    /// `k` itself). Returns the launched step's logits (as [`Backend::decode_prepared`] would give them for these
    /// tokens), or `None` when it launched nothing. The default launches nothing.
    fn sample_feeding(
        &self,
        logits: &Self::Tensor,
        tasks: &mut [(usize, crate::sampling::SampleTask<'_>)],
        feed: Option<&[u32]>,
    ) -> Result<(Vec<crate::sampling::Sampled>, Option<Self::Tensor>)> {
        let _ = feed;
        Ok((self.sample(logits, tasks)?, None))
    }
    /// Sum of `t` across the tensor-parallel ranks of `comm`, in place. The default copies through the
    /// host; a backend with a device collective (NCCL) overrides it.
    fn all_reduce_sum(&self, t: &mut Self::Tensor, comm: &dyn crate::comm::Communicator) -> Result<()> {
        if comm.world_size() == 1 {
            return Ok(());
        }
        let mut host = self.to_f32(t)?;
        comm.all_reduce_sum(&mut host)?;
        let shape = self.shape(t).to_vec();
        *t = self.tensor_from_f32(&shape, &host)?;
        Ok(())
    }
    /// The given rows of `x`, in order.
    fn gather_rows(&self, x: &Self::Tensor, rows: &[usize]) -> Result<Self::Tensor>;
    /// Waits until the device has finished all work issued so far (before memory that work may read is
    /// released on another stream). The default does nothing: the CPU backend computes synchronously.
    fn wait_idle(&self) -> Result<()> {
        Ok(())
    }
    /// Runs `f`, one decode step's forward pass over `rows` rows. A backend may run it as the replay of a
    /// captured graph (the CUDA backend does: kernels, grids and pointers fixed, metadata refreshed); the
    /// result must equal `f()`'s, and is valid until the next decode step (a replayed graph's output lives
    /// in memory the next replay overwrites); steps must not run concurrently. The default calls `f`.
    fn decode_step(&self, rows: usize, f: &mut dyn FnMut() -> Result<Self::Tensor>) -> Result<Self::Tensor> {
        let _ = rows;
        f()
    }
    /// Prepares the next decode step while the one before may still run on the device: `f` is its
    /// forward pass over `rows` rows with placeholder token ids (inputs otherwise those of the next
    /// step, as the engine expects it). A backend that replays captured steps may do the pass's host
    /// work now and keep it for [`Backend::decode_prepared`]; returns whether it kept it. Any other
    /// decode step forgets it. The default keeps nothing.
    fn decode_prepare(&self, rows: usize, f: &mut dyn FnMut() -> Result<Self::Tensor>) -> Result<bool> {
        let _ = (rows, f);
        Ok(false)
    }
    /// Runs the decode step kept by the last [`Backend::decode_prepare`] with `tokens` (as many as its
    /// placeholders, valid ids) as its token ids, if it is still kept: its logits, as
    /// [`Backend::decode_step`] would give them for that pass. The caller vouches that the step's inputs
    /// besides the ids are those prepared. `None`: nothing kept (run the step normally).
    fn decode_prepared(&self, tokens: &[u32]) -> Result<Option<Self::Tensor>> {
        let _ = tokens;
        Ok(None)
    }
    /// Marks the start (`true`) and the end (`false`) of a forward pass. Within one, a backend may keep
    /// what every layer would compute alike from the same inputs (the CUDA backend uploads positions,
    /// slots and the attention metadata once per pass rather than once per layer, recognising them by the
    /// slices it is given, which the model passes unchanged to every layer). The default keeps nothing.
    fn forward_scope(&self, begin: bool) {
        let _ = begin;
    }
    /// A point of the forward pass (`"embedding"`, `"layer"` after each layer, `"head"`) that a backend may
    /// time for profiles (the CUDA backend with `LORAX_CUDA_MARKS=1`). The default does nothing.
    fn mark(&self, what: &'static str) {
        let _ = what;
    }
    /// Row counts whose decode steps are worth running once at start-up, largest first: a backend whose
    /// first step of a shape pays for it (the CUDA backend: a serving run's first eager step at a row count
    /// took 20-24 ms against a typical 8.8 on an H200 in session 27, most likely cuBLAS's choice and loading
    /// of each GEMM shape's kernels) names its padded row counts here. The
    /// default names none.
    fn decode_warmup_rows(&self) -> Vec<usize> {
        Vec::new()
    }
    /// How the decode steps so far ran, for logs that explain a slow step. The default (no captured
    /// steps) counts none.
    fn step_counts(&self) -> StepCounts {
        StepCounts::default()
    }
    /// Called as the engine begins each step (of any kind), before its forward pass. The default does
    /// nothing.
    fn step_started(&self) {}
    /// The rows a decode step of `rows` rows should run with: the engine adds padding rows (writing no
    /// keys or values, their outputs discarded) up to it, so that a backend replaying captured steps
    /// needs few distinct sizes. The default pads nothing.
    fn decode_rows(&self, rows: usize) -> usize {
        rows
    }
    /// A dummy weight (`--load-format dummy`): this rank's slice of a deterministic random tensor. The
    /// default generates it on the host; a device backend makes it in place.
    fn dummy_weight(&self, spec: &crate::dummy::DummySpec) -> Result<Self::Tensor> {
        self.tensor_from_f32(&spec.shape, &spec.host_values())
    }
}
