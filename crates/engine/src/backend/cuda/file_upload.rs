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

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};

use cudarc::driver::{result as drv_result, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice};

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
    /// With [`FileUpload::early`]: what the tensors' readers wait on; each piece sent is marked on it.
    gate: OnceLock<Arc<CudaGate>>,
}

#[derive(Default)]
struct Copy {
    /// The pinned buffer the file is staged in (the backend's staging buffer, taken for the upload).
    staging: Option<PinnedHostSlice<u8>>,
    /// The device copy: byte `i` of the file at `i - data_start`.
    dev: Option<CudaSlice<u8>>,
    /// The device copy once [`FileUpload::early`] handed out tensors of it, and their conversions' buffer:
    /// kept while pieces are still copied and converted into them, whoever drops the tensors.
    owner: Option<Arc<CudaSlice<u8>>>,
    converted: Option<Arc<CudaSlice<u8>>>,
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
            gate: OnceLock::new(),
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
            .map_err(|e| drv("adapter upload", e))?;
        if let Some(gate) = self.gate.get() {
            gate.cover(from..range.end, |(out, raw, dtype, n)| {
                b.convert_upload(out, raw, dtype, n)
            })?;
        }
        Ok(())
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

/// Where each tensor of the file (its data from `start`, `len` bytes in all) is used: None, in place (of the
/// backend's type, at a 256-byte boundary as `upload_many` places it), or its offset in an allocation of
/// the returned size that it is converted into (another type, from an element-aligned place). An error
/// for a tensor outside the file or misplaced.
fn placed(
    b: &CudaBackend,
    tensors: &[FileTensor<'_>],
    start: usize,
    len: usize,
) -> Result<(Vec<Option<usize>>, usize)> {
    let es = b.dtype.size();
    let mut places = Vec::with_capacity(tensors.len());
    let mut converted = 0usize;
    for t in tensors {
        let numel: usize = t.shape.iter().product();
        let inside = t.range.start >= start && t.range.end <= len && t.range.len() == numel * t.dtype.size();
        let at = t.range.start.saturating_sub(start);
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
    Ok((places, converted))
}

/// The allocation of `bytes` that converted tensors go to, and its address (None for none).
fn conversion_buffer(b: &CudaBackend, bytes: usize) -> Result<Option<(Arc<CudaSlice<u8>>, u64)>> {
    if bytes == 0 {
        return Ok(None);
    }
    b.ctx.bind_to_thread().map_err(|e| drv("binding the context", e))?;
    // SAFETY: uninitialised; each converted tensor's elements are written by its conversion before any
    // reader uses them (alignment padding is never read).
    let out =
        unsafe { b.upload_stream.alloc::<u8>(bytes) }.map_err(|e| drv(&format!("allocating {bytes} bytes"), e))?;
    let base = {
        let (p, _sync) = out.device_ptr(&b.upload_stream);
        p
    };
    Ok(Some((Arc::new(out), base)))
}

/// The tensors as [`placed`] placed them: in the device copy `owner` (at `base`, the file's data from
/// `start`) or in the conversion buffer `out`.
fn tensors_at(
    b: &CudaBackend,
    tensors: &[FileTensor<'_>],
    places: &[Option<usize>],
    owner: &Arc<CudaSlice<u8>>,
    base: u64,
    start: usize,
    out: Option<&(Arc<CudaSlice<u8>>, u64)>,
) -> Vec<CudaTensor> {
    let es = b.dtype.size();
    tensors
        .iter()
        .zip(places)
        .map(|(t, place)| {
            let numel: usize = t.shape.iter().product();
            let buf = match (place, out) {
                (Some(place), Some((out, out_base))) => DevBuf::part(out, *out_base, *place, numel * es),
                _ => DevBuf::part(owner, base, t.range.start - start, t.range.len()),
            };
            CudaTensor {
                shape: t.shape.to_vec(),
                buf,
            }
        })
        .collect()
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
    fn early(
        &self,
        data_start: usize,
        tensors: &[FileTensor<'_>],
        layer_of: &[usize],
        num_layers: usize,
    ) -> Result<(Vec<CudaTensor>, Arc<dyn crate::lora::AdapterGate>)> {
        self.early_tensors(data_start, tensors, layer_of, num_layers)
            .map(|(t, g)| (t, g as Arc<dyn crate::lora::AdapterGate>))
    }

    fn end(self: Box<Self>, outcome: Result<()>) -> Result<()> {
        let error = self.copy().error.take();
        let outcome = match (outcome, error) {
            (Err(EngineError::Backend(m)), _) => Err(m),
            (Err(e), _) | (Ok(()), Some(e)) => Err(e.to_string()),
            (Ok(()), None) => Ok(()),
        };
        let kept = match self.gate.get() {
            Some(gate) => gate.end(outcome),
            None => outcome,
        };
        kept.map_err(|e| failed(&e))
    }

    fn finish(self: Box<Self>, tensors: &[FileTensor<'_>]) -> Result<Vec<CudaTensor>> {
        let b = self.backend;
        let (places, converted, dev, base, start) = {
            let mut c = self.copy();
            if let Some(e) = c.error.take() {
                return Err(e);
            }
            let Some(start) = c.data_start else {
                return Err(EngineError::Backend("the adapter file's header never came".into()));
            };
            let (places, converted) = placed(b, tensors, start, c.len)?;
            let Some(dev) = c.dev.take() else {
                return Err(EngineError::Backend("the adapter file's device copy is missing".into()));
            };
            (places, converted, dev, c.dev_base, start)
        };
        // Conversions run on the upload stream after every piece's copy (all queued before the read ended).
        let out = conversion_buffer(b, converted)?;
        if let Some((_, out_base)) = &out {
            for (t, place) in tensors.iter().zip(&places) {
                if let Some(place) = place {
                    let numel = t.shape.iter().product();
                    let raw = base + (t.range.start - start) as u64;
                    b.convert_upload(out_base + *place as u64, raw, t.dtype, numel)?;
                }
            }
        }
        // The tensors are handed out only once every copy (and conversion) into them has ended.
        self.wait()?;
        Ok(tensors_at(
            b,
            tensors,
            &places,
            &Arc::new(dev),
            base,
            start,
            out.as_ref(),
        ))
    }
}

impl CudaFileUpload<'_> {
    fn early_tensors(
        &self,
        data_start: usize,
        tensors: &[FileTensor<'_>],
        layer_of: &[usize],
        num_layers: usize,
    ) -> Result<(Vec<CudaTensor>, Arc<CudaGate>)> {
        let b = self.backend;
        let mut c = self.copy();
        if let Some(e) = &c.error {
            return Err(EngineError::Backend(format!("the adapter file's upload failed: {e}")));
        }
        if self.gate.get().is_some() || c.data_start.is_some_and(|s| s != data_start) || c.dev.is_none() {
            return Err(EngineError::Backend(
                "the adapter file's upload cannot stream now".into(),
            ));
        }
        if layer_of.len() != tensors.len() || layer_of.iter().any(|&l| l >= num_layers) {
            return Err(EngineError::Backend(
                "a streamed adapter's tensors and layers do not match".into(),
            ));
        }
        let (places, converted) = placed(b, tensors, data_start, c.len)?;
        let mut layers = vec![Vec::new(); num_layers];
        for (t, &l) in tensors.iter().zip(layer_of) {
            layers[l].push(t.range.clone());
        }
        let base = c.dev_base;
        // Tensors of another type are converted on the upload stream once their layer's bytes are there.
        let out = conversion_buffer(b, converted)?;
        let mut conversions = vec![Vec::new(); num_layers];
        for ((t, &l), place) in tensors.iter().zip(layer_of).zip(&places) {
            if let (Some(place), Some((_, out_base))) = (place, &out) {
                let numel: usize = t.shape.iter().product();
                conversions[l].push((
                    out_base + *place as u64,
                    base + (t.range.start - data_start) as u64,
                    t.dtype,
                    numel,
                ));
            }
        }
        let gate = Arc::new(CudaGate {
            state: Mutex::new(GateState {
                covered: BTreeMap::new(),
                ready: vec![false; num_layers],
                progress: std::time::Instant::now(),
                end: None,
            }),
            layers,
            conversions,
            cv: Condvar::new(),
            done: AtomicBool::new(false),
            stream: Arc::clone(&b.stream),
            upload: Arc::clone(&b.upload_stream),
        });
        let _ = self.gate.set(Arc::clone(&gate));
        if c.data_start.is_none() {
            c.data_start = Some(data_start);
            let waiting = std::mem::take(&mut c.waiting);
            for r in waiting {
                self.send(&mut c, r)?;
            }
        }
        let owner = match c.owner.clone() {
            Some(o) => o,
            None => {
                let dev = c
                    .dev
                    .take()
                    .ok_or_else(|| EngineError::Backend("no device copy".into()))?;
                Arc::clone(c.owner.insert(Arc::new(dev)))
            }
        };
        c.converted = out.as_ref().map(|(o, _)| Arc::clone(o));
        let tensors = tensors_at(b, tensors, &places, &owner, base, data_start, out.as_ref());
        Ok((tensors, gate))
    }
}

/// What a streamed adapter's readers wait on ([`FileUpload::early`]): the file ranges sent to the device so
/// far, and the read's outcome once it ended.
pub(super) struct CudaGate {
    /// Each layer's tensors' ranges of the file.
    layers: Vec<Vec<Range<usize>>>,
    /// Each layer's conversions (into the backend's type: destination, source, source type, elements),
    /// queued once its ranges have all been sent.
    conversions: Vec<Vec<(u64, u64, crate::weights::DType, usize)>>,
    state: Mutex<GateState>,
    cv: Condvar,
    /// Every weight arrived and was checked, and a pass has ordered its work after the copies.
    done: AtomicBool,
    /// The backend's stream (the readers') and its upload stream (the copies').
    stream: Arc<CudaStream>,
    upload: Arc<CudaStream>,
}

struct GateState {
    /// Ranges of the file whose copies are queued: start → end, merged.
    covered: BTreeMap<usize, usize>,
    /// Layers whose copies (and conversions) are all queued.
    ready: Vec<bool>,
    /// When the last piece was sent (or the gate made): a read that sends nothing for [`STREAM_STALL`]
    /// fails the gate.
    progress: std::time::Instant,
    /// The read's and the checks' outcome, once known.
    end: Option<std::result::Result<(), String>>,
}

impl std::fmt::Debug for CudaGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaGate")
            .field("layers", &self.layers.len())
            .field("done", &self.done.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl GateState {
    fn covers(&self, r: &Range<usize>) -> bool {
        r.is_empty()
            || self
                .covered
                .range(..=r.start)
                .next_back()
                .is_some_and(|(_, &e)| e >= r.end)
    }
}

impl CudaGate {
    fn state(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks `r` as sent; each layer whose ranges are then all sent has its conversions queued (`convert`)
    /// and becomes ready.
    fn cover(
        &self,
        r: Range<usize>,
        mut convert: impl FnMut((u64, u64, crate::weights::DType, usize)) -> Result<()>,
    ) -> Result<()> {
        if r.is_empty() {
            return Ok(());
        }
        let mut st = self.state();
        let (mut start, mut end) = (r.start, r.end);
        if let Some((&s, &e)) = st.covered.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        let joined: Vec<usize> = st.covered.range(start..=end).map(|(&k, _)| k).collect();
        for k in joined {
            if let Some(e) = st.covered.remove(&k) {
                end = end.max(e);
            }
        }
        st.covered.insert(start, end);
        st.progress = std::time::Instant::now();
        let mut outcome = Ok(());
        for l in 0..self.layers.len() {
            if st.ready[l] || !self.layers[l].iter().all(|r| st.covers(r)) {
                continue;
            }
            if let Err(e) = self.conversions[l].iter().try_for_each(|&job| convert(job)) {
                outcome = Err(e);
                break;
            }
            st.ready[l] = true;
        }
        drop(st);
        self.cv.notify_all();
        outcome
    }

    /// The read's outcome (the first one given counts), which it returns.
    fn end(&self, outcome: std::result::Result<(), String>) -> std::result::Result<(), String> {
        let kept = self.state().end.get_or_insert(outcome).clone();
        self.cv.notify_all();
        kept
    }

    /// Waits on the host until `ready` holds or the read has ended (its error, if it failed). A read that
    /// sends nothing for [`STREAM_STALL`] while someone waits fails the gate for everyone.
    fn wait_for(&self, ready: impl Fn(&GateState) -> bool) -> Result<()> {
        let mut st = self.state();
        loop {
            match &st.end {
                Some(Err(e)) => return Err(failed(e)),
                Some(Ok(())) => return Ok(()),
                None if ready(&st) => return Ok(()),
                None => {}
            }
            let now = std::time::Instant::now();
            let deadline = st.progress + STREAM_STALL;
            if now >= deadline {
                let stalled = format!("nothing of its weights came for {} s", STREAM_STALL.as_secs());
                st.end = Some(Err(stalled));
                self.cv.notify_all();
                continue;
            }
            st = self
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Orders the stream's next work after every copy queued so far on the upload stream.
    fn order_after_copies(&self) -> Result<()> {
        let copies = self
            .upload
            .record_event(None)
            .map_err(|e| drv("recording a streamed adapter's copies", e))?;
        self.stream
            .wait(&copies)
            .map_err(|e| drv("waiting for a streamed adapter's copies", e))
    }
}

fn failed(e: &str) -> EngineError {
    EngineError::Backend(format!("the streamed adapter failed its read or its checks: {e}"))
}

/// Longest a streamed read may send nothing while a pass (or the shard) waits on its gate: then the gate
/// fails (a stalled disk must not hold the shard's steps, which wait under its engine lock, for ever). A
/// rank-16 q/k/v/o adapter of a 7B model reads in about 20 ms, a 256 KiB piece in well under one.
const STREAM_STALL: std::time::Duration = std::time::Duration::from_secs(30);

impl crate::lora::AdapterGate for CudaGate {
    fn done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    fn wait_end(&self) -> Result<()> {
        self.wait_for(|_| false)
    }

    fn wait_layer(&self, layer: usize) -> Result<()> {
        if self.done() {
            return Ok(());
        }
        if layer >= self.layers.len() {
            return Ok(());
        }
        self.wait_for(|st| st.ready[layer])?;
        self.order_after_copies()
    }

    fn wait_all(&self) -> Result<()> {
        if self.done() {
            return Ok(());
        }
        self.wait_end()?;
        self.order_after_copies()?;
        self.done.store(true, Ordering::Release);
        Ok(())
    }
}

impl Drop for CudaFileUpload<'_> {
    /// Ends a streamed upload's gate if `end` did not (its readers must not wait for ever), waits for the
    /// copies still reading the staging buffer, then gives the buffer back to the backend.
    fn drop(&mut self) {
        if let Some(gate) = self.gate.get() {
            let _ = gate.end(Err("the read stopped before its end".into()));
        }
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
