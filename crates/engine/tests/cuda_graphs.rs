//! CUDA graphs for decode steps (backend/cuda/graph.rs): decode steps replayed from captured graphs give
//! bit-identical tokens and log-probabilities to eager steps, through batches that grow, shrink, mix
//! adapters and cross context-split boundaries; and (ignored, a benchmark) the time of a decode step of a
//! Mistral-7B-shaped model with and without graphs. Without a device each test prints `SKIPPED: ...`.
#![allow(clippy::unwrap_used)]

mod common;
mod cuda_common;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use cuda_common::{backend, say};
use lorax_engine::comm::SingleRank;
use lorax_engine::kv_cache::BlockAllocator;
use lorax_engine::lora::HostAdapter;
use lorax_engine::weights::DType;
use lorax_engine::{
    Batch, CacheConfig, CudaBackend, Engine, LoadFormat, ModelConfig, NewSequence, SamplingParams, StepOptions,
};

const CACHE: CacheConfig = CacheConfig {
    num_blocks: 512,
    block_size: 16,
};

/// A Llama-architecture config.json; 32768 positions (Mistral 7B's), so that the profiler's long prompts (`p16384`)
/// fit.
fn write_config(dir: &Path, hidden: usize, ffn: usize, layers: usize, heads: usize, kv_heads: usize, vocab: usize) {
    let cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
}

/// A random rank-`r` q/k/v/o adapter (f32, `lora_B` non-zero) for `cfg`, in PEFT's layout.
fn write_adapter(dir: &Path, cfg: &ModelConfig, r: usize, seed: u64) {
    common::write_qkvo_adapter(dir, cfg, r, DType::F32, seed);
}

fn engine(dir: &Path, dtype: DType, graphs: bool, pdl: bool) -> Engine<CudaBackend> {
    let mut b = CudaBackend::new(0, dtype).unwrap();
    b.set_graphs(graphs);
    b.set_programmatic_launch(pdl);
    Engine::load_with_format(b, dir, CACHE, Arc::new(SingleRank), LoadFormat::Dummy { seed: 5 }).unwrap()
}

/// The cache of the Mistral-7B-shaped benchmarks.
const BIG_CACHE: CacheConfig = CacheConfig {
    num_blocks: 8192,
    block_size: 16,
};

/// A Mistral-7B-shaped bf16 dummy model of `layers` layers (in the returned folder), graphs on or off.
fn mistral_dummy(layers: usize, graphs: bool) -> (tempfile::TempDir, Engine<CudaBackend>) {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), 4096, 14336, layers, 32, 8, 32000);
    let b = CudaBackend::new(0, DType::BF16).unwrap();
    b.set_graphs(graphs);
    let e = Engine::load_with_format(
        b,
        dir.path(),
        BIG_CACHE,
        Arc::new(SingleRank),
        LoadFormat::Dummy { seed: 1 },
    )
    .unwrap();
    (dir, e)
}

/// Sequence `id` of the Mistral-shaped benchmarks: a `len`-token prompt of varied ids, blocks for 64 more
/// tokens, greedy, on `adapter` if any.
fn prompt(id: usize, len: usize, alloc: &mut BlockAllocator, adapter: Option<String>) -> NewSequence {
    NewSequence {
        id: id as u64,
        input_ids: (0..len as u32).map(|t| (t * 37 + id as u32 * 11) % 30000 + 3).collect(),
        block_table: alloc.allocate(len + 64).unwrap(),
        params: SamplingParams::default(),
        prefill_logprobs: false,
        prefill_top_n: 0,
        adapter,
    }
}

type Trace = Vec<(u64, u32, u32)>;

/// Every generated (sequence, token, logprob bits) of a schedule that grows, shrinks and mixes the batch.
fn schedule(e: &mut Engine<CudaBackend>, adapters: &[String]) -> Trace {
    let mut alloc = BlockAllocator::new(CACHE.num_blocks as u32, CACHE.block_size);
    let mut batch = Batch::default();
    let mut trace = Trace::new();
    let seq = |id: u64, len: usize, adapter: Option<&String>, alloc: &mut BlockAllocator| NewSequence {
        id,
        input_ids: (0..len as u32).map(|i| (i * 37 + id as u32 * 11) % 4000 + 3).collect(),
        block_table: alloc.allocate(len + 200).unwrap(),
        params: SamplingParams::default(),
        prefill_logprobs: false,
        prefill_top_n: 0,
        adapter: adapter.cloned(),
    };
    let record = |gens: Vec<lorax_engine::Generation>, trace: &mut Trace| {
        for g in gens {
            trace.push((g.id, g.choice.token, g.choice.logprob.to_bits()));
        }
    };
    // One base sequence alone (batch 1), long enough to cross attention chunk (context split) boundaries.
    let first = vec![seq(0, 230, None, &mut alloc)];
    record(e.prefill(&mut batch, first).unwrap(), &mut trace);
    for _ in 0..40 {
        record(e.decode(&mut batch).unwrap(), &mut trace);
    }
    // Three more, two with adapters: batch 4 with two segments. Adapter prompts stay within 4 tokens per
    // adapter and prefill, so their LoRA runs on the BGMV kernels (a fixed summation order) at prefill too:
    // SGMV's atomics could round differently in the two runs and part them for reasons unrelated to graphs.
    let more = vec![
        seq(1, 3, Some(&adapters[0]), &mut alloc),
        seq(2, 4, Some(&adapters[1]), &mut alloc),
        seq(3, 64, None, &mut alloc),
    ];
    record(e.prefill(&mut batch, more).unwrap(), &mut trace);
    for _ in 0..30 {
        record(e.decode(&mut batch).unwrap(), &mut trace);
    }
    // One leaves, two join (one base, one on the third adapter): batch 5, run as 8 rows (3 padding rows that
    // write no keys or values; also eagerly, so both runs compute the same products).
    batch.filter(&[0, 2, 3]);
    let late = vec![seq(4, 40, None, &mut alloc), seq(5, 2, Some(&adapters[2]), &mut alloc)];
    record(e.prefill(&mut batch, late).unwrap(), &mut trace);
    for _ in 0..30 {
        record(e.decode(&mut batch).unwrap(), &mut trace);
    }
    trace
}

/// The folder of the small test model (3 layers, 8 heads over 2 KV heads), or `None` after printing why
/// the test is skipped (no device).
fn small_model() -> Option<tempfile::TempDir> {
    backend(DType::BF16)?;
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), 512, 1024, 3, 8, 2, 4096);
    Some(dir)
}

#[test]
fn decode_steps_through_graphs_equal_eager_steps() {
    let Some(dir) = small_model() else { return };
    let cfg = ModelConfig::from_file(&dir.path().join("config.json")).unwrap();
    let keys: Vec<String> = (0..3).map(|i| format!("a{i}")).collect();
    for (i, k) in keys.iter().enumerate() {
        write_adapter(&dir.path().join(k), &cfg, [8, 16, 4][i], i as u64 + 1);
    }
    // Eager launches one after another are the reference; graphs, and kernels launched before the one ahead
    // of them has finished (programmatic dependent launch, where the device has it), must give the same bits.
    for dtype in [DType::BF16, DType::F32] {
        let mut traces = Vec::new();
        // Graph steps are recorded ahead (while the step before runs) unless `ahead` is off.
        let runs = [
            (false, false, false),
            (true, false, true),
            (false, true, false),
            (true, true, true),
            (true, true, false),
        ];
        for (graphs, pdl, ahead) in runs {
            let mut e = engine(dir.path(), dtype, graphs, pdl);
            e.backend.set_graph_ahead(ahead);
            // Steps launched by the step before's sampling serve rows of a changed batch from a batch of other
            // rows (`fed_steps_equal_steps_launched_by_the_host` and cuda_chunked test them).
            e.backend.set_graph_feed(false);
            if pdl && !e.backend.programmatic_launch() {
                say(
                    "SKIPPED programmatic dependent launch: the device or driver lacks it (sm_90 and CUDA 12.3 needed)",
                );
                continue;
            }
            for k in &keys {
                let host = HostAdapter::load(&dir.path().join(k), &cfg, 64).unwrap();
                e.load_adapter(k, &host).unwrap();
            }
            let started = Instant::now();
            let t = schedule(&mut e, &keys);
            let wall_ms = started.elapsed().as_secs_f64() * 1e3;
            let (captures, replays) = e.backend.graph_counts();
            let (timed, device_ms, gaps) = e.backend.graph_device_time();
            let ahead_replays = e.backend.graph_ahead_replays();
            let uncaptured = e.backend.graph_step_counts().uncaptured;
            say(&format!(
                "{dtype:?} graphs {graphs} pdl {pdl} ahead {ahead}: {} tokens, {captures} graphs captured, {replays} replays, {ahead_replays} of them recorded ahead, {uncaptured} steps eager before their capture",
                t.len()
            ));
            if graphs {
                assert!(
                    captures >= 3,
                    "expected graphs for batches 1, 4 and 5 (as 8), got {captures}"
                );
                // A signature is captured at its second step (LORAX_CUDA_GRAPH_CAPTURE_AFTER's default):
                // the first ran eagerly.
                assert!(
                    uncaptured >= captures,
                    "{captures} captures but only {uncaptured} eager steps before them"
                );
                assert!(replays >= 90, "only {replays} of 100 decode steps replayed a graph");
                // Each replay's graph is timed on the device once the next is launched: all but the last, each
                // taking some device time and together less than the whole schedule's.
                assert!(
                    timed + 1 >= replays && timed < replays,
                    "{timed} of {replays} replays timed"
                );
                assert!(
                    device_ms > 0.0 && device_ms * timed as f64 <= wall_ms,
                    "replays' device time {device_ms} ms x {timed} against {wall_ms} ms of steps"
                );
                // Gaps only between replays of consecutive steps: some decode steps follow one another, and
                // the first replay after a prefill follows none.
                assert!(gaps > 0 && gaps < timed, "{gaps} gaps timed of {timed} replays");
                assert_eq!(replays + uncaptured, 100, "every decode step replays or runs eagerly");
                if ahead {
                    // Every decode step but the first after each prefill (3), those that capture and those
                    // that ran eagerly before a capture.
                    assert!(
                        ahead_replays + captures + uncaptured + 3 >= 100,
                        "only {ahead_replays} of 100 decode steps replayed a step recorded ahead ({captures} captures, {uncaptured} eager)"
                    );
                } else {
                    assert_eq!(ahead_replays, 0);
                }
            } else {
                assert_eq!((captures, replays, ahead_replays, uncaptured), (0, 0, 0, 0));
            }
            traces.push(t);
        }
        for (i, t) in traces.iter().enumerate().skip(1) {
            assert_eq!(traces[0].len(), t.len());
            let same = traces[0].iter().zip(t).filter(|(a, b)| a == b).count();
            assert_eq!(
                same,
                traces[0].len(),
                "{dtype:?}: run {i} (graphs/pdl) differs from eager steps at {} of {} tokens",
                traces[0].len() - same,
                traces[0].len()
            );
        }
    }
}

/// Decode steps launched on the device by the step before's sampling, their token ids gathered there from its
/// output, give the bits of steps launched by the host once it has the tokens: while the batch stays (each step
/// served whole by the one launched ahead) and after it shrinks within its row bucket (the rows of the step
/// launched for eight sequences serve six). Two sequences take an adapter, so that a step's rows are not in the
/// sequences' order (base rows first): each token must go to its own sequence's row.
#[test]
fn fed_steps_equal_steps_launched_by_the_host() {
    let Some(dir) = small_model() else { return };
    let cfg = ModelConfig::from_file(&dir.path().join("config.json")).unwrap();
    write_adapter(&dir.path().join("a0"), &cfg, 8, 3);
    for dtype in [DType::BF16, DType::F32] {
        let mut traces = Vec::new();
        for feed in [false, true] {
            let mut e = engine(dir.path(), dtype, true, false);
            e.backend.set_graph_feed(feed);
            let host = HostAdapter::load(&dir.path().join("a0"), &cfg, 64).unwrap();
            e.load_adapter("a0", &host).unwrap();
            let mut alloc = BlockAllocator::new(CACHE.num_blocks as u32, CACHE.block_size);
            let mut batch = Batch::default();
            // Sequences 1 and 4 on the adapter, with prompts of 3 tokens (their prefill LoRA on BGMV, a fixed
            // summation order, as the decode steps').
            let seqs = (0..8u64)
                .map(|id| {
                    let (len, adapter) = if id == 1 || id == 4 {
                        (3, Some("a0".to_string()))
                    } else {
                        (20 + 7 * id as u32, None)
                    };
                    NewSequence {
                        id,
                        input_ids: (0..len).map(|i| (i * 37 + id as u32 * 11) % 4000 + 3).collect(),
                        block_table: alloc.allocate(len as usize + 64).unwrap(),
                        params: SamplingParams::default(),
                        prefill_logprobs: false,
                        prefill_top_n: 0,
                        adapter,
                    }
                })
                .collect();
            let mut trace = Trace::new();
            let mut record = |gens: Vec<lorax_engine::Generation>| {
                for g in gens {
                    trace.push((g.id, g.choice.token, g.choice.logprob.to_bits()));
                }
            };
            record(e.prefill(&mut batch, seqs).unwrap());
            for _ in 0..30 {
                record(e.decode(&mut batch).unwrap());
            }
            batch.filter(&[0, 1, 3, 5, 6, 7]);
            for _ in 0..20 {
                record(e.decode(&mut batch).unwrap());
            }
            let c = e.feed_counts();
            let fed = e.backend.graph_fed_replays();
            let (_, device_ms, gaps) = e.backend.graph_device_time();
            say(&format!(
                "{dtype:?} feed {feed}: {} tokens, {fed} replays launched by the step before, {c:?}, graphs {device_ms:.3} ms on the device, {gaps} gaps timed",
                trace.len()
            ));
            if feed {
                // Steps 1-2 run eagerly and capture; from the third each step launches the next. Right after the
                // shrink, one step takes six rows of eight; its own launch ahead is recorded for a new shape.
                assert_eq!(fed, c.launched, "launches counted by the engine and by the graphs");
                assert!(
                    c.whole >= 40,
                    "only {} of 50 steps served whole by the step before: {c:?}",
                    c.whole
                );
                assert_eq!((c.part, c.dropped), (1, 0), "{c:?}");
                assert!(gaps > 0, "no gap between fed replays timed");
            } else {
                assert_eq!((fed, c), (0, lorax_engine::FeedCounts::default()));
            }
            traces.push(trace);
        }
        assert_eq!(traces[0].len(), traces[1].len());
        let differ = traces[0].iter().zip(&traces[1]).filter(|(a, b)| a != b).count();
        assert_eq!(
            differ,
            0,
            "{dtype:?}: fed steps differ from steps launched by the host at {differ} of {} tokens",
            traces[0].len()
        );
    }
}

/// Steps whose rows all take one adapter, the adapter changing between phases (a0, a1, a0 again, three rows
/// each): with the LoRA shrink inside the q/k/v and o GEMMs, each change copies the adapter's `lora_A` rows
/// past the weights before the step, while the step is recorded, also when it then replays the graph
/// captured for the other adapter (the same launches, so the same signature: one graph a run). Each phase's
/// prefill has a fourth sequence on the other adapter (two adapters: no copy there), which leaves before the
/// decode steps, so the copies happen in the decode steps' recordings. Tokens equal eager steps', bit for
/// bit, with graphs recorded ahead and not; the shrink ran in the GEMMs and the rows were copied at each
/// change.
#[test]
fn one_adapter_steps_through_graphs_equal_eager_steps() {
    let Some(dir) = small_model() else { return };
    let cfg = ModelConfig::from_file(&dir.path().join("config.json")).unwrap();
    let keys: Vec<String> = (0..2).map(|i| format!("a{i}")).collect();
    for (i, k) in keys.iter().enumerate() {
        write_adapter(&dir.path().join(k), &cfg, [16, 8][i], i as u64 + 7);
    }
    for dtype in [DType::BF16, DType::F32] {
        let mut traces = Vec::new();
        for (graphs, ahead) in [(false, false), (true, false), (true, true)] {
            let mut e = engine(dir.path(), dtype, graphs, true);
            e.backend.set_graph_ahead(ahead);
            // The counts below are of passes the host launches; steps launched by the step before's sampling
            // (the default) are `fed_steps_equal_steps_launched_by_the_host`'s, adapters included.
            e.backend.set_graph_feed(false);
            for k in &keys {
                let host = HostAdapter::load(&dir.path().join(k), &cfg, 64).unwrap();
                e.load_adapter(k, &host).unwrap();
            }
            let mut alloc = BlockAllocator::new(CACHE.num_blocks as u32, CACHE.block_size);
            let mut batch = Batch::default();
            let mut trace = Trace::new();
            for (phase, adapter) in [0usize, 1, 0].into_iter().enumerate() {
                batch.filter(&[]);
                // Prompts of 3 tokens of the small model's vocabulary (4096), blocks for 40 tokens; the fourth
                // on the other adapter.
                let news = (0..4u64)
                    .map(|i| NewSequence {
                        id: 10 * phase as u64 + i,
                        input_ids: (0..3u32)
                            .map(|t| (t * 37 + i as u32 * 11 + phase as u32 * 5) % 4000 + 3)
                            .collect(),
                        block_table: alloc.allocate(40).unwrap(),
                        params: SamplingParams::default(),
                        prefill_logprobs: false,
                        prefill_top_n: 0,
                        adapter: Some(keys[if i < 3 { adapter } else { 1 - adapter }].clone()),
                    })
                    .collect();
                let mut gens = e.prefill(&mut batch, news).unwrap();
                let first = 10 * phase as u64;
                batch.filter(&[first, first + 1, first + 2]);
                assert_eq!(batch.len(), 3);
                for _ in 0..20 {
                    gens.extend(e.decode(&mut batch).unwrap());
                }
                trace.extend(gens.iter().map(|g| (g.id, g.choice.token, g.choice.logprob.to_bits())));
            }
            let (steps, copies) = e.backend.lora_in_gemm_counts();
            let (captures, replays) = e.backend.graph_counts();
            say(&format!(
                "{dtype:?} graphs {graphs} ahead {ahead}: {} tokens, {steps} passes with the shrink in the GEMMs, \
                 {copies} copies of lora_A rows, {captures} graphs captured, {replays} replays",
                trace.len()
            ));
            assert!(
                steps >= 60,
                "only {steps} of 60 decode steps took the shrink in the GEMMs"
            );
            // Two groups (q/k/v and o), rows copied at each phase's first decode step.
            assert_eq!(copies, 6, "copies of lora_A rows");
            if graphs {
                assert_eq!(captures, 1, "one graph for the steps of either adapter");
                assert!(replays >= 55, "only {replays} of 60 decode steps replayed a graph");
            }
            traces.push(trace);
        }
        for (i, t) in traces.iter().enumerate().skip(1) {
            assert_eq!(&traces[0], t, "{dtype:?}: run {i} differs from eager steps");
        }
    }
}

/// One stream decoding far (220 tokens from a 30-token prompt, across three 64-token attention chunks) keeps
/// one graph: a batch smaller than a wave launches its attention with the same splits whatever its context
/// (`split_plan`), so the step's signature does not change at each chunk. Before, the grid had a split a
/// chunk, and each chunk's first step ran eagerly and its second captured a graph. Tokens equal eager steps'.
#[test]
fn a_single_stream_keeps_its_graph_as_its_context_grows() {
    let Some(dir) = small_model() else { return };
    let steps = 220;
    let mut traces = Vec::new();
    for graphs in [false, true] {
        let mut e = engine(dir.path(), DType::BF16, graphs, true);
        e.backend.set_graph_feed(true);
        let mut alloc = BlockAllocator::new(CACHE.num_blocks as u32, CACHE.block_size);
        let mut batch = Batch::default();
        let seq = NewSequence {
            id: 7,
            input_ids: (0..30u32).map(|i| (i * 37) % 4000 + 3).collect(),
            block_table: alloc.allocate(30 + steps + 1).unwrap(),
            params: SamplingParams::default(),
            prefill_logprobs: false,
            prefill_top_n: 0,
            adapter: None,
        };
        let mut trace = Trace::new();
        let record = |gens: Vec<lorax_engine::Generation>, trace: &mut Trace| {
            for g in gens {
                trace.push((g.id, g.choice.token, g.choice.logprob.to_bits()));
            }
        };
        record(e.prefill(&mut batch, vec![seq]).unwrap(), &mut trace);
        for _ in 0..steps {
            record(e.decode(&mut batch).unwrap(), &mut trace);
        }
        let c = e.backend.graph_step_counts();
        say(&format!(
            "one stream, {steps} decode steps from position 30, graphs {graphs}: {} captures, {} replays, {} eager before a capture",
            c.captures, c.replays, c.uncaptured
        ));
        if graphs {
            assert_eq!(
                (c.captures, c.uncaptured),
                (1, 1),
                "the stream's graph was captured again as its context grew"
            );
            // From the second step on each step launches the next (`set_graph_feed`), the last one a step
            // past the schedule's end.
            assert!(
                c.fed_replays + 2 >= steps as u64,
                "only {} steps launched by the step before",
                c.fed_replays
            );
            assert_eq!(c.replays, steps as u64 - 1 + u64::from(c.fed_replays > 0));
        }
        traces.push(trace);
    }
    assert_eq!(traces[0], traces[1], "graph steps gave other tokens than eager steps");
}

/// A batch that shrinks as its requests finish (128 sequences, 6 leaving every decode step, as at the end
/// of a benchmark's run): nearly every step has a row count, and so a signature, of its own. Timed with
/// each graph captured at its first step (`LORAX_CUDA_GRAPH_CAPTURE_AFTER=1`, the behaviour before
/// session 27) and at its second (the default), from no graphs each time, twice in turn; the tokens are
/// the same either way (run with `--ignored --nocapture`).
#[test]
#[ignore = "benchmark: needs a GPU with 32 GB free; run with --ignored --nocapture"]
fn a_shrinking_batch_with_and_without_captures_at_first_sight() {
    if backend(DType::BF16).is_none() {
        return;
    }
    let (_dir, mut e) = mistral_dummy(32, true);
    let cache = BIG_CACHE;
    let (rows, leave) = (128usize, 6usize);
    let mut traces: Vec<(usize, Trace)> = Vec::new();
    // Steps launched by the step before's sampling would serve the shrunken batch's rows from the larger batch's
    // graph, at steps that differ between the two capture settings: bits would not compare.
    e.backend.set_graph_feed(false);
    for after in [1usize, 2, 1, 2] {
        e.backend.clear_graphs().unwrap();
        e.backend.set_graph_capture_after(after);
        let (c0, _) = e.backend.graph_counts();
        let u0 = e.backend.graph_step_counts().uncaptured;
        let mut alloc = BlockAllocator::new(cache.num_blocks as u32, cache.block_size);
        let mut batch = Batch::default();
        for chunk in (0..rows).collect::<Vec<_>>().chunks(32) {
            let news = chunk.iter().map(|&i| prompt(i, 512, &mut alloc, None)).collect();
            e.prefill(&mut batch, news).unwrap();
        }
        let mut trace = Trace::new();
        let t = Instant::now();
        let mut steps = 0;
        while !batch.ids().is_empty() {
            for g in e.decode(&mut batch).unwrap() {
                trace.push((g.id, g.choice.token, g.choice.logprob.to_bits()));
            }
            steps += 1;
            let keep: Vec<u64> = batch.ids().into_iter().skip(leave).collect();
            batch.filter(&keep);
        }
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let (c1, _) = e.backend.graph_counts();
        let u1 = e.backend.graph_step_counts().uncaptured;
        say(&format!(
            "BENCH shrinking batch {rows} -> 0 ({leave} leave a step), graphs captured at step {after} of their \
             signature: {steps} decode steps in {ms:.1} ms ({:.2} ms a step), {} captures, {} steps eager before \
             a capture",
            ms / steps as f64,
            c1 - c0,
            u1 - u0
        ));
        // The setting took: eager steps before captures only when capturing at the second step.
        if after == 1 {
            assert_eq!(u1 - u0, 0, "capturing at once ran {} steps eagerly", u1 - u0);
        } else {
            assert!(u1 > u0, "capturing at the second step ran no step eagerly");
        }
        traces.push((after, trace));
    }
    for (after, t) in &traces[1..] {
        assert_eq!(
            t, &traces[0].1,
            "capturing at step {after} gave other tokens than capturing at once"
        );
    }
}

/// Milliseconds per decode step of a Mistral-7B-shaped bf16 dummy model at several batch sizes, eager and
/// through graphs, against the weight + KV bytes over 4.2 TB/s (run with `--ignored --nocapture`).
#[test]
#[ignore = "benchmark: needs a GPU with 32 GB free; run with --ignored --nocapture"]
fn decode_step_time_with_and_without_graphs() {
    if backend(DType::BF16).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), 4096, 14336, 32, 32, 8, 32000);
    let cache = CacheConfig {
        num_blocks: 8192,
        block_size: 16,
    };
    let weight_bytes = 2.0
        * (2.0 * 32000.0 * 4096.0 + 32.0 * (2.0 * 4096.0 * 4096.0 + 2.0 * 4096.0 * 1024.0 + 3.0 * 4096.0 * 14336.0));
    for (graphs, pdl, ahead) in [
        (false, false, false),
        (true, false, true),
        (true, true, false),
        (true, true, true),
    ] {
        let mut b = CudaBackend::new(0, DType::BF16).unwrap();
        b.set_graphs(graphs);
        b.set_graph_ahead(ahead);
        b.set_programmatic_launch(pdl);
        if pdl && !b.programmatic_launch() {
            say("SKIPPED programmatic dependent launch: the device or driver lacks it");
            continue;
        }
        let mut e = Engine::load_with_format(
            b,
            dir.path(),
            cache,
            Arc::new(SingleRank),
            LoadFormat::Dummy { seed: 1 },
        )
        .unwrap();
        for batch_size in [1usize, 8, 32, 128] {
            let mut alloc = BlockAllocator::new(cache.num_blocks as u32, cache.block_size);
            let mut batch = Batch::default();
            let news = (0..batch_size).map(|i| prompt(i, 512, &mut alloc, None)).collect();
            e.prefill(&mut batch, news).unwrap();
            for _ in 0..4 {
                e.decode(&mut batch).unwrap();
            }
            let steps = 48;
            let t = Instant::now();
            for _ in 0..steps {
                e.decode(&mut batch).unwrap();
            }
            let ms = t.elapsed().as_secs_f64() * 1e3 / f64::from(steps);
            let kv = batch_size as f64 * 540.0 * 32.0 * 2.0 * 1024.0 * 2.0;
            let roof_ms = (weight_bytes + kv) / 4.2e12 * 1e3;
            say(&format!(
                "BENCH decode_step graphs={graphs} pdl={pdl} ahead={ahead} batch={batch_size}: {ms:.3} ms/step ({:.0} tok/s), roofline {roof_ms:.3} ms ({:.0}%)",
                batch_size as f64 / ms * 1e3,
                roof_ms / ms * 100.0
            ));
        }
        let (c, r) = e.backend.graph_counts();
        say(&format!(
            "graphs={graphs} pdl={pdl} ahead={ahead}: {c} captured, {r} replays, {} recorded ahead",
            e.backend.graph_ahead_replays()
        ));
    }
}

/// One line on a pass's marks (`LORAX_CUDA_MARKS=1`): device and host ms since the pass's start at the
/// embedding, the first and the last layer and the head; the layers' device times (median and largest);
/// and the marks where the device had caught up with the host (device time within 20 us of the host's):
/// there the device waited for launches.
fn marks_summary(marks: &[(&str, f64, f64)]) -> String {
    let at = |what: &str| marks.iter().find(|m| m.0 == what).copied();
    let layers: Vec<(f64, f64)> = marks.iter().filter(|m| m.0 == "layer").map(|m| (m.1, m.2)).collect();
    let mut spans: Vec<f64> = Vec::new();
    let mut prev = at("embedding").map_or(0.0, |m| m.1);
    for &(d, _) in &layers {
        spans.push(d - prev);
        prev = d;
    }
    spans.sort_by(f64::total_cmp);
    let fmt = |m: Option<(f64, f64)>| m.map_or("-".to_string(), |(d, h)| format!("{d:.3}/{h:.3}"));
    let caught = marks.iter().skip(1).filter(|m| m.1 - m.2 < 0.02).count();
    format!(
        "device/host ms: embedding {}, first layer {}, last layer {}, head {}; layer device ms median {:.3} max {:.3}          (sum {:.3} over {}); {caught} of {} marks with the device caught up with the host",
        fmt(at("embedding").map(|m| (m.1, m.2))),
        fmt(layers.first().copied()),
        fmt(layers.last().copied()),
        fmt(at("head").map(|m| (m.1, m.2))),
        spans.get(spans.len() / 2).copied().unwrap_or(0.0),
        spans.last().copied().unwrap_or(0.0),
        spans.iter().sum::<f64>(),
        spans.len(),
        marks.len() - 1,
    )
}

/// Eager steps of a Mistral-7B-shaped bf16 dummy model (`LORAX_PROFILE_LAYERS` layers, default 2),
/// bracketed by `cuProfilerStart`/`Stop` so that a profiler started with `--profile-from-start off` sees
/// only their kernels: `scripts/gpu/kernel_profile.sh` runs it under Nsight Compute and sums the time per
/// kernel. `LORAX_PROFILE_SCENARIO` picks the step: `b<rows>` (decode steps of that many rows),
/// `p<len>` (each step the whole prompt of a new `len`-token sequence) or `m<rows>` (mixed steps, as the
/// server runs them while prompts arrive: `rows` decode rows plus four new 512-token prompts, 2048 prompt
/// tokens; `m0` is those prompts alone; `m<rows>x<k>` has k prompts, as a step under a backlog runs); a
/// suffix `-identical` gives every sequence one rank-16 q/k/v/o adapter, `-distinct` one adapter each
/// (128 at most), `-a<n>` n adapters round-robin, and a further `-all` adapters of every linear layer (the
/// MLP's gate/up/down too). Decode rows come from 512-token prompts and 4 steps of
/// warm-up, then
/// `LORAX_PROFILE_STEPS` (default 2) profiled steps (`LORAX_PROFILE_GRAPHS=1`: decode steps through graphs,
/// captured in the warm-up). Each profiled step's wall time (synchronised) and host
/// time up to its launch are printed (`STEP ...`), which is the figure to read when no profiler is attached
/// (`LORAX_PROFILE_LAYERS=32` gives the whole model's step).
#[test]
#[ignore = "profiling aid: run under ncu --profile-from-start off (scripts/gpu/kernel_profile.sh)"]
fn decode_step_kernels_for_a_profiler() {
    if backend(DType::BF16).is_none() {
        return;
    }
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
    let layers: usize = env("LORAX_PROFILE_LAYERS", "2").parse().unwrap();
    let steps: usize = env("LORAX_PROFILE_STEPS", "2").parse().unwrap();
    let scenario = env("LORAX_PROFILE_SCENARIO", "b1");
    let (shape, kind) = scenario.split_once('-').unwrap_or((&scenario, "base"));
    let (kind, mlp) = kind.strip_suffix("-all").map_or((kind, false), |k| (k, true));
    let (what, n) = shape.split_at(1);
    let (n, m) = n.split_once('x').unwrap_or((n, "4"));
    let (n, m): (usize, usize) = (n.parse().unwrap(), m.parse().unwrap());
    // Decode rows in the batch, and new prompts (with their length) per profiled step.
    let (rows, prompts, prompt_len) = match what {
        "b" => (n, 0, 0),
        "p" => (0, 1, n),
        "m" => (n, m, 512),
        other => panic!("unknown scenario shape {other}"),
    };
    let adapters = match kind {
        "base" => 0,
        "identical" => 1,
        "distinct" => (rows + prompts * steps).clamp(1, 128),
        other => match other.strip_prefix('a').and_then(|n| n.parse::<usize>().ok()) {
            Some(n) if n > 0 => n,
            _ => panic!("unknown scenario kind {other}"),
        },
    };
    let (dir, mut e) = mistral_dummy(layers, env("LORAX_PROFILE_GRAPHS", "0") == "1");
    let cfg = ModelConfig::from_file(&dir.path().join("config.json")).unwrap();
    let cache = BIG_CACHE;
    let keys: Vec<String> = (0..adapters).map(|i| format!("a{i}")).collect();
    for (i, k) in keys.iter().enumerate() {
        // Every linear layer's adapters in bf16 (84 MB each for 32 layers; f32 would write twice that).
        let dtype = if mlp { DType::BF16 } else { DType::F32 };
        common::write_adapter_of(&dir.path().join(k), &cfg, 16, dtype, i as u64 + 1, mlp);
        let host = HostAdapter::load(&dir.path().join(k), &cfg, 64).unwrap();
        e.load_adapter(k, &host).unwrap();
    }
    let mut alloc = BlockAllocator::new(cache.num_blocks as u32, cache.block_size);
    let mut batch = Batch::default();
    let mut new_seq = |id: usize, len: usize| {
        prompt(
            id,
            len,
            &mut alloc,
            (!keys.is_empty()).then(|| keys[id % keys.len()].clone()),
        )
    };
    for chunk in (0..rows).collect::<Vec<_>>().chunks(16) {
        let news = chunk.iter().map(|&i| new_seq(i, 512)).collect();
        e.prefill(&mut batch, news).unwrap();
    }
    let mut next_id = rows;
    let mut run = |e: &mut Engine<CudaBackend>, batch: &mut Batch| {
        let news: Vec<NewSequence> = (next_id..next_id + prompts).map(|i| new_seq(i, prompt_len)).collect();
        next_id += prompts;
        let opts = StepOptions {
            decode: rows > 0,
            max_prompt_tokens: (prompts > 0 && rows > 0).then_some(prompts * prompt_len),
        };
        e.step(batch, news, opts).unwrap();
    };
    // Warm-up: decode steps for the decode rows; for prompts, one step of each kind as profiled.
    for _ in 0..4 {
        if rows > 0 {
            e.decode(&mut batch).unwrap();
        }
    }
    if prompts > 0 {
        run(&mut e, &mut batch);
    }
    e.backend.synchronize().unwrap();
    let host_us = |e: &Engine<CudaBackend>| {
        let t = if prompts > 0 {
            e.prompt_times()
        } else {
            e.decode_times()
        };
        (t.steps, t.forward)
    };
    // SAFETY: plain driver calls on the current context; without a profiler attached they do nothing.
    unsafe { cudarc::driver::sys::cuProfilerStart() };
    for i in 0..steps {
        let (n0, f0) = host_us(&e);
        let t = Instant::now();
        run(&mut e, &mut batch);
        e.backend.synchronize().unwrap();
        let wall = t.elapsed();
        let (n1, f1) = host_us(&e);
        let host = if n1 > n0 {
            format!("{:.0}", (f1 - f0).as_secs_f64() * 1e6)
        } else {
            "?".into()
        };
        say(&format!(
            "STEP {scenario} {i}: {:.3} ms wall (synchronised), {host} us host time up to the launch",
            wall.as_secs_f64() * 1e3
        ));
        let marks = e.backend.take_marks().unwrap();
        if !marks.is_empty() {
            say(&format!("MARKS {scenario} {i}: {}", marks_summary(&marks)));
        }
    }
    e.backend.synchronize().unwrap();
    unsafe { cudarc::driver::sys::cuProfilerStop() };
    say(&format!(
        "PROFILED {scenario}: {steps} eager steps, {rows} decode rows, {prompts} new prompt(s) of {prompt_len} tokens \
         each, {layers} layers, {adapters} adapters"
    ));
}
