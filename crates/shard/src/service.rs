//! The internal gRPC service around one engine. The engine is single-owner state: calls take a mutex
//! and run the forward pass on a blocking thread so the async runtime stays responsive. Loading an
//! adapter parses and uploads it outside that mutex (an [`AdapterUploader`]) and hands the result to the
//! next call that takes it ([`Slots`]), so decoding streams do not wait for an upload, nor a load for a
//! step.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lorax_engine::engine::{AdapterUploader, StreamStart};
use lorax_engine::lora::{AdapterLayout, DeviceAdapter, HostAdapter};
use lorax_engine::weights::DType;
use lorax_engine::{
    Backend, Batch, CacheConfig, Engine, EngineError, Generation, ModelConfig, NewSequence, SamplingParams, StepOptions,
};
use lorax_proto::shard::v1 as pb;
use pb::shard_service_server::ShardService;
use tonic::{Request, Response, Status};

use crate::adapters::{self, AdapterSettings, HostTier, Located};

/// What a shard is started with.
pub struct ShardConfig {
    pub model_dir: PathBuf,
    pub model_id: String,
    pub rank: u32,
    pub world_size: u32,
    pub num_blocks: u32,
    pub block_size: u32,
    pub urls: Vec<String>,
    pub adapters: AdapterSettings,
    /// Longest a hub download may take before its requests fail (the hub may be slow or hang).
    pub download_timeout: Duration,
    /// The backend's storage type (F32 on the CPU backend), reported in Info by its name.
    pub dtype: DType,
    /// The tensor-parallel group (a single rank when world_size is 1).
    pub comm: std::sync::Arc<dyn lorax_engine::comm::Communicator>,
    /// Checkpoint or dummy weights.
    pub load_format: lorax_engine::LoadFormat,
}

struct State<B: Backend> {
    engine: Engine<B>,
    batch: Batch,
    /// A decode step run ahead of the router's call (`DecodeRequest.run_ahead`) and not yet handed out:
    /// its generations and engine time, or its error. The next Decode answers with it, a Prefill puts its
    /// generations first, FilterBatch drops those of the sequences it removes.
    ahead: Option<StepResult>,
    /// The typical decode step, for logging slow ones.
    watch: crate::slow::StepWatch,
}

/// The adapters' device slots, kept apart from the engine state, whose lock a step holds (a step run
/// ahead too): loads claim a slot and hand over their upload without waiting for a step to end.
struct Slots<B: Backend> {
    /// Adapters in the engine or in `ready`.
    loaded: HashSet<String>,
    /// Adapter loads in flight (parsed or uploaded outside the lock), by key: a generation (an offload
    /// removes the entry, so a load of an older generation is cancelled when it comes to insert) and the
    /// number of loads. Each key holds a device slot from its first load's start.
    pending: HashMap<String, (u64, usize)>,
    generation: u64,
    /// Uploaded adapters not yet in the engine: the next call that takes the engine state inserts them
    /// before anything else, so a Prefill that names one finds it.
    ready: Vec<(String, DeviceAdapter<B>)>,
}

impl<B: Backend> Default for Slots<B> {
    fn default() -> Self {
        Self {
            loaded: HashSet::new(),
            pending: HashMap::new(),
            generation: 0,
            ready: Vec::new(),
        }
    }
}

/// A step's generations and its engine time in nanoseconds, or why it failed.
type StepResult = Result<(Vec<Generation>, u128), Status>;

/// Keeps only the `keep` sequences in the batch and in the step run ahead.
fn filter_state<B: Backend>(s: &mut State<B>, keep: &[u64]) {
    s.batch.filter(keep);
    if let Some(Ok((gens, _))) = s.ahead.as_mut() {
        gens.retain(|g| keep.contains(&g.id));
    }
}

/// Applies a FilterBatch left in `deferred` while a step held the state.
fn apply_deferred<B: Backend>(s: &mut State<B>, deferred: &Mutex<Option<Vec<u64>>>) {
    let keep = deferred.lock().map_or(None, |mut d| d.take());
    if let Some(keep) = keep {
        filter_state(s, &keep);
    }
}

/// Inserts the uploads waiting in `slots` into the engine (the state's lock is held; it is always taken
/// before the slots' lock).
fn insert_ready<B: Backend>(s: &mut State<B>, slots: &Mutex<Slots<B>>) {
    if let Ok(mut slots) = slots.lock() {
        insert_from(s, &mut slots);
    }
}

/// Inserts the uploads waiting in `slots` (locked by the caller) into the engine.
fn insert_from<B: Backend>(s: &mut State<B>, slots: &mut Slots<B>) {
    for (key, device) in std::mem::take(&mut slots.ready) {
        s.engine.insert_adapter(&key, device);
    }
}

/// The engine state for a call (blocking), with any deferred FilterBatch applied and the uploaded adapters
/// inserted first.
fn lock_state<'a, B: Backend>(
    state: &'a Mutex<State<B>>,
    deferred: &Mutex<Option<Vec<u64>>>,
    slots: &Mutex<Slots<B>>,
) -> Result<std::sync::MutexGuard<'a, State<B>>, Status> {
    let mut guard = state.lock().map_err(|_| poisoned())?;
    apply_deferred(&mut guard, deferred);
    insert_ready(&mut guard, slots);
    Ok(guard)
}

/// One decode step of `s`'s batch (`ahead` of the router's call or not); a step much slower than the typical one is
/// logged with how it ran (`slow.rs`).
fn decode_now<B: Backend>(s: &mut State<B>, ahead: bool) -> StepResult {
    let before = s.engine.backend.step_counts();
    let rows = s.batch.len();
    let t = Instant::now();
    let gens = s.engine.decode(&mut s.batch).map_err(status)?;
    let took = t.elapsed();
    if let Some(slow) = s.watch.observe(rows, took, Instant::now()) {
        crate::slow::log(&slow, rows, ahead, &before, &s.engine.backend.step_counts());
    }
    Ok((gens, took.as_nanos()))
}

/// A load's claim on its pending entry; released (the count decremented) when dropped unless consumed by
/// the insertion, so a load that fails or is cancelled never keeps its slot.
struct Pending<B: Backend> {
    slots: Arc<Mutex<Slots<B>>>,
    key: String,
    generation: u64,
    armed: bool,
}

impl<B: Backend> Drop for Pending<B> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Ok(mut s) = self.slots.lock() {
            release_pending(&mut s.pending, &self.key, self.generation);
        }
    }
}

/// One load of `key` at `generation` is over: decrement its count, remove the entry at zero. A different
/// generation (the entry was cancelled and maybe started again) is left alone.
fn release_pending(pending: &mut HashMap<String, (u64, usize)>, key: &str, generation: u64) -> bool {
    match pending.get_mut(key) {
        Some((g, n)) if *g == generation => {
            *n -= 1;
            if *n == 0 {
                pending.remove(key);
            }
            true
        }
        _ => false,
    }
}

/// A parse for the host tier ([`ShardServer::parse_into_host_tier`]).
struct Parsed<B: Backend> {
    host: Arc<lorax_engine::lora::HostAdapter>,
    /// Milliseconds of the parse (with an upload beside the read, to the upload's end); None when the host
    /// tier's parse was taken.
    parse_ms: Option<u64>,
    /// With an upload: the device adapter, the milliseconds its upload took after the parse, and whether
    /// it went up beside the read; or the upload's error.
    device: Option<Result<UploadDone<B>, EngineError>>,
}

/// An uploaded adapter, the milliseconds its upload took after the parse, and whether it went up beside
/// the read.
type UploadDone<B> = (DeviceAdapter<B>, f64, bool);

/// What [`ShardServer::parse_or_stream`] gives.
enum Outcome<B: Backend> {
    Parsed(Parsed<B>),
    Streaming(StreamParts<B>),
}

/// A streamed load under way ([`AdapterUploader::load_streamed`]).
struct StreamParts<B: Backend> {
    /// On the device, its weights arriving behind its gate.
    device: DeviceAdapter<B>,
    /// The parse, or the read's or the checks' error, once the read ends.
    rest: std::sync::mpsc::Receiver<lorax_engine::Result<HostAdapter>>,
    layout: Arc<AdapterLayout>,
    located: Located,
    /// Milliseconds to the device adapter (the header read and checked, the device copy allocated).
    header_ms: f64,
    /// The parse's turn, held until the read ends, and the file's stamp for the host tier.
    finish: Option<(tokio::sync::OwnedSemaphorePermit, Option<adapters::FileStamp>)>,
}

/// A streamed load's outcome for LoadAdapter's waiters (None while its weights are read), under the
/// generation of its slot's claim.
type StreamDone = (u64, tokio::sync::watch::Receiver<Option<Result<(), Status>>>);

/// What the `adapter loaded` log line says of a load.
struct LoadLog {
    started: Instant,
    parse_ms: u64,
    upload_ms: f64,
    beside_read: bool,
    /// "load" (LoadAdapter) or "download" (DownloadAdapter with `load`).
    via: &'static str,
}

/// The service: the engine (on any backend) and its running batch behind one lock.
pub struct ShardServer<B: Backend> {
    state: Arc<Mutex<State<B>>>,
    /// A FilterBatch that came while a step held the state (a step run ahead): its keep list, applied by
    /// the next call that takes the state, before any step (so on every rank between the same two steps).
    deferred_keep: Arc<Mutex<Option<Vec<u64>>>>,
    /// The adapters' device slots (see [`Slots`]).
    slots: Arc<Mutex<Slots<B>>>,
    /// Uploads adapters for the engine without its lock.
    uploader: AdapterUploader<B>,
    info: pb::InfoResponse,
    /// The backend's storage type (what an adapter's weights take on the device, element by element).
    storage: DType,
    urls: Vec<String>,
    cfg: ModelConfig,
    settings: AdapterSettings,
    download_timeout: Duration,
    /// One gate for each hub adapter being downloaded (see `locate`); unheld gates are dropped.
    downloads: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Parses running at once ([`PARALLEL_PARSES`]): each holds a whole adapter file in memory.
    parses: Arc<tokio::sync::Semaphore>,
    host_tier: Arc<HostTier>,
    /// Streamed loads whose weights are still being read, by key.
    streams: Arc<Mutex<HashMap<String, StreamDone>>>,
}

/// Adapter parses that may run at once. A parse holds its whole file in memory (up to the largest adapter
/// `--max-lora-rank` allows for the model, `lora::HostAdapter::load`), and requests may name many new
/// adapters at once; a 27 MB rank-16 adapter parses in under 10 ms, so a few at a time keep up.
const PARALLEL_PARSES: usize = 4;

/// The name Info reports for a storage type.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F32 => "float32",
    }
}

fn status(e: EngineError) -> Status {
    match e {
        EngineError::InvalidBatch(m) => Status::invalid_argument(m),
        e @ EngineError::AdapterNotLoaded(_) => Status::failed_precondition(e.to_string()),
        // Retryable once memory is freed (an adapter offloaded, sequences finished).
        e @ EngineError::DeviceMemory(_) => Status::resource_exhausted(e.to_string()),
        other => Status::internal(other.to_string()),
    }
}

/// How long a streamed read's outcome may lag its gate's failure: the reading thread ends the gate, then
/// sends its outcome at once; a read that has not ended by then is stalled.
const READ_AFTER_GATE: Duration = Duration::from_secs(1);

/// What a streamed load's read came to ([`read_outcome`]).
#[derive(Debug)]
enum ReadOutcome<T> {
    /// The read ended: the parse, or the read's or the checks' error (the file's).
    Read(lorax_engine::Result<T>),
    /// The gate failed (a read that sent nothing for too long) and the read has not ended.
    Stalled(EngineError),
}

/// Waits for a streamed load's outcome: the gate's (which fails a read that stalls), then the read's own on
/// `rest`, which the reading thread sends right after it ends the gate. A failed gate whose read does not
/// answer within `grace` is a stall.
fn read_outcome<T>(
    gate: Option<&dyn lorax_engine::lora::AdapterGate>,
    rest: &std::sync::mpsc::Receiver<lorax_engine::Result<T>>,
    grace: Duration,
) -> ReadOutcome<T> {
    let stopped = || Err(EngineError::Backend("the adapter's read stopped".into()));
    match gate.map(|g| g.wait_end()) {
        Some(Err(e)) => match rest.recv_timeout(grace) {
            // The file's own error names the cause better than the gate's copy of it.
            Ok(Err(read)) => ReadOutcome::Read(Err(read)),
            // The read ended after the gate had failed (a stall), or not at all.
            Ok(Ok(_)) | Err(_) => ReadOutcome::Stalled(e),
        },
        _ => ReadOutcome::Read(rest.recv().unwrap_or_else(|_| stopped())),
    }
}

/// Unloads the adapter of a failed streamed load if it is still that load's (its `gate`; not one loaded
/// again under `key` since), dropping its sequences that are still in the batch (prompts admitted with no
/// rows yet: they cannot run, and the router fails the step that names them). `true` when it unloaded it.
fn unload_failed_stream<B: Backend>(
    state: &Mutex<State<B>>,
    deferred: &Mutex<Option<Vec<u64>>>,
    slots: &Mutex<Slots<B>>,
    key: &str,
    gate: Option<&Arc<dyn lorax_engine::lora::AdapterGate>>,
) -> Result<bool, Status> {
    let mut guard = lock_state(state, deferred, slots)?;
    let s = &mut *guard;
    let mut slots = slots.lock().map_err(|_| poisoned())?;
    let ours = match (s.engine.adapter(key).and_then(|a| a.gate.as_ref()), gate) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        _ => false,
    };
    if !ours {
        return Ok(false);
    }
    let keep: Vec<u64> = s
        .batch
        .seqs
        .iter()
        .filter(|q| q.adapter.as_deref() != Some(key))
        .map(|q| q.id)
        .collect();
    s.batch.filter(&keep);
    s.engine
        .offload_adapter(key, &s.batch)
        .map_err(|e| Status::internal(e.to_string()))?;
    slots.loaded.remove(key);
    Ok(true)
}

fn poisoned() -> Status {
    Status::internal("the shard's engine state was poisoned by an earlier panic")
}

impl<B: Backend> ShardServer<B> {
    /// Create the backend with `make` and load the model onto it (both on a blocking thread: a CUDA
    /// backend compiles or loads its kernels), then build the service.
    pub async fn load(
        cfg: ShardConfig,
        make: impl FnOnce() -> Result<B, EngineError> + Send + 'static,
    ) -> anyhow::Result<Self> {
        let dir = cfg.model_dir.clone();
        let cache = CacheConfig {
            num_blocks: cfg.num_blocks as usize,
            block_size: cfg.block_size as usize,
        };
        let comm = std::sync::Arc::clone(&cfg.comm);
        let format = cfg.load_format;
        let engine =
            tokio::task::spawn_blocking(move || Engine::load_with_format(make()?, &dir, cache, comm, format)).await??;
        let c = engine.config().clone();
        let info = pb::InfoResponse {
            model_id: cfg.model_id,
            architecture: format!("{:?}", c.architecture).to_lowercase(),
            vocab_size: u32::try_from(c.vocab_size)?,
            // The positions it serves: linear interpolation's factor included.
            max_position_embeddings: u32::try_from(c.max_positions()).unwrap_or(u32::MAX),
            eos_token_ids: c.eos_token_ids.clone(),
            bos_token_id: c.bos_token_id,
            device: engine.backend.name(),
            dtype: dtype_name(cfg.dtype).into(),
            block_size: cfg.block_size,
            num_blocks: cfg.num_blocks,
            rank: cfg.rank,
            world_size: cfg.world_size,
            supports_adapters: true,
        };
        Ok(Self {
            cfg: c,
            uploader: engine.adapter_uploader(),
            host_tier: Arc::new(HostTier::new(cfg.adapters.host_cache_bytes)),
            settings: cfg.adapters,
            download_timeout: cfg.download_timeout,
            downloads: Mutex::new(HashMap::new()),
            parses: Arc::new(tokio::sync::Semaphore::new(PARALLEL_PARSES)),
            streams: Arc::new(Mutex::new(HashMap::new())),
            deferred_keep: Arc::new(Mutex::new(None)),
            slots: Arc::new(Mutex::new(Slots::default())),
            state: Arc::new(Mutex::new(State {
                engine,
                batch: Batch::default(),
                ahead: None,
                watch: crate::slow::StepWatch::default(),
            })),
            info,
            storage: cfg.dtype,
            urls: cfg.urls,
        })
    }

    /// The gate that lets one download of hub adapter `id` run at a time.
    fn download_gate(&self, id: &str) -> Result<Arc<tokio::sync::Mutex<()>>, Status> {
        let mut gates = self.downloads.lock().map_err(|_| poisoned())?;
        gates.retain(|_, gate| Arc::strong_count(gate) > 1);
        Ok(Arc::clone(gates.entry(id.to_string()).or_default()))
    }

    /// Finds an adapter's files: local under the allowed roots, hub by downloading (`download`) or
    /// from the cache only. A hub adapter's files come with its turn at the adapter's download gate, to
    /// hold until they are parsed (or evicted after a failed parse).
    async fn locate(
        &self,
        source: &str,
        id: &str,
        token: Option<String>,
        download: bool,
    ) -> Result<(Located, Option<tokio::sync::OwnedMutexGuard<()>>), Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument("adapter_id is empty"));
        }
        match source {
            "local" => adapters::resolve_local(&self.settings.local_roots, id).map(|l| (l, None)),
            "hub" if download => {
                // One download of an adapter at a time: a second caller (a chat request's template
                // fetch beside the scheduler's download) waits for the first, then finds the files in
                // the cache, instead of failing on the lock of the file the first is writing. The
                // caller keeps the turn through the parse, so the second never reads files that a
                // failed parse is about to evict.
                let gate = self.download_gate(id)?;
                let max_weights = lorax_engine::lora::max_adapter_file_bytes(&self.cfg, self.settings.max_rank);
                let download = async {
                    let turn = gate.lock_owned().await;
                    adapters::download_hub(id, token, max_weights)
                        .await
                        .map(|l| (l, Some(turn)))
                };
                match tokio::time::timeout(self.download_timeout, download).await {
                    Ok(located) => located,
                    Err(_) => Err(Status::unavailable(format!(
                        "downloading adapter {id:?} from the hub timed out after {} s",
                        self.download_timeout.as_secs()
                    ))),
                }
            }
            "hub" => {
                // After any download or parse of the same adapter in progress.
                let turn = self.download_gate(id)?.lock_owned().await;
                adapters::cached_hub(id).map(|l| (l, Some(turn))).ok_or_else(|| {
                    Status::failed_precondition(format!(
                        "adapter {id:?} was not downloaded (call DownloadAdapter first)"
                    ))
                })
            }
            other => Err(Status::invalid_argument(format!(
                "adapter_source {other:?} is not supported: use \"hub\" or \"local\""
            ))),
        }
    }

    /// Parses the adapter at `located` (on a blocking thread) into the host tier, or takes the host tier's
    /// parse when the files are unchanged since it (a DownloadAdapter for an adapter already parsed: a
    /// chat template's fetch, or a request with another token, which still goes through `locate`). Also
    /// returns the parse's milliseconds (None when taken from the tier). With `upload`, a parse also
    /// uploads the adapter, beside the read where the backend can
    /// ([`AdapterUploader::load_and_upload`]), and returns the upload's outcome: the device adapter, the
    /// milliseconds from the read's end to the upload's, and whether it went up beside the read. (None
    /// when the parse was taken from the tier: upload it apart.)
    async fn parse_into_host_tier(&self, key: &str, located: Located, upload: bool) -> Result<Parsed<B>, Status> {
        match self.parse_or_stream(key, located, upload, false).await? {
            Outcome::Parsed(parsed) => Ok(parsed),
            Outcome::Streaming(_) => Err(Status::internal("a parse streamed unasked")),
        }
    }

    /// [`Self::parse_into_host_tier`]; with `stream` (and `upload`), an adapter not in the host tier is
    /// loaded as its file is read ([`AdapterUploader::load_streamed`]) where it can be: the answer then
    /// comes once its header is checked, with the device adapter and what gives the parse later.
    async fn parse_or_stream(
        &self,
        key: &str,
        located: Located,
        upload: bool,
        stream: bool,
    ) -> Result<Outcome<B>, Status> {
        let cfg = self.cfg.clone();
        let (max_rank, storage) = (self.settings.max_rank, self.storage);
        let turn = Arc::clone(&self.parses)
            .acquire_owned()
            .await
            .map_err(|_| Status::unavailable("the shard is shutting down"))?;
        let uploader = upload.then(|| self.uploader.clone());
        let outcome = tokio::task::spawn_blocking({
            let host_tier = Arc::clone(&self.host_tier);
            let key = key.to_string();
            move || {
                // Stamped before the parse: a file changed during it leaves a stale stamp, so the next
                // download parses again rather than keeping what may be old contents.
                let stamp = adapters::stamp(&located);
                if let Some(host) = stamp.as_ref().and_then(|s| host_tier.get_unchanged(&key, s)) {
                    return Ok::<_, Status>((
                        Outcome::Parsed(Parsed {
                            host,
                            parse_ms: None,
                            device: None,
                        }),
                        None,
                    ));
                }
                let t = Instant::now();
                let (host, device) = match uploader {
                    None => (adapters::parse(&located, &cfg, max_rank)?, None),
                    Some(uploader) if stream => match uploader.load_streamed(&located.dir, &cfg, max_rank, storage) {
                        StreamStart::Streaming { device, rest, layout } => {
                            let parts = StreamParts {
                                device,
                                rest,
                                layout,
                                located,
                                header_ms: millis_f(t.elapsed()),
                                finish: None,
                            };
                            return Ok((Outcome::Streaming(parts), Some(stamp)));
                        }
                        StreamStart::Loaded(loaded) => {
                            let (host, device) = loaded.map_err(|e| adapters::parse_error(e, &located))?;
                            (host, Some(device))
                        }
                    },
                    Some(uploader) => {
                        let (host, device) = uploader
                            .load_and_upload(&located.dir, &cfg, max_rank)
                            .map_err(|e| adapters::parse_error(e, &located))?;
                        (host, Some(device))
                    }
                };
                // Values the served type cannot hold (an f16 model, a bf16 or f32 adapter) are refused
                // before the adapter is kept (a device copy made beside the read is dropped with it).
                host.check_storage(storage)
                    .map_err(|e| adapters::parse_error(e, &located))?;
                // The read's time: the upload's part after it is told apart.
                let after_read = device
                    .as_ref()
                    .map_or(Duration::ZERO, |d| d.as_ref().map_or(Duration::ZERO, |u| u.after_read));
                let parse_ms = millis_of(t.elapsed().saturating_sub(after_read));
                let device = device.map(|d| d.map(|u| (u.device, millis_f(u.after_read), u.beside_read)));
                Ok((
                    Outcome::Parsed(Parsed {
                        host: Arc::new(host),
                        parse_ms: Some(parse_ms),
                        device,
                    }),
                    Some(stamp),
                ))
            }
        })
        .await
        .map_err(|e| Status::internal(format!("parse task failed: {e}")))??;
        match outcome {
            (Outcome::Parsed(parsed), Some(stamp)) => {
                self.host_tier.insert(key, Arc::clone(&parsed.host), stamp);
                Ok(Outcome::Parsed(parsed))
            }
            (Outcome::Streaming(mut parts), stamp) => {
                // The parse's turn is held until its read ends (the read holds the file in memory).
                parts.finish = Some((turn, stamp.flatten()));
                Ok(Outcome::Streaming(parts))
            }
            (outcome, None) => Ok(outcome),
        }
    }

    /// Puts a streamed load's adapter in its slot and answers the download, leaving a task that waits for
    /// the read's end: it keeps the parse in the host tier, or unloads the adapter when the read or the
    /// checks failed (a step that used it failed with the same error), and tells LoadAdapter's waiters.
    #[allow(clippy::too_many_arguments)]
    fn streamed(
        &self,
        key: String,
        adapter_id: &str,
        hub: bool,
        parts: StreamParts<B>,
        claim: Pending<B>,
        started: Instant,
        tokenizer_config: Option<String>,
    ) -> Result<pb::DownloadAdapterResponse, Status> {
        let StreamParts {
            device,
            rest,
            layout,
            located,
            header_ms,
            finish,
        } = parts;
        let warnings = self.base_model_warning(adapter_id, layout.base_model());
        let (done_tx, done_rx) = tokio::sync::watch::channel(None);
        let generation = claim.generation;
        let gate = device.gate.clone();
        let log = LoadLog {
            started,
            parse_ms: 0,
            upload_ms: header_ms,
            beside_read: true,
            via: "stream",
        };
        let inserted = self.insert_loaded(claim, device, log);
        // LoadAdapter's waiters find the load only once it is in its slot (an insertion refused leaves
        // nothing to wait for; the read still ends below, for the host tier).
        if inserted.is_ok() {
            self.streams
                .lock()
                .map_err(|_| poisoned())?
                .insert(key.clone(), (generation, done_rx));
        }
        let placed = inserted.is_ok();
        let (host_tier, slots, state, deferred, streams) = (
            Arc::clone(&self.host_tier),
            Arc::clone(&self.slots),
            Arc::clone(&self.state),
            Arc::clone(&self.deferred_keep),
            Arc::clone(&self.streams),
        );
        let task_key = key.clone();
        let hub_id = hub.then(|| adapter_id.to_string());
        tokio::spawn(async move {
            let key = task_key;
            let (turn, stamp) = finish.map_or((None, None), |(t, s)| (Some(t), s));
            let waited = gate.clone();
            let outcome = tokio::task::spawn_blocking(move || {
                let outcome = read_outcome(waited.as_deref(), &rest, READ_AFTER_GATE);
                (outcome, rest)
            })
            .await;
            // The read's own outcome, or the gate's failure where the read has not ended (a stall: its thread
            // may never end; it keeps the parse's turn until it does).
            let (host, from_file) = match outcome {
                Ok((ReadOutcome::Read(host), _)) => {
                    drop(turn);
                    let from_file = host.is_err();
                    (host, from_file)
                }
                Ok((ReadOutcome::Stalled(e), rest)) => {
                    tokio::task::spawn_blocking(move || {
                        let _ = rest.recv();
                        drop(turn);
                    });
                    (Err(e), false)
                }
                Err(e) => (
                    Err(EngineError::Backend(format!("the adapter's read task failed: {e}"))),
                    false,
                ),
            };
            let outcome = match host {
                Ok(host) => {
                    tracing::info!(
                        adapter = %key,
                        bytes = host.bytes,
                        rank = host.max_rank,
                        read = %host.read.as_str(),
                        streamed = true,
                        ms = millis(started),
                        "adapter downloaded"
                    );
                    host_tier.insert(&key, Arc::new(host), stamp);
                    Ok(())
                }
                Err(e) => {
                    let status = match e {
                        // A stall, or the device's copies: not the adapter's fault; worth a retry.
                        e @ EngineError::Backend(_) if !from_file => Status::unavailable(e.to_string()),
                        e => adapters::parse_error(e, &located),
                    };
                    tracing::warn!(
                        adapter = %key,
                        "the streamed adapter's read failed; unloading it: {}",
                        status.message()
                    );
                    let unloaded = tokio::task::spawn_blocking({
                        let key = key.clone();
                        move || unload_failed_stream(&state, &deferred, &slots, &key, gate.as_ref())
                    })
                    .await
                    .unwrap_or_else(|e| Err(Status::internal(e.to_string())));
                    match unloaded {
                        // The router's retry then fetches a hub adapter's files again (when they were the
                        // cause).
                        Ok(true) if from_file => {
                            if let Some(id) = hub_id {
                                let _ = tokio::task::spawn_blocking(move || adapters::evict_hub(&id)).await;
                            }
                        }
                        Ok(_) => {}
                        Err(e) => tracing::error!(adapter = %key, "unloading the failed streamed adapter: {e}"),
                    }
                    Err(status)
                }
            };
            if placed {
                if let Ok(mut streams) = streams.lock() {
                    if streams.get(&key).is_some_and(|(g, _)| *g == generation) {
                        streams.remove(&key);
                    }
                }
            }
            let _ = done_tx.send(Some(outcome));
        });
        let device_bytes = inserted?;
        Ok(pb::DownloadAdapterResponse {
            size_bytes: layout.bytes as u64,
            warnings,
            rank: u32::try_from(layout.max_rank()).unwrap_or(u32::MAX),
            tokenizer_config,
            loaded: true,
            device_bytes,
            load_refused: false,
            upload_bytes: (layout.elements() * self.storage.size()) as u64,
            streaming: true,
        })
    }

    /// The warning for an adapter trained on another base model than the one served.
    fn base_model_warning(&self, adapter_id: &str, base: Option<&str>) -> Vec<String> {
        base.filter(|b| *b != self.info.model_id)
            .map(|base| {
                format!(
                    "adapter {adapter_id:?} was trained on {base:?}, not on the served model {:?}; its shapes fit, so it \
                     is served",
                    self.info.model_id
                )
            })
            .into_iter()
            .collect()
    }

    /// Claims a device slot for a load of `key`, before anything is read or uploaded: `None` when it is
    /// loaded already; RESOURCE_EXHAUSTED when every slot is taken, counting loads in flight. The claim
    /// holds the slot until it is inserted ([`Self::insert_loaded`]) or dropped.
    async fn claim_slot(&self, key: &str) -> Result<Option<Pending<B>>, Status> {
        let slots = self.settings.device_slots;
        let generation = {
            let mut s = self.slots.lock().map_err(|_| poisoned())?;
            if s.loaded.contains(key) {
                return Ok(None);
            }
            let loaded = s.loaded.len();
            let others = s.pending.keys().filter(|k| *k != key).count();
            if !s.pending.contains_key(key) && loaded + others >= slots {
                return Err(no_slot(loaded + others, slots));
            }
            s.generation += 1;
            let fresh = s.generation;
            let entry = s.pending.entry(key.to_string()).or_insert((fresh, 0));
            entry.1 += 1;
            entry.0
        };
        Ok(Some(Pending {
            slots: Arc::clone(&self.slots),
            key: key.to_string(),
            generation,
            armed: true,
        }))
    }

    /// Puts an uploaded adapter in the device tier under its claim, without waiting for the engine's lock:
    /// the next call that takes the engine state inserts it, before anything else (right away when the
    /// lock is free). Another load of the same adapter may have finished meanwhile: then this upload is
    /// dropped. ABORTED when the adapter was offloaded while it loaded. Returns its device bytes (0 when it
    /// was there already).
    fn insert_loaded(&self, mut claim: Pending<B>, device: DeviceAdapter<B>, log: LoadLog) -> Result<u64, Status> {
        claim.armed = false;
        let (key, generation) = (claim.key.clone(), claim.generation);
        let slots = self.settings.device_slots;
        let bytes = device.bytes;
        let unused = {
            let mut s = self.slots.lock().map_err(|_| poisoned())?;
            if !release_pending(&mut s.pending, &key, generation) {
                return Err(Status::aborted(format!(
                    "adapter {key:?} was offloaded while it was loading"
                )));
            }
            if s.loaded.contains(&key) {
                Some(device)
            } else {
                let loaded = s.loaded.len();
                if loaded >= slots {
                    return Err(no_slot(loaded, slots));
                }
                s.loaded.insert(key.clone());
                s.ready.push((key.clone(), device));
                tracing::info!(
                    adapter = %key,
                    bytes,
                    loaded = loaded + 1,
                    parse_ms = log.parse_ms,
                    upload_ms = log.upload_ms,
                    beside_read = log.beside_read,
                    via = %log.via,
                    ms = millis(log.started),
                    "adapter loaded"
                );
                None
            }
        };
        let Some(unused) = unused else {
            // Into the engine now if no step holds it (else the next call does it).
            if let Ok(mut state) = self.state.try_lock() {
                insert_ready(&mut state, &self.slots);
            }
            return Ok(bytes as u64);
        };
        drop(unused);
        Ok(0)
    }

    /// Uploads a parsed adapter (on a blocking thread, without the engine lock: forward passes go on).
    async fn upload(&self, host: Arc<lorax_engine::lora::HostAdapter>) -> Result<(DeviceAdapter<B>, f64), Status> {
        let uploader = self.uploader.clone();
        tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            uploader.upload(&host).map(|d| (d, millis_f(t.elapsed())))
        })
        .await
        .map_err(|e| Status::internal(format!("upload task failed: {e}")))?
        .map_err(status)
    }

    async fn with_state<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut State<B>) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let (state, deferred, slots) = (
            Arc::clone(&self.state),
            Arc::clone(&self.deferred_keep),
            Arc::clone(&self.slots),
        );
        tokio::task::spawn_blocking(move || f(&mut *lock_state(&state, &deferred, &slots)?))
            .await
            .map_err(|e| Status::internal(format!("shard task failed: {e}")))?
    }
}

/// Milliseconds of `d`, to the hundredth (for logs).
fn millis_f(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

/// Whole milliseconds of `d`.
fn millis_of(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Nanoseconds since `since`.
fn nanos(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

fn millis(since: Instant) -> u64 {
    millis_of(since.elapsed())
}

/// The refusal of a load beyond `--max-active-adapters`.
fn no_slot(loaded: usize, slots: usize) -> Status {
    Status::resource_exhausted(format!(
        "{loaded} adapters are loaded, the most this shard holds (--max-active-adapters {slots}); offload one first"
    ))
}

fn to_pb(g: Generation) -> pb::Generation {
    let prefill = g.prefill.unwrap_or_default();
    let tokens = |top: &[(u32, f32)]| top.iter().map(|&(id, logprob)| pb::Token { id, logprob }).collect();
    // One entry per prompt token when any has alternatives (prefill_top_n), else none.
    let prefill_top_tokens = if prefill.iter().any(|t| !t.top.is_empty()) {
        prefill
            .iter()
            .map(|t| pb::TopTokens { tokens: tokens(&t.top) })
            .collect()
    } else {
        Vec::new()
    };
    pb::Generation {
        request_id: g.id,
        token: Some(pb::Token {
            id: g.choice.token,
            logprob: g.choice.logprob,
        }),
        top_tokens: tokens(&g.choice.top),
        prefill_tokens: prefill
            .iter()
            .map(|t| pb::Token {
                id: t.id,
                logprob: t.logprob.unwrap_or(f32::NAN),
            })
            .collect(),
        prefill_top_tokens,
    }
}

fn sampling(p: Option<pb::SamplingParameters>, top_n: u32) -> SamplingParams {
    let p = p.unwrap_or_default().normalized();
    SamplingParams {
        temperature: p.temperature,
        top_k: p.top_k,
        top_p: p.top_p,
        typical_p: p.typical_p,
        do_sample: p.do_sample,
        repetition_penalty: p.repetition_penalty,
        frequency_penalty: p.frequency_penalty,
        presence_penalty: p.presence_penalty,
        seed: p.seed,
        top_n_tokens: top_n,
    }
}

#[tonic::async_trait]
impl<B: Backend> ShardService for ShardServer<B> {
    async fn info(&self, _: Request<pb::InfoRequest>) -> Result<Response<pb::InfoResponse>, Status> {
        Ok(Response::new(self.info.clone()))
    }

    async fn health(&self, _: Request<pb::HealthRequest>) -> Result<Response<pb::HealthResponse>, Status> {
        // The lock being takeable (not poisoned) is the health of this process.
        if self.state.is_poisoned() {
            return Err(poisoned());
        }
        Ok(Response::new(pb::HealthResponse {}))
    }

    async fn service_discovery(
        &self,
        _: Request<pb::ServiceDiscoveryRequest>,
    ) -> Result<Response<pb::ServiceDiscoveryResponse>, Status> {
        Ok(Response::new(pb::ServiceDiscoveryResponse {
            urls: self.urls.clone(),
        }))
    }

    async fn clear_cache(&self, _: Request<pb::ClearCacheRequest>) -> Result<Response<pb::ClearCacheResponse>, Status> {
        self.with_state(|s| {
            s.batch = Batch::default();
            s.ahead = None;
            s.engine.forget_steps_ahead();
            Ok(())
        })
        .await?;
        Ok(Response::new(pb::ClearCacheResponse {}))
    }

    async fn warmup(&self, req: Request<pb::WarmupRequest>) -> Result<Response<pb::WarmupResponse>, Status> {
        let r = req.into_inner();
        let info = self.info.clone();
        let tokens = self
            .with_state(move |s| {
                let pieces = warmup_pieces(
                    r.max_prefill_tokens.max(1) as usize,
                    info.max_position_embeddings as usize,
                    info.num_blocks as usize,
                    info.block_size as usize,
                );
                let ran = pieces.iter().map(|p| p.len).sum::<usize>();
                let bos = info.bos_token_id.unwrap_or(0);
                let news = pieces
                    .into_iter()
                    .enumerate()
                    .map(|(id, p)| NewSequence {
                        id: id as u64,
                        input_ids: vec![bos; p.len],
                        block_table: p.blocks,
                        params: SamplingParams::default(),
                        prefill_logprobs: false,
                        prefill_top_n: 0,
                        adapter: None,
                    })
                    .collect();
                // A throwaway batch: nothing of it survives the call.
                let mut scratch = Batch::default();
                s.engine.prefill(&mut scratch, news).map_err(status)?;
                // One rank only: a rank whose warm-up failed half-way would leave the others waiting in a
                // collective.
                if info.world_size == 1 {
                    let started = Instant::now();
                    let mut named = s.engine.backend.decode_warmup_rows();
                    // Up to the padded row count of the router's largest batch (0: not said).
                    if r.max_decode_rows > 0 {
                        let most = s.engine.backend.decode_rows(r.max_decode_rows as usize);
                        named.retain(|&rows| rows <= most);
                    }
                    match warm_decode_steps(s, named, info.num_blocks as usize, info.block_size as usize, bos) {
                        Ok(rows) if rows.is_empty() => {}
                        Ok(rows) => tracing::info!(
                            row_counts = rows.len(),
                            largest = rows[0],
                            ms = started.elapsed().as_millis() as u64,
                            "decode steps warmed up"
                        ),
                        Err(e) => {
                            tracing::warn!("the decode steps' warm-up failed (the server starts anyway): {e}");
                        }
                    }
                }
                Ok(u32::try_from(ran).unwrap_or(u32::MAX))
            })
            .await?;
        Ok(Response::new(pb::WarmupResponse { prefill_tokens: tokens }))
    }

    async fn prefill(&self, req: Request<pb::PrefillRequest>) -> Result<Response<pb::PrefillResponse>, Status> {
        let (entered, received_unix_ns) = (Instant::now(), pb::unix_time_ns());
        let r = req.into_inner();
        let opts = StepOptions {
            decode: r.decode_running,
            max_prompt_tokens: (r.max_prompt_tokens > 0).then_some(r.max_prompt_tokens as usize),
        };
        let news: Vec<NewSequence> = r
            .requests
            .into_iter()
            .map(|r| NewSequence {
                id: r.id,
                input_ids: r.input_ids,
                block_table: r.blocks,
                params: sampling(r.parameters, r.top_n_tokens),
                prefill_logprobs: r.prefill_logprobs,
                prefill_top_n: r.prefill_top_n,
                adapter: (!r.adapter_id.is_empty()).then(|| adapters::key(&r.adapter_source, &r.adapter_id)),
            })
            .collect();
        let (gens, prefilling_ids, ns) = self
            .with_state(move |s| {
                // A step run ahead comes first: its tokens precede this step's.
                let (mut gens, _) = s.ahead.take().transpose()?.unwrap_or_default();
                let t = Instant::now();
                match s.engine.step(&mut s.batch, news, opts) {
                    Ok(more) => gens.extend(more),
                    Err(e) => {
                        // The engine adds none of the step's sequences on failure (Engine::step); the step run
                        // ahead stays for the next call (the router clears the shards after a failed call
                        // anyway).
                        if !gens.is_empty() {
                            s.ahead = Some(Ok((gens, 0)));
                        }
                        return Err(status(e));
                    }
                }
                Ok((gens, s.batch.prefilling_ids(), t.elapsed().as_nanos()))
            })
            .await?;
        let generations = gens.into_iter().map(to_pb).collect();
        Ok(Response::new(pb::PrefillResponse {
            generations,
            forward_ns: u64::try_from(ns).unwrap_or(u64::MAX),
            prefilling_ids,
            handler_ns: nanos(entered),
            received_unix_ns,
        }))
    }

    async fn decode(&self, req: Request<pb::DecodeRequest>) -> Result<Response<pb::DecodeResponse>, Status> {
        let (entered, received_unix_ns) = (Instant::now(), pb::unix_time_ns());
        let run_ahead = req.into_inner().run_ahead;
        let (state, deferred, slots) = (
            Arc::clone(&self.state),
            Arc::clone(&self.deferred_keep),
            Arc::clone(&self.slots),
        );
        let (tx, rx) = tokio::sync::oneshot::channel();
        // The answer leaves as soon as it is known; the step run ahead keeps the lock from there, so every
        // later call (on every rank alike, as tensor parallelism needs) comes after it.
        tokio::task::spawn_blocking(move || {
            let mut guard = match lock_state(&state, &deferred, &slots) {
                Ok(g) => g,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let s = &mut *guard;
            let out = s.ahead.take().unwrap_or_else(|| decode_now(s, false));
            let ok = out.is_ok();
            // A dropped receiver (the call was cancelled) loses these tokens; the router then fails the step.
            let _ = tx.send(out);
            if run_ahead && ok && s.engine.can_decode(&s.batch) {
                let ahead = decode_now(s, true);
                if let Err(e) = &ahead {
                    tracing::warn!(
                        "a decode step run ahead failed (the next Decode or Prefill reports it): {}",
                        e.message()
                    );
                }
                s.ahead = Some(ahead);
            }
        });
        let (gens, ns) = rx
            .await
            .map_err(|_| Status::internal("shard task failed before answering"))??;
        let generations = gens.into_iter().map(to_pb).collect();
        Ok(Response::new(pb::DecodeResponse {
            generations,
            forward_ns: u64::try_from(ns).unwrap_or(u64::MAX),
            handler_ns: nanos(entered),
            received_unix_ns,
        }))
    }

    async fn filter_batch(
        &self,
        req: Request<pb::FilterBatchRequest>,
    ) -> Result<Response<pb::FilterBatchResponse>, Status> {
        let keep = req.into_inner().keep_ids;
        // While a step runs ahead (it holds the state) the filter waits for the next call instead of the
        // step: the router's next Decode then finds that step's tokens ready. Ids only leave the batch, so
        // the router can reuse the removed sequences' blocks at once: whatever writes them next comes after
        // the step on the device.
        let mut state = match self.state.try_lock() {
            Ok(s) => s,
            Err(std::sync::TryLockError::Poisoned(_)) => return Err(poisoned()),
            Err(std::sync::TryLockError::WouldBlock) => {
                let kept = u32::try_from(keep.len()).unwrap_or(u32::MAX);
                *self.deferred_keep.lock().map_err(|_| poisoned())? = Some(keep);
                return Ok(Response::new(pb::FilterBatchResponse { remaining: kept }));
            }
        };
        apply_deferred(&mut state, &self.deferred_keep);
        filter_state(&mut state, &keep);
        let remaining = u32::try_from(state.batch.len()).unwrap_or(u32::MAX);
        drop(state);
        Ok(Response::new(pb::FilterBatchResponse { remaining }))
    }

    async fn download_adapter(
        &self,
        req: Request<pb::DownloadAdapterRequest>,
    ) -> Result<Response<pb::DownloadAdapterResponse>, Status> {
        let r = req.into_inner();
        let key = adapters::key(&r.adapter_source, &r.adapter_id);
        let started = Instant::now();
        let (located, turn) = self.locate(&r.adapter_source, &r.adapter_id, r.api_token, true).await?;
        // With `load`, a slot is claimed once the files are here and before the read, so the upload can
        // run beside the read. No slot free: the download goes on alone (the router calls LoadAdapter
        // later).
        // (Only a single shard loads by its download: DownloadAdapter goes to rank 0 alone.)
        let (claim, loaded_already) = match r.load && self.info.world_size == 1 {
            false => (None, false),
            true => match self.claim_slot(&key).await {
                Ok(Some(claim)) => (Some(claim), false),
                Ok(None) => (None, true),
                Err(status) if status.code() == tonic::Code::ResourceExhausted => (None, false),
                Err(status) => return Err(status),
            },
        };
        let tokenizer_config = adapters::tokenizer_config(&located);
        let stream = r.stream && claim.is_some();
        let parsed = match self.parse_or_stream(&key, located, claim.is_some(), stream).await {
            Ok(Outcome::Parsed(parsed)) => parsed,
            Ok(Outcome::Streaming(parts)) => {
                drop(turn);
                let Some(claim) = claim else {
                    return Err(Status::internal("a streamed load without its slot"));
                };
                let hub = r.adapter_source == "hub";
                let response = self.streamed(key, &r.adapter_id, hub, parts, claim, started, tokenizer_config)?;
                return Ok(Response::new(response));
            }
            Err(status) => {
                if r.adapter_source == "hub" {
                    // The next DownloadAdapter (the router's retry) then fetches the files again.
                    let id = r.adapter_id.clone();
                    let _ = tokio::task::spawn_blocking(move || adapters::evict_hub(&id)).await;
                }
                return Err(status);
            }
        };
        drop(turn);
        let host = Arc::clone(&parsed.host);
        let warnings = self.base_model_warning(&r.adapter_id, host.base_model.as_deref());
        let (held, entries) = self.host_tier.usage();
        tracing::info!(
            adapter = %key,
            bytes = host.bytes,
            rank = host.max_rank,
            host_tier_bytes = held,
            host_tier_entries = entries,
            parse_ms = parsed.parse_ms.unwrap_or(0),
            read = %parsed.parse_ms.map_or("HostTier", |_| host.read.as_str()),
            ms = millis(started),
            "adapter downloaded"
        );
        for w in &warnings {
            tracing::warn!("{w}");
        }
        let (mut device_bytes, mut load_refused) = (None, false);
        if let Some(claim) = claim {
            let uploaded = match parsed.device {
                Some(uploaded) => uploaded.map_err(status),
                // The host tier's parse: upload it now.
                None => self
                    .upload(Arc::clone(&host))
                    .await
                    .map(|(device, ms)| (device, ms, false)),
            };
            match uploaded {
                Ok((device, upload_ms, beside_read)) => {
                    let log = LoadLog {
                        started,
                        parse_ms: parsed.parse_ms.unwrap_or(0),
                        upload_ms,
                        beside_read,
                        via: "download",
                    };
                    device_bytes = Some(self.insert_loaded(claim, device, log)?);
                }
                // No memory for it: downloaded only (the claim is released), and the router is told.
                Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                    tracing::warn!(adapter = %key, "downloaded, but not loaded: {}", s.message());
                    load_refused = true;
                }
                Err(s) => return Err(s),
            }
        }
        Ok(Response::new(pb::DownloadAdapterResponse {
            size_bytes: host.bytes as u64,
            warnings,
            rank: u32::try_from(host.max_rank).unwrap_or(u32::MAX),
            tokenizer_config,
            loaded: loaded_already || device_bytes.is_some(),
            device_bytes: device_bytes.unwrap_or(0),
            load_refused,
            upload_bytes: (host.elements() * self.storage.size()) as u64,
            streaming: false,
        }))
    }

    async fn load_adapter(
        &self,
        req: Request<pb::LoadAdapterRequest>,
    ) -> Result<Response<pb::LoadAdapterResponse>, Status> {
        let r = req.into_inner();
        let key = adapters::key(&r.adapter_source, &r.adapter_id);
        let started = Instant::now();
        // A streamed load under way: answer when its weights have all arrived.
        let stream = self.streams.lock().map_err(|_| poisoned())?.get(&key).cloned();
        if let Some((_, mut done)) = stream {
            let outcome = done
                .wait_for(Option::is_some)
                .await
                .map_err(|_| Status::internal("the streamed load's task ended without an outcome"))?
                .clone();
            return match outcome {
                Some(Err(status)) => Err(status),
                _ => Ok(Response::new(pb::LoadAdapterResponse { device_bytes: 0 })),
            };
        }
        // Already loaded, or no slot: answer before reading or uploading anything.
        let Some(claim) = self.claim_slot(&key).await? else {
            return Ok(Response::new(pb::LoadAdapterResponse { device_bytes: 0 }));
        };
        let (device, parse_ms, upload_ms, beside_read) = match self.host_tier.get(&key) {
            Some(host) => {
                let (device, ms) = self.upload(host).await?;
                (device, 0, ms, false)
            }
            None => {
                // Evicted from the host tier (or downloaded by another rank): read it again from disk,
                // uploading beside the read.
                let (located, _turn) = self.locate(&r.adapter_source, &r.adapter_id, None, false).await?;
                let parsed = self.parse_into_host_tier(&key, located, true).await?;
                let parse_ms = parsed.parse_ms.unwrap_or(0);
                match parsed.device {
                    Some(uploaded) => {
                        let (device, ms, beside) = uploaded.map_err(status)?;
                        (device, parse_ms, ms, beside)
                    }
                    None => {
                        let (device, ms) = self.upload(parsed.host).await?;
                        (device, parse_ms, ms, false)
                    }
                }
            }
        };
        let log = LoadLog {
            started,
            parse_ms,
            upload_ms,
            beside_read,
            via: "load",
        };
        let bytes = self.insert_loaded(claim, device, log)?;
        Ok(Response::new(pb::LoadAdapterResponse { device_bytes: bytes }))
    }

    async fn offload_adapter(
        &self,
        req: Request<pb::OffloadAdapterRequest>,
    ) -> Result<Response<pb::OffloadAdapterResponse>, Status> {
        let r = req.into_inner();
        let key = adapters::key(&r.adapter_source, &r.adapter_id);
        let slots = Arc::clone(&self.slots);
        let streams = Arc::clone(&self.streams);
        // (Taking the state inserts the uploads handed over before this call.)
        self.with_state(move |s| {
            // The slots stay locked from here: a load that finishes meanwhile cannot hand over an upload
            // that would be inserted after this offload (it finds its claim cancelled: ABORTED).
            let mut slots = slots.lock().map_err(|_| poisoned())?;
            insert_from(s, &mut slots);
            let removed = s
                .engine
                .offload_adapter(&key, &s.batch)
                .map_err(|e| Status::failed_precondition(e.to_string()))?;
            slots.loaded.remove(&key);
            // Loads of it still in flight are cancelled (they answer ABORTED and release their slot).
            let cancelled = slots.pending.remove(&key).map_or(0, |(_, n)| n);
            // A streamed load of it still reading is no longer this adapter's load: LoadAdapter must not
            // answer from it (its task removes only an entry of its own generation).
            if let Ok(mut streams) = streams.lock() {
                streams.remove(&key);
            }
            tracing::info!(adapter = %key, removed, cancelled, "adapter offloaded");
            Ok(())
        })
        .await?;
        Ok(Response::new(pb::OffloadAdapterResponse {}))
    }
}

/// One sequence of the warm-up prefill: its tokens and its KV blocks.
#[derive(Debug, PartialEq, Eq)]
struct WarmupPiece {
    len: usize,
    blocks: Vec<u32>,
}

/// One decode step at each of `named` row counts (largest first, each once), of one-token sequences in a
/// throwaway batch: the device's first step of a shape (the backend names them,
/// [`Backend::decode_warmup_rows`]) then comes before the first request instead of in the middle of
/// someone's stream. The sequences that stay are decoded at every later row count, so each gets blocks
/// (of `block_size`, `num_blocks` in all at most) for its prompt token and one position a step; row counts
/// of more sequences than those blocks hold are left out. Returns the row counts run.
fn warm_decode_steps<B: Backend>(
    s: &mut State<B>,
    named: Vec<usize>,
    num_blocks: usize,
    block_size: usize,
    bos: u32,
) -> lorax_engine::Result<Vec<usize>> {
    let all = decode_warmup_plan(named, usize::MAX);
    let per = (1 + all.len()).div_ceil(block_size.max(1));
    let rows = decode_warmup_plan(all, num_blocks / per);
    let Some(&most) = rows.first() else {
        return Ok(rows);
    };
    let news = (0..most)
        .map(|i| NewSequence {
            id: i as u64,
            input_ids: vec![bos],
            block_table: (i * per..(i + 1) * per)
                .map(|b| u32::try_from(b).unwrap_or(u32::MAX))
                .collect(),
            params: SamplingParams::default(),
            prefill_logprobs: false,
            prefill_top_n: 0,
            adapter: None,
        })
        .collect();
    let mut scratch = Batch::default();
    s.engine.prefill(&mut scratch, news)?;
    for &r in &rows {
        scratch.filter(&(0..r as u64).collect::<Vec<_>>());
        s.engine.decode(&mut scratch)?;
    }
    Ok(rows)
}

/// The row counts of the decode warm-up: those named, largest first, each at most once and at most
/// `max_rows` (the sequences the cache holds).
fn decode_warmup_plan(mut rows: Vec<usize>, max_rows: usize) -> Vec<usize> {
    rows.retain(|&r| r > 0 && r <= max_rows);
    rows.sort_unstable_by(|a, b| b.cmp(a));
    rows.dedup();
    rows
}

/// The warm-up's sequences: `requested` tokens (the router's largest step) as sequences of at most
/// `max_positions` tokens each, in distinct blocks of the cache, as many tokens as its `num_blocks` blocks
/// of `block_size` hold at most. Every piece but the last is a whole number of blocks, so the pieces need
/// no more blocks than one sequence of the same tokens would.
fn warmup_pieces(requested: usize, max_positions: usize, num_blocks: usize, block_size: usize) -> Vec<WarmupPiece> {
    let bs = block_size.max(1);
    let mut left = requested.min(num_blocks * bs);
    let piece = if max_positions >= bs {
        max_positions / bs * bs
    } else {
        max_positions.max(1)
    };
    let (mut pieces, mut next) = (Vec::new(), 0usize);
    while left > 0 {
        let len = left.min(piece);
        let n = len.div_ceil(bs);
        if next + n > num_blocks {
            break;
        }
        let blocks = (next..next + n).map(|b| u32::try_from(b).unwrap_or(u32::MAX)).collect();
        pieces.push(WarmupPiece { len, blocks });
        next += n;
        left -= len;
    }
    pieces
}

#[cfg(test)]
mod tests;
