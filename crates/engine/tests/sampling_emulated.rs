//! kernels/sampling.cu under a CPU emulation of CUDA (tests/emu/cuemu.h: one thread per CUDA thread,
//! barriers, warp exchanges), against the host sampler, on the cases of `sampling_cases`. It checks the
//! kernel's logic (every barrier, index and tie rule) on a machine without a GPU, before device time is
//! spent; the GPU itself is checked by `cuda_sampling`. Ignored by default (it compiles the driver with
//! g++ and runs 512 threads per row):
//!
//!     cargo test -p lorax-engine --test sampling_emulated -- --ignored --nocapture
//!
//! `EMU_ROWS` and `EMU_VOCABS` (comma-separated) size the random cases; the seed is printed
//! (`LORAX_TEST_SEED` replays). Without g++ the test prints `SKIPPED: ...` and returns.
#![allow(clippy::unwrap_used)]

mod cuda_common;
mod sampling_cases;

use std::path::{Path, PathBuf};
use std::process::Command;

use cuda_common::{build_emulated, say, seed, Rng};
use lorax_engine::backend::cuda::sampling::{split_tasks, SamplePack};
use lorax_engine::sampling::Sampled;
use sampling_cases::{case, compare, fixed_case, reference, run, samplers, Case, Tally};

/// Builds the emulated kernel once per test run; `None` (after saying why) without g++.
fn driver() -> Option<PathBuf> {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = std::env::temp_dir().join(format!("lorax-sampling-emu-{}", std::process::id()));
    if exe.exists() {
        return Some(exe);
    }
    let kernels = here.join("../../kernels");
    build_emulated("sampling_driver.cpp", &kernels, &[], &exe).then_some(exe)
}

/// The kernel's output words for `pack` over the case's logits.
fn emulate(exe: &Path, c: &Case, pack: &SamplePack) -> Vec<u32> {
    let rows = c.specs.len() as u32;
    let header = [
        c.vocab as u32,
        rows,
        pack.len() as u32,
        pack.stride() as u32,
        0,
        pack.pen_tok.len() as u32,
    ];
    let mut input: Vec<u8> = header.iter().flat_map(|w| w.to_le_bytes()).collect();
    input.extend(c.logits.iter().flat_map(|v| v.to_le_bytes()));
    input.extend(
        pack.rows
            .iter()
            .chain(&pack.pen_tok)
            .chain(&pack.pen_cnt)
            .flat_map(|w| w.to_le_bytes()),
    );
    input.extend(pack.uniforms.iter().flat_map(|u| u.to_le_bytes()));
    let dir = tempfile::tempdir().unwrap();
    let (inp, outp) = (dir.path().join("in"), dir.path().join("out"));
    std::fs::write(&inp, input).unwrap();
    let st = Command::new(exe).arg(&inp).arg(&outp).status().unwrap();
    assert!(st.success(), "emulated kernel: {st}");
    let o = std::fs::read(&outp).unwrap();
    o.chunks_exact(4)
        .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
        .collect()
}

/// The device path (`split_tasks`, as `CudaBackend::sample` runs it) with the emulated kernel.
fn device(exe: &Path, c: &Case) -> Vec<Sampled> {
    let mut s = samplers(c);
    let rows = c.specs.len();
    run(c, &mut s, &mut |tasks| {
        split_tasks(
            rows,
            c.vocab,
            tasks,
            &mut |pack| Ok(emulate(exe, c, pack)),
            &mut |picked| {
                Ok(picked
                    .iter()
                    .flat_map(|&r| c.logits[r * c.vocab..(r + 1) * c.vocab].to_vec())
                    .collect())
            },
        )
        .unwrap()
    })
}

fn check(exe: &Path, c: &Case, total: &mut Tally) {
    let t = compare(c, &device(exe, c), &reference(c));
    say(&format!("  {}: {t:?}", c.name));
    total.add(&t);
}

#[test]
#[ignore = "CPU emulation of the sampling kernel: slow, needs g++"]
fn emulated_kernel_matches_host() {
    let Some(exe) = driver() else { return };
    let mut rng = Rng(seed("sampling emulated"));
    let env = |k: &str| std::env::var(k).ok();
    let rows: usize = env("EMU_ROWS").and_then(|v| v.parse().ok()).unwrap_or(32);
    let vocabs: Vec<usize> = env("EMU_VOCABS")
        .map(|v| v.split(',').map(|x| x.trim().parse().unwrap()).collect())
        .unwrap_or_else(|| vec![777, 3000, 4099]);
    let mut total = Tally::default();
    for &v in &vocabs {
        check(&exe, &fixed_case(&mut rng, v), &mut total);
        let c = case(&mut rng, &format!("v{v} b{rows}"), v, rows, &[0, 1, 2, 3, 4, 5, 6, 7]);
        check(&exe, &c, &mut total);
    }
    say(&format!("total: {total:?}"));
    assert_eq!(
        total.drawn_boundary, 0,
        "the emulation uses the host's own exp and sums"
    );
}
