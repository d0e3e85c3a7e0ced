//! The one Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2), written once against [`Backend`].
//!
//! A forward pass takes a flattened batch: the new tokens of every sequence one after another (no
//! padding), their positions, their cache slots, and per-sequence attention metadata. It writes the new
//! keys/values into the paged cache, attends over each sequence's whole cached context, and returns
//! logits only for the rows asked for (usually the last new token of each sequence).

use crate::backend::{AttnMeta, AttnSeq, Backend, LoraRows, LoraSegment, NO_SLOT};
use crate::comm::Communicator;
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv_cache::KvCache;
use crate::lora::{DeviceAdapter, Target};
use crate::weights::{shard, Weights};

/// Where a model's weights come from.
#[derive(Clone, Copy, Debug)]
pub enum WeightSource<'a> {
    /// A safetensors checkpoint.
    Checkpoint(&'a Weights),
    /// Deterministic random weights of the configuration's shapes ([`crate::dummy`]), from this seed;
    /// each rank makes only its slice, on its device.
    Dummy {
        /// Seed of every tensor.
        seed: u64,
    },
}

/// A linear layer `y = x·Wᵀ + b`.
pub struct Linear<B: Backend> {
    /// `[out, in]`.
    pub w: B::Tensor,
    /// `[out]`, when the checkpoint has one.
    pub b: Option<B::Tensor>,
}

impl<B: Backend> Linear<B> {
    fn forward(&self, backend: &B, x: &B::Tensor) -> Result<B::Tensor> {
        backend.linear(x, &self.w, self.b.as_ref())
    }

    /// One layer whose output is the parts' outputs side by side (q/k/v, gate/up): one GEMM instead of
    /// several, reading the same input once.
    fn fused(backend: &B, parts: &[Linear<B>]) -> Result<Self> {
        let w = backend.concat_rows(&parts.iter().map(|p| &p.w).collect::<Vec<_>>())?;
        let biases: Vec<&B::Tensor> = parts.iter().filter_map(|p| p.b.as_ref()).collect();
        let b = match biases.len() {
            0 => None,
            n if n == parts.len() => Some(backend.concat_rows(&biases)?),
            _ => {
                return Err(EngineError::Backend(
                    "some parts of a fused projection have biases and some do not".into(),
                ))
            }
        };
        Ok(Self { w, b })
    }
}

struct Layer<B: Backend> {
    input_norm: B::Tensor,
    /// q, k and v fused: `[q_dim + 2·kv_dim, hidden]` (this rank's slices).
    qkv: Linear<B>,
    o: Linear<B>,
    post_norm: B::Tensor,
    /// gate and up fused: `[2·ffn, hidden]`.
    gate_up: Linear<B>,
    down: Linear<B>,
}

/// One sequence of a forward pass.
#[derive(Clone, Copy, Debug)]
pub struct SeqInput<'a> {
    /// New tokens (the prompt at prefill, one token at decode).
    pub tokens: &'a [u32],
    /// Tokens of this sequence already in the cache.
    pub ctx_before: usize,
    /// The sequence's cache blocks.
    pub block_table: &'a [u32],
    /// Index of its adapter in the adapters given to [`Model::forward`]; `None` for the base model.
    pub adapter: Option<usize>,
    /// A padding row (filling a decode step up to its CUDA graph's row count): its keys and values are
    /// written nowhere ([`NO_SLOT`]) and its output is discarded.
    pub pad: bool,
}

/// Consecutive rows of a forward pass that share an adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdapterSegment {
    /// First row.
    pub start: usize,
    /// Number of rows.
    pub len: usize,
    /// Index of the adapter in the adapters given to [`Model::forward`].
    pub adapter: usize,
}

/// One forward pass's input: new tokens of several sequences, flattened.
#[derive(Clone, Debug, Default)]
pub struct ForwardInput<'a> {
    /// Token ids, sequence after sequence.
    pub tokens: Vec<u32>,
    /// Position of each token in its sequence.
    pub positions: Vec<u32>,
    /// Cache slot of each token.
    pub slots: Vec<u32>,
    /// Per-sequence layout (rows, cached context, block table).
    pub seqs: Vec<AttnSeq<'a>>,
    /// Rows whose logits are returned, in this order.
    pub logit_rows: Vec<usize>,
    /// Rows that take an adapter: runs of consecutive rows of one adapter (base-model rows are in no
    /// segment).
    pub segments: Vec<AdapterSegment>,
}

impl<'a> ForwardInput<'a> {
    /// Build the input for `seqs`, asking for the logits of every new token of sequence `i` when
    /// `all_logits[i]`, else only of its last one. Rows are laid out one-token sequences (decode rows)
    /// first, then the longer ones (prompt chunks), each part sorted by adapter (base first), so an
    /// adapter's rows form at most one segment per part (one in all where its decode rows end right
    /// where its prompt rows start); logits still come back in the order of `seqs`. (Decode
    /// rows first keep a mixed step's paged-attention rows together, ahead of the prompt rows the CUDA
    /// backend's tensor-core kernel takes: its paged grid then ends at the last decode row.)
    pub fn build<B: Backend>(cache: &KvCache<B>, seqs: &[SeqInput<'a>], all_logits: &[bool]) -> Result<Self> {
        let mut input = Self::default();
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| (seqs[i].tokens.len() > 1, seqs[i].adapter.map_or(0, |a| a + 1)));
        let mut starts = vec![0; seqs.len()];
        for &i in &order {
            let s = &seqs[i];
            if s.tokens.is_empty() {
                return Err(EngineError::InvalidBatch("a sequence with no new tokens".into()));
            }
            let q_start = input.tokens.len();
            starts[i] = q_start;
            for (j, &t) in s.tokens.iter().enumerate() {
                let pos = s.ctx_before + j;
                input.tokens.push(t);
                input
                    .positions
                    .push(u32::try_from(pos).map_err(|_| EngineError::InvalidBatch("position overflows u32".into()))?);
                input.slots.push(if s.pad {
                    NO_SLOT
                } else {
                    cache.slot(s.block_table, pos)?
                });
            }
            input.seqs.push(AttnSeq {
                q_start,
                q_len: s.tokens.len(),
                ctx_before: s.ctx_before,
                block_table: s.block_table,
            });
            if let Some(adapter) = s.adapter {
                match input.segments.last_mut() {
                    // Only rows right after the segment join it: a base-model sequence between two of the
                    // adapter's (the last decode row and the first prompt chunk) starts a new segment.
                    Some(seg) if seg.adapter == adapter && seg.start + seg.len == q_start => {
                        seg.len += s.tokens.len();
                    }
                    _ => input.segments.push(AdapterSegment {
                        start: q_start,
                        len: s.tokens.len(),
                        adapter,
                    }),
                }
            }
        }
        // Padding rows keep their logit row: the LM head and the gather then have the padded row count, so
        // a decode step's graph does not change with how many rows are real.
        for (i, s) in seqs.iter().enumerate() {
            let q_start = starts[i];
            if all_logits.get(i).copied().unwrap_or(false) {
                input.logit_rows.extend(q_start..q_start + s.tokens.len());
            } else {
                input.logit_rows.push(q_start + s.tokens.len() - 1);
            }
        }
        Ok(input)
    }
}

/// A loaded decoder.
pub struct Model<B: Backend> {
    /// The checkpoint's configuration.
    pub cfg: ModelConfig,
    embed: B::Tensor,
    layers: Vec<Layer<B>>,
    norm: B::Tensor,
    lm_head: Option<B::Tensor>,
    inv_freq: Vec<f32>,
    local_heads: usize,
    local_kv_heads: usize,
    /// This rank's FFN width (the FFN is split evenly across the ranks).
    local_ffn: usize,
    kv_slice: (usize, usize),
}

impl<B: Backend> Model<B> {
    /// Load the weights of shard `rank` of `world_size` (Megatron-style tensor parallelism):
    /// q/k/v/gate/up split by output rows (column parallel), o/down by input columns (row parallel, summed
    /// across ranks in the forward pass), embeddings, norms and lm_head whole on every rank. Query heads
    /// split evenly; key/value heads split too, or, when there are fewer of them than ranks, each rank
    /// keeps the one its query heads use (replicated).
    pub fn load(backend: &B, weights: &Weights, cfg: &ModelConfig, rank: usize, world_size: usize) -> Result<Self> {
        Self::load_from(backend, WeightSource::Checkpoint(weights), cfg, rank, world_size)
    }

    /// [`Model::load`] from a checkpoint or from dummy weights.
    pub fn load_from(
        backend: &B,
        source: WeightSource<'_>,
        cfg: &ModelConfig,
        rank: usize,
        world_size: usize,
    ) -> Result<Self> {
        let world = world_size.max(1);
        let kv_parts = cfg.num_kv_heads.min(world);
        let fits = cfg.num_heads.is_multiple_of(world)
            && cfg.intermediate_size.is_multiple_of(world)
            && cfg.num_kv_heads.is_multiple_of(kv_parts)
            && world.is_multiple_of(kv_parts)
            && rank < world;
        if !fits {
            return Err(EngineError::Unshardable {
                name: format!(
                    "model ({} heads, {} key/value heads, FFN {})",
                    cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
                ),
                dim: 0,
                size: cfg.num_heads,
                world_size: world,
            });
        }
        // Which slice of the key/value heads this rank holds.
        let kv_index = rank * kv_parts / world;
        let h = cfg.hidden_size;
        let (qd, kvd, ffn) = (cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);
        let up = |t| backend.weight(&t);
        // (dim, part, parts): split along `dim` into `parts` and keep `part`.
        let tensor = |name: &str, shape: &[usize], split: Option<(usize, usize, usize)>| -> Result<B::Tensor> {
            match source {
                WeightSource::Checkpoint(weights) => {
                    let t = weights.get_checked(name, shape)?;
                    match split {
                        Some((d, part, parts)) => up(shard(t, d, part, parts)?),
                        None => up(t),
                    }
                }
                WeightSource::Dummy { seed } => {
                    let fan_in = shape.get(1).or(shape.first()).copied().unwrap_or(1);
                    let fill = crate::dummy::fill_for(seed, name, fan_in);
                    backend.dummy_weight(&crate::dummy::DummySpec::new(name, shape, split, fill)?)
                }
            }
        };
        let linear =
            |prefix: &str, out: usize, inp: usize, split: (usize, usize, usize), bias: bool| -> Result<Linear<B>> {
                let w = tensor(&format!("{prefix}.weight"), &[out, inp], Some(split))?;
                let b = match (bias, split.0) {
                    (false, _) => None,
                    // Column-parallel biases split with their rows.
                    (true, 0) => Some(tensor(&format!("{prefix}.bias"), &[out], Some((0, split.1, split.2)))?),
                    // A row-parallel bias is added once: rank 0 keeps it, and the all-reduce sums it in.
                    (true, _) if rank == 0 => Some(tensor(&format!("{prefix}.bias"), &[out], None)?),
                    (true, _) => None,
                };
                Ok(Linear { w, b })
            };
        let col = (0, rank, world);
        let kv = (0, kv_index, kv_parts);
        let row = (1, rank, world);
        let embed = tensor("model.embed_tokens.weight", &[cfg.vocab_size, h], None)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let qkv = [
                linear(&format!("{p}.self_attn.q_proj"), qd, h, col, cfg.qkv_bias)?,
                linear(&format!("{p}.self_attn.k_proj"), kvd, h, kv, cfg.qkv_bias)?,
                linear(&format!("{p}.self_attn.v_proj"), kvd, h, kv, cfg.qkv_bias)?,
            ];
            let gate_up = [
                linear(&format!("{p}.mlp.gate_proj"), ffn, h, col, cfg.mlp_bias)?,
                linear(&format!("{p}.mlp.up_proj"), ffn, h, col, cfg.mlp_bias)?,
            ];
            // Room for a LoRA shrink inside the GEMMs whose outputs only rope_attention and add_rms_norm read,
            // where the projection has no bias (decided from the config, so that every rank of a tensor-parallel
            // model decides alike: only rank 0 keeps o's bias, and o's outputs are summed across ranks).
            let mut qkv = Linear::fused(backend, &qkv)?;
            if !cfg.qkv_bias {
                qkv.w = backend.lora_gemm_weight(qkv.w, i, &[Target::Q, Target::K, Target::V])?;
            }
            let mut o = linear(&format!("{p}.self_attn.o_proj"), h, qd, row, cfg.o_bias)?;
            if !cfg.o_bias {
                o.w = backend.lora_gemm_weight(o.w, i, &[Target::O])?;
            }
            layers.push(Layer {
                input_norm: tensor(&format!("{p}.input_layernorm.weight"), &[h], None)?,
                qkv,
                o,
                post_norm: tensor(&format!("{p}.post_attention_layernorm.weight"), &[h], None)?,
                gate_up: Linear::fused(backend, &gate_up)?,
                down: linear(&format!("{p}.mlp.down_proj"), h, ffn, row, cfg.mlp_bias)?,
            });
        }
        let norm = tensor("model.norm.weight", &[h], None)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(tensor("lm_head.weight", &[cfg.vocab_size, h], None)?)
        };
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            layers,
            norm,
            lm_head,
            inv_freq: cfg.inv_freq(),
            local_heads: cfg.num_heads / world,
            local_ffn: cfg.intermediate_size / world,
            local_kv_heads: cfg.num_kv_heads / kv_parts,
            kv_slice: (kv_index, kv_parts),
        })
    }

    /// The key/value-head slice this rank holds: (part, parts).
    pub fn kv_slice(&self) -> (usize, usize) {
        self.kv_slice
    }

    /// Key/value heads held by this shard (what the KV cache must be sized for).
    pub fn local_kv_heads(&self) -> usize {
        self.local_kv_heads
    }

    /// The logits `[rows, vocab]` of final hidden rows `[rows, hidden]` (from [`Model::forward`]).
    pub fn head(&self, backend: &B, normed: &B::Tensor) -> Result<B::Tensor> {
        let logits = backend.linear(normed, self.lm_head.as_ref().unwrap_or(&self.embed), None)?;
        backend.mark("head");
        Ok(logits)
    }

    /// Run the decoder over `input`, writing keys/values into `cache`, applying `adapters[s.adapter]` to
    /// the rows of each segment; returns the final norm's rows `[input.logit_rows.len(), hidden]`, whose
    /// logits [`Model::head`] computes.
    pub fn forward(
        &self,
        backend: &B,
        cache: &mut KvCache<B>,
        input: &ForwardInput<'_>,
        adapters: &[&DeviceAdapter<B>],
        comm: &dyn Communicator,
    ) -> Result<B::Tensor> {
        let cfg = &self.cfg;
        let n = input.tokens.len();
        if input.positions.len() != n || input.slots.len() != n {
            return Err(EngineError::InvalidBatch(
                "tokens, positions and slots differ in length".into(),
            ));
        }
        if let Some(&t) = input.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(EngineError::InvalidBatch(format!(
                "token id {t} is outside the vocabulary ({})",
                cfg.vocab_size
            )));
        }
        #[allow(clippy::cast_precision_loss)]
        let meta = AttnMeta {
            num_heads: self.local_heads,
            num_kv_heads: self.local_kv_heads,
            head_dim: cfg.head_dim,
            block_size: cache.block_size,
            scale: 1.0 / (cfg.head_dim as f32).sqrt(),
            sliding_window: cfg.sliding_window,
            seqs: &input.seqs,
        };
        if let Some(seg) = input.segments.iter().find(|s| s.adapter >= adapters.len()) {
            return Err(EngineError::InvalidBatch(format!(
                "segment names adapter {} of {}",
                seg.adapter,
                adapters.len()
            )));
        }
        // Every layer gets the same positions, slots and attention metadata: the backend may keep what it
        // derives from them until the pass ends (also on an early return).
        backend.forward_scope(true);
        let _scope = PassScope(backend);
        let eps = cfg.rms_norm_eps;
        let (qd, kvd) = (self.local_heads * cfg.head_dim, self.local_kv_heads * cfg.head_dim);
        // The whole pass's LoRA plan, where the backend has one: each layer's products then take no
        // per-segment host work.
        let lora_rows: Vec<LoraRows<'_, B>> = input
            .segments
            .iter()
            .map(|s| LoraRows {
                start: s.start,
                len: s.len,
                adapter: adapters[s.adapter],
            })
            .collect();
        let lora_step = if lora_rows.is_empty() {
            None
        } else {
            backend.lora_step(n, &lora_rows)?
        };
        // Runs a (possibly fused) projection, then adds each segment's LoRA terms for its parts (target,
        // first column of the output), all parts in one call. q/k/v's and o's outputs may have the backend's
        // scratch columns past the product's (`Backend::lora_gemm_weight` at load).
        let project =
            |linear: &Linear<B>, x: &B::Tensor, layer: usize, parts: &[(Target, usize)]| -> Result<B::Tensor> {
                if let Some(step) = &lora_step {
                    return backend.lora_project(x, &linear.w, linear.b.as_ref(), step, layer, parts);
                }
                let mut y = linear.forward(backend, x)?;
                let mut segs: Vec<LoraSegment<'_, B::Tensor>> = Vec::new();
                for &(target, col) in parts {
                    for s in &input.segments {
                        if let Some(w) = adapters[s.adapter]
                            .layers
                            .get(layer)
                            .and_then(|l| l[target.index()].as_ref())
                        {
                            segs.push(LoraSegment {
                                start: s.start,
                                len: s.len,
                                a: &w.a,
                                b: &w.b,
                                scale: w.scale,
                                col,
                            });
                        }
                    }
                }
                if !segs.is_empty() {
                    backend.lora(&mut y, x, &segs)?;
                }
                Ok(y)
            };
        // Adapters whose weights are still arriving (streamed loads): each layer waits for its own.
        let gates: Vec<&dyn crate::lora::AdapterGate> = adapters
            .iter()
            .filter_map(|a| a.gate.as_deref())
            .filter(|g| !g.done())
            .collect();
        let mut residual = backend.embedding(&self.embed, &input.tokens)?;
        backend.mark("embedding");
        let mut pending: Option<B::Tensor> = None;
        for (i, layer) in self.layers.iter().enumerate() {
            for g in &gates {
                g.wait_layer(i)?;
            }
            let h = match pending.take() {
                None => backend.rms_norm(&residual, &layer.input_norm, eps)?,
                Some(out) => backend.add_rms_norm(&mut residual, &out, &layer.input_norm, eps)?,
            };
            let qkv = project(
                &layer.qkv,
                &h,
                i,
                &[(Target::Q, 0), (Target::K, qd), (Target::V, qd + kvd)],
            )?;
            let attn = backend.rope_attention(
                &qkv,
                &mut cache.k[i],
                &mut cache.v[i],
                cfg.head_dim,
                &input.positions,
                &self.inv_freq,
                &input.slots,
                &meta,
            )?;
            // Products whose epilogue may do the next step's work (Backend::linear_add, linear_silu_mul): no LoRA
            // term of these targets in the step and no bias come between, and (for the residual add) no sum
            // across devices.
            let plain = |linear: &Linear<B>, targets: &[Target]| {
                linear.b.is_none()
                    && !input.segments.iter().any(|s| {
                        adapters[s.adapter]
                            .layers
                            .get(i)
                            .is_some_and(|l| targets.iter().any(|t| l[t.index()].is_some()))
                    })
            };
            let single = comm.world_size() == 1;
            let h2 =
                if single && plain(&layer.o, &[Target::O]) && backend.linear_add(&attn, &layer.o.w, &mut residual)? {
                    backend.rms_norm(&residual, &layer.post_norm, eps)?
                } else {
                    let mut attn_out = project(&layer.o, &attn, i, &[(Target::O, 0)])?;
                    backend.all_reduce_sum(&mut attn_out, comm)?;
                    backend.add_rms_norm(&mut residual, &attn_out, &layer.post_norm, eps)?
                };
            let fused = if plain(&layer.gate_up, &[Target::Gate, Target::Up]) {
                backend.linear_silu_mul(&h2, &layer.gate_up.w, self.local_ffn)?
            } else {
                None
            };
            let act = match fused {
                Some(act) => act,
                None => {
                    let gate_up = project(
                        &layer.gate_up,
                        &h2,
                        i,
                        &[(Target::Gate, 0), (Target::Up, self.local_ffn)],
                    )?;
                    backend.silu_mul(&gate_up)?
                }
            };
            // The down product added into the residual stream here, or left for the next norm's add.
            if !(single
                && plain(&layer.down, &[Target::Down])
                && backend.linear_add(&act, &layer.down.w, &mut residual)?)
            {
                let mut down = project(&layer.down, &act, i, &[(Target::Down, 0)])?;
                backend.all_reduce_sum(&mut down, comm)?;
                pending = Some(down);
            }
            backend.mark("layer");
        }
        // No tokens from weights that failed their read or their checks.
        for g in &gates {
            g.wait_all()?;
        }
        // The last residual add and the final norm, for the logit rows only: in one kernel over the whole
        // residual when every row is a logit row in order (a decode step), else over the gathered rows (a
        // prompt's last row; not the prompt's thousand).
        let every_row = input.logit_rows.iter().copied().eq(0..n);
        match pending {
            Some(out) if every_row => backend.add_rms_norm(&mut residual, &out, &self.norm, eps),
            Some(out) => {
                let mut last = backend.gather_rows(&residual, &input.logit_rows)?;
                let out = backend.gather_rows(&out, &input.logit_rows)?;
                backend.add_rms_norm(&mut last, &out, &self.norm, eps)
            }
            // The last down product already added (Backend::linear_add): no copy of rows when all are logit rows.
            None if every_row => backend.rms_norm(&residual, &self.norm, eps),
            None => backend.rms_norm(&backend.gather_rows(&residual, &input.logit_rows)?, &self.norm, eps),
        }
    }
}

/// Ends a forward pass's [`Backend::forward_scope`] when dropped.
struct PassScope<'a, B: Backend>(&'a B);

impl<B: Backend> Drop for PassScope<'_, B> {
    fn drop(&mut self) {
        self.0.forward_scope(false);
    }
}

#[cfg(test)]
mod tests {
    use super::{AdapterSegment, ForwardInput, SeqInput};
    use crate::backend::cpu::CpuBackend;
    use crate::kv_cache::KvCache;

    /// Decode rows come first, then prompt chunks, each by adapter; an adapter's decode rows and prompt
    /// rows with a base-model prompt between them are two segments, and logits keep the callers' order.
    #[test]
    fn rows_decode_first_and_segments_contiguous() {
        let cache: KvCache<CpuBackend> = KvCache {
            k: Vec::new(),
            v: Vec::new(),
            num_blocks: 64,
            block_size: 16,
        };
        let table: Vec<u32> = (0..8).collect();
        let prompt = [7u32; 100];
        let seqs = [
            SeqInput {
                tokens: &prompt,
                ctx_before: 0,
                block_table: &table,
                adapter: Some(0),
                pad: false,
            },
            SeqInput {
                tokens: &[5],
                ctx_before: 40,
                block_table: &table,
                adapter: Some(0),
                pad: false,
            },
            SeqInput {
                tokens: &prompt[..30],
                ctx_before: 0,
                block_table: &table,
                adapter: None,
                pad: false,
            },
            SeqInput {
                tokens: &[6],
                ctx_before: 20,
                block_table: &table,
                adapter: None,
                pad: false,
            },
        ];
        let input = ForwardInput::build(&cache, &seqs, &[]).expect("a valid layout");
        // Rows: base decode (1), adapter-0 decode (1), base prompt (30), adapter-0 prompt (100).
        assert_eq!(
            input.seqs.iter().map(|s| s.q_len).collect::<Vec<_>>(),
            vec![1, 1, 30, 100]
        );
        assert_eq!(
            input.segments,
            vec![
                AdapterSegment {
                    start: 1,
                    len: 1,
                    adapter: 0
                },
                AdapterSegment {
                    start: 32,
                    len: 100,
                    adapter: 0
                },
            ]
        );
        // Each sequence's last row, in the order given.
        assert_eq!(input.logit_rows, vec![131, 1, 31, 0]);
    }
}
