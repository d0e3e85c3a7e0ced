//! Dummy weights (`--load-format dummy`, as in vLLM): a model made from `config.json` alone, with no
//! checkpoint, for benchmarks and tests of model shapes nobody wants to download (a 70B shape is made in
//! seconds on the GPU).
//!
//! Every element is a pure function of the seed, the tensor's name and the element's index in the
//! **whole** tensor, so a rank generates only its own slice and the slices of any tensor-parallel
//! layout put together give the same model (TP=2 serves the TP=1 model). The CUDA kernel
//! `fill_dummy` (kernels/elementwise.cu) computes the same f32 values as [`value`] here, bit for bit.
//!
//! Scales keep activations finite through deep stacks: linear weights uniform in ±1/sqrt(fan_in) (so a
//! projection of a unit-RMS input has outputs of RMS about 0.58), norms 1.0, biases 0, the embedding
//! uniform in ±0.05 (an untied `lm_head` is a linear of fan-in `hidden`).

use crate::error::{EngineError, Result};

/// The seed used by `--load-format dummy` unless one is given.
pub const DEFAULT_SEED: u64 = 0x5eed;

/// How a tensor is filled.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fill {
    /// Every element `value`.
    Constant(f32),
    /// Uniform in `[-scale, scale)` from the hash of (key, element index).
    Uniform {
        /// Per-tensor key ([`tensor_key`]).
        key: u32,
        /// Half-width of the interval.
        scale: f32,
    },
}

/// The part of a whole `[full_rows, full_cols]` tensor a rank holds: `rows` × `cols` starting at
/// (`row_off`, `col_off`). A 1-D tensor is one row.
#[derive(Clone, Debug, PartialEq)]
pub struct DummySpec {
    /// Shape of the slice as the backend stores it.
    pub shape: Vec<usize>,
    /// Columns of the whole tensor.
    pub full_cols: usize,
    /// First row of the slice in the whole tensor.
    pub row_off: usize,
    /// First column of the slice in the whole tensor.
    pub col_off: usize,
    /// Values.
    pub fill: Fill,
}

impl DummySpec {
    /// The slice of the whole tensor `full` kept by `split` = (dim, part, parts), or all of it.
    pub fn new(name: &str, full: &[usize], split: Option<(usize, usize, usize)>, fill: Fill) -> Result<Self> {
        let unshardable = |dim: usize, size: usize, parts: usize| EngineError::Unshardable {
            name: name.to_string(),
            dim,
            size,
            world_size: parts,
        };
        let (full_rows, full_cols) = match full {
            [c] => (1, *c),
            [r, c] => (*r, *c),
            _ => return Err(unshardable(0, 0, 1)),
        };
        let (mut rows, mut cols, mut row_off, mut col_off) = (full_rows, full_cols, 0, 0);
        if let Some((dim, part, parts)) = split {
            if dim >= full.len() || parts == 0 || part >= parts || !full[dim].is_multiple_of(parts) {
                return Err(unshardable(dim, full.get(dim).copied().unwrap_or(0), parts));
            }
            // A 1-D tensor's only dimension is its columns here.
            if dim == 0 && full.len() == 2 {
                rows = full_rows / parts;
                row_off = part * rows;
            } else {
                cols = full_cols / parts;
                col_off = part * cols;
            }
        }
        let mut shape = full.to_vec();
        if full.len() == 2 {
            shape = vec![rows, cols];
        } else {
            shape[0] = cols;
        }
        Ok(Self {
            shape,
            full_cols,
            row_off,
            col_off,
            fill,
        })
    }

    /// Number of elements of the slice.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Columns of the slice.
    pub fn cols(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// The slice's values, generated on the host (row-major).
    pub fn host_values(&self) -> Vec<f32> {
        use rayon::prelude::*;
        let n = self.numel();
        match self.fill {
            Fill::Constant(v) => vec![v; n],
            Fill::Uniform { key, scale } => {
                let cols = self.cols().max(1);
                let mut out = vec![0f32; n];
                out.par_chunks_mut(cols).enumerate().for_each(|(r, row)| {
                    let base = (self.row_off + r) as u64 * self.full_cols as u64 + self.col_off as u64;
                    for (c, o) in row.iter_mut().enumerate() {
                        *o = value(key, scale, base + c as u64);
                    }
                });
                out
            }
        }
    }
}

/// A 32-bit key for a tensor: FNV-1a of its name, mixed with the seed.
pub fn tensor_key(seed: u64, name: &str) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    #[allow(clippy::cast_possible_truncation)]
    let k = (h ^ (h >> 32)) as u32;
    k
}

/// Element `index` of a uniform tensor: the same integer hash as `fill_dummy` on the GPU, mapped to a
/// multiple of 2⁻²³ in [-1, 1) (exact in f32), times `scale` (one rounding, so both sides agree).
pub fn value(key: u32, scale: f32, index: u64) -> f32 {
    #[allow(clippy::cast_possible_truncation)]
    let (lo, hi) = (index as u32, (index >> 32) as u32);
    let mut h = lo.wrapping_mul(0x9E37_79B1) ^ hi.wrapping_mul(0x85EB_CA77) ^ key.wrapping_mul(0xC2B2_AE3D);
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846c_a68b);
    h ^= h >> 16;
    // (h >> 8) - 2^23 is in [-2^23, 2^23): exact in f32, and so is its product with 2^-23.
    #[allow(clippy::cast_possible_wrap, clippy::cast_precision_loss)]
    let t = ((h >> 8) as i32 - (1 << 23)) as f32 * (1.0 / 8_388_608.0);
    scale * t
}

/// How a named tensor of a Llama-family checkpoint is filled (`fan_in`: its input width).
pub fn fill_for(seed: u64, name: &str, fan_in: usize) -> Fill {
    if name.ends_with("norm.weight") {
        return Fill::Constant(1.0);
    }
    if name.ends_with(".bias") {
        return Fill::Constant(0.0);
    }
    let key = tensor_key(seed, name);
    if name.ends_with("embed_tokens.weight") {
        return Fill::Uniform { key, scale: 0.05 };
    }
    #[allow(clippy::cast_precision_loss)]
    let scale = 1.0 / (fan_in.max(1) as f32).sqrt();
    Fill::Uniform { key, scale }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn slices_of_every_layout_assemble_the_whole_tensor() {
        let fill = Fill::Uniform {
            key: tensor_key(7, "w"),
            scale: 0.5,
        };
        let whole = DummySpec::new("w", &[6, 4], None, fill).unwrap().host_values();
        assert!(whole.iter().all(|v| (-0.5..0.5).contains(v)));
        assert!(whole.windows(2).all(|w| w[0] != w[1]), "values vary");
        // Row split: parts are consecutive rows.
        let rows: Vec<f32> = (0..3)
            .flat_map(|p| {
                DummySpec::new("w", &[6, 4], Some((0, p, 3)), fill)
                    .unwrap()
                    .host_values()
            })
            .collect();
        assert_eq!(rows, whole);
        // Column split: each part holds columns [2p, 2p + 2) of every row.
        for p in 0..2 {
            let s = DummySpec::new("w", &[6, 4], Some((1, p, 2)), fill).unwrap();
            assert_eq!(s.shape, vec![6, 2]);
            let v = s.host_values();
            for r in 0..6 {
                assert_eq!(&v[r * 2..r * 2 + 2], &whole[r * 4 + 2 * p..r * 4 + 2 * p + 2]);
            }
        }
        // 1-D: a split of the only dimension.
        let b = DummySpec::new("b", &[8], Some((0, 1, 2)), fill).unwrap();
        assert_eq!(b.shape, vec![4]);
        assert_eq!(
            b.host_values(),
            DummySpec::new("b", &[8], None, fill).unwrap().host_values()[4..]
        );
        assert!(DummySpec::new("w", &[6, 4], Some((1, 0, 3)), fill).is_err());
    }

    #[test]
    fn seeds_and_names_give_different_tensors() {
        assert_ne!(tensor_key(1, "a"), tensor_key(2, "a"));
        assert_ne!(tensor_key(1, "a"), tensor_key(1, "b"));
        assert_eq!(fill_for(1, "model.norm.weight", 8), Fill::Constant(1.0));
        match fill_for(1, "model.layers.0.mlp.down_proj.weight", 64) {
            Fill::Uniform { scale, .. } => assert!((scale - 0.125).abs() < 1e-7),
            other => panic!("{other:?}"),
        }
    }
}
