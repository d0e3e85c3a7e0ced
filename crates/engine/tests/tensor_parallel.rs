//! Tensor parallelism on the CPU: ranks as threads joined by a [`LocalGroup`], each holding its slice of
//! the weights (and of the LoRA A/B matrices), give the logits of transformers / peft (1e-4) and the
//! same greedy tokens as one rank. Covers split and replicated key/value heads (Mistral has one KV head),
//! q/k/v biases and tied embeddings (Qwen2), and a mixed batch of base and adapter sequences.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::{fixtures, rel_err, subset, Golden};
use lorax_engine::comm::{Communicator, LocalGroup};
use lorax_engine::kv_cache::BlockAllocator;
use lorax_engine::lora::HostAdapter;
use lorax_engine::{Batch, CacheConfig, CpuBackend, Engine, NewSequence, SamplingParams};

const TOL: f64 = 1e-4;
const N_NEW: usize = 16;
const CACHE: CacheConfig = CacheConfig {
    num_blocks: 512,
    block_size: 4,
};
const ADAPTERS: [&str; 4] = ["lora-r8", "lora-r16-all", "lora-r64-regex", "rslora-r16-patterns"];

/// Runs `f` on every rank of a `world`-rank group serving `model` (each rank a thread) and returns the
/// ranks' results in rank order.
fn on_ranks<T: Send + 'static>(
    world: usize,
    model: &str,
    adapters: bool,
    f: impl Fn(&mut Engine<CpuBackend>) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = Arc::new(f);
    let dir = fixtures().join("models").join(model);
    let handles: Vec<_> = LocalGroup::new(world)
        .into_iter()
        .map(|member| {
            let (f, dir) = (Arc::clone(&f), dir.clone());
            std::thread::spawn(move || {
                let comm: Arc<dyn Communicator> = Arc::new(member);
                let mut e = Engine::load_sharded(CpuBackend, &dir, CACHE, comm).unwrap();
                if adapters {
                    for name in ADAPTERS {
                        let host = HostAdapter::load(&fixtures().join("adapters").join(name), e.config(), 128).unwrap();
                        e.load_adapter(name, &host).unwrap();
                    }
                }
                f(&mut e)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Every prompt's logits at every position, and greedy continuations through prefill/decode.
fn logits_and_greedy(e: &mut Engine<CpuBackend>, prompts: &[Vec<u32>]) -> (Vec<Vec<Vec<f32>>>, Vec<Vec<u32>>) {
    let mut alloc = BlockAllocator::new(CACHE.num_blocks as u32, CACHE.block_size);
    let mut logits = Vec::new();
    for ids in prompts {
        let table = alloc.allocate(ids.len()).unwrap();
        logits.push(e.logits(&[(ids, 0, &table)], &[true]).unwrap());
        alloc.free(&table);
    }
    let greedy = common::greedy_batch(e, &mut alloc, prompts, N_NEW);
    (logits, greedy)
}

#[test]
fn sharded_models_match_transformers_and_one_rank() {
    // (model, world): llama splits its 2 KV heads over 2 ranks and replicates them over 4; mistral's
    // single KV head is replicated; qwen2 has q/k/v biases and tied embeddings.
    for (model, world) in [("llama", 2), ("llama", 4), ("mistral", 2), ("qwen2", 2)] {
        let g = Golden::open(fixtures().join("models").join(model).join("golden.safetensors"));
        let sub = g.ids("vocab_subset");
        let prompts: Vec<Vec<u32>> = (0..4).map(|p| g.ids(&format!("p{p}.ids"))).collect();
        let p2 = prompts.clone();
        let ranks = on_ranks(world, model, false, move |e| logits_and_greedy(e, &p2));
        let p1 = prompts.clone();
        let single = on_ranks(1, model, false, move |e| logits_and_greedy(e, &p1)).remove(0);
        for (rank, (logits, greedy)) in ranks.iter().enumerate() {
            for (p, rows) in logits.iter().enumerate() {
                let key = format!("p{p}.logits_sub");
                let mut worst = 0f64;
                for (pos, row) in rows.iter().enumerate() {
                    worst = worst.max(rel_err(&subset(row, &sub), g.row(&key, pos)));
                }
                assert!(
                    worst < TOL,
                    "{model} TP={world} rank {rank} p{p}: rel err {worst:e} vs transformers"
                );
                let last = rows.last().unwrap();
                let vs_one = rel_err(last, single.0[p].last().unwrap());
                assert!(
                    vs_one < TOL,
                    "{model} TP={world} rank {rank} p{p}: rel err {vs_one:e} vs one rank"
                );
                let expect = &g.ids(&format!("p{p}.greedy"))[..N_NEW];
                assert_eq!(&greedy[p], expect, "{model} TP={world} rank {rank} p{p} greedy");
            }
            assert_eq!(greedy, &single.1, "{model} TP={world}: ranks disagree with one rank");
        }
    }
}

#[test]
fn sharded_mixed_adapter_batch_matches_peft() {
    let g = Golden::open(fixtures().join("adapters/golden_lora.safetensors"));
    let base = Golden::open(fixtures().join("models/llama/golden.safetensors"));
    let prompts: Vec<Vec<u32>> = (0..4).map(|p| base.ids(&format!("p{p}.ids"))).collect();
    // peft's mixed batch rows: prompt × [base, the four adapters].
    let rows: Vec<(usize, Option<&'static str>)> = (0..4)
        .flat_map(|p| std::iter::once((p, None)).chain(ADAPTERS.iter().map(move |a| (p, Some(*a)))))
        .collect();
    let r2 = rows.clone();
    let results = on_ranks(2, "llama", true, move |e| {
        let mut alloc = BlockAllocator::new(CACHE.num_blocks as u32, CACHE.block_size);
        let news: Vec<NewSequence> = r2
            .iter()
            .enumerate()
            .map(|(i, (p, a))| NewSequence {
                id: i as u64,
                input_ids: prompts[*p].clone(),
                block_table: alloc.allocate(prompts[*p].len() + N_NEW).unwrap(),
                params: SamplingParams::default(),
                prefill_logprobs: false,
                prefill_top_n: 0,
                adapter: a.map(str::to_string),
            })
            .collect();
        let raw: Vec<_> = news
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
        let last = e.logits_with_adapters(&raw, &[]).unwrap();
        let mut batch = Batch::default();
        let mut greedy = vec![Vec::new(); news.len()];
        for gen in e.prefill(&mut batch, news).unwrap() {
            greedy[gen.id as usize].push(gen.choice.token);
        }
        while greedy[0].len() < N_NEW {
            for gen in e.decode(&mut batch).unwrap() {
                greedy[gen.id as usize].push(gen.choice.token);
            }
        }
        (last, greedy)
    });
    for (rank, (last, greedy)) in results.iter().enumerate() {
        for (r, (p, adapter)) in rows.iter().enumerate() {
            let err = rel_err(&last[r], g.row("mixed.last_logits", r));
            assert!(
                err < TOL,
                "rank {rank} row {r} ({adapter:?}, p{p}): rel err {err:e} vs peft"
            );
            let expect = match adapter {
                Some(a) => g.ids(&format!("{a}.p{p}.greedy")),
                None => base.ids(&format!("p{p}.greedy")),
            };
            assert_eq!(
                greedy[r],
                expect[..N_NEW],
                "rank {rank} row {r} ({adapter:?}, p{p}) greedy"
            );
        }
    }
}

#[test]
fn unshardable_models_are_refused() {
    let comm: Arc<dyn Communicator> = Arc::new(LocalGroup::new(3).remove(0));
    let err = match Engine::load_sharded(CpuBackend, &fixtures().join("models/llama"), CACHE, comm) {
        Ok(_) => panic!("4 heads split over 3 ranks"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("cannot be split across 3 shards"), "{err}");
}
