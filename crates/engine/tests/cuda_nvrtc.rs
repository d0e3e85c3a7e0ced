//! Compiles every kernel module with NVRTC for `sm_90` in each storage type. Needs only the NVRTC library
//! (no driver, no GPU), so it also runs on development machines that have `libnvrtc.so` on their library
//! path; elsewhere it is skipped, visibly. Prints ptxas's resource report (registers, spills) per kernel
//! with `--nocapture`.
#![allow(clippy::unwrap_used)]

use std::io::Write;

use lorax_engine::backend::cuda::compile::{nvrtc_present, Compiler, Source, HOPPER_SOURCES, SOURCES};
use lorax_engine::backend::cuda::KERNELS;
use lorax_engine::weights::DType;

#[test]
fn kernels_compile_for_hopper_in_every_dtype() {
    if !nvrtc_present() {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: NVRTC (libnvrtc.so) is not on the library path; kernels not compiled"
        );
        return;
    }
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        let mut c = Compiler::new((9, 0), dtype).unwrap().with_cache(None);
        c.verbose = true;
        // The wgmma modules: sm_90a, 16-bit storage only.
        let hopper = c.arch_specific();
        let hopper_sources: &[Source] = if dtype == DType::F32 { &[] } else { &HOPPER_SOURCES };
        let sources = SOURCES
            .iter()
            .map(|s| (&c, s))
            .chain(hopper_sources.iter().map(|s| (&hopper, s)));
        for (c, src) in sources {
            let out = c.compile(src).unwrap_or_else(|e| panic!("{dtype:?} {}: {e}", src.name));
            assert!(!out.cubin.is_empty());
            let names = KERNELS.iter().find(|(m, _)| *m == src.name).unwrap().1;
            for name in names {
                assert!(
                    out.cubin.windows(name.len()).any(|w| w == name.as_bytes()),
                    "{dtype:?}: kernel {name} missing from {}",
                    src.name
                );
            }
            // Captured by libtest (shown with --nocapture or on failure): CI logs stay short.
            eprintln!("== {dtype:?} {} {} ==\n{}", c.arch, src.name, out.log.trim());
            // ptxas serializes every wgmma of a kernel (waits after each) when one sits in a branch or its input
            // registers may be written while an earlier one runs (notes C7510-C7520): the products would then
            // never overlap anything.
            assert!(
                !out.log.contains("instructions are serialized"),
                "{dtype:?} {}: {}",
                src.name,
                out.log.lines().find(|l| l.contains("serialized")).unwrap_or_default()
            );
            // A few bytes of spill are ptxas trading registers for occupancy; a register array demoted to
            // local memory (a run-time index) shows as hundreds.
            for line in out.log.lines().filter(|l| l.contains("bytes spill stores")) {
                let spilled: usize = line
                    .split(',')
                    .find(|p| p.contains("spill stores"))
                    .and_then(|p| p.split_whitespace().next())
                    .and_then(|n| n.parse().ok())
                    .unwrap();
                assert!(spilled <= 64, "{dtype:?} {}: {line}", src.name);
            }
        }
    }
}

#[test]
fn compiled_modules_are_cached_on_disk() {
    if !nvrtc_present() {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: NVRTC (libnvrtc.so) is not on the library path"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let c = Compiler::new((9, 0), DType::BF16)
        .unwrap()
        .with_cache(Some(dir.path().to_path_buf()));
    let first = c.compile(&SOURCES[0]).unwrap();
    assert!(!first.cached);
    let second = c.compile(&SOURCES[0]).unwrap();
    assert!(second.cached);
    assert_eq!(first.cubin, second.cubin);
    // Another architecture is another entry.
    let other = Compiler::new((8, 0), DType::BF16)
        .unwrap()
        .with_cache(Some(dir.path().to_path_buf()));
    assert!(!other.compile(&SOURCES[0]).unwrap().cached);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}
