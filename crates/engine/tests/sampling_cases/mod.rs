//! Random sampling cases and their comparison with the host twin (`sampling::sample_host`, i.e.
//! `Sampler::choose`), shared by the device tests. A case is a logits matrix (values as bf16 stores
//! them) and one task per row: a token choice with random parameters (greedy, temperature extremes,
//! top-k 1/50/vocab, top-p 0.1..0.999, penalties, alternatives, typical-p for the host fallback) or a
//! prompt token's logprob. Rows come in shapes that stress the edges: ordinary random, peaked (a few
//! tokens hold most of the mass), few distinct values (ties everywhere, the maximum tied), all but one
//! -inf, all -inf, flat, and very wide ranges.
//!
//! `compare` checks what the device must reproduce: greedy tokens identical; drawn tokens identical
//! (both sides use the same uniform: the samplers are clones), unless the host's own arithmetic puts
//! the case at a rounding boundary, which `explain` verifies and reports; logprobs within `LP_TOL`;
//! alternatives the same tokens in the same order.
#![allow(dead_code, clippy::unwrap_used)]

use lorax_engine::sampling::{sample_host, Choice, SampleTask, Sampled, Sampler, SamplingParams};

use super::cuda_common::Rng;

/// Largest |device − host| logprob allowed, relative to max(1, |host|). Both sides compute
/// `x − logsumexp` with f64 sums; they differ by the summation order (~1e-16) and one f32 rounding.
pub const LP_TOL: f64 = 1e-5;

/// What a row is asked for.
#[derive(Clone, Debug)]
pub enum Spec {
    /// Choose a token with these parameters and history.
    Choose(SamplingParams, Vec<u32>),
    /// The logprob of a token, and this many alternatives.
    Logprob(u32, u32),
}

/// Logits `[rows, vocab]` and one task per row.
pub struct Case {
    pub name: String,
    pub vocab: usize,
    pub logits: Vec<f32>,
    pub specs: Vec<Spec>,
}

fn bf16(v: f32) -> f32 {
    half::bf16::from_f32(v).to_f32()
}

/// One row of `vocab` values in the given shape (0..7), rounded to bf16.
pub fn row(rng: &mut Rng, vocab: usize, shape: usize) -> Vec<f32> {
    let ni = f32::NEG_INFINITY;
    let mut r: Vec<f32> = match shape {
        // Ordinary: uniform in [-8, 8).
        0 => rng.vec(vocab, -8.0, 8.0),
        // Peaked: a few tokens far above the rest, as trained models' logits are.
        1 => {
            let mut r = rng.vec(vocab, -6.0, 2.0);
            for _ in 0..1 + rng.below(8) {
                let i = rng.below(vocab);
                r[i] = rng.uniform(6.0, 16.0);
            }
            r
        }
        // Few distinct values: ties everywhere, the maximum tied.
        2 => (0..vocab).map(|_| (rng.below(9) as f32) * 0.5 - 2.0).collect(),
        // All but one -inf.
        3 => {
            let mut r = vec![ni; vocab];
            r[rng.below(vocab)] = rng.uniform(-3.0, 3.0);
            r
        }
        // All -inf.
        4 => vec![ni; vocab],
        // Flat.
        5 => vec![rng.uniform(-1.0, 1.0); vocab],
        // Wide range.
        6 => rng.vec(vocab, -1.0e4, 1.0e4),
        // Random with a scattering of -inf (a previous mask).
        _ => (0..vocab)
            .map(|_| if rng.below(4) == 0 { ni } else { rng.uniform(-4.0, 4.0) })
            .collect(),
    };
    for v in &mut r {
        *v = bf16(*v);
    }
    r
}

/// Random parameters for one row.
pub fn params(rng: &mut Rng, vocab: usize) -> (SamplingParams, Vec<u32>) {
    let mut p = SamplingParams {
        seed: rng.next_u64(),
        ..SamplingParams::default()
    };
    match rng.below(10) {
        // Greedy, with or without penalties and alternatives.
        0 | 1 => {}
        // Sampling with any mix of warpers.
        _ => {
            p.do_sample = rng.below(3) > 0;
            p.temperature = [1.0, 1.0, 1e-40, 1e-6, 0.05, 0.7, 1.5, 100.0][rng.below(8)];
            p.top_k = [0, 0, 1, 50, vocab as u32, vocab as u32 + 7][rng.below(6)];
            p.top_p = [1.0, 1.0, 0.1, 0.3, 0.5, 0.9, 0.95, 0.999, 1e-9][rng.below(9)];
            if rng.below(25) == 0 {
                p.typical_p = 0.9; // host fallback
            }
        }
    }
    p.top_n_tokens = [0, 0, 1, 5, 10][rng.below(5)];
    if rng.below(20) == 0 {
        p.top_n_tokens = 40; // more than the device's 32: host fallback
    }
    if rng.below(3) == 0 {
        p.repetition_penalty = [1.3, 0.7, 2.0][rng.below(3)];
    }
    if rng.below(3) == 0 {
        p.frequency_penalty = 0.5;
        p.presence_penalty = [0.0, 0.25][rng.below(2)];
    }
    let history: Vec<u32> = (0..rng.below(64))
        .map(|_| {
            if rng.below(10) == 0 {
                (vocab + rng.below(100)) as u32 // outside the row: ignored
            } else {
                rng.below(vocab.min(200)) as u32 * (vocab / 200).max(1) as u32
            }
        })
        .collect();
    (p, history)
}

/// A random case: `rows` rows of `vocab`, shapes drawn from `shapes`, a logprob task on about one row
/// in eight.
pub fn case(rng: &mut Rng, name: &str, vocab: usize, rows: usize, shapes: &[usize]) -> Case {
    let mut logits = Vec::with_capacity(rows * vocab);
    let mut specs = Vec::with_capacity(rows);
    for _ in 0..rows {
        let shape = shapes[rng.below(shapes.len())];
        logits.extend(row(rng, vocab, shape));
        specs.push(if rng.below(8) == 0 {
            Spec::Logprob(rng.below(vocab) as u32, [0, 1, 5, 32, 40][rng.below(5)])
        } else {
            let (p, h) = params(rng, vocab);
            Spec::Choose(p, h)
        });
    }
    Case {
        name: name.to_string(),
        vocab,
        logits,
        specs,
    }
}

/// Every row shape under each of a fixed list of parameter sets (greedy, alternatives with penalties,
/// plain sampling, temperatures 1e-40 / 1e-45 / 100, top-k 1 / 50 / vocab, top-p 0.1 / 0.9 / 0.999 /
/// 1e-9, penalties) and a logprob task.
pub fn fixed_case(rng: &mut Rng, vocab: usize) -> Case {
    let d = SamplingParams::default;
    let v = vocab as u32;
    let sets = [
        d(),
        SamplingParams {
            top_n_tokens: 10,
            repetition_penalty: 1.3,
            ..d()
        },
        SamplingParams { do_sample: true, ..d() },
        SamplingParams {
            temperature: 1e-40,
            top_n_tokens: 2,
            ..d()
        },
        SamplingParams {
            temperature: 1e-45,
            ..d()
        },
        SamplingParams {
            temperature: 100.0,
            top_k: 1,
            ..d()
        },
        SamplingParams {
            top_k: 50,
            top_p: 0.1,
            top_n_tokens: 5,
            ..d()
        },
        SamplingParams {
            top_k: v,
            top_p: 0.999,
            ..d()
        },
        SamplingParams {
            top_p: 1e-9,
            top_n_tokens: 3,
            ..d()
        },
        SamplingParams {
            temperature: 0.7,
            top_k: 50,
            top_p: 0.9,
            top_n_tokens: 5,
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            ..d()
        },
    ];
    let mut logits = Vec::new();
    let mut specs = Vec::new();
    for shape in 0..8 {
        for p in &sets {
            logits.extend(row(rng, vocab, shape));
            let history: Vec<u32> = (0..32).map(|_| rng.below(vocab) as u32).collect();
            specs.push(Spec::Choose(
                SamplingParams {
                    seed: rng.next_u64(),
                    ..p.clone()
                },
                history,
            ));
        }
        logits.extend(row(rng, vocab, shape));
        specs.push(Spec::Logprob(rng.below(vocab) as u32, [0, 5][shape % 2]));
    }
    Case {
        name: format!("fixed v{vocab}"),
        vocab,
        logits,
        specs,
    }
}

/// The samplers of a case's choose rows (fresh, so host and device clones draw the same uniforms).
pub fn samplers(c: &Case) -> Vec<Option<Sampler>> {
    c.specs
        .iter()
        .map(|s| match s {
            Spec::Choose(p, h) => Some(Sampler::new(p.clone(), h)),
            Spec::Logprob(..) => None,
        })
        .collect()
}

/// One `Backend::sample` task: a logits row and what to do with it.
pub type Task<'a> = (usize, SampleTask<'a>);

/// Runs `f` on the case's tasks with the given samplers.
pub fn run(
    c: &Case,
    samplers: &mut [Option<Sampler>],
    f: &mut dyn FnMut(&mut [Task<'_>]) -> Vec<Sampled>,
) -> Vec<Sampled> {
    let mut tasks: Vec<(usize, SampleTask<'_>)> = c
        .specs
        .iter()
        .zip(samplers.iter_mut())
        .enumerate()
        .map(|(i, (spec, s))| match (spec, s) {
            (Spec::Logprob(token, top_n), _) => (
                i,
                SampleTask::Logprob {
                    token: *token,
                    top_n: *top_n,
                },
            ),
            (Spec::Choose(..), Some(s)) => (i, SampleTask::Choose(s)),
            (Spec::Choose(..), None) => unreachable!(),
        })
        .collect();
    f(&mut tasks)
}

/// The host's answers.
pub fn reference(c: &Case) -> Vec<Sampled> {
    let mut s = samplers(c);
    let mut host = c.logits.clone();
    run(c, &mut s, &mut |tasks| sample_host(&mut host, c.vocab, tasks).unwrap())
}

/// Tallies of one comparison.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub greedy: usize,
    pub drawn: usize,
    pub drawn_boundary: usize,
    pub logprob_rows: usize,
    pub alternatives: usize,
    pub max_lp_err: f64,
}

impl Tally {
    pub fn add(&mut self, o: &Tally) {
        self.greedy += o.greedy;
        self.drawn += o.drawn;
        self.drawn_boundary += o.drawn_boundary;
        self.logprob_rows += o.logprob_rows;
        self.alternatives += o.alternatives;
        self.max_lp_err = self.max_lp_err.max(o.max_lp_err);
    }
}

fn lp_err(a: f32, b: f32) -> f64 {
    if a == b || (a.is_nan() && b.is_nan()) {
        return 0.0;
    }
    if !a.is_finite() || !b.is_finite() {
        return f64::INFINITY;
    }
    f64::from(a - b).abs() / f64::from(b).abs().max(1.0)
}

/// Compares the device's answers with the host's; panics with the row's details on any difference
/// that is not a verified rounding boundary of the host's own arithmetic.
pub fn compare(c: &Case, got: &[Sampled], want: &[Sampled]) -> Tally {
    assert_eq!(got.len(), want.len(), "{}: answers", c.name);
    let mut t = Tally::default();
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let row = &c.logits[i * c.vocab..(i + 1) * c.vocab];
        match (g, w, &c.specs[i]) {
            (
                Sampled::Logprob { logprob: a, top: ta },
                Sampled::Logprob { logprob: b, top: tb },
                Spec::Logprob(tok, top_n),
            ) => {
                let e = lp_err(*a, *b);
                assert!(
                    e <= LP_TOL,
                    "{} row {i}: logprob of {tok}: device {a}, host {b}",
                    c.name
                );
                t.logprob_rows += 1;
                t.max_lp_err = t.max_lp_err.max(e);
                let toks = |x: &[(u32, f32)]| x.iter().map(|(t, _)| *t).collect::<Vec<u32>>();
                assert_eq!(
                    toks(ta),
                    toks(tb),
                    "{} row {i}: {top_n} alternatives (device, host)",
                    c.name
                );
                for ((t_a, la), (_, lb)) in ta.iter().zip(tb) {
                    let e = lp_err(*la, *lb);
                    assert!(e <= LP_TOL, "{} row {i}: alternative {t_a}: {la} vs {lb}", c.name);
                    t.max_lp_err = t.max_lp_err.max(e);
                }
                if !ta.is_empty() {
                    t.alternatives += 1;
                }
            }
            (Sampled::Choice(a), Sampled::Choice(b), Spec::Choose(p, h)) => {
                let drawn = p.is_sampling();
                let mut boundary = None;
                if a.token != b.token {
                    let why = if drawn { explain(row, p, h, a, b) } else { None };
                    let Some(why) = why else {
                        panic!(
                            "{} row {i}: device token {} ({}), host {} ({}); params {p:?}",
                            c.name, a.token, row[a.token as usize], b.token, row[b.token as usize]
                        );
                    };
                    boundary = Some(why);
                }
                if let Some(why) = &boundary {
                    super::cuda_common::say(&format!("  {} row {i}: boundary case: {why}", c.name));
                    t.drawn_boundary += 1;
                    continue;
                }
                let e = lp_err(a.logprob, b.logprob);
                assert!(
                    e <= LP_TOL,
                    "{} row {i}: token {} logprob device {}, host {}; params {p:?}",
                    c.name,
                    a.token,
                    a.logprob,
                    b.logprob
                );
                t.max_lp_err = t.max_lp_err.max(e);
                let toks = |x: &Choice| x.top.iter().map(|(t, _)| *t).collect::<Vec<u32>>();
                assert_eq!(
                    toks(a),
                    toks(b),
                    "{} row {i}: alternatives (device, host); params {p:?}",
                    c.name
                );
                for ((ta, la), (_, lb)) in a.top.iter().zip(&b.top) {
                    let e = lp_err(*la, *lb);
                    assert!(e <= LP_TOL, "{} row {i}: alternative {ta}: {la} vs {lb}", c.name);
                    t.max_lp_err = t.max_lp_err.max(e);
                }
                if !a.top.is_empty() {
                    t.alternatives += 1;
                }
                if drawn {
                    t.drawn += 1;
                } else {
                    t.greedy += 1;
                }
            }
            _ => panic!("{} row {i}: answer kinds differ: {g:?} vs {w:?}", c.name),
        }
    }
    t
}

/// Why two drawn tokens may differ without a bug: the host's cumulative sum at the boundary between
/// them lies within a rounding error of the draw's target (inverse CDF), or a top-p cumulative sum
/// lies within a rounding error of the threshold. `None` when neither holds.
pub fn explain(row: &[f32], p: &SamplingParams, history: &[u32], dev: &Choice, host: &Choice) -> Option<String> {
    let s = Sampler::new(p.clone(), history);
    let mut x = row.to_vec();
    s.process(&mut x);
    let (d, h) = (dev.token as usize, host.token as usize);
    // Top-p: the cumulative sums of the pre-top-p row in ascending order, as the host computes them.
    if p.top_p < 1.0 {
        let pre = Sampler::new(
            SamplingParams {
                top_p: 1.0,
                typical_p: 1.0,
                ..p.clone()
            },
            history,
        );
        let mut y = row.to_vec();
        pre.process(&mut y);
        let thr = (1.0 - format!("{}", p.top_p).parse::<f64>().unwrap()) as f32;
        let mut idx: Vec<usize> = (0..y.len()).collect();
        idx.sort_by(|&a, &b| y[a].total_cmp(&y[b]));
        let max = y.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = idx.iter().map(|&i| (y[i] - max).exp()).collect();
        let inv = 1.0 / (e.iter().map(|&v| f64::from(v)).sum::<f64>() as f32);
        let mut acc = 0.0f64;
        for (pos, &i) in idx.iter().enumerate() {
            acc += f64::from(e[pos] * inv);
            let cum = acc as f32;
            if (i == d || i == h) && (f64::from(cum) - f64::from(thr)).abs() <= 1e-6 * f64::from(thr).max(1e-3) {
                return Some(format!("top-p cumulative {cum} at token {i} vs threshold {thr}"));
            }
        }
    }
    // Inverse CDF: the host's cumulative weight up to the lower of the two tokens vs its target.
    if !x[d].is_finite() {
        return None;
    }
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let w = |v: f32| (f64::from(v) - f64::from(max)).exp();
    let total: f64 = x.iter().map(|&v| w(v)).sum();
    let lo = d.min(h);
    let cum: f64 = x[..=lo].iter().map(|&v| w(v)).sum();
    // The host's uniform is the first of the sequence's stream.
    let mut rng_s = Sampler::new(p.clone(), history);
    let u = rng_s.device_row(x.len(), u32::MAX).map(|r| r.uniform)?;
    let target = u * total;
    let gap = (cum - target).abs() / total;
    (gap <= 1e-9).then(|| format!("cumulative weight {cum:.17e} vs target {target:.17e} (gap {gap:.1e})"))
}
