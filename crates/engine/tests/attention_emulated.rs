//! The paged decode-attention kernels of kernels/attention.cu (the 8-lane, the cp.async-staged and the
//! tensor-core GQA kernels at head size 128, bf16; mma.sync emulated lane by lane) under the CPU emulation
//! of CUDA (tests/emu/cuemu.h), against a
//! double-precision reference (tests/emu/attention_driver.cpp): scattered block tables, rows of no
//! sequence, unsplit and split contexts. The emulated copies are synchronous, so this checks the kernels'
//! indexing, staging ring and combination logic, not the asynchrony; the GPU itself is checked by
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

#[test]
#[ignore = "CPU emulation of the attention kernels: slow, needs g++"]
fn attention_kernels_match_a_double_reference_under_emulation() {
    let dir = tempfile::tempdir().unwrap();
    let kernels = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kernels");
    // GCC takes the alignment before the storage class that cuemu.h makes of __shared__.
    let attention = std::fs::read_to_string(kernels.join("attention.cu"))
        .unwrap()
        .replace("__shared__ alignas(16)", "alignas(16) __shared__");
    std::fs::write(dir.path().join("attention.cu"), attention).unwrap();
    std::fs::copy(kernels.join("common.cuh"), dir.path().join("common.cuh")).unwrap();
    let exe = dir.path().join("attention-emu");
    if !build_emulated("attention_driver.cpp", dir.path(), &exe) {
        return;
    }
    let out = Command::new(&exe).output().unwrap();
    say(&String::from_utf8_lossy(&out.stdout));
    assert!(out.status.success(), "emulated attention: {}", out.status);
}

#[test]
#[ignore = "CPU emulation of the tensor-core prefill kernels: slow, needs g++"]
fn prefill_kernels_match_a_double_reference_under_emulation() {
    let dir = tempfile::tempdir().unwrap();
    let kernels = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kernels");
    let prefill = std::fs::read_to_string(kernels.join("prefill.cu"))
        .unwrap()
        .replace("__shared__ alignas(16)", "alignas(16) __shared__");
    std::fs::write(dir.path().join("prefill.cu"), prefill).unwrap();
    std::fs::copy(kernels.join("common.cuh"), dir.path().join("common.cuh")).unwrap();
    let exe = dir.path().join("prefill-emu");
    if !build_emulated("prefill_driver.cpp", dir.path(), &exe) {
        return;
    }
    let out = Command::new(&exe).output().unwrap();
    say(&String::from_utf8_lossy(&out.stdout));
    assert!(out.status.success(), "emulated prefill attention: {}", out.status);
}
