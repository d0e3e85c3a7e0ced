//! Golden tests: the CPU engine against transformers 5.17 (fixtures made by
//! scripts/fixtures/make_fixtures.py). Logits within 1e-4 relative error, greedy tokens identical,
//! batching and paging invisible in the results.
#![allow(clippy::unwrap_used)]

mod common;

use common::{fixtures, rel_err, subset, Golden};
use lorax_engine::kv_cache::BlockAllocator;
use lorax_engine::{Batch, CacheConfig, CpuBackend, Engine, NewSequence, SamplingParams};

const MODELS: [&str; 3] = ["llama", "mistral", "qwen2"];
const N_PROMPTS: usize = 4;
const N_NEW: usize = 32;
const TOL: f64 = 1e-4;
const BLOCK: usize = 4;

fn engine(name: &str) -> Engine<CpuBackend> {
    Engine::load(
        CpuBackend,
        &fixtures().join("models").join(name),
        CacheConfig {
            num_blocks: 512,
            block_size: BLOCK,
        },
    )
    .unwrap()
}

fn golden(name: &str) -> Golden {
    Golden::open(fixtures().join("models").join(name).join("golden.safetensors"))
}

/// A block table whose blocks are scattered through the cache, so paging is really exercised.
fn scattered_blocks(alloc: &mut BlockAllocator, tokens: usize) -> Vec<u32> {
    let mut b = alloc.allocate(tokens).unwrap();
    b.reverse();
    b
}

/// Every position's logits, prompt and 32 teacher-forced decode steps, against transformers.
#[test]
fn logits_match_transformers_at_every_position() {
    for name in MODELS {
        let mut e = engine(name);
        let g = golden(name);
        let sub = g.ids("vocab_subset");
        let mut alloc = BlockAllocator::new(512, BLOCK);
        for p in 0..N_PROMPTS {
            let ids = g.ids(&format!("p{p}.ids"));
            let greedy = g.ids(&format!("p{p}.greedy"));
            let table = scattered_blocks(&mut alloc, ids.len() + N_NEW);
            let rows = e.logits(&[(&ids, 0, &table)], &[true]).unwrap();
            assert_eq!(rows.len(), ids.len());
            let last = g.f(&format!("p{p}.last_logits")).1.as_slice();
            let err = rel_err(&rows[ids.len() - 1], last);
            assert!(err < TOL, "{name} p{p}: last prompt logits rel err {err:e}");
            let key = format!("p{p}.logits_sub");
            let mut worst = 0f64;
            for (pos, row) in rows.iter().enumerate() {
                worst = worst.max(rel_err(&subset(row, &sub), g.row(&key, pos)));
            }
            // Decode through the paged cache, one token at a time, feeding the reference tokens.
            for (j, &tok) in greedy.iter().enumerate() {
                let pos = ids.len() + j;
                let row = e.logits(&[(&[tok], pos, &table)], &[false]).unwrap().remove(0);
                worst = worst.max(rel_err(&subset(&row, &sub), g.row(&key, pos)));
            }
            assert!(worst < TOL, "{name} p{p}: worst per-position rel err {worst:e}");
            alloc.free(&table);
        }
    }
}

/// Greedy continuations through the engine's own prefill/decode/filter are token-identical, whether
/// each prompt runs alone or all run together, joining and leaving at different steps.
#[test]
fn greedy_alone_and_batched_match_transformers() {
    for name in MODELS {
        let mut e = engine(name);
        let g = golden(name);
        let prompts: Vec<Vec<u32>> = (0..N_PROMPTS).map(|p| g.ids(&format!("p{p}.ids"))).collect();
        let expect: Vec<Vec<u32>> = (0..N_PROMPTS).map(|p| g.ids(&format!("p{p}.greedy"))).collect();
        let mut alloc = BlockAllocator::new(512, BLOCK);
        let new_seq = |alloc: &mut BlockAllocator, p: usize| NewSequence {
            id: p as u64,
            input_ids: prompts[p].clone(),
            block_table: scattered_blocks(alloc, prompts[p].len() + N_NEW),
            params: SamplingParams::default(),
            prefill_logprobs: false,
            prefill_top_n: 0,
            adapter: None,
        };

        // Alone.
        for (p, expect) in expect.iter().enumerate() {
            let mut batch = Batch::default();
            let s = new_seq(&mut alloc, p);
            let table = s.block_table.clone();
            let mut got = vec![e.prefill(&mut batch, vec![s]).unwrap()[0].choice.token];
            while got.len() < N_NEW {
                got.push(e.decode(&mut batch).unwrap()[0].choice.token);
            }
            assert_eq!(&got, expect, "{name} p{p} alone");
            alloc.free(&table);
        }

        // Together: 0 and 1 start, 2 joins after 5 steps, 3 after 11; each leaves after 32 tokens.
        let mut batch = Batch::default();
        let mut got: Vec<Vec<u32>> = vec![vec![]; N_PROMPTS];
        let mut step = 0;
        let mut joined = 0;
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
        for (p, (got, expect)) in got.iter().zip(&expect).enumerate() {
            assert_eq!(got, expect, "{name} p{p} in a mixed batch");
        }
    }
}

/// Decoding through the paged cache equals recomputing the whole sequence from scratch.
#[test]
fn paged_decode_equals_full_recompute() {
    let mut e = engine("llama");
    let g = golden("llama");
    let ids = g.ids("p2.ids");
    let greedy = g.ids("p2.greedy");
    let mut alloc = BlockAllocator::new(512, BLOCK);
    let table = scattered_blocks(&mut alloc, ids.len() + N_NEW);
    e.logits(&[(&ids, 0, &table)], &[false]).unwrap();
    let mut seq = ids.clone();
    for &tok in &greedy[..10] {
        let paged = e.logits(&[(&[tok], seq.len(), &table)], &[false]).unwrap().remove(0);
        seq.push(tok);
        let fresh_table = scattered_blocks(&mut alloc, seq.len());
        let full = e.logits(&[(&seq, 0, &fresh_table)], &[false]).unwrap().remove(0);
        alloc.free(&fresh_table);
        let err = rel_err(&paged, &full);
        assert!(err < 1e-5, "paged vs recompute at length {}: {err:e}", seq.len());
    }
}

/// Prompt token `i`'s logprob is log_softmax of position `i - 1`'s logits at that token (the logits
/// themselves are checked against transformers above); the first token has none; the chosen token's
/// logprob and alternatives come from the reference's last-position logits.
#[test]
fn prefill_logprobs_use_the_previous_position() {
    let mut e = engine("mistral");
    let g = golden("mistral");
    let ids = g.ids("p2.ids");
    let mut alloc = BlockAllocator::new(512, BLOCK);
    let table = alloc.allocate(ids.len()).unwrap();
    let rows = e.logits(&[(&ids, 0, &table)], &[true]).unwrap();
    let mut scored = |e: &mut lorax_engine::Engine<CpuBackend>| {
        let mut batch = Batch::default();
        e.prefill(
            &mut batch,
            vec![NewSequence {
                id: 7,
                input_ids: ids.clone(),
                block_table: alloc.allocate(ids.len() + 1).unwrap(),
                params: SamplingParams {
                    top_n_tokens: 3,
                    ..SamplingParams::default()
                },
                prefill_logprobs: true,
                prefill_top_n: 4,
                adapter: None,
            }],
        )
        .unwrap()
    };
    let gens = scored(&mut e);
    // The LM head a few rows at a time (as past HEAD_ROWS_A_PASS rows): the same logits and answers.
    let piece = (ids.len() / 3).max(2) + 1;
    assert!(
        ids.len() > piece && !ids.len().is_multiple_of(piece),
        "uneven pieces of {} rows",
        ids.len()
    );
    e.set_head_rows_a_pass(piece);
    assert_eq!(e.logits(&[(&ids, 0, &table)], &[true]).unwrap(), rows);
    let in_pieces = scored(&mut e);
    assert_eq!(in_pieces[0].prefill, gens[0].prefill);
    assert_eq!(in_pieces[0].choice, gens[0].choice);
    let prefill = gens[0].prefill.as_ref().unwrap();
    assert_eq!(prefill.len(), ids.len());
    assert_eq!(prefill[0].logprob, None);
    assert!(prefill[0].top.is_empty(), "the first prompt token has no alternatives");
    let lse = |row: &[f32]| {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        max + row.iter().map(|v| (v - max).exp()).sum::<f32>().ln()
    };
    for (i, t) in prefill.iter().enumerate().skip(1) {
        assert_eq!(t.id, ids[i]);
        let row = &rows[i - 1];
        let want = row[ids[i] as usize] - lse(row);
        let got = t.logprob.unwrap();
        assert!((got - want).abs() < 1e-4, "prompt token {i}: {got} vs {want}");
        // Its alternatives: the position's 4 most likely tokens, best first, with their logprobs.
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        assert_eq!(t.top.len(), 4, "prompt token {i}");
        for (k, (id, lp)) in t.top.iter().enumerate() {
            assert_eq!(*id as usize, order[k], "prompt token {i}, alternative {k}");
            assert!(
                (lp - (row[order[k]] - lse(row))).abs() < 1e-4,
                "prompt token {i}, alternative {k}"
            );
        }
    }
    let last = &g.f("p2.last_logits").1;
    let tok = gens[0].choice.token as usize;
    assert_eq!(gens[0].choice.token, g.ids("p2.greedy")[0]);
    assert!((gens[0].choice.logprob - (last[tok] - lse(last))).abs() < 1e-4);
    let top = &gens[0].choice.top;
    assert_eq!(top.len(), 3);
    assert_eq!(top[0].0 as usize, tok);
    let mut order: Vec<usize> = (0..last.len()).collect();
    order.sort_by(|&a, &b| last[b].total_cmp(&last[a]));
    for (k, (id, lp)) in top.iter().enumerate() {
        assert_eq!(*id as usize, order[k], "alternative {k}");
        assert!((lp - (last[order[k]] - lse(last))).abs() < 1e-4);
    }
}

#[test]
fn steps_count_their_host_time_by_kind() {
    let name = MODELS[0];
    let mut e = engine(name);
    let g = golden(name);
    let mut alloc = BlockAllocator::new(512, BLOCK);
    let mut batch = Batch::default();
    let seq = |id: u64, alloc: &mut BlockAllocator| {
        let input_ids = g.ids(&format!("p{id}.ids"));
        NewSequence {
            id,
            block_table: scattered_blocks(alloc, input_ids.len() + 16),
            input_ids,
            params: SamplingParams::default(),
            prefill_logprobs: false,
            prefill_top_n: 0,
            adapter: None,
        }
    };
    e.prefill(&mut batch, vec![seq(0, &mut alloc), seq(1, &mut alloc)])
        .unwrap();
    assert_eq!(e.decode_times().steps, 0, "a prefill is not a decode step");
    let prompt = e.prompt_times();
    assert_eq!(prompt.steps, 1, "{prompt:?}");
    for _ in 0..5 {
        e.decode(&mut batch).unwrap();
    }
    // A mixed step (a new prompt next to the decode rows) is not counted either.
    e.step(
        &mut batch,
        vec![seq(2, &mut alloc)],
        lorax_engine::StepOptions {
            decode: true,
            max_prompt_tokens: None,
        },
    )
    .unwrap();
    e.decode(&mut batch).unwrap();
    let t = e.decode_times();
    assert_eq!((t.steps, t.rows), (6, 5 * 2 + 3), "{t:?}");
    // The mixed step: two decode rows and the third prompt, whole.
    let p = e.prompt_times();
    let third = g.ids("p2.ids").len() as u64;
    assert_eq!((p.steps, p.rows), (2, prompt.rows + 2 + third), "{p:?}");
    assert!(
        t.forward > std::time::Duration::ZERO && t.sample > std::time::Duration::ZERO,
        "{t:?}"
    );
    assert!(t.total >= t.forward + t.sample, "the whole step holds its parts: {t:?}");
    // The forward's parts: its inputs come before its launches, its longest is one of the steps' (so no
    // more than their sum), and the thread spent some of it on a core (as the thread's CPU clock counts).
    assert!(t.inputs > std::time::Duration::ZERO && t.inputs <= t.forward, "{t:?}");
    assert!(
        t.forward_max > std::time::Duration::ZERO && t.forward_max <= t.forward,
        "{t:?}"
    );
    if cfg!(target_os = "linux") {
        assert!(
            t.forward_cpu > std::time::Duration::ZERO,
            "the thread's CPU clock counts its time: {t:?}"
        );
    }
}
