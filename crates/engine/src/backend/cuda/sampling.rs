//! Sampling on the device (kernels/sampling.cu): [`crate::Backend::sample`] without copying logits to
//! the host. Each row's decisions are taken on the host by [`Sampler::device_row`] (which warpers apply,
//! the clamped top-k, top-p's threshold, the draw's uniform from the sequence's own ChaCha stream); the
//! kernel runs one block per row and returns the token, its log-probability and the alternatives, a few
//! words per row. The chosen token is then recorded in the sampler's history, as `choose` does.
//!
//! Rows the kernel does not cover go through the host path (their rows alone are copied back):
//! typical-p (its sort by distance to the entropy is not done on the device) and more than
//! [`MAX_DEVICE_TOP_N`] alternatives. `LORAX_CUDA_SAMPLING=host` sends every row to the host path.

use std::marker::PhantomData;

use cudarc::driver::{CudaEvent, PinnedHostSlice, PushKernelArg};

use super::{cfg, drv, int, uint, CudaBackend, CudaTensor, DevBuf};
use crate::error::{EngineError, Result};
use crate::sampling::{sample_host, Choice, DeviceRow, SampleTask, Sampled};

/// The most alternatives a row may ask for on the device (MAX_TOP_N in kernels/sampling.cu).
pub const MAX_DEVICE_TOP_N: u32 = 32;
/// Threads of a sampling block (SAMPLE_THREADS in kernels/sampling.cu).
const SAMPLE_THREADS: u32 = 512;
/// Words of one `struct SampleRow` in kernels/sampling.cu.
const ROW_WORDS: usize = 12;

const FLAG_DRAW: u32 = 1;
const FLAG_FORCED: u32 = 2;
const FLAG_TEMPERATURE: u32 = 4;
const FLAG_TOP_P: u32 = 8;

/// The kernel's inputs for a batch of rows: one `SampleRow` record per row, the histories as (token,
/// count) lists, the uniforms. Plain host data, so tests can build and read it without a device.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SamplePack {
    /// `ROW_WORDS` words per row (`struct SampleRow`).
    pub rows: Vec<u32>,
    /// History tokens of all rows, each row's slice named by its record.
    pub pen_tok: Vec<u32>,
    /// The counts of `pen_tok`.
    pub pen_cnt: Vec<u32>,
    /// One uniform per row (0 for rows that do not draw).
    pub uniforms: Vec<f64>,
    /// Whether some row applies top-p (the kernel then needs a second scratch row).
    pub top_p: bool,
    /// The largest `top_n` of the rows.
    pub max_top_n: u32,
}

/// One row's answer: token, log-probability, alternatives.
pub type RowOut = (u32, f32, Vec<(u32, f32)>);

impl SamplePack {
    /// Rows so far.
    pub fn len(&self) -> usize {
        self.uniforms.len()
    }

    /// No rows.
    pub fn is_empty(&self) -> bool {
        self.uniforms.is_empty()
    }

    /// Output words per row: token, logprob, count, then (token, logprob) per alternative.
    pub fn stride(&self) -> usize {
        3 + 2 * self.max_top_n as usize
    }

    /// A row choosing its token from logits row `row` as `r` says.
    pub fn push_choose(&mut self, row: u32, r: &DeviceRow) -> Result<()> {
        let start = u32::try_from(self.pen_tok.len()).map_err(|_| EngineError::Backend("history too long".into()))?;
        let pen = r.repetition_penalty != 1.0 || r.frequency_penalty != 0.0 || r.presence_penalty != 0.0;
        if pen {
            for &(t, c) in &r.history {
                self.pen_tok.push(t);
                self.pen_cnt.push(c);
            }
        }
        let end = u32::try_from(self.pen_tok.len()).map_err(|_| EngineError::Backend("history too long".into()))?;
        if r.top_n > MAX_DEVICE_TOP_N {
            return Err(EngineError::Backend(format!(
                "{} alternatives on the device (at most {MAX_DEVICE_TOP_N})",
                r.top_n
            )));
        }
        let mut flags = 0;
        if r.draw {
            flags |= FLAG_DRAW;
        }
        if r.temperature.is_some() {
            flags |= FLAG_TEMPERATURE;
        }
        if r.top_p_threshold.is_some() {
            flags |= FLAG_TOP_P;
            self.top_p = true;
        }
        self.rows.extend_from_slice(&[
            row,
            flags,
            0,
            r.top_k,
            r.temperature.unwrap_or(1.0).to_bits(),
            r.top_p_threshold.unwrap_or(0.0).to_bits(),
            r.repetition_penalty.to_bits(),
            r.frequency_penalty.to_bits(),
            r.presence_penalty.to_bits(),
            start,
            end,
            r.top_n,
        ]);
        self.uniforms.push(r.uniform);
        self.max_top_n = self.max_top_n.max(r.top_n);
        Ok(())
    }

    /// A row asking for `token`'s log-probability under the raw logits row `row`, and its `top_n` most likely
    /// tokens (at most [`MAX_DEVICE_TOP_N`]).
    pub fn push_logprob(&mut self, row: u32, token: u32, top_n: u32) {
        let at = u32::try_from(self.pen_tok.len()).unwrap_or(u32::MAX);
        self.rows.extend_from_slice(&[
            row,
            FLAG_FORCED,
            token,
            0,
            1f32.to_bits(),
            0,
            1f32.to_bits(),
            0,
            0,
            at,
            at,
            top_n.min(MAX_DEVICE_TOP_N),
        ]);
        self.uniforms.push(0.0);
        self.max_top_n = self.max_top_n.max(top_n.min(MAX_DEVICE_TOP_N));
    }

    /// Row `k`'s answer from the kernel's output words.
    pub fn read(&self, out: &[u32], k: usize) -> Result<RowOut> {
        let s = self.stride();
        let w = out
            .get(k * s..(k + 1) * s)
            .ok_or_else(|| EngineError::Backend(format!("sampling output row {k} missing")))?;
        let count = (w[2] as usize).min(self.max_top_n as usize);
        let top = (0..count)
            .map(|j| (w[3 + 2 * j], f32::from_bits(w[4 + 2 * j])))
            .collect();
        Ok((w[0], f32::from_bits(w[1]), top))
    }
}

/// A sampling launch ready to run: inputs uploaded, scratch and output allocated.
pub struct SamplePlan<'a> {
    out: DevBuf,
    _scratch: DevBuf,
    _exps: DevBuf,
    _inputs: DevBuf,
    ptrs: [u64; 8],
    ints: [i32; 2],
    rows: u32,
    words: usize,
    _logits: PhantomData<&'a CudaTensor>,
}

impl CudaBackend {
    /// Uploads `pack` and allocates what the kernel writes, for rows of `logits` `[rows, vocab]`.
    pub fn sample_plan<'a>(&self, logits: &'a CudaTensor, pack: &SamplePack) -> Result<SamplePlan<'a>> {
        let (rows, vocab) = logits.rows_cols();
        self.check_dtype_bytes(logits)?;
        for r in pack.rows.chunks_exact(ROW_WORDS) {
            let bad_token = r[1] & FLAG_FORCED != 0 && r[2] as usize >= vocab;
            if r[0] as usize >= rows || bad_token || r[10] as usize > pack.pen_tok.len() || r[9] > r[10] {
                return Err(EngineError::Backend(format!(
                    "sampling: record {r:?} for logits [{rows}, {vocab}]"
                )));
            }
        }
        let n = pack.len();
        let scratch = self.bytes(n * vocab * 4)?;
        let exps = self.bytes(if pack.top_p { n * vocab * 4 } else { 4 })?;
        let words = n * pack.stride();
        let out = self.bytes(words * 4)?;
        // One upload: the uniforms (8-byte aligned at the start), the records, the history tokens and
        // their counts.
        let mut bytes = Vec::with_capacity(8 * n + 4 * (pack.rows.len() + 2 * pack.pen_tok.len()));
        for u in &pack.uniforms {
            bytes.extend_from_slice(&u.to_le_bytes());
        }
        let mut offsets = [0u64; 3];
        for (k, list) in [&pack.rows, &pack.pen_tok, &pack.pen_cnt].into_iter().enumerate() {
            offsets[k] = bytes.len() as u64;
            for w in list {
                bytes.extend_from_slice(&w.to_le_bytes());
            }
        }
        let inputs = self.upload(&bytes)?;
        let base = self.ptr(&inputs);
        Ok(SamplePlan {
            ptrs: [
                self.ptr(&out),
                self.ptr(&scratch),
                self.ptr(&exps),
                self.ptr(&logits.buf),
                base + offsets[0],
                base + offsets[1],
                base + offsets[2],
                base,
            ],
            ints: [int("vocabulary", vocab)?, int("output stride", pack.stride())?],
            rows: uint("sampling rows", n)?,
            out,
            _scratch: scratch,
            _exps: exps,
            _inputs: inputs,
            words,
            _logits: PhantomData,
        })
    }

    /// Launches a planned sampling (capturable in a CUDA graph).
    pub fn sample_run(&self, plan: &SamplePlan<'_>) -> Result<()> {
        if plan.rows == 0 {
            return Ok(());
        }
        let [op, xp, ep, lp, rp, tp, cp, up] = &plan.ptrs;
        let [ni, si] = &plan.ints;
        launch!(
            self,
            "sample_rows",
            cfg((plan.rows, 1, 1), SAMPLE_THREADS, 0),
            op,
            xp,
            ep,
            lp,
            rp,
            tp,
            cp,
            up,
            ni,
            si
        );
        Ok(())
    }

    /// The output words of a run (waits for it).
    pub fn sample_fetch(&self, plan: &SamplePlan<'_>) -> Result<Vec<u32>> {
        if plan.words == 0 {
            return Ok(vec![]);
        }
        let mut bytes = vec![0u8; plan.words * 4];
        let src = self.ptr(&plan.out);
        // SAFETY: `out` holds `words` u32 words (allocated so by the plan).
        unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut bytes, src, self.stream.cu_stream()) }
            .map_err(|e| drv("download", e))?;
        self.synchronize()?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// [`crate::Backend::sample`] on the device, with the host path for the rows the kernel does not
    /// cover (see the module docs).
    pub fn sample_on_device(&self, logits: &CudaTensor, tasks: &mut [(usize, SampleTask<'_>)]) -> Result<Vec<Sampled>> {
        Ok(self.sample_feeding_on_device(logits, tasks, None)?.0)
    }
}

/// Pinned host memory for a sampling launch's output words, so that their copy back is queued without waiting
/// and the launch after it (a fed decode step) is queued before the host waits for the words.
pub struct Fetch {
    /// Owns the memory at `ptr`.
    _host: PinnedHostSlice<u8>,
    ptr: usize,
    cap: usize,
    copied: CudaEvent,
}

impl CudaBackend {
    /// [`CudaBackend::sample_on_device`]; with `feed` (task k's token row in the step recorded ahead), when every
    /// task runs in one device launch, the step recorded ahead is launched right after it with the chosen tokens
    /// ([`CudaBackend::graph_feed`]), before the host waits for them: its logits, or `None`.
    pub fn sample_feeding_on_device(
        &self,
        logits: &CudaTensor,
        tasks: &mut [(usize, SampleTask<'_>)],
        feed: Option<&[u32]>,
    ) -> Result<(Vec<Sampled>, Option<CudaTensor>)> {
        let (rows, vocab) = logits.rows_cols();
        if self.host_sampling {
            let mut host = crate::Backend::to_f32(self, logits)?;
            return Ok((sample_host(&mut host, vocab, tasks)?, None));
        }
        let n = tasks.len();
        let slots = feed.filter(|s| s.len() == n && self.graph_feed_on());
        let mut fed = None;
        let answers = split_tasks(
            rows,
            vocab,
            tasks,
            &mut |pack| {
                let plan = self.sample_plan(logits, pack)?;
                self.sample_run(&plan)?;
                match slots {
                    Some(slots) if pack.len() == n && fed.is_none() => {
                        self.sample_fetch_feeding(&plan, pack.stride(), slots, &mut fed)
                    }
                    _ => self.sample_fetch(&plan),
                }
            },
            &mut |picked| {
                let gathered = crate::Backend::gather_rows(self, logits, picked)?;
                crate::Backend::to_f32(self, &gathered)
            },
        )?;
        Ok((answers, fed))
    }

    /// [`CudaBackend::sample_fetch`], with the step recorded ahead launched between the words' copy back and the
    /// wait for it, its token ids taken from the words (`stride` a row; row k's to token row `slots[k]`): its
    /// logits go to `fed`.
    fn sample_fetch_feeding(
        &self,
        plan: &SamplePlan<'_>,
        stride: usize,
        slots: &[u32],
        fed: &mut Option<CudaTensor>,
    ) -> Result<Vec<u32>> {
        let bytes = plan.words * 4;
        let mut slot = self
            .fetch
            .lock()
            .map_err(|_| EngineError::Backend("sampling fetch state poisoned".into()))?;
        if slot.as_ref().is_none_or(|f| f.cap < bytes) {
            let cap = bytes.next_power_of_two().max(1 << 16);
            // SAFETY: plain bytes, written by the copy before they are read.
            let mut host = unsafe { self.ctx.alloc_pinned::<u8>(cap) }.map_err(|e| drv("pinned sampling output", e))?;
            let ptr = host.as_mut_ptr().map_err(|e| drv("pinned sampling output", e))? as usize;
            let copied = self.ctx.new_event(None).map_err(|e| drv("creating an event", e))?;
            *slot = Some(Fetch {
                _host: host,
                ptr,
                cap,
                copied,
            });
        }
        let f = slot
            .as_ref()
            .ok_or_else(|| EngineError::Backend("no sampling fetch buffer".into()))?;
        let src = self.ptr(&plan.out);
        // SAFETY: the pinned buffer holds `cap >= bytes` bytes at `ptr`, and nothing else uses it (under the lock;
        // the copy is waited for below before the lock goes).
        let dst = unsafe { std::slice::from_raw_parts_mut(f.ptr as *mut u8, bytes) };
        // SAFETY: `out` holds `words` u32 words (allocated so by the plan).
        unsafe { cudarc::driver::result::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }
            .map_err(|e| drv("download", e))?;
        if let Err(e) = f.copied.record(&self.stream) {
            // The copy into the buffer is queued: let it finish before the buffer is used again.
            let _ = self.stream.synchronize();
            return Err(drv("recording the sampling copy", e));
        }
        let launched = self.graph_feed(src, slots, stride);
        // Waited for also when the launch failed: the buffer is read next.
        f.copied
            .synchronize()
            .map_err(|e| drv("waiting for the sampling copy", e))?;
        *fed = launched?;
        Ok(dst
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

/// Most rows one sampling launch takes: its scratch is `rows × vocab` f32s, so logits of many rows run in
/// launches of this many rather than asking for one buffer of all of them (4096 rows of a 128256-token
/// vocabulary: 2.1 GB). The engine already hands a prompt scored whole over in pieces of
/// `engine::HEAD_ROWS_A_PASS` rows (which bound its logits); this bound holds for any caller, such as a
/// decode batch of more rows. Decode batches up to this many rows take one launch.
pub const DEVICE_ROWS_A_LAUNCH: usize = 512;

/// The device's share of [`crate::Backend::sample`], for logits `[rows, vocab]`: rows the kernel
/// covers are packed, at most [`DEVICE_ROWS_A_LAUNCH`] a pack, and given to `device` (which returns the
/// kernel's output words); the others' rows are fetched as f32 by `host_rows` (in the order asked) and
/// sampled on the host. Answers come in task order; chosen tokens are recorded in their samplers.
pub fn split_tasks(
    rows: usize,
    vocab: usize,
    tasks: &mut [(usize, SampleTask<'_>)],
    device: &mut dyn FnMut(&SamplePack) -> Result<Vec<u32>>,
    host_rows: &mut dyn FnMut(&[usize]) -> Result<Vec<f32>>,
) -> Result<Vec<Sampled>> {
    let mut results: Vec<Option<Sampled>> = vec![None; tasks.len()];
    let mut on_host = Vec::new();
    let mut next = 0;
    while next < tasks.len() {
        let mut pack = SamplePack::default();
        let mut on_device = Vec::new();
        while next < tasks.len() && on_device.len() < DEVICE_ROWS_A_LAUNCH {
            let i = next;
            next += 1;
            let (row, task) = &mut tasks[i];
            if *row >= rows {
                return Err(EngineError::Backend(format!("sampling row {row} of {rows}")));
            }
            let r = u32::try_from(*row).map_err(|_| EngineError::Backend(format!("row {row} overflows u32")))?;
            match task {
                SampleTask::Logprob { token, top_n } => {
                    if *token as usize >= vocab {
                        return Err(EngineError::Backend(format!(
                            "token {token} is outside the vocabulary ({vocab})"
                        )));
                    }
                    if *top_n > MAX_DEVICE_TOP_N {
                        on_host.push(i);
                    } else {
                        pack.push_logprob(r, *token, *top_n);
                        on_device.push(i);
                    }
                }
                SampleTask::Choose(s) => match s.device_row(vocab, MAX_DEVICE_TOP_N) {
                    Some(d) => {
                        pack.push_choose(r, &d)?;
                        on_device.push(i);
                    }
                    None => on_host.push(i),
                },
            }
        }
        if on_device.is_empty() {
            continue;
        }
        let out = device(&pack)?;
        for (k, &i) in on_device.iter().enumerate() {
            let (token, logprob, top) = pack.read(&out, k)?;
            results[i] = Some(match &mut tasks[i].1 {
                SampleTask::Choose(s) => {
                    s.record(token);
                    Sampled::Choice(Choice { token, logprob, top })
                }
                SampleTask::Logprob { .. } => Sampled::Logprob { logprob, top },
            });
        }
    }
    if !on_host.is_empty() {
        let picked: Vec<usize> = on_host.iter().map(|&i| tasks[i].0).collect();
        let mut host = host_rows(&picked)?;
        for (k, &i) in on_host.iter().enumerate() {
            let row = host
                .get_mut(k * vocab..(k + 1) * vocab)
                .ok_or_else(|| EngineError::Backend("gathered logits are short".into()))?;
            results[i] = match &mut tasks[i].1 {
                SampleTask::Choose(s) => Some(Sampled::Choice(s.choose(row))),
                SampleTask::Logprob { token, top_n } => crate::sampling::prompt_logprob(row, *token, *top_n),
            };
        }
    }
    results
        .into_iter()
        .map(|r| r.ok_or_else(|| EngineError::Backend("a sampling task got no answer".into())))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::sampling::{Sampler, SamplingParams};

    #[test]
    fn pack_records_and_reads_rows() {
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 0.5,
                top_p: 0.9,
                top_k: 5,
                repetition_penalty: 1.2,
                top_n_tokens: 2,
                seed: 7,
                ..SamplingParams::default()
            },
            &[3, 3, 9],
        );
        let mut pack = SamplePack::default();
        let d = s.device_row(100, MAX_DEVICE_TOP_N).unwrap();
        assert!(d.draw && d.uniform > 0.0 && d.uniform < 1.0);
        pack.push_choose(4, &d).unwrap();
        pack.push_logprob(1, 42, 1);
        assert_eq!(pack.len(), 2);
        assert!(pack.top_p);
        assert_eq!(pack.stride(), 7);
        assert_eq!(&pack.rows[..4], &[4, FLAG_DRAW | FLAG_TEMPERATURE | FLAG_TOP_P, 0, 5]);
        assert_eq!(pack.pen_tok, vec![3, 9]);
        assert_eq!(pack.pen_cnt, vec![2, 1]);
        assert_eq!(&pack.rows[ROW_WORDS..ROW_WORDS + 3], &[1, FLAG_FORCED, 42]);
        assert_eq!(pack.rows[2 * ROW_WORDS - 1], 1, "the forced row's alternatives");
        let out = [
            7,
            0.5f32.to_bits(),
            2,
            7,
            0.5f32.to_bits(),
            8,
            0.25f32.to_bits(),
            42,
            (-0.5f32).to_bits(),
            1,
            42,
            (-0.5f32).to_bits(),
            0,
            0,
        ];
        assert_eq!(pack.read(&out, 0).unwrap(), (7, 0.5, vec![(7, 0.5), (8, 0.25)]));
        assert_eq!(pack.read(&out, 1).unwrap(), (42, -0.5, vec![(42, -0.5)]));
        assert!(pack.read(&out, 2).is_err());
    }

    /// More device rows than one launch takes run in several launches of at most DEVICE_ROWS_A_LAUNCH rows,
    /// each answer where its task asked (a fake device that answers each row's forced token back).
    #[test]
    fn device_rows_run_in_launches_of_bounded_size() {
        let n = 2 * DEVICE_ROWS_A_LAUNCH + 7;
        let mut tasks: Vec<(usize, SampleTask<'_>)> = (0..n)
            .map(|i| {
                (
                    i,
                    SampleTask::Logprob {
                        token: (i % 50) as u32,
                        top_n: 1,
                    },
                )
            })
            .collect();
        let mut launches = Vec::new();
        let out = split_tasks(
            n,
            50,
            &mut tasks,
            &mut |pack| {
                launches.push(pack.len());
                let s = pack.stride();
                let mut words = vec![0u32; pack.len() * s];
                for (k, r) in pack.rows.chunks_exact(ROW_WORDS).enumerate() {
                    let lp = -(r[0] as f32);
                    words[k * s..k * s + 5].copy_from_slice(&[r[2], lp.to_bits(), 1, r[2], lp.to_bits()]);
                }
                Ok(words)
            },
            &mut |_| unreachable!("no host rows"),
        )
        .unwrap();
        assert_eq!(launches, vec![DEVICE_ROWS_A_LAUNCH, DEVICE_ROWS_A_LAUNCH, 7]);
        for (i, answer) in out.iter().enumerate() {
            let lp = -(i as f32);
            let t = (i % 50) as u32;
            assert_eq!(
                answer,
                &Sampled::Logprob {
                    logprob: lp,
                    top: vec![(t, lp)]
                },
                "task {i}"
            );
        }
    }

    #[test]
    fn device_rows_draw_the_same_uniform_as_choose() {
        let params = SamplingParams {
            do_sample: true,
            seed: 11,
            ..SamplingParams::default()
        };
        let mut a = Sampler::new(params.clone(), &[]);
        let b = a.clone();
        let u = a.device_row(4, MAX_DEVICE_TOP_N).unwrap().uniform;
        // The draw walks the cumulative softmax: with equal weights, token floor(4u).
        let mut b = b;
        let c = b.choose(&mut [0.0; 4]);
        assert_eq!(c.token, (u * 4.0) as u32);
        // Typical-p and too many alternatives stay on the host, and draw nothing.
        let mut t = Sampler::new(
            SamplingParams {
                typical_p: 0.5,
                ..params.clone()
            },
            &[],
        );
        assert!(t.device_row(4, MAX_DEVICE_TOP_N).is_none());
        let mut t = Sampler::new(
            SamplingParams {
                top_n_tokens: 33,
                ..params
            },
            &[],
        );
        assert!(t.device_row(4, MAX_DEVICE_TOP_N).is_none());
        // Greedy rows keep top-k off and draw no uniform.
        let mut g = Sampler::new(
            SamplingParams {
                top_k: 0,
                ..SamplingParams::default()
            },
            &[],
        );
        let d = g.device_row(4, MAX_DEVICE_TOP_N).unwrap();
        assert!(!d.draw && d.uniform == 0.0 && d.top_k == 0);
    }
}
