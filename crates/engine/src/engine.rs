//! Batches of sequences over a model: prefill adds sequences, decode advances all of them, filter drops
//! finished ones. The caller owns block allocation and passes each sequence's block table (sized for
//! its whole life: prompt plus every token it may generate).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::backend::Backend;
use crate::comm::{Communicator, SingleRank};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv_cache::KvCache;
use crate::lora::{DeviceAdapter, HostAdapter};
use crate::model::{ForwardInput, Model, SeqInput, WeightSource};
use crate::sampling::{Choice, SampleTask, Sampled, Sampler, SamplingParams};
use crate::weights::Weights;

/// A raw sequence for [`Engine::logits_with_adapters`]: (new tokens, tokens already cached, block
/// table, adapter key or `None` for the base model).
pub type RawSeq<'a> = (&'a [u32], usize, &'a [u32], Option<&'a str>);

/// A sequence to add to a batch.
#[derive(Clone, Debug)]
pub struct NewSequence {
    /// Caller's id, unique within the batch.
    pub id: u64,
    /// Prompt token ids.
    pub input_ids: Vec<u32>,
    /// Cache blocks covering the prompt and every token that may be generated.
    pub block_table: Vec<u32>,
    /// Next-token parameters.
    pub params: SamplingParams,
    /// Also return the log-probability of each prompt token.
    pub prefill_logprobs: bool,
    /// Key of a loaded adapter ([`Engine::load_adapter`]) applied to this sequence; `None` for the base model.
    pub adapter: Option<String>,
}

/// A prompt token with its log-probability under the model (none for the first token).
#[derive(Clone, Debug, PartialEq)]
pub struct PromptToken {
    /// Token id.
    pub id: u32,
    /// log p(token | previous tokens).
    pub logprob: Option<f32>,
}

/// One step's output for one sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// Sequence id.
    pub id: u64,
    /// The token chosen, its logprob and alternatives.
    pub choice: Choice,
    /// Prompt tokens with logprobs (prefill, when asked).
    pub prefill: Option<Vec<PromptToken>>,
}

/// A sequence in a running batch.
pub struct Sequence {
    /// Caller's id.
    pub id: u64,
    /// Prompt and generated tokens.
    pub tokens: Vec<u32>,
    /// How many of `tokens` are in the KV cache.
    pub cached: usize,
    /// Cache blocks.
    pub block_table: Vec<u32>,
    /// Adapter key, `None` for the base model.
    pub adapter: Option<String>,
    sampler: Sampler,
}

/// The sequences being decoded together.
#[derive(Default)]
pub struct Batch {
    /// Sequences, in the order they were added.
    pub seqs: Vec<Sequence>,
}

impl Batch {
    /// Keep only the sequences whose ids are listed.
    pub fn filter(&mut self, keep: &[u64]) {
        self.seqs.retain(|s| keep.contains(&s.id));
    }

    /// Ids of the sequences, in order.
    pub fn ids(&self) -> Vec<u64> {
        self.seqs.iter().map(|s| s.id).collect()
    }

    /// Whether a sequence of the batch uses the adapter `key`.
    pub fn uses_adapter(&self, key: &str) -> bool {
        self.seqs.iter().any(|s| s.adapter.as_deref() == Some(key))
    }

    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    /// No sequences.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }
}

/// Sizes of the KV cache.
#[derive(Clone, Copy, Debug)]
pub struct CacheConfig {
    /// Number of blocks.
    pub num_blocks: usize,
    /// Token slots per block.
    pub block_size: usize,
}

/// A model, its KV cache and its backend.
pub struct Engine<B: Backend> {
    /// The device (shared with the [`AdapterUploader`]s of the engine).
    pub backend: Arc<B>,
    /// The decoder.
    pub model: Model<B>,
    /// The paged cache.
    pub cache: KvCache<B>,
    /// Adapters on the device, by key.
    adapters: HashMap<String, DeviceAdapter<B>>,
    comm: Arc<dyn Communicator>,
}

/// Where [`Engine::load_with_format`] takes the weights from (`--load-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LoadFormat {
    /// The safetensors checkpoint of the model directory.
    #[default]
    Safetensors,
    /// Deterministic random weights from `config.json` alone ([`crate::dummy`]).
    Dummy {
        /// Seed of every tensor.
        seed: u64,
    },
}

/// Uploads adapters for one engine ([`Engine::adapter_uploader`]) apart from it: the shard uploads with
/// it outside its engine lock, then [`Engine::insert_adapter`]s the result under the lock.
pub struct AdapterUploader<B: Backend> {
    backend: Arc<B>,
    rank: usize,
    world_size: usize,
    kv: (usize, usize),
}

impl<B: Backend> Clone for AdapterUploader<B> {
    fn clone(&self) -> Self {
        Self {
            backend: Arc::clone(&self.backend),
            rank: self.rank,
            world_size: self.world_size,
            kv: self.kv,
        }
    }
}

impl<B: Backend> AdapterUploader<B> {
    /// This rank's slice of `adapter` on the device ([`DeviceAdapter::upload`], one
    /// [`Backend::upload_many`]).
    pub fn upload(&self, adapter: &HostAdapter) -> Result<DeviceAdapter<B>> {
        DeviceAdapter::upload(&*self.backend, adapter, self.rank, self.world_size, self.kv)
    }
}

impl<B: Backend> Engine<B> {
    /// Load the checkpoint in `dir` (config.json + safetensors, or `dir` is a `.gguf` file) onto `backend`.
    pub fn load(backend: B, dir: &Path, cache: CacheConfig) -> Result<Self> {
        Self::load_sharded(backend, dir, cache, Arc::new(SingleRank))
    }

    /// Load this rank's slice of the checkpoint in `dir`; forward passes sum partial results across the
    /// ranks of `comm`, which must all run the same calls in the same order.
    pub fn load_sharded(backend: B, dir: &Path, cache: CacheConfig, comm: Arc<dyn Communicator>) -> Result<Self> {
        Self::load_with_format(backend, dir, cache, comm, LoadFormat::Safetensors)
    }

    /// [`Engine::load_sharded`] with the weights `format` says: the safetensors in `dir`, or dummy
    /// weights made from `dir/config.json` alone.
    pub fn load_with_format(
        backend: B,
        dir: &Path,
        cache: CacheConfig,
        comm: Arc<dyn Communicator>,
        format: LoadFormat,
    ) -> Result<Self> {
        let (rank, world) = (comm.rank(), comm.world_size());
        let (cfg, model) = match format {
            LoadFormat::Safetensors if lorax_gguf::is_gguf_file(dir) => {
                let file = lorax_gguf::GgufFile::open(dir).map_err(crate::gguf::engine_error)?;
                let cfg = crate::gguf::config(&file)?;
                let model = Model::load(&backend, &Weights::from_gguf(file, &cfg), &cfg, rank, world)?;
                (cfg, model)
            }
            LoadFormat::Safetensors => {
                let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
                let model = Model::load(&backend, &Weights::from_dir(dir)?, &cfg, rank, world)?;
                (cfg, model)
            }
            LoadFormat::Dummy { seed } => {
                let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
                let model = Model::load_from(&backend, WeightSource::Dummy { seed }, &cfg, rank, world)?;
                (cfg, model)
            }
        };
        let cache = KvCache::new(
            &backend,
            &cfg,
            model.local_kv_heads(),
            cache.num_blocks,
            cache.block_size,
        )?;
        Ok(Self {
            backend: Arc::new(backend),
            model,
            cache,
            adapters: HashMap::new(),
            comm,
        })
    }

    /// Uploads `adapter` under `key` (replacing an adapter of the same key); returns its device bytes.
    /// The same as [`AdapterUploader::upload`] then [`Engine::insert_adapter`].
    pub fn load_adapter(&mut self, key: &str, adapter: &HostAdapter) -> Result<usize> {
        let device = self.adapter_uploader().upload(adapter)?;
        Ok(self.insert_adapter(key, device))
    }

    /// Something that uploads adapters for this engine (its backend, rank and key/value slice) without
    /// borrowing it, so that an upload can run while the engine runs forward passes.
    pub fn adapter_uploader(&self) -> AdapterUploader<B> {
        AdapterUploader {
            backend: Arc::clone(&self.backend),
            rank: self.comm.rank(),
            world_size: self.comm.world_size(),
            kv: self.model.kv_slice(),
        }
    }

    /// Makes an adapter uploaded by this engine's [`AdapterUploader`] usable under `key` (replacing an
    /// adapter of the same key); returns its device bytes.
    pub fn insert_adapter(&mut self, key: &str, device: DeviceAdapter<B>) -> usize {
        let bytes = device.bytes;
        if let Some(old) = self.adapters.insert(key.to_string(), device) {
            // As in `offload_adapter`: the replaced weights go once nothing queued can read them.
            if let Err(e) = self.backend.wait_idle() {
                tracing::warn!("waiting for the device before releasing a replaced adapter: {e}");
            }
            drop(old);
        }
        bytes
    }

    /// Releases the adapter `key`; refused while a sequence of `batch` uses it. `false` if it was not loaded.
    pub fn offload_adapter(&mut self, key: &str, batch: &Batch) -> Result<bool> {
        if batch.uses_adapter(key) {
            return Err(EngineError::InvalidBatch(format!(
                "adapter {key:?} is used by a running sequence"
            )));
        }
        // Work a failed step left queued may still read the adapter: its memory is freed (stream-ordered, on
        // another stream) only once the device is idle.
        if self.adapters.contains_key(key) {
            self.backend.wait_idle()?;
        }
        Ok(self.adapters.remove(key).is_some())
    }

    /// Whether the adapter `key` is loaded.
    pub fn has_adapter(&self, key: &str) -> bool {
        self.adapters.contains_key(key)
    }

    /// Keys of the loaded adapters.
    pub fn adapter_keys(&self) -> Vec<String> {
        self.adapters.keys().cloned().collect()
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.model.cfg
    }

    /// Logits (as host f32 rows) for raw sequences of the base model given as (new tokens, cached count,
    /// block table); `all_logits[i]` asks for every new token's logits of sequence `i`, else only the last.
    pub fn logits(&mut self, seqs: &[(&[u32], usize, &[u32])], all_logits: &[bool]) -> Result<Vec<Vec<f32>>> {
        let with: Vec<RawSeq<'_>> = seqs.iter().map(|&(t, c, b)| (t, c, b, None)).collect();
        self.logits_with_adapters(&with, all_logits)
    }

    /// [`Engine::logits`] with an adapter key (or `None`) per sequence.
    pub fn logits_with_adapters(&mut self, seqs: &[RawSeq<'_>], all_logits: &[bool]) -> Result<Vec<Vec<f32>>> {
        let v = self.model.cfg.vocab_size;
        let logits = self.forward_logits(seqs, all_logits, false)?;
        Ok(self
            .backend
            .to_f32(&logits)?
            .chunks_exact(v)
            .map(<[f32]>::to_vec)
            .collect())
    }

    /// The logits of a forward pass over `seqs`, on the device: `[rows, vocab_size]`. A `decode` pass on
    /// one rank goes through [`Backend::decode_step`] (CUDA graphs).
    fn forward_logits(&mut self, seqs: &[RawSeq<'_>], all_logits: &[bool], decode: bool) -> Result<B::Tensor> {
        // Each distinct adapter once, in first-use order; sequences refer to it by index.
        let mut keys: Vec<&str> = Vec::new();
        let mut inputs = Vec::with_capacity(seqs.len());
        for &(tokens, ctx_before, block_table, key) in seqs {
            let adapter = key.map(|k| {
                keys.iter().position(|x| *x == k).unwrap_or_else(|| {
                    keys.push(k);
                    keys.len() - 1
                })
            });
            inputs.push(SeqInput {
                tokens,
                ctx_before,
                block_table,
                adapter,
            });
        }
        let adapters = keys
            .iter()
            .map(|k| {
                self.adapters
                    .get(*k)
                    .ok_or_else(|| EngineError::AdapterNotLoaded((*k).to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let input = ForwardInput::build(&self.cache, &inputs, all_logits)?;
        let (model, backend, cache, comm) = (&self.model, &*self.backend, &mut self.cache, &*self.comm);
        if decode && comm.world_size() == 1 {
            backend.decode_step(input.tokens.len(), &mut || {
                model.forward(backend, cache, &input, &adapters, comm)
            })
        } else {
            model.forward(backend, cache, &input, &adapters, comm)
        }
    }

    /// Add sequences to `batch`: run their prompts and choose each one's first token.
    pub fn prefill(&mut self, batch: &mut Batch, new: Vec<NewSequence>) -> Result<Vec<Generation>> {
        for (i, s) in new.iter().enumerate() {
            if s.input_ids.is_empty() {
                return Err(EngineError::InvalidBatch(format!(
                    "sequence {} has an empty prompt",
                    s.id
                )));
            }
            if batch.seqs.iter().any(|b| b.id == s.id) || new[..i].iter().any(|o| o.id == s.id) {
                return Err(EngineError::InvalidBatch(format!(
                    "sequence id {} is already in the batch",
                    s.id
                )));
            }
        }
        let raw: Vec<RawSeq<'_>> = new
            .iter()
            .map(|s| {
                (
                    s.input_ids.as_slice(),
                    0,
                    s.block_table.as_slice(),
                    s.adapter.as_deref(),
                )
            })
            .collect();
        let all: Vec<bool> = new.iter().map(|s| s.prefill_logprobs).collect();
        let logits = self.forward_logits(&raw, &all, false)?;
        // Rows in order: each prompt's token rows (when asked for), then its last row.
        let mut samplers: Vec<Sampler> = new
            .iter()
            .map(|s| Sampler::new(s.params.clone(), &s.input_ids))
            .collect();
        let mut tasks = Vec::new();
        for (s, sampler) in new.iter().zip(samplers.iter_mut()) {
            if s.prefill_logprobs {
                tasks.extend(s.input_ids[1..].iter().map(|&id| SampleTask::Logprob(id)));
            }
            tasks.push(SampleTask::Choose(sampler));
        }
        let mut tasks: Vec<(usize, SampleTask<'_>)> = tasks.into_iter().enumerate().collect();
        let mut answers = self.backend.sample(&logits, &mut tasks)?.into_iter();
        drop(tasks);
        let missing = || EngineError::Backend("missing sampling result".into());
        let mut out = Vec::with_capacity(new.len());
        for (s, sampler) in new.into_iter().zip(samplers) {
            let mut prefill = None;
            if s.prefill_logprobs {
                let mut toks = vec![PromptToken {
                    id: s.input_ids[0],
                    logprob: None,
                }];
                for &id in &s.input_ids[1..] {
                    let Some(Sampled::Logprob(lp)) = answers.next() else {
                        return Err(missing());
                    };
                    toks.push(PromptToken { id, logprob: Some(lp) });
                }
                prefill = Some(toks);
            }
            let Some(Sampled::Choice(choice)) = answers.next() else {
                return Err(missing());
            };
            let mut tokens = s.input_ids;
            let cached = tokens.len();
            tokens.push(choice.token);
            out.push(Generation {
                id: s.id,
                choice,
                prefill,
            });
            batch.seqs.push(Sequence {
                id: s.id,
                tokens,
                cached,
                block_table: s.block_table,
                adapter: s.adapter,
                sampler,
            });
        }
        Ok(out)
    }

    /// Advance every sequence of `batch` by one token.
    pub fn decode(&mut self, batch: &mut Batch) -> Result<Vec<Generation>> {
        if batch.is_empty() {
            return Ok(vec![]);
        }
        let raw: Vec<RawSeq<'_>> = batch
            .seqs
            .iter()
            .map(|s| {
                (
                    &s.tokens[s.cached..],
                    s.cached,
                    s.block_table.as_slice(),
                    s.adapter.as_deref(),
                )
            })
            .collect();
        let logits = self.forward_logits(&raw, &[], true)?;
        let mut tasks: Vec<(usize, SampleTask<'_>)> = batch
            .seqs
            .iter_mut()
            .enumerate()
            .map(|(i, s)| (i, SampleTask::Choose(&mut s.sampler)))
            .collect();
        let answers = self.backend.sample(&logits, &mut tasks)?;
        drop(tasks);
        let mut out = Vec::with_capacity(batch.len());
        for (s, answer) in batch.seqs.iter_mut().zip(answers) {
            let Sampled::Choice(choice) = answer else {
                return Err(EngineError::Backend("missing sampling result".into()));
            };
            s.cached = s.tokens.len();
            s.tokens.push(choice.token);
            out.push(Generation {
                id: s.id,
                choice,
                prefill: None,
            });
        }
        Ok(out)
    }
}
