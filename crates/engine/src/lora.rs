//! PEFT LoRA adapters: parsing `adapter_config.json` and `adapter_model.safetensors`, checking them
//! against the base model, and the two tiers a shard keeps them in.
//!
//! A [`HostAdapter`] is the parsed, validated adapter in host memory (weights in their file dtype, all
//! in one buffer: the safetensors file read at once); a [`DeviceAdapter`] is the same adapter uploaded to
//! a backend (with one [`Backend::upload_many`]), sliced for this tensor-parallel rank.
//! The forward pass applies an adapter to the seven projections of each layer as
//! `y += scale · (x · Aᵀ) · Bᵀ` (see [`crate::backend::Backend::lora`]), with peft's scale:
//! `alpha / r`, or `alpha / √r` with rsLoRA, after `rank_pattern` / `alpha_pattern` overrides.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{Mmap, MmapMut};
use regex::Regex;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::backend::{Backend, FileTensor, FileUpload};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::weights::{shard, DType, HostTensor};

/// The projections an adapter may target, in layer order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// `self_attn.q_proj`.
    Q,
    /// `self_attn.k_proj`.
    K,
    /// `self_attn.v_proj`.
    V,
    /// `self_attn.o_proj`.
    O,
    /// `mlp.gate_proj`.
    Gate,
    /// `mlp.up_proj`.
    Up,
    /// `mlp.down_proj`.
    Down,
}

/// Number of [`Target`]s.
pub const NUM_TARGETS: usize = 7;

impl Target {
    /// Every target, in index order.
    pub const ALL: [Target; NUM_TARGETS] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// Index into per-layer arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Module path inside a decoder layer, as Hugging Face names it.
    pub fn module(self) -> &'static str {
        match self {
            Target::Q => "self_attn.q_proj",
            Target::K => "self_attn.k_proj",
            Target::V => "self_attn.v_proj",
            Target::O => "self_attn.o_proj",
            Target::Gate => "mlp.gate_proj",
            Target::Up => "mlp.up_proj",
            Target::Down => "mlp.down_proj",
        }
    }

    /// `(out, in)` of the base projection.
    pub fn shape(self, cfg: &ModelConfig) -> (usize, usize) {
        let h = cfg.hidden_size;
        match self {
            Target::Q => (cfg.q_dim(), h),
            Target::K | Target::V => (cfg.kv_dim(), h),
            Target::O => (h, cfg.q_dim()),
            Target::Gate | Target::Up => (cfg.intermediate_size, h),
            Target::Down => (h, cfg.intermediate_size),
        }
    }

    /// Row-parallel projections (o, down) split their input under tensor parallelism; the others
    /// split their output.
    pub fn row_parallel(self) -> bool {
        matches!(self, Target::O | Target::Down)
    }

    fn from_module(module: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.module() == module)
    }
}

/// `target_modules`: a list of module-name suffixes, or one regular expression over full names.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum TargetModules {
    List(Vec<String>),
    Regex(String),
}

/// The fields of a PEFT `adapter_config.json` this engine reads; others are ignored.
#[derive(Clone, Debug, Deserialize)]
struct RawConfig {
    #[serde(default)]
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    target_modules: Option<TargetModules>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    rank_pattern: BTreeMap<String, usize>,
    #[serde(default)]
    alpha_pattern: BTreeMap<String, f64>,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    layers_to_transform: Option<serde_json::Value>,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
}

/// `message` with the adapter directory `dir` left out: the files it names relative to it, the directory
/// itself as "the adapter" (messages that reach clients should not show the server's paths).
pub fn strip_dir(message: &str, dir: &Path) -> String {
    let d = dir.display().to_string();
    // "<dir>: why" (an invalid adapter's message) is the adapter's own fault: the reason alone.
    message
        .replace(&format!("{d}/"), "")
        .replace(&format!("{d}: "), "")
        .replace(&d, "the adapter")
}

fn invalid(dir: &Path, reason: impl std::fmt::Display) -> EngineError {
    EngineError::InvalidAdapter(format!("{}: {reason}", dir.display()))
}

/// A pattern key (`rank_pattern`, `alpha_pattern`) matches a module when it matches a dot-separated
/// suffix of the module's name as a regular expression (peft's rule); the longest key wins.
struct Patterns<T> {
    keys: Vec<(Regex, usize, T)>,
}

/// Keys a `rank_pattern` or `alpha_pattern` may have, and bytes of one key: an adapter's config comes from
/// whoever published it, and each key is a regular expression compiled as the adapter is parsed (real
/// adapters have a few per module of the model at most).
const MAX_PATTERN_KEYS: usize = 1024;
const MAX_PATTERN_KEY_BYTES: usize = 1024;

/// Compiled size one adapter regular expression may take (`regex`'s own default is 10 MiB: 200 keys of
/// `\w{200}` took 2.3 GB and 13.5 s to compile). A key naming modules takes a few KiB.
const ADAPTER_REGEX_BYTES: usize = 64 << 10;

/// An adapter's regular expression `source` (at most [`MAX_PATTERN_KEY_BYTES`]) as `anchored` puts it in
/// context, compiled within [`ADAPTER_REGEX_BYTES`]; `what` names it in the errors.
fn adapter_regex(dir: &Path, what: &str, source: &str, anchored: &str) -> Result<Regex> {
    if source.len() > MAX_PATTERN_KEY_BYTES {
        return Err(invalid(
            dir,
            format!("{what} is {} bytes long; at most {MAX_PATTERN_KEY_BYTES}", source.len()),
        ));
    }
    regex::RegexBuilder::new(anchored)
        .size_limit(ADAPTER_REGEX_BYTES)
        .build()
        .map_err(|e| {
            invalid(
                dir,
                format!("{what} {source:?} is not a usable regular expression: {e}"),
            )
        })
}

impl<T: Copy> Patterns<T> {
    fn new(dir: &Path, map: &BTreeMap<String, T>) -> Result<Self> {
        if map.len() > MAX_PATTERN_KEYS {
            return Err(invalid(
                dir,
                format!(
                    "a pattern map has {} keys; at most {MAX_PATTERN_KEYS} are read",
                    map.len()
                ),
            ));
        }
        let mut keys = Vec::with_capacity(map.len());
        for (key, &value) in map {
            let re = adapter_regex(dir, "a pattern key", key, &format!(r"^(?:.*\.)?(?:{key})$"))?;
            keys.push((re, key.len(), value));
        }
        Ok(Self { keys })
    }

    fn get(&self, module: &str) -> Option<T> {
        self.keys
            .iter()
            .filter(|(re, _, _)| re.is_match(module))
            .max_by_key(|(_, len, _)| *len)
            .map(|(_, _, v)| *v)
    }
}

/// A tensor of a parsed adapter: a range of the adapter's one buffer, or bytes of its own (made from a
/// [`HostTensor`], e.g. by a test that rewrites an adapter).
pub struct AdapterTensor {
    /// Name in the adapter file.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Row-major shape.
    pub shape: Vec<usize>,
    bytes: TensorBytes,
}

enum TensorBytes {
    Shared(Arc<Mmap>, Range<usize>),
    Owned(Vec<u8>),
}

impl AdapterTensor {
    /// Little-endian element bytes.
    pub fn data(&self) -> &[u8] {
        match &self.bytes {
            TensorBytes::Shared(buf, range) => &buf[range.clone()],
            TensorBytes::Owned(v) => v,
        }
    }

    /// The tensor as a [`HostTensor`] borrowing its bytes (what backends upload).
    pub fn view(&self) -> HostTensor<'_> {
        HostTensor {
            name: self.name.clone(),
            dtype: self.dtype,
            shape: self.shape.clone(),
            data: std::borrow::Cow::Borrowed(self.data()),
        }
    }

    /// The elements as f32.
    pub fn to_f32(&self) -> Vec<f32> {
        self.view().to_f32()
    }

    /// Where its bytes lie in the adapter's weights file (`None`: bytes of its own).
    pub fn file_range(&self) -> Option<Range<usize>> {
        match &self.bytes {
            TensorBytes::Shared(_, range) => Some(range.clone()),
            TensorBytes::Owned(_) => None,
        }
    }
}

/// Takes an adapter's weights file as it is read ([`HostAdapter::load_with`]).
pub trait PieceSink: Sync {
    /// The file has `len` bytes; called once, before any piece.
    fn start(&self, len: usize);
    /// `bytes` are the file's from `offset` on. Called from many threads at once, in any order, with
    /// pieces that do not overlap, except that the whole file may come again (the same bytes) when a read
    /// straight from the disk is retried through the page cache. Every byte has come once the read
    /// succeeded.
    fn piece(&self, offset: usize, bytes: &[u8]);
}

impl From<HostTensor<'_>> for AdapterTensor {
    fn from(t: HostTensor<'_>) -> Self {
        Self {
            name: t.name,
            dtype: t.dtype,
            shape: t.shape,
            bytes: TensorBytes::Owned(t.data.into_owned()),
        }
    }
}

impl std::fmt::Debug for AdapterTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdapterTensor")
            .field("name", &self.name)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .finish_non_exhaustive()
    }
}

/// One projection's LoRA pair in host memory.
#[derive(Debug)]
pub struct HostLora {
    /// `lora_A.weight`, `[r, in]`.
    pub a: AdapterTensor,
    /// `lora_B.weight`, `[out, r]`.
    pub b: AdapterTensor,
    /// Multiplier of `B·A` (peft's `scaling`).
    pub scale: f32,
}

/// A parsed, validated adapter in host memory.
#[derive(Debug)]
pub struct HostAdapter {
    /// Per layer, per [`Target`] index: the LoRA pair, if the adapter targets it.
    pub layers: Vec<[Option<HostLora>; NUM_TARGETS]>,
    /// Largest rank over all projections.
    pub max_rank: usize,
    /// Bytes of weights (what an upload copies to the device).
    pub bytes: usize,
    /// Bytes of host memory the parse holds: the whole file's buffer, header included, which the weights
    /// share (what a host tier counts).
    pub held_bytes: usize,
    /// The base model the adapter was trained on, as its config says.
    pub base_model: Option<String>,
    /// How the weights file was read: from the page cache or straight from the disk.
    pub read: ReadPath,
    /// Which types cannot hold some of its weights ([`HostAdapter::check_storage`]; `range_flags`).
    range: u8,
}

impl HostAdapter {
    /// Checks that every weight keeps a finite value once converted to `storage`, the type the model is
    /// served in: an adapter stored in bf16 or f32 may hold values past f16's largest (65504), which an
    /// f16 model would turn into infinities, and from them every token of its requests into NaN. (NaN and
    /// infinite values in the file are refused by the parse whatever the storage; what each type holds
    /// comes from that same pass, so this reads no weight unless it refuses.)
    pub fn check_storage(&self, storage: DType) -> Result<()> {
        let bit = beyond(storage);
        if self.range & bit == 0 {
            return Ok(());
        }
        // Rare: find the tensor to name (one more pass).
        let name = self
            .layers
            .iter()
            .flatten()
            .flatten()
            .flat_map(|p| [&p.a, &p.b])
            .find(|t| range_flags(t.dtype, t.data()) & bit != 0)
            .map_or("a weight", |t| t.name.as_str());
        let (served, wider) = match storage {
            DType::F16 => ("float16", "bfloat16 or float32"),
            DType::BF16 => ("bfloat16", "float32"),
            DType::F32 => ("float32", "a wider type"),
        };
        Err(EngineError::InvalidAdapter(format!(
            "{name} holds values beyond the range of {served}, the type the model is served in (serve it in \
             {wider}, or rescale the adapter)"
        )))
    }

    /// Elements of its weights (both halves of every pair).
    pub fn elements(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .flatten()
            .map(|p| p.a.shape.iter().product::<usize>() + p.b.shape.iter().product::<usize>())
            .sum()
    }

    /// Reads and checks the PEFT adapter in `dir` against the base model `cfg`, refusing ranks above
    /// `max_rank`. Pickle-only adapters, unsupported PEFT features, unknown target modules, missing
    /// pairs and shapes that do not fit the base model are errors naming the problem.
    pub fn load(dir: &Path, cfg: &ModelConfig, max_rank: usize) -> Result<Self> {
        Self::load_with(dir, cfg, max_rank, None)
    }

    /// [`HostAdapter::load`], giving `sink` the weights file's bytes as they are read (a device upload that
    /// runs beside the read, [`crate::engine::AdapterUploader::load_and_upload`]).
    pub fn load_with(dir: &Path, cfg: &ModelConfig, max_rank: usize, sink: Option<&dyn PieceSink>) -> Result<Self> {
        let (raw, weights_path) = read_config_and_find_weights(dir)?;
        let file = AdapterFile::read(&weights_path, max_adapter_file_bytes(cfg, max_rank), sink, None)?;
        build(dir, cfg, &raw, &file, max_rank, true)
    }
}

/// `dir`'s checked config and the path of its weights file, in the order that decides which failure a
/// broken adapter reports, whichever way it is loaded: no config (not found), an invalid config
/// (invalid), then no weights file (not found; invalid when only pickle weights are there).
fn read_config_and_find_weights(dir: &Path) -> Result<(RawConfig, PathBuf)> {
    let config_path = dir.join("adapter_config.json");
    let weights_path = dir.join("adapter_model.safetensors");
    if !config_path.is_file() {
        return Err(EngineError::Io {
            path: config_path,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no adapter_config.json"),
        });
    }
    let raw = read_config(dir, &config_path)?;
    if !weights_path.is_file() {
        if dir.join("adapter_model.bin").is_file() {
            return Err(invalid(
                dir,
                "only pickle weights (adapter_model.bin) are present, and pickle files are never loaded; \
                 convert them with peft: `PeftModel.from_pretrained(base, path).save_pretrained(out, \
                 safe_serialization=True)` to get adapter_model.safetensors",
            ));
        }
        return Err(EngineError::Io {
            path: weights_path,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no adapter_model.safetensors"),
        });
    }
    Ok((raw, weights_path))
}

fn read_config(dir: &Path, config_path: &Path) -> Result<RawConfig> {
    let text = std::fs::read_to_string(config_path).map_err(|source| EngineError::Io {
        path: config_path.to_path_buf(),
        source,
    })?;
    let raw: RawConfig = serde_json::from_str(&text)
        .map_err(|e| invalid(dir, format!("adapter_config.json is not a PEFT LoRA config: {e}")))?;
    check_features(dir, &raw)?;
    Ok(raw)
}

/// Where an adapter's weights lie in its file, from the file's header alone ([`AdapterLayout::read`]): what
/// a streamed load ([`crate::engine::AdapterUploader::load_streamed`]) places on the device before the
/// weights are read, and the order it reads them in.
#[derive(Debug)]
pub struct AdapterLayout {
    /// Each pair's (layer, target, scale), with the file ranges of its A and B.
    pub pairs: Vec<(usize, Target, f32, [FileSpan; 2])>,
    /// The weights file's length.
    pub len: usize,
    /// Where the file's data begins (after the safetensors header).
    pub data_start: usize,
    /// Bytes of weights.
    pub bytes: usize,
    raw: RawConfig,
    header: BTreeMap<String, HeaderEntry>,
}

/// A tensor's place, shape and type in a safetensors header (the type's name when unsupported).
type HeaderEntry = (Range<usize>, Vec<usize>, std::result::Result<DType, String>);

/// One tensor's place in an adapter file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileSpan {
    pub range: Range<usize>,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl AdapterLayout {
    /// Reads `dir`'s config and the header of its weights file (not the weights) and checks them as
    /// [`HostAdapter::load`] does, all but the weights' values.
    pub fn read(dir: &Path, cfg: &ModelConfig, max_rank: usize) -> Result<Self> {
        let (raw, weights_path) = read_config_and_find_weights(dir)?;
        let file = AdapterFile::read_header(&weights_path, max_adapter_file_bytes(cfg, max_rank))?;
        let host = build(dir, cfg, &raw, &file, max_rank, false)?;
        let span = |t: &AdapterTensor| FileSpan {
            range: t.file_range().unwrap_or(0..0),
            dtype: t.dtype,
            shape: t.shape.clone(),
        };
        let mut pairs = Vec::new();
        for (l, layer) in host.layers.iter().enumerate() {
            for target in Target::ALL {
                if let Some(p) = &layer[target.index()] {
                    pairs.push((l, target, p.scale, [span(&p.a), span(&p.b)]));
                }
            }
        }
        Ok(Self {
            pairs,
            len: file.len,
            data_start: file.data_start,
            bytes: host.bytes,
            raw,
            header: file.header(),
        })
    }

    /// The largest rank of its pairs.
    pub fn max_rank(&self) -> usize {
        self.pairs.iter().map(|(_, _, _, [a, _])| a.shape[0]).max().unwrap_or(0)
    }

    /// Elements of its weights (both halves of every pair).
    pub fn elements(&self) -> usize {
        self.pairs
            .iter()
            .flat_map(|(_, _, _, s)| s.iter())
            .map(|s| s.shape.iter().product::<usize>())
            .sum()
    }

    /// The base model the adapter was trained on, as its config says.
    pub fn base_model(&self) -> Option<&str> {
        self.raw.base_model_name_or_path.as_deref()
    }

    /// The weights file's byte ranges in the order its layers are used: the header, then layer by layer.
    pub fn read_order(&self) -> Vec<Range<usize>> {
        let mut order = Vec::with_capacity(1 + 2 * self.pairs.len());
        order.push(0..self.data_start);
        let mut spans: Vec<(usize, Range<usize>)> = self
            .pairs
            .iter()
            .flat_map(|(l, _, _, s)| s.iter().map(move |s| (*l, s.range.clone())))
            .collect();
        spans.sort_by_key(|(l, r)| (*l, r.start));
        order.extend(spans.into_iter().map(|(_, r)| r));
        order
    }

    /// Reads the weights file of `dir` (laid out as `self`) in [`AdapterLayout::read_order`], giving `sink`
    /// every piece as it comes, then checks the whole adapter as [`HostAdapter::load`] does. The file must
    /// still have the header read before.
    pub fn read_weights(
        &self,
        dir: &Path,
        cfg: &ModelConfig,
        max_rank: usize,
        sink: &dyn PieceSink,
    ) -> Result<HostAdapter> {
        let path = dir.join("adapter_model.safetensors");
        let order = self.read_order();
        // The sink was started with the header's length: it gets the pieces only.
        struct Started<'a>(&'a dyn PieceSink);
        impl PieceSink for Started<'_> {
            fn start(&self, _: usize) {}
            fn piece(&self, offset: usize, bytes: &[u8]) {
                self.0.piece(offset, bytes);
            }
        }
        let sink = Started(sink);
        let file = AdapterFile::read(&path, max_adapter_file_bytes(cfg, max_rank), Some(&sink), Some(&order))?;
        if file.len != self.len || file.header() != self.header {
            return Err(invalid(dir, "adapter_model.safetensors changed while it was read"));
        }
        build(dir, cfg, &self.raw, &file, max_rank, true)
    }
}

/// Where a tensor lies in an [`AdapterFile`].
struct Entry {
    /// The dtype, or its safetensors name when the engine does not support it.
    dtype: std::result::Result<DType, String>,
    shape: Vec<usize>,
    range: Range<usize>,
}

/// Bytes of a safetensors header beyond its tensors' entries that an adapter file may have (peft writes
/// a few hundred; safetensors itself allows 100 MB).
const HEADER_ALLOWANCE: usize = 16 << 20;

/// The largest `adapter_model.safetensors` an adapter of rank at most `max_rank` can need for the model
/// `cfg`: both halves of every projection of every layer in f32, and [`HEADER_ALLOWANCE`]. A larger file
/// is refused before it is read (an adapter comes from whoever published it).
pub fn max_adapter_file_bytes(cfg: &ModelConfig, max_rank: usize) -> usize {
    let per_layer: usize = Target::ALL
        .iter()
        .map(|t| {
            let (out, inp) = t.shape(cfg);
            (out + inp) * max_rank * 4
        })
        .sum();
    per_layer
        .saturating_mul(cfg.num_layers)
        .saturating_add(HEADER_ALLOWANCE)
}

/// `adapter_model.safetensors` read whole into one buffer, and where each tensor lies in it.
struct AdapterFile {
    buf: Arc<Mmap>,
    index: BTreeMap<String, Entry>,
    read: ReadPath,
    /// The file's length, and where its data begins (after the header).
    len: usize,
    data_start: usize,
}

impl AdapterFile {
    /// Reads the file ([`read_whole`]) into a fresh anonymous mapping, asking the kernel for 2 MiB pages.
    /// Faulting in fresh memory 4 KiB at a time is most of a parse's cost: on the H200 host, copying each
    /// tensor out of a file mapping into a `Vec` of its own took 15-21 ms for a 27 MB adapter, this read
    /// 15-17 ms with 4 KiB pages and 7-9 ms with huge pages (bench_parse_mistral_adapter in
    /// tests/lora_upload.rs, the parses kept as a host tier keeps them). Nothing stays mapped from the
    /// file, so a file rewritten later cannot fault a parsed adapter.
    /// Files of more than `limit` bytes are refused unread. `sink`, if any, gets the file's length and
    /// then every piece as it is read.
    /// `order`, if any: the file's byte ranges in the order wanted (a streamed load's layers, first used
    /// first); pieces are then read in that order ([`read_whole`]).
    fn read(path: &Path, limit: usize, sink: Option<&dyn PieceSink>, order: Option<&[Range<usize>]>) -> Result<Self> {
        let io = io_error(path);
        let (file, meta, len, mut buf) = Self::open(path, limit)?;
        if let Some(sink) = sink {
            sink.start(len);
        }
        let read = read_whole(path, &file, &meta, &mut buf, len, sink, order).map_err(io)?;
        Self::index(path, buf, len, read)
    }

    /// The file's header alone, in a buffer of the file's length whose data is zeros: tensors of it have
    /// the file's shapes, types and ranges, not its values.
    fn read_header(path: &Path, limit: usize) -> Result<Self> {
        let io = io_error(path);
        let (file, _, len, mut buf) = Self::open(path, limit)?;
        let mut n = [0u8; 8];
        read_exact_at(&file, &mut n, 0).map_err(io)?;
        let header = usize::try_from(u64::from_le_bytes(n))
            .ok()
            .and_then(|h| h.checked_add(8))
            .filter(|&end| end <= len)
            .ok_or_else(|| corrupt_error(path)("the header's length is past the file's end".into()))?;
        read_exact_at(&file, &mut buf[..header], 0).map_err(io)?;
        Self::index(path, buf, len, ReadPath::Direct)
    }

    /// Opens the file, refusing one of more than `limit` bytes, with a zeroed buffer for its `len` bytes.
    fn open(path: &Path, limit: usize) -> Result<(std::fs::File, std::fs::Metadata, usize, MmapMut)> {
        let (io, corrupt) = (io_error(path), corrupt_error(path));
        let file = std::fs::File::open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        let len = usize::try_from(meta.len()).map_err(|_| corrupt("the file does not fit in memory".into()))?;
        if len > limit {
            return Err(corrupt(format!(
                "{len} bytes, more than the {limit} that an adapter within --max-lora-rank takes for this model"
            )));
        }
        let buf = MmapMut::map_anon(len.max(1).next_multiple_of(READ_ALIGN)).map_err(io)?;
        // A hint: kernels without transparent huge pages refuse it, and 4 KiB pages work the same.
        #[cfg(target_os = "linux")]
        let _ = buf.advise(memmap2::Advice::HugePage);
        Ok((file, meta, len, buf))
    }

    /// The header's (name → range, shape, type) (what a streamed load checks did not change under it).
    fn header(&self) -> BTreeMap<String, HeaderEntry> {
        self.index
            .iter()
            .map(|(k, e)| (k.clone(), (e.range.clone(), e.shape.clone(), e.dtype.clone())))
            .collect()
    }

    /// The file read into `buf` (its first `len` bytes), indexed by its header.
    fn index(path: &Path, buf: MmapMut, len: usize, read: ReadPath) -> Result<Self> {
        let (io, corrupt) = (io_error(path), corrupt_error(path));
        let buf = Arc::new(buf.make_read_only().map_err(io)?);
        // read_metadata validates the header and that the tensors tile the data exactly.
        let (header_len, meta) = SafeTensors::read_metadata(&buf[..len]).map_err(|e| corrupt(e.to_string()))?;
        let base = 8 + header_len;
        let mut index = BTreeMap::new();
        for (name, info) in meta.tensors() {
            let dtype = match info.dtype {
                Dtype::BF16 => Ok(DType::BF16),
                Dtype::F16 => Ok(DType::F16),
                Dtype::F32 => Ok(DType::F32),
                other => Err(format!("{other:?}")),
            };
            let (s, e) = info.data_offsets;
            if base + e > len || s > e {
                return Err(corrupt(format!("tensor {name:?} lies outside the file")));
            }
            index.insert(
                name,
                Entry {
                    dtype,
                    shape: info.shape.clone(),
                    range: base + s..base + e,
                },
            );
        }
        Ok(Self {
            buf,
            index,
            read,
            len,
            data_start: base,
        })
    }

    /// The tensor `name`, sharing the buffer.
    fn tensor(&self, name: &str) -> Result<AdapterTensor> {
        let e = self
            .index
            .get(name)
            .ok_or_else(|| EngineError::MissingTensor(name.to_string()))?;
        let dtype = e.dtype.clone().map_err(|dtype| EngineError::UnsupportedDtype {
            name: name.to_string(),
            dtype,
        })?;
        Ok(AdapterTensor {
            name: name.to_string(),
            dtype,
            shape: e.shape.clone(),
            bytes: TensorBytes::Shared(Arc::clone(&self.buf), e.range.clone()),
        })
    }
}

/// An I/O error of the file at `path`.
fn io_error(path: &Path) -> impl Fn(std::io::Error) -> EngineError + Copy + '_ {
    move |source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The file at `path` is not a valid weights file, for `reason`.
fn corrupt_error(path: &Path) -> impl Fn(String) -> EngineError + Copy + '_ {
    move |reason| EngineError::CorruptWeights {
        path: path.to_path_buf(),
        reason,
    }
}

/// Bytes of one positioned read of an adapter file straight from the disk.
const DIRECT_PIECE: usize = 1 << 20;
/// The alignment of every read straight from the disk: its start, its length and its buffer (O_DIRECT
/// needs the device's logical block, at most 4 KiB).
const READ_ALIGN: usize = 4096;
/// Reads straight from the disk in flight at once, over all files: their own pool, as they wait on the
/// disk, not on cores, and a disk serves more of them at once than a small machine has cores.
const DIRECT_THREADS: usize = 16;
/// Bytes of one read through the page cache (on the global pool: a copy, bound by cores).
const CACHED_PIECE: usize = 4 << 20;
/// Bytes of one read of a streamed load ([`AdapterLayout::read_weights`]): small, so that the first
/// layers' pieces, read first, come long before the file's end (a rank-16 q/k/v/o layer of a 7B model is
/// about 0.85 MB).
const ORDERED_PIECE: usize = 256 << 10;

/// How an adapter file was read (logged with the load's time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadPath {
    /// Through the page cache: the file was (mostly) there.
    Cached,
    /// Straight from the disk (O_DIRECT): the file was not in the page cache.
    Direct,
}

impl ReadPath {
    /// `Cached` or `Direct` (for logs).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cached => "Cached",
            Self::Direct => "Direct",
        }
    }
}

/// The pool that adapter files are read on straight from the disk (None: it could not be built; the
/// reads then run on the global pool).
fn direct_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(DIRECT_THREADS)
            .thread_name(|i| format!("adapter-read-{i}"))
            .build()
            .ok()
    })
    .as_ref()
}

/// Fills `buf[..len]` from the start of the file at `path` (opened as `file`, of metadata `meta`); `buf` is
/// page-aligned and its length `len` rounded up to [`READ_ALIGN`]. On Linux a file that is mostly not in the page cache is
/// read with O_DIRECT, in [`DIRECT_PIECE`] pieces on [`DIRECT_THREADS`] threads: the disk sees them all
/// at once, without the page cache's copy and readahead windows. On this project's 2-core test machine a
/// cold 27 MB adapter then parsed in 11.0-11.6 ms, against 17.5-19.1 ms with 4 MiB pieces through the
/// page cache (`bench_parse_mistral_adapter` in tests/lora_upload.rs; the disk's own figures by read
/// pattern: scripts/gpu/disk_read.py). A file in the page cache is read through it in [`CACHED_PIECE`]
/// pieces in parallel, so that faulting in the fresh memory is spread over cores. Where O_DIRECT is
/// refused (tmpfs, other systems), the read goes through the page cache. A file read straight from the
/// disk is not left in the page cache: the shard's host tier is the cache of parsed adapters.
///
/// With `order` (a streamed load's: the file's ranges, first wanted first), pieces are read in the order of
/// the first range each holds, [`ORDERED_PIECE`] bytes each, by [`DIRECT_THREADS`] readers taking the next
/// piece as they finish one: the early ranges come first rather than all at about the end.
fn read_whole(
    path: &Path,
    file: &std::fs::File,
    meta: &std::fs::Metadata,
    buf: &mut [u8],
    len: usize,
    sink: Option<&dyn PieceSink>,
    order: Option<&[Range<usize>]>,
) -> std::io::Result<ReadPath> {
    #[cfg(target_os = "linux")]
    if resident_share(file, meta, len) < 0.5 {
        if let Some(direct) = open_direct(path, meta) {
            match read_pieces(&direct, buf, len, true, sink, order) {
                Ok(()) => return Ok(ReadPath::Direct),
                // Misaligned for this device or file system: read it again through the page cache.
                Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {}
                Err(e) => return Err(e),
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (path, meta);
    read_pieces(file, buf, len, false, sink, order).map(|()| ReadPath::Cached)
}

/// Fills `buf` from `file` at `offset` (a short file is an error).
fn read_exact_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileExt;
        file.read_exact_at(buf, offset)
    }
    #[cfg(not(unix))]
    {
        use std::io::{Read, Seek};
        let mut file = file;
        file.seek(std::io::SeekFrom::Start(offset))?;
        file.read_exact(buf)
    }
}

/// The indices of the pieces of `size` bytes covering `end` bytes, sorted by when `order` (ranges of the
/// file, first wanted first) first wants a byte of each; pieces it never names come last, in file order.
fn piece_order(end: usize, size: usize, order: &[Range<usize>]) -> Vec<usize> {
    let n = end.div_ceil(size);
    let mut first = vec![usize::MAX; n];
    let mut at = 0usize;
    for r in order {
        if r.is_empty() {
            continue;
        }
        for f in &mut first[(r.start / size).min(n)..r.end.div_ceil(size).min(n)] {
            if *f == usize::MAX {
                *f = at;
                at += 1;
            }
        }
    }
    let mut pieces: Vec<usize> = (0..n).collect();
    pieces.sort_by_key(|&p| (first[p], p));
    pieces
}

/// Reads `buf[..len]` in pieces in parallel (see [`read_whole`]). `direct`: each piece's length is rounded
/// up to [`READ_ALIGN`] (`buf` has room), and a piece may end early at the end of the file. Each piece
/// read goes to `sink`, if any.
fn read_pieces(
    file: &std::fs::File,
    buf: &mut [u8],
    len: usize,
    direct: bool,
    sink: Option<&dyn PieceSink>,
    order: Option<&[Range<usize>]>,
) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use rayon::prelude::*;
        use std::os::unix::fs::FileExt;
        let (end, size) = match (direct, order) {
            (true, None) => (len.next_multiple_of(READ_ALIGN), DIRECT_PIECE),
            (true, Some(_)) => (len.next_multiple_of(READ_ALIGN), ORDERED_PIECE),
            (false, None) => (len, CACHED_PIECE),
            (false, Some(_)) => (len, ORDERED_PIECE),
        };
        let piece = |(i, chunk): (usize, &mut [u8])| -> std::io::Result<()> {
            let start = i * size;
            let want = chunk.len().min(len - start);
            let mut got = 0;
            while got < want {
                match file.read_at(&mut chunk[got..], (start + got) as u64) {
                    Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if let Some(sink) = sink {
                sink.piece(start, &chunk[..want]);
            }
            Ok(())
        };
        if let Some(order) = order {
            // A queue of the pieces in the wanted order, taken one at a time by each reader.
            let mut chunks: Vec<Option<(usize, &mut [u8])>> =
                buf[..end].chunks_mut(size).enumerate().map(Some).collect();
            let queue: Vec<(usize, &mut [u8])> = piece_order(end, size, order)
                .into_iter()
                .filter_map(|p| chunks.get_mut(p).and_then(Option::take))
                .collect();
            let queue = std::sync::Mutex::new(queue.into_iter());
            let failed: std::sync::Mutex<Option<std::io::Error>> = std::sync::Mutex::new(None);
            let reader = || loop {
                let next = queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner).next();
                let Some(p) = next else { return };
                if let Err(e) = piece(p) {
                    failed
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .get_or_insert(e);
                    // The others stop at their next piece.
                    queue
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .by_ref()
                        .for_each(drop);
                    return;
                }
            };
            match direct_pool().filter(|_| direct) {
                Some(pool) => pool.scope(|s| {
                    for _ in 0..DIRECT_THREADS {
                        s.spawn(|_| reader());
                    }
                }),
                None => std::thread::scope(|s| {
                    for _ in 0..DIRECT_THREADS.min(4) {
                        s.spawn(reader);
                    }
                }),
            }
            return failed
                .into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .map_or(Ok(()), Err);
        }
        let mut run = move || buf[..end].par_chunks_mut(size).enumerate().try_for_each(piece);
        match direct_pool().filter(|_| direct) {
            Some(pool) => pool.install(run),
            None => run(),
        }
    }
    #[cfg(not(unix))]
    {
        use std::io::{Read, Seek};
        let _ = (direct, order);
        let mut file = file;
        file.rewind()?;
        file.read_exact(&mut buf[..len])?;
        if let Some(sink) = sink {
            sink.piece(0, &buf[..len]);
        }
        Ok(())
    }
}

/// The share of the first `len` bytes of `file` in the page cache (1 when it cannot be told).
///
/// Since Linux 5.0, `mincore` tells the page cache's residency only for files the caller owns or may
/// write (or as root); for others it reports the caller's own mappings, which would read as "not cached"
/// here. Such files count as cached (read through the page cache, as before O_DIRECT reads), so a cached
/// file is never read from the disk again (checked by owner, root and world-write only: a file writable
/// through its group alone also counts as cached).
#[cfg(target_os = "linux")]
fn resident_share(file: &std::fs::File, meta: &std::fs::Metadata, len: usize) -> f64 {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if len == 0 || !(euid == 0 || meta.uid() == euid || meta.mode() & 0o002 != 0) {
        return 1.0;
    }
    // SAFETY: the mapping is never read or written; it only names the file's pages for mincore, which
    // reports their residency without touching them, so a file changed meanwhile cannot fault us.
    let Ok(map) = (unsafe { memmap2::MmapOptions::new().len(len).map(file) }) else {
        return 1.0;
    };
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
        .unwrap_or(4096)
        .max(1);
    let mut resident = vec![0u8; len.div_ceil(page)];
    // SAFETY: `map` is a live mapping of `len` bytes starting at a page boundary, and `resident` has one
    // byte for each of its pages, as mincore requires.
    if unsafe { libc::mincore(map.as_ptr() as *mut libc::c_void, len, resident.as_mut_ptr()) } != 0 {
        return 1.0;
    }
    resident.iter().filter(|&&b| b & 1 != 0).count() as f64 / resident.len() as f64
}

/// `path` opened again with O_DIRECT, if the system allows it and it is still the file of `meta`.
#[cfg(target_os = "linux")]
fn open_direct(path: &Path, meta: &std::fs::Metadata) -> Option<std::fs::File> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let direct = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()?;
    let again = direct.metadata().ok()?;
    (meta.dev() == again.dev() && meta.ino() == again.ino()).then_some(direct)
}

fn check_features(dir: &Path, raw: &RawConfig) -> Result<()> {
    if let Some(t) = raw.peft_type.as_deref().filter(|t| *t != "LORA") {
        return Err(invalid(dir, format!("peft_type {t} is not supported (only LORA)")));
    }
    if raw.use_dora {
        return Err(invalid(dir, "DoRA adapters (use_dora) are not supported"));
    }
    if raw.fan_in_fan_out {
        return Err(invalid(dir, "fan_in_fan_out adapters are not supported"));
    }
    if let Some(b) = raw.bias.as_deref().filter(|b| *b != "none") {
        return Err(invalid(dir, format!("bias {b:?} is not supported (only \"none\")")));
    }
    if raw.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(invalid(
            dir,
            "modules_to_save (fully trained extra modules) is not supported",
        ));
    }
    if raw.layers_to_transform.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(invalid(dir, "layers_to_transform is not supported"));
    }
    if raw.r == 0 {
        return Err(invalid(dir, "r must be positive"));
    }
    Ok(())
}

/// Whether peft would wrap `module` (e.g. `model.layers.3.mlp.up_proj`) given `target_modules`.
fn targeted(targets: Option<&TargetModules>, regex: Option<&Regex>, module: &str) -> bool {
    match (targets, regex) {
        (Some(TargetModules::Regex(_)), Some(re)) => re.is_match(module),
        (Some(TargetModules::List(list)), _) => list.iter().any(|t| module == t || module.ends_with(&format!(".{t}"))),
        _ => true,
    }
}

/// [`range_flags`]: some element is NaN or infinite.
const NOT_FINITE: u8 = 1;
/// [`range_flags`]: some element's magnitude is 65520 or more, which rounds to infinity in f16.
const BEYOND_F16: u8 = 2;
/// [`range_flags`]: some element's magnitude rounds to infinity in bf16 (past halfway beyond its largest).
const BEYOND_BF16: u8 = 4;

/// What the elements of `data` (little-endian `dtype`) hold beyond each type's range, as flags. One fold of
/// compares over every element (no early exit; the magnitudes' bits compared as non-negative signed
/// integers, which baseline x86-64 compares in vectors), so that it compiles to vector code.
fn range_flags(dtype: DType, data: &[u8]) -> u8 {
    match dtype {
        DType::BF16 | DType::F16 => {
            let top: i16 = if dtype == DType::BF16 { 0x7F80 } else { 0x7C00 };
            // bf16 0x4780 is 65536, the first magnitude past f16's 65504 (0x477F is 65280); an f16 value
            // fits f16 and bf16 alike.
            let f16_top: i16 = if dtype == DType::BF16 { 0x4780 } else { 0x7C00 };
            data.chunks_exact(2).fold(0u8, |h, w| {
                let x = (u16::from_le_bytes([w[0], w[1]]) & 0x7FFF) as i16;
                h | u8::from(x >= top) | (u8::from(x >= f16_top) << 1)
            })
        }
        DType::F32 => data.chunks_exact(4).fold(0u8, |h, w| {
            let x = (u32::from_le_bytes([w[0], w[1], w[2], w[3]]) & 0x7FFF_FFFF) as i32;
            // f32 bits of 65520.0, and of bf16's rounding point of infinity (halfway past 0x7F7F).
            h | u8::from(x >= 0x7F80_0000) | (u8::from(x >= 0x477F_F000) << 1) | (u8::from(x >= 0x7F7F_8000) << 2)
        }),
    }
}

/// The [`range_flags`] bit of the values that `storage` cannot hold (0: it holds any finite value).
fn beyond(storage: DType) -> u8 {
    match storage {
        DType::F16 => BEYOND_F16,
        DType::BF16 => BEYOND_BF16,
        DType::F32 => 0,
    }
}

/// The adapter of `file` checked against `cfg`; `check_values`: its weights' values too (not for a file
/// of which only the header was read, [`AdapterFile::read_header`]).
fn build(
    dir: &Path,
    cfg: &ModelConfig,
    raw: &RawConfig,
    file: &AdapterFile,
    max_rank: usize,
    check_values: bool,
) -> Result<HostAdapter> {
    let ranks = Patterns::new(dir, &raw.rank_pattern)?;
    let alphas = Patterns::new(dir, &raw.alpha_pattern)?;
    let regex = match &raw.target_modules {
        Some(TargetModules::Regex(r)) => Some(adapter_regex(dir, "target_modules", r, &format!("^(?:{r})$"))?),
        _ => None,
    };
    let mut layers: Vec<[Option<HostLora>; NUM_TARGETS]> = (0..cfg.num_layers).map(|_| Default::default()).collect();
    let mut seen_a = std::collections::HashSet::new();
    for name in file.index.keys() {
        let (module, which) = parse_name(name).ok_or_else(|| {
            invalid(
                dir,
                format!(
                    "tensor {name:?} is not a LoRA weight of a q/k/v/o/gate/up/down projection (unsupported target)"
                ),
            )
        })?;
        if which == 'B' {
            continue;
        }
        seen_a.insert(module.clone());
        let (layer, target) = locate(dir, cfg, &module)?;
        if !targeted(raw.target_modules.as_ref(), regex.as_ref(), &module) {
            return Err(invalid(
                dir,
                format!("weights for {module} are present but target_modules does not name it"),
            ));
        }
        let r = ranks.get(&module).unwrap_or(raw.r);
        let alpha = alphas.get(&module).unwrap_or(raw.lora_alpha);
        if r > max_rank {
            return Err(invalid(
                dir,
                format!("rank {r} of {module} is above this server's maximum LoRA rank {max_rank}"),
            ));
        }
        let (out, inp) = target.shape(cfg);
        let a_name = format!("base_model.model.{module}.lora_A.weight");
        let b_name = format!("base_model.model.{module}.lora_B.weight");
        if !file.index.contains_key(&b_name) {
            return Err(invalid(dir, format!("{a_name} has no matching lora_B")));
        }
        let a = file.tensor(&a_name)?;
        let b = file.tensor(&b_name)?;
        if let ([ra, i], [o, rb]) = (a.shape.as_slice(), b.shape.as_slice()) {
            if (*i, *o) == (inp, out) && ra == rb && *ra != r {
                return Err(invalid(
                    dir,
                    format!("{module}: lora_A and lora_B have rank {ra} where adapter_config.json says {r}"),
                ));
            }
        }
        if a.shape != [r, inp] || b.shape != [out, r] {
            return Err(invalid(
                dir,
                format!(
                    "{module}: lora_A is {:?} and lora_B {:?}, where this model takes [{r}, {inp}] and [{out}, {r}] \
                     (an adapter of another base model?)",
                    a.shape, b.shape
                ),
            ));
        }
        #[allow(clippy::cast_precision_loss)]
        let scale = if raw.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        #[allow(clippy::cast_possible_truncation)]
        let scale = scale as f32;
        if !scale.is_finite() {
            return Err(invalid(
                dir,
                format!("lora_alpha {alpha} and rank {r} of {module} give a scale that is not a finite number"),
            ));
        }
        layers[layer][target.index()] = Some(HostLora { a, b, scale });
    }
    for name in file.index.keys() {
        if let Some((module, 'B')) = parse_name(name) {
            if !seen_a.contains(&module) {
                return Err(invalid(dir, format!("{name} has no matching lora_A")));
            }
        }
    }
    let pairs: Vec<&HostLora> = layers.iter().flatten().flatten().collect();
    if pairs.is_empty() {
        return Err(invalid(dir, "adapter_model.safetensors holds no LoRA weights"));
    }
    // Each tensor's range flags, in one pass over the weights. A weight that is NaN or infinite (a training
    // run that diverged) would make every token of the adapter's requests NaN: refused here, naming the
    // first such tensor. What the narrower types cannot hold is kept for [`HostAdapter::check_storage`].
    let range = if !check_values {
        0
    } else {
        use rayon::prelude::*;
        let tensors: Vec<&AdapterTensor> = pairs.iter().flat_map(|p| [&p.a, &p.b]).collect();
        let flags: Vec<u8> = tensors.par_iter().map(|t| range_flags(t.dtype, t.data())).collect();
        if let Some(i) = flags.iter().position(|f| f & NOT_FINITE != 0) {
            return Err(invalid(
                dir,
                format!("{} holds values that are NaN or infinite", tensors[i].name),
            ));
        }
        flags.iter().fold(0, |a, f| a | f)
    };
    Ok(HostAdapter {
        max_rank: pairs.iter().map(|p| p.a.shape[0]).max().unwrap_or(0),
        bytes: pairs.iter().map(|p| p.a.data().len() + p.b.data().len()).sum(),
        // The tensors share the file's one buffer, header and all.
        held_bytes: file.buf.len(),
        layers,
        base_model: raw.base_model_name_or_path.clone(),
        read: file.read,
        range,
    })
}

/// `base_model.model.<module>.lora_{A,B}.weight` → (module, 'A' | 'B').
fn parse_name(name: &str) -> Option<(String, char)> {
    let rest = name.strip_prefix("base_model.model.")?;
    let (module, which) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
        (m, 'A')
    } else {
        (rest.strip_suffix(".lora_B.weight")?, 'B')
    };
    Some((module.to_string(), which))
}

/// `model.layers.<i>.<target module>` → (i, target).
fn locate(dir: &Path, cfg: &ModelConfig, module: &str) -> Result<(usize, Target)> {
    let unsupported = || {
        invalid(
            dir,
            format!("LoRA on {module} is not supported (only the projections of decoder layers)"),
        )
    };
    let rest = module.strip_prefix("model.layers.").ok_or_else(unsupported)?;
    let (layer, target) = rest.split_once('.').ok_or_else(unsupported)?;
    let layer: usize = layer.parse().map_err(|_| unsupported())?;
    let target = Target::from_module(target).ok_or_else(unsupported)?;
    if layer >= cfg.num_layers {
        return Err(invalid(
            dir,
            format!(
                "{module}: layer {layer} does not exist (the base model has {})",
                cfg.num_layers
            ),
        ));
    }
    Ok((layer, target))
}

/// One projection's LoRA pair on a backend (this rank's slice).
#[derive(Debug)]
pub struct LoraWeights<B: Backend> {
    /// `[r, in]` (the input slice for row-parallel projections).
    pub a: B::Tensor,
    /// `[out, r]` (the output slice for column-parallel projections).
    pub b: B::Tensor,
    /// Multiplier of `B·A`.
    pub scale: f32,
}

/// An adapter uploaded to a backend.
#[derive(Debug)]
pub struct DeviceAdapter<B: Backend> {
    /// Per layer, per [`Target`] index.
    pub layers: Vec<[Option<LoraWeights<B>>; NUM_TARGETS]>,
    /// Bytes of weights uploaded (as stored on the host).
    pub bytes: usize,
    /// The backend's index of `layers` ([`Backend::lora_index`]), for its per-step LoRA plan.
    pub index: Option<B::LoraIndex>,
    /// While its weights are still arriving (a streamed load): what a forward pass waits on before each
    /// layer, and at its end for all of them ([`crate::model::Model::forward`]).
    pub gate: Option<Arc<dyn AdapterGate>>,
}

/// The weights of an adapter placed on the device before they were all read (a streamed load,
/// [`crate::engine::AdapterUploader::load_streamed`]).
pub trait AdapterGate: Send + Sync + std::fmt::Debug {
    /// Whether every weight has arrived and was checked (then nothing need wait).
    fn done(&self) -> bool;
    /// Makes device work queued next wait until layer `layer`'s weights are on the device: waits on the
    /// host until they have been read and their copies queued, then orders the backend's stream after
    /// them. An error when the read failed.
    fn wait_layer(&self, layer: usize) -> Result<()>;
    /// As [`AdapterGate::wait_layer`] for the whole adapter, once it was read and its values checked: the
    /// error of the read or of the check, if either failed (the pass that used it must not return tokens).
    fn wait_all(&self) -> Result<()>;
    /// Waits on the host for the read's outcome, ordering no device work: the shard's answer to its loaders.
    /// A read that stalls fails the gate here too (see the backend's gate).
    fn wait_end(&self) -> Result<()>;
}

impl<B: Backend> DeviceAdapter<B> {
    /// Uploads `host` for shard `rank` of `world_size`, sliced as S-LoRA does: column-parallel
    /// projections split B's rows (A whole); row-parallel ones split A's columns (B whole), so each
    /// rank's partial `x·Aᵀ·Bᵀ` joins the base output's partial sum before the all-reduce.
    /// `kv` is (part, parts) of the key/value heads this rank holds (see [`crate::model::Model::load`]).
    ///
    /// Every tensor goes up in one [`Backend::upload_many`] call, which needs neither the engine nor its
    /// lock (see [`crate::engine::AdapterUploader`]).
    pub fn upload(backend: &B, host: &HostAdapter, rank: usize, world_size: usize, kv: (usize, usize)) -> Result<Self> {
        // This rank's slices, A then B of each pair, in layer and target order.
        let mut slices = Vec::new();
        let mut placed = Vec::new();
        for (l, layer) in host.layers.iter().enumerate() {
            for target in Target::ALL {
                let Some(pair) = &layer[target.index()] else { continue };
                let (a, b) = match target {
                    Target::O | Target::Down => (shard(pair.a.view(), 1, rank, world_size)?, pair.b.view()),
                    Target::K | Target::V => (pair.a.view(), shard(pair.b.view(), 0, kv.0, kv.1)?),
                    _ => (pair.a.view(), shard(pair.b.view(), 0, rank, world_size)?),
                };
                slices.push(a);
                slices.push(b);
                placed.push((l, target, pair.scale));
            }
        }
        let bytes = slices.iter().map(|t| t.data.len()).sum();
        let tensors = backend.upload_many(&slices)?;
        Self::assemble(backend, host.layers.len(), &placed, tensors, bytes)
    }

    /// `host` from a [`FileUpload`] that took its weights file as it was read (one rank: nothing is
    /// sliced). An error when the upload failed or cannot serve these tensors; then upload `host` with
    /// [`DeviceAdapter::upload`].
    pub fn from_file_upload(
        backend: &B,
        host: &HostAdapter,
        upload: Box<dyn FileUpload<B::Tensor> + '_>,
    ) -> Result<Self> {
        let mut wanted = Vec::new();
        let mut placed = Vec::new();
        for (l, layer) in host.layers.iter().enumerate() {
            for target in Target::ALL {
                let Some(pair) = &layer[target.index()] else { continue };
                for t in [&pair.a, &pair.b] {
                    let range = t
                        .file_range()
                        .ok_or_else(|| EngineError::Backend(format!("tensor {} is not in the adapter file", t.name)))?;
                    wanted.push(FileTensor {
                        range,
                        dtype: t.dtype,
                        shape: &t.shape,
                    });
                }
                placed.push((l, target, pair.scale));
            }
        }
        let tensors = upload.finish(&wanted)?;
        Self::assemble(backend, host.layers.len(), &placed, tensors, host.bytes)
    }

    /// The adapter laid out as `layout` in `upload`'s device copy of its file, before the file is read
    /// ([`FileUpload::early`]): its weights arrive behind `gate`. An error when the upload cannot place
    /// them there (then load it as usual).
    pub fn from_layout(
        backend: &B,
        num_layers: usize,
        layout: &AdapterLayout,
        upload: &dyn FileUpload<B::Tensor>,
    ) -> Result<Self> {
        let wanted: Vec<FileTensor<'_>> = layout
            .pairs
            .iter()
            .flat_map(|(_, _, _, spans)| spans.iter())
            .map(|s| FileTensor {
                range: s.range.clone(),
                dtype: s.dtype,
                shape: &s.shape,
            })
            .collect();
        let layer_of: Vec<usize> = layout.pairs.iter().flat_map(|(l, ..)| [*l, *l]).collect();
        let (tensors, gate) = upload.early(layout.data_start, &wanted, &layer_of, num_layers)?;
        let placed: Vec<(usize, Target, f32)> = layout.pairs.iter().map(|&(l, t, s, _)| (l, t, s)).collect();
        let mut device = Self::assemble(backend, num_layers, &placed, tensors, layout.bytes)?;
        device.gate = Some(gate);
        Ok(device)
    }

    /// The adapter from its uploaded tensors: A then B of each `placed` (layer, target, scale), in order.
    fn assemble(
        backend: &B,
        num_layers: usize,
        placed: &[(usize, Target, f32)],
        tensors: Vec<B::Tensor>,
        bytes: usize,
    ) -> Result<Self> {
        if tensors.len() != 2 * placed.len() {
            return Err(EngineError::Backend(format!(
                "the upload returned {} tensors for {}",
                tensors.len(),
                2 * placed.len()
            )));
        }
        let mut tensors = tensors.into_iter();
        let mut layers: Vec<[Option<LoraWeights<B>>; NUM_TARGETS]> =
            (0..num_layers).map(|_| Default::default()).collect();
        for &(l, target, scale) in placed {
            if let (Some(a), Some(b)) = (tensors.next(), tensors.next()) {
                layers[l][target.index()] = Some(LoraWeights { a, b, scale });
            }
        }
        let index = backend.lora_index(&layers)?;
        Ok(Self {
            layers,
            bytes,
            index,
            gate: None,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Drops `path` from the page cache (its pages are clean: written and synced).
    #[cfg(target_os = "linux")]
    fn drop_cached(path: &Path) {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(path).unwrap();
        // SAFETY: a valid descriptor; the advice only drops clean cached pages.
        assert_eq!(
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) },
            0
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn whole_reads_fill_every_piece_from_the_disk_and_from_the_page_cache() {
        whole_reads(None);
        // A streamed load's order: the end first, then the start (its pieces are smaller).
        let len = 3 * CACHED_PIECE + 12_345;
        whole_reads(Some(&[len - 5000..len, 0..100, 200_000..300_000]));
    }

    #[cfg(target_os = "linux")]
    fn whole_reads(order: Option<&[Range<usize>]>) {
        // Three pieces and a ragged tail (not a multiple of the O_DIRECT alignment), each byte naming its
        // position.
        let len = 3 * CACHED_PIECE + 12_345;
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 ^ (i >> 20) as u8).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adapter_model.safetensors");
        let f = std::fs::File::create(&path).unwrap();
        std::io::Write::write_all(&mut &f, &data).unwrap();
        f.sync_all().unwrap();
        let share = || {
            let file = std::fs::File::open(&path).unwrap();
            resident_share(&file, &file.metadata().unwrap(), len)
        };
        let read = |want: usize| {
            let file = std::fs::File::open(&path).unwrap();
            let mut buf = MmapMut::map_anon(want.next_multiple_of(READ_ALIGN)).unwrap();
            read_whole(&path, &file, &file.metadata().unwrap(), &mut buf, want, None, order)
                .map(|how| (how, buf[..len] == data[..]))
        };
        // Not in the page cache: straight from the disk, where the file system takes O_DIRECT.
        drop_cached(&path);
        let dropped = share() < 0.5;
        let (how, same) = read(len).unwrap();
        assert!(same, "the pieces read from the disk differ from the file");
        if !dropped {
            // tmpfs keeps its pages whatever the advice: the file is read through the page cache.
            eprintln!(
                "SKIPPED the O_DIRECT half: {} keeps the file in memory",
                dir.path().display()
            );
        } else if open_direct(&path, &std::fs::metadata(&path).unwrap()).is_some() {
            assert_eq!(how, ReadPath::Direct);
        } else {
            eprintln!("SKIPPED the O_DIRECT half: {} refuses O_DIRECT", dir.path().display());
        }
        // A file shorter than the read asks for is an error, not a silent short read.
        drop_cached(&path);
        assert!(read(len + 1).is_err(), "a read from the disk past the end succeeded");
        // In the page cache: read through it.
        assert_eq!(std::fs::read(&path).unwrap().len(), len);
        assert!(share() > 0.5);
        let (how, same) = read(len).unwrap();
        assert!(same, "the pieces read through the page cache differ from the file");
        assert_eq!(how, ReadPath::Cached);
        assert!(
            read(len + 1).is_err(),
            "a read through the page cache past the end succeeded"
        );
    }

    #[test]
    fn pieces_are_ordered_by_the_first_range_that_wants_them() {
        // 10 pieces of 100 bytes: ranges in pieces 7, 2-3, 7 again (no change), 0.
        let order = piece_order(1000, 100, &[750..760, 250..301, 700..705, 0..1]);
        assert_eq!(order, vec![7, 2, 3, 0, 1, 4, 5, 6, 8, 9]);
        // Empty ranges name nothing; a range past the end stops at the last piece.
        assert_eq!(piece_order(250, 100, &[50..50, 150..400]), vec![1, 2, 0]);
        assert_eq!(piece_order(0, 100, &[0..10, 20..30]), Vec::<usize>::new());
    }

    #[test]
    fn non_finite_values_are_found_in_each_dtype() {
        use half::{bf16, f16};
        let finite = [0.0f32, -0.0, 1.5, -65504.0, 65504.0, 1e-8, f32::MIN_POSITIVE];
        let bytes16 = |v: &[f32], bf: bool| -> Vec<u8> {
            v.iter()
                .flat_map(|&x| match bf {
                    true => bf16::from_f32(x).to_le_bytes(),
                    false => f16::from_f32(x).to_le_bytes(),
                })
                .collect()
        };
        let bytes32 = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        let all_finite = |dtype: DType, data: &[u8]| range_flags(dtype, data) & NOT_FINITE == 0;
        assert!(all_finite(DType::BF16, &bytes16(&finite, true)));
        assert!(all_finite(DType::F16, &bytes16(&finite, false)));
        assert!(all_finite(DType::F32, &bytes32(&[f32::MAX, f32::MIN, 3.0e38])));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            // At the start, in the middle and at the end of a run longer than a vector.
            for at in [0, 17, 63] {
                let mut v = vec![0.25f32; 64];
                v[at] = bad;
                assert!(!all_finite(DType::BF16, &bytes16(&v, true)), "bf16 {bad} at {at}");
                assert!(!all_finite(DType::F16, &bytes16(&v, false)), "f16 {bad} at {at}");
                assert!(!all_finite(DType::F32, &bytes32(&v)), "f32 {bad} at {at}");
            }
        }
        // f16 overflows to infinity above 65504 (a bf16 value that f16 cannot hold).
        assert!(!all_finite(DType::F16, &bytes16(&[1.0e5], false)));
        assert!(all_finite(DType::BF16, &bytes16(&[1.0e5], true)));
    }

    /// Where each served type's limit falls: the largest values that convert to a finite f16 (or bf16)
    /// set no flag, the first past them do, anywhere in a run and of either sign; NaN and infinities are
    /// not finite, whatever the type.
    #[test]
    fn range_flags_mark_what_each_type_cannot_hold() {
        let bf = |v: &[f32]| -> Vec<u8> {
            v.iter()
                .flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes())
                .collect()
        };
        let f32b = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        let f16b = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect() };
        let run = |v: f32, at: usize| -> Vec<f32> {
            let mut r = vec![0.5f32; 40];
            r[at] = v;
            r
        };
        // bf16 65280 is the largest below f16's limit, 65536 the next.
        for (v, flags) in [
            (65280.0, 0),
            (-65280.0, 0),
            (65536.0, BEYOND_F16),
            (-65536.0, BEYOND_F16),
            (1.0e30, BEYOND_F16),
        ] {
            for at in [0, 17, 39] {
                assert_eq!(range_flags(DType::BF16, &bf(&run(v, at))), flags, "bf16 {v} at {at}");
            }
        }
        // f32 to f16: 65519.99 rounds to 65504, 65520 to infinity; f32 to bf16: its largest passes, the
        // halfway point to the next rounds to infinity.
        let (max, half) = (f32::from_bits(0x7F7F_0000), f32::from_bits(0x7F7F_8000));
        for (v, flags) in [
            (65504.0, 0),
            (65519.99, 0),
            (65520.0, BEYOND_F16),
            (-65520.0, BEYOND_F16),
            (max, BEYOND_F16),
            (f32::from_bits(0x7F7F_7FFF), BEYOND_F16),
            (-half, BEYOND_F16 | BEYOND_BF16),
            (f32::MAX, BEYOND_F16 | BEYOND_BF16),
        ] {
            for at in [0, 17, 39] {
                assert_eq!(range_flags(DType::F32, &f32b(&run(v, at))), flags, "f32 {v} at {at}");
            }
        }
        assert_eq!(range_flags(DType::F16, &f16b(&[0.25, -65504.0, 3.0])), 0);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            assert_ne!(
                range_flags(DType::F32, &f32b(&run(bad, 3))) & NOT_FINITE,
                0,
                "f32 {bad}"
            );
            assert_ne!(
                range_flags(DType::BF16, &bf(&run(bad, 3))) & NOT_FINITE,
                0,
                "bf16 {bad}"
            );
            assert_ne!(
                range_flags(DType::F16, &f16b(&run(bad, 3))) & NOT_FINITE,
                0,
                "f16 {bad}"
            );
        }
        assert_eq!(
            (beyond(DType::F16), beyond(DType::BF16), beyond(DType::F32)),
            (BEYOND_F16, BEYOND_BF16, 0)
        );
    }

    #[test]
    fn names_parse() {
        assert_eq!(
            parse_name("base_model.model.model.layers.3.mlp.up_proj.lora_B.weight"),
            Some(("model.layers.3.mlp.up_proj".into(), 'B'))
        );
        assert_eq!(parse_name("model.layers.3.mlp.up_proj.weight"), None);
    }

    #[test]
    fn pattern_keys_match_dot_suffixes_longest_first() {
        let map = BTreeMap::from([("up_proj".to_string(), 4usize), ("layers.1.mlp.up_proj".to_string(), 8)]);
        let p = Patterns::new(Path::new("x"), &map).unwrap();
        assert_eq!(p.get("model.layers.1.mlp.up_proj"), Some(8));
        assert_eq!(p.get("model.layers.11.mlp.up_proj"), Some(4));
        assert_eq!(p.get("model.layers.1.mlp.gate_proj"), None);
        // A suffix must start at a dot: "p_proj" is not a suffix key of "up_proj".
        let q = Patterns::new(Path::new("x"), &BTreeMap::from([("p_proj".to_string(), 2usize)])).unwrap();
        assert_eq!(q.get("model.layers.1.mlp.up_proj"), None);
    }

    #[test]
    fn target_lists_and_regexes() {
        let list = TargetModules::List(vec!["q_proj".into(), "mlp.up_proj".into()]);
        assert!(targeted(Some(&list), None, "model.layers.0.self_attn.q_proj"));
        assert!(targeted(Some(&list), None, "model.layers.0.mlp.up_proj"));
        assert!(!targeted(Some(&list), None, "model.layers.0.self_attn.k_proj"));
        let re = Regex::new(r"^(?:.*\.(o_proj|down_proj))$").unwrap();
        let r = TargetModules::Regex(String::new());
        assert!(targeted(Some(&r), Some(&re), "model.layers.1.mlp.down_proj"));
        assert!(!targeted(Some(&r), Some(&re), "model.layers.1.mlp.up_proj"));
    }
}
