//! GGUF, llama.cpp's single-file model format: a header, typed metadata (architecture, hyperparameters,
//! tokenizer, chat template) and a tensor index, then the tensor data, each tensor in one of ggml's
//! element types (plain floats or block-quantized formats).
//!
//! [`GgufFile::open`] maps the file and checks every length and offset against it, so a truncated or
//! hostile file is an error, never a panic or a huge allocation. [`GgufFile::tensor_f32`] dequantizes one
//! tensor to f32 with the arithmetic of ggml's reference `dequantize_row_*` functions (see [`quant`]).
//!
//! Shapes are reported as ggml stores them: `dims[0]` is the innermost (contiguous) dimension, so a
//! PyTorch `[out, in]` weight has `dims == [in, out]`.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

pub mod quant;

pub use quant::GgmlType;

/// What can go wrong reading a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened or mapped.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The bytes are not a well-formed GGUF file.
    #[error("{path} is not a valid GGUF file: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tensor of this name is not in the file.
    #[error("the GGUF file has no tensor {0:?}")]
    MissingTensor(String),
    /// The tensor's element type cannot be dequantized here.
    #[error(
        "tensor {name:?} is stored as {ty}, which this server cannot dequantize (supported: {})",
        quant::SUPPORTED
    )]
    UnsupportedType {
        /// The tensor.
        name: String,
        /// Its ggml type, named.
        ty: GgmlType,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, GgufError>;

/// Whether `path` names a GGUF file: an existing file with the `.gguf` extension (any case).
pub fn is_gguf_file(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) && path.is_file()
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// uint8
    U8(u8),
    /// int8
    I8(i8),
    /// uint16
    U16(u16),
    /// int16
    I16(i16),
    /// uint32
    U32(u32),
    /// int32
    I32(i32),
    /// uint64
    U64(u64),
    /// int64
    I64(i64),
    /// float32
    F32(f32),
    /// float64
    F64(f64),
    /// bool
    Bool(bool),
    /// UTF-8 string (invalid UTF-8 is replaced, as tokenizer vocabularies sometimes hold raw bytes).
    String(String),
    /// An array of values of one type.
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, when it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float (integers convert).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor of the index.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// Its name (llama.cpp's naming: `blk.0.attn_q.weight`, `token_embd.weight`, ...).
    pub name: String,
    /// Dimensions, innermost first.
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Byte offset of the data in the file.
    start: usize,
    /// Byte length of the data.
    len: usize,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The PyTorch-order shape (outermost first).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An opened GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    /// Format version (2 or 3).
    pub version: u32,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Deepest nesting of arrays accepted (GGUF writers produce 1 or 2).
const MAX_ARRAY_DEPTH: usize = 4;

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| format!("unexpected end of file at byte {} (wanted {n} more)", self.pos))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> std::result::Result<[u8; N], String> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    /// A count of items each at least `min_size` bytes long, refused when the file cannot hold them.
    fn count(&mut self, what: &str, min_size: usize) -> std::result::Result<usize, String> {
        let n = self.u64()?;
        match usize::try_from(n) {
            Ok(n) if n.saturating_mul(min_size) <= self.remaining() => Ok(n),
            _ => Err(format!("{what} count {n} exceeds what the file can hold")),
        }
    }

    fn string(&mut self) -> std::result::Result<String, String> {
        let n = self.count("string length", 1)?;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }

    fn value(&mut self, ty: u32, depth: usize) -> std::result::Result<Value, String> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(i8::from_le_bytes(self.array()?)),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("bool value {b} is neither 0 nor 1")),
            },
            8 => Value::String(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!("arrays nested deeper than {MAX_ARRAY_DEPTH}"));
                }
                let item = self.u32()?;
                let n = self.count("array", 1)?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(item, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            t => return Err(format!("unknown metadata value type {t}")),
        })
    }
}

impl GgufFile {
    /// Maps and indexes the file at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the mapping is read-only; model files are not modified while a server runs (the same
        // contract as every mmap-based model loader).
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let parsed = Self::parse(&mmap).map_err(|reason| GgufError::Corrupt {
            path: path.to_path_buf(),
            reason,
        })?;
        let (version, metadata, tensors) = parsed;
        let by_name = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            version,
            metadata,
            tensors,
            by_name,
        })
    }

    #[allow(clippy::type_complexity)]
    fn parse(bytes: &[u8]) -> std::result::Result<(u32, BTreeMap<String, Value>, Vec<TensorInfo>), String> {
        let mut r = Reader { bytes, pos: 0 };
        if r.take(4).map_err(|_| "shorter than its magic number".to_string())? != b"GGUF" {
            return Err("it does not start with the magic bytes \"GGUF\"".into());
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(format!(
                "GGUF version {version} is not supported (versions 2 and 3 are)"
            ));
        }
        // Each tensor info takes at least 8 + 4 + 4 + 8 bytes, each metadata pair 8 + 4 + 1.
        let n_tensors = r.count("tensor", 24)?;
        let n_kv = r.count("metadata", 13)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let value = r.value(ty, 0).map_err(|e| format!("metadata {key:?}: {e}"))?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(format!("metadata key {key:?} appears twice"));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a as usize,
                _ => return Err(format!("general.alignment {v:?} is not a power of two")),
            },
        };
        let mut infos = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()? as usize;
            if n_dims == 0 || n_dims > 4 {
                return Err(format!("tensor {name:?} has {n_dims} dimensions (1 to 4 are valid)"));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(r.u64()?);
            }
            let ty = GgmlType::from_id(r.u32()?);
            let offset = r.u64()?;
            infos.push((name, dims, ty, offset));
        }
        let data_start = r.pos.div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(n_tensors);
        let mut seen = HashMap::new();
        for (name, dims, ty, offset) in infos {
            let bad = |reason: String| format!("tensor {name:?}: {reason}");
            let numel = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
            let Some((block, block_bytes)) = ty.block() else {
                return Err(bad(format!("unknown ggml type {ty}")));
            };
            if dims[0] % block as u64 != 0 {
                return Err(bad(format!(
                    "its rows of {} elements are not whole {ty} blocks of {block}",
                    dims[0]
                )));
            }
            let len = (numel / block as u64)
                .checked_mul(block_bytes as u64)
                .and_then(|l| usize::try_from(l).ok())
                .ok_or_else(|| bad("byte size overflows".into()))?;
            if offset % alignment as u64 != 0 {
                return Err(bad(format!(
                    "offset {offset} is not a multiple of the alignment {alignment}"
                )));
            }
            let start = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(data_start))
                .filter(|s| s.checked_add(len).is_some_and(|e| e <= bytes.len()))
                .ok_or_else(|| bad(format!("its {len} bytes at offset {offset} lie outside the file")))?;
            if seen.insert(name.clone(), ()).is_some() {
                return Err(bad("appears twice".into()));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                start,
                len,
            });
        }
        Ok((version, metadata, tensors))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every metadata pair, by key.
    pub fn metadata(&self) -> &BTreeMap<String, Value> {
        &self.metadata
    }

    /// One metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A string value, if present and a string.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    /// An unsigned integer value, if present and an integer.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(Value::as_u64)
    }

    /// A float value, if present and a number.
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(Value::as_f64)
    }

    /// `general.architecture` (`llama`, `qwen2`, ...).
    pub fn architecture(&self) -> Option<&str> {
        self.get_str("general.architecture")
    }

    /// Every tensor, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor.
    pub fn raw(&self, info: &TensorInfo) -> &[u8] {
        &self.mmap[info.start..info.start + info.len]
    }

    /// The tensor called `name`, dequantized to f32 (row-major, innermost dimension contiguous).
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let info = self
            .tensor(name)
            .ok_or_else(|| GgufError::MissingTensor(name.to_string()))?;
        quant::dequantize(info.ty, self.raw(info)).ok_or_else(|| GgufError::UnsupportedType {
            name: name.to_string(),
            ty: info.ty,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal GGUF writer for tests.
    pub(crate) struct Writer {
        kv: Vec<u8>,
        n_kv: u64,
        tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
    }

    impl Writer {
        pub(crate) fn new() -> Self {
            Self {
                kv: Vec::new(),
                n_kv: 0,
                tensors: Vec::new(),
            }
        }

        fn key(&mut self, k: &str, ty: u32) {
            self.kv.extend((k.len() as u64).to_le_bytes());
            self.kv.extend(k.as_bytes());
            self.kv.extend(ty.to_le_bytes());
            self.n_kv += 1;
        }

        pub(crate) fn u32(mut self, k: &str, v: u32) -> Self {
            self.key(k, 4);
            self.kv.extend(v.to_le_bytes());
            self
        }

        pub(crate) fn string(mut self, k: &str, v: &str) -> Self {
            self.key(k, 8);
            self.kv.extend((v.len() as u64).to_le_bytes());
            self.kv.extend(v.as_bytes());
            self
        }

        pub(crate) fn strings(mut self, k: &str, v: &[&str]) -> Self {
            self.key(k, 9);
            self.kv.extend(8u32.to_le_bytes());
            self.kv.extend((v.len() as u64).to_le_bytes());
            for s in v {
                self.kv.extend((s.len() as u64).to_le_bytes());
                self.kv.extend(s.as_bytes());
            }
            self
        }

        pub(crate) fn tensor(mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> Self {
            self.tensors.push((name.to_string(), dims.to_vec(), ty, data));
            self
        }

        pub(crate) fn bytes(&self) -> Vec<u8> {
            let mut out = b"GGUF".to_vec();
            out.extend(3u32.to_le_bytes());
            out.extend((self.tensors.len() as u64).to_le_bytes());
            out.extend(self.n_kv.to_le_bytes());
            out.extend(&self.kv);
            let mut offset = 0u64;
            let mut offsets = Vec::new();
            for (name, dims, ty, data) in &self.tensors {
                out.extend((name.len() as u64).to_le_bytes());
                out.extend(name.as_bytes());
                out.extend((dims.len() as u32).to_le_bytes());
                for d in dims {
                    out.extend(d.to_le_bytes());
                }
                out.extend(ty.to_le_bytes());
                out.extend(offset.to_le_bytes());
                offsets.push(offset);
                offset = (offset + data.len() as u64).div_ceil(32) * 32;
            }
            while !out.len().is_multiple_of(32) {
                out.push(0);
            }
            let base = out.len();
            for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
                out.resize(base + off as usize, 0);
                out.extend(data);
            }
            out
        }
    }

    fn write(bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("m.gguf");
        std::fs::write(&p, bytes).expect("write");
        (dir, p)
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn reads_metadata_and_tensors() {
        let w = Writer::new()
            .string("general.architecture", "llama")
            .u32("llama.block_count", 2)
            .strings("tokenizer.ggml.tokens", &["a", "b", "ab"])
            .tensor("x", &[3, 2], 0, f32_bytes(&[1., 2., 3., 4., 5., 6.]))
            .tensor("y", &[2], 0, f32_bytes(&[7., 8.]));
        let (_d, p) = write(&w.bytes());
        let g = GgufFile::open(&p).expect("open");
        assert_eq!(g.architecture(), Some("llama"));
        assert_eq!(g.get_u64("llama.block_count"), Some(2));
        let toks = g
            .get("tokenizer.ggml.tokens")
            .and_then(Value::as_array)
            .expect("tokens");
        assert_eq!(toks.len(), 3);
        assert_eq!(toks[2].as_str(), Some("ab"));
        assert_eq!(g.tensor("x").expect("x").shape(), vec![2, 3]);
        assert_eq!(g.tensor_f32("x").expect("x"), vec![1., 2., 3., 4., 5., 6.]);
        assert_eq!(g.tensor_f32("y").expect("y"), vec![7., 8.]);
        assert!(matches!(g.tensor_f32("z"), Err(GgufError::MissingTensor(_))));
    }

    #[test]
    fn unsupported_type_is_named() {
        // IQ2_XXS (16): blocks of 256 elements in 66 bytes.
        let w = Writer::new().tensor("q", &[256], 16, vec![0u8; 66]);
        let (_d, p) = write(&w.bytes());
        let g = GgufFile::open(&p).expect("open");
        let e = g.tensor_f32("q").expect_err("unsupported").to_string();
        assert!(e.contains("IQ2_XXS") && e.contains("\"q\""), "{e}");
    }

    #[test]
    fn corrupt_files_are_errors_not_panics() {
        let good = Writer::new()
            .string("general.architecture", "llama")
            .strings("tokenizer.ggml.tokens", &["a", "b"])
            .tensor("x", &[4], 0, f32_bytes(&[1., 2., 3., 4.]))
            .bytes();
        // Every truncation fails cleanly.
        for cut in 0..good.len() {
            let (_d, p) = write(&good[..cut]);
            assert!(GgufFile::open(&p).is_err(), "truncated at {cut} accepted");
        }
        // Flipping bytes never panics (errors or, rarely, a different valid file).
        let mut state = 0x2545_f491_u32;
        for _ in 0..2000 {
            let mut b = good.clone();
            for _ in 0..3 {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                let i = state as usize % b.len();
                b[i] = (state >> 8) as u8;
            }
            let (_d, p) = write(&b);
            if let Ok(g) = GgufFile::open(&p) {
                let names: Vec<String> = g.tensors().iter().map(|t| t.name.clone()).collect();
                for n in names {
                    let _ = g.tensor_f32(&n);
                }
            }
        }
        let (_d, p) = write(b"GGUF\x01\0\0\0");
        assert!(GgufFile::open(&p).expect_err("v1").to_string().contains("version 1"));
        let (_d, p) = write(b"GGML....");
        assert!(GgufFile::open(&p).expect_err("magic").to_string().contains("magic"));
    }

    #[test]
    fn huge_counts_are_refused_without_allocating() {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(u64::MAX.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        let (_d, p) = write(&b);
        assert!(GgufFile::open(&p)
            .expect_err("huge")
            .to_string()
            .contains("tensor count"));
    }
}
