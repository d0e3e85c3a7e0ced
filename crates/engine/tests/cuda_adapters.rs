//! Adapter uploads on the GPU ([`Backend::upload_many`]: a pinned staging buffer, one allocation, one
//! copy on the backend's upload stream): every tensor equals its [`Backend::weight`] upload bit for bit
//! for f32, bf16 and f16 sources on every storage type, and the staging buffers are kept between uploads
//! but one of more than 512 MiB is unpinned after its upload; an adapter uploaded while its file is read
//! ([`Backend::begin_file_upload`]) equals the same adapter uploaded after the read, bit for bit, with
//! the times of both ways on a cold 27 MB file; then, on a Mistral-7B-shaped model with dummy
//! weights, the time of a 27 MB rank-16 q/k/v/o adapter's upload (and of the per-tensor uploads it
//! replaces), and decode steps run while uploads run on another thread: their tokens equal those of
//! the same steps without uploads, bit for bit (CUDA graphs captured meanwhile included), and their
//! times are printed beside; streamed loads (`AdapterUploader::load_streamed`: the adapter placed after its
//! header, its weights read beside a pass that waits for each layer's) serve as whole loads, bit for bit,
//! fail the pass that used weights failing their checks, and are timed against the whole load then the
//! pass; and a streamed upload's gate waits for its own layer only. Without a device each test prints
//! `SKIPPED: ...`.
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

/// The Mistral-7B-shaped bf16 model of `dir`'s config.json with dummy weights.
fn mistral_engine(dir: &std::path::Path) -> Engine<CudaBackend> {
    let b = CudaBackend::new(0, DType::BF16).unwrap();
    Engine::load_with_format(b, dir, CACHE, Arc::new(SingleRank), LoadFormat::Dummy { seed: 3 }).unwrap()
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
            prefill_top_n: 0,
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
    let mut e = mistral_engine(dir.path());
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

/// Streamed loads ([`AdapterUploader::load_streamed`]) on a Mistral-7B-shaped bf16 model with dummy
/// weights: a 512-token prompt's pass run at once with a cold bf16 adapter, and with a cold f16 one (its
/// tensors converted layer by layer), gives the logits, bit for bit, of the same pass with the adapter
/// loaded whole (and not the base model's); an adapter whose last layer holds a NaN is placed (its header
/// is fine), then the pass that uses it fails with the NaN's error and so does its read. Timed (medians of
/// 7, the file dropped from the page cache before each): the pass with a streamed load, from the call to
/// the logits, against the whole load followed by the pass, and the base model's pass alone.
///
/// [`AdapterUploader::load_streamed`]: lorax_engine::engine::AdapterUploader::load_streamed
#[test]
fn streamed_loads_serve_as_whole_ones_and_run_beside_the_read() {
    use lorax_engine::engine::StreamStart;
    use lorax_engine::lora::AdapterLayout;
    if backend(DType::BF16).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::mistral_7b(dir.path());
    let mut e = mistral_engine(dir.path());
    let uploader = e.adapter_uploader();
    let ids: Vec<u32> = (0..512).map(|i| (i * 7919 + 13) % 32000).collect();
    let table: Vec<u32> = (0..32).collect();
    let run =
        |e: &mut Engine<CudaBackend>, key: Option<&str>| e.logits_with_adapters(&[(&ids, 0, &table, key)], &[false]);
    let stream = |e: &mut Engine<CudaBackend>, adapter: &std::path::Path, key: &str| match uploader.load_streamed(
        adapter,
        &cfg,
        64,
        DType::BF16,
    ) {
        StreamStart::Streaming { device, rest, .. } => {
            assert!(device.gate.is_some());
            e.insert_adapter(key, device);
            (run(e, Some(key)), rest)
        }
        StreamStart::Loaded(r) => panic!("not streamed: {:?}", r.map(|_| ())),
    };
    let base = run(&mut e, None).unwrap();
    for dtype in [DType::BF16, DType::F16] {
        let adapter = dir.path().join(format!("adapter-{dtype:?}"));
        common::write_qkvo_adapter(&adapter, &cfg, 16, dtype, 11);
        common::drop_cached(&adapter.join("adapter_model.safetensors"));
        let (streamed, rest) = stream(&mut e, &adapter, "streamed");
        let streamed = streamed.unwrap();
        let host = rest.recv().unwrap().unwrap();
        e.load_adapter("whole", &host).unwrap();
        let whole = run(&mut e, Some("whole")).unwrap();
        let bits = |r: &Vec<Vec<f32>>| -> Vec<u32> { r.iter().flatten().map(|v| v.to_bits()).collect() };
        assert_eq!(
            bits(&streamed),
            bits(&whole),
            "{dtype:?}: the streamed adapter's pass differs"
        );
        assert_ne!(bits(&streamed), bits(&base), "{dtype:?}: the adapter changes nothing");
        say(&format!(
            "  {dtype:?} adapter streamed: the pass equals the whole load's, bit for bit"
        ));
    }
    // A NaN in the last layer: the header passes, the pass and the read fail.
    let bad = dir.path().join("adapter-nan");
    common::write_qkvo_adapter(&bad, &cfg, 16, DType::BF16, 12);
    let layout = AdapterLayout::read(&bad, &cfg, 64).unwrap();
    let last = layout
        .pairs
        .iter()
        .filter(|p| p.0 == cfg.num_layers - 1)
        .map(|p| p.3[1].range.start)
        .max()
        .unwrap();
    let path = bad.join("adapter_model.safetensors");
    let mut file = std::fs::read(&path).unwrap();
    file[last..last + 2].copy_from_slice(&0x7FC0u16.to_le_bytes());
    std::fs::write(&path, &file).unwrap();
    common::drop_cached(&path);
    let (pass, rest) = stream(&mut e, &bad, "bad");
    let err = pass.unwrap_err().to_string();
    assert!(err.contains("NaN"), "the pass failed otherwise: {err}");
    assert!(
        !err.contains(&bad.display().to_string()),
        "the error shows the server's path: {err}"
    );
    assert!(rest.recv().unwrap().is_err(), "the read of a NaN adapter succeeded");
    say(&format!(
        "  an adapter with a NaN in its last layer: the pass failed ({err})"
    ));
    assert!(run(&mut e, None).is_ok(), "the base model no longer runs");

    // Times.
    let adapter = dir.path().join("adapter-BF16");
    let file = adapter.join("adapter_model.safetensors");
    let (mut t_stream, mut t_whole, mut t_base) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..7 {
        common::drop_cached(&file);
        let t = Instant::now();
        let (pass, rest) = stream(&mut e, &adapter, &format!("s{i}"));
        pass.unwrap();
        t_stream.push(t.elapsed().as_secs_f64() * 1e3);
        rest.recv().unwrap().unwrap();
        common::drop_cached(&file);
        let t = Instant::now();
        let (_, up) = uploader.load_and_upload(&adapter, &cfg, 64).unwrap();
        e.insert_adapter(&format!("w{i}"), up.unwrap().device);
        run(&mut e, Some(&format!("w{i}"))).unwrap();
        t_whole.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        run(&mut e, None).unwrap();
        t_base.push(t.elapsed().as_secs_f64() * 1e3);
        for k in [format!("s{i}"), format!("w{i}")] {
            e.offload_adapter(&k, &Batch::default()).unwrap();
        }
    }
    let (s, w, b) = (median(t_stream), median(t_whole), median(t_base));
    say(&format!(
        "BENCH cold 27 MB adapter and a 512-token prompt's pass (median of 7, ms): streamed {s:.2}, whole load then \
         the pass {w:.2}, the base model's pass alone {b:.2}; the adapter adds {:.2} streamed, {:.2} whole",
        s - b,
        w - b
    ));
}

/// The gate of a streamed upload ([`FileUpload::early`]): pieces of a file of 6 layers (one 64 KiB bf16
/// tensor each) come layer by layer, 40 ms apart, from another thread; each `wait_layer` returns once its
/// own layer has come and before the layer after next has, `wait_all` once the upload ended, and the
/// tensors then hold the file's values. An upload dropped before its end fails its waiters.
///
/// [`FileUpload::early`]: lorax_engine::backend::FileUpload::early
#[test]
fn a_streamed_upload_gate_waits_for_its_own_layer_only() {
    use lorax_engine::backend::FileTensor;
    let Some(g) = backend(DType::BF16) else { return };
    let (layers, start, size) = (6usize, 256usize, 64usize << 10);
    let len = start + layers * size;
    let mut rng = Rng(5);
    let file: Vec<u8> = (0..len).map(|_| (rng.next_u64() >> 56) as u8 & 0x3F).collect();
    let shape = [size / 2];
    let tensors: Vec<FileTensor<'_>> = (0..layers)
        .map(|l| FileTensor {
            range: start + l * size..start + (l + 1) * size,
            dtype: DType::BF16,
            shape: &shape,
        })
        .collect();
    let layer_of: Vec<usize> = (0..layers).collect();
    for finish in [true, false] {
        let up = g.begin_file_upload().unwrap();
        up.start(len);
        let (out, gate) = up.early(start, &tensors, &layer_of, layers).unwrap();
        let t0 = Instant::now();
        let came: Vec<std::sync::Mutex<Option<f64>>> = (0..layers).map(|_| std::sync::Mutex::new(None)).collect();
        let (file, tensors, came) = (&file, &tensors, &came);
        let waited = std::thread::scope(|s| {
            let deliver = s.spawn(move || {
                up.piece(0, &file[..start]);
                for l in 0..layers {
                    std::thread::sleep(std::time::Duration::from_millis(40));
                    if !finish && l == 3 {
                        drop(up); // the read stops: the upload is dropped without its end
                        return;
                    }
                    let r = tensors[l].range.clone();
                    // Two pieces a layer, the second half first.
                    let mid = r.start + size / 2;
                    up.piece(mid, &file[mid..r.end]);
                    up.piece(r.start, &file[r.start..mid]);
                    *came[l].lock().unwrap() = Some(t0.elapsed().as_secs_f64() * 1e3);
                }
                up.end(Ok(())).unwrap();
            });
            let mut waited = Vec::new();
            for l in 0..layers {
                let r = gate.wait_layer(l);
                waited.push((r.is_ok(), t0.elapsed().as_secs_f64() * 1e3));
                if r.is_err() {
                    break;
                }
            }
            deliver.join().unwrap();
            waited
        });
        if !finish {
            assert!(gate.wait_all().is_err(), "a dropped upload's gate passed");
            assert!(waited.iter().filter(|w| w.0).count() == 3, "{waited:?}");
            say(&format!(
                "  an upload dropped after 3 layers fails the 4th layer's wait: {waited:?}"
            ));
            continue;
        }
        let came: Vec<f64> = came.iter().map(|c| c.lock().unwrap().unwrap()).collect();
        for l in 0..layers {
            assert!(waited[l].0);
            assert!(
                waited[l].1 >= came[l],
                "layer {l}: the wait ended at {:.1} ms, before its pieces ({:.1})",
                waited[l].1,
                came[l]
            );
            if l + 2 < layers {
                assert!(
                    waited[l].1 < came[l + 2],
                    "layer {l}: the wait ended at {:.1} ms, after layer {} came ({:.1})",
                    waited[l].1,
                    l + 2,
                    came[l + 2]
                );
            }
        }
        gate.wait_all().unwrap();
        for (l, t) in out.iter().enumerate() {
            let want: Vec<u32> = file[tensors[l].range.clone()]
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32().to_bits())
                .collect();
            assert_eq!(bits(&g.to_f32(t).unwrap()), want, "layer {l}'s tensor");
        }
        say(&format!(
            "  gate: layers came at {came:.1?} ms, their waits ended at {:.1?} ms",
            waited.iter().map(|w| w.1).collect::<Vec<_>>()
        ));
    }
}
