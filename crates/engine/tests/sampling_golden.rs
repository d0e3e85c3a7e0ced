//! Golden tests of `lorax_engine::sampling` against transformers' logits processors
//! (fixtures: scripts/fixtures/make_fixtures.py, `make_sampling`).
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use lorax_engine::sampling::{argmax, log_softmax, Sampler, SamplingParams};
use safetensors::{Dtype, SafeTensors};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/sampling");
const TOL: f64 = 1e-5;

struct Fixtures {
    tensors: HashMap<String, Vec<f32>>,
    history: Vec<u32>,
    cases: Vec<Case>,
}

struct Case {
    name: String,
    input: String,
    params: SamplingParams,
    kept: usize,
}

fn load() -> Fixtures {
    let bytes = std::fs::read(format!("{DIR}/sampling.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors = HashMap::new();
    let mut history = None;
    for (name, view) in st.tensors() {
        match view.dtype() {
            Dtype::F32 => {
                let v: Vec<f32> = view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect();
                assert_eq!(v.len(), view.shape().iter().product::<usize>());
                tensors.insert(name, v);
            }
            Dtype::I64 => {
                assert_eq!(name, "history");
                let v: Vec<u32> = view
                    .data()
                    .chunks_exact(8)
                    .map(|b| u32::try_from(i64::from_le_bytes(b.try_into().unwrap())).unwrap())
                    .collect();
                history = Some(v);
            }
            d => panic!("unexpected dtype {d:?} for {name}"),
        }
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{DIR}/cases.json")).unwrap()).unwrap();
    let mut cases = Vec::new();
    for c in json["cases"].as_array().unwrap() {
        let mut params = SamplingParams {
            do_sample: true,
            ..SamplingParams::default()
        };
        for (k, v) in c["params"].as_object().unwrap() {
            let f = v.as_f64().unwrap();
            match k.as_str() {
                "temperature" => params.temperature = f as f32,
                "top_k" => params.top_k = f as u32,
                "top_p" => params.top_p = f as f32,
                "typical_p" => params.typical_p = f as f32,
                "repetition_penalty" => params.repetition_penalty = f as f32,
                "frequency_penalty" => params.frequency_penalty = f as f32,
                "presence_penalty" => params.presence_penalty = f as f32,
                other => panic!("unknown param {other}"),
            }
        }
        cases.push(Case {
            name: c["name"].as_str().unwrap().to_string(),
            input: c["input"].as_str().unwrap().to_string(),
            params,
            kept: c["kept"].as_u64().unwrap() as usize,
        });
    }
    assert!(!cases.is_empty());
    Fixtures {
        tensors,
        history: history.expect("history tensor"),
        cases,
    }
}

impl Fixtures {
    fn get(&self, key: &str) -> &[f32] {
        self.tensors.get(key).unwrap_or_else(|| panic!("missing tensor {key}"))
    }
}

/// ‖a−b‖/‖b‖ over the entries where `b` is finite (the caller checks the -inf sets agree).
fn rel_err_finite(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        if y.is_finite() {
            let d = x as f64 - y as f64;
            num += d * d;
            den += (y as f64) * (y as f64);
        }
    }
    num.sqrt() / den.sqrt().max(f64::MIN_POSITIVE)
}

fn neg_inf_positions(x: &[f32]) -> Vec<usize> {
    x.iter()
        .enumerate()
        .filter(|(_, v)| **v == f32::NEG_INFINITY)
        .map(|(i, _)| i)
        .collect()
}

#[test]
fn every_case_matches_transformers() {
    let fx = load();
    let mut failures = Vec::new();
    for case in &fx.cases {
        let input = fx.get(&format!("input.{}", case.input));
        let want = fx.get(&format!("{}.out", case.name));
        let sampler = Sampler::new(case.params.clone(), &fx.history);
        let mut got = input.to_vec();
        sampler.process(&mut got);

        let kept = got.iter().filter(|v| v.is_finite()).count();
        let want_kept = want.iter().filter(|v| v.is_finite()).count();
        assert_eq!(want_kept, case.kept, "{}: fixture kept count", case.name);
        let got_inf = neg_inf_positions(&got);
        let want_inf = neg_inf_positions(want);
        let err = rel_err_finite(&got, want);
        eprintln!(
            "{} {:?}: kept {kept} (want {}), rel err {err:.2e}",
            case.name, case.params, case.kept
        );
        if kept != case.kept || got_inf != want_inf {
            let only_got: Vec<_> = got_inf.iter().filter(|i| !want_inf.contains(i)).collect();
            let only_want: Vec<_> = want_inf.iter().filter(|i| !got_inf.contains(i)).collect();
            failures.push(format!(
                "{}: kept {kept} want {}; -inf only here {:?}, only in fixture {:?}",
                case.name,
                case.kept,
                &only_got[..only_got.len().min(8)],
                &only_want[..only_want.len().min(8)]
            ));
            continue;
        }
        if err >= TOL {
            failures.push(format!("{}: rel err {err:.3e}", case.name));
        }
    }
    assert!(failures.is_empty(), "mismatches:\n{}", failures.join("\n"));
}

#[test]
fn logprobs_cases_match() {
    let fx = load();
    let mut n = 0;
    for case in &fx.cases {
        let Some(want) = fx.tensors.get(&format!("{}.logprobs", case.name)) else {
            continue;
        };
        n += 1;
        let out = fx.get(&format!("{}.out", case.name));
        let got = log_softmax(out);
        assert_eq!(neg_inf_positions(&got), neg_inf_positions(want), "{}", case.name);
        let err = rel_err_finite(&got, want);
        assert!(err < TOL, "{}: logprobs rel err {err:.3e}", case.name);

        // And through the sampler: the reported logprob is the fixture's at the chosen token.
        let input = fx.get(&format!("input.{}", case.input));
        let mut sampler = Sampler::new(case.params.clone(), &fx.history);
        let mut x = input.to_vec();
        let c = sampler.choose(&mut x);
        let w = want[c.token as usize];
        assert!(w.is_finite(), "{}: chose a filtered token", case.name);
        assert!(
            ((c.logprob - w) as f64).abs() <= TOL * w.abs().max(1.0) as f64,
            "{}: logprob {} vs {w}",
            case.name,
            c.logprob
        );
    }
    assert_eq!(n, 3, "expected case1/case10/case11");
}

fn run_sequence(params: &SamplingParams, history: &[u32], logits: &[f32], steps: usize) -> Vec<u32> {
    let mut s = Sampler::new(params.clone(), history);
    (0..steps)
        .map(|_| {
            let mut x = logits.to_vec();
            s.choose(&mut x).token
        })
        .collect()
}

#[test]
fn seeded_reproducibility() {
    let fx = load();
    // Input "b" (flattened logits) with temperature 1.3: many plausible tokens, so seeds diverge.
    let logits = fx.get("input.b");
    let params = SamplingParams {
        do_sample: true,
        temperature: 1.3,
        top_p: 0.95,
        seed: 1234,
        ..SamplingParams::default()
    };
    let a = run_sequence(&params, &fx.history, logits, 50);
    let b = run_sequence(&params, &fx.history, logits, 50);
    assert_eq!(a, b);
    let distinct: std::collections::BTreeSet<_> = a.iter().collect();
    assert!(distinct.len() > 1, "degenerate sequence {a:?}");
    let other = SamplingParams {
        seed: 1235,
        ..params.clone()
    };
    let c = run_sequence(&other, &fx.history, logits, 50);
    assert_ne!(a, c);

    // Also full choices (logprobs and alternatives) agree.
    let p = SamplingParams {
        top_n_tokens: 3,
        ..params
    };
    let mut s1 = Sampler::new(p.clone(), &fx.history);
    let mut s2 = Sampler::new(p, &fx.history);
    for _ in 0..10 {
        let (mut x1, mut x2) = (logits.to_vec(), logits.to_vec());
        assert_eq!(s1.choose(&mut x1), s2.choose(&mut x2));
    }
}

#[test]
fn greedy_is_argmax_with_top_n() {
    let fx = load();
    for key in ["input.a", "input.b"] {
        let logits = fx.get(key);
        let mut s = Sampler::new(SamplingParams::default(), &fx.history);
        let mut x = logits.to_vec();
        let c = s.choose(&mut x);
        assert_eq!(x, logits, "greedy without penalties leaves the scores alone");
        assert_eq!(c.token, argmax(logits));
        let lp = log_softmax(logits);
        let max = lp.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(c.logprob, max);
        assert!(c.top.is_empty());

        let params = SamplingParams {
            top_n_tokens: 5,
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(params, &fx.history);
        let mut x = logits.to_vec();
        let c = s.choose(&mut x);
        assert_eq!(c.top.len(), 5);
        let mut order: Vec<usize> = (0..lp.len()).collect();
        order.sort_by(|&a, &b| lp[b].total_cmp(&lp[a]).then(a.cmp(&b)));
        let want: Vec<(u32, f32)> = order[..5].iter().map(|&i| (i as u32, lp[i])).collect();
        assert_eq!(c.top, want);
        assert!(c.top.windows(2).all(|w| w[0].1 >= w[1].1));
        assert_eq!(c.top[0], (c.token, c.logprob));
    }
}

#[test]
fn sampled_frequencies_match_softmax() {
    let logits = [1.0f32, 0.5, -0.3, 2.0, 0.0];
    let lp = log_softmax(&logits);
    let params = SamplingParams {
        do_sample: true,
        seed: 42,
        ..SamplingParams::default()
    };
    let mut s = Sampler::new(params, &[]);
    let n = 20_000;
    let mut counts = [0usize; 5];
    for _ in 0..n {
        let mut x = logits;
        let c = s.choose(&mut x);
        counts[c.token as usize] += 1;
    }
    for i in 0..5 {
        let freq = counts[i] as f64 / n as f64;
        let p = (lp[i] as f64).exp();
        assert!((freq - p).abs() < 0.01, "token {i}: freq {freq:.4} vs p {p:.4}");
    }
}

#[test]
fn penalties_count_generated_tokens() {
    let fx = load();
    let logits = fx.get("input.a");
    for params in [
        SamplingParams {
            repetition_penalty: 1.3,
            ..SamplingParams::default()
        },
        SamplingParams {
            frequency_penalty: 0.5,
            presence_penalty: 0.3,
            ..SamplingParams::default()
        },
    ] {
        // Empty history: the first choice is the plain argmax.
        let mut s = Sampler::new(params.clone(), &[]);
        let mut x = logits.to_vec();
        let t = s.choose(&mut x).token as usize;
        assert_eq!(t as u32, argmax(logits));
        assert_eq!(s.count(t as u32), 1);
        let mut y = logits.to_vec();
        s.process(&mut y);
        assert!(y[t] < logits[t], "{params:?}: token {t} not penalised");
        // Every other token is untouched.
        for (i, (&a, &b)) in y.iter().zip(logits).enumerate() {
            if i != t {
                assert_eq!(a, b);
            }
        }
        // A fresh sampler with that token in its prompt processes identically.
        let fresh = Sampler::new(params.clone(), &[t as u32]);
        let mut z = logits.to_vec();
        fresh.process(&mut z);
        assert_eq!(y, z);
    }
}
