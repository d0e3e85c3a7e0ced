//! The CPU backend: f32 everywhere, GEMMs through the `gemm` crate, attention and the small kernels
//! written plainly. It is the reference the GPU backend is checked against and the path CI runs.

use rayon::prelude::*;

use super::{concat_shape, AttnMeta, Backend, FileTensor, FileUpload, LoraSegment, NO_SLOT};
use crate::error::{EngineError, Result};
use crate::lora::PieceSink;
use crate::weights::HostTensor;

/// A row-major f32 tensor in host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor {
    /// Shape (2-D for everything the model uses).
    pub shape: Vec<usize>,
    /// Elements.
    pub data: Vec<f32>,
}

impl CpuTensor {
    fn rows_cols(&self) -> (usize, usize) {
        match self.shape.as_slice() {
            [] => (1, 1),
            [c] => (1, *c),
            [r @ .., c] => (r.iter().product(), *c),
        }
    }
}

/// The CPU backend.
#[derive(Clone, Debug, Default)]
pub struct CpuBackend;

fn shape_err(what: &str, a: &[usize], b: &[usize]) -> EngineError {
    EngineError::Backend(format!("{what}: incompatible shapes {a:?} and {b:?}"))
}

/// `out[m, n] = x[m, k] · w[n, k]ᵀ`.
fn matmul_t(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return out;
    }
    if k == 0 {
        return out;
    }
    let par = if m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    let (k_i, n_i) = (k as isize, n as isize);
    // SAFETY: the pointers cover m*k, n*k and m*n elements with the strides given (checked by the
    // callers' shape checks); dst does not alias the inputs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n_i,
            false,
            x.as_ptr(),
            1,
            k_i,
            w.as_ptr(),
            k_i,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
    out
}

fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let var = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (var + eps).sqrt();
    for ((o, v), g) in out.iter_mut().zip(x).zip(w) {
        *o = g * (v * r);
    }
}

/// The CPU backend's [`FileUpload`]: the file's bytes gathered as they come and converted at the end,
/// as `weight` converts them, so that CPU tests run the streamed upload's path.
#[derive(Default)]
struct CpuFileUpload {
    /// The file, and whether a piece fell outside it.
    file: std::sync::Mutex<(Vec<u8>, bool)>,
}

impl CpuFileUpload {
    fn file(&self) -> std::sync::MutexGuard<'_, (Vec<u8>, bool)> {
        self.file.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl PieceSink for CpuFileUpload {
    fn start(&self, len: usize) {
        self.file().0 = vec![0; len];
    }

    fn piece(&self, offset: usize, bytes: &[u8]) {
        let mut file = self.file();
        let end = offset.saturating_add(bytes.len());
        match file.0.get_mut(offset..end) {
            Some(place) => place.copy_from_slice(bytes),
            None => file.1 = true,
        }
    }
}

impl FileUpload<CpuTensor> for CpuFileUpload {
    fn finish(self: Box<Self>, tensors: &[FileTensor<'_>]) -> Result<Vec<CpuTensor>> {
        let (file, overrun) = self
            .file
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if overrun {
            return Err(EngineError::Backend(
                "a piece of the adapter file fell outside it".into(),
            ));
        }
        tensors
            .iter()
            .map(|t| {
                let data = file
                    .get(t.range.clone())
                    .filter(|d| d.len() == t.shape.iter().product::<usize>() * t.dtype.size())
                    .ok_or_else(|| {
                        EngineError::Backend(format!(
                            "{:?} of the file does not hold a {:?} tensor",
                            t.range, t.shape
                        ))
                    })?;
                Ok(CpuTensor {
                    shape: t.shape.to_vec(),
                    data: t.dtype.decode(data),
                })
            })
            .collect()
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type LoraIndex = ();
    type LoraStep = ();

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn weight(&self, t: &HostTensor<'_>) -> Result<CpuTensor> {
        Ok(CpuTensor {
            shape: t.shape.clone(),
            data: t.to_f32(),
        })
    }

    fn begin_file_upload(&self) -> Option<Box<dyn FileUpload<CpuTensor> + '_>> {
        Some(Box::<CpuFileUpload>::default())
    }

    fn tensor_from_f32(&self, shape: &[usize], data: &[f32]) -> Result<CpuTensor> {
        if shape.iter().product::<usize>() != data.len() {
            return Err(EngineError::Backend(format!(
                "{} values for shape {shape:?}",
                data.len()
            )));
        }
        Ok(CpuTensor {
            shape: shape.to_vec(),
            data: data.to_vec(),
        })
    }

    fn to_f32(&self, t: &CpuTensor) -> Result<Vec<f32>> {
        Ok(t.data.clone())
    }

    fn zeros(&self, shape: &[usize]) -> Result<CpuTensor> {
        Ok(CpuTensor {
            shape: shape.to_vec(),
            data: vec![0.0; shape.iter().product()],
        })
    }

    fn shape<'a>(&self, t: &'a CpuTensor) -> &'a [usize] {
        &t.shape
    }

    fn embedding(&self, table: &CpuTensor, ids: &[u32]) -> Result<CpuTensor> {
        let (vocab, hidden) = table.rows_cols();
        let mut data = Vec::with_capacity(ids.len() * hidden);
        for &id in ids {
            let id = id as usize;
            if id >= vocab {
                return Err(EngineError::InvalidBatch(format!(
                    "token id {id} is outside the vocabulary ({vocab})"
                )));
            }
            data.extend_from_slice(&table.data[id * hidden..(id + 1) * hidden]);
        }
        Ok(CpuTensor {
            shape: vec![ids.len(), hidden],
            data,
        })
    }

    fn linear(&self, x: &CpuTensor, w: &CpuTensor, bias: Option<&CpuTensor>) -> Result<CpuTensor> {
        let (m, k) = x.rows_cols();
        let (n, k2) = w.rows_cols();
        if k != k2 {
            return Err(shape_err("linear", &x.shape, &w.shape));
        }
        let mut data = matmul_t(&x.data, &w.data, m, k, n);
        if let Some(b) = bias {
            if b.data.len() != n {
                return Err(shape_err("linear bias", &w.shape, &b.shape));
            }
            for row in data.chunks_exact_mut(n) {
                for (o, bb) in row.iter_mut().zip(&b.data) {
                    *o += bb;
                }
            }
        }
        Ok(CpuTensor {
            shape: vec![m, n],
            data,
        })
    }

    fn rms_norm(&self, x: &CpuTensor, w: &CpuTensor, eps: f32) -> Result<CpuTensor> {
        let (m, h) = x.rows_cols();
        if w.data.len() != h {
            return Err(shape_err("rms_norm", &x.shape, &w.shape));
        }
        let mut data = vec![0f32; m * h];
        for (o, r) in data.chunks_exact_mut(h).zip(x.data.chunks_exact(h)) {
            rms_norm_row(r, &w.data, eps, o);
        }
        Ok(CpuTensor {
            shape: vec![m, h],
            data,
        })
    }

    fn add_rms_norm(&self, residual: &mut CpuTensor, x: &CpuTensor, w: &CpuTensor, eps: f32) -> Result<CpuTensor> {
        self.add_assign(residual, x)?;
        self.rms_norm(residual, w, eps)
    }

    fn lora(&self, y: &mut CpuTensor, x: &CpuTensor, segments: &[LoraSegment<'_, CpuTensor>]) -> Result<()> {
        let (n, k) = x.rows_cols();
        let (ny, out) = y.rows_cols();
        if n != ny {
            return Err(shape_err("lora", &x.shape, &y.shape));
        }
        for seg in segments {
            let (r, ob) = seg.check(|t| &t.shape, &x.shape, &y.shape)?;
            let xs = &x.data[seg.start * k..(seg.start + seg.len) * k];
            let shrunk = matmul_t(xs, &seg.a.data, seg.len, k, r);
            let expanded = matmul_t(&shrunk, &seg.b.data, seg.len, r, ob);
            if ob == 0 {
                continue;
            }
            for (row, e) in y.data[seg.start * out..(seg.start + seg.len) * out]
                .chunks_exact_mut(out)
                .zip(expanded.chunks_exact(ob))
            {
                for (d, e) in row[seg.col..seg.col + ob].iter_mut().zip(e) {
                    *d += seg.scale * e;
                }
            }
        }
        Ok(())
    }

    fn all_reduce_sum(&self, t: &mut CpuTensor, comm: &dyn crate::comm::Communicator) -> Result<()> {
        comm.all_reduce_sum(&mut t.data)
    }

    fn add_assign(&self, dst: &mut CpuTensor, src: &CpuTensor) -> Result<()> {
        if dst.data.len() != src.data.len() {
            return Err(shape_err("add", &dst.shape, &src.shape));
        }
        for (d, s) in dst.data.iter_mut().zip(&src.data) {
            *d += s;
        }
        Ok(())
    }

    fn silu_mul(&self, gate_up: &CpuTensor) -> Result<CpuTensor> {
        let (n, w) = gate_up.rows_cols();
        if w % 2 != 0 {
            return Err(EngineError::Backend(format!("silu_mul: odd width {w}")));
        }
        let f = w / 2;
        let mut data = Vec::with_capacity(n * f);
        for row in gate_up.data.chunks_exact(w.max(1)) {
            let (gate, up) = row.split_at(f);
            data.extend(gate.iter().zip(up).map(|(g, u)| g / (1.0 + (-g).exp()) * u));
        }
        Ok(CpuTensor {
            shape: vec![n, f],
            data,
        })
    }

    fn rope_kv_write(
        &self,
        qkv: &CpuTensor,
        k_cache: &mut CpuTensor,
        v_cache: &mut CpuTensor,
        head_dim: usize,
        positions: &[u32],
        inv_freq: &[f32],
        slots: &[u32],
    ) -> Result<CpuTensor> {
        let (n, q_dim, kv_dim) = super::check_rope_kv_write(
            &qkv.shape,
            &k_cache.shape,
            &v_cache.shape,
            head_dim,
            None,
            (positions, inv_freq, slots),
        )?;
        let (width, half) = (q_dim + 2 * kv_dim, head_dim / 2);
        let mut q = vec![0f32; n * q_dim];
        let (mut cos, mut sin) = (vec![0f32; half], vec![0f32; half]);
        let rotate = |src: &[f32], dst: &mut [f32], cos: &[f32], sin: &[f32]| {
            for (s, d) in src.chunks_exact(head_dim).zip(dst.chunks_exact_mut(head_dim)) {
                for i in 0..half {
                    let (a, b) = (s[i], s[i + half]);
                    d[i] = a * cos[i] - b * sin[i];
                    d[i + half] = b * cos[i] + a * sin[i];
                }
            }
        };
        for (r, row) in qkv.data.chunks_exact(width).enumerate() {
            #[allow(clippy::cast_precision_loss)]
            let pos = positions[r] as f32;
            for i in 0..half {
                // As transformers: the angle is formed in f32, then cos/sin of it.
                let angle = inv_freq[i] * pos;
                cos[i] = angle.cos();
                sin[i] = angle.sin();
            }
            rotate(&row[..q_dim], &mut q[r * q_dim..(r + 1) * q_dim], &cos, &sin);
            if slots[r] == NO_SLOT {
                continue;
            }
            let s = slots[r] as usize;
            rotate(
                &row[q_dim..q_dim + kv_dim],
                &mut k_cache.data[s * kv_dim..(s + 1) * kv_dim],
                &cos,
                &sin,
            );
            v_cache.data[s * kv_dim..(s + 1) * kv_dim].copy_from_slice(&row[q_dim + kv_dim..]);
        }
        Ok(CpuTensor {
            shape: vec![n, q_dim],
            data: q,
        })
    }

    fn concat_rows(&self, parts: &[&CpuTensor]) -> Result<CpuTensor> {
        let shape = concat_shape(parts.iter().map(|p| p.shape.as_slice()))?;
        let mut data = Vec::with_capacity(shape.iter().product());
        for p in parts {
            data.extend_from_slice(&p.data);
        }
        Ok(CpuTensor { shape, data })
    }

    fn attention(
        &self,
        q: &CpuTensor,
        k_cache: &CpuTensor,
        v_cache: &CpuTensor,
        meta: &AttnMeta<'_>,
    ) -> Result<CpuTensor> {
        let (n, qw) = q.rows_cols();
        let (slots_total, kvw) = k_cache.rows_cols();
        let hd = meta.head_dim;
        if qw != meta.num_heads * hd
            || kvw != meta.num_kv_heads * hd
            || !meta.num_heads.is_multiple_of(meta.num_kv_heads)
        {
            return Err(shape_err("attention", &q.shape, &k_cache.shape));
        }
        let group = meta.num_heads / meta.num_kv_heads;
        let bs = meta.block_size;
        // Validate the whole batch before computing anything.
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
        }
        // One work item per (sequence, new token): each writes its own output row.
        let mut out = vec![0f32; n * qw];
        let mut rows: Vec<(usize, &mut [f32])> = out.chunks_exact_mut(qw).enumerate().collect();
        let row_seq: Vec<usize> = {
            let mut v = vec![usize::MAX; n];
            for (si, s) in meta.seqs.iter().enumerate() {
                v[s.q_start..s.q_start + s.q_len].fill(si);
            }
            v
        };
        rows.par_iter_mut().for_each(|(r, orow)| {
            let si = row_seq[*r];
            if si == usize::MAX {
                return;
            }
            let s = &meta.seqs[si];
            let pos = s.ctx_before + (*r - s.q_start);
            let first = match meta.sliding_window {
                Some(w) if pos + 1 > w => pos + 1 - w,
                _ => 0,
            };
            let slot = |p: usize| s.block_table[p / bs] as usize * bs + p % bs;
            let mut scores = vec![0f32; pos + 1 - first];
            for h in 0..meta.num_heads {
                let kvh = h / group;
                let qv = &q.data[*r * qw + h * hd..*r * qw + (h + 1) * hd];
                let mut max = f32::NEG_INFINITY;
                for (j, p) in (first..=pos).enumerate() {
                    let ko = slot(p) * kvw + kvh * hd;
                    let kv = &k_cache.data[ko..ko + hd];
                    let d: f32 = qv.iter().zip(kv).map(|(a, b)| a * b).sum::<f32>() * meta.scale;
                    scores[j] = d;
                    max = max.max(d);
                }
                let mut sum = 0f32;
                for sc in &mut scores {
                    *sc = (*sc - max).exp();
                    sum += *sc;
                }
                let o = &mut orow[h * hd..(h + 1) * hd];
                for (j, p) in (first..=pos).enumerate() {
                    let wgt = scores[j] / sum;
                    let vo = slot(p) * kvw + kvh * hd;
                    for (oo, vv) in o.iter_mut().zip(&v_cache.data[vo..vo + hd]) {
                        *oo += wgt * vv;
                    }
                }
            }
        });
        Ok(CpuTensor {
            shape: vec![n, qw],
            data: out,
        })
    }

    fn gather_rows(&self, x: &CpuTensor, rows: &[usize]) -> Result<CpuTensor> {
        let (m, c) = x.rows_cols();
        let mut data = Vec::with_capacity(rows.len() * c);
        for &r in rows {
            if r >= m {
                return Err(EngineError::Backend(format!("row {r} of {m}")));
            }
            data.extend_from_slice(&x.data[r * c..(r + 1) * c]);
        }
        Ok(CpuTensor {
            shape: vec![rows.len(), c],
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn linear_matches_naive() {
        let (m, k, n) = (5, 7, 3);
        let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let b = CpuBackend;
        let y = b
            .linear(
                &b.tensor_from_f32(&[m, k], &x).unwrap(),
                &b.tensor_from_f32(&[n, k], &w).unwrap(),
                None,
            )
            .unwrap();
        for i in 0..m {
            for j in 0..n {
                let r: f32 = (0..k).map(|t| x[i * k + t] * w[j * k + t]).sum();
                assert!((y.data[i * n + j] - r).abs() < 1e-5);
            }
        }
    }
}
