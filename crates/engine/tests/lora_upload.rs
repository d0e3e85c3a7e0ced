//! Adapter uploads: an adapter uploaded apart from the engine ([`Engine::adapter_uploader`], on another thread) serves exactly as
//! one loaded by [`Engine::load_adapter`], and (ignored, a timing) [`HostAdapter::load`] of a
//! Mistral-7B-shaped rank-16 q/k/v/o bf16 adapter, the adapter of the GPU load benchmark.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Instant;

use common::{fixtures, mistral_7b, write_qkvo_adapter};
use lorax_engine::lora::HostAdapter;
use lorax_engine::weights::DType;
use lorax_engine::{CacheConfig, CpuBackend, Engine};

/// An adapter uploaded on another thread through the engine's uploader and inserted gives the same
/// logits, bit for bit, as the same adapter loaded by `load_adapter` (and not the base model's).
#[test]
fn adapter_uploaded_apart_from_the_engine_serves_as_a_loaded_one() {
    let mut e = Engine::load(
        CpuBackend,
        &fixtures().join("models/llama"),
        CacheConfig {
            num_blocks: 64,
            block_size: 4,
        },
    )
    .unwrap();
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

/// Drops `path` from the page cache (after syncing it, so that its pages are clean).
#[cfg(target_os = "linux")]
fn drop_cached(path: &std::path::Path) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: a valid descriptor; the advice only drops clean cached pages.
    assert_eq!(
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) },
        0
    );
}

#[cfg(not(target_os = "linux"))]
fn drop_cached(_: &std::path::Path) {}

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
