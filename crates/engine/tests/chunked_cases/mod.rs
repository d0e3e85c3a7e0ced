//! The mixed-step and chunked-prefill cases, shared by the CPU test (`chunked_prefill.rs`) and the CUDA
//! one (`cuda_chunked.rs`): sequences that join a running batch through [`Engine::step`] (decode rows of
//! the running sequences and chunks of the new prompts in one forward pass) get the same tokens,
//! alternatives and prompt tokens as the plain path (one whole-prompt prefill, then decode steps), and
//! their logprobs within 1e-4 (a product's rounding depends on how many rows its batch has), whatever the
//! chunk budget: 1 token, sizes that do not divide the prompts, larger than every prompt. Base model and
//! two LoRA adapters in the same batch, on the llama fixture model.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::common::Golden;
use lorax_engine::kv_cache::BlockAllocator;
use lorax_engine::lora::HostAdapter;
use lorax_engine::{
    Backend, Batch, CacheConfig, Engine, FeedCounts, Generation, NewSequence, SamplingParams, StepOptions,
};

const N_NEW: usize = 12;
const BLOCK: usize = 4;
const ADAPTERS: [&str; 2] = ["lora-r8", "rslora-r16-patterns"];

/// The llama fixture model on `backend` with the two adapters loaded; `fixtures` is tests/fixtures.
pub fn engine<B: Backend>(backend: B, fixtures: &Path) -> Engine<B> {
    let mut e = Engine::load(
        backend,
        &fixtures.join("models/llama"),
        CacheConfig {
            num_blocks: 1024,
            block_size: BLOCK,
        },
    )
    .unwrap();
    for name in ADAPTERS {
        let host = HostAdapter::load(&fixtures.join("adapters").join(name), e.config(), 128).unwrap();
        e.load_adapter(name, &host).unwrap();
    }
    e
}

/// Six sequences: the four llama fixture prompts (2, 6, 36 and 29 tokens) on the base model, and the two
/// long ones again with an adapter each; some ask for prompt logprobs, some for alternatives.
fn sequences(alloc: &mut BlockAllocator, fixtures: &Path) -> Vec<NewSequence> {
    let g = Golden::open(fixtures.join("models/llama/golden.safetensors"));
    let specs: [(usize, Option<&str>); 6] = [
        (2, None),
        (0, None),
        (3, Some(ADAPTERS[0])),
        (1, None),
        (2, Some(ADAPTERS[1])),
        (3, None),
    ];
    specs
        .iter()
        .enumerate()
        .map(|(i, &(p, adapter))| {
            let ids = g.ids(&format!("p{p}.ids"));
            let mut block_table = alloc.allocate(ids.len() + N_NEW).unwrap();
            block_table.reverse();
            NewSequence {
                id: i as u64,
                block_table,
                input_ids: ids,
                params: SamplingParams {
                    top_n_tokens: (i % 3) as u32,
                    ..SamplingParams::default()
                },
                prefill_logprobs: i % 2 == 0,
                prefill_top_n: 0,
                adapter: adapter.map(str::to_string),
            }
        })
        .collect()
}

/// Logprobs of the same token computed in batches of different shapes differ in rounding only.
const LOGPROB_TOL: f32 = 1e-4;

/// `got` is `want`: the same tokens, alternatives and prompt tokens, every logprob within
/// [`LOGPROB_TOL`].
fn assert_same(got: &Generation, want: &Generation, what: &str) {
    let close = |a: f32, b: f32| (a - b).abs() <= LOGPROB_TOL;
    let (g, w) = (&got.choice, &want.choice);
    assert_eq!((got.id, g.token), (want.id, w.token), "{what}: token");
    assert!(
        close(g.logprob, w.logprob),
        "{what}: logprob {} vs {}",
        g.logprob,
        w.logprob
    );
    let ids = |top: &[(u32, f32)]| top.iter().map(|t| t.0).collect::<Vec<_>>();
    assert_eq!(ids(&g.top), ids(&w.top), "{what}: alternatives");
    for (a, b) in g.top.iter().zip(&w.top) {
        assert!(
            close(a.1, b.1),
            "{what}: alternative {} logprob {} vs {}",
            a.0,
            a.1,
            b.1
        );
    }
    assert_eq!(got.prefill.is_some(), want.prefill.is_some(), "{what}: prompt logprobs");
    if let (Some(gp), Some(wp)) = (&got.prefill, &want.prefill) {
        assert_eq!(gp.len(), wp.len(), "{what}: prompt tokens");
        for (a, b) in gp.iter().zip(wp) {
            assert_eq!(a.id, b.id, "{what}: prompt token");
            match (a.logprob, b.logprob) {
                (Some(x), Some(y)) => assert!(close(x, y), "{what}: prompt token {} logprob {x} vs {y}", a.id),
                (x, y) => assert_eq!(x, y, "{what}: prompt token {} logprob", a.id),
            }
        }
    }
}

/// Each sequence's generations, in order, once it has `N_NEW` of them (the batch drops it then).
type Trace = BTreeMap<u64, Vec<Generation>>;

fn record(trace: &mut Trace, batch: &mut Batch, gens: Vec<Generation>) {
    for g in gens {
        trace.entry(g.id).or_default().push(g);
    }
    let keep: Vec<u64> = batch
        .ids()
        .into_iter()
        .filter(|id| trace.get(id).map_or(0, Vec::len) < N_NEW)
        .collect();
    batch.filter(&keep);
}

/// How a test makes an engine (a fresh one per run) and where the fixtures are.
pub struct Setup<'a, B: Backend> {
    pub engine: &'a dyn Fn() -> Engine<B>,
    pub fixtures: PathBuf,
}

/// The plain path: every prompt in one prefill, then decode steps.
fn reference<B: Backend>(s: &Setup<'_, B>) -> Trace {
    let mut e = (s.engine)();
    let mut alloc = BlockAllocator::new(1024, BLOCK);
    let mut batch = Batch::default();
    let mut trace = Trace::new();
    let gens = e.prefill(&mut batch, sequences(&mut alloc, &s.fixtures)).unwrap();
    record(&mut trace, &mut batch, gens);
    while !batch.is_empty() {
        let gens = e.decode(&mut batch).unwrap();
        record(&mut trace, &mut batch, gens);
    }
    trace
}

/// Mixed steps with a prompt budget of `chunk` tokens: sequences 0 and 1 start, the others join a
/// running batch two by two; every step decodes the running sequences.
fn mixed<B: Backend>(s: &Setup<'_, B>, chunk: usize) -> Trace {
    mixed_with(s, chunk, false).0
}

/// [`mixed`], with pure decode steps computing the next step right after their sampling when `feed_on_host`
/// ([`Engine::set_feed_on_host`]); also how the steps launched ahead were used.
fn mixed_with<B: Backend>(s: &Setup<'_, B>, chunk: usize, feed_on_host: bool) -> (Trace, FeedCounts) {
    let mut e = (s.engine)();
    e.set_feed_on_host(feed_on_host);
    let mut alloc = BlockAllocator::new(1024, BLOCK);
    let mut joining = sequences(&mut alloc, &s.fixtures).into_iter();
    let mut batch = Batch::default();
    let mut trace = Trace::new();
    let opts = StepOptions {
        decode: true,
        max_prompt_tokens: Some(chunk),
    };
    let mut deferred_before = false;
    for step in 0.. {
        let new: Vec<NewSequence> = match step {
            0 | 4 | 9 => joining.by_ref().take(2).collect(),
            _ => Vec::new(),
        };
        let new_ids: Vec<u64> = new.iter().map(|n| n.id).collect();
        let counts = e.feed_counts();
        let gens = e.step(&mut batch, new, opts).unwrap();
        // A step whose decode rows all came from the step launched ahead runs no prompt token: its new sequences
        // wait, untouched, and the next step (nothing launched ahead of it) runs them.
        let deferred = e.feed_counts().deferred > counts.deferred;
        if deferred {
            assert!(
                counts.launched > 0,
                "chunk {chunk}, step {step}: prompts deferred with no step launched ahead"
            );
            assert!(
                !deferred_before,
                "chunk {chunk}, step {step}: prompts deferred twice in a row"
            );
            assert_eq!(
                e.feed_counts().launched,
                counts.launched,
                "chunk {chunk}, step {step}: launched ahead"
            );
            for s in batch.seqs.iter().filter(|s| new_ids.contains(&s.id)) {
                assert_eq!(
                    s.cached, 0,
                    "chunk {chunk}, step {step}: sequence {} ran prompt tokens",
                    s.id
                );
            }
        }
        deferred_before = deferred;
        // A sequence mid-prefill produces nothing.
        for g in &gens {
            assert!(
                batch.prefilling_ids().iter().all(|&id| id != g.id),
                "chunk {chunk}: sequence {} still prefilling got a token",
                g.id
            );
        }
        record(&mut trace, &mut batch, gens);
        if batch.is_empty() && step >= 9 {
            break;
        }
        assert!(step < 1000, "chunk {chunk}: the batch never drained");
    }
    (trace, e.feed_counts())
}

/// Decode steps padded with rows that write no keys or values ([`Backend::decode_rows`], as CUDA graph
/// steps are) give the unpadded path's generations: the padding rows neither disturb the real rows nor
/// the cache (the first sequence's blocks include block 0, where a padding row's attention reads).
pub fn padded_decode_matches_unpadded<B: Backend, P: Backend>(plain: &Setup<'_, B>, padded: &Setup<'_, P>) {
    let want = reference(plain);
    let got = reference(padded);
    assert_eq!(got.len(), want.len());
    for (id, want) in &want {
        let got = &got[id];
        assert_eq!(got.len(), want.len(), "padded: sequence {id}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert_same(g, w, &format!("padded: sequence {id}, token {i}"));
        }
    }
}

/// Every budget's mixed steps give the plain path's generations.
pub fn mixed_steps_match_prefill_then_decode<B: Backend>(s: &Setup<'_, B>) {
    let expect = reference(s);
    assert_eq!(expect.len(), 6);
    for (id, gens) in &expect {
        assert_eq!(gens.len(), N_NEW);
        assert_eq!(gens[0].prefill.is_some(), id % 2 == 0, "prompt logprobs of {id}");
    }
    for chunk in [1, 3, 5, 7, 16, 64] {
        let got = mixed(s, chunk);
        for (id, want) in &expect {
            let got = &got[id];
            assert_eq!(got.len(), want.len(), "chunk {chunk}: sequence {id}");
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                assert_same(g, w, &format!("chunk {chunk}: sequence {id}, token {i}"));
            }
        }
    }
}

/// Mixed steps where each pure decode step computes the next one right after its sampling, from the tokens it
/// chose (what the CUDA backend launches on the device before the host has the tokens; here on the host's
/// schedule): later steps take their decode rows from it, all of them or, as sequences leave and join, some, and
/// every budget gives the plain path's generations (`plain`'s engines launch nothing ahead). `on_host`: the engine
/// computes the next step itself ([`Engine::set_feed_on_host`], for a backend that launches nothing ahead).
pub fn steps_launched_ahead_match_prefill_then_decode<B: Backend>(
    plain: &Setup<'_, B>,
    s: &Setup<'_, B>,
    on_host: bool,
) {
    let expect = reference(plain);
    let mut total = FeedCounts::default();
    for chunk in [1, 5, 64] {
        let (got, counts) = mixed_with(s, chunk, on_host);
        for (id, want) in &expect {
            let got = &got[id];
            assert_eq!(got.len(), want.len(), "launched ahead, chunk {chunk}: sequence {id}");
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                assert_same(
                    g,
                    w,
                    &format!("launched ahead, chunk {chunk}: sequence {id}, token {i}"),
                );
            }
        }
        assert!(counts.launched > 0, "chunk {chunk}: no step launched ahead: {counts:?}");
        assert!(
            counts.whole + counts.part + counts.dropped <= counts.launched,
            "chunk {chunk}: more steps used than launched: {counts:?}"
        );
        total.whole += counts.whole;
        total.part += counts.part;
        total.deferred += counts.deferred;
    }
    // Steps served whole (the batch unchanged) and in part (sequences left), and prompts that waited for the step
    // after one launched ahead.
    assert!(total.whole > 0 && total.part > 0 && total.deferred > 0, "{total:?}");
    // Sequences that join through a prefill without decode rows: the decode step after it runs whole, its rows
    // not taken from the step launched before the prefill.
    let mut e = (s.engine)();
    e.set_feed_on_host(on_host);
    let mut alloc = BlockAllocator::new(1024, BLOCK);
    let mut seqs = sequences(&mut alloc, &s.fixtures);
    let later = seqs.split_off(2);
    let mut batch = Batch::default();
    let mut got = Trace::new();
    let gens = e.prefill(&mut batch, seqs).unwrap();
    record(&mut got, &mut batch, gens);
    for _ in 0..4 {
        let gens = e.decode(&mut batch).unwrap();
        record(&mut got, &mut batch, gens);
    }
    let gens = e.prefill(&mut batch, later).unwrap();
    record(&mut got, &mut batch, gens);
    while !batch.is_empty() {
        let gens = e.decode(&mut batch).unwrap();
        record(&mut got, &mut batch, gens);
    }
    let counts = e.feed_counts();
    assert!(
        counts.dropped >= 1,
        "the step launched before the prefill was used: {counts:?}"
    );
    for (id, want) in &expect {
        let got = &got[id];
        assert_eq!(got.len(), want.len(), "joined by prefill: sequence {id}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert_same(g, w, &format!("joined by prefill: sequence {id}, token {i}"));
        }
    }
}

/// A prompt part-way through its chunks also waits for the step after one launched ahead, with what it has cached
/// and the prompt logprobs computed so far kept: a sequence that joins (chunks of 10 tokens) behind plain decode
/// steps that launch the next ahead, then gets the plain path's tokens and prompt logprobs.
pub fn prompts_mid_prefill_wait_for_the_step_after_one_launched_ahead<B: Backend>(
    plain: &Setup<'_, B>,
    s: &Setup<'_, B>,
) {
    let expect = reference(plain);
    let mut e = (s.engine)();
    e.set_feed_on_host(true);
    let mut alloc = BlockAllocator::new(1024, BLOCK);
    let mut seqs = sequences(&mut alloc, &s.fixtures);
    // Sequence 0 (36 tokens, prompt logprobs) joins 1 and 3 (2 and 6 tokens) once they decode.
    let (third, first) = (seqs.remove(3), seqs.remove(1));
    let joining = seqs.remove(0);
    let mut batch = Batch::default();
    let mut got = Trace::new();
    let gens = e.prefill(&mut batch, vec![first, third]).unwrap();
    record(&mut got, &mut batch, gens);
    for _ in 0..3 {
        let gens = e.decode(&mut batch).unwrap();
        record(&mut got, &mut batch, gens);
    }
    // One step with a 10-token prompt budget: the decode rows' tokens, whether the prompt waited (the steps whose
    // prompts waited counted once more), and what sequence 0 has cached after it.
    let chunk = |e: &mut Engine<B>, batch: &mut Batch, got: &mut Trace, new, waits: bool, cached: usize| {
        let before = e.feed_counts().deferred;
        let opts = StepOptions {
            decode: true,
            max_prompt_tokens: Some(10),
        };
        let gens = e.step(batch, new, opts).unwrap();
        assert_eq!(e.feed_counts().deferred, before + u64::from(waits), "waited: {waits}");
        let now = batch.seqs.iter().find(|s| s.id == 0).map(|s| s.cached);
        // Sequence 0's first token once its 36 prompt tokens are cached.
        let tokens = 2 + usize::from(cached == 36);
        assert_eq!((gens.len(), now), (tokens, Some(cached)), "waited: {waits}");
        record(got, batch, gens);
    };
    // Waits, new; then a chunk in the next step's pass.
    chunk(&mut e, &mut batch, &mut got, vec![joining], true, 0);
    chunk(&mut e, &mut batch, &mut got, vec![], false, 10);
    // Plain decode steps (the prompt skipped) launch the next ahead again; then it waits part-way.
    for _ in 0..2 {
        let gens = e.decode(&mut batch).unwrap();
        record(&mut got, &mut batch, gens);
    }
    chunk(&mut e, &mut batch, &mut got, vec![], true, 10);
    chunk(&mut e, &mut batch, &mut got, vec![], false, 20);
    while batch.prefilling_ids().contains(&0) {
        let cached = batch.seqs.iter().find(|s| s.id == 0).map_or(0, |s| s.cached);
        chunk(&mut e, &mut batch, &mut got, vec![], false, (cached + 10).min(36));
    }
    while !batch.is_empty() {
        let gens = e.decode(&mut batch).unwrap();
        record(&mut got, &mut batch, gens);
    }
    assert_eq!(got.len(), 3);
    for (id, got) in &got {
        let want = &expect[id];
        assert_eq!(got.len(), want.len(), "waited part-way: sequence {id}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert_same(g, w, &format!("waited part-way: sequence {id}, token {i}"));
        }
    }
}

/// `decode` skips sequences still prefilling (no row, no generation) and a later step finishes their
/// prompt with the same first token and prompt logprobs as a whole-prompt prefill.
pub fn decode_skips_prefilling_sequences<B: Backend>(s: &Setup<'_, B>) {
    let expect = reference(s);
    let mut e = (s.engine)();
    let mut alloc = BlockAllocator::new(1024, BLOCK);
    let mut seqs = sequences(&mut alloc, &s.fixtures);
    // Sequence 2 (29 tokens, an adapter) and 0 (36 tokens, base model), both with prompt logprobs.
    let second = seqs.remove(2);
    let first = seqs.remove(0);
    let mut batch = Batch::default();
    let chunk = StepOptions {
        decode: true,
        max_prompt_tokens: Some(10),
    };
    // 10 prompt tokens: a chunk of the first prompt, nothing of the second; nothing generated.
    assert!(e.step(&mut batch, vec![first, second], chunk).unwrap().is_empty());
    assert_eq!(batch.prefilling_ids(), vec![0, 2]);
    assert!(e.decode(&mut batch).unwrap().is_empty());
    assert_eq!((batch.seqs[0].cached, batch.seqs[1].cached), (10, 0));
    // A plain prefill finishes every prompt.
    let gens = e.prefill(&mut batch, vec![]).unwrap();
    assert_eq!(gens.len(), 2);
    assert!(batch.prefilling_ids().is_empty());
    for g in gens {
        assert_same(&g, &expect[&g.id][0], "first token");
    }
    let gens = e.decode(&mut batch).unwrap();
    assert_eq!(gens.len(), 2);
    for g in gens {
        assert_same(&g, &expect[&g.id][1], "second token");
    }
}

/// A step that fails leaves the batch as it was: the new sequences are not added.
pub fn failed_step_adds_nothing<B: Backend>(s: &Setup<'_, B>) {
    let mut e = (s.engine)();
    let mut alloc = BlockAllocator::new(1024, BLOCK);
    let mut seqs = sequences(&mut alloc, &s.fixtures);
    let mut batch = Batch::default();
    e.step(&mut batch, vec![seqs.remove(0)], StepOptions::default())
        .unwrap();
    let mut bad = seqs.remove(0);
    bad.adapter = Some("not-loaded".into());
    assert!(e.step(&mut batch, vec![bad], StepOptions::default()).is_err());
    assert_eq!(batch.ids(), vec![0]);
}
