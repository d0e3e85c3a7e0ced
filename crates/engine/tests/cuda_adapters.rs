//! Adapter uploads on the GPU ([`Backend::upload_many`]: a pinned staging buffer, one allocation, one
//! copy on the backend's upload stream): every tensor equals its [`Backend::weight`] upload bit for bit
//! for f32, bf16 and f16 sources on every storage type, and the staging buffers are kept between uploads
//! but one of more than 512 MiB is unpinned after its upload; an adapter uploaded while its file is read
//! ([`Backend::begin_file_upload`]) equals the same adapter uploaded after the read, bit for bit, with
//! the times of both ways on a cold 27 MB file; then, on a Mistral-7B-shaped model with dummy
//! weights, the time of a 27 MB rank-16 q/k/v/o adapter's upload (and of the per-tensor uploads it
//! replaces), and decode steps run while uploads run on another thread: their tokens equal those of
//! the same steps without uploads, bit for bit (CUDA graphs captured meanwhile included), and their
//! times are printed beside. Without a device each test prints `SKIPPED: ...`.
#![allow(clippy::unwrap_used)]

mod common;
mod cuda_common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use cuda_common::{backend, bench, median, say, Rng};
use lorax_engine::comm::SingleRank;
use lorax_engine::kv_cache::BlockAllocator;
use lorax_engine::lora::{DeviceAdapter, HostAdapter, PieceSink};
use lorax_engine::weights::{DType, HostTensor};
use lorax_engine::{Backend, Batch, CacheConfig, CudaBackend, Engine, LoadFormat, NewSequence, SamplingParams};

/// `count` tensors of random shapes (an empty one first) and source dtypes, values in [-3, 3).
fn random_tensors(rng: &mut Rng, count: usize) -> Vec<HostTensor<'static>> {
    (0..count)
        .map(|i| {
            let shape = if i == 0 {
                vec![0, 16]
            } else {
                vec![1 + rng.below(64), 1 + rng.below(4096)]
            };
            let values = rng.vec(shape.iter().product(), -3.0, 3.0);
            lorax_engine::weights::HostTensor::from_values(
                &format!("t{i}"),
                [DType::F32, DType::BF16, DType::F16][i % 3],
                shape,
                &values,
            )
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn upload_many_equals_weight_bit_for_bit() {
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        let Some(g) = backend(dtype) else { return };
        let mut rng = Rng(cuda_common::seed("upload_many"));
        // A small set, the same again (the staging buffer reused), then a set several times larger
        // (the staging buffer grown).
        let small = random_tensors(&mut rng, 12);
        let large = random_tensors(&mut rng, 40);
        for (what, tensors) in [("small", &small), ("small again", &small), ("large", &large)] {
            let many = g.upload_many(tensors).unwrap();
            assert_eq!(many.len(), tensors.len());
            for (t, d) in tensors.iter().zip(&many) {
                assert_eq!(g.shape(d), t.shape.as_slice());
                let got = g.to_f32(d).unwrap();
                let want = g.to_f32(&g.weight(t).unwrap()).unwrap();
                assert_eq!(bits(&got), bits(&want), "{dtype:?} {what}: {}", t.name);
                assert_eq!(
                    bits(&got),
                    bits(&cuda_common::round(dtype, &t.to_f32())),
                    "{dtype:?} {what}: {}",
                    t.name
                );
            }
        }
        assert!(g.upload_many(&[]).unwrap().is_empty());
        assert!(
            g.upload_staging_bytes() > 0,
            "the staging buffer is kept between uploads"
        );
        if dtype == DType::BF16 {
            // A 600 MiB upload pins a staging buffer past what is kept: unpinned after it (the smaller
            // buffers kept before stay), and a small upload after that uses a small one.
            let before = g.upload_staging_bytes();
            let huge = HostTensor::from_values("huge", DType::BF16, vec![300 << 10, 1 << 10], &vec![0.5; 300 << 20]);
            let up = g.upload_many(std::slice::from_ref(&huge)).unwrap();
            assert_eq!(g.shape(&up[0]), huge.shape.as_slice());
            assert_eq!(
                g.upload_staging_bytes(),
                before,
                "a 600 MiB staging buffer stayed pinned"
            );
            let again = g.upload_many(&small).unwrap();
            assert_eq!(
                bits(&g.to_f32(&again[1]).unwrap()),
                bits(&g.to_f32(&g.weight(&small[1]).unwrap()).unwrap())
            );
            let kept = g.upload_staging_bytes();
            assert!(kept > 0 && kept < 64 << 20, "{kept} bytes pinned after a small upload");
        }
        say(&format!(
            "  {dtype:?}: upload_many equals weight on {} tensors",
            small.len() * 2 + large.len()
        ));
    }
}

/// The Mistral-7B-shaped rank-16 q/k/v/o adapter of the cold-load benchmark (27 MB in bf16), uploaded
/// while its file is read, equals the same adapter uploaded after the read, bit for bit: a bf16 file on a
/// bf16 backend (used where it lies), and a file of another type, converted on the device (f16 on bf16, as
/// the benchmark's adapters; bf16 on f32). Then, on the bf16 backend, the median times of both ways from a
/// cold file (dropped from the page cache before each) and a cached one, for each file type.
#[test]
fn file_uploads_equal_uploads_after_the_read() {
    if let Err(why) = CudaBackend::probe() {
        say(&format!("SKIPPED: no CUDA device ({why})"));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::mistral_7b(dir.path());
    for (backend_type, file_type) in [
        (DType::BF16, DType::BF16),
        (DType::BF16, DType::F16),
        (DType::F32, DType::BF16),
    ] {
        let Some(g) = backend(backend_type) else { return };
        let adapter = dir.path().join(format!("adapter-{file_type:?}"));
        if !adapter.exists() {
            common::write_qkvo_adapter(&adapter, &cfg, 16, file_type, 7);
        }
        let file = adapter.join("adapter_model.safetensors");
        let beside = || {
            let up = g.begin_file_upload().expect("the CUDA backend uploads while reading");
            let host = HostAdapter::load_with(&adapter, &cfg, 64, Some(&*up as &dyn PieceSink)).unwrap();
            let device = DeviceAdapter::from_file_upload(&g, &host, up);
            (host, device)
        };
        let after = || {
            let host = HostAdapter::load(&adapter, &cfg, 64).unwrap();
            DeviceAdapter::upload(&g, &host, 0, 1, (0, 1)).unwrap()
        };
        let (host, streamed) = beside();
        let uploaded = DeviceAdapter::upload(&g, &host, 0, 1, (0, 1)).unwrap();
        let streamed = streamed.unwrap_or_else(|e| panic!("{file_type:?} file on {backend_type:?}: {e}"));
        let pairs = common::assert_same_adapter(&g, &streamed, &uploaded);
        assert_eq!(pairs, 4 * cfg.num_layers);
        say(&format!(
            "  {file_type:?} file on a {backend_type:?} backend: {pairs} pairs uploaded while read equal upload_many's"
        ));
        if backend_type != DType::BF16 {
            continue;
        }
        for cold in [true, false] {
            let (mut t_beside, mut t_after) = (Vec::new(), Vec::new());
            for _ in 0..9 {
                for (way, times) in [(0, &mut t_beside), (1, &mut t_after)] {
                    if cold {
                        common::drop_cached(&file);
                    }
                    let t = Instant::now();
                    if way == 0 {
                        beside().1.unwrap();
                    } else {
                        after();
                    }
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            say(&format!(
                "BENCH adapter read + upload, {} {file_type:?} file on bf16 (median of 9): beside the read {:.2} ms, \
                 after the read {:.2} ms",
                if cold { "cold" } else { "cached" },
                median(t_beside),
                median(t_after)
            ));
        }
    }
}

const CACHE: CacheConfig = CacheConfig {
    num_blocks: 512,
    block_size: 16,
};
const SEQS: usize = 32;
const STEPS: usize = 60;

/// Prefills `SEQS` base-model sequences, then decodes `STEPS` steps, one sequence leaving at steps 20
/// and 40 (new batch sizes: graphs captured mid-run). Returns every token and logprob's bits, and the
/// milliseconds of each decode step.
fn decode_run(e: &mut Engine<CudaBackend>, tables: &[Vec<u32>]) -> (Vec<(u64, u32, u32)>, Vec<f64>) {
    let mut batch = Batch::default();
    let news = tables
        .iter()
        .enumerate()
        .map(|(i, t)| NewSequence {
            id: i as u64,
            input_ids: (0..32u32).map(|j| (j * 37 + i as u32 * 11) % 30000 + 3).collect(),
            block_table: t.clone(),
            params: SamplingParams::default(),
            prefill_logprobs: false,
            adapter: None,
        })
        .collect();
    let mut trace = Vec::new();
    let mut record = |gens: Vec<lorax_engine::Generation>| {
        trace.extend(
            gens.into_iter()
                .map(|g| (g.id, g.choice.token, g.choice.logprob.to_bits())),
        );
    };
    record(e.prefill(&mut batch, news).unwrap());
    let mut times = Vec::with_capacity(STEPS);
    for step in 0..STEPS {
        if step == 20 || step == 40 {
            let keep: Vec<u64> = batch.ids().into_iter().skip(1).collect();
            batch.filter(&keep);
        }
        let t = Instant::now();
        let gens = e.decode(&mut batch).unwrap();
        times.push(t.elapsed().as_secs_f64() * 1e3);
        record(gens);
    }
    (trace, times)
}

type Uploaded = (Vec<f64>, Option<lorax_engine::lora::DeviceAdapter<CudaBackend>>);

/// [`decode_run`] while another thread uploads `host` again and again (at least once); also returns the
/// milliseconds of each upload and the last adapter uploaded.
fn decode_run_during_uploads(
    e: &mut Engine<CudaBackend>,
    tables: &[Vec<u32>],
    host: &Arc<HostAdapter>,
) -> (Vec<(u64, u32, u32)>, Vec<f64>, Uploaded) {
    let stop = Arc::new(AtomicBool::new(false));
    let (flag, up, shared) = (Arc::clone(&stop), e.adapter_uploader(), Arc::clone(host));
    let worker = std::thread::spawn(move || {
        let mut times = Vec::new();
        let mut last = None;
        while !flag.load(Ordering::Relaxed) || last.is_none() {
            let t = Instant::now();
            last = Some(up.upload(&shared).unwrap());
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        (times, last)
    });
    let (trace, times) = decode_run(e, tables);
    stop.store(true, Ordering::Relaxed);
    (trace, times, worker.join().unwrap())
}

fn summary(times: &[f64]) -> String {
    let max = times.iter().copied().fold(0.0, f64::max);
    format!(
        "p50 {:.2} ms, max {max:.2} ms over {} steps",
        median(times.to_vec()),
        times.len()
    )
}

#[test]
fn adapter_upload_time_and_decode_alongside_uploads() {
    if backend(DType::BF16).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::mistral_7b(dir.path());
    let adapter_dir = dir.path().join("adapter");
    common::write_qkvo_adapter(&adapter_dir, &cfg, 16, DType::BF16, 7);
    let t = Instant::now();
    let host = Arc::new(HostAdapter::load(&adapter_dir, &cfg, 64).unwrap());
    bench(
        "adapter_parse",
        t.elapsed().as_secs_f64() * 1e3,
        "ms",
        &format!(
            "HostAdapter::load, Mistral-7B rank-16 q/k/v/o bf16, {} bytes (first read)",
            host.bytes
        ),
    );
    let b = CudaBackend::new(0, DType::BF16).unwrap();
    let mut e = Engine::load_with_format(
        b,
        dir.path(),
        CACHE,
        Arc::new(SingleRank),
        LoadFormat::Dummy { seed: 3 },
    )
    .unwrap();
    let uploader = e.adapter_uploader();

    // On an idle GPU: per-tensor `weight` uploads (the path before upload_many), then upload_many.
    let g = Arc::clone(&e.backend);
    let mut per_tensor = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let mut kept = Vec::new();
        for pair in host.layers.iter().flatten().flatten() {
            kept.push(g.weight(&pair.a.view()).unwrap());
            kept.push(g.weight(&pair.b.view()).unwrap());
        }
        g.synchronize().unwrap();
        per_tensor.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mut batched = Vec::new();
    for _ in 0..6 {
        let t = Instant::now();
        let d = uploader.upload(&host).unwrap();
        batched.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(d.bytes, host.bytes);
    }
    say(&format!(
        "  upload_many times (ms, the first pins the staging buffer): {batched:.2?}"
    ));
    bench(
        "adapter_upload_per_tensor",
        median(per_tensor),
        "ms",
        "512 weight() calls + synchronize, 27 MB bf16, idle GPU (the path before upload_many)",
    );
    bench(
        "adapter_upload",
        median(batched[1..].to_vec()),
        "ms",
        "AdapterUploader::upload (one upload_many), 27 MB bf16, idle GPU, staging buffer warm",
    );

    // The same decode run four times: while another thread uploads the adapter again and again (the
    // decode graphs captured meanwhile), alone (graphs replayed), during uploads again (replayed), and
    // eager (no graphs). All four give the same tokens; the second and third are timed.
    let mut alloc = BlockAllocator::new(CACHE.num_blocks as u32, CACHE.block_size);
    let tables: Vec<Vec<u32>> = (0..SEQS).map(|_| alloc.allocate(32 + STEPS + 1).unwrap()).collect();
    let (captured, _, (first_uploads, _)) = decode_run_during_uploads(&mut e, &tables, &host);
    let (captures, replays_before) = g.graph_counts();
    say(&format!(
        "  {captures} graphs captured while {} uploads ran",
        first_uploads.len()
    ));
    // Graphs really ran (a failed capture turns them off and falls back to eager steps, which would make
    // the comparisons below vacuous).
    assert!(captures > 0, "no graph was captured while uploads ran");
    let (alone, alone_ms) = decode_run(&mut e, &tables);
    let (_, replays_after) = g.graph_counts();
    assert!(
        replays_after > replays_before,
        "graph replays stopped after the uploads ({replays_before} -> {replays_after})"
    );
    let (during, during_ms, (upload_ms, last)) = decode_run_during_uploads(&mut e, &tables, &host);
    g.set_graphs(false);
    let (eager, _) = decode_run(&mut e, &tables);
    g.set_graphs(true);
    assert_eq!(
        captured, eager,
        "decode steps captured during uploads differ from eager steps"
    );
    assert_eq!(alone, eager, "graph replays differ from eager steps");
    say(&format!(
        "  decode alone: {}; during {} uploads: {}",
        summary(&alone_ms),
        upload_ms.len(),
        summary(&during_ms)
    ));
    bench(
        "decode_step_alone",
        median(alone_ms.clone()),
        "ms",
        &format!("Mistral-7B dummy bf16, {SEQS}->{} sequences", SEQS - 2),
    );
    bench(
        "decode_step_during_uploads",
        median(during_ms.clone()),
        "ms",
        &format!(
            "the same steps while another thread uploads the 27 MB adapter ({} uploads)",
            upload_ms.len()
        ),
    );
    bench(
        "decode_step_max_during_uploads",
        during_ms.iter().copied().fold(0.0, f64::max),
        "ms",
        &format!("alone: max {:.2} ms", alone_ms.iter().copied().fold(0.0, f64::max)),
    );
    bench(
        "adapter_upload_during_decode",
        median(upload_ms.clone()),
        "ms",
        "upload_many while decode steps run",
    );
    assert_eq!(during, eager, "decode steps changed while adapters were uploading");

    // An adapter uploaded while decode steps ran holds the bytes `weight` uploads, and serves exactly as
    // one loaded by load_adapter (a 4-token prompt: the LoRA runs on the BGMV kernels, which sum in a
    // fixed order; SGMV's atomics may round differently from run to run).
    let last = last.unwrap();
    let pairs = host.layers.iter().flatten().flatten();
    let uploaded = last.layers.iter().flatten().flatten();
    let mut checked = 0;
    for (pair, lw) in pairs.zip(uploaded) {
        for (t, d) in [(&pair.a, &lw.a), (&pair.b, &lw.b)] {
            let want = g.to_f32(&g.weight(&t.view()).unwrap()).unwrap();
            assert_eq!(bits(&g.to_f32(d).unwrap()), bits(&want), "{}", t.name);
            checked += 1;
        }
    }
    assert_eq!(checked, 256);
    e.insert_adapter("concurrent", last);
    e.load_adapter("loaded", &host).unwrap();
    let ids: Vec<u32> = (0..4).map(|i| (i * 101 + 7) % 30000).collect();
    let table = alloc.allocate(ids.len()).unwrap();
    let a = e
        .logits_with_adapters(&[(&ids, 0, &table, Some("concurrent"))], &[true])
        .unwrap();
    let b = e
        .logits_with_adapters(&[(&ids, 0, &table, Some("loaded"))], &[true])
        .unwrap();
    let base = e.logits(&[(&ids, 0, &table)], &[true]).unwrap();
    assert_eq!(bits(&a.concat()), bits(&b.concat()));
    assert_ne!(bits(&a.concat()), bits(&base.concat()), "the adapter changes nothing");
    // How much the uploads slowed decoding is reported above (BENCH lines), not asserted: a timing
    // assertion would fail on a shared or throttled GPU for reasons unrelated to this code.
}
