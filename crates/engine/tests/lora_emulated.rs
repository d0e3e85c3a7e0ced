//! The decode LoRA kernels by adapter index of kernels/lora.cu (the k-split `bgmv_shrink_ix` +
//! `bgmv_expand_ix`, the shrink on the tensor cores `bgmv_shrink_tc1/2/4` + `bgmv_expand_ix` or + the default
//! expand `bgmv_expand_vx` (records merged to 16 rows and to 4), and the
//! earlier `bgmv_shrink_ix0` + `bgmv_expand_ix0`; and the prompt pair `lora_shrink_pf2/4/8` + `lora_expand_pf`
//! on records of up to 64 rows), bf16, under the CPU emulation of CUDA (tests/emu/cuemu.h),
//! against a double-precision reference (tests/emu/lora_driver.cpp): 1 to 128 rows in records of 1-4 rows,
//! rows in no record, padding records, ranks 4-64 mixed, fused q/k/v and o
//! projections, a missing pair, several chunk sizes, and an in_dim that is not whole 16-byte vectors. It checks
//! the kernels' indexing, staging, shuffles and partial sums on a machine without a GPU; the GPU itself is
//! checked by `cuda_kernels` (`lora_step_matches_cpu`). Ignored by default (it compiles the driver with g++
//! and runs one thread per CUDA thread):
//!
//!     cargo test -p lorax-engine --test lora_emulated -- --ignored --nocapture
//!
//! Without g++ the test prints `SKIPPED: ...` and returns.
#![allow(clippy::unwrap_used)]

mod cuda_common;

use std::path::Path;
use std::process::Command;

use cuda_common::{build_emulated, say};

#[test]
#[ignore = "CPU emulation of the decode LoRA kernels: slow, needs g++"]
fn lora_kernels_match_a_double_reference_under_emulation() {
    let kernels = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kernels");
    let dir = tempfile::tempdir().unwrap();
    // The SGMV kernels (compiled, not run here) take dynamic shared memory, which the emulation's
    // `static` __shared__ cannot declare `extern`: a fixed 48 KiB array stands in.
    let source = std::fs::read_to_string(kernels.join("lora.cu")).unwrap();
    let fixed = source.replace("extern __shared__ float sm[];", "__shared__ float sm[12288];");
    assert_ne!(
        source, fixed,
        "lora.cu no longer declares `extern __shared__ float sm[]`"
    );
    std::fs::write(dir.path().join("lora.cu"), fixed).unwrap();
    std::fs::copy(kernels.join("common.cuh"), dir.path().join("common.cuh")).unwrap();
    // The default expand (loads and stores of y), then the pair reductions of LORA_EXPAND_RED=1.
    for (what, defines, form) in [
        ("loads and stores", &[][..], "LORA_RED 0"),
        ("reductions", &["-DLORA_EXPAND_RED=1"][..], "LORA_RED 1"),
    ] {
        let exe = dir.path().join("emu");
        if !build_emulated("lora_driver.cpp", dir.path(), defines, &exe) {
            return;
        }
        say(&format!("== bgmv_expand_ix by {what}"));
        let out = Command::new(&exe).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        say(&stdout);
        assert!(stdout.starts_with(form), "lora_driver.cpp ({what}) built another form");
        assert!(out.status.success(), "lora_driver.cpp ({what}): {}", out.status);
    }
}
