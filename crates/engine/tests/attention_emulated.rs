//! The paged decode-attention kernels of kernels/attention.cu (the 8-lane and the tensor-core GQA
//! kernels at head size 128, bf16; mma.sync emulated lane by lane) under the CPU emulation
//! of CUDA (tests/emu/cuemu.h), against a
//! double-precision reference (tests/emu/attention_driver.cpp): scattered block tables, rows of no
//! sequence, unsplit and split contexts; and the tensor-core prefill kernels (tests/emu/prefill_driver.cpp).
//! The emulated copies are synchronous, so this checks the kernels' indexing, fragment layouts, staging
//! and combination logic, not the asynchrony; the GPU itself is checked by
//! `cuda_kernels`. Ignored by default (it compiles the driver with g++ and runs one thread per CUDA thread):
//!
//!     cargo test -p lorax-engine --test attention_emulated -- --ignored --nocapture
//!
//! Without g++ the test prints `SKIPPED: ...` and returns.
#![allow(clippy::unwrap_used)]

mod cuda_common;

use std::path::Path;
use std::process::Command;

use cuda_common::{build_emulated, say};

/// Builds `driver` (tests/emu) against `kernel` (kernels/) and common.cuh, runs it and asserts that it
/// passes; prints `SKIPPED` without g++.
fn run_emulated(kernel: &str, driver: &str) {
    let dir = tempfile::tempdir().unwrap();
    let kernels = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kernels");
    // GCC takes the alignment before the storage class that cuemu.h makes of __shared__.
    let source = std::fs::read_to_string(kernels.join(kernel))
        .unwrap()
        .replace("__shared__ alignas(16)", "alignas(16) __shared__");
    std::fs::write(dir.path().join(kernel), source).unwrap();
    std::fs::copy(kernels.join("common.cuh"), dir.path().join("common.cuh")).unwrap();
    let exe = dir.path().join("emu");
    if !build_emulated(driver, dir.path(), &[], &exe) {
        return;
    }
    let out = Command::new(&exe).output().unwrap();
    say(&String::from_utf8_lossy(&out.stdout));
    assert!(out.status.success(), "{driver}: {}", out.status);
}

#[test]
#[ignore = "CPU emulation of the attention kernels: slow, needs g++"]
fn attention_kernels_match_a_double_reference_under_emulation() {
    run_emulated("attention.cu", "attention_driver.cpp");
}

#[test]
#[ignore = "CPU emulation of the tensor-core prefill kernels: slow, needs g++"]
fn prefill_kernels_match_a_double_reference_under_emulation() {
    run_emulated("prefill.cu", "prefill_driver.cpp");
}
