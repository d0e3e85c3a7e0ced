//! The engine's golden tests on the CUDA backend: the llama/mistral/qwen2 fixtures against transformers
//! and the LoRA adapters against peft (fixtures made by scripts/fixtures/make_fixtures.py).
//!
//! - f32 storage: the same bar as the CPU backend (every position's logits within 1e-4 relative error,
//!   greedy tokens identical alone and in a batch where sequences join and leave; LoRA alone and peft's
//!   mixed 20-row batch). This checks the kernels' indexing end to end with rounding out of the way.
//! - bf16 and f16 storage: weights, activations and the KV cache are rounded to 8 (11) significant bits,
//!   so logits carry a relative error of order 1e-2 (1e-3); see docs/gpu.md for the tolerances and the
//!   measured values. Greedy agreement is checked teacher-forced (the reference token is fed at every
//!   step, so one early flip does not decide the rest): the argmax must agree at most positions, and where
//!   it does not, the reference's top two logits must be within a few RMS logit errors of each other
//!   (a near-tie that rounding may legitimately flip).
//!
//! Without a CUDA device each test prints `SKIPPED: no CUDA device (...)` and returns.
#![allow(clippy::unwrap_used, clippy::needless_range_loop)]

mod common;
mod cuda_common;

use common::{subset, Golden};
use cuda_common::{backend, fixtures, rel_err, say};
use lorax_engine::engine::RawSeq;
use lorax_engine::kv_cache::BlockAllocator;
use lorax_engine::lora::HostAdapter;
use lorax_engine::weights::{DType, HostTensor};
use lorax_engine::{Batch, CacheConfig, CpuBackend, CudaBackend, Engine, NewSequence, SamplingParams};

const MODELS: [&str; 3] = ["llama", "mistral", "qwen2"];
const ADAPTERS: [&str; 4] = ["lora-r8", "lora-r16-all", "lora-r64-regex", "rslora-r16-patterns"];
const N_PROMPTS: usize = 4;
const N_NEW: usize = 32;
const BLOCK: usize = 4;
const NUM_BLOCKS: usize = 1024;

/// Relative logit error allowed for f32 storage (the CPU backend's bar).
const TOL_F32: f64 = 1e-4;

/// Bounds for reduced-precision storage: (max logits rel err, min teacher-forced argmax agreement).
/// LoRA in bf16 gets a wider error bound: rounding the adapter's own weights to bf16 already costs up to
/// 5e-2 on the CPU in f32 (`bf16_adapter_weights_alone_explain_the_lora_bound`), on top of the base
/// model's bf16 error (measured up to 3e-2).
fn bounds(dtype: DType, lora: bool) -> (f64, f64) {
    match (dtype, lora) {
        (DType::BF16, false) => (5e-2, 0.9),
        (DType::BF16, true) => (1e-1, 0.9),
        (DType::F16, _) => (1e-2, 0.95),
        (DType::F32, _) => (TOL_F32, 1.0),
    }
}

/// A near-tie: the reference's top two logits are closer than this many RMS logit errors.
const NEAR_TIE_RMS: f64 = 4.0;

fn engine(model_dir: &std::path::Path, dtype: DType) -> Option<Engine<CudaBackend>> {
    engine_with(model_dir, dtype, |_| {})
}

/// [`engine`] with the backend's settings changed by `set` first.
fn engine_with(
    model_dir: &std::path::Path,
    dtype: DType,
    set: impl FnOnce(&mut CudaBackend),
) -> Option<Engine<CudaBackend>> {
    let mut b = backend(dtype)?;
    b.set_poison(true);
    set(&mut b);
    Some(
        Engine::load(
            b,
            model_dir,
            CacheConfig {
                num_blocks: NUM_BLOCKS,
                block_size: BLOCK,
            },
        )
        .unwrap(),
    )
}

fn scattered_blocks(alloc: &mut BlockAllocator, tokens: usize) -> Vec<u32> {
    let mut b = alloc.allocate(tokens).unwrap();
    b.reverse();
    b
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

/// Agreement statistics of teacher-forced rows against the reference rows.
#[derive(Default)]
struct Stats {
    worst_rel: f64,
    positions: usize,
    agree: usize,
}

impl Stats {
    /// Compares one position: `got` and `want` are the full-vocabulary rows or the subset rows (argmax
    /// over the subset is what the fixtures allow at every position).
    fn add(&mut self, what: &str, got: &[f32], want: &[f32]) {
        let e = rel_err(got, want);
        self.worst_rel = self.worst_rel.max(if e.is_nan() { f64::INFINITY } else { e });
        self.positions += 1;
        let (g, w) = (argmax(got), argmax(want));
        if g == w {
            self.agree += 1;
            return;
        }
        let rms = (got.iter().zip(want).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>() / got.len() as f64).sqrt();
        let gap = f64::from(want[w] - want[g]);
        say(&format!(
            "  {what}: argmax {g} vs reference {w}, reference gap {gap:.4}, rms logit err {rms:.4}"
        ));
        assert!(
            gap <= NEAR_TIE_RMS * rms,
            "{what}: argmax differs where the reference is not a near-tie (gap {gap} > {NEAR_TIE_RMS} x rms {rms})"
        );
    }

    fn finish(&self, what: &str, dtype: DType, lora: bool) {
        let (max_rel, min_agree) = bounds(dtype, lora);
        let agree = self.agree as f64 / self.positions.max(1) as f64;
        say(&format!(
            "{what} {dtype:?}: worst logits rel err {:.3e} (bound {max_rel:.0e}), teacher-forced argmax agreement \
             {}/{} = {agree:.3} (bound {min_agree})",
            self.worst_rel, self.agree, self.positions
        ));
        assert!(
            self.worst_rel <= max_rel,
            "{what} {dtype:?}: rel err {}",
            self.worst_rel
        );
        assert!(agree >= min_agree, "{what} {dtype:?}: agreement {agree}");
    }
}

/// Every position's logits, prompt and 32 teacher-forced decode steps through a scattered block table.
fn logits_at_every_position(dtype: DType) {
    for name in MODELS {
        let dir = fixtures().join("models").join(name);
        let Some(mut e) = engine(&dir, dtype) else { return };
        let g = Golden::open(dir.join("golden.safetensors"));
        let sub = g.ids("vocab_subset");
        let mut alloc = BlockAllocator::new(NUM_BLOCKS as u32, BLOCK);
        let mut stats = Stats::default();
        for p in 0..N_PROMPTS {
            let ids = g.ids(&format!("p{p}.ids"));
            let greedy = g.ids(&format!("p{p}.greedy"));
            let key = format!("p{p}.logits_sub");
            let table = scattered_blocks(&mut alloc, ids.len() + N_NEW);
            let rows = e.logits(&[(&ids, 0, &table)], &[true]).unwrap();
            stats.add(
                &format!("{name} p{p} last prompt position (full vocab)"),
                &rows[ids.len() - 1],
                &g.f(&format!("p{p}.last_logits")).1,
            );
            for (pos, row) in rows.iter().enumerate() {
                stats.add(&format!("{name} p{p} pos {pos}"), &subset(row, &sub), g.row(&key, pos));
            }
            for (j, &tok) in greedy.iter().enumerate() {
                let pos = ids.len() + j;
                let row = e.logits(&[(&[tok], pos, &table)], &[false]).unwrap().remove(0);
                stats.add(&format!("{name} p{p} pos {pos}"), &subset(&row, &sub), g.row(&key, pos));
            }
            alloc.free(&table);
        }
        stats.finish(&format!("{name} logits"), dtype, false);
    }
}

#[test]
fn f32_logits_match_transformers_at_every_position() {
    logits_at_every_position(DType::F32);
}

#[test]
fn bf16_logits_match_transformers_within_bf16_tolerance() {
    logits_at_every_position(DType::BF16);
}

#[test]
fn f16_logits_match_transformers_within_f16_tolerance() {
    logits_at_every_position(DType::F16);
}

/// Greedy continuations through prefill/decode/filter, alone and in one batch where prompts join at
/// steps 0, 5 and 11: token-identical in f32; in bf16 the batch must give the same tokens as each
/// prompt alone (batching and paging invisible), and the count matching transformers is reported.
fn greedy(dtype: DType) {
    for name in MODELS {
        let dir = fixtures().join("models").join(name);
        let Some(mut e) = engine(&dir, dtype) else { return };
        let g = Golden::open(dir.join("golden.safetensors"));
        let prompts: Vec<Vec<u32>> = (0..N_PROMPTS).map(|p| g.ids(&format!("p{p}.ids"))).collect();
        let expect: Vec<Vec<u32>> = (0..N_PROMPTS).map(|p| g.ids(&format!("p{p}.greedy"))).collect();
        let mut alloc = BlockAllocator::new(NUM_BLOCKS as u32, BLOCK);
        let new_seq = |alloc: &mut BlockAllocator, p: usize| NewSequence {
            id: p as u64,
            input_ids: prompts[p].clone(),
            block_table: scattered_blocks(alloc, prompts[p].len() + N_NEW),
            params: SamplingParams::default(),
            prefill_logprobs: false,
            prefill_top_n: 0,
            adapter: None,
        };
        let mut alone = Vec::new();
        for p in 0..N_PROMPTS {
            let mut batch = Batch::default();
            let s = new_seq(&mut alloc, p);
            let table = s.block_table.clone();
            let mut got = vec![e.prefill(&mut batch, vec![s]).unwrap()[0].choice.token];
            while got.len() < N_NEW {
                got.push(e.decode(&mut batch).unwrap()[0].choice.token);
            }
            alloc.free(&table);
            let same = got.iter().zip(&expect[p]).take_while(|(a, b)| a == b).count();
            say(&format!(
                "{name} {dtype:?} p{p}: greedy matches transformers for {same}/{N_NEW} tokens"
            ));
            if dtype == DType::F32 {
                assert_eq!(got, expect[p], "{name} p{p} alone");
            }
            alone.push(got);
        }
        let mut batch = Batch::default();
        let mut got: Vec<Vec<u32>> = vec![vec![]; N_PROMPTS];
        let (mut step, mut joined) = (0, 0);
        loop {
            let mut gens = Vec::new();
            let joining: Vec<usize> = match step {
                0 => vec![0, 1],
                5 => vec![2],
                11 => vec![3],
                _ => vec![],
            };
            if !batch.is_empty() {
                gens.extend(e.decode(&mut batch).unwrap());
            }
            if !joining.is_empty() {
                let news = joining.iter().map(|&p| new_seq(&mut alloc, p)).collect();
                gens.extend(e.prefill(&mut batch, news).unwrap());
                joined += joining.len();
            }
            for gen in gens {
                got[gen.id as usize].push(gen.choice.token);
            }
            let keep: Vec<u64> = batch
                .ids()
                .into_iter()
                .filter(|&id| got[id as usize].len() < N_NEW)
                .collect();
            batch.filter(&keep);
            step += 1;
            if batch.is_empty() && joined == N_PROMPTS {
                break;
            }
            assert!(step < 200, "batch never drained");
        }
        for p in 0..N_PROMPTS {
            if dtype == DType::F32 {
                assert_eq!(got[p], expect[p], "{name} p{p} in a mixed batch");
            } else {
                let same = got[p].iter().zip(&alone[p]).take_while(|(a, b)| a == b).count();
                say(&format!(
                    "{name} {dtype:?} p{p}: batched greedy equals alone for {same}/{N_NEW} tokens"
                ));
            }
        }
    }
}

#[test]
fn f32_greedy_alone_and_batched_match_transformers() {
    greedy(DType::F32);
}

#[test]
fn bf16_greedy_reported() {
    greedy(DType::BF16);
}

fn lora_engine(dtype: DType, prompt_pair: bool) -> Option<Engine<CudaBackend>> {
    let mut e = engine_with(&fixtures().join("models/llama"), dtype, |b| {
        // With the pair: every segment on it. Without: none (the per-layer GEMMs), so that each path is
        // checked alone; the server's default mixes them (a pass's segments of more than 64 rows on the pair).
        if prompt_pair {
            b.set_lora_prompt_limits(0, 0);
        } else {
            b.set_lora_prompt_tc(false);
        }
    })?;
    for name in ADAPTERS {
        let host = HostAdapter::load(&fixtures().join("adapters").join(name), e.config(), 128).unwrap();
        e.load_adapter(name, &host).unwrap();
    }
    Some(e)
}

/// Each adapter alone at every position against peft, then peft's mixed batch (base + 4 adapters x 4
/// prompts = 20 rows) in one prefill and 32 decode steps. `prompt_pair`: every pass's every segment on the
/// tensor-core prompt pair (`lora_shrink_pf*` + `lora_expand_pf`), which the server runs for prompt chunks
/// of more than 64 rows in passes of more than 256; without it, no segment on the pair (the mixed batch's
/// prefill would otherwise put its prompts of more than 64 tokens on it: session 36 call 1).
fn lora(dtype: DType, prompt_pair: bool) {
    let Some(mut e) = lora_engine(dtype, prompt_pair) else {
        return;
    };
    let g = Golden::open(fixtures().join("adapters/golden_lora.safetensors"));
    let base = Golden::open(fixtures().join("models/llama/golden.safetensors"));
    let sub = g.ids("vocab_subset");
    let mut alloc = BlockAllocator::new(NUM_BLOCKS as u32, BLOCK);
    for name in ADAPTERS {
        let mut stats = Stats::default();
        for p in 0..N_PROMPTS {
            let ids = g.ids(&format!("{name}.p{p}.ids"));
            let greedy = g.ids(&format!("{name}.p{p}.greedy"));
            let key = format!("{name}.p{p}.logits_sub");
            let table = scattered_blocks(&mut alloc, ids.len() + N_NEW);
            let rows = e
                .logits_with_adapters(&[(&ids, 0, &table, Some(name))], &[true])
                .unwrap();
            for (pos, row) in rows.iter().enumerate() {
                stats.add(&format!("{name} p{p} pos {pos}"), &subset(row, &sub), g.row(&key, pos));
            }
            for (j, &tok) in greedy.iter().enumerate() {
                let pos = ids.len() + j;
                let row = e
                    .logits_with_adapters(&[(&[tok], pos, &table, Some(name))], &[false])
                    .unwrap()
                    .remove(0);
                stats.add(&format!("{name} p{p} pos {pos}"), &subset(&row, &sub), g.row(&key, pos));
            }
            alloc.free(&table);
        }
        stats.finish(&format!("adapter {name}"), dtype, true);
    }

    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("adapters/mixed_rows.json")).unwrap()).unwrap();
    let rows: Vec<(usize, Option<String>)> = rows["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let name = r["adapter"].as_str().unwrap();
            (
                r["prompt"].as_u64().unwrap() as usize,
                (name != "__base__").then(|| name.to_string()),
            )
        })
        .collect();
    let prompts: Vec<Vec<u32>> = (0..N_PROMPTS).map(|p| base.ids(&format!("p{p}.ids"))).collect();
    let news: Vec<NewSequence> = rows
        .iter()
        .enumerate()
        .map(|(r, (p, adapter))| NewSequence {
            id: r as u64,
            input_ids: prompts[*p].clone(),
            block_table: scattered_blocks(&mut alloc, prompts[*p].len() + N_NEW),
            params: SamplingParams::default(),
            prefill_logprobs: false,
            prefill_top_n: 0,
            adapter: adapter.clone(),
        })
        .collect();
    let raw: Vec<RawSeq<'_>> = news
        .iter()
        .map(|s| {
            (
                s.input_ids.as_slice(),
                0,
                s.block_table.as_slice(),
                s.adapter.as_deref(),
            )
        })
        .collect();
    let logits = e.logits_with_adapters(&raw, &vec![false; raw.len()]).unwrap();
    let mut stats = Stats::default();
    for (r, (p, adapter)) in rows.iter().enumerate() {
        stats.add(
            &format!("mixed row {r} ({adapter:?}, p{p})"),
            &logits[r],
            g.row("mixed.last_logits", r),
        );
    }
    stats.finish("peft mixed batch, last logits", dtype, true);
    let mut batch = Batch::default();
    let mut got: Vec<Vec<u32>> = vec![vec![]; rows.len()];
    for gen in e.prefill(&mut batch, news).unwrap() {
        got[gen.id as usize].push(gen.choice.token);
    }
    while got[0].len() < N_NEW {
        for gen in e.decode(&mut batch).unwrap() {
            got[gen.id as usize].push(gen.choice.token);
        }
    }
    for (r, (p, adapter)) in rows.iter().enumerate() {
        let expect = match adapter {
            Some(name) => g.ids(&format!("{name}.p{p}.greedy")),
            None => base.ids(&format!("p{p}.greedy")),
        };
        let same = got[r].iter().zip(&expect).take_while(|(a, b)| a == b).count();
        say(&format!(
            "mixed row {r} ({adapter:?}, p{p}) {dtype:?}: greedy matches peft for {same}/{N_NEW} tokens"
        ));
        if dtype == DType::F32 {
            assert_eq!(got[r], expect, "row {r} ({adapter:?}, p{p}) greedy in the mixed batch");
        }
    }
    // The pair did run (a pass without a plan would have taken the per-layer path and passed the same).
    let plans = e.backend.lora_prompt_plans();
    assert_eq!(prompt_pair, plans > 0, "{plans} passes planned on the prompt pair");
}

#[test]
fn f32_lora_matches_peft_alone_and_mixed() {
    lora(DType::F32, false);
}

#[test]
fn bf16_lora_matches_peft_within_bf16_tolerance() {
    lora(DType::BF16, false);
}

#[test]
fn bf16_lora_prompt_pair_matches_peft_within_bf16_tolerance() {
    lora(DType::BF16, true);
}

/// Runs everywhere (CPU only): the CPU engine in f32 with only the adapters' A and B rounded to bf16 (as
/// the CUDA backend stores them in bf16) against peft. This error is the floor under the bf16 LoRA bound:
/// large scales (rsLoRA with alpha patterns: up to 16x) amplify the rounding of the adapter's weights.
#[test]
fn bf16_adapter_weights_alone_explain_the_lora_bound() {
    let mut e = Engine::load(
        CpuBackend,
        &fixtures().join("models/llama"),
        CacheConfig {
            num_blocks: NUM_BLOCKS,
            block_size: BLOCK,
        },
    )
    .unwrap();
    let g = Golden::open(fixtures().join("adapters/golden_lora.safetensors"));
    let sub = g.ids("vocab_subset");
    let mut alloc = BlockAllocator::new(NUM_BLOCKS as u32, BLOCK);
    let mut worst_all = 0f64;
    for name in ADAPTERS {
        let mut host = HostAdapter::load(&fixtures().join("adapters").join(name), e.config(), 128).unwrap();
        for pair in host.layers.iter_mut().flatten().flatten() {
            for t in [&mut pair.a, &mut pair.b] {
                let bytes: Vec<u8> = t
                    .to_f32()
                    .iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_f32().to_le_bytes())
                    .collect();
                *t = HostTensor {
                    name: t.name.clone(),
                    dtype: DType::F32,
                    shape: t.shape.clone(),
                    data: bytes.into(),
                }
                .into();
            }
        }
        e.load_adapter(name, &host).unwrap();
        let mut worst = 0f64;
        for p in 0..N_PROMPTS {
            let ids = g.ids(&format!("{name}.p{p}.ids"));
            let table = alloc.allocate(ids.len()).unwrap();
            let rows = e
                .logits_with_adapters(&[(&ids, 0, &table, Some(name))], &[true])
                .unwrap();
            for (pos, row) in rows.iter().enumerate() {
                worst = worst.max(rel_err(
                    &subset(row, &sub),
                    g.row(&format!("{name}.p{p}.logits_sub"), pos),
                ));
            }
            alloc.free(&table);
        }
        say(&format!(
            "{name}: CPU f32 with the adapter rounded to bf16: worst logits rel err {worst:.3e}"
        ));
        worst_all = worst_all.max(worst);
    }
    let (bound, _) = bounds(DType::BF16, true);
    assert!(
        worst_all > 2e-2 && worst_all < bound,
        "adapter rounding alone: {worst_all:e} (the bf16 LoRA bound {bound:e} assumes 2e-2 < it < bound)"
    );
}
