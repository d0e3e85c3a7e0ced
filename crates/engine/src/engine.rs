//! The engine: a model, its paged cache and its adapters, and the steps that advance a [`Batch`]. A
//! [`Engine::step`] runs one forward pass over a decode row of every running sequence and (chunks of)
//! the prompts of sequences still prefilling; [`Engine::prefill`] and [`Engine::decode`] are its two
//! pure forms. The caller owns block allocation and passes each sequence's block table (sized for its
//! whole life: prompt plus every token it may generate).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::Backend;
pub use crate::batch::{Batch, Generation, NewSequence, PromptToken, Sequence};
use crate::comm::{Communicator, SingleRank};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv_cache::KvCache;
use crate::lora::{AdapterLayout, DeviceAdapter, HostAdapter, PieceSink};
use crate::model::{ForwardInput, Model, SeqInput, WeightSource};
use crate::sampling::{SampleTask, Sampled};
use crate::weights::DType;
use crate::weights::Weights;

/// A raw sequence for [`Engine::logits_with_adapters`]: (new tokens, tokens already cached, block
/// table, adapter key or `None` for the base model).
pub type RawSeq<'a> = (&'a [u32], usize, &'a [u32], Option<&'a str>);

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
    /// Host time of the pure decode steps since the last report.
    decode_times: StepTimes,
    /// Host time of the steps that run prompt tokens (prefills and mixed steps) since the last report.
    prompt_times: StepTimes,
    /// The inputs of the decode step the backend prepared ahead ([`Backend::decode_prepare`]), if any.
    ahead: Option<AheadKey>,
    /// Logit rows the LM head computes at once outside a decode graph ([`HEAD_ROWS_A_PASS`]).
    head_rows: usize,
    /// The decode step the last step's sampling launched with the tokens it chose ([`Backend::sample_feeding`]),
    /// whose rows serve the next step's decode rows.
    inflight: Option<InFlight<B::Tensor>>,
    /// Whether a decode step whose backend launched nothing ahead computes the next one right after its
    /// sampling, on the host's schedule ([`Engine::set_feed_on_host`]).
    feed_on_host: bool,
    /// Steps launched ahead so far, by how they were used.
    fed_total: FeedCounts,
}

/// A decode step launched before its turn with the tokens the step before chose: its logits, and for each
/// sequence it ran (by [`Sequence::uid`]) its row and what the row was computed from.
struct InFlight<T> {
    logits: T,
    rows: HashMap<u64, FedRow>,
}

/// One sequence's row of an [`InFlight`] step.
struct FedRow {
    row: usize,
    token: u32,
    /// Tokens cached before it.
    ctx: usize,
    block_table: Vec<u32>,
    adapter: Option<String>,
}

impl<T> InFlight<T> {
    /// The row that computed `s`'s decode row of this step (work `w`): the same sequence, token, context and
    /// adapter, and a block table that starts with the one the row read.
    fn row_of(&self, s: &Sequence, w: &Work) -> Option<usize> {
        if w.prefill || w.len != 1 || s.cached + 1 != s.tokens.len() {
            return None;
        }
        let r = self.rows.get(&s.uid)?;
        (r.token == s.tokens[s.cached]
            && r.ctx == s.cached
            && s.block_table.starts_with(&r.block_table)
            && r.adapter == s.adapter)
            .then_some(r.row)
    }
}

/// The loaded adapters of `keys`, in order.
fn adapters_of<'a, B: Backend>(
    adapters: &'a HashMap<String, DeviceAdapter<B>>,
    keys: &[&str],
) -> Result<Vec<&'a DeviceAdapter<B>>> {
    keys.iter()
        .map(|k| {
            adapters
                .get(*k)
                .ok_or_else(|| EngineError::AdapterNotLoaded((*k).to_string()))
        })
        .collect()
}

/// Logit rows the LM head computes at once outside a decode graph. A prompt scored whole (every row's
/// log-probability) would otherwise hold `[rows, vocab]` logits at once: 4096 rows of a 128k vocabulary
/// are 2.1 GB in f32, memory that sizing the KV cache did not leave.
pub const HEAD_ROWS_A_PASS: usize = 512;

/// What a forward pass leaves for sampling: the logits of its logit rows, or (past [`HEAD_ROWS_A_PASS`]
/// rows) their final hidden rows, for the LM head to take a piece at a time.
enum Pass<T> {
    Logits(T),
    Hidden(T),
}

/// What a decode step prepared ahead was recorded with, token ids aside: the next step replays it only
/// if its own inputs are the same.
#[derive(Debug, PartialEq, Eq)]
struct AheadKey {
    positions: Vec<u32>,
    slots: Vec<u32>,
    /// (first row, rows, cached context, block table) per sequence.
    seqs: Vec<(usize, usize, usize, Vec<u32>)>,
    logit_rows: Vec<usize>,
    segments: Vec<crate::model::AdapterSegment>,
    /// The adapters' keys, in the segments' numbering.
    adapters: Vec<String>,
}

impl AheadKey {
    fn of(input: &ForwardInput<'_>, adapters: &[&str]) -> Self {
        Self {
            positions: input.positions.clone(),
            slots: input.slots.clone(),
            seqs: input
                .seqs
                .iter()
                .map(|s| (s.q_start, s.q_len, s.ctx_before, s.block_table.to_vec()))
                .collect(),
            logit_rows: input.logit_rows.clone(),
            segments: input.segments.clone(),
            adapters: adapters.iter().map(|k| (*k).to_string()).collect(),
        }
    }

    /// Whether `input` (with `adapters`) is what this key was recorded with, token ids aside.
    fn matches(&self, input: &ForwardInput<'_>, adapters: &[&str]) -> bool {
        self.positions == input.positions
            && self.slots == input.slots
            && self.logit_rows == input.logit_rows
            && self.segments == input.segments
            && self.adapters.len() == adapters.len()
            && self.adapters.iter().zip(adapters).all(|(a, b)| a == b)
            && self.seqs.len() == input.seqs.len()
            && self
                .seqs
                .iter()
                .zip(&input.seqs)
                .all(|(a, b)| (a.0, a.1, a.2) == (b.q_start, b.q_len, b.ctx_before) && a.3.as_slice() == b.block_table)
    }
}

/// Pure decode steps reported together in the log.
const DECODE_REPORT_STEPS: u32 = 256;
/// Steps with prompt tokens reported together in the log.
const PROMPT_REPORT_STEPS: u32 = 8;

/// Where the host's time goes in steps of one kind, summed over `steps` of them. After a step's tokens
/// come back the device is idle until the next step is launched. In a decode step (one graph launch),
/// `forward` (checks, the batch's inputs, the pass recorded, the launch) is time the device waits; in a
/// step with prompt tokens, run eagerly, the device starts on the first kernel and `forward` ends with the
/// last launch. `sample` covers sampling, waiting for the device and the tokens' copy to the host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepTimes {
    /// Steps counted.
    pub steps: u32,
    /// Rows (tokens run) over those steps.
    pub rows: u64,
    /// Up to the forward pass's launch.
    pub forward: Duration,
    /// Sampling, the device's work and the copy of the tokens.
    pub sample: Duration,
    /// The whole step, from the engine's call to its return (the above, the batch bookkeeping before
    /// the forward pass and the generations after it).
    pub total: Duration,
    /// The part of `forward` before anything is launched: the batch's inputs built and, for a step
    /// prepared ahead, checked against it. The rest is the record pass (when it was not prepared ahead),
    /// the metadata's copy and the launches.
    pub inputs: Duration,
    /// The longest `forward` among the steps.
    pub forward_max: Duration,
    /// Steps whose `forward` took over 1 ms.
    pub forward_over_1ms: u32,
    /// CPU time of the stepping thread during `forward` (`CLOCK_THREAD_CPUTIME_ID`, Linux; zero elsewhere):
    /// far below `forward` means the thread waited (for a lock, the driver, or a core).
    pub forward_cpu: Duration,
    /// Involuntary context switches of the stepping thread during `forward` (Linux): the thread was
    /// ready to run and a core went to another.
    pub forward_preempted: u64,
    /// Steps that launched the next decode step with the tokens they chose ([`Backend::sample_feeding`]).
    pub fed_launched: u32,
    /// Steps whose rows all came from the step launched ahead of them (no pass of their own).
    pub fed_whole: u32,
    /// Steps that took some rows from the step launched ahead (the batch had changed) and ran the rest.
    pub fed_part: u32,
    /// Steps launched ahead and not used at all (their device time lost).
    pub fed_dropped: u32,
    /// Steps whose prompt tokens waited for the next step, their decode rows all served by the step launched ahead.
    pub fed_deferred: u32,
}

/// What one step's `forward` was made of ([`StepTimes`]' fields of the same names).
struct ForwardDetail {
    inputs: Duration,
    cpu: Duration,
    preempted: u64,
    feeding: FeedCounts,
}

/// This thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`: to the nanosecond, where getrusage's times move in
/// scheduler ticks) and involuntary context switches (getrusage) so far (Linux; `None` elsewhere).
fn thread_usage() -> Option<(Duration, u64)> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: both calls write only the structs they are given.
        let mut t: libc::timespec = unsafe { std::mem::zeroed() };
        if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut t) } != 0 {
            return None;
        }
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &raw mut u) } != 0 {
            return None;
        }
        let cpu = Duration::new(
            u64::try_from(t.tv_sec).unwrap_or(0),
            u32::try_from(t.tv_nsec).unwrap_or(0),
        );
        Some((cpu, u64::try_from(u.ru_nivcsw).unwrap_or(0)))
    }
    #[cfg(not(target_os = "linux"))]
    None
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

    /// Reads and checks the adapter in `dir` ([`HostAdapter::load`]) and uploads it. On one rank, where
    /// the backend can ([`crate::backend::Backend::begin_file_upload`]), each piece of the weights file
    /// goes to the device as it is read, so the upload ends about when the read does; otherwise, or when
    /// that upload cannot serve the adapter, the adapter goes up after the read ([`Self::upload`]).
    /// The outer error is the read's or the check's; the inner result the upload's.
    pub fn load_and_upload(
        &self,
        dir: &Path,
        cfg: &ModelConfig,
        max_rank: usize,
    ) -> Result<(HostAdapter, Result<Uploaded<B>>)> {
        let streamed = (self.world_size == 1)
            .then(|| self.backend.begin_file_upload())
            .flatten();
        let host = HostAdapter::load_with(dir, cfg, max_rank, streamed.as_deref().map(|u| u as &dyn PieceSink))?;
        let read_end = Instant::now();
        if let Some(upload) = streamed {
            match DeviceAdapter::from_file_upload(&*self.backend, &host, upload) {
                Ok(device) => {
                    let uploaded = Uploaded {
                        device,
                        beside_read: true,
                        after_read: read_end.elapsed(),
                    };
                    return Ok((host, Ok(uploaded)));
                }
                Err(e) => tracing::debug!("uploading the adapter after its read: {e}"),
            }
        }
        let uploaded = self.upload(&host).map(|device| Uploaded {
            device,
            beside_read: false,
            after_read: read_end.elapsed(),
        });
        Ok((host, uploaded))
    }

    /// Loads the adapter in `dir` onto the device as its weights file is read, answering before the read:
    /// once the file's header is read and checked, the adapter is placed on the device with a gate, and
    /// the weights are read on a thread of their own, layer by layer in the order passes use them, each
    /// piece sent to the device as it comes. A forward pass that uses the adapter meanwhile waits, before
    /// each layer, for that layer's weights only ([`crate::model::Model::forward`]), so a prompt's pass runs
    /// beside the read rather than after it; at its end it waits for the whole read and the checks of the
    /// weights' values (NaN, infinities, and what `storage` cannot hold), and fails if they failed.
    /// One rank only, on a backend that streams uploads ([`Backend::begin_file_upload`]) and tensors of the
    /// backend's type; otherwise the adapter is loaded as [`AdapterUploader::load_and_upload`] loads it.
    pub fn load_streamed(&self, dir: &Path, cfg: &ModelConfig, max_rank: usize, storage: DType) -> StreamStart<B> {
        let layout = match AdapterLayout::read(dir, cfg, max_rank) {
            Ok(layout) => Arc::new(layout),
            Err(e) => return StreamStart::Loaded(Err(e)),
        };
        if self.world_size != 1 {
            return StreamStart::Loaded(self.load_and_upload(dir, cfg, max_rank));
        }
        let (first_tx, first_rx) = std::sync::mpsc::channel::<StreamStart<B>>();
        let (rest_tx, rest_rx) = std::sync::mpsc::channel();
        let me = self.clone();
        let (dir_owned, cfg_owned) = (dir.to_path_buf(), cfg.clone());
        let spawned = std::thread::Builder::new()
            .name("adapter-stream".into())
            .spawn(move || {
                let (dir, cfg) = (dir_owned.as_path(), &cfg_owned);
                let backend = Arc::clone(&me.backend);
                let upload = backend.begin_file_upload();
                let device = upload.as_deref().map(|u| {
                    u.start(layout.len);
                    DeviceAdapter::from_layout(&*backend, cfg.num_layers, &layout, u)
                });
                let (upload, device) = match (upload, device) {
                    (Some(upload), Some(Ok(device))) => (upload, device),
                    (upload, device) => {
                        if let Some(Err(e)) = device {
                            tracing::debug!("the adapter is loaded without streaming: {e}");
                        }
                        drop(upload);
                        let _ = first_tx.send(StreamStart::Loaded(me.load_and_upload(dir, cfg, max_rank)));
                        return;
                    }
                };
                let started = StreamStart::Streaming {
                    device,
                    rest: rest_rx,
                    layout: Arc::clone(&layout),
                };
                if first_tx.send(started).is_err() {
                    return; // Nobody took the adapter: the upload's drop ends its gate.
                }
                let host = layout
                    .read_weights(dir, cfg, max_rank, &*upload as &dyn PieceSink)
                    .and_then(|h| h.check_storage(storage).map(|()| h));
                // The gate's message reaches clients (the pass that used the adapter fails with it): without
                // the server's paths.
                let outcome = host
                    .as_ref()
                    .map(|_| ())
                    .map_err(|e| EngineError::Backend(crate::lora::strip_dir(&e.to_string(), dir)));
                // The gate keeps the first outcome (a stall may have failed it before the read ended): `rest`
                // gives the read's own, and its user reads the gate's with `AdapterGate::wait_end`.
                let _ = upload.end(outcome);
                let _ = rest_tx.send(host);
            });
        if let Err(e) = spawned {
            return StreamStart::Loaded(Err(EngineError::Backend(format!("starting an adapter's read: {e}"))));
        }
        first_rx
            .recv()
            .unwrap_or_else(|_| StreamStart::Loaded(Err(EngineError::Backend("the adapter's read stopped".into()))))
    }
}

/// The first answer of [`AdapterUploader::load_streamed`].
pub enum StreamStart<B: Backend> {
    /// The adapter on the device before its weights were read: they arrive behind its gate
    /// ([`crate::lora::AdapterGate`]), and `rest` gives the adapter as parsed (or the read's or the checks'
    /// error, which the gate then reports to the passes that use it) once the read has ended. The gate's
    /// outcome is the load's: it may have failed before the read ended (a stall), whatever `rest` says.
    Streaming {
        device: DeviceAdapter<B>,
        rest: std::sync::mpsc::Receiver<Result<HostAdapter>>,
        /// What its header says of it.
        layout: Arc<AdapterLayout>,
    },
    /// Not streamed (the backend cannot stream, or cannot place this adapter's tensors in place): what
    /// [`AdapterUploader::load_and_upload`] gave.
    Loaded(Result<(HostAdapter, Result<Uploaded<B>>)>),
}

/// An adapter uploaded by [`AdapterUploader::load_and_upload`].
#[derive(Debug)]
pub struct Uploaded<B: Backend> {
    /// The adapter on the device.
    pub device: DeviceAdapter<B>,
    /// Whether it went up while its file was read.
    pub beside_read: bool,
    /// How long the upload took past the read's end (the part of it not hidden by the read).
    pub after_read: Duration,
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
            decode_times: StepTimes::default(),
            prompt_times: StepTimes::default(),
            ahead: None,
            head_rows: HEAD_ROWS_A_PASS,
            inflight: None,
            feed_on_host: false,
            fed_total: FeedCounts::default(),
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
            // A step prepared ahead may point at the replaced weights, and one launched ahead used them.
            self.ahead = None;
            self.inflight = None;
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
            // No sequence left uses it, so no row of a step launched ahead that is still served does; that step
            // may still read it on the device, and is waited for here with the rest.
            self.ahead = None;
            self.backend.wait_idle()?;
        }
        Ok(self.adapters.remove(key).is_some())
    }

    /// Whether the adapter `key` is loaded.
    pub fn has_adapter(&self, key: &str) -> bool {
        self.adapters.contains_key(key)
    }

    /// The adapter loaded under `key`.
    pub fn adapter(&self, key: &str) -> Option<&DeviceAdapter<B>> {
        self.adapters.get(key)
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
        let mut host = Vec::new();
        match self.forward_logits(seqs, all_logits, false)?.0 {
            Pass::Logits(logits) => host = self.backend.to_f32(&logits)?,
            Pass::Hidden(normed) => {
                for lo in (0..self.backend.shape(&normed)[0]).step_by(self.head_rows) {
                    host.extend(self.backend.to_f32(&self.head_piece(&normed, lo)?)?);
                }
            }
        }
        Ok(host.chunks_exact(v).map(<[f32]>::to_vec).collect())
    }

    /// Sets the logit rows the LM head computes at once outside a decode graph (at least 1; the
    /// default is [`HEAD_ROWS_A_PASS`]); tests use few rows to run the pieces on a small model.
    pub fn set_head_rows_a_pass(&mut self, rows: usize) {
        self.head_rows = rows.max(1);
    }

    /// The logits of rows `lo..` (at most `head_rows` of them) of final hidden rows.
    fn head_piece(&self, normed: &B::Tensor, lo: usize) -> Result<B::Tensor> {
        let part: Vec<usize> = (lo..(lo + self.head_rows).min(self.backend.shape(normed)[0])).collect();
        let part = self.backend.gather_rows(normed, &part)?;
        self.model.head(&*self.backend, &part)
    }

    /// A forward pass over `seqs`, on the device: its logits `[rows, vocab_size]`, or past
    /// [`HEAD_ROWS_A_PASS`] rows its final hidden rows. A `decode` pass on one rank goes through
    /// [`Backend::decode_step`] (CUDA graphs), or replays the step prepared ahead when its inputs are these
    /// (see [`Engine::prepare_ahead`]). Also returns when its inputs were built and checked, before anything was
    /// launched.
    fn forward_logits(
        &mut self,
        seqs: &[RawSeq<'_>],
        all_logits: &[bool],
        decode: bool,
    ) -> Result<(Pass<B::Tensor>, Instant)> {
        // A step prepared ahead is used by this pass or never.
        let ahead = self.ahead.take();
        let graph = decode && self.comm.world_size() == 1;
        let (inputs, keys) = self.seq_inputs(seqs, graph);
        let adapters = adapters_of(&self.adapters, &keys)?;
        let input = ForwardInput::build(&self.cache, &inputs, all_logits)?;
        let prepared = graph && ahead.is_some_and(|k| k.matches(&input, &keys));
        let ready = Instant::now();
        if prepared && input.tokens.iter().all(|&t| (t as usize) < self.model.cfg.vocab_size) {
            if let Some(logits) = self.backend.decode_prepared(&input.tokens)? {
                return Ok((Pass::Logits(logits), ready));
            }
        }
        let (model, backend, cache, comm) = (&self.model, &*self.backend, &mut self.cache, &*self.comm);
        let pass = if graph {
            Pass::Logits(backend.decode_step(input.tokens.len(), &mut || {
                model
                    .forward(backend, cache, &input, &adapters, comm)
                    .and_then(|h| model.head(backend, &h))
            })?)
        } else {
            let normed = model.forward(backend, cache, &input, &adapters, comm)?;
            match input.logit_rows.len() {
                rows if rows > self.head_rows => Pass::Hidden(normed),
                _ => Pass::Logits(model.head(backend, &normed)?),
            }
        };
        Ok((pass, ready))
    }

    /// `tasks` (rows in ascending order) on the logits of `normed`'s rows, computed and sampled
    /// `head_rows` rows at a time.
    fn sample_in_pieces(&self, normed: &B::Tensor, tasks: Vec<(usize, SampleTask<'_>)>) -> Result<Vec<Sampled>> {
        let rows = self.backend.shape(normed)[0];
        let mut answers = Vec::with_capacity(tasks.len());
        let mut tasks = tasks.into_iter().peekable();
        for lo in (0..rows).step_by(self.head_rows) {
            let hi = (lo + self.head_rows).min(rows);
            let mut piece = Vec::new();
            while let Some((row, task)) = tasks.next_if(|(row, _)| *row < hi) {
                let row = row
                    .checked_sub(lo)
                    .ok_or_else(|| EngineError::Backend("sampling rows out of order".into()))?;
                piece.push((row, task));
            }
            if piece.is_empty() {
                continue;
            }
            let logits = self.head_piece(normed, lo)?;
            answers.extend(self.backend.sample(&logits, &mut piece)?);
        }
        if tasks.next().is_some() {
            return Err(EngineError::Backend("a sampling row past the pass's rows".into()));
        }
        Ok(answers)
    }

    /// Has the backend prepare the decode step after the one just launched ([`Backend::decode_prepare`])
    /// while that one runs: `seqs` as the next step will have them (each decoding sequence one token on,
    /// its last token standing in for the one being chosen). Kept in `self.ahead` when the backend keeps
    /// it; nothing is reported if it fails (the step itself, run normally, would report it).
    fn prepare_ahead(&mut self, seqs: &[RawSeq<'_>]) {
        if self.comm.world_size() != 1 || seqs.is_empty() {
            return;
        }
        let (inputs, keys) = self.seq_inputs(seqs, true);
        let Ok(adapters) = adapters_of(&self.adapters, &keys) else {
            return;
        };
        let Ok(input) = ForwardInput::build(&self.cache, &inputs, &[]) else {
            return;
        };
        let (model, backend, cache, comm) = (&self.model, &*self.backend, &mut self.cache, &*self.comm);
        match backend.decode_prepare(input.tokens.len(), &mut || {
            model
                .forward(backend, cache, &input, &adapters, comm)
                .and_then(|h| model.head(backend, &h))
        }) {
            Ok(true) => self.ahead = Some(AheadKey::of(&input, &keys)),
            Ok(false) => {}
            Err(e) => tracing::debug!("preparing the next decode step: {e}"),
        }
    }

    /// The model inputs of `seqs`, with padding rows up to the backend's decode row count when `pad`, and
    /// the distinct adapter keys in first-use order (sequences refer to them by index).
    fn seq_inputs<'s>(&self, seqs: &[RawSeq<'s>], pad: bool) -> (Vec<SeqInput<'s>>, Vec<&'s str>) {
        let mut keys: Vec<&str> = Vec::new();
        // Each key's index: a search of `keys` for each row would be quadratic in a step's adapters.
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut inputs = Vec::with_capacity(seqs.len());
        for &(tokens, ctx_before, block_table, key) in seqs {
            let adapter = key.map(|k| {
                *index.entry(k).or_insert_with(|| {
                    keys.push(k);
                    keys.len() - 1
                })
            });
            inputs.push(SeqInput {
                tokens,
                ctx_before,
                block_table,
                adapter,
                pad: false,
            });
        }
        if pad {
            // Padding rows up to the backend's row count for the step (a CUDA graph's): a batch whose size
            // wanders (requests finishing and joining) replays a few graphs instead of capturing one per
            // size. `all_logits` stays as given: sequences past its end (the padding) get their last row
            // only.
            let rows: usize = inputs.iter().map(|s| s.tokens.len()).sum();
            let pad = self.backend.decode_rows(rows).saturating_sub(rows);
            inputs.extend((0..pad).map(|_| SeqInput {
                tokens: &[0],
                ctx_before: 0,
                block_table: &[0],
                adapter: None,
                pad: true,
            }));
        }
        (inputs, keys)
    }

    /// Add sequences to `batch`: run their whole prompts and choose each one's first token. A
    /// [`Engine::step`] without decode rows and without a prompt budget, so a sequence of `batch` still
    /// prefilling (from an earlier chunked step) also runs the rest of its prompt and gets its first token.
    /// Generations come in batch order (the new sequences in the order given).
    pub fn prefill(&mut self, batch: &mut Batch, new: Vec<NewSequence>) -> Result<Vec<Generation>> {
        self.step(batch, new, StepOptions::default())
    }

    /// Advance every sequence of `batch` by one token. Sequences still prefilling are skipped: they get
    /// no row and no generation (only a [`Engine::step`] runs their prompts). On one rank the pass goes
    /// through [`Backend::decode_step`] (CUDA graphs).
    pub fn decode(&mut self, batch: &mut Batch) -> Result<Vec<Generation>> {
        self.step(
            batch,
            Vec::new(),
            StepOptions {
                decode: true,
                max_prompt_tokens: Some(0),
            },
        )
    }

    /// Whether [`Engine::decode`] can advance `batch` now without failing for lack of room: some sequence
    /// decodes, and each that does has a cache slot for the token it would write (its block table covers
    /// every token it holds). A shard checks this before it runs a step ahead of the router's call.
    pub fn can_decode(&self, batch: &Batch) -> bool {
        let block = self.cache.block_size;
        let mut decoding = batch.seqs.iter().filter(|s| !s.is_prefilling()).peekable();
        decoding.peek().is_some() && decoding.all(|s| s.tokens.len() <= s.block_table.len() * block)
    }

    /// One forward pass over `batch` after adding `new` (which join prefilling): a decode row for every
    /// sequence whose prompt is cached (when `opts.decode`), and the next prompt tokens of the sequences
    /// still prefilling, oldest first, at most `opts.max_prompt_tokens` of them in all (the last sequence
    /// given any may get only part of its prompt: a chunk). A sequence whose prompt is now fully cached
    /// gets its first token as in a whole-prompt prefill; one that is not is not sampled and continues in
    /// a later step. Where the step launched ahead by the last one's sampling ([`Backend::sample_feeding`])
    /// computed every decode row, the step runs no prompt token: they wait for the next step, which runs them in
    /// the decode rows' pass. Returns a generation per sequence that got a token, in batch order. A step that
    /// fails adds none of `new` to `batch`.
    pub fn step(&mut self, batch: &mut Batch, new: Vec<NewSequence>, opts: StepOptions) -> Result<Vec<Generation>> {
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
        let before = batch.seqs.len();
        batch.seqs.extend(new.into_iter().map(Sequence::new));
        let out = self.run_step(batch, opts);
        if out.is_err() {
            batch.seqs.truncate(before);
        }
        out
    }

    /// [`Engine::step`] once the new sequences are in `batch`.
    fn run_step(&mut self, batch: &mut Batch, opts: StepOptions) -> Result<Vec<Generation>> {
        let entered = Instant::now();
        self.backend.step_started();
        // What each sequence runs this step: how many new tokens (0 = nothing), and whether it prefills.
        let mut budget = opts.max_prompt_tokens.unwrap_or(usize::MAX);
        let mut plan: Vec<Work> = batch
            .seqs
            .iter()
            .map(|s| {
                if s.is_prefilling() {
                    let len = (s.prompt_len - s.cached).min(budget);
                    budget -= len;
                    Work { len, prefill: true }
                } else {
                    let len = if opts.decode { s.tokens.len() - s.cached } else { 0 };
                    Work { len, prefill: false }
                }
            })
            .collect();
        if plan.iter().all(|w| w.len == 0) {
            return Ok(vec![]);
        }
        // The step the last one's sampling launched serves the decode rows it computed (all of them, unless the
        // batch changed); a step without decode rows leaves it for the next.
        let inflight = if plan.iter().any(|w| !w.prefill && w.len > 0) {
            self.inflight.take()
        } else {
            None
        };
        // Where it serves every decode row, prompt tokens wait for the next step: beside it they would run in a
        // pass of their own, reading the weights a second time while the running streams wait for it (bench/NOTES.md
        // session 48: 13.4 ms gaps where a short prompt joined 32 streams, against 8.6-10.8 ms for a mixed step
        // without steps launched ahead). The next step launches nothing ahead of it, so it runs them in the
        // decode rows' pass.
        let deferred = inflight.as_ref().is_some_and(|f| {
            plan.iter().any(|w| w.prefill && w.len > 0)
                && batch
                    .seqs
                    .iter()
                    .zip(&plan)
                    .filter(|(_, w)| !w.prefill && w.len > 0)
                    .all(|(s, w)| f.row_of(s, w).is_some())
        });
        if deferred {
            plan.iter_mut().filter(|w| w.prefill).for_each(|w| w.len = 0);
        }
        let active = || batch.seqs.iter().zip(&plan).filter(|(_, w)| w.len > 0);
        let mut fed: Vec<Option<usize>> = active()
            .map(|(s, w)| inflight.as_ref().and_then(|f| f.row_of(s, w)))
            .collect();
        let pure_decode = plan.iter().all(|w| !w.prefill || w.len == 0);
        // A pure decode step prepares the next and launches it from its sampling; one whose prompts wait does not, so
        // that the next step runs them.
        let launch_next = pure_decode && !deferred;
        if pure_decode && fed.iter().any(Option::is_none) {
            // Decode rows it lacks (sequences that joined through a step without decode rows) would run eagerly and
            // unpadded beside it, and launch nothing ahead: the whole step runs as usual instead (one pass over the
            // weights either way; a graph, the same rows as a step without feeding, and the next launched ahead).
            fed.iter_mut().for_each(|f| *f = None);
        }
        let fed_rows = fed.iter().flatten().count();
        let mut feeding = FeedCounts {
            deferred: u64::from(deferred),
            ..FeedCounts::default()
        };
        if let Some(f) = &inflight {
            if fed_rows == f.rows.len() && fed_rows == fed.len() {
                feeding.whole = 1;
            } else if fed_rows > 0 {
                feeding.part = 1;
            } else {
                feeding.dropped = 1;
            }
        }
        let inflight = inflight.filter(|_| fed_rows > 0);
        // The rest run in this step's pass.
        let in_pass = || active().zip(&fed).filter(|(_, f)| f.is_none()).map(|(sw, _)| sw);
        let raw: Vec<RawSeq<'_>> = in_pass()
            .map(|(s, w)| {
                (
                    &s.tokens[s.cached..s.cached + w.len],
                    s.cached,
                    s.block_table.as_slice(),
                    s.adapter.as_deref(),
                )
            })
            .collect();
        // Every row of a prompt chunk when its tokens' logprobs are asked for, else the last row only.
        let all: Vec<bool> = in_pass()
            .map(|(s, w)| w.prefill && s.prompt_logprobs.is_some())
            .collect();
        let rows: usize = plan.iter().map(|w| w.len).sum();
        let usage = thread_usage();
        let started = Instant::now();
        let (pass, ready) = if raw.is_empty() {
            (None, started)
        } else {
            // Beside rows of the step launched ahead the pass runs eagerly: a graph's replay would overwrite the
            // memory their logits are in before they are sampled.
            let (pass, ready) = self.forward_logits(&raw, &all, pure_decode && inflight.is_none())?;
            (Some(pass), ready)
        };
        let launched = Instant::now();
        let inputs = ready - started;
        let (cpu, preempted) = usage
            .zip(thread_usage())
            .map_or((Duration::ZERO, 0), |((c0, s0), (c1, s1))| {
                (c1.saturating_sub(c0), s1.saturating_sub(s0))
            });
        drop(raw);
        if launch_next {
            // The next step as it will be if the batch stays as it is: prepared while this one runs.
            let next: Vec<RawSeq<'_>> = active()
                .map(|(s, w)| {
                    (
                        &s.tokens[s.tokens.len() - 1..],
                        s.cached + w.len,
                        s.block_table.as_slice(),
                        s.adapter.as_deref(),
                    )
                })
                .collect();
            self.prepare_ahead(&next);
        }

        // Tasks on this step's pass, and on the step launched ahead (its rows' numbers).
        let mut tasks: Vec<(usize, SampleTask<'_>)> = Vec::new();
        let mut fed_tasks: Vec<(usize, SampleTask<'_>)> = Vec::new();
        let mut row = 0;
        for ((s, w), f) in batch.seqs.iter_mut().zip(&plan).filter(|(_, w)| w.len > 0).zip(&fed) {
            if let Some(r) = f {
                fed_tasks.push((*r, SampleTask::Choose(&mut s.sampler)));
                continue;
            }
            let ends_prompt = s.cached + w.len == s.prompt_len;
            if w.prefill && s.prompt_logprobs.is_some() {
                // Row j predicts token cached + j + 1: a prompt token's logprob, or past the prompt's end
                // the first generated token.
                for j in 0..w.len {
                    let next = s.cached + j + 1;
                    if next < s.prompt_len {
                        tasks.push((
                            row + j,
                            SampleTask::Logprob {
                                token: s.tokens[next],
                                top_n: s.prompt_top_n,
                            },
                        ));
                    }
                }
                row += w.len;
            } else {
                row += 1;
            }
            if !w.prefill || ends_prompt {
                tasks.push((row - 1, SampleTask::Choose(&mut s.sampler)));
            }
        }
        // The step prepared ahead is launched by the sampling that chooses all of its tokens: in a pure decode
        // step, one task per sequence in the batch's order, all on one of the two logits. Its sequence k's token
        // row: its logit row (a one-token row each; rows are grouped by adapter, logit rows follow the sequences).
        let slots: Option<Vec<u32>> = match &self.ahead {
            Some(a) if launch_next && a.logit_rows.len() >= tasks.len() + fed_tasks.len() => a.logit_rows
                [..tasks.len() + fed_tasks.len()]
                .iter()
                .map(|&r| u32::try_from(r).ok())
                .collect(),
            _ => None,
        };
        let feed_fed = slots.as_deref().filter(|_| tasks.is_empty());
        let feed_pass = slots.as_deref().filter(|_| fed_tasks.is_empty());
        let mut next_step = None;
        let fed_answers = match &inflight {
            Some(f) if !fed_tasks.is_empty() => {
                let (answers, next) = self.backend.sample_feeding(&f.logits, &mut fed_tasks, feed_fed)?;
                next_step = next;
                answers
            }
            _ => Vec::new(),
        };
        drop(fed_tasks);
        let answers = match pass {
            Some(Pass::Logits(logits)) => {
                let (answers, next) = self.backend.sample_feeding(&logits, &mut tasks, feed_pass)?;
                next_step = next_step.or(next);
                answers
            }
            Some(Pass::Hidden(normed)) => self.sample_in_pieces(&normed, tasks)?,
            None => Vec::new(),
        };
        drop(inflight);
        if next_step.is_some() {
            // Launched: its inputs are what `ahead` was recorded with, its tokens those just chosen.
            self.ahead = None;
        }
        let (forward, sample) = (launched - started, launched.elapsed());

        let missing = || EngineError::Backend("missing sampling result".into());
        let (mut answers, mut fed_answers) = (answers.into_iter(), fed_answers.into_iter());
        let mut out = Vec::new();
        for ((s, w), f) in batch.seqs.iter_mut().zip(&plan).filter(|(_, w)| w.len > 0).zip(&fed) {
            let ends_prompt = s.cached + w.len == s.prompt_len;
            if let (true, Some(logprobs)) = (w.prefill, s.prompt_logprobs.as_mut()) {
                for next in s.cached + 1..(s.cached + w.len + 1).min(s.prompt_len) {
                    let Some(Sampled::Logprob { logprob, top }) = answers.next() else {
                        return Err(missing());
                    };
                    logprobs.push(PromptToken {
                        id: s.tokens[next],
                        logprob: Some(logprob),
                        top,
                    });
                }
            }
            if w.prefill && !ends_prompt {
                s.cached += w.len;
                continue;
            }
            let answer = if f.is_some() {
                fed_answers.next()
            } else {
                answers.next()
            };
            let Some(Sampled::Choice(choice)) = answer else {
                return Err(missing());
            };
            s.cached += w.len;
            s.tokens.push(choice.token);
            out.push(Generation {
                id: s.id,
                choice,
                prefill: if w.prefill { s.prompt_logprobs.take() } else { None },
            });
        }
        if launch_next {
            let logits = match next_step {
                Some(l) => Some(l),
                // Computed now, as a backend would have launched it (tests of the bookkeeping on the CPU).
                None if self.feed_on_host => self.next_on_host(batch, &plan),
                None => None,
            };
            if let Some(logits) = logits {
                feeding.launched = 1;
                let rows = active_after(batch, &plan)
                    .enumerate()
                    .map(|(row, s)| {
                        let fed = FedRow {
                            row,
                            token: s.tokens[s.tokens.len() - 1],
                            ctx: s.cached,
                            block_table: s.block_table.clone(),
                            adapter: s.adapter.clone(),
                        };
                        (s.uid, fed)
                    })
                    .collect();
                self.inflight = Some(InFlight { logits, rows });
            }
        }
        self.count_step(
            pure_decode,
            rows,
            [forward, sample, entered.elapsed()],
            ForwardDetail {
                inputs,
                cpu,
                preempted,
                feeding,
            },
        );
        Ok(out)
    }

    /// The next decode step's logits, computed now from the tokens just chosen (the host's stand-in for a
    /// backend's launch ahead, [`Engine::set_feed_on_host`]); `None` where the step could not run (it then runs in
    /// its turn and reports why).
    fn next_on_host(&mut self, batch: &Batch, plan: &[Work]) -> Option<B::Tensor> {
        let block = self.cache.block_size;
        let next: Vec<RawSeq<'_>> = active_after(batch, plan)
            .map(|s| {
                (
                    &s.tokens[s.tokens.len() - 1..],
                    s.cached,
                    s.block_table.as_slice(),
                    s.adapter.as_deref(),
                )
            })
            .collect();
        if !active_after(batch, plan).all(|s| s.tokens.len() <= s.block_table.len() * block) {
            return None;
        }
        match self.forward_logits(&next, &[], true) {
            Ok((Pass::Logits(logits), _)) => Some(logits),
            _ => None,
        }
    }

    /// Forgets the step launched ahead and the one recorded ahead (their batch is gone: the shard's ClearCache).
    pub fn forget_steps_ahead(&mut self) {
        self.inflight = None;
        self.ahead = None;
    }

    /// Whether a pure decode step whose backend launched nothing ahead computes the next step right after its
    /// sampling, from the tokens it chose (default off): what a backend that launches it on the device does
    /// ([`Backend::sample_feeding`]), on the host's schedule, so that the CPU backend's tests cover the
    /// bookkeeping of a step launched ahead (which rows serve the next step, which run again).
    pub fn set_feed_on_host(&mut self, on: bool) {
        self.feed_on_host = on;
        if !on {
            self.inflight = None;
        }
    }
}

/// The sequences of `batch` that `plan` gave work, as they are after the step.
fn active_after<'b>(batch: &'b Batch, plan: &'b [Work]) -> impl Iterator<Item = &'b Sequence> + 'b {
    batch.seqs.iter().zip(plan).filter(|(_, w)| w.len > 0).map(|(s, _)| s)
}

/// Steps launched ahead ([`Backend::sample_feeding`], [`Engine::set_feed_on_host`]), counted by how they were used
/// ([`Engine::feed_counts`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FeedCounts {
    /// Steps launched by the sampling of the step before them.
    pub launched: u64,
    /// ... that served every row of their step (which then ran no pass of its own).
    pub whole: u64,
    /// ... that served some rows (the batch had changed: sequences left or joined); the step ran the rest.
    pub part: u64,
    /// ... that served none (their device time was lost).
    pub dropped: u64,
    /// Steps whose prompt tokens waited for the next step because a step launched ahead served all their decode
    /// rows (see [`Engine::step`]).
    pub deferred: u64,
}

impl FeedCounts {
    fn add(&mut self, o: FeedCounts) {
        self.launched += o.launched;
        self.whole += o.whole;
        self.part += o.part;
        self.dropped += o.dropped;
        self.deferred += o.deferred;
    }
}

impl<B: Backend> Engine<B> {
    /// Host time of the pure decode steps since the last report (every 256 steps, at info level:
    /// "decode steps: host time").
    pub fn decode_times(&self) -> StepTimes {
        self.decode_times
    }

    /// Steps launched ahead of their turn so far, by how they were used.
    pub fn feed_counts(&self) -> FeedCounts {
        self.fed_total
    }

    /// Host time of the steps with prompt tokens since the last report (every 8 steps: "prompt steps: host
    /// time").
    pub fn prompt_times(&self) -> StepTimes {
        self.prompt_times
    }

    fn count_step(
        &mut self,
        decode: bool,
        rows: usize,
        [forward, sample, total]: [Duration; 3],
        detail: ForwardDetail,
    ) {
        let (t, every, what) = if decode {
            (&mut self.decode_times, DECODE_REPORT_STEPS, "decode")
        } else {
            (&mut self.prompt_times, PROMPT_REPORT_STEPS, "prompt")
        };
        t.steps += 1;
        t.rows += rows as u64;
        t.forward += forward;
        t.sample += sample;
        t.total += total;
        t.inputs += detail.inputs;
        t.forward_max = t.forward_max.max(forward);
        t.forward_over_1ms += u32::from(forward > Duration::from_millis(1));
        t.forward_cpu += detail.cpu;
        t.forward_preempted += detail.preempted;
        self.fed_total.add(detail.feeding);
        let f = detail.feeding;
        let one = |n: u64| u32::from(n > 0);
        t.fed_launched += one(f.launched);
        t.fed_whole += one(f.whole);
        t.fed_part += one(f.part);
        t.fed_dropped += one(f.dropped);
        t.fed_deferred += one(f.deferred);
        if t.steps >= every {
            let per = |d: Duration| d.as_secs_f64() * 1e6 / f64::from(t.steps);
            #[allow(clippy::cast_precision_loss)]
            let rows = t.rows as f64 / f64::from(t.steps);
            tracing::info!(
                steps = t.steps,
                rows = format!("{rows:.1}"),
                forward_us = format!("{:.0}", per(t.forward)),
                sample_us = format!("{:.0}", per(t.sample)),
                total_us = format!("{:.0}", per(t.total)),
                inputs_us = format!("{:.0}", per(t.inputs)),
                forward_cpu_us = format!("{:.0}", per(t.forward_cpu)),
                forward_max_us = format!("{:.0}", t.forward_max.as_secs_f64() * 1e6),
                forward_over_1ms = t.forward_over_1ms,
                preempted = t.forward_preempted,
                fed_launched = t.fed_launched,
                fed_whole = t.fed_whole,
                fed_part = t.fed_part,
                fed_dropped = t.fed_dropped,
                fed_deferred = t.fed_deferred,
                "{what} steps: host time"
            );
            *t = StepTimes::default();
        }
    }
}

/// What [`Engine::step`] runs besides the prompts of new sequences.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepOptions {
    /// Also advance every sequence whose prompt is cached by one token (decode rows).
    pub decode: bool,
    /// Most prompt tokens run in the step, over all prefilling sequences; `None` = whole prompts.
    pub max_prompt_tokens: Option<usize>,
}

/// One sequence's share of a step.
struct Work {
    /// New tokens it runs (0: none this step).
    len: usize,
    /// Prompt tokens (else a decode row).
    prefill: bool,
}

#[cfg(test)]
mod tests {
    use super::AheadKey;
    use crate::backend::AttnSeq;
    use crate::model::{AdapterSegment, ForwardInput};

    fn input<'a>(tokens: &[u32], ctx: &[usize], tables: &'a [Vec<u32>], adapter_rows: usize) -> ForwardInput<'a> {
        ForwardInput {
            tokens: tokens.to_vec(),
            positions: ctx.iter().map(|&c| c as u32).collect(),
            slots: ctx
                .iter()
                .zip(tables)
                .map(|(&c, t)| t[c / 16] * 16 + (c % 16) as u32)
                .collect(),
            seqs: ctx
                .iter()
                .zip(tables)
                .enumerate()
                .map(|(i, (&c, t))| AttnSeq {
                    q_start: i,
                    q_len: 1,
                    ctx_before: c,
                    block_table: t,
                })
                .collect(),
            logit_rows: (0..tokens.len()).collect(),
            segments: (adapter_rows > 0)
                .then_some(AdapterSegment {
                    start: 0,
                    len: adapter_rows,
                    adapter: 0,
                })
                .into_iter()
                .collect(),
        }
    }

    /// A step prepared ahead replays only for the same inputs; its token ids are free.
    #[test]
    fn ahead_key_ignores_tokens_and_nothing_else() {
        let tables = vec![vec![3, 7], vec![5, 9]];
        let key = AheadKey::of(&input(&[11, 12], &[20, 17], &tables, 1), &["a"]);
        assert!(
            key.matches(&input(&[40, 41], &[20, 17], &tables, 1), &["a"]),
            "other token ids"
        );
        assert!(
            !key.matches(&input(&[11, 12], &[21, 17], &tables, 1), &["a"]),
            "a position"
        );
        // A block appended: the same slots, another table (the attention metadata differs).
        let grown = vec![vec![3, 7], vec![5, 9, 12]];
        assert!(
            !key.matches(&input(&[11, 12], &[20, 17], &grown, 1), &["a"]),
            "a block table"
        );
        assert!(
            !key.matches(&input(&[11, 12], &[20, 17], &tables, 2), &["a"]),
            "adapter rows"
        );
        assert!(
            !key.matches(&input(&[11, 12], &[20, 17], &tables, 1), &["b"]),
            "another adapter"
        );
        assert!(
            !key.matches(&input(&[11], &[20], &tables[..1], 1), &["a"]),
            "fewer sequences"
        );
    }
}
