//! The one layout a Hopper prefill attention (bench/NOTES.md session 40, "A Hopper prefill attention") needs
//! that kernels/skinny.cu has not verified: `O = P · V` on warpgroup MMA with P (64 query rows x 16 keys a
//! step) in registers and V's tile (64 keys x 128 head values, the head's values contiguous, as the cache
//! stores them) in shared memory in the 128-byte swizzle, read as an MN-major B operand (`imm-trans-b` 1).
//!
//! The probe kernel below computes P (64 x 64) · V (64 x 128) in four k-steps with two guesses of the
//! descriptor's byte offsets (leading 8192 / stride 1024: the two 64-value halves of the head 8 KiB apart and
//! groups of 8 keys 1 KiB apart; and the two swapped). The test says which one equals the CPU's product and
//! fails when none does (then the fragment or swizzle guesses are wrong too). The kernel compiles wherever NVRTC
//! is (`wgmma_probe_compiles`, also in CI); it runs only on a Hopper GPU, and skips visibly elsewhere.
#![allow(clippy::unwrap_used)]

mod cuda_common;

use cuda_common::{backend, say};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use lorax_engine::backend::cuda::compile::{nvrtc_present, Compiler, Source};
use lorax_engine::weights::DType;

const PROBE: Source = Source {
    name: "wgmma_probe",
    text: r#"
// out[64, 128] (f32) = p[64, 64] . v[64, 128] (bf16, row-major), one warpgroup; V through shared memory in the
// 128-byte swizzle (two halves of 64 head values, `lbo` bytes apart; each half 64 rows of 128 bytes, 16-byte
// piece c of row r at piece c ^ (r % 8)); the descriptor's leading and stride byte offsets are `lbo`, `sbo`.
#if defined(LORAX_DTYPE_BF16) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
extern "C" __global__ void __launch_bounds__(128) wgmma_pv_probe(float* out, const unsigned short* p,
                                                               const unsigned short* v, int lbo, int sbo) {
    __shared__ __align__(1024) unsigned char vs[2 * 8192];
    const int tid = threadIdx.x;
    const int half_bytes = lbo > sbo ? lbo : sbo;  // the halves' distance (8192 in the first guess)
    // The halves at 0 and `lbo` (first guess) or at 0 and `sbo` (second): both guesses place half 1 8 KiB on.
    for (int i = tid; i < 64 * 16; i += 128) {
        const int r = i / 16, c16 = i % 16, h = c16 / 8, c = c16 % 8;
        const uint4 val = *reinterpret_cast<const uint4*>(v + r * 128 + h * 64 + c * 8);
        *reinterpret_cast<uint4*>(vs + h * half_bytes + r * 128 + ((c ^ (r & 7)) * 16)) = val;
    }
    __syncthreads();
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    float d[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) d[i] = 0.f;
    unsigned base;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(base) : "l"(vs));
    const int r0 = 16 * warp + g, r1 = r0 + 8;
    for (int s = 0; s < 4; ++s) {
        const int k0 = 16 * s + 2 * t, k1 = k0 + 8;
        unsigned a0 = p[r0 * 64 + k0] | ((unsigned)p[r0 * 64 + k0 + 1] << 16);
        unsigned a1 = p[r1 * 64 + k0] | ((unsigned)p[r1 * 64 + k0 + 1] << 16);
        unsigned a2 = p[r0 * 64 + k1] | ((unsigned)p[r0 * 64 + k1 + 1] << 16);
        unsigned a3 = p[r1 * 64 + k1] | ((unsigned)p[r1 * 64 + k1 + 1] << 16);
        const unsigned addr = base + s * 2048;  // 16 keys: two groups of 8 rows of 128 bytes
        const unsigned long long desc = (unsigned long long)((addr & 0x3FFFF) >> 4) |
                                        ((unsigned long long)((lbo >> 4) & 0x3FFF) << 16) |
                                        ((unsigned long long)((sbo >> 4) & 0x3FFF) << 32) | (1ull << 62);
        asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
            "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
            "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
            "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
            "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
            "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n"
            "}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
              "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
              "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
              "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
              "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
              "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
              "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
              "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc)
            : "memory");
        asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    }
    // The accumulator fragment as mma.sync's, per 8 columns: d[4j + 2h + e] is row 16 warp + g + 8h, column
    // 8j + 2t + e.
#pragma unroll
    for (int j = 0; j < 16; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int e = 0; e < 2; ++e) out[(16 * warp + g + 8 * h) * 128 + 8 * j + 2 * t + e] = d[4 * j + 2 * h + e];
}
#else
extern "C" __global__ void wgmma_pv_probe(float* out, const unsigned short* p, const unsigned short* v, int lbo,
                                          int sbo) {}
#endif
"#,
};

/// The two guesses of (leading, stride) byte offsets.
const GUESSES: [(i32, i32); 2] = [(8192, 1024), (1024, 8192)];

fn compiler() -> Compiler {
    Compiler::new((9, 0), DType::BF16)
        .unwrap()
        .arch_specific()
        .with_cache(None)
}

#[test]
fn wgmma_probe_compiles() {
    if !nvrtc_present() {
        say("SKIPPED: NVRTC (libnvrtc.so) is not on the library path; the probe not compiled");
        return;
    }
    let out = compiler().compile(&PROBE).unwrap();
    assert!(out.cubin.windows(14).any(|w| w == b"wgmma_pv_probe"));
}

/// bf16 bits of `x` (round to nearest even) and their value.
fn bf16(x: f32) -> (u16, f32) {
    let b = x.to_bits();
    let r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16;
    (r as u16, f32::from_bits(r << 16))
}

#[test]
fn wgmma_pv_with_v_in_the_128_byte_swizzle_matches_cpu() {
    let Some(g) = backend(DType::BF16) else { return };
    if g.context().compute_capability().unwrap() != (9, 0) {
        say("SKIPPED: the wgmma probe needs compute capability 9.0 (Hopper)");
        return;
    }
    let mut rng = cuda_common::Rng(cuda_common::seed("wgmma probe"));
    let (p_bits, p_vals): (Vec<u16>, Vec<f32>) = rng.vec(64 * 64, -1.0, 1.0).into_iter().map(bf16).unzip();
    let (v_bits, v_vals): (Vec<u16>, Vec<f32>) = rng.vec(64 * 128, -1.0, 1.0).into_iter().map(bf16).unzip();
    let mut want = vec![0f32; 64 * 128];
    for r in 0..64 {
        for c in 0..128 {
            want[r * 128 + c] = (0..64).map(|k| p_vals[r * 64 + k] * v_vals[k * 128 + c]).sum();
        }
    }
    let cubin = compiler().compile(&PROBE).unwrap().cubin;
    let module = g.context().load_module(Ptx::from_binary(cubin)).unwrap();
    let f = module.load_function("wgmma_pv_probe").unwrap();
    let s = g.stream();
    let (dp, dv) = (s.clone_htod(&p_bits).unwrap(), s.clone_htod(&v_bits).unwrap());
    let mut matched = Vec::new();
    for (lbo, sbo) in GUESSES {
        let mut out = s.alloc_zeros::<f32>(64 * 128).unwrap();
        let mut launch = s.launch_builder(&f);
        launch.arg(&mut out).arg(&dp).arg(&dv).arg(&lbo).arg(&sbo);
        // SAFETY: the arguments match the kernel's parameters; the buffers hold 64 x 128 f32, 64 x 64 and
        // 64 x 128 bf16.
        let one_warpgroup = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { launch.launch(one_warpgroup) }.unwrap();
        let got = s.clone_dtoh(&out).unwrap();
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
            .fold(0f32, |m, e| if e.is_nan() { f32::INFINITY } else { m.max(e) });
        say(&format!(
            "wgmma P.V probe, leading byte offset {lbo}, stride byte offset {sbo}: worst relative error {worst:.2e}"
        ));
        if worst < 1e-3 {
            matched.push((lbo, sbo));
        }
    }
    assert!(
        !matched.is_empty(),
        "no descriptor guess gives P.V: the fragment, swizzle or descriptor layout is wrong"
    );
    say(&format!("wgmma P.V probe: the layout that matches: {matched:?}"));
}
