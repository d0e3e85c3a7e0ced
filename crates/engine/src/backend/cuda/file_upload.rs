//! Adapter weights files copied to the device while they are read ([`Backend::begin_file_upload`]).
//!
//! Each piece the reader hands over is copied into the pinned staging buffer at its place in the file and
//! sent on the upload stream at once, so the copies run beside the read and little is left to send when
//! it ends. The device copy holds the file from the end of its safetensors header on. The adapter's
//! tensors of the backend's type are ranges of it, which `finish` checks are aligned as `upload_many`
//! aligns them; tensors of another type are converted from it (`convert_in`, as `upload_many` converts)
//! into an allocation of their own. The header's length comes with the file's first piece: pieces that arrive before it wait, staged,
//! until it does.
//!
//! [`Backend::begin_file_upload`]: crate::backend::Backend::begin_file_upload

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use cudarc::driver::{result as drv_result, CudaSlice, DevicePtr, PinnedHostSlice};

use super::{drv, CudaBackend, CudaTensor, DevBuf};
use crate::backend::{FileTensor, FileUpload};
use crate::error::{EngineError, Result};
use crate::lora::PieceSink;

/// Alignment of each tensor within the device copy (what `upload_many` gives every tensor).
const ALIGN: usize = 256;

/// A [`FileUpload`] on the CUDA backend's upload stream.
pub(super) struct CudaFileUpload<'a> {
    backend: &'a CudaBackend,
    /// The pinned buffer's address and length, once `start` has it: pieces are staged there without
    /// taking `copy`'s lock.
    host: OnceLock<(usize, usize)>,
    copy: Mutex<Copy>,
}

#[derive(Default)]
struct Copy {
    /// The pinned buffer the file is staged in (the backend's staging buffer, taken for the upload).
    staging: Option<PinnedHostSlice<u8>>,
    /// The device copy: byte `i` of the file at `i - data_start`.
    dev: Option<CudaSlice<u8>>,
    dev_base: u64,
    /// The file's length.
    len: usize,
    /// Where the safetensors header ends (known with the first piece).
    data_start: Option<usize>,
    /// Pieces staged before the header's length was known, to send once it is.
    waiting: Vec<Range<usize>>,
    /// The first failure; nothing more is sent after it.
    error: Option<EngineError>,
}

impl<'a> CudaFileUpload<'a> {
    pub(super) fn new(backend: &'a CudaBackend) -> Self {
        Self {
            backend,
            host: OnceLock::new(),
            copy: Mutex::new(Copy::default()),
        }
    }

    fn copy(&self) -> MutexGuard<'_, Copy> {
        self.copy.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Pins (or takes the backend's) staging for `len` bytes and allocates the device copy.
    fn prepare(&self, c: &mut Copy, len: usize) -> Result<()> {
        let b = self.backend;
        b.ctx.bind_to_thread().map_err(|e| drv("binding the context", e))?;
        // Kept in `c` at once: `drop` gives it back, whatever fails after.
        let staging = c.staging.insert(b.take_staging(len)?);
        let ptr = staging.as_mut_ptr().map_err(|e| drv("staging buffer", e))?;
        let capacity = staging.len();
        // SAFETY: uninitialised; the pieces' copies write every byte a tensor covers before `finish` hands
        // any out (it waits for them).
        let dev = unsafe { b.upload_stream.alloc::<u8>(len.max(1)) }
            .map_err(|e| drv(&format!("allocating {len} bytes"), e))?;
        c.dev_base = {
            let (p, _sync) = dev.device_ptr(&b.upload_stream);
            p
        };
        c.dev = Some(dev);
        c.len = len;
        let _ = self.host.set((ptr as usize, capacity));
        Ok(())
    }

    /// Sends the staged bytes `range` of the file (its part past the header) to the device copy.
    fn send(&self, c: &mut Copy, range: Range<usize>) -> Result<()> {
        let (Some(start), Some(&(host, _))) = (c.data_start, self.host.get()) else {
            return Ok(());
        };
        let from = range.start.max(start);
        if from >= range.end {
            return Ok(());
        }
        let b = self.backend;
        b.ctx.bind_to_thread().map_err(|e| drv("binding the context", e))?;
        // SAFETY: bytes `from..range.end` of the pinned buffer were written by this piece's own copy,
        // which happened before (in `piece`, before it took the lock); the buffer outlives the copy, as
        // `finish` and `drop` wait for the upload stream before they give it back.
        let src = unsafe { std::slice::from_raw_parts((host as *const u8).add(from), range.end - from) };
        // SAFETY: the device copy holds `len - data_start` bytes and `range.end <= len` (checked in
        // `piece`); `src` is pinned and stays unchanged until the stream has been waited for.
        unsafe { drv_result::memcpy_htod_async(c.dev_base + (from - start) as u64, src, b.upload_stream.cu_stream()) }
            .map_err(|e| drv("adapter upload", e))
    }

    /// Waits for every copy sent (an event recorded now on the upload stream, not the whole stream: other
    /// uploads may queue copies after this one's).
    fn wait(&self) -> Result<()> {
        let b = self.backend;
        b.ctx.bind_to_thread().map_err(|e| drv("binding the context", e))?;
        b.upload_stream
            .record_event(None)
            .and_then(|e| e.synchronize())
            .map_err(|e| drv("adapter upload", e))
    }
}

impl PieceSink for CudaFileUpload<'_> {
    fn start(&self, len: usize) {
        let mut c = self.copy();
        if c.staging.is_some() || self.host.get().is_some() {
            // (A second start would free the buffer that pieces are written to.)
            c.error = Some(EngineError::Backend("an adapter file upload was started twice".into()));
            return;
        }
        if let Err(e) = self.prepare(&mut c, len) {
            c.error = Some(e);
        }
    }

    fn piece(&self, offset: usize, bytes: &[u8]) {
        let Some(&(host, capacity)) = self.host.get() else {
            return; // `start` failed: its error is kept.
        };
        let end = offset.saturating_add(bytes.len());
        if end > capacity {
            self.copy().error = Some(EngineError::Backend(format!(
                "a piece of the adapter file ({offset}..{end}) is beyond its staging ({capacity} bytes)"
            )));
            return;
        }
        // SAFETY: the buffer has `capacity` bytes; pieces do not overlap, except a retried read's, which
        // comes after the first read's pieces have all been staged and writes the same bytes.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), (host as *mut u8).add(offset), bytes.len()) };
        let mut c = self.copy();
        if c.error.is_some() {
            return;
        }
        if end > c.len {
            c.error = Some(EngineError::Backend(format!(
                "a piece of the adapter file ({offset}..{end}) is beyond its end ({})",
                c.len
            )));
            return;
        }
        let sent = if c.data_start.is_some() {
            self.send(&mut c, offset..end)
        } else if offset == 0 && bytes.len() >= 8 {
            let mut n = [0u8; 8];
            n.copy_from_slice(&bytes[..8]);
            match usize::try_from(u64::from_le_bytes(n))
                .ok()
                .and_then(|h| h.checked_add(8))
                .filter(|&s| s <= c.len)
            {
                Some(start) => {
                    c.data_start = Some(start);
                    let waiting = std::mem::take(&mut c.waiting);
                    std::iter::once(offset..end)
                        .chain(waiting)
                        .try_for_each(|r| self.send(&mut c, r))
                }
                None => Err(EngineError::Backend(
                    "the adapter file's header length is past its end".into(),
                )),
            }
        } else {
            c.waiting.push(offset..end);
            Ok(())
        };
        if let Err(e) = sent {
            c.error = Some(e);
        }
    }
}

impl FileUpload<CudaTensor> for CudaFileUpload<'_> {
    fn finish(self: Box<Self>, tensors: &[FileTensor<'_>]) -> Result<Vec<CudaTensor>> {
        let b = self.backend;
        let es = b.dtype.size();
        // Per tensor: None (used where it lies) or its offset in the conversion's allocation.
        let mut places = Vec::with_capacity(tensors.len());
        let mut converted = 0usize;
        let dev = {
            let mut c = self.copy();
            if let Some(e) = c.error.take() {
                return Err(e);
            }
            let Some(start) = c.data_start else {
                return Err(EngineError::Backend("the adapter file's header never came".into()));
            };
            for t in tensors {
                let numel: usize = t.shape.iter().product();
                let inside = t.range.start >= start && t.range.end <= c.len && t.range.len() == numel * t.dtype.size();
                let at = t.range.start.saturating_sub(start);
                // Of the backend's type: used in place, at a 256-byte boundary as upload_many places it. Of
                // another: converted into an allocation of its own, from an element-aligned place.
                let (fits, place) = if t.dtype == b.dtype {
                    (at.is_multiple_of(ALIGN), None)
                } else {
                    let place = converted;
                    converted += (numel * es).max(1).next_multiple_of(ALIGN);
                    (at.is_multiple_of(t.dtype.size()), Some(place))
                };
                if !(inside && fits) {
                    return Err(EngineError::Backend(format!(
                        "a {:?} {:?} tensor at {:?} of the file (data from {start}) cannot be used where it lies",
                        t.dtype, t.shape, t.range
                    )));
                }
                places.push(place);
            }
            let dev = c.dev.take();
            dev.map(|d| (d, c.dev_base, start))
        };
        let Some((dev, base, start)) = dev else {
            return Err(EngineError::Backend("the adapter file's device copy is missing".into()));
        };
        // Conversions run on the upload stream after every piece's copy (all queued before the read ended).
        let out = if converted > 0 {
            b.ctx.bind_to_thread().map_err(|e| drv("binding the context", e))?;
            // SAFETY: uninitialised; each converted tensor's elements are written by its conversion below
            // (alignment padding is never read).
            let out = unsafe { b.upload_stream.alloc::<u8>(converted) }
                .map_err(|e| drv(&format!("allocating {converted} bytes"), e))?;
            let out_base = {
                let (p, _sync) = out.device_ptr(&b.upload_stream);
                p
            };
            for (t, place) in tensors.iter().zip(&places) {
                if let Some(place) = place {
                    let numel = t.shape.iter().product();
                    let raw = base + (t.range.start - start) as u64;
                    b.convert_upload(out_base + *place as u64, raw, t.dtype, numel)?;
                }
            }
            Some((Arc::new(out), out_base))
        } else {
            None
        };
        // The tensors are handed out only once every copy (and conversion) into them has ended.
        self.wait()?;
        let owner = Arc::new(dev);
        Ok(tensors
            .iter()
            .zip(places)
            .map(|(t, place)| {
                let numel: usize = t.shape.iter().product();
                let buf = match (place, &out) {
                    (Some(place), Some((out, out_base))) => DevBuf::part(out, *out_base, place, numel * es),
                    _ => DevBuf::part(&owner, base, t.range.start - start, t.range.len()),
                };
                CudaTensor {
                    shape: t.shape.to_vec(),
                    buf,
                }
            })
            .collect())
    }
}

impl Drop for CudaFileUpload<'_> {
    /// Waits for the copies still reading the staging buffer, then gives the buffer back to the backend.
    fn drop(&mut self) {
        let Some(staging) = self
            .copy
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .staging
            .take()
        else {
            return;
        };
        if let Err(e) = self.wait() {
            // The copies' state is unknown: keep the buffer pinned and unused rather than free it under
            // them.
            tracing::error!("waiting for an adapter file's upload: {e}; its staging buffer is leaked");
            std::mem::forget(staging);
            self.backend.give_back_staging(None);
            return;
        }
        self.backend.give_back_staging(Some(staging));
    }
}
