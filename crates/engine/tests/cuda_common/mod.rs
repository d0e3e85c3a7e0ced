//! Shared helpers of the CUDA tests: a backend or a visible skip, random data, rounding to a storage
//! type, relative errors, and a line per check on stderr (libtest does not capture direct writes, so
//! the numbers show in the GPU run's logs).
#![allow(dead_code, clippy::unwrap_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use cudarc::driver::sys::{CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::CudaEvent;
use lorax_engine::weights::DType;
use lorax_engine::{CudaBackend, Result};

/// The fixtures: `LORAX_FIXTURES`, else this checkout's `tests/fixtures` (test binaries built on one
/// machine run on the GPU machine from another path).
pub fn fixtures() -> PathBuf {
    std::env::var_os("LORAX_FIXTURES").map_or_else(
        || PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")),
        PathBuf::from,
    )
}

/// Builds the CPU-emulation driver `tests/emu/<driver>` (against `tests/emu/cuemu.h` and the kernel sources
/// in `kernels`, with the preprocessor `defines`, e.g. `-DNAME=1`) with g++ into `exe`; `false`, after saying
/// why, when there is no g++.
pub fn build_emulated(driver: &str, kernels: &Path, defines: &[&str], exe: &Path) -> bool {
    let emu = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/emu");
    let out = Command::new("g++")
        .args([
            "-std=c++20",
            "-O2",
            "-fno-strict-aliasing",
            "-ffp-contract=off",
            "-pthread",
            "-w",
        ])
        .arg("-I")
        .arg(&emu)
        .arg("-I")
        .arg(kernels)
        .args(defines)
        .arg(emu.join(driver))
        .arg("-o")
        .arg(exe)
        .output();
    match out {
        Ok(o) if o.status.success() => true,
        Ok(o) => panic!("g++ failed on {driver}:\n{}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => {
            say(&format!("SKIPPED: no g++ to build the emulated kernel ({e})"));
            false
        }
    }
}

/// Prints to stderr past libtest's capture.
pub fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

/// A CUDA backend storing `dtype`, or `None` after printing why the test is skipped. A machine with a
/// device on which the backend cannot be created fails the test.
pub fn backend(dtype: DType) -> Option<CudaBackend> {
    match CudaBackend::probe() {
        Err(why) => {
            say(&format!("SKIPPED: no CUDA device ({why})"));
            None
        }
        Ok(_) => Some(CudaBackend::new(0, dtype).unwrap_or_else(|e| panic!("a CUDA device is present but: {e}"))),
    }
}

/// SplitMix64: small, seedable, good enough for test data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }

    pub fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// A random permutation of 0..n.
    pub fn perm(&mut self, n: usize) -> Vec<u32> {
        let mut v: Vec<u32> = (0..n as u32).collect();
        for i in (1..n).rev() {
            v.swap(i, self.below(i + 1));
        }
        v
    }
}

/// A fresh seed per call (time-based), printed so a failure can be replayed with LORAX_TEST_SEED.
pub fn seed(name: &str) -> u64 {
    let s = std::env::var("LORAX_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    say(&format!("{name}: seed {s}"));
    s
}

/// The values as `dtype` stores them.
pub fn round(dtype: DType, v: &[f32]) -> Vec<f32> {
    match dtype {
        DType::F32 => v.to_vec(),
        DType::BF16 => v.iter().map(|x| half::bf16::from_f32(*x).to_f32()).collect(),
        DType::F16 => v.iter().map(|x| half::f16::from_f32(*x).to_f32()).collect(),
    }
}

/// Relative-error tolerance of a kernel against the f32 CPU backend on the same (rounded) inputs:
/// one output rounding plus accumulation-order differences.
pub fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 1e-2,
        DType::F16 => 2e-3,
        DType::F32 => 2e-5,
    }
}

/// ‖a − b‖ / ‖b‖, NaN (never passes) when `a` has a non-finite value.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    if a.iter().any(|x| !x.is_finite()) {
        return f64::NAN;
    }
    let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    if den == 0.0 {
        return num.sqrt();
    }
    (num / den).sqrt()
}

/// Asserts `got` is within `tol` of `want` and prints the check.
pub fn check(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = rel_err(got, want);
    say(&format!("  {what}: rel err {e:.2e} (tol {tol:.0e})"));
    assert!(e <= tol, "{what}: rel err {e:e} > {tol:e}");
}

/// A CUDA event on the backend's context (for timing).
pub fn event(g: &CudaBackend) -> CudaEvent {
    g.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap()
}

/// The median (upper middle) of `v`.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One benchmark line: `BENCH name | value | unit | detail`.
pub fn bench(name: &str, value: f64, unit: &str, detail: &str) {
    say(&format!("BENCH {name} | {value:.3} | {unit} | {detail}"));
}

/// Median milliseconds per call of `f(i)`, i in 0..inner, captured once in a CUDA graph and replayed
/// `reps` times after 3 warm-up replays.
pub fn graph_ms(g: &CudaBackend, inner: usize, reps: usize, f: &dyn Fn(usize) -> Result<()>) -> f64 {
    let s = g.stream();
    g.synchronize().unwrap();
    s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    for i in 0..inner {
        f(i).unwrap();
    }
    let graph = s.end_capture(CUgraphInstantiate_flags(0)).unwrap().unwrap();
    for _ in 0..3 {
        graph.launch().unwrap();
    }
    g.synchronize().unwrap();
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        let (a, b) = (event(g), event(g));
        a.record(s).unwrap();
        graph.launch().unwrap();
        b.record(s).unwrap();
        v.push(f64::from(a.elapsed_ms(&b).unwrap()) / inner as f64);
    }
    median(v)
}
