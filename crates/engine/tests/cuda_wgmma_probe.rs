//! Two probes for a Hopper prefill attention (bench/NOTES.md sessions 40-41, "A Hopper prefill attention"), one
//! module on kernels/wgmma.cuh's helpers compiled with NVRTC for sm_90a (`wgmma_probes_compile` wherever NVRTC is,
//! CI too; the others run only on a GPU of compute capability 9.0 and skip visibly elsewhere). Both passed on an
//! H100 in session 41 (leading 8192, stride 1024); the engine's kernel built on them is kernels/prefill_sm90.cu.
//!
//! - **The layout kernels/skinny.cu had not verified** (`wgmma_pv_probe`): `O = P · V` on warpgroup MMA with P
//!   (64 query rows x 16 keys a step) in registers and V's tile (64 keys x 128 head values, the head's values
//!   contiguous, as the cache stores them) in shared memory in the 128-byte swizzle, read as an MN-major B operand
//!   (`imm-trans-b` 1): P (64 x 64) · V (64 x 128) in four k-steps under two guesses of the descriptor's byte
//!   offsets (leading 8192 / stride 1024: the head's two 64-value halves 8 KiB apart and groups of 8 keys 1 KiB
//!   apart; and the two swapped). The test says which one equals the CPU's product and fails when none does (then
//!   the fragment or swizzle guesses are wrong too).
//! - **A first attention on it** (`wgmma_attention_probe`), against the CPU and timed at 1000 tokens.
#![allow(clippy::unwrap_used)]

mod cuda_common;

use cuda_common::{backend, say};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use lorax_engine::backend::cuda::compile::{nvrtc_present, Compiler, Source, HOPPER_SOURCES};
use lorax_engine::weights::DType;

/// A first causal prefill attention on warpgroup MMA, for the shapes of the Mistral-7B prefill (head size 128,
/// grouped queries), on contiguous q [T, H, 128], k and v [T, KVH, 128] (bf16 bits) and an f32 output: one
/// warpgroup a block for 64 query rows of one head; keys 64 at a time in two shared-memory stages (`cp.async`
/// into the 128-byte swizzle); S = Q·Kᵀ with both operands K-major in shared memory (`sk_desc`); the online
/// softmax on S's fragment in registers; O += P·V with P in registers and V read as an MN-major operand (the
/// descriptor offsets `lbo`, `sbo` are the P.V probe's question). Nothing overlapped: 66 µs at 1000 tokens on
/// an H100 (session 41), where kernels/prefill_sm90.cu (the engine's, through the paged cache) overlaps.
///
/// The module also holds the P.V probe's kernel (`wgmma_pv_probe`), which shares the attention's helpers; both
/// use kernels/wgmma.cuh's (`sk_smem`, `sk_desc`, `wgmma_desc_mn`, `wgmma_n64`, `wgmma_rs_n128_tb`, the fence,
/// commit and wait), which [`probes`] compiles before them.
const PROBE_KERNELS: &str = r#"
#if defined(LORAX_DTYPE_BF16) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define WA_TILE 16384  // one 64-row x 128-value tile: two halves of 64 rows x 128 bytes
#define WA_NEG_INF __int_as_float(0xff800000)

// Rows row0.. of a [rows, stride] bf16 matrix (128 values from `src`), into two halves of the 128-byte
// swizzle at dst (16-byte piece c of row r at piece c ^ (r % 8)); rows past `rows` read as zeros.
__device__ __forceinline__ void wa_load(unsigned dst, const unsigned short* src, int row0, int rows, int stride) {
    for (int i = threadIdx.x; i < 64 * 16; i += 128) {
        const int r = i / 16, h = (i % 16) / 8, c = i % 8;
        const bool ok = row0 + r < rows;
        const unsigned short* s = src + (size_t)(ok ? row0 + r : 0) * stride + h * 64 + c * 8;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst + h * 8192 + r * 128 + ((c ^ (r & 7)) << 4)),
                     "l"(s), "r"(ok ? 16 : 0)
                     : "memory");
    }
}

// out[64, 128] (f32) = p[64, 64] . v[64, 128] (bf16, row-major), one warpgroup; V through shared memory in the
// 128-byte swizzle (two halves of 64 head values 8 KiB apart; each half 64 rows of 128 bytes, 16-byte piece c of
// row r at piece c ^ (r % 8)); the descriptor's leading and stride byte offsets are `lbo`, `sbo`.
extern "C" __global__ void __launch_bounds__(128) wgmma_pv_probe(float* out, const unsigned short* p,
                                                               const unsigned short* v, int lbo, int sbo) {
    // Aligned up to 1024 bytes by hand (the swizzle's pattern starts there; the static array's alignment is a
    // request the compiler need not keep).
    __shared__ __align__(1024) unsigned char vs_raw[2 * 8192 + 1024];
    const unsigned vs = (sk_smem(vs_raw) + 1023) & ~1023u;
    wa_load(vs, v, 0, 64, 128);
    asm volatile("cp.async.commit_group;" ::: "memory");
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    // Each thread's copies visible to the async proxy (wgmma's operand reads), then everyone's.
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncthreads();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    float d[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) d[i] = 0.f;
    const int r0 = 16 * warp + g, r1 = r0 + 8;
    for (int s = 0; s < 4; ++s) {
        // Rows g and g + 8 of the warp's 16, keys 2t and 2t + 8 of the step (mma.sync's A fragment).
        const int k0 = 16 * s + 2 * t, k1 = k0 + 8;
        const u32 a[4] = {p[r0 * 64 + k0] | ((unsigned)p[r0 * 64 + k0 + 1] << 16),
                               p[r1 * 64 + k0] | ((unsigned)p[r1 * 64 + k0 + 1] << 16),
                               p[r0 * 64 + k1] | ((unsigned)p[r0 * 64 + k1 + 1] << 16),
                               p[r1 * 64 + k1] | ((unsigned)p[r1 * 64 + k1 + 1] << 16)};
        wgmma_fence();
        wgmma_rs_n128_tb(d, a, wgmma_desc_mn(vs + s * 2048, lbo, sbo));  // 16 keys: two groups of 8 rows of 128 bytes
        wgmma_commit();
        wgmma_wait<0>();
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

// Grid (ceil(T / 64), H); 128 threads; 5 x WA_TILE bytes of dynamic shared memory.
extern "C" __global__ void __launch_bounds__(128) wgmma_attention_probe(float* out, const unsigned short* q,
                                                                      const unsigned short* k, const unsigned short* v,
                                                                      int t_len, int heads, int kv_heads, float scale,
                                                                      int lbo, int sbo) {
    extern __shared__ __align__(1024) unsigned char wa_s[];
    const unsigned base = (sk_smem(wa_s) + 1023) & ~1023u;  // the swizzle wants 1024-byte alignment
    const unsigned qs = base, ks = base + WA_TILE, vs = base + 3 * WA_TILE;
    const int q0 = blockIdx.x * 64, h = blockIdx.y, kvh = h / (heads / kv_heads);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const float sl2 = scale * 1.4426950408889634f;
    const int last = (min(t_len - 1, q0 + 63)) / 64;  // the last key tile any row of this block attends
    wa_load(qs, q + h * 128, q0, t_len, heads * 128);
    wa_load(ks, k + kvh * 128, 0, t_len, kv_heads * 128);
    wa_load(vs, v + kvh * 128, 0, t_len, kv_heads * 128);
    asm volatile("cp.async.commit_group;" ::: "memory");
    float o[64], m[2] = {WA_NEG_INF, WA_NEG_INF}, l[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.f;
    for (int kt = 0; kt <= last; ++kt) {
        const int st = kt & 1;
        if (kt < last) {
            wa_load(ks + (st ^ 1) * WA_TILE, k + kvh * 128, (kt + 1) * 64, t_len, kv_heads * 128);
            wa_load(vs + (st ^ 1) * WA_TILE, v + kvh * 128, (kt + 1) * 64, t_len, kv_heads * 128);
            asm volatile("cp.async.commit_group;" ::: "memory");
            asm volatile("cp.async.wait_group 1;" ::: "memory");
        } else {
            asm volatile("cp.async.wait_group 0;" ::: "memory");
        }
        // Each thread's copies visible to the async proxy (wgmma's operand reads), then everyone's.
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        __syncthreads();
        float s[32];
        wgmma_fence();
#pragma unroll
        for (int hf = 0; hf < 2; ++hf)
#pragma unroll
            for (int kk = 0; kk < 4; ++kk)
                wgmma_n64(s, sk_desc(qs + hf * 8192 + kk * 32), sk_desc(ks + st * WA_TILE + hf * 8192 + kk * 32), hf + kk);
        wgmma_commit();
        wgmma_wait<0>();
        // s[4j + 2hh + e]: row 16 warp + g + 8 hh, key kt * 64 + 8j + 2t + e.
        u32 pa[16];
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int row = q0 + 16 * warp + g + 8 * hh;
            float mx = m[hh];
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int key = kt * 64 + 8 * j + 2 * t + e;
                    float x = s[4 * j + 2 * hh + e] * sl2;
                    if (key > row || key >= t_len) x = WA_NEG_INF;
                    s[4 * j + 2 * hh + e] = x;
                    mx = fmaxf(mx, x);
                }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float mb = mx == WA_NEG_INF ? 0.f : mx;
            const float corr = exp2f(m[hh] - mb);
            m[hh] = mx;
            l[hh] *= corr;
#pragma unroll
            for (int j = 0; j < 16; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) o[4 * j + 2 * hh + e] *= corr;
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float pv = exp2f(s[4 * j + 2 * hh + e] - mb);
                    s[4 * j + 2 * hh + e] = pv;
                    l[hh] += pv;
                }
        }
        // P's fragments for keys 16 ks..: rows g and g + 8, keys 2t and 2t + 8 of the step.
#pragma unroll
        for (int ks2 = 0; ks2 < 4; ++ks2) {
            pa[4 * ks2 + 0] = pack_f(s[8 * ks2 + 0], s[8 * ks2 + 1]);
            pa[4 * ks2 + 1] = pack_f(s[8 * ks2 + 2], s[8 * ks2 + 3]);
            pa[4 * ks2 + 2] = pack_f(s[8 * ks2 + 4], s[8 * ks2 + 5]);
            pa[4 * ks2 + 3] = pack_f(s[8 * ks2 + 6], s[8 * ks2 + 7]);
        }
        wgmma_fence();
#pragma unroll
        for (int ks2 = 0; ks2 < 4; ++ks2) wgmma_rs_n128_tb(o, pa + 4 * ks2, wgmma_desc_mn(vs + st * WA_TILE + ks2 * 2048, lbo, sbo));
        wgmma_commit();
        wgmma_wait<0>();
        __syncthreads();  // the stage is loaded again two tiles on
    }
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 1);
        l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 2);
        const int row = q0 + 16 * warp + g + 8 * hh;
        if (row >= t_len) continue;
        const float inv = l[hh] > 0.f ? 1.f / l[hh] : 0.f;
#pragma unroll
        for (int j = 0; j < 16; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e)
                out[((size_t)row * heads + h) * 128 + 8 * j + 2 * t + e] = o[4 * j + 2 * hh + e] * inv;
    }
}
#else
extern "C" __global__ void wgmma_pv_probe(float* out, const unsigned short* p, const unsigned short* v, int lbo,
                                          int sbo) {}
extern "C" __global__ void wgmma_attention_probe(float* out, const unsigned short* q, const unsigned short* k,
                                                 const unsigned short* v, int t_len, int heads, int kv_heads,
                                                 float scale, int lbo, int sbo) {}
#endif
"#;

/// The probes' module: the skinny module (kernels/wgmma.cuh, the engine's wgmma helpers, then kernels/skinny.cu),
/// then [`PROBE_KERNELS`].
fn probes() -> Source {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let skinny = HOPPER_SOURCES
        .iter()
        .find(|s| s.name == "skinny")
        .expect("the skinny module");
    Source {
        name: "wgmma_probes",
        text: TEXT.get_or_init(|| format!("{}\n{PROBE_KERNELS}", skinny.text)),
    }
}

/// The two guesses of (leading, stride) byte offsets.
const GUESSES: [(i32, i32); 2] = [(8192, 1024), (1024, 8192)];

fn compiler() -> Compiler {
    Compiler::new((9, 0), DType::BF16)
        .unwrap()
        .arch_specific()
        .with_cache(None)
}

/// Where an attention output is off, for the next step's debugging: the (token, head) rows whose own relative
/// error passes 2e-2, how many, the first, and how many fall in each 64-token query tile (all tiles alike
/// points at a layout; the diagonal's last rows at the mask; one tile at the stages).
fn diagnose(got: &[f32], want: &[f32], t_len: usize, heads: usize) -> String {
    let mut bad = Vec::new();
    for i in 0..t_len {
        for h in 0..heads {
            let r = (i * heads + h) * 128..(i * heads + h + 1) * 128;
            let e = cuda_common::rel_err(&got[r.clone()], &want[r]);
            if e.is_nan() || e > 2e-2 {
                bad.push((i, h));
            }
        }
    }
    let mut per_tile = vec![0usize; t_len.div_ceil(64)];
    for &(i, _) in &bad {
        per_tile[i / 64] += 1;
    }
    format!(
        "{} of {} (token, head) rows off by more than 2e-2; the first {:?}; per 64-token tile {per_tile:?}",
        bad.len(),
        t_len * heads,
        bad.first()
    )
}

#[test]
fn wgmma_probes_compile() {
    if !nvrtc_present() {
        say("SKIPPED: NVRTC (libnvrtc.so) is not on the library path; the probes not compiled");
        return;
    }
    let mut c = compiler();
    c.verbose = true;
    let out = c.compile(&probes()).unwrap();
    for name in ["wgmma_pv_probe", "wgmma_attention_probe"] {
        assert!(
            out.cubin.windows(name.len()).any(|w| w == name.as_bytes()),
            "{name} missing"
        );
    }
    // ptxas's resource report (registers, spills), for the record.
    say(out.log.trim());
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
    let cubin = compiler().compile(&probes()).unwrap().cubin;
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

/// Causal attention with grouped queries on the CPU (f64 sums) from bf16 values: out [T, H, 128].
fn attention_cpu(q: &[f32], k: &[f32], v: &[f32], t_len: usize, (heads, kv_heads): (usize, usize)) -> Vec<f32> {
    let scale = 1.0 / (128f64).sqrt();
    let mut out = vec![0f32; t_len * heads * 128];
    for h in 0..heads {
        let kvh = h / (heads / kv_heads);
        for i in 0..t_len {
            let qi = &q[(i * heads + h) * 128..][..128];
            let scores: Vec<f64> = (0..=i)
                .map(|j| {
                    let kj = &k[(j * kv_heads + kvh) * 128..][..128];
                    qi.iter()
                        .zip(kj)
                        .map(|(a, b)| f64::from(*a) * f64::from(*b))
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let mx = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
            let sum: f64 = w.iter().sum();
            for c in 0..128 {
                let acc: f64 = w
                    .iter()
                    .enumerate()
                    .map(|(j, wj)| wj * f64::from(v[(j * kv_heads + kvh) * 128 + c]))
                    .sum();
                out[(i * heads + h) * 128 + c] = (acc / sum) as f32;
            }
        }
    }
    out
}

/// The attention probe against the CPU at 130 tokens (two query tiles, partial tiles) under both descriptor
/// guesses, then at 1000 tokens (the TTFT prompt) under the one that holds, and its time there (informational:
/// compare with `cuda_bench prefill_benchmarks` and scripts/gpu/attn_probe.py in the same call).
#[test]
fn wgmma_attention_probe_matches_cpu() {
    let Some(g) = backend(DType::BF16) else { return };
    if g.context().compute_capability().unwrap() != (9, 0) {
        say("SKIPPED: the wgmma attention probe needs compute capability 9.0 (Hopper)");
        return;
    }
    let (heads, kv_heads) = (32usize, 8usize);
    let cubin = compiler().compile(&probes()).unwrap().cubin;
    let module = g.context().load_module(Ptx::from_binary(cubin)).unwrap();
    let f = module.load_function("wgmma_attention_probe").unwrap();
    let smem = 5 * 16384 + 1024;
    f.set_attribute(
        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        smem as i32,
    )
    .unwrap();
    let s = g.stream();
    let mut rng = cuda_common::Rng(cuda_common::seed("wgmma attention probe"));
    let mut run = |t_len: usize, (lbo, sbo): (i32, i32), reps: usize| -> (f64, f32) {
        let (qb, qv): (Vec<u16>, Vec<f32>) = rng.vec(t_len * heads * 128, -1.0, 1.0).into_iter().map(bf16).unzip();
        let (kb, kv): (Vec<u16>, Vec<f32>) = rng.vec(t_len * kv_heads * 128, -1.0, 1.0).into_iter().map(bf16).unzip();
        let (vb, vv): (Vec<u16>, Vec<f32>) = rng.vec(t_len * kv_heads * 128, -1.0, 1.0).into_iter().map(bf16).unzip();
        let (dq, dk, dv) = (
            s.clone_htod(&qb).unwrap(),
            s.clone_htod(&kb).unwrap(),
            s.clone_htod(&vb).unwrap(),
        );
        let mut out = s.alloc_zeros::<f32>(t_len * heads * 128).unwrap();
        let (tl, hs, kvs, scale) = (t_len as i32, heads as i32, kv_heads as i32, 1.0f32 / 128f32.sqrt());
        let cfg = LaunchConfig {
            grid_dim: (t_len.div_ceil(64) as u32, heads as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem,
        };
        let (t0, t1) = (cuda_common::event(&g), cuda_common::event(&g));
        for i in 0..=reps {
            if i == 1 {
                t0.record(s).unwrap();
            }
            let mut launch = s.launch_builder(&f);
            launch
                .arg(&mut out)
                .arg(&dq)
                .arg(&dk)
                .arg(&dv)
                .arg(&tl)
                .arg(&hs)
                .arg(&kvs)
                .arg(&scale)
                .arg(&lbo)
                .arg(&sbo);
            // SAFETY: the arguments match the kernel's parameters; the buffers hold what the shapes say.
            unsafe { launch.launch(cfg) }.unwrap();
        }
        t1.record(s).unwrap();
        let got = s.clone_dtoh(&out).unwrap();
        let us = if reps > 0 {
            f64::from(t0.elapsed_ms(&t1).unwrap()) * 1e3 / reps as f64
        } else {
            0.0
        };
        let want = attention_cpu(&qv, &kv, &vv, t_len, (heads, kv_heads));
        let err = cuda_common::rel_err(&got, &want) as f32;
        if err.is_nan() || err >= 1e-2 {
            say(&format!("  {}", diagnose(&got, &want, t_len, heads)));
        }
        (us, err)
    };
    let mut found = None;
    for guess in GUESSES {
        let (_, err) = run(130, guess, 0);
        say(&format!(
            "wgmma attention probe, 130 tokens, offsets {guess:?}: rel err {err:.2e}"
        ));
        if err < 1e-2 {
            found = Some(guess);
        }
    }
    let guess = found.expect("no descriptor guess gives the attention: see the P.V probe's lines");
    let (us, err) = run(1000, guess, 20);
    let flops = 4.0 * 1000.0 * 1000.0 / 2.0 * 128.0 * heads as f64;
    say(&format!(
        "wgmma attention probe, 1000 tokens, offsets {guess:?}: rel err {err:.2e}, {us:.1} us a launch ({:.0} TFLOP/s over the causal triangle)",
        flops / us / 1e6
    ));
    assert!(err < 1e-2, "1000 tokens: rel err {err:e}");
}
