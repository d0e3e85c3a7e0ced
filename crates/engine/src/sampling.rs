//! Next-token choice with Hugging Face / LoRAX semantics.
//!
//! A [`Sampler`] holds one sequence's [`SamplingParams`], a seeded ChaCha20 RNG and the token counts of
//! its history (prompt + generated). [`Sampler::process`] rewrites a logits row in place, in LoRAX's
//! order: repetition penalty, frequency + presence penalty, then (only when sampling) temperature,
//! top-k, top-p and typical-p, exactly as transformers' logits processors do (min_tokens_to_keep = 1);
//! filtered entries become `-inf`. [`Sampler::choose`] then takes the argmax (greedy) or a seeded draw
//! from the softmax of the processed scores, and reports the token's log-probability and the top-n
//! alternatives from the log-softmax of the processed scores.
//!
//! The boundary decisions of top-p and typical-p follow torch's CPU arithmetic: softmax and
//! log-softmax element-wise in f32 (subtract the max, `exp`, scale by the sum), cumulative sums
//! accumulated in f64 and rounded to f32 per element (torch's CPU `cumsum` accumulates in double),
//! and thresholds compared in f32. Row sums (softmax denominators, the typical-p entropy) are
//! accumulated in f64 and rounded to f32: torch sums lane-parallel / cascaded, which is far more
//! accurate than a sequential f32 sum over 32k entries, and the sequential f32 sum flips typical-p
//! boundary tokens against the transformers fixtures while the f64 sum matches them exactly.

use std::collections::BTreeMap;

use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};

/// One request's next-token parameters (validated by the router before they get here).
///
/// Each knob has an "off" value; [`SamplingParams::default`] turns everything off (greedy decoding).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    /// Divides the logits; 1.0 = off.
    pub temperature: f32,
    /// Keep only the k most likely tokens (ties with the k-th are kept); 0 = off.
    pub top_k: u32,
    /// Nucleus sampling: keep the smallest most-likely set whose mass exceeds `top_p`; 1.0 = off.
    pub top_p: f32,
    /// Locally typical sampling mass; 1.0 = off.
    pub typical_p: f32,
    /// Draw from the distribution instead of taking the argmax.
    pub do_sample: bool,
    /// CTRL-style repetition penalty over the history's distinct tokens; 1.0 = off.
    pub repetition_penalty: f32,
    /// OpenAI frequency penalty: `logit -= f * count`; 0.0 = off.
    pub frequency_penalty: f32,
    /// OpenAI presence penalty: `logit -= p * (count > 0)`; 0.0 = off.
    pub presence_penalty: f32,
    /// Seed of the sequence's ChaCha20 RNG.
    pub seed: u64,
    /// Number of alternatives to return with each token.
    pub top_n_tokens: u32,
}

impl Default for SamplingParams {
    /// Everything off: greedy, no penalties, seed 0, no alternatives.
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            typical_p: 1.0,
            do_sample: false,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 0,
            top_n_tokens: 0,
        }
    }
}

impl SamplingParams {
    /// Whether the next token is drawn rather than argmax'd (the TGI/LoRAX rule): `do_sample`, or any
    /// warper switched on (temperature != 1, top_k != 0, top_p < 1, typical_p < 1).
    pub fn is_sampling(&self) -> bool {
        self.do_sample || self.temperature != 1.0 || self.top_k != 0 || self.top_p < 1.0 || self.typical_p < 1.0
    }
}

/// The chosen token, its log-probability and the top-n alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    /// The chosen token id.
    pub token: u32,
    /// `log_softmax` of the processed scores at `token`.
    pub logprob: f32,
    /// Up to `top_n_tokens` `(token, logprob)` pairs, most likely first (ties: lower id first);
    /// tokens filtered to `-inf` are never listed.
    pub top: Vec<(u32, f32)>,
}

/// Per-sequence sampling state: params, a seeded ChaCha20 RNG and the token counts of the history
/// (prompt + generated). A clone continues the same random stream (tests compare backends that way).
#[derive(Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha20Rng,
    /// token -> number of occurrences in the history.
    counts: BTreeMap<u32, u32>,
    /// `1 - top_p` as Python computes it (in f64 from the decimal value), rounded to f32 for the
    /// comparison against f32 cumulative probabilities.
    top_p_threshold: f32,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler")
            .field("params", &self.params)
            .field("history_len", &self.counts.values().map(|&c| c as u64).sum::<u64>())
            .finish_non_exhaustive()
    }
}

impl Sampler {
    /// A sampler for one sequence whose history so far (usually the prompt) is `history`; the RNG is
    /// seeded with `params.seed`.
    pub fn new(params: SamplingParams, history: &[u32]) -> Self {
        let mut counts = BTreeMap::new();
        for &t in history {
            *counts.entry(t).or_insert(0u32) += 1;
        }
        let rng = ChaCha20Rng::seed_from_u64(params.seed);
        let top_p_threshold = (1.0 - decimal_f64(params.top_p)) as f32;
        Self {
            params,
            rng,
            counts,
            top_p_threshold,
        }
    }

    /// The sequence's parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// How many times `token` occurs in the history (prompt + recorded tokens).
    pub fn count(&self, token: u32) -> u32 {
        self.counts.get(&token).copied().unwrap_or(0)
    }

    /// Appends `token` to the history counts (`choose` does this for the token it picks; call it for
    /// tokens that enter the sequence some other way).
    pub fn record(&mut self, token: u32) {
        *self.counts.entry(token).or_insert(0) += 1;
    }

    /// What a device kernel needs to reproduce [`Sampler::choose`] on a row of `vocab` logits, or
    /// `None` when the row needs the host (typical-p, or more than `max_top_n` alternatives). When the
    /// row is sampled, this draws its uniform from the sequence's RNG, exactly as `choose` would; the
    /// caller then records the token the device chose with [`Sampler::record`].
    pub fn device_row(&mut self, vocab: usize, max_top_n: u32) -> Option<DeviceRow> {
        let p = &self.params;
        let draw = p.is_sampling();
        if (draw && p.typical_p < 1.0) || p.top_n_tokens > max_top_n {
            return None;
        }
        // apply_top_k's clamps: k at least 1, and off when it keeps the whole row.
        let top_k = match p.top_k as usize {
            0 => 0,
            k if k.max(1) >= vocab => 0,
            k => k.max(1) as u32,
        };
        // The kernel reads the history only for penalties: do not copy it every step otherwise.
        let penalties = p.repetition_penalty != 1.0 || p.frequency_penalty != 0.0 || p.presence_penalty != 0.0;
        let row = DeviceRow {
            draw,
            temperature: (draw && p.temperature != 1.0).then_some(p.temperature),
            top_k: if draw { top_k } else { 0 },
            top_p_threshold: (draw && p.top_p < 1.0).then_some(self.top_p_threshold),
            repetition_penalty: p.repetition_penalty,
            frequency_penalty: p.frequency_penalty,
            presence_penalty: p.presence_penalty,
            history: if penalties {
                self.counts.iter().map(|(&t, &c)| (t, c)).collect()
            } else {
                Vec::new()
            },
            top_n: p.top_n_tokens,
            uniform: 0.0,
        };
        let uniform = if draw { uniform01(&mut self.rng) } else { 0.0 };
        Some(DeviceRow { uniform, ..row })
    }

    /// Applies, in place and in LoRAX's order: repetition penalty, frequency + presence penalty, then
    /// (only when [`SamplingParams::is_sampling`]) temperature, top-k, top-p and typical-p. Filtered
    /// entries become `-inf`. History tokens outside the row are ignored.
    pub fn process(&self, logits: &mut [f32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let pen = p.repetition_penalty;
            for &t in self.counts.keys() {
                if let Some(s) = logits.get_mut(t as usize) {
                    // A tiny penalty can push a score past f32's range: clamp, so no +inf (and then NaN)
                    // reaches the softmax.
                    *s = if *s < 0.0 { *s * pen } else { (*s / pen).min(f32::MAX) };
                }
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            for (&t, &c) in &self.counts {
                if let Some(s) = logits.get_mut(t as usize) {
                    // As the reference: scores - f * counts - p * (counts > 0), each step in f32.
                    let presence = if c > 0 { p.presence_penalty } else { 0.0 };
                    *s = (*s - p.frequency_penalty * c as f32) - presence;
                }
            }
        }
        if !p.is_sampling() {
            return;
        }
        if p.temperature != 1.0 {
            apply_temperature(logits, p.temperature);
        }
        if p.top_k != 0 {
            apply_top_k(logits, p.top_k as usize);
        }
        if p.top_p < 1.0 {
            apply_top_p_threshold(logits, self.top_p_threshold);
        }
        if p.typical_p < 1.0 {
            apply_typical(logits, p.typical_p);
        }
    }

    /// Runs [`Sampler::process`], then picks: the argmax when not sampling, else a draw from the
    /// softmax of the processed scores with the sequence's RNG. The log-probability and the
    /// alternatives come from `log_softmax` of the processed scores. The chosen token is recorded
    /// into the history counts, so later penalties see it.
    pub fn choose(&mut self, logits: &mut [f32]) -> Choice {
        self.process(logits);
        let token = if self.params.is_sampling() {
            let u = uniform01(&mut self.rng);
            draw(logits, u)
        } else {
            argmax(logits)
        };
        // log_softmax of one entry is `x - logsumexp(x)`: no vocabulary-sized buffer per token.
        let lse = log_sum_exp(logits);
        let logprob = match logits.get(token as usize) {
            Some(&v) if lse.is_finite() => (f64::from(v) - lse) as f32,
            _ => f32::NEG_INFINITY,
        };
        let top = alternatives(logits, self.params.top_n_tokens as usize, lse);
        self.record(token);
        Choice { token, logprob, top }
    }
}

/// One row's sampling as a device kernel sees it ([`Sampler::device_row`]): every decision of
/// [`Sampler::choose`] already taken on the host (which warpers apply, the clamped top-k, the top-p
/// threshold, the uniform of a draw), so the kernel only does arithmetic.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceRow {
    /// Draw from the softmax (else argmax).
    pub draw: bool,
    /// Divide by this (sampling with `temperature != 1` only).
    pub temperature: Option<f32>,
    /// Keep the `top_k` largest values and their ties; 0 = off (clamped as `apply_top_k` does).
    pub top_k: u32,
    /// `1 - top_p` as f32: remove the ascending prefix whose cumulative probability is at most this.
    pub top_p_threshold: Option<f32>,
    /// Repetition penalty (1 = off).
    pub repetition_penalty: f32,
    /// Frequency penalty (0 = off).
    pub frequency_penalty: f32,
    /// Presence penalty (0 = off).
    pub presence_penalty: f32,
    /// The history's (token, count) pairs, ascending by token; empty when no penalty is on.
    pub history: Vec<(u32, u32)>,
    /// Alternatives to return.
    pub top_n: u32,
    /// The draw's uniform in [0, 1) from the sequence's RNG (0 when not drawing).
    pub uniform: f64,
}

/// What to compute from one logits row ([`crate::Backend::sample`]).
#[derive(Debug)]
pub enum SampleTask<'a> {
    /// The next token, chosen by this sequence's sampler as [`Sampler::choose`] does (and recorded in
    /// its history).
    Choose(&'a mut Sampler),
    /// The log-probability of `token` under the raw logits (a prompt token's logprob), and the `top_n`
    /// most likely tokens under them.
    Logprob {
        /// The token whose log-probability is asked.
        token: u32,
        /// Alternatives to return.
        top_n: u32,
    },
}

/// The answer to one [`SampleTask`].
#[derive(Clone, Debug, PartialEq)]
pub enum Sampled {
    /// The chosen token, its logprob and alternatives.
    Choice(Choice),
    /// The asked token's log-probability and the alternatives, as `Choice::top`.
    Logprob {
        /// log p(token).
        logprob: f32,
        /// Up to `top_n` `(token, logprob)` pairs, most likely first (ties: lower id first).
        top: Vec<(u32, f32)>,
    },
}

/// A [`SampleTask::Logprob`] on the host: `token`'s log-probability under the raw `row` and its `top_n`
/// most likely tokens (`None` when `token` is outside the row).
pub fn prompt_logprob(row: &[f32], token: u32, top_n: u32) -> Option<Sampled> {
    let v = *row.get(token as usize)?;
    let lse = log_sum_exp(row);
    let logprob = (f64::from(v) - lse) as f32;
    let top = alternatives(row, top_n as usize, lse);
    Some(Sampled::Logprob { logprob, top })
}

/// The `n` most likely entries of `row` as `(token, log_softmax)`, `lse` being the row's log-sum-exp.
fn alternatives(row: &[f32], n: usize, lse: f64) -> Vec<(u32, f32)> {
    top_n_of(row, n)
        .into_iter()
        .map(|(t, v)| (t, (f64::from(v) - lse) as f32))
        .collect()
}

/// The host path of [`crate::Backend::sample`]: runs each `(row, task)` on row `row` of `logits`
/// (`vocab` values per row), in order. A `Choose` rewrites its row in place, so each row serves one task.
pub fn sample_host(
    logits: &mut [f32],
    vocab: usize,
    tasks: &mut [(usize, SampleTask<'_>)],
) -> crate::error::Result<Vec<Sampled>> {
    let bad = |what: String| crate::error::EngineError::Backend(what);
    tasks
        .iter_mut()
        .map(|(row, task)| {
            let rows = logits.len() / vocab.max(1);
            let r = logits
                .get_mut(*row * vocab..(*row + 1) * vocab)
                .ok_or_else(|| bad(format!("sampling row {row} of {rows}")))?;
            Ok(match task {
                SampleTask::Choose(s) => Sampled::Choice(s.choose(r)),
                SampleTask::Logprob { token, top_n } => prompt_logprob(r, *token, *top_n)
                    .ok_or_else(|| bad(format!("token {token} is outside the vocabulary ({vocab})")))?,
            })
        })
        .collect()
}

/// Numerically stable log-softmax (max subtracted, sum of exponentials accumulated in f64).
/// `-inf` entries stay `-inf`; a row with no finite maximum (all `-inf`) comes back all `-inf`.
pub fn log_softmax(x: &[f32]) -> Vec<f32> {
    let lse = log_sum_exp(x);
    if lse == f64::NEG_INFINITY {
        return vec![f32::NEG_INFINITY; x.len()];
    }
    x.iter().map(|&v| (v as f64 - lse) as f32).collect()
}

/// `log(sum(exp(x)))`, max subtracted, accumulated in f64; `-inf` when nothing is finite.
pub fn log_sum_exp(x: &[f32]) -> f64 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    let max64 = max as f64;
    let sum: f64 = x.iter().map(|&v| (v as f64 - max64).exp()).sum();
    max64 + sum.ln()
}

/// Index of the first maximum (torch.argmax on ties: the first). NaN counts as the maximum, as in
/// torch; an empty slice gives 0.
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in x.iter().enumerate() {
        let b = x[best];
        if b.is_nan() {
            break;
        }
        if v > b || v.is_nan() {
            best = i;
        }
    }
    best as u32
}

/// The f64 a Python float written as this f32's shortest decimal would have (0.9f32 -> 0.9f64), so
/// `1 - top_p` is computed as the Python reference computes it.
fn decimal_f64(x: f32) -> f64 {
    format!("{x}").parse::<f64>().unwrap_or(x as f64)
}

/// 53 random bits as a uniform f64 in [0, 1).
fn uniform01(rng: &mut ChaCha20Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Walks the cumulative softmax of `scores` in index order and returns the first index whose
/// cumulative probability exceeds `u` (in [0, 1)). Zero-probability entries are never chosen; a
/// row with nothing finite falls back to the argmax.
fn draw(scores: &[f32], u: f64) -> u32 {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return argmax(scores);
    }
    let max64 = max as f64;
    // Two passes recomputing exp rather than a vocabulary-sized buffer per token.
    let weight = |v: f32| (v as f64 - max64).exp();
    let total: f64 = scores.iter().map(|&v| weight(v)).sum();
    let target = u * total;
    let mut cum = 0.0f64;
    let mut last_positive = None;
    for (i, w) in scores.iter().map(|&v| weight(v)).enumerate() {
        if w > 0.0 {
            cum += w;
            last_positive = Some(i);
            if cum > target {
                return i as u32;
            }
        }
    }
    // Rounding left `target` at or past the end: take the last token with any mass.
    last_positive.map_or_else(|| argmax(scores), |i| i as u32)
}

/// The `n` largest finite entries of `logprobs` (or of the scores: the order is the same), largest
/// first, ties by lower index.
fn top_n_of(logprobs: &[f32], n: usize) -> Vec<(u32, f32)> {
    if n == 0 {
        return Vec::new();
    }
    let mut idx: Vec<usize> = (0..logprobs.len())
        .filter(|&i| logprobs[i] > f32::NEG_INFINITY)
        .collect();
    let by_desc = |a: &usize, b: &usize| logprobs[*b].total_cmp(&logprobs[*a]).then(a.cmp(b));
    if idx.len() > n {
        idx.select_nth_unstable_by(n - 1, by_desc);
        idx.truncate(n);
    }
    idx.sort_by(by_desc);
    idx.into_iter().map(|i| (i as u32, logprobs[i])).collect()
}

/// Sum of f32 values accumulated in f64, rounded to f32 (stands in for torch's accurate
/// lane-parallel / cascade f32 sums).
fn sum_f32(x: &[f32]) -> f32 {
    x.iter().map(|&v| v as f64).sum::<f64>() as f32
}

/// torch-style CPU softmax in f32: subtract the max, `exp`, sum, multiply by 1/sum.
fn softmax_f32(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut out: Vec<f32> = x.iter().map(|&v| (v - max).exp()).collect();
    let inv = 1.0 / sum_f32(&out);
    for v in &mut out {
        *v *= inv;
    }
    out
}

/// torch-style CPU cumsum of f32: accumulate in f64, round each output to f32.
fn cumsum_f32(x: &[f32]) -> Vec<f32> {
    let mut acc = 0.0f64;
    x.iter()
        .map(|&v| {
            acc += v as f64;
            acc as f32
        })
        .collect()
}

/// Indices of `x` sorted ascending by value, stable (equal values keep index order).
fn argsort_ascending(x: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    idx
}

/// TemperatureLogitsWarper: `scores / t`. A temperature so small that the largest score leaves f32's
/// range (where the reference would produce NaN probabilities) is taken at its limit, greedy: the
/// maximal entries are kept (as 0) and every other becomes `-inf`.
fn apply_temperature(logits: &mut [f32], t: f32) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max.is_finite() && !(max / t).is_finite() {
        for v in logits {
            *v = if *v == max { 0.0 } else { f32::NEG_INFINITY };
        }
        return;
    }
    for v in logits {
        *v /= t;
    }
}

/// TopKLogitsWarper: remove every entry below the k-th largest value (k clamped to the row length;
/// ties with the k-th are kept).
fn apply_top_k(logits: &mut [f32], k: usize) {
    let k = k.max(1);
    if k >= logits.len() {
        return;
    }
    let mut vals = logits.to_vec();
    let (_, kth, _) = vals.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let kth = *kth;
    for v in logits {
        if *v < kth {
            *v = f32::NEG_INFINITY;
        }
    }
}

/// TopPLogitsWarper with a precomputed `1 - top_p` threshold: sort ascending, remove the entries
/// whose cumulative probability is `<= threshold`, never the largest.
fn apply_top_p_threshold(logits: &mut [f32], threshold: f32) {
    let n = logits.len();
    if n == 0 {
        return;
    }
    let idx = argsort_ascending(logits);
    let sorted: Vec<f32> = idx.iter().map(|&i| logits[i]).collect();
    let cum = cumsum_f32(&softmax_f32(&sorted));
    for (pos, &i) in idx.iter().enumerate().take(n - 1) {
        if cum[pos] <= threshold {
            logits[i] = f32::NEG_INFINITY;
        }
    }
}

/// TypicalLogitsWarper(mass): keep the tokens whose surprisal is closest to the entropy until their
/// mass reaches `mass` (the first sorted entry is always kept).
fn apply_typical(logits: &mut [f32], mass: f32) {
    let n = logits.len();
    if n == 0 {
        return;
    }
    // normalized = log_softmax(scores) in f32, as torch's CPU kernel: (x - max) - log(sum exp(x - max)).
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return;
    }
    let exps: Vec<f32> = logits.iter().map(|&v| (v - max).exp()).collect();
    let lse = sum_f32(&exps).ln();
    let normalized: Vec<f32> = logits.iter().map(|&v| (v - max) - lse).collect();
    // ent = -nansum(normalized * exp(normalized)); -inf entries give NaN (-inf * 0) and are skipped.
    let mut ent_acc = 0.0f64;
    for &l in &normalized {
        let term = l * l.exp();
        if !term.is_nan() {
            ent_acc += term as f64;
        }
    }
    let ent = -(ent_acc as f32);
    let shifted: Vec<f32> = normalized.iter().map(|&l| ((-l) - ent).abs()).collect();
    let idx = argsort_ascending(&shifted);
    let sorted_logits: Vec<f32> = idx.iter().map(|&i| logits[i]).collect();
    let cum = cumsum_f32(&softmax_f32(&sorted_logits));
    let last_ind = cum.iter().filter(|&&c| c < mass).count().min(n - 1);
    let cutoff = shifted[idx[last_ind]];
    for &i in idx.iter().skip(1) {
        if shifted[i] > cutoff {
            logits[i] = f32::NEG_INFINITY;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Logits that are not all numbers (an overflowing adapter) give the chosen token a logprob of -inf,
    /// greedy or drawn, which a chosen token never has otherwise: the router fails such a request on it
    /// (`scheduler::not_a_number`). The CUDA sampler does the same (`lse_finite`, kernels/sampling.cu).
    #[test]
    fn non_finite_logits_give_the_chosen_token_minus_infinity() {
        for bad in [f32::NAN, f32::INFINITY] {
            for params in [SamplingParams::default(), sampling(|_| {})] {
                let mut row = vec![0.5, bad, -1.0, 2.0];
                let mut sampler = Sampler::new(params, &[]);
                let got = sample_host(&mut row, 4, &mut [(0, SampleTask::Choose(&mut sampler))]).expect("sampled");
                let [Sampled::Choice(choice)] = got.as_slice() else {
                    panic!("{got:?}")
                };
                assert_eq!(choice.logprob, f32::NEG_INFINITY, "{bad}: {choice:?}");
            }
        }
        let mut row = vec![0.5, 1.0, -1.0, 2.0];
        let mut sampler = Sampler::new(SamplingParams::default(), &[]);
        let got = sample_host(&mut row, 4, &mut [(0, SampleTask::Choose(&mut sampler))]).expect("sampled");
        let [Sampled::Choice(choice)] = got.as_slice() else {
            panic!("{got:?}")
        };
        assert!(choice.logprob.is_finite(), "{choice:?}");
    }

    fn sampling(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams {
            do_sample: true,
            ..SamplingParams::default()
        };
        f(&mut p);
        p
    }

    #[test]
    fn default_is_greedy() {
        let p = SamplingParams::default();
        assert!(!p.is_sampling());
        assert!(SamplingParams {
            temperature: 0.5,
            ..p.clone()
        }
        .is_sampling());
        assert!(SamplingParams { top_k: 3, ..p.clone() }.is_sampling());
        assert!(SamplingParams {
            top_p: 0.9,
            ..p.clone()
        }
        .is_sampling());
        assert!(SamplingParams {
            typical_p: 0.9,
            ..p.clone()
        }
        .is_sampling());
        assert!(SamplingParams {
            do_sample: true,
            ..p.clone()
        }
        .is_sampling());
        assert!(!SamplingParams {
            repetition_penalty: 1.5,
            ..p
        }
        .is_sampling());
    }

    #[test]
    fn top_k_larger_than_vocab_is_noop() {
        let s = Sampler::new(sampling(|p| p.top_k = 100), &[]);
        let mut x = vec![0.5, -1.0, 2.0, 0.0];
        let orig = x.clone();
        s.process(&mut x);
        assert_eq!(x, orig);
    }

    #[test]
    fn top_k_keeps_ties() {
        let s = Sampler::new(sampling(|p| p.top_k = 2), &[]);
        let mut x = vec![1.0, 3.0, 1.0, 0.0, 3.0, 3.0];
        s.process(&mut x);
        let ni = f32::NEG_INFINITY;
        assert_eq!(x, vec![ni, 3.0, ni, ni, 3.0, 3.0]);
        let s = Sampler::new(sampling(|p| p.top_k = 3), &[]);
        let mut x = vec![1.0, 3.0, 2.0, 2.0, 0.0];
        s.process(&mut x);
        assert_eq!(x, vec![ni, 3.0, 2.0, 2.0, ni]);
    }

    #[test]
    fn top_p_one_is_noop() {
        let s = Sampler::new(sampling(|p| p.top_p = 1.0), &[]);
        // Tiny probabilities that a literal `cumprob <= 0` rule could drop: top_p = 1 must not.
        let mut x = vec![0.0, -200.0, 5.0, -1e4];
        let orig = x.clone();
        s.process(&mut x);
        assert_eq!(x, orig);
    }

    #[test]
    fn top_p_small_keeps_largest() {
        let s = Sampler::new(sampling(|p| p.top_p = 0.01), &[]);
        let mut x = vec![0.0, 1.0, 0.9, 0.5];
        s.process(&mut x);
        let ni = f32::NEG_INFINITY;
        assert_eq!(x, vec![ni, 1.0, ni, ni]);
    }

    #[test]
    fn top_p_boundary() {
        // probs 0.5, 0.25, 0.25 (ln-space); top_p = 0.5: cum ascending 0.25, 0.5, 1.0; remove cum <= 0.5.
        let l2 = std::f32::consts::LN_2;
        let s = Sampler::new(sampling(|p| p.top_p = 0.5), &[]);
        let mut x = vec![0.0, l2, 0.0];
        s.process(&mut x);
        assert_eq!(x.iter().filter(|v| v.is_finite()).count(), 1);
        assert_eq!(x[1], l2);
    }

    #[test]
    fn all_but_one_neg_inf() {
        let ni = f32::NEG_INFINITY;
        let input = vec![ni, ni, 1.5, ni];
        for params in [
            sampling(|p| p.top_k = 2),
            sampling(|p| p.top_p = 0.5),
            sampling(|p| p.typical_p = 0.5),
            sampling(|p| {
                p.temperature = 0.7;
                p.top_k = 3;
                p.top_p = 0.9;
                p.typical_p = 0.9;
            }),
            SamplingParams::default(),
        ] {
            let mut s = Sampler::new(params.clone(), &[]);
            let mut x = input.clone();
            s.process(&mut x);
            assert_eq!(x.iter().filter(|v| v.is_finite()).count(), 1, "{params:?}");
            for _ in 0..20 {
                let mut x = input.clone();
                let c = s.choose(&mut x);
                assert_eq!(c.token, 2);
                assert_eq!(c.logprob, 0.0);
            }
        }
    }

    /// Temperatures and repetition penalties at the edge of f32 give the limit's token with a finite
    /// log-probability, never NaN or an arbitrary token.
    #[test]
    fn extreme_temperature_and_penalty_stay_finite() {
        for (t, logits) in [(1e-40_f32, vec![1.0_f32, 3.0, 2.0]), (1e-45, vec![-5.0, -1.0, -3.0])] {
            let mut s = Sampler::new(sampling(|p| p.temperature = t), &[]);
            let mut x = logits.clone();
            let c = s.choose(&mut x);
            assert_eq!(c.token, 1, "temperature {t}: the limit is greedy");
            assert!(c.logprob.is_finite(), "temperature {t}: {}", c.logprob);
        }
        let mut s = Sampler::new(
            sampling(|p| {
                p.repetition_penalty = 1e-38;
                p.temperature = 0.5;
            }),
            &[0, 2],
        );
        let mut x = vec![20.0_f32, 3.0, 10.0];
        let c = s.choose(&mut x);
        assert!(x.iter().all(|v| !v.is_nan()), "{x:?}");
        assert!(c.token == 0 || c.token == 2, "a repeated token wins: {}", c.token);
        assert!(c.logprob.is_finite(), "{}", c.logprob);
    }

    #[test]
    fn all_neg_inf_does_not_panic() {
        let ni = f32::NEG_INFINITY;
        let mut s = Sampler::new(
            sampling(|p| {
                p.top_k = 2;
                p.top_p = 0.5;
                p.typical_p = 0.5;
                p.top_n_tokens = 3;
            }),
            &[],
        );
        let mut x = vec![ni; 4];
        let c = s.choose(&mut x);
        assert_eq!(c.token, 0);
        assert_eq!(c.logprob, ni);
        assert!(c.top.is_empty());
        assert!(log_softmax(&[]).is_empty());
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn log_softmax_and_argmax() {
        let ni = f32::NEG_INFINITY;
        let lp = log_softmax(&[0.0, ni, 0.0]);
        assert_eq!(lp[1], ni);
        assert!((lp[0] - (-std::f32::consts::LN_2)).abs() < 1e-7);
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[ni, ni, -1.0]), 2);
        assert_eq!(argmax(&[1.0, f32::NAN, 3.0]), 1);
        // Large magnitudes stay finite.
        let lp = log_softmax(&[1e30, 0.0]);
        assert_eq!(lp[0], 0.0);
    }

    #[test]
    fn repetition_penalty_signs() {
        let s = Sampler::new(
            SamplingParams {
                repetition_penalty: 2.0,
                ..SamplingParams::default()
            },
            &[0, 1, 1, 7],
        );
        let mut x = vec![4.0, -4.0, 4.0];
        s.process(&mut x);
        assert_eq!(x, vec![2.0, -8.0, 4.0]);
    }

    #[test]
    fn frequency_presence() {
        let mut s = Sampler::new(
            SamplingParams {
                frequency_penalty: 0.5,
                presence_penalty: 0.25,
                ..SamplingParams::default()
            },
            &[0, 1, 1],
        );
        let mut x = vec![1.0, 1.0, 1.0];
        s.process(&mut x);
        assert_eq!(x, vec![0.25, -0.25, 1.0]);
        s.record(2);
        assert_eq!(s.count(2), 1);
        let mut x = vec![1.0, 1.0, 1.0];
        s.process(&mut x);
        assert_eq!(x[2], 0.25);
    }

    #[test]
    fn top_n_ordering() {
        let lp = [-1.0, -0.5, f32::NEG_INFINITY, -0.5, -3.0];
        assert_eq!(top_n_of(&lp, 3), vec![(1, -0.5), (3, -0.5), (0, -1.0)]);
        assert_eq!(top_n_of(&lp, 10).len(), 4);
        assert!(top_n_of(&lp, 0).is_empty());
    }

    #[test]
    fn draw_walks_cumulative() {
        let l3 = 3f32.ln();
        // probs 0.25, 0.75
        let x = [0.0, l3];
        assert_eq!(draw(&x, 0.0), 0);
        assert_eq!(draw(&x, 0.2499), 0);
        assert_eq!(draw(&x, 0.2501), 1);
        assert_eq!(draw(&x, 0.999_999), 1);
        let ni = f32::NEG_INFINITY;
        assert_eq!(draw(&[ni, 0.0, ni], 0.0), 1);
        assert_eq!(draw(&[ni, 0.0, ni], 0.999_999_9), 1);
    }

    #[test]
    fn decimal_threshold() {
        assert_eq!(decimal_f64(0.9), 0.9f64);
        assert_eq!((1.0 - decimal_f64(0.9)) as f32, (1.0f64 - 0.9f64) as f32);
    }
}
