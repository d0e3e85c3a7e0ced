//! Safetensors checkpoints, memory-mapped: one file or many with `model.safetensors.index.json`.
//!
//! Headers are read once at open into an index (name → file, dtype, shape, byte range); tensor data is
//! borrowed from the mapping and converted only when a backend uploads it. `get_sharded` slices a tensor
//! along one dimension for tensor parallelism (rank r of world w gets the r-th equal part).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{EngineError, Result};

/// Storage dtypes the engine accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    /// bfloat16.
    BF16,
    /// IEEE half.
    F16,
    /// IEEE single.
    F32,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::BF16 | DType::F16 => 2,
            DType::F32 => 4,
        }
    }

    /// f32 values as little-endian bytes of this type (rounded to nearest even).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(values.len() * self.size());
        match self {
            DType::F32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            DType::BF16 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
            DType::F16 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
        }
        out
    }

    /// Little-endian bytes of this type as f32 values (exact).
    pub fn decode(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            DType::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        }
    }
}

/// A tensor's bytes in host memory (borrowed from the mapping, or owned after slicing).
#[derive(Debug)]
pub struct HostTensor<'a> {
    /// Name in the checkpoint.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// Little-endian element bytes.
    pub data: std::borrow::Cow<'a, [u8]>,
}

impl HostTensor<'_> {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The elements as f32.
    pub fn to_f32(&self) -> Vec<f32> {
        self.dtype.decode(&self.data)
    }

    /// An owned tensor of `values` stored as `dtype` (rounded to nearest even): tests, generated weights.
    pub fn from_values(name: &str, dtype: DType, shape: Vec<usize>, values: &[f32]) -> HostTensor<'static> {
        HostTensor {
            name: name.to_string(),
            dtype,
            shape,
            data: dtype.encode(values).into(),
        }
    }

    /// An owned f32 tensor from f32 values.
    pub fn from_f32(name: &str, shape: Vec<usize>, values: &[f32]) -> HostTensor<'static> {
        Self::from_values(name, DType::F32, shape, values)
    }
}

#[derive(Clone, Debug)]
struct Entry {
    file: usize,
    dtype: Option<DType>,
    raw_dtype: String,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// An opened checkpoint: the mapped files and an index of every tensor in them.
pub struct Weights {
    files: Vec<(PathBuf, Mmap)>,
    index: HashMap<String, Entry>,
    gguf: Option<GgufWeights>,
}

/// A GGUF file's tensors under their transformers names (dequantized to f32 when read).
struct GgufWeights {
    file: lorax_gguf::GgufFile,
    map: HashMap<String, (crate::gguf::Source, Vec<usize>)>,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("files", &self.files.iter().map(|(p, _)| p).collect::<Vec<_>>())
            .field("tensors", &self.index.len())
            .field("gguf", &self.gguf.as_ref().map(|g| g.file.path()))
            .finish()
    }
}

impl Weights {
    /// Open the checkpoint in `dir`: `model.safetensors.index.json` when present, else every
    /// `*.safetensors` file there (usually just `model.safetensors`).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|source| EngineError::Io {
                path: index_path.clone(),
                source,
            })?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| EngineError::CorruptWeights {
                path: index_path.clone(),
                reason: e.to_string(),
            })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| EngineError::CorruptWeights {
                    path: index_path.clone(),
                    reason: "no weight_map object".into(),
                })?;
            let mut files: Vec<String> = Vec::new();
            for f in map.values() {
                let f = f.as_str().ok_or_else(|| EngineError::CorruptWeights {
                    path: index_path.clone(),
                    reason: "weight_map values must be file names".into(),
                })?;
                if f.contains('/') || f.contains('\\') || f == ".." {
                    return Err(EngineError::CorruptWeights {
                        path: index_path.clone(),
                        reason: format!("weight_map names a file outside the model directory: {f:?}"),
                    });
                }
                if !files.iter().any(|g| g == f) {
                    files.push(f.to_string());
                }
            }
            files.sort();
            let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
            let w = Self::from_files(&paths)?;
            for name in map.keys() {
                if !w.index.contains_key(name) {
                    return Err(EngineError::CorruptWeights {
                        path: index_path,
                        reason: format!("index lists {name:?} but no shard contains it"),
                    });
                }
            }
            return Ok(w);
        }
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|source| EngineError::Io {
                path: dir.to_path_buf(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().is_some_and(|e| e == "safetensors")
                    && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("model"))
            })
            .collect();
        paths.sort();
        if paths.is_empty() {
            let has_bin = dir.join("pytorch_model.bin").exists();
            return Err(EngineError::Io {
                path: dir.join("model.safetensors"),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    if has_bin {
                        "no safetensors weights (only pickle pytorch_model.bin, which is never loaded: convert it to safetensors)"
                    } else {
                        "no model*.safetensors file in the directory"
                    },
                ),
            });
        }
        Self::from_files(&paths)
    }

    /// Open the given safetensors files.
    pub fn from_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = File::open(path).map_err(|source| EngineError::Io {
                path: path.clone(),
                source,
            })?;
            // SAFETY: the mapping is read-only; checkpoint files are not modified while a server runs
            // (the same contract every safetensors loader relies on).
            let mmap = unsafe { Mmap::map(&file) }.map_err(|source| EngineError::Io {
                path: path.clone(),
                source,
            })?;
            let corrupt = |reason: String| EngineError::CorruptWeights {
                path: path.clone(),
                reason,
            };
            // deserialize validates the header and that the offsets cover the data exactly.
            SafeTensors::deserialize(&mmap).map_err(|e| corrupt(e.to_string()))?;
            let (header_len, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| corrupt(e.to_string()))?;
            let base = 8 + header_len;
            for (name, info) in meta.tensors() {
                let dtype = match info.dtype {
                    Dtype::BF16 => Some(DType::BF16),
                    Dtype::F16 => Some(DType::F16),
                    Dtype::F32 => Some(DType::F32),
                    _ => None,
                };
                let (s, e) = info.data_offsets;
                if base + e > mmap.len() || s > e {
                    return Err(corrupt(format!("tensor {name:?} lies outside the file")));
                }
                index.insert(
                    name.clone(),
                    Entry {
                        file: i,
                        dtype,
                        raw_dtype: format!("{:?}", info.dtype),
                        shape: info.shape.clone(),
                        start: base + s,
                        end: base + e,
                    },
                );
            }
            files.push((path.clone(), mmap));
        }
        Ok(Self {
            files,
            index,
            gguf: None,
        })
    }

    /// The tensors of a GGUF file, named as transformers names them for the model `cfg` describes.
    /// Tensors the model does not use are left out.
    pub fn from_gguf(file: lorax_gguf::GgufFile, cfg: &crate::config::ModelConfig) -> Self {
        let mut map = HashMap::new();
        for t in file.tensors() {
            if let Some((hf, unpermute_heads)) = crate::gguf::hf_name(&t.name, cfg) {
                let source = crate::gguf::Source {
                    gguf_name: t.name.clone(),
                    unpermute_heads,
                };
                map.insert(hf, (source, t.shape()));
            }
        }
        Self {
            files: Vec::new(),
            index: HashMap::new(),
            gguf: Some(GgufWeights { file, map }),
        }
    }

    fn gguf_source(&self, name: &str) -> Option<&(crate::gguf::Source, Vec<usize>)> {
        self.gguf.as_ref().and_then(|g| g.map.get(name))
    }

    /// Whether the checkpoint has a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name) || self.gguf_source(name).is_some()
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.index.keys().map(String::as_str).collect();
        if let Some(g) = &self.gguf {
            v.extend(g.map.keys().map(String::as_str));
        }
        v.sort_unstable();
        v
    }

    /// Shape of a tensor, without reading it.
    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        if let Some((_, shape)) = self.gguf_source(name) {
            return Ok(shape);
        }
        Ok(&self.entry(name)?.shape)
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.index
            .get(name)
            .ok_or_else(|| EngineError::MissingTensor(name.to_string()))
    }

    /// A whole tensor, borrowed from the mapping.
    pub fn get(&self, name: &str) -> Result<HostTensor<'_>> {
        if let (Some(g), Some((source, shape))) = (&self.gguf, self.gguf_source(name)) {
            let mut values = g
                .file
                .tensor_f32(&source.gguf_name)
                .map_err(crate::gguf::engine_error)?;
            if let Some(heads) = source.unpermute_heads {
                values = crate::gguf::unpermute(&values, shape[0], heads)?;
            }
            return Ok(HostTensor::from_f32(name, shape.clone(), &values));
        }
        let e = self.entry(name)?;
        let dtype = e.dtype.ok_or_else(|| EngineError::UnsupportedDtype {
            name: name.to_string(),
            dtype: e.raw_dtype.clone(),
        })?;
        Ok(HostTensor {
            name: name.to_string(),
            dtype,
            shape: e.shape.clone(),
            data: std::borrow::Cow::Borrowed(&self.files[e.file].1[e.start..e.end]),
        })
    }

    /// A tensor whose shape must be `expected`.
    pub fn get_checked(&self, name: &str, expected: &[usize]) -> Result<HostTensor<'_>> {
        let t = self.get(name)?;
        if t.shape != expected {
            return Err(EngineError::ShapeMismatch {
                name: name.to_string(),
                actual: t.shape,
                expected: expected.to_vec(),
            });
        }
        Ok(t)
    }

    /// The `rank`-th of `world_size` equal parts of a tensor along `dim` (0 = rows of a
    /// `[out, in]` weight: column parallel; 1 = its columns: row parallel).
    pub fn get_sharded(&self, name: &str, dim: usize, rank: usize, world_size: usize) -> Result<HostTensor<'_>> {
        let t = self.get(name)?;
        shard(t, dim, rank, world_size)
    }
}

/// Slice `t` along `dim` into `world_size` equal parts and keep part `rank`.
pub fn shard(t: HostTensor<'_>, dim: usize, rank: usize, world_size: usize) -> Result<HostTensor<'_>> {
    if world_size <= 1 {
        return Ok(t);
    }
    let size = *t.shape.get(dim).ok_or_else(|| EngineError::Unshardable {
        name: t.name.clone(),
        dim,
        size: 0,
        world_size,
    })?;
    if size % world_size != 0 || rank >= world_size {
        return Err(EngineError::Unshardable {
            name: t.name.clone(),
            dim,
            size,
            world_size,
        });
    }
    let part = size / world_size;
    let outer: usize = t.shape[..dim].iter().product();
    let inner: usize = t.shape[dim + 1..].iter().product::<usize>() * t.dtype.size();
    let mut data = Vec::with_capacity(outer * part * inner);
    for o in 0..outer {
        let row = o * size * inner;
        data.extend_from_slice(&t.data[row + rank * part * inner..row + (rank + 1) * part * inner]);
    }
    let mut shape = t.shape.clone();
    shape[dim] = part;
    Ok(HostTensor {
        name: t.name,
        dtype: t.dtype,
        shape,
        data: data.into(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn shards_rows_and_columns() {
        let v: Vec<f32> = (0..24).map(|x| x as f32).collect();
        let t = HostTensor::from_f32("w", vec![4, 6], &v);
        let rows = shard(HostTensor::from_f32("w", vec![4, 6], &v), 0, 1, 2).unwrap();
        assert_eq!(rows.shape, vec![2, 6]);
        assert_eq!(rows.to_f32(), (12..24).map(|x| x as f32).collect::<Vec<_>>());
        let cols = shard(t, 1, 2, 3).unwrap();
        assert_eq!(cols.shape, vec![4, 2]);
        assert_eq!(cols.to_f32(), vec![4., 5., 10., 11., 16., 17., 22., 23.]);
        let e = shard(HostTensor::from_f32("w", vec![4, 6], &v), 1, 0, 4).unwrap_err();
        assert!(matches!(
            e,
            EngineError::Unshardable {
                size: 6,
                world_size: 4,
                ..
            }
        ));
    }
}
