//! Sampling on the device (kernels/sampling.cu through `Backend::sample`) against its host twin
//! (`sampling::sample_host`, i.e. `Sampler::choose`) on fresh random logits (seed printed;
//! LORAX_TEST_SEED replays), across vocabularies 32000 / 128256 / 151936, batches 1..256, greedy and
//! drawn rows with temperature extremes, top-k 1 / 50 / vocab, top-p 0.1..0.999 (and 1e-9, which keeps
//! one token), penalties, alternatives, prompt logprobs, and the rows the host path keeps (typical-p,
//! more than 32 alternatives), over rows that are random, peaked, full of ties, all but one -inf, all
//! -inf, flat or very wide (see `sampling_cases`). Both sides draw the same uniforms (cloned samplers).
//!
//! `sampling_benchmark` (ignored; scripts/gpu/run.sh runs it) times a batch of 64 rows at vocab 128256
//! in bf16 (and one row of it): the device path against copying the logits to the host and sampling there.
//! Without a CUDA device each test prints `SKIPPED: no CUDA device (...)` and returns.
#![allow(clippy::unwrap_used)]

mod cuda_common;
mod sampling_cases;

use std::time::Instant;

use cuda_common::{backend, bench, graph_ms, median, say, seed, Rng};
use lorax_engine::backend::cuda::sampling::{SamplePack, MAX_DEVICE_TOP_N};
use lorax_engine::sampling::{sample_host, SampleTask, Sampled, Sampler, SamplingParams};
use lorax_engine::weights::DType;
use lorax_engine::{Backend, CudaBackend, CudaTensor};
use sampling_cases::{case, compare, fixed_case, reference, run, samplers, Case, Tally, Task};

fn gpu(dtype: DType) -> Option<CudaBackend> {
    let mut g = backend(dtype)?;
    g.set_poison(true);
    say(&format!("backend: {}", g.name()));
    Some(g)
}

fn on_device(g: &CudaBackend, c: &Case) -> Vec<Sampled> {
    let rows = c.specs.len();
    let t = g.tensor_from_f32(&[rows, c.vocab], &c.logits).unwrap();
    let mut s = samplers(c);
    run(c, &mut s, &mut |tasks| g.sample(&t, tasks).unwrap())
}

fn check_case(g: &CudaBackend, c: &Case, total: &mut Tally) {
    let t0 = Instant::now();
    let want = reference(c);
    let host_s = t0.elapsed().as_secs_f64();
    let got = on_device(g, c);
    let t = compare(c, &got, &want);
    say(&format!(
        "  {}: {} rows: {} greedy, {} drawn identical, {} drawn at a boundary, {} logprob rows, {} with alternatives; max logprob err {:.1e} (host {:.2}s)",
        c.name,
        c.specs.len(),
        t.greedy,
        t.drawn,
        t.drawn_boundary,
        t.logprob_rows,
        t.alternatives,
        t.max_lp_err,
        host_s
    ));
    total.add(&t);
}

#[test]
fn device_sampling_matches_host() {
    let mut rng = Rng(seed("sampling"));
    for dt in [DType::BF16, DType::F32] {
        let Some(g) = gpu(dt) else { return };
        let mut total = Tally::default();
        for vocab in [32000, 128_256, 151_936] {
            // Every shape under every fixed parameter set, then random mixes.
            check_case(&g, &fixed_case(&mut rng, vocab), &mut total);
            // 600 rows take two launches (DEVICE_ROWS_A_LAUNCH), as a prompt scored whole does.
            let batches: &[usize] = match (dt, vocab) {
                (DType::BF16, 32000) => &[1, 7, 64, 256, 600],
                (DType::BF16, _) => &[1, 7, 64, 256],
                _ => &[5, 64],
            };
            for &b in batches {
                let c = case(
                    &mut rng,
                    &format!("{dt:?} v{vocab} b{b}"),
                    vocab,
                    b,
                    &[0, 1, 2, 3, 4, 5, 6, 7],
                );
                check_case(&g, &c, &mut total);
            }
        }
        say(&format!("{dt:?} total: {total:?}"));
        // Boundary cases are explained one by one (see sampling_cases::explain); they must stay rare.
        assert!(
            total.drawn_boundary * 200 <= total.drawn.max(1),
            "{} of {} draws at a boundary",
            total.drawn_boundary,
            total.drawn
        );
    }
}

#[test]
fn engine_sampling_rows_and_errors() {
    let Some(g) = gpu(DType::BF16) else { return };
    // Rows are addressed by index, in any order; a row index or token outside the logits is an error.
    let v = 1000;
    let mut rng = Rng(seed("rows"));
    let logits: Vec<f32> = (0..3 * v)
        .map(|_| half::bf16::from_f32(rng.uniform(-4.0, 4.0)).to_f32())
        .collect();
    let t = g.tensor_from_f32(&[3, v], &logits).unwrap();
    let mut a = Sampler::new(SamplingParams::default(), &[]);
    let mut tasks = vec![
        (2, SampleTask::Choose(&mut a)),
        (0, SampleTask::Logprob { token: 7, top_n: 2 }),
    ];
    let got = g.sample(&t, &mut tasks).unwrap();
    let mut host = logits.clone();
    let mut b = Sampler::new(SamplingParams::default(), &[]);
    let mut tasks = vec![
        (2, SampleTask::Choose(&mut b)),
        (0, SampleTask::Logprob { token: 7, top_n: 2 }),
    ];
    assert_eq!(got, sample_host(&mut host, v, &mut tasks).unwrap());
    // The chosen token is recorded in the sampler's history, as choose does.
    let Sampled::Choice(c) = &got[0] else { panic!() };
    assert_eq!(a.count(c.token), 1);
    assert!(g
        .sample(&t, &mut [(3, SampleTask::Logprob { token: 1, top_n: 0 })])
        .is_err());
    assert!(g
        .sample(
            &t,
            &mut [(
                0,
                SampleTask::Logprob {
                    token: v as u32,
                    top_n: 0
                }
            )]
        )
        .is_err());
    assert!(g.sample(&t, &mut []).unwrap().is_empty());
}

#[test]
#[ignore = "GPU benchmark: run by scripts/gpu/run.sh"]
fn sampling_benchmark() {
    let Some(g) = backend(DType::BF16) else { return };
    let (batch, vocab) = (64, 128_256);
    say(&format!(
        "backend: {}; batch {batch}, vocab {vocab}, bf16 logits",
        g.name()
    ));
    let logits = g.random_uniform(&[batch, vocab], 7, -8.0, 8.0).unwrap();
    let history: Vec<u32> = (0..256).map(|i| (i * 331) % vocab as u32).collect();
    let configs: [(&str, SamplingParams); 5] = [
        ("greedy", SamplingParams::default()),
        (
            "greedy_top5",
            SamplingParams {
                top_n_tokens: 5,
                ..SamplingParams::default()
            },
        ),
        (
            "topp0.9",
            SamplingParams {
                do_sample: true,
                top_p: 0.9,
                ..SamplingParams::default()
            },
        ),
        (
            "t0.7_k50_p0.9_top5",
            SamplingParams {
                temperature: 0.7,
                top_k: 50,
                top_p: 0.9,
                top_n_tokens: 5,
                ..SamplingParams::default()
            },
        ),
        (
            "penalties_t0.8_p0.95",
            SamplingParams {
                temperature: 0.8,
                top_p: 0.95,
                repetition_penalty: 1.2,
                frequency_penalty: 0.3,
                presence_penalty: 0.2,
                ..SamplingParams::default()
            },
        ),
    ];
    // The logits copy alone (what every step paid before sampling on the device).
    let copy_ms = median(
        (0..10)
            .map(|_| {
                let t0 = Instant::now();
                g.to_f32(&logits).unwrap();
                t0.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    );
    bench(
        "sampling_logits_to_host",
        copy_ms,
        "ms",
        &format!(
            "to_f32 of [{batch}, {vocab}] bf16 ({:.1} MB) incl. decode",
            (batch * vocab * 2) as f64 / 1e6
        ),
    );
    for (name, params) in &configs {
        time_config(&g, &logits, name, params, &history);
    }
    // One row (single-stream decode): the first row of the same logits.
    let one = g.gather_rows(&logits, &[0]).unwrap();
    for (name, params) in [&configs[0], &configs[3]] {
        time_config(&g, &one, name, params, &history);
    }
}

/// Times one parameter set on every row of `logits`: the device path (`Backend::sample`, wall time, 20
/// calls), its kernel alone (graph replay) and the host path (logits to the host, then `sample_host`).
fn time_config(g: &CudaBackend, logits: &CudaTensor, name: &str, params: &SamplingParams, history: &[u32]) {
    let (batch, vocab) = (g.shape(logits)[0], g.shape(logits)[1]);
    let fresh = || -> Vec<Sampler> {
        (0..batch)
            .map(|i| {
                Sampler::new(
                    SamplingParams {
                        seed: i as u64,
                        ..params.clone()
                    },
                    history,
                )
            })
            .collect()
    };
    // Wall time of one call on fresh samplers (made outside the timing).
    let time = |f: &mut dyn FnMut(&mut [Task<'_>])| -> f64 {
        let mut s = fresh();
        let mut tasks: Vec<(usize, SampleTask<'_>)> = s
            .iter_mut()
            .enumerate()
            .map(|(i, s)| (i, SampleTask::Choose(s)))
            .collect();
        let t0 = Instant::now();
        f(&mut tasks);
        t0.elapsed().as_secs_f64() * 1e3
    };
    let dev_ms = median(
        (0..20)
            .map(|_| time(&mut |t| drop(g.sample(logits, t).unwrap())))
            .collect(),
    );
    let host_ms = median(
        (0..3)
            .map(|_| {
                time(&mut |t| {
                    let mut h = g.to_f32(logits).unwrap();
                    sample_host(&mut h, vocab, t).unwrap();
                })
            })
            .collect(),
    );
    let mut pack = SamplePack::default();
    for (i, s) in fresh().iter_mut().enumerate() {
        pack.push_choose(i as u32, &s.device_row(vocab, MAX_DEVICE_TOP_N).unwrap())
            .unwrap();
    }
    let plan = g.sample_plan(logits, &pack).unwrap();
    let k_ms = graph_ms(g, 1, 30, &|_| g.sample_run(&plan));
    bench(
        &format!("sampling_{name}_b{batch}_v{vocab}"),
        dev_ms,
        "ms",
        &format!(
            "device path {dev_ms:.3} ms (kernel {:.1} us) vs logits to host + host sampling {host_ms:.1} ms: {:.0}x",
            k_ms * 1e3,
            host_ms / dev_ms
        ),
    );
}
