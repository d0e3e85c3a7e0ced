//! Adapter uploads: an adapter uploaded apart from the engine ([`Engine::adapter_uploader`], on another thread) serves exactly as
//! one loaded by [`Engine::load_adapter`]; an adapter uploaded while its file is read
//! ([`lorax_engine::engine::AdapterUploader::load_and_upload`]) equals one uploaded after the read, and
//! the reader hands every byte of the file over, cold or cached; and (ignored, a timing)
//! [`HostAdapter::load`] of a Mistral-7B-shaped rank-16 q/k/v/o bf16 adapter, the adapter of the GPU
//! load benchmark.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Instant;

use common::{drop_cached, fixtures, mistral_7b, write_qkvo_adapter};
use lorax_engine::lora::{HostAdapter, PieceSink};
use lorax_engine::weights::DType;
use lorax_engine::{CacheConfig, CpuBackend, Engine};

/// The fixture Llama on the CPU backend.
fn llama() -> Engine<CpuBackend> {
    Engine::load(
        CpuBackend,
        &fixtures().join("models/llama"),
        CacheConfig {
            num_blocks: 64,
            block_size: 4,
        },
    )
    .unwrap()
}

/// An adapter uploaded on another thread through the engine's uploader and inserted gives the same
/// logits, bit for bit, as the same adapter loaded by `load_adapter` (and not the base model's).
#[test]
fn adapter_uploaded_apart_from_the_engine_serves_as_a_loaded_one() {
    let mut e = llama();
    let host = HostAdapter::load(&fixtures().join("adapters/lora-r16-all"), e.config(), 64).unwrap();
    assert_eq!(e.load_adapter("loaded", &host).unwrap(), host.bytes);
    let uploader = e.adapter_uploader();
    let host = std::sync::Arc::new(host);
    let shared = std::sync::Arc::clone(&host);
    let device = std::thread::spawn(move || uploader.upload(&shared).unwrap())
        .join()
        .unwrap();
    assert_eq!(device.bytes, host.bytes);
    assert!(!e.has_adapter("uploaded"));
    assert_eq!(e.insert_adapter("uploaded", device), host.bytes);
    let ids: Vec<u32> = (0..12).map(|i| (i * 13 + 5) % 200).collect();
    let table: Vec<u32> = (0..3).collect();
    let mut rows = Vec::new();
    for key in [Some("loaded"), Some("uploaded"), None] {
        rows.push(e.logits_with_adapters(&[(&ids, 0, &table, key)], &[true]).unwrap());
    }
    let bits = |r: &Vec<Vec<f32>>| -> Vec<u32> { r.iter().flatten().map(|v| v.to_bits()).collect() };
    assert_eq!(bits(&rows[0]), bits(&rows[1]));
    assert_ne!(bits(&rows[0]), bits(&rows[2]), "the adapter changes nothing");
}

/// An adapter uploaded while its file is read has the same tensors, value for value, as the same
/// adapter uploaded after the read, and its rows serve alike.
#[test]
fn adapters_uploaded_while_read_equal_those_uploaded_after() {
    let mut e = llama();
    let uploader = e.adapter_uploader();
    let dir = fixtures().join("adapters/lora-r16-all");
    let (host, upload) = uploader.load_and_upload(&dir, e.config(), 64).unwrap();
    let upload = upload.unwrap();
    let (streamed, beside) = (upload.device, upload.beside_read);
    assert!(beside, "the CPU backend uploads while reading");
    let after = uploader.upload(&host).unwrap();
    assert_eq!(streamed.bytes, after.bytes);
    assert!(common::assert_same_adapter(&CpuBackend, &streamed, &after) > 0);
    e.insert_adapter("streamed", streamed);
    e.insert_adapter("after", after);
    let ids: Vec<u32> = (0..12).map(|i| (i * 13 + 5) % 200).collect();
    let table: Vec<u32> = (0..3).collect();
    let rows = [Some("streamed"), Some("after"), None]
        .map(|key| e.logits_with_adapters(&[(&ids, 0, &table, key)], &[true]).unwrap());
    assert_eq!(rows[0], rows[1]);
    assert_ne!(rows[0], rows[2], "the adapter changes nothing");
}

/// Records what a reader hands over.
#[derive(Default)]
struct Pieces {
    len: std::sync::Mutex<Option<usize>>,
    pieces: std::sync::Mutex<Vec<(usize, Vec<u8>)>>,
}

impl PieceSink for Pieces {
    fn start(&self, len: usize) {
        let mut l = self.len.lock().unwrap();
        assert!(l.is_none(), "start came twice");
        *l = Some(len);
    }

    fn piece(&self, offset: usize, bytes: &[u8]) {
        assert!(self.len.lock().unwrap().is_some(), "a piece came before start");
        self.pieces.lock().unwrap().push((offset, bytes.to_vec()));
    }
}

/// The pieces handed to a sink during a parse, read from the disk and through the page cache, make up
/// the whole file, each byte once.
#[test]
fn a_read_hands_every_byte_of_the_file_to_its_sink_once() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = mistral_7b(dir.path());
    let adapter = dir.path().join("adapter");
    write_qkvo_adapter(&adapter, &cfg, 16, DType::BF16, 3);
    let file = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
    for cold in [true, false] {
        if cold {
            drop_cached(&adapter.join("adapter_model.safetensors"));
        }
        let sink = Pieces::default();
        let host = HostAdapter::load_with(&adapter, &cfg, 64, Some(&sink)).unwrap();
        assert_eq!(*sink.len.lock().unwrap(), Some(file.len()));
        let mut pieces = sink.pieces.into_inner().unwrap();
        assert!(pieces.len() > 1, "{cold}: one piece only, nothing to test");
        pieces.sort_by_key(|(offset, _)| *offset);
        let mut at = 0;
        for (offset, bytes) in &pieces {
            assert_eq!(
                *offset, at,
                "cold {cold} ({:?}): a gap or an overlap at {at}",
                host.read
            );
            assert!(
                bytes[..] == file[at..at + bytes.len()],
                "cold {cold}: piece at {at} differs"
            );
            at += bytes.len();
        }
        assert_eq!(at, file.len(), "cold {cold}: the pieces end early");
    }
}

/// A streamed load's layout, from the header alone, places every tensor where the whole parse finds it;
/// its read order has the header, then each layer's tensors, layer after layer; the weights read in that
/// order (cold and cached) hand every byte over once, the header's pieces first, and parse to the same
/// adapter. A file rewritten between the header's read and the weights' is refused.
#[test]
fn a_streamed_read_follows_the_layers_and_parses_as_a_whole_one() {
    use lorax_engine::lora::{AdapterLayout, Target};
    let dir = tempfile::tempdir().unwrap();
    let cfg = mistral_7b(dir.path());
    let adapter = dir.path().join("adapter");
    write_qkvo_adapter(&adapter, &cfg, 16, DType::BF16, 3);
    let path = adapter.join("adapter_model.safetensors");
    let file = std::fs::read(&path).unwrap();
    let layout = AdapterLayout::read(&adapter, &cfg, 64).unwrap();
    let whole = HostAdapter::load(&adapter, &cfg, 64).unwrap();
    assert_eq!(layout.len, file.len());
    assert_eq!(layout.bytes, whole.bytes);
    assert_eq!(layout.max_rank(), 16);
    assert_eq!(layout.elements(), whole.elements());
    assert_eq!(layout.pairs.len(), 4 * cfg.num_layers);
    for (l, target, scale, [a, b]) in &layout.pairs {
        let pair = whole.layers[*l][target.index()].as_ref().unwrap();
        assert_eq!(Some(a.range.clone()), pair.a.file_range(), "{l} {target:?} A");
        assert_eq!(Some(b.range.clone()), pair.b.file_range(), "{l} {target:?} B");
        assert_eq!((a.dtype, &a.shape), (pair.a.dtype, &pair.a.shape));
        assert_eq!(*scale, pair.scale);
        assert!(Target::ALL.contains(target));
    }
    let order = layout.read_order();
    assert_eq!(order[0], 0..layout.data_start, "the header first");
    let layer_at = |r: &std::ops::Range<usize>| {
        layout
            .pairs
            .iter()
            .find(|p| p.3.iter().any(|s| s.range == *r))
            .map(|p| p.0)
            .unwrap()
    };
    let layers: Vec<usize> = order[1..].iter().map(layer_at).collect();
    assert!(
        layers.windows(2).all(|w| w[0] <= w[1]),
        "layers out of order: {layers:?}"
    );
    assert_eq!(order.len(), 1 + 2 * layout.pairs.len());
    for cold in [true, false] {
        if cold {
            drop_cached(&path);
        }
        let sink = Pieces::default();
        sink.start(file.len());
        let host = layout.read_weights(&adapter, &cfg, 64, &sink).unwrap();
        assert_eq!(host.bytes, whole.bytes);
        for (l, layer) in host.layers.iter().enumerate() {
            for t in Target::ALL {
                let (x, y) = (&layer[t.index()], &whole.layers[l][t.index()]);
                assert_eq!(x.is_some(), y.is_some());
                if let (Some(x), Some(y)) = (x, y) {
                    assert!(
                        x.a.data() == y.a.data() && x.b.data() == y.b.data(),
                        "{l} {t:?} differs"
                    );
                }
            }
        }
        let mut pieces = sink.pieces.into_inner().unwrap();
        // Pieces are taken in the order wanted (by the first range of `order` each holds) by at most 16
        // readers at once: a piece that is r-th in that order was taken after r others, of which at most
        // 15 were still in flight, so at least r - 15 pieces came before it.
        let first_wanted = |(o, b): &(usize, Vec<u8>)| order.iter().position(|r| r.start < o + b.len() && *o < r.end);
        let mut ranked: Vec<(Option<usize>, usize)> = pieces.iter().map(|p| (first_wanted(p), p.0)).collect();
        ranked.sort_by_key(|&(w, o)| (w.unwrap_or(usize::MAX), o));
        for (k, p) in pieces.iter().enumerate() {
            let r = ranked.iter().position(|&(_, o)| o == p.0).unwrap();
            assert!(
                r <= k + 15,
                "cold {cold}: the piece at {} ({r}th wanted) came {k}th",
                p.0
            );
        }
        assert!(
            ranked.iter().all(|(w, _)| w.is_some()),
            "cold {cold}: a piece holds nothing wanted"
        );
        pieces.sort_by_key(|(offset, _)| *offset);
        let mut at = 0;
        for (offset, bytes) in &pieces {
            assert_eq!(*offset, at, "cold {cold}: a gap or an overlap at {at}");
            assert!(
                bytes[..] == file[at..at + bytes.len()],
                "cold {cold}: piece at {at} differs"
            );
            at += bytes.len();
        }
        assert_eq!(at, file.len(), "cold {cold}: the pieces end early");
    }
    // Rewritten with other shapes after the header was read: refused.
    write_qkvo_adapter(&adapter, &cfg, 8, DType::BF16, 3);
    let sink = Pieces::default();
    sink.start(layout.len);
    let e = layout.read_weights(&adapter, &cfg, 64, &sink).unwrap_err();
    assert!(e.to_string().contains("changed while it was read"), "{e}");
}

/// Median time of `HostAdapter::load` on a Mistral-7B-shaped rank-16 q/k/v/o bf16 adapter (27 MB,
/// 256 tensors): each parse dropped before the next (its memory can be reused), all kept (as a host
/// tier keeps them: each parse gets fresh memory), and kept with the file dropped from the page cache
/// before each load (a cold load: the file comes from the disk; Linux only). Run with
/// `cargo test --release -p lorax-engine --test lora_upload -- --ignored --nocapture`.
#[test]
#[ignore = "timing"]
fn bench_parse_mistral_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = mistral_7b(dir.path());
    let adapter = dir.path().join("adapter");
    write_qkvo_adapter(&adapter, &cfg, 16, DType::BF16, 1);
    let reps: usize = std::env::var("LORAX_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(21);
    for (mode, keep, cold) in [("dropped", false, false), ("kept", true, false), ("cold", true, true)] {
        if cold && !cfg!(target_os = "linux") {
            continue;
        }
        let mut times = Vec::new();
        let mut kept = Vec::new();
        for _ in 0..reps {
            if cold {
                drop_cached(&adapter.join("adapter_model.safetensors"));
            }
            let t = Instant::now();
            let host = HostAdapter::load(&adapter, &cfg, 64).unwrap();
            times.push(t.elapsed().as_secs_f64() * 1e3);
            assert_eq!(host.bytes, 27_262_976);
            if keep {
                kept.push(host);
            }
        }
        times.sort_by(f64::total_cmp);
        eprintln!(
            "BENCH adapter_parse_{mode} | {:.2} | ms | median of {reps} HostAdapter::load, 27262976 bytes (min {:.2}, max {:.2})",
            times[reps / 2],
            times[0],
            times[reps - 1]
        );
    }
}
