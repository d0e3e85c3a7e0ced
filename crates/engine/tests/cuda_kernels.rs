//! Every CUDA kernel against its CPU twin on fresh random inputs (seed printed; LORAX_TEST_SEED replays),
//! across edge shapes: GQA ratios 1/4/8/16, head sizes 8..256, block boundaries, long contexts that take
//! the split path, prefill over variable-length sequences with cached prefixes, sliding windows; LoRA
//! ranks 8..128 mixed in one batch, one-token segments, base rows left untouched bit for bit. Inputs are
//! rounded to the storage type before the CPU sees them, so the tolerance covers only output rounding and
//! summation order (see `cuda_common::tol`). Outputs are poisoned with NaN bytes before every kernel.
//! Without a CUDA device each test prints `SKIPPED: no CUDA device (...)` and returns.
#![allow(clippy::unwrap_used)]

mod cuda_common;

use cuda_common::{backend, check, round, say, seed, tol, Rng};
use lorax_engine::backend::cuda::{AttnKernel, GemmSm90, PrefillShape, PREFILL_SM90_LABELS};
use lorax_engine::backend::{AttnMeta, AttnSeq, LoraSegment};
use lorax_engine::weights::DType;
use lorax_engine::{Backend, CpuBackend, CudaBackend, EngineError};

const DTYPES: [DType; 3] = [DType::BF16, DType::F16, DType::F32];

fn gpu(dtype: DType) -> Option<CudaBackend> {
    let mut b = backend(dtype)?;
    b.set_poison(true);
    say(&format!("backend: {}", b.name()));
    Some(b)
}

/// Random values as stored in `dtype`, uploaded to both backends.
struct Pair {
    host: Vec<f32>,
    cpu: lorax_engine::CpuTensor,
    gpu: lorax_engine::CudaTensor,
}

fn pair(g: &CudaBackend, rng: &mut Rng, shape: &[usize], lo: f32, hi: f32) -> Pair {
    let n = shape.iter().product();
    let host = round(g.dtype(), &rng.vec(n, lo, hi));
    Pair {
        cpu: CpuBackend.tensor_from_f32(shape, &host).unwrap(),
        gpu: g.tensor_from_f32(shape, &host).unwrap(),
        host,
    }
}

#[test]
fn linear_matches_cpu() {
    let mut rng = Rng(seed("linear"));
    // Rows 1-4 run on the skinny-GEMM kernels by default; each case again with those off (cuBLAS).
    for (dt, gemv_rows) in DTYPES.into_iter().flat_map(|d| [(d, 4), (d, 0)]) {
        let Some(mut g) = gpu(dt) else { return };
        g.set_gemv_rows(gemv_rows);
        for (m, k, n, bias) in [
            (1, 32, 48, false),
            (7, 4096, 1024, true),
            (64, 4096, 512, false),
            (300, 1024, 768, true),
            (3, 100, 75, true),
            // Decode shapes: 1-4 rows (k = 100: rows not whole 16-byte vectors in 16-bit types, so cuBLAS
            // there; gemv in f32).
            (1, 4096, 1000, false),
            (1, 4096, 6144, false),
            (2, 4096, 28672, false),
            (2, 14336, 256, true),
            (4, 1032, 77, false),
            (3, 4096, 4096, false),
        ] {
            let x = pair(&g, &mut rng, &[m, k], -1.0, 1.0);
            let w = pair(&g, &mut rng, &[n, k], -0.05, 0.05);
            let b = pair(&g, &mut rng, &[n], -1.0, 1.0);
            let want = CpuBackend.linear(&x.cpu, &w.cpu, bias.then_some(&b.cpu)).unwrap();
            let got = g.linear(&x.gpu, &w.gpu, bias.then_some(&b.gpu)).unwrap();
            assert_eq!(g.shape(&got), &[m, n]);
            check(
                &format!("{dt:?} linear {m}x{k}x{n} bias={bias} gemv_rows={gemv_rows}"),
                &g.to_f32(&got).unwrap(),
                &want.data,
                tol(dt),
            );
        }
    }
}

/// The wgmma skinny GEMM (kernels/skinny.cu; Hopper, 16-bit storage) against the CPU and against cuBLAS,
/// at every kernel size (8..256 rows), partial tiles (n not a multiple of 128, rows not a multiple of 8),
/// and the stream-K cases: one tile split over 64 blocks, tiles split unevenly, many whole tiles per
/// block. It is off by default (slower than cuBLAS so far); the test turns it on. Each product runs twice
/// and must repeat bit for bit (the split tiles' counters are left at
/// zero; the sum order does not depend on which block finishes last). Outputs are poisoned first.
#[test]
fn skinny_gemm_matches_cpu_and_cublas() {
    let mut rng = Rng(seed("skinny"));
    for dt in [DType::BF16, DType::F16] {
        let Some(mut g) = gpu(dt) else { return };
        if !g.set_skinny_gemm(true) {
            say("SKIPPED: the wgmma skinny GEMM cannot be built on this device (Hopper and 16-bit storage only)");
            return;
        }
        g.set_gemv_rows(0);
        let run = |g: &mut CudaBackend, skinny: bool, x: &Pair, w: &Pair| -> Vec<f32> {
            g.set_skinny_gemm(skinny);
            let y = g.linear(&x.gpu, &w.gpu, None).unwrap();
            g.to_f32(&y).unwrap()
        };
        // Against the CPU (shapes the CPU computes in well under a second).
        for (m, k, n) in [
            (5, 64, 128),
            (8, 128, 200),
            (9, 4096, 384),
            (17, 1024, 1000),
            (33, 256, 4096),
            (64, 4096, 256),
            (65, 640, 130),
            (88, 4096, 512),
            (128, 4096, 128),
            (128, 4096, 768),
            (129, 512, 640),
            (200, 1024, 256),
            (256, 4096, 384),
            (88, 14336, 256),
            (128, 64, 32000),
        ] {
            let x = pair(&g, &mut rng, &[m, k], -1.0, 1.0);
            let w = pair(&g, &mut rng, &[n, k], -0.05, 0.05);
            let want = CpuBackend.linear(&x.cpu, &w.cpu, None).unwrap();
            let got = run(&mut g, true, &x, &w);
            check(&format!("{dt:?} skinny {m}x{k}x{n} vs CPU"), &got, &want.data, tol(dt));
            let again = run(&mut g, true, &x, &w);
            assert!(
                got.iter().zip(&again).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{dt:?} skinny {m}x{k}x{n}: a second run differs"
            );
        }
        // Against cuBLAS at the Mistral-7B shapes (q/k/v, o, gate/up, down, LM head): both sum in f32 and
        // round once, so they differ by roundings only. (bf16 only, and three row counts: the test ran
        // over 4 minutes with every size in both types.)
        if dt != DType::BF16 {
            continue;
        }
        let close = 4e-3;
        for m in [8, 88, 256] {
            for (n, k) in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (32000, 4096)] {
                let x = pair(&g, &mut rng, &[m, k], -1.0, 1.0);
                let w = pair(&g, &mut rng, &[n, k], -0.02, 0.02);
                let want = run(&mut g, false, &x, &w);
                let got = run(&mut g, true, &x, &w);
                check(&format!("{dt:?} skinny {m}x{k}x{n} vs cuBLAS"), &got, &want, close);
                let again = run(&mut g, true, &x, &w);
                assert!(
                    got.iter().zip(&again).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{dt:?} skinny {m}x{k}x{n}: a second run differs"
                );
            }
        }
    }
}

/// The Hopper prompt GEMM (kernels/gemm_sm90.cu; 16-bit storage): the plain product against the CPU and
/// cuBLAS, and the gate/up product with silu-mul in its epilogue against cuBLAS's product then `silu_mul`,
/// which round alike (the products differ by summation order only), and the product added into its output
/// against cuBLAS's product then `add_assign`. Partial tiles (rows not a multiple of
/// 128, columns not of 128 or 256), several tiles a block (more tiles than multiprocessors), one stage of k,
/// and a gate/up weight with rows past 2f (a LoRA scratch block's place) that must not be read as up rows.
/// Outputs are poisoned first, so a column or row the kernel skips fails. On compute capability 9.0 the
/// module must build; elsewhere the test is skipped, visibly.
#[test]
fn gemm_sm90_matches_cpu_and_cublas() {
    let mut rng = Rng(seed("gemm_sm90"));
    for dt in [DType::BF16, DType::F16] {
        let Some(mut g) = gpu(dt) else { return };
        g.set_gemv_rows(0);
        if !g.set_gemm_sm90(GemmSm90::All, 1) {
            assert!(
                g.context().compute_capability().unwrap() != (9, 0),
                "the Hopper prompt GEMM must build on compute capability 9.0"
            );
            say("SKIPPED: the Hopper prompt GEMM runs on compute capability 9.0 with 16-bit storage only");
            return;
        }
        // The plain product through `linear`, which falls back to cuBLAS silently: the launch count tells.
        let linear = |g: &mut CudaBackend, on: bool, x: &Pair, w: &Pair| -> Vec<f32> {
            g.set_gemm_sm90(if on { GemmSm90::All } else { GemmSm90::Off }, 1);
            let before = g.gemm_sm90_launches();
            let y = g.linear(&x.gpu, &w.gpu, None).unwrap();
            assert_eq!(
                g.gemm_sm90_launches() - before,
                u64::from(on),
                "the Hopper prompt GEMM ran (or not)"
            );
            g.to_f32(&y).unwrap()
        };
        for (m, k, n) in [
            (1, 64, 8),
            (77, 128, 200),
            (128, 512, 256),
            (300, 1024, 1000),
            (1000, 256, 4104),
        ] {
            let x = pair(&g, &mut rng, &[m, k], -1.0, 1.0);
            let w = pair(&g, &mut rng, &[n, k], -0.05, 0.05);
            let want = CpuBackend.linear(&x.cpu, &w.cpu, None).unwrap();
            let got = linear(&mut g, true, &x, &w);
            check(
                &format!("{dt:?} gemm_sm90 {m}x{k}x{n} vs CPU"),
                &got,
                &want.data,
                tol(dt),
            );
        }
        let close = 4e-3;
        for (m, k, n) in [(1000, 4096, 6144), (513, 4096, 4096), (1000, 14336, 4096)] {
            let x = pair(&g, &mut rng, &[m, k], -1.0, 1.0);
            let w = pair(&g, &mut rng, &[n, k], -0.02, 0.02);
            let want = linear(&mut g, false, &x, &w);
            let got = linear(&mut g, true, &x, &w);
            check(&format!("{dt:?} gemm_sm90 {m}x{k}x{n} vs cuBLAS"), &got, &want, close);
        }
        // silu-mul: (rows, k, f, rows of w past 2f).
        for (m, k, f, extra) in [
            (1, 64, 8, 0),
            (200, 512, 136, 0),
            (1000, 4096, 1408, 64),
            (2100, 1024, 2048, 0),
            // Just past one tile of 144 tokens, f not a multiple of 128, rows past 2f; three stages of k a tile
            // with several tiles a block (the stages' phases carried from tile to tile).
            (145, 256, 120, 8),
            (1000, 192, 8192, 0),
        ] {
            let x = pair(&g, &mut rng, &[m, k], -1.0, 1.0);
            let w = pair(&g, &mut rng, &[2 * f + extra, k], -0.05, 0.05);
            g.set_gemm_sm90(GemmSm90::Off, 1);
            assert!(
                g.linear_silu_mul(&x.gpu, &w.gpu, f).unwrap().is_none(),
                "off means no fused product"
            );
            let gate_up: Vec<f32> = w.host[..2 * f * k].to_vec();
            let w2 = g.tensor_from_f32(&[2 * f, k], &gate_up).unwrap();
            let want = g.silu_mul(&g.linear(&x.gpu, &w2, None).unwrap()).unwrap();
            let want = g.to_f32(&want).unwrap();
            g.set_gemm_sm90(GemmSm90::Silu, 1);
            // Both forms: tokens on the MMA's M side (gemm_sm90_silu) and on its N side (gemm_sm90_silu_t).
            for swap in [false, true] {
                g.set_gemm_sm90_swap(swap);
                let got = g
                    .linear_silu_mul(&x.gpu, &w.gpu, f)
                    .unwrap()
                    .expect("the fused product runs");
                assert_eq!(g.shape(&got), &[m, f][..]);
                let got = g.to_f32(&got).unwrap();
                check(
                    &format!("{dt:?} gemm_sm90_silu swap={swap} {m}x{k}x{f} (+{extra} rows) vs cuBLAS + silu_mul"),
                    &got,
                    &want,
                    close,
                );
            }
            g.set_gemm_sm90_swap(false);
            // Below the row threshold the caller's two kernels run.
            g.set_gemm_sm90(GemmSm90::Silu, m + 1);
            assert!(g.linear_silu_mul(&x.gpu, &w.gpu, f).unwrap().is_none());
        }
        // The residual add: y += x . w[..n]^T (w with rows past n, as a projection with LoRA scratch rows has),
        // against cuBLAS's product then add_assign (which rounds alike).
        for (m, k, n, extra) in [
            (1, 64, 8, 0),
            (300, 1024, 1000, 40),
            (1000, 4096, 4096, 0),
            (1000, 14336, 4096, 0),
        ] {
            let x = pair(&g, &mut rng, &[m, k], -1.0, 1.0);
            let w = pair(&g, &mut rng, &[n + extra, k], -0.02, 0.02);
            // Small beside the product (|x . w| ~ 0.02 sqrt(k) / 2), so that the relative error measures the product.
            let y0 = pair(&g, &mut rng, &[m, n], -0.05, 0.05);
            g.set_gemm_sm90(GemmSm90::Silu, 1);
            let mut y = g.tensor_from_f32(&[m, n], &y0.host).unwrap();
            assert!(
                !g.linear_add(&x.gpu, &w.gpu, &mut y).unwrap(),
                "silu alone leaves the add to the caller"
            );
            let w2 = g.tensor_from_f32(&[n, k], &w.host[..n * k]).unwrap();
            let mut want = g.tensor_from_f32(&[m, n], &y0.host).unwrap();
            g.add_assign(&mut want, &g.linear(&x.gpu, &w2, None).unwrap()).unwrap();
            let want = g.to_f32(&want).unwrap();
            g.set_gemm_sm90(GemmSm90::Fused, 1);
            assert!(g.linear_add(&x.gpu, &w.gpu, &mut y).unwrap(), "the fused add runs");
            let got = g.to_f32(&y).unwrap();
            check(
                &format!("{dt:?} gemm_sm90_add {m}x{k}x{n} (+{extra} rows) vs cuBLAS + add_assign"),
                &got,
                &want,
                close,
            );
        }
        g.set_gemm_sm90(GemmSm90::Off, 1);
    }
}

/// The silu epilogues against `silu_mul` bit for bit, on products that are exact whatever the summation order (x
/// one-hot: each output is one weight times 1), so that only silu's arithmetic and the roundings can differ: gates
/// over -100..100 with the edges of e^-g's range (±87..±90, where the fast reciprocal and the IEEE division part),
/// values near zero (f16 subnormals); up values over -4..4. Both forms, bf16 and f16. No gate is -0: the product's
/// sum of one -0 and the zero terms is +0 (session 45 call 4: the only 5 outputs of 40800 that differed, all -0
/// against +0 of one gate of -0 in 5 rows).
#[test]
fn gemm_sm90_silu_is_silu_mul_bit_for_bit() {
    let mut rng = Rng(seed("gemm_sm90_silu_bits"));
    for dt in [DType::BF16, DType::F16] {
        let Some(mut g) = gpu(dt) else { return };
        if !g.set_gemm_sm90(GemmSm90::Silu, 1) {
            assert!(g.context().compute_capability().unwrap() != (9, 0), "must build on 9.0");
            say("SKIPPED: the Hopper prompt GEMM runs on compute capability 9.0 with 16-bit storage only");
            return;
        }
        let (m, k, f) = (300, 64, 136);
        let x: Vec<f32> = (0..m * k)
            .map(|i| if i % k == (i / k) % k { 1.0 } else { 0.0 })
            .collect();
        let edges = [87.0, 87.5, 88.0, 88.5, 89.0, 90.0, 1e-3, 3e-5, 1e-7, 0.5, 20.0, 60000.0];
        let mut w = vec![0.0f32; 2 * f * k];
        for (i, v) in w[..f * k].iter_mut().enumerate() {
            *v = -100.0 + 200.0 * i as f32 / (f * k) as f32;
        }
        for (i, e) in edges.iter().enumerate() {
            w[i] = *e;
            w[edges.len() + i] = -*e;
        }
        w[f * k..].copy_from_slice(&rng.vec(f * k, -4.0, 4.0));
        let w = round(dt, &w);
        let xg = g.tensor_from_f32(&[m, k], &x).unwrap();
        let wg = g.tensor_from_f32(&[2 * f, k], &w).unwrap();
        // The gate/up output the product would give: row r, column j is w[j][r % k].
        let gate_up: Vec<f32> = (0..m * 2 * f)
            .map(|i| w[(i % (2 * f)) * k + (i / (2 * f)) % k])
            .collect();
        let want = g.silu_mul(&g.tensor_from_f32(&[m, 2 * f], &gate_up).unwrap()).unwrap();
        let want: Vec<u32> = g.to_f32(&want).unwrap().iter().map(|v| v.to_bits()).collect();
        for swap in [false, true] {
            g.set_gemm_sm90_swap(swap);
            let got = g.linear_silu_mul(&xg, &wg, f).unwrap().expect("the fused product runs");
            let got: Vec<u32> = g.to_f32(&got).unwrap().iter().map(|v| v.to_bits()).collect();
            let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            say(&format!(
                "  {dt:?} silu epilogue swap={swap}: {differ} of {} outputs differ from silu_mul",
                want.len()
            ));
            assert_eq!(differ, 0, "{dt:?} swap={swap}: the silu epilogue differs from silu_mul");
        }
        g.set_gemm_sm90(GemmSm90::Off, 1);
    }
}

/// The default (`LORAX_CUDA_GEMM_SM90` unset: [`GemmSm90::Auto`]) runs Mistral-7B's gate/up product of a
/// 1000-token prompt on the Hopper GEMM and leaves 512 rows to cuBLAS + `silu_mul` (tile fill 0.98 and 0.75 on 132
/// multiprocessors), counted by launches; the explicit `silu` form runs every size. Other multiprocessor counts
/// are skipped, visibly.
#[test]
fn gemm_sm90_auto_runs_where_its_tiles_fill() {
    let mut rng = Rng(seed("gemm_sm90_auto"));
    let Some(mut g) = gpu(DType::BF16) else { return };
    if !g.set_gemm_sm90(GemmSm90::Auto, 256) {
        assert!(g.context().compute_capability().unwrap() != (9, 0), "must build on 9.0");
        say("SKIPPED: the Hopper prompt GEMM runs on compute capability 9.0 with 16-bit storage only");
        return;
    }
    if g.num_sms() != 132 {
        say(&format!(
            "SKIPPED: the fill test's sizes are for 132 multiprocessors, this GPU has {}",
            g.num_sms()
        ));
        return;
    }
    let (k, f) = (4096, 14336);
    let w = pair(&g, &mut rng, &[2 * f, k], -0.02, 0.02);
    let runs = |g: &CudaBackend, m: usize, x: &Pair| {
        let before = g.gemm_sm90_launches();
        let out = g.linear_silu_mul(&x.gpu, &w.gpu, f).unwrap();
        assert_eq!(out.is_some(), g.gemm_sm90_launches() > before);
        if let Some(y) = &out {
            assert_eq!(g.shape(y), &[m, f][..]);
        }
        out.is_some()
    };
    let x1000 = pair(&g, &mut rng, &[1000, k], -1.0, 1.0);
    let x512 = pair(&g, &mut rng, &[512, k], -1.0, 1.0);
    assert!(runs(&g, 1000, &x1000), "1000 rows run on gemm_sm90_silu_t by default");
    assert!(!runs(&g, 512, &x512), "512 rows stay on cuBLAS + silu_mul by default");
    g.set_gemm_sm90(GemmSm90::Silu, 256);
    assert!(runs(&g, 512, &x512), "an explicit form runs every size");
    say("  auto: 1000 rows on the Hopper GEMM, 512 on cuBLAS; explicit silu: 512 too");
    g.set_gemm_sm90(GemmSm90::Off, 1);
}

#[test]
fn norms_match_cpu() {
    let mut rng = Rng(seed("norms"));
    for dt in DTYPES {
        let Some(g) = gpu(dt) else { return };
        for (rows, h) in [(1, 32), (5, 4096), (3, 5000), (17, 100), (2, 8192)] {
            let x = pair(&g, &mut rng, &[rows, h], -2.0, 2.0);
            let w = pair(&g, &mut rng, &[h], 0.5, 1.5);
            let want = CpuBackend.rms_norm(&x.cpu, &w.cpu, 1e-5).unwrap();
            let got = g.rms_norm(&x.gpu, &w.gpu, 1e-5).unwrap();
            check(
                &format!("{dt:?} rms_norm {rows}x{h}"),
                &g.to_f32(&got).unwrap(),
                &want.data,
                tol(dt),
            );

            let mut res = pair(&g, &mut rng, &[rows, h], -2.0, 2.0);
            let want = CpuBackend.add_rms_norm(&mut res.cpu, &x.cpu, &w.cpu, 1e-6).unwrap();
            let got = g.add_rms_norm(&mut res.gpu, &x.gpu, &w.gpu, 1e-6).unwrap();
            check(
                &format!("{dt:?} add_rms_norm {rows}x{h} (out)"),
                &g.to_f32(&got).unwrap(),
                &want.data,
                tol(dt),
            );
            check(
                &format!("{dt:?} add_rms_norm {rows}x{h} (residual)"),
                &g.to_f32(&res.gpu).unwrap(),
                &res.cpu.data,
                tol(dt),
            );
        }
    }
}

#[test]
fn rope_kv_write_matches_cpu() {
    let mut rng = Rng(seed("rope"));
    for dt in DTYPES {
        let Some(g) = gpu(dt) else { return };
        for (rows, heads, kv_heads, hd) in [
            (1, 4, 2, 8),
            (9, 4, 4, 16),
            (33, 32, 8, 128),
            (5, 8, 1, 64),
            (4, 2, 2, 256),
        ] {
            let half = hd / 2;
            let inv_freq: Vec<f32> = (0..half)
                .map(|i| 1.0 / 500_000f32.powf(2.0 * i as f32 / hd as f32))
                .collect();
            let positions: Vec<u32> = (0..rows).map(|_| rng.below(131_072) as u32).collect();
            let (slots_total, kv_dim) = (96, kv_heads * hd);
            let mut slots: Vec<u32> = rng.perm(slots_total)[..rows].to_vec();
            if rows > 2 {
                // A padding row writes no key or value.
                slots[1] = lorax_engine::backend::NO_SLOT;
            }
            let qkv = pair(&g, &mut rng, &[rows, (heads + 2 * kv_heads) * hd], -1.0, 1.0);
            let mut kc = pair(&g, &mut rng, &[slots_total, kv_dim], -1.0, 1.0);
            let mut vc = pair(&g, &mut rng, &[slots_total, kv_dim], -1.0, 1.0);
            let what = format!("{dt:?} rope_kv_write {rows}x({heads}+2x{kv_heads})x{hd}");
            let want = CpuBackend
                .rope_kv_write(&qkv.cpu, &mut kc.cpu, &mut vc.cpu, hd, &positions, &inv_freq, &slots)
                .unwrap();
            let got = g
                .rope_kv_write(&qkv.gpu, &mut kc.gpu, &mut vc.gpu, hd, &positions, &inv_freq, &slots)
                .unwrap();
            assert_eq!(g.shape(&got), &[rows, heads * hd][..], "{what}");
            check(
                &format!("{what} queries"),
                &g.to_f32(&got).unwrap(),
                &want.data,
                tol(dt),
            );
            // Rotated keys in their slots, every other slot untouched; values copied exactly.
            check(
                &format!("{what} keys"),
                &g.to_f32(&kc.gpu).unwrap(),
                &kc.cpu.data,
                tol(dt),
            );
            assert_eq!(g.to_f32(&vc.gpu).unwrap(), vc.cpu.data, "{what} values");
            let outside = vec![slots_total as u32; rows];
            assert!(matches!(
                g.rope_kv_write(&qkv.gpu, &mut kc.gpu, &mut vc.gpu, hd, &positions, &inv_freq, &outside),
                Err(EngineError::InvalidBatch(_))
            ));
        }
    }
}

#[test]
fn elementwise_ops_match_cpu() {
    let mut rng = Rng(seed("elementwise"));
    for dt in DTYPES {
        let Some(g) = gpu(dt) else { return };
        for (rows, cols) in [(1, 1), (3, 80), (64, 14336), (1000, 33)] {
            let a = pair(&g, &mut rng, &[rows, cols], -6.0, 6.0);
            let b = pair(&g, &mut rng, &[rows, cols], -2.0, 2.0);
            // The fused gate/up layout: gate then up in each row (concat_rows of the transposed halves
            // would be the weights' layout; here the rows are interleaved by hand).
            let gate_up: Vec<f32> = a
                .cpu
                .data
                .chunks_exact(cols)
                .zip(b.cpu.data.chunks_exact(cols))
                .flat_map(|(x, y)| x.iter().chain(y).copied())
                .collect();
            let gu_cpu = CpuBackend.tensor_from_f32(&[rows, 2 * cols], &gate_up).unwrap();
            let gu_gpu = g.tensor_from_f32(&[rows, 2 * cols], &gate_up).unwrap();
            let want = CpuBackend.silu_mul(&gu_cpu).unwrap();
            let got = g.silu_mul(&gu_gpu).unwrap();
            assert_eq!(g.shape(&got), &[rows, cols][..]);
            check(
                &format!("{dt:?} silu_mul {rows}x{cols}"),
                &g.to_f32(&got).unwrap(),
                &want.data,
                tol(dt),
            );
            let mut d = pair(&g, &mut rng, &[rows, cols], -2.0, 2.0);
            CpuBackend.add_assign(&mut d.cpu, &a.cpu).unwrap();
            g.add_assign(&mut d.gpu, &a.gpu).unwrap();
            check(
                &format!("{dt:?} add_assign {rows}x{cols}"),
                &g.to_f32(&d.gpu).unwrap(),
                &d.cpu.data,
                tol(dt),
            );
            let picks: Vec<usize> = (0..rows.max(3)).map(|_| rng.below(rows)).collect();
            let want = CpuBackend.gather_rows(&a.cpu, &picks).unwrap();
            let got = g.gather_rows(&a.gpu, &picks).unwrap();
            assert_eq!(g.to_f32(&got).unwrap(), want.data, "{dt:?} gather_rows is a copy");
        }
        // Embedding: a copy of rows, and out-of-vocabulary ids refused.
        let table = pair(&g, &mut rng, &[1000, 64], -1.0, 1.0);
        let mut ids: Vec<u32> = (0..50).map(|_| rng.below(1000) as u32).collect();
        ids.extend([0, 999]);
        let want = CpuBackend.embedding(&table.cpu, &ids).unwrap();
        let got = g.embedding(&table.gpu, &ids).unwrap();
        assert_eq!(g.to_f32(&got).unwrap(), want.data, "{dt:?} embedding is a copy");
        assert!(matches!(
            g.embedding(&table.gpu, &[1000]),
            Err(EngineError::InvalidBatch(_))
        ));
        // Rows concatenated: an exact copy, parts in order.
        let parts = [
            pair(&g, &mut rng, &[3, 40], -1.0, 1.0),
            pair(&g, &mut rng, &[1, 40], -1.0, 1.0),
            pair(&g, &mut rng, &[17, 40], -1.0, 1.0),
        ];
        let want = CpuBackend
            .concat_rows(&parts.iter().map(|p| &p.cpu).collect::<Vec<_>>())
            .unwrap();
        let got = g
            .concat_rows(&parts.iter().map(|p| &p.gpu).collect::<Vec<_>>())
            .unwrap();
        assert_eq!(g.shape(&got), &[21, 40][..]);
        assert_eq!(g.to_f32(&got).unwrap(), want.data, "{dt:?} concat_rows is a copy");
        assert!(
            g.concat_rows(&[&parts[0].gpu, &table.gpu]).is_err(),
            "column counts differ"
        );
        // Device-made random data: in range, not constant.
        let r = g.to_f32(&g.random_uniform(&[4096], 7, -1.0, 1.0).unwrap()).unwrap();
        assert!(r.iter().all(|v| (-1.0..=1.0).contains(v)));
        let mean = r.iter().sum::<f32>() / r.len() as f32;
        assert!(mean.abs() < 0.1, "mean {mean}");
    }
}

/// An attention case: heads, KV heads, head size, block size, window, and per sequence (new tokens,
/// tokens already cached).
struct AttnCase {
    heads: usize,
    kv_heads: usize,
    hd: usize,
    bs: usize,
    window: Option<usize>,
    seqs: Vec<(usize, usize)>,
    q_range: f32,
}

/// Scattered block tables for `c`'s sequences: a random permutation of the blocks they need and `spare`
/// more, dealt out in order. Returns the cache's block count and the tables.
fn scattered_tables(rng: &mut Rng, c: &AttnCase, spare: usize) -> (usize, Vec<Vec<u32>>) {
    let needs: Vec<usize> = c.seqs.iter().map(|&(q, b)| (q + b).div_ceil(c.bs)).collect();
    let num_blocks = needs.iter().sum::<usize>() + spare;
    let perm = rng.perm(num_blocks);
    let mut next = 0;
    let tables = needs
        .iter()
        .map(|&nb| {
            next += nb;
            perm[next - nb..next].to_vec()
        })
        .collect();
    (num_blocks, tables)
}

/// `c`'s sequences laid out one after another, on `tables`.
fn attn_seqs<'a>(c: &AttnCase, tables: &'a [Vec<u32>]) -> Vec<AttnSeq<'a>> {
    let mut row = 0;
    c.seqs
        .iter()
        .zip(tables)
        .map(|(&(ql, before), t)| {
            row += ql;
            AttnSeq {
                q_start: row - ql,
                q_len: ql,
                ctx_before: before,
                block_table: t,
            }
        })
        .collect()
}

fn attn_meta<'a>(c: &AttnCase, seqs: &'a [AttnSeq<'a>]) -> AttnMeta<'a> {
    AttnMeta {
        num_heads: c.heads,
        num_kv_heads: c.kv_heads,
        head_dim: c.hd,
        block_size: c.bs,
        scale: 1.0 / (c.hd as f32).sqrt(),
        sliding_window: c.window,
        seqs,
    }
}

fn run_attention(g: &CudaBackend, rng: &mut Rng, c: &AttnCase) {
    let dt = g.dtype();
    let (num_blocks, tables) = scattered_tables(rng, c, 3);
    let kvw = c.kv_heads * c.hd;
    let k = pair(g, rng, &[num_blocks * c.bs, kvw], -1.0, 1.0);
    let v = pair(g, rng, &[num_blocks * c.bs, kvw], -1.0, 1.0);
    let n: usize = c.seqs.iter().map(|s| s.0).sum();
    let q = pair(g, rng, &[n, c.heads * c.hd], -c.q_range, c.q_range);
    let seqs = attn_seqs(c, &tables);
    let meta = attn_meta(c, &seqs);
    let want = CpuBackend.attention(&q.cpu, &k.cpu, &v.cpu, &meta).unwrap();
    let got = g.attention(&q.gpu, &k.gpu, &v.gpu, &meta).unwrap();
    let lens: Vec<usize> = c.seqs.iter().map(|s| s.0 + s.1).collect();
    check(
        &format!(
            "{dt:?} attention heads {}/{} hd {} bs {} window {:?} ctx {:?}",
            c.heads, c.kv_heads, c.hd, c.bs, c.window, lens
        ),
        &g.to_f32(&got).unwrap(),
        &want.data,
        tol(dt),
    );
}

fn decode(lens: &[usize]) -> Vec<(usize, usize)> {
    lens.iter().map(|&l| (1, l - 1)).collect()
}

#[test]
fn attention_matches_cpu() {
    let mut rng = Rng(seed("attention"));
    let edges = decode(&[1, 15, 16, 17, 255, 256, 257, 513]);
    let mut cases = vec![];
    // GQA ratios 1, 4, 8 and 16 (two head chunks per KV head), block boundaries around 16 and 256.
    for (heads, kv) in [(8, 8), (32, 8), (32, 4), (32, 2)] {
        cases.push(AttnCase {
            heads,
            kv_heads: kv,
            hd: 128,
            bs: 16,
            window: None,
            seqs: edges.clone(),
            q_range: 1.0,
        });
    }
    // Every head size the kernel is built for.
    for hd in [8, 16, 32, 64, 80, 96, 256] {
        cases.push(AttnCase {
            heads: 4,
            kv_heads: 2,
            hd,
            bs: 16,
            window: None,
            seqs: decode(&[1, 40, 300]),
            q_range: 1.0,
        });
    }
    // Long contexts: one sequence (many splits), and a mixed batch.
    cases.push(AttnCase {
        heads: 8,
        kv_heads: 1,
        hd: 128,
        bs: 16,
        window: None,
        seqs: decode(&[20_000]),
        q_range: 2.0,
    });
    cases.push(AttnCase {
        heads: 32,
        kv_heads: 8,
        hd: 128,
        bs: 16,
        window: None,
        seqs: decode(&[4096, 33, 9000]),
        q_range: 1.0,
    });
    // Rows that fill more than a wave of blocks (50 rows x 8 KV heads: 400 against 396 on the H200) with
    // contexts long enough to split anyway, so the last wave is fuller (`split_plan`).
    cases.push(AttnCase {
        heads: 16,
        kv_heads: 8,
        hd: 128,
        bs: 16,
        window: None,
        seqs: decode(&(0..50).map(|i| 1500 + 11 * i).collect::<Vec<_>>()),
        q_range: 1.0,
    });
    // The tensor-core decode kernel's block-table reads: one a 16-token step where the step lies in one
    // cache block (block sizes 16 above and 48 here, by shift or division; a sliding window whose first
    // position is a multiple of 16: contexts 116 and 164 of window 100), one a token otherwise (block
    // size 12; windows whose first position is not).
    for (bs, window) in [(48, None), (12, None), (16, Some(100))] {
        cases.push(AttnCase {
            heads: 32,
            kv_heads: 8,
            hd: 128,
            bs,
            window,
            seqs: decode(&[1, 17, 100, 101, 116, 164, 640, 999]),
            q_range: 1.0,
        });
    }
    // Prefill of variable-length sequences, some reading a cached prefix, with decode rows mixed in.
    for (heads, kv, hd, bs) in [(4, 2, 16, 4), (32, 8, 128, 16), (4, 1, 8, 1), (16, 2, 64, 32)] {
        cases.push(AttnCase {
            heads,
            kv_heads: kv,
            hd,
            bs,
            window: None,
            seqs: vec![(37, 0), (5, 300), (1, 0), (300, 17), (1, 99)],
            q_range: 2.0,
        });
    }
    // Tensor-core prefill tiles (64 rows): sizes around the tile, a long prompt after a cached prefix.
    cases.push(AttnCase {
        heads: 8,
        kv_heads: 2,
        hd: 128,
        bs: 16,
        window: None,
        seqs: vec![(16, 0), (64, 3), (65, 0), (1000, 500), (129, 0), (1, 40)],
        q_range: 2.0,
    });
    cases.push(AttnCase {
        heads: 4,
        kv_heads: 4,
        hd: 64,
        bs: 16,
        window: Some(100),
        seqs: vec![(40, 10), (17, 0), (1, 150)],
        q_range: 2.0,
    });
    // Sliding window (Mistral): decode and prefill past the window.
    cases.push(AttnCase {
        heads: 4,
        kv_heads: 1,
        hd: 64,
        bs: 16,
        window: Some(100),
        seqs: vec![(1, 999), (250, 0), (3, 97)],
        q_range: 2.0,
    });
    for dt in DTYPES {
        let Some(mut g) = gpu(dt) else { return };
        // bf16/f16: prefill rows on the tensor-core kernel (the default, but for head size 128 on Hopper: off
        // here, its own passes below), then everything on the paged one.
        g.set_prefill_sm90(None);
        for tc in [true, false] {
            if !tc && dt == DType::F32 {
                continue;
            }
            g.set_tensor_core_prefill(tc);
            say(&format!("{dt:?}: tensor-core prefill {tc}"));
            for c in &cases {
                run_attention(&g, &mut rng, c);
            }
        }
        // Every tile shape of the tensor-core prefill kernel (the default above picks by context length), on the cases it takes.
        if dt != DType::F32 {
            g.set_tensor_core_prefill(true);
            for shape in PrefillShape::ALL {
                g.set_prefill_shape(Some(shape));
                say(&format!("{dt:?}: tensor-core prefill tiles {}", shape.label()));
                for c in cases.iter().filter(|c| c.seqs.iter().any(|&(q, _)| q >= 16)) {
                    run_attention(&g, &mut rng, c);
                }
            }
            g.set_prefill_shape(None);
            // The Hopper prefill kernel (kernels/prefill_sm90.cu; compute capability 9.0 only), each form, on
            // the head-128 cases, and on a block size that is not a power of two, groups of one head, and the
            // TTFT prompt. On compute capability 9.0 it must build; elsewhere it is skipped, visibly.
            let hopper = g.context().compute_capability().unwrap() == (9, 0);
            for form in PREFILL_SM90_LABELS {
                let on = g.set_prefill_sm90(Some(form));
                assert_eq!(
                    on, hopper,
                    "{dt:?}: the Hopper prefill kernel's form {form} built: {on}"
                );
                if on {
                    say(&format!("{dt:?}: the Hopper prefill kernel, form {form}"));
                    let more = [
                        AttnCase {
                            heads: 4,
                            kv_heads: 4,
                            hd: 128,
                            bs: 12,
                            window: None,
                            seqs: vec![(200, 0), (70, 130), (16, 5), (1, 64), (40, 700)],
                            q_range: 4.0,
                        },
                        // Tiles of 64 rows or fewer after a long context: the warp-specialized forms' second
                        // warpgroup hands back, unread, stages the producer still refills.
                        AttnCase {
                            heads: 8,
                            kv_heads: 2,
                            hd: 128,
                            bs: 16,
                            window: None,
                            seqs: vec![(20, 1300), (40, 700), (64, 517), (129, 640)],
                            q_range: 2.0,
                        },
                        AttnCase {
                            heads: 32,
                            kv_heads: 8,
                            hd: 128,
                            bs: 16,
                            window: None,
                            seqs: vec![(1000, 0)],
                            q_range: 2.0,
                        },
                        // Past the 8192 keys from which the default (`auto`) runs ws128: a long prompt's last
                        // chunk after its cached first part.
                        AttnCase {
                            heads: 2,
                            kv_heads: 1,
                            hd: 128,
                            bs: 16,
                            window: None,
                            seqs: vec![(200, 8100), (30, 9000)],
                            q_range: 2.0,
                        },
                    ];
                    for c in cases
                        .iter()
                        .filter(|c| c.hd == 128 && c.seqs.iter().any(|&(q, _)| q >= 16))
                        .chain(&more)
                    {
                        run_attention(&g, &mut rng, c);
                    }
                    g.set_prefill_sm90(None);
                } else {
                    say(&format!(
                        "{dt:?}: SKIPPED the Hopper prefill kernel's form {form} (it needs compute capability 9.0)"
                    ));
                }
            }
        }
        // Every kernel family of GQA at head size 128.
        g.set_tensor_core_prefill(false);
        for kernel in AttnKernel::ALL {
            g.set_attention_kernel(kernel);
            say(&format!("{dt:?}: GQA attention on {kernel:?}"));
            for c in cases.iter().filter(|c| c.hd == 128 && c.heads > c.kv_heads) {
                run_attention(&g, &mut rng, c);
            }
        }
        g.set_attention_kernel(AttnKernel::Tensor); // the default
                                                    // Split rows merged by their last block instead of by the separate attn_reduce launch (the default).
        g.set_attention_merge(true);
        say(&format!("{dt:?}: splits merged by each row's last block"));
        for c in &cases {
            run_attention(&g, &mut rng, c);
        }
        g.set_attention_merge(false);
    }
}

/// Decode attention with the rotary embedding and the cache writes inside (`rope_attention` on the `_tcr`
/// kernels) against `rope_kv_write` then `attention` on the same inputs: GQA groups of 2, 4 and 8, contexts
/// across block boundaries, long ones that split (the new token in the last split), a sliding window, and
/// a padding row that writes nothing. Outputs and both caches agree; bad positions and rows of no sequence
/// with a slot are refused; batches the fused form does not take (prefill rows, f32, fusion off, a group
/// over two blocks) are not fused.
#[test]
fn rope_attention_matches_rope_kv_write_then_attention() {
    let mut rng = Rng(seed("rope_attention"));
    let (hd, bs) = (128, 16);
    let inv_freq: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / 500_000f32.powf(2.0 * i as f32 / hd as f32))
        .collect();
    let case = |heads, kv_heads, window, lens: &[usize]| AttnCase {
        heads,
        kv_heads,
        hd,
        bs,
        window,
        seqs: decode(lens),
        q_range: 1.0,
    };
    let cases = [
        case(32, 8, None, &[1, 15, 16, 17, 255, 256, 257, 513, 640]),
        case(16, 8, None, &[2, 100, 4096]),
        case(64, 8, None, &[33, 9000, 700]),
        case(8, 1, None, &[20_000]),
        case(32, 8, Some(100), &[999, 50, 101, 116, 164]),
    ];
    for dt in [DType::BF16, DType::F16] {
        let Some(g) = gpu(dt) else { return };
        for c in &cases {
            let n = c.seqs.len();
            let (blocks, tables) = scattered_tables(&mut rng, c, 2);
            let seqs = attn_seqs(c, &tables);
            let meta = attn_meta(c, &seqs);
            let positions: Vec<u32> = seqs.iter().map(|s| s.ctx_before as u32).collect();
            let slot = |s: &AttnSeq| (s.block_table[s.ctx_before / bs] as usize * bs + s.ctx_before % bs) as u32;
            let mut slots: Vec<u32> = seqs.iter().map(slot).collect();
            if n > 1 {
                // A padding row: attends (its output is discarded) but writes no key or value.
                slots[1] = lorax_engine::backend::NO_SLOT;
            }
            let kvw = c.kv_heads * hd;
            let qkv = pair(&g, &mut rng, &[n, (c.heads + 2 * c.kv_heads) * hd], -1.0, 1.0);
            let k = round(dt, &rng.vec(blocks * bs * kvw, -1.0, 1.0));
            let v = round(dt, &rng.vec(blocks * bs * kvw, -1.0, 1.0));
            let upload = |x: &[f32]| g.tensor_from_f32(&[blocks * bs, kvw], x).unwrap();
            let (mut k1, mut v1, mut k2, mut v2) = (upload(&k), upload(&v), upload(&k), upload(&v));
            let lens: Vec<usize> = c.seqs.iter().map(|s| s.0 + s.1).collect();
            let what = format!(
                "{dt:?} rope_attention heads {}/{} window {:?} ctx {lens:?}",
                c.heads, c.kv_heads, c.window
            );
            assert!(g.rope_fused(&meta, hd, &inv_freq), "{what}: not fused");
            let got = g
                .rope_attention(&qkv.gpu, &mut k1, &mut v1, hd, &positions, &inv_freq, &slots, &meta)
                .unwrap();
            let q = g
                .rope_kv_write(&qkv.gpu, &mut k2, &mut v2, hd, &positions, &inv_freq, &slots)
                .unwrap();
            let want = g.attention(&q, &k2, &v2, &meta).unwrap();
            // Every row but the padding one, whose new token the two calls take from different places (the
            // fused kernel from q/k/v, the separate attention from the cache slot nothing wrote).
            let real = |x: Vec<f32>| -> Vec<f32> {
                x.chunks(c.heads * hd)
                    .enumerate()
                    .filter(|(i, _)| n == 1 || *i != 1)
                    .flat_map(|(_, r)| r.to_vec())
                    .collect()
            };
            check(
                &what,
                &real(g.to_f32(&got).unwrap()),
                &real(g.to_f32(&want).unwrap()),
                tol(dt),
            );
            check(
                &format!("{what} keys"),
                &g.to_f32(&k1).unwrap(),
                &g.to_f32(&k2).unwrap(),
                tol(dt),
            );
            assert_eq!(g.to_f32(&v1).unwrap(), g.to_f32(&v2).unwrap(), "{what} values");
            // Rows wider than q/k/v (a LoRA shrink's columns past them, `lora_project`): the same results.
            let width = (c.heads + 2 * c.kv_heads) * hd;
            let extra = round(dt, &rng.vec(n * 96, -9.0, 9.0));
            let wide: Vec<f32> = (0..n)
                .flat_map(|r| [&qkv.host[r * width..(r + 1) * width], &extra[r * 96..(r + 1) * 96]].concat())
                .collect();
            let wide = g.tensor_from_f32(&[n, width + 96], &wide).unwrap();
            let (mut k3, mut v3) = (upload(&k), upload(&v));
            let got_wide = g
                .rope_attention(&wide, &mut k3, &mut v3, hd, &positions, &inv_freq, &slots, &meta)
                .unwrap();
            let same = |a: &lorax_engine::CudaTensor, b: &lorax_engine::CudaTensor, part: &str| {
                assert_eq!(
                    g.to_f32(a).unwrap(),
                    g.to_f32(b).unwrap(),
                    "{what}: {part} of rows 96 wider"
                );
            };
            same(&got_wide, &got, "output");
            same(&k3, &k1, "keys");
            same(&v3, &v1, "values");
            // The padding row's slot is untouched.
            if n > 1 {
                let pad = slot(&seqs[1]) as usize * kvw;
                assert_eq!(
                    g.to_f32(&k1).unwrap()[pad..pad + kvw],
                    k[pad..pad + kvw],
                    "{what}: padding row"
                );
            }
            // A position that disagrees with the row's context is refused.
            let mut wrong = positions.clone();
            wrong[0] += 1;
            assert!(matches!(
                g.rope_attention(&qkv.gpu, &mut k1, &mut v1, hd, &wrong, &inv_freq, &slots, &meta),
                Err(EngineError::InvalidBatch(_))
            ));
        }
    }
    // Which batches are fused.
    let Some(mut g) = gpu(DType::BF16) else { return };
    let prefill = case(8, 2, None, &[]);
    let table: Vec<u32> = (0..4).collect();
    let seqs = [AttnSeq {
        q_start: 0,
        q_len: 20,
        ctx_before: 0,
        block_table: &table,
    }];
    let one = [AttnSeq { q_len: 1, ..seqs[0] }];
    let fused = |g: &CudaBackend, seqs| g.rope_fused(&attn_meta(&prefill, seqs), hd, &inv_freq);
    assert!(!fused(&g, &seqs), "a prefill row");
    assert!(fused(&g, &one), "a decode row");
    g.set_attention_rope_rows(Some(0));
    assert!(!fused(&g, &one), "fusion off");
    g.set_attention_rope_rows(Some(1));
    assert!(fused(&g, &one), "a step of one row");
    g.set_attention_rope_rows(None);
    // A group of 4 query heads split over blocks of 2 (two blocks would write the slot).
    g.set_attention_max_heads(2);
    assert!(!fused(&g, &one), "a group over two blocks");
    g.set_attention_max_heads(8);
    // A row of no sequence that has a cache slot: refused (no block would write it).
    let qkv = pair(&g, &mut rng, &[2, 12 * hd], -1.0, 1.0);
    let (mut kc, mut vc) = (g.zeros(&[64, 2 * hd]).unwrap(), g.zeros(&[64, 2 * hd]).unwrap());
    assert!(matches!(
        g.rope_attention(
            &qkv.gpu,
            &mut kc,
            &mut vc,
            hd,
            &[0, 1],
            &inv_freq,
            &[0, 1],
            &attn_meta(&prefill, &one)
        ),
        Err(EngineError::InvalidBatch(_))
    ));
    let Some(g32) = gpu(DType::F32) else { return };
    assert!(!fused(&g32, &one), "f32 storage");
}

#[test]
fn attention_refuses_bad_tables() {
    let Some(g) = gpu(DType::BF16) else { return };
    let q = g.tensor_from_f32(&[1, 16], &[0.5; 16]).unwrap();
    let kv = g.zeros(&[8, 16]).unwrap();
    let table = [5u32];
    let seqs = [AttnSeq {
        q_start: 0,
        q_len: 1,
        ctx_before: 0,
        block_table: &table,
    }];
    let meta = AttnMeta {
        num_heads: 1,
        num_kv_heads: 1,
        head_dim: 16,
        block_size: 4,
        scale: 0.25,
        sliding_window: None,
        seqs: &seqs,
    };
    assert!(matches!(
        g.attention(&q, &kv, &kv, &meta),
        Err(EngineError::InvalidBatch(_))
    ));
}

/// A LoRA segment description: rows, rank, scale.
struct Seg {
    start: usize,
    len: usize,
    rank: usize,
    scale: f32,
}

/// Segments from (start, len, rank) at one scale.
fn segs(scale: f32, list: &[(usize, usize, usize)]) -> Vec<Seg> {
    list.iter()
        .map(|&(start, len, rank)| Seg {
            start,
            len,
            rank,
            scale,
        })
        .collect()
}

fn run_lora(g: &CudaBackend, rng: &mut Rng, n: usize, k: usize, out: usize, segs: &[Seg], what: &str) {
    let parts: Vec<(&Seg, usize, usize)> = segs.iter().map(|s| (s, 0, out)).collect();
    run_lora_cols(g, rng, n, k, out, &parts, what);
}

/// A fused projection of parts `widths` wide side by side (q/k/v): `segs[p]` add into part p's columns,
/// all in one call, sharing rows of x across parts.
fn run_lora_fused(g: &CudaBackend, rng: &mut Rng, n: usize, k: usize, widths: &[usize], segs: &[&[Seg]], what: &str) {
    let mut parts = Vec::new();
    let mut col = 0;
    for (&w, part) in widths.iter().zip(segs) {
        parts.extend(part.iter().map(|s| (s, col, w)));
        col += w;
    }
    run_lora_cols(g, rng, n, k, col, &parts, what);
}

/// LoRA segments `(segment, first column of y, columns)` into y `[n, out]`, CUDA against the CPU.
fn run_lora_cols(
    g: &CudaBackend,
    rng: &mut Rng,
    n: usize,
    k: usize,
    out: usize,
    segs: &[(&Seg, usize, usize)],
    what: &str,
) {
    let dt = g.dtype();
    let x = pair(g, rng, &[n, k], -1.0, 1.0);
    // y starts small, so the LoRA term dominates the output and its rounding.
    let mut y = pair(g, rng, &[n, out], -0.01, 0.01);
    let ab: Vec<(Pair, Pair)> = segs
        .iter()
        .map(|&(s, _, cols)| {
            let (ra, rb) = (1.0 / (k as f32).sqrt(), 1.0 / (s.rank as f32).sqrt());
            (
                pair(g, rng, &[s.rank, k], -ra, ra),
                pair(g, rng, &[cols, s.rank], -rb, rb),
            )
        })
        .collect();
    let cpu_segs: Vec<LoraSegment<'_, _>> = segs
        .iter()
        .zip(&ab)
        .map(|(&(s, col, _), (a, b))| LoraSegment {
            start: s.start,
            len: s.len,
            a: &a.cpu,
            b: &b.cpu,
            scale: s.scale,
            col,
        })
        .collect();
    let gpu_segs: Vec<LoraSegment<'_, _>> = segs
        .iter()
        .zip(&ab)
        .map(|(&(s, col, _), (a, b))| LoraSegment {
            start: s.start,
            len: s.len,
            a: &a.gpu,
            b: &b.gpu,
            scale: s.scale,
            col,
        })
        .collect();
    let before = y.host.clone();
    CpuBackend.lora(&mut y.cpu, &x.cpu, &cpu_segs).unwrap();
    g.lora(&mut y.gpu, &x.gpu, &gpu_segs).unwrap();
    let got = g.to_f32(&y.gpu).unwrap();
    // Only the change is compared, so the tolerance measures the LoRA term and not the base output.
    let d_got: Vec<f32> = got.iter().zip(&before).map(|(a, b)| a - b).collect();
    let d_want: Vec<f32> = y.cpu.data.iter().zip(&before).map(|(a, b)| a - b).collect();
    check(&format!("{dt:?} lora {what} {n}x{k}->{out}"), &d_got, &d_want, tol(dt));
    let covered = |r: usize| segs.iter().any(|(s, _, _)| (s.start..s.start + s.len).contains(&r));
    for r in (0..n).filter(|&r| !covered(r)) {
        assert_eq!(
            &got[r * out..(r + 1) * out],
            &before[r * out..(r + 1) * out],
            "{dt:?} {what}: base row {r} was touched"
        );
    }
}

#[test]
fn lora_sgmv_matches_cpu() {
    let mut rng = Rng(seed("lora"));
    // Every case twice: decode shapes on BGMV and segments of more than 64 rows on cuBLAS (the defaults),
    // then everything on SGMV, so both keep their coverage.
    for (dt, bgmv) in DTYPES.into_iter().flat_map(|d| [(d, true), (d, false)]) {
        let Some(mut g) = gpu(dt) else { return };
        g.set_lora_bgmv(bgmv);
        g.set_lora_gemm(bgmv);
        say(&format!(
            "{dt:?} lora, decode shapes on {}",
            if bgmv { "BGMV, long segments on cuBLAS" } else { "SGMV" }
        ));
        // Mixed ranks 8..128, one-token segments, a segment longer than a row tile, base rows between.
        let mixed = [
            Seg {
                start: 0,
                len: 1,
                rank: 8,
                scale: 2.0,
            },
            Seg {
                start: 3,
                len: 1,
                rank: 16,
                scale: 0.5,
            },
            Seg {
                start: 5,
                len: 37,
                rank: 64,
                scale: 1.0,
            },
            Seg {
                start: 50,
                len: 14,
                rank: 128,
                scale: 0.25,
            },
        ];
        run_lora(&g, &mut rng, 64, 4096, 4096, &mixed, "mixed ranks");
        run_lora(&g, &mut rng, 64, 4096, 1024, &mixed, "mixed ranks, narrow out");
        run_lora(&g, &mut rng, 64, 1024, 14336, &mixed, "mixed ranks, wide out");
        // Segments longer than BGMV's 4-row chunks next to short ones: 5 chunks, padded to 8 on BGMV.
        let chunked = [
            Seg {
                start: 0,
                len: 5,
                rank: 16,
                scale: 2.0,
            },
            Seg {
                start: 6,
                len: 1,
                rank: 32,
                scale: 0.5,
            },
            Seg {
                start: 9,
                len: 7,
                rank: 16,
                scale: 1.0,
            },
        ];
        run_lora(&g, &mut rng, 20, 4096, 1024, &chunked, "chunked segments");
        // Decode: 64 one-token segments of distinct adapters; and one adapter for all rows.
        let distinct: Vec<Seg> = (0..64)
            .map(|i| Seg {
                start: i,
                len: 1,
                rank: 16,
                scale: 2.0,
            })
            .collect();
        run_lora(&g, &mut rng, 64, 4096, 4096, &distinct, "64 distinct r16");
        let same = [Seg {
            start: 0,
            len: 64,
            rank: 16,
            scale: 2.0,
        }];
        run_lora(&g, &mut rng, 64, 4096, 4096, &same, "one r16 for 64 rows");
        // Prefill-sized segment; odd sizes that take the scalar loads; ranks 4 and 12.
        let long = [Seg {
            start: 10,
            len: 500,
            rank: 32,
            scale: 1.0,
        }];
        run_lora(&g, &mut rng, 512, 2048, 2048, &long, "500-row segment");
        // A mixed step: two prompt chunks (more than 64 rows: cuBLAS by default) between decode rows of other
        // adapters, fused q/k/v with the Mistral shape's widths.
        let prompts = segs(
            1.5,
            &[(0, 1, 16), (1, 130, 16), (131, 1, 8), (133, 65, 64), (198, 2, 16)],
        );
        run_lora_fused(
            &g,
            &mut rng,
            201,
            4096,
            &[4096, 1024, 1024],
            &[&prompts, &prompts, &prompts],
            "mixed step, fused q/k/v",
        );
        // A chunk of equal prompts (cuBLAS batches the products of one shape): two adapters of one scale,
        // one of another scale, one of another rank; decode rows before them; and two rank-4 prompts of an
        // odd length, whose intermediates and rank rows are not 16-byte multiples (plain GEMMs, not batched).
        let mut chunk = segs(
            1.5,
            &[(0, 1, 16), (4, 200, 16), (204, 200, 16), (604, 200, 8), (804, 101, 4)],
        );
        chunk.extend(segs(0.5, &[(2, 1, 16), (404, 200, 16)]));
        chunk.extend(segs(1.5, &[(905, 101, 4)]));
        chunk.sort_by_key(|s| s.start);
        run_lora_fused(
            &g,
            &mut rng,
            1006,
            4096,
            &[4096, 1024, 1024],
            &[&chunk, &chunk, &chunk],
            "chunk of equal prompts, fused q/k/v",
        );
        let odd = [
            Seg {
                start: 1,
                len: 3,
                rank: 4,
                scale: 1.5,
            },
            Seg {
                start: 6,
                len: 2,
                rank: 12,
                scale: 1.0,
            },
        ];
        run_lora(&g, &mut rng, 9, 100, 75, &odd, "odd sizes");
        // The BGMV shape (segments of at most 4 rows, ranks at most 64) with mixed ranks and base rows.
        let small = segs(0.75, &[(0, 1, 8), (2, 4, 64), (6, 2, 16), (9, 3, 32)]);
        run_lora(&g, &mut rng, 14, 4096, 1024, &small, "BGMV mixed ranks");
        run_lora(&g, &mut rng, 14, 1024, 14336, &small, "BGMV mixed ranks, wide out");
        // Fused projections: q/k/v (the Mistral shape's 4096 + 1024 + 1024) with the same rows in every
        // part, each part's own intermediate; an adapter that skips k (its columns untouched); gate/up.
        run_lora_fused(
            &g,
            &mut rng,
            14,
            4096,
            &[4096, 1024, 1024],
            &[&small, &small, &small],
            "fused q/k/v",
        );
        run_lora_fused(
            &g,
            &mut rng,
            20,
            4096,
            &[4096, 1024, 1024],
            &[&chunked, &[], &chunked],
            "fused q/v",
        );
        run_lora_fused(
            &g,
            &mut rng,
            64,
            1024,
            &[2048, 2048],
            &[&mixed, &mixed],
            "fused gate/up, mixed ranks",
        );
    }
}

/// A random adapter's (rank, scale, whether it has a pair for (layer, target)).
type AdapterSpec = (usize, f32, fn(usize, lorax_engine::lora::Target) -> bool);
/// An adapter's pairs on the CPU, per layer and target.
type CpuPairs = Vec<[Option<(lorax_engine::CpuTensor, lorax_engine::CpuTensor)>; lorax_engine::lora::NUM_TARGETS]>;

/// Adapters of `specs` over `layers` layers, on both backends: each pair's A `[rank, k]` uniform in ±1/√k
/// and B `[cols, rank]` in ±1/√rank, where `shape(target)` is (k, cols); each adapter has its device index.
fn random_adapters(
    g: &CudaBackend,
    rng: &mut Rng,
    specs: &[AdapterSpec],
    layers: usize,
    shape: &dyn Fn(lorax_engine::lora::Target) -> (usize, usize),
) -> (Vec<CpuPairs>, Vec<lorax_engine::lora::DeviceAdapter<CudaBackend>>) {
    use lorax_engine::lora::{DeviceAdapter, LoraWeights, Target, NUM_TARGETS};
    let mut cpu = Vec::new();
    let mut dev = Vec::new();
    for &(rank, scale, has) in specs {
        let mut c: CpuPairs = (0..layers).map(|_| Default::default()).collect();
        let mut d: Vec<[Option<LoraWeights<CudaBackend>>; NUM_TARGETS]> =
            (0..layers).map(|_| Default::default()).collect();
        for l in 0..layers {
            for t in Target::ALL.into_iter().filter(|&t| has(l, t)) {
                let (k, cols) = shape(t);
                let (ra, rb) = (1.0 / (k as f32).sqrt(), 1.0 / (rank as f32).sqrt());
                let a = pair(g, rng, &[rank, k], -ra, ra);
                let b = pair(g, rng, &[cols, rank], -rb, rb);
                c[l][t.index()] = Some((a.cpu, b.cpu));
                d[l][t.index()] = Some(LoraWeights {
                    a: a.gpu,
                    b: b.gpu,
                    scale,
                });
            }
        }
        let index = g.lora_index(&d).unwrap();
        assert!(index.is_some(), "adapter of rank {rank} has no index");
        cpu.push(c);
        dev.push(DeviceAdapter {
            layers: d,
            bytes: 0,
            index,
            gate: None,
        });
    }
    (cpu, dev)
}

/// The per-step LoRA plan (`lora_step` once, then `lora_layer` per layer and projection, the `bgmv_*_ix`
/// kernels, and in a 300-row pass the prompt pair `lora_shrink_pf*` + `lora_expand_pf` for its segments of
/// more than 64 rows; each plan with either expand, `bgmv_expand_ix` and `bgmv_expand_vx`) against the CPU's
/// per-layer `lora`: adapters of ranks 4-64, one without k, one without layer 0's q, one with o alone;
/// segments of 1, 5 and 32 rows (several records) with base rows between; the fused q/k/v, o, and gate/up
/// that no adapter has (left exactly as it was). Three plans, of all five
/// adapters (largest rank 64), without the rank-64 one (32) and without the rank-32 one too (16), so that
/// in bf16/f16 each tensor-core shrink (`bgmv_shrink_tc4`, `_tc2`, `_tc1`) runs; `LORAX_CUDA_LORA_SHRINK=simt`
/// runs them all on `bgmv_shrink_ix` (f32 always does).
#[test]
#[allow(clippy::needless_range_loop)]
fn lora_step_matches_cpu() {
    use lorax_engine::backend::LoraRows;
    use lorax_engine::lora::{DeviceAdapter, LoraWeights, Target, NUM_TARGETS};
    let mut rng = Rng(seed("lora step"));
    // h = 2560: the k-split shrink takes 3 chunks of 1024 (the last half a group) in bf16/f16, 5 of 512 in f32.
    let (h, qd, kvd, layers) = (2560, 1024, 256, 2);
    let width = |t: Target| match t {
        Target::Q => qd,
        Target::K | Target::V => kvd,
        _ => h,
    };
    // (rank, scale, does it have (layer, target)), and its rows.
    let specs: [AdapterSpec; 5] = [
        (16, 2.0, |_, t| t.index() < 4),
        (8, 0.5, |_, t| matches!(t, Target::Q | Target::V | Target::O)),
        (64, 1.0, |l, t| t.index() < 4 && !(l == 0 && t == Target::Q)),
        (4, 1.5, |_, t| t == Target::O),
        (32, 0.75, |_, t| t.index() < 4),
    ];
    // Each spec's rows, the pass's rows and rows in no segment: a decode step (every segment on the `_ix`
    // pair), then a pass of more than 256 rows whose segments of more than 64 rows (prompt chunks: 80 rows of
    // rank 16, 100 of rank 64 without layer 0's q, 70 of rank 32; records of 64 and the rest) take the
    // tensor-core prompt pair, the rest the `_ix` pair (16-bit storage; f32 gets no plan for it). Each plan's
    // largest rank has a prompt chunk, so each prompt shrink (`lora_shrink_pf8`, `_pf4`, `_pf2`) runs.
    type Case = (&'static str, [(usize, usize); 5], usize, std::ops::Range<usize>);
    let cases: [Case; 2] = [
        ("decode", [(0, 1), (1, 5), (8, 32), (40, 3), (44, 2)], 46, 6..8),
        (
            "prompt",
            [(200, 80), (0, 1), (8, 100), (1, 5), (110, 70)],
            300,
            180..200,
        ),
    ];
    // The plans' adapters (indexes into specs and rows): largest ranks 64, 32 and 16, then two adapters of
    // prompt chunks alone in the prompt case (no `_ix` records).
    let plans: [&[usize]; 4] = [&[0, 1, 2, 3, 4], &[0, 1, 3, 4], &[0, 1, 3], &[0, 2]];
    for dt in DTYPES {
        let Some(mut g) = gpu(dt) else { return };
        say(&format!("{dt:?} lora step plan"));
        // The CPU copies of each adapter's pairs, and the adapters on the GPU.
        let (cpu, dev) = random_adapters(&g, &mut rng, &specs, layers, &|t| (h, width(t)));
        let projections: [&[(Target, usize)]; 3] = [
            &[(Target::Q, 0), (Target::K, qd), (Target::V, qd + kvd)],
            &[(Target::O, 0)],
            &[(Target::Gate, 0), (Target::Up, h)],
        ];
        let segs_of = |rows: &[(usize, usize)], plan: &[usize]| -> Vec<LoraRows<'_, CudaBackend>> {
            plan.iter()
                .map(|&s| LoraRows {
                    start: rows[s].0,
                    len: rows[s].1,
                    adapter: &dev[s],
                })
                .collect()
        };
        // Each expand: bgmv_expand_ix, then bgmv_expand_vx (records merged to 16 rows: 32 rows of one
        // adapter in two; lora.rs `expand_vx_fits_whole_accesses_only` checks these shapes take it). The
        // switch is read when the plan is made, as the server reads it at start-up.
        for ((case, rows, n, untouched), vx, plan) in cases
            .iter()
            .flat_map(|c| [false, true].into_iter().flat_map(move |vx| plans.map(|p| (c, vx, p))))
        {
            let n = *n;
            g.set_lora_expand_vx(vx);
            let before = g.lora_prompt_plans();
            let step = g.lora_step(n, &segs_of(rows, plan)).unwrap();
            // Only the prompt case's plans have prompt records, each one (f32: no plan at all).
            let on_pair = g.lora_prompt_plans() - before;
            assert_eq!(
                on_pair,
                u64::from(*case == "prompt" && dt != DType::F32),
                "{case} plans on the pair"
            );
            if *case == "prompt" && dt == DType::F32 {
                assert!(step.is_none(), "f32 got a plan for a pass with prompt chunks");
                continue;
            }
            let step = step.unwrap_or_else(|| panic!("a {case} pass got no step plan"));
            let rmax = plan.iter().map(|&s| specs[s].0).max().unwrap_or(0);
            for l in 0..layers {
                for parts in projections {
                    let out: usize = parts.iter().map(|&(t, _)| width(t)).sum();
                    let x = pair(&g, &mut rng, &[n, h], -1.0, 1.0);
                    let mut y = pair(&g, &mut rng, &[n, out], -0.01, 0.01);
                    let mut cpu_segs = Vec::new();
                    for &(t, col) in parts {
                        for &s in plan {
                            let (start, len) = rows[s];
                            if let Some((a, b)) = &cpu[s][l][t.index()] {
                                cpu_segs.push(LoraSegment {
                                    start,
                                    len,
                                    a,
                                    b,
                                    scale: specs[s].1,
                                    col,
                                });
                            }
                        }
                    }
                    let before = y.host.clone();
                    CpuBackend.lora(&mut y.cpu, &x.cpu, &cpu_segs).unwrap();
                    g.lora_layer(&mut y.gpu, &x.gpu, &step, l, parts).unwrap();
                    let got = g.to_f32(&y.gpu).unwrap();
                    let expand = if vx { "vx" } else { "ix" };
                    let what = format!("{dt:?} {case} rank {rmax} plan, layer {l} {parts:?}, expand {expand}");
                    if cpu_segs.is_empty() {
                        assert_eq!(got, before, "{what}: no adapter has these targets, yet y changed");
                        continue;
                    }
                    let d_got: Vec<f32> = got.iter().zip(&before).map(|(a, b)| a - b).collect();
                    let d_want: Vec<f32> = y.cpu.data.iter().zip(&before).map(|(a, b)| a - b).collect();
                    check(&what, &d_got, &d_want, tol(dt));
                    for r in untouched.clone() {
                        assert_eq!(
                            &got[r * out..(r + 1) * out],
                            &before[r * out..(r + 1) * out],
                            "{what}: base row {r} was touched"
                        );
                    }
                }
            }
        }
        // A layer past the adapters' refuses; a pass of more than 256 rows gets a plan in 16-bit storage
        // (none in f32 or with the prompt pair off), and a rank above BGMV's 64 none (those passes take the
        // per-layer path).
        let (_, rows, n, _) = &cases[0];
        let n = *n;
        let segs = segs_of(rows, plans[0]);
        let step = g
            .lora_step(n, &segs)
            .unwrap()
            .expect("a decode-sized batch gets a step plan");
        let x = pair(&g, &mut rng, &[n, h], -1.0, 1.0);
        let mut y = pair(&g, &mut rng, &[n, h], -0.01, 0.01);
        assert!(g
            .lora_layer(&mut y.gpu, &x.gpu, &step, layers, &[(Target::O, 0)])
            .is_err());
        // A pass of more than 256 rows gets a plan in 16-bit storage unless the prompt pair is off.
        assert_eq!(g.lora_step(257, &segs).unwrap().is_some(), dt != DType::F32, "257 rows");
        g.set_lora_prompt_tc(false);
        assert!(
            g.lora_step(257, &segs).unwrap().is_none(),
            "257 rows got a plan without the prompt pair"
        );
        g.set_lora_prompt_tc(true);
        let mut wide: Vec<[Option<LoraWeights<CudaBackend>>; NUM_TARGETS]> = vec![Default::default()];
        let (a, b) = (
            pair(&g, &mut rng, &[128, h], -0.1, 0.1),
            pair(&g, &mut rng, &[h, 128], -0.1, 0.1),
        );
        wide[0][Target::O.index()] = Some(LoraWeights {
            a: a.gpu,
            b: b.gpu,
            scale: 1.0,
        });
        let index = g.lora_index(&wide).unwrap();
        let wide = DeviceAdapter {
            layers: wide,
            bytes: 0,
            index,
            gate: None,
        };
        let rows = [LoraRows {
            start: 0,
            len: 1,
            adapter: &wide,
        }];
        assert!(
            g.lora_step(n, &rows).unwrap().is_none(),
            "a rank-128 adapter got a step plan"
        );
    }
}

/// The q/k/v and o LoRA shrinks inside the projections' GEMMs (`lora_gemm_weight` at load, then
/// `lora_project`): a step whose adapter rows all take one adapter of rank at most the slot (32) gets the product
/// and each row's `x · Aᵀ` from one GEMM over the weight and that adapter's `lora_A` rows (copied when the
/// adapter changes), then `bgmv_expand_iy`. Checked against the CPU's linear + per-layer `lora`: the LoRA
/// terms (the wide output's first columns less the plain product) of adapter rows, base rows left alone
/// (within the dtype's rounding of the product), for adapters of rank 16 (every pair) and 32 (no layer-0
/// q); the copies counted as the adapter changes (two groups, q/k/v and o); an adapter without k pairs (its
/// o pairs in the GEMM alone), one of rank 64 and a step of two adapters take the usual path; each output is
/// also compared with the usual path's (the product, then `lora_layer`). The o projection's wide output then
/// goes through `add_rms_norm`, which reads its first columns.
#[test]
fn lora_shrink_in_gemm_matches_cpu() {
    use lorax_engine::backend::LoraRows;
    use lorax_engine::lora::Target;
    let mut rng = Rng(seed("lora in gemm"));
    let (h, qd, kvd, layers) = (2560, 1024, 256, 2);
    let width = |t: Target| match t {
        Target::Q => qd,
        Target::K | Target::V => kvd,
        _ => h,
    };
    // (rank, scale, pairs): in the GEMM, in the GEMM, no k pairs, rank above the slot.
    let specs: [AdapterSpec; 4] = [
        (16, 2.0, |_, t| t.index() < 4),
        (32, 1.5, |l, t| t.index() < 4 && !(l == 0 && t == Target::Q)),
        (8, 2.0, |_, t| matches!(t, Target::Q | Target::V | Target::O)),
        (64, 1.0, |_, t| t.index() < 4),
    ];
    // (parts, in features, out features, slots).
    let qkv: &[(Target, usize)] = &[(Target::Q, 0), (Target::K, qd), (Target::V, qd + kvd)];
    let o: &[(Target, usize)] = &[(Target::O, 0)];
    let projections = [(qkv, h, qd + 2 * kvd, 3), (o, qd, h, 1)];
    // Adapter rows 0..5 and 8..40 (one segment each), base rows 5..8 and 40..46.
    let (n, segs, base_rows) = (46, [(0usize, 5usize), (8, 32)], [5usize, 6, 7, 40, 41, 42, 43, 44, 45]);
    for dt in DTYPES {
        let Some(mut g) = gpu(dt) else { return };
        g.set_lora_in_gemm(32);
        say(&format!("{dt:?} lora shrink in the GEMM"));
        // The layers' weights (small, so the LoRA terms stand well above the product's rounding).
        let mut ws = Vec::new();
        for l in 0..layers {
            for &(parts, k, out, _) in &projections {
                let w = pair(&g, &mut rng, &[out, k], -0.005, 0.005);
                let targets: Vec<Target> = parts.iter().map(|p| p.0).collect();
                let kept = g.lora_gemm_weight(w.gpu, l, &targets).unwrap();
                ws.push((l, w.cpu, kept));
            }
        }
        let (cpu, dev) = random_adapters(&g, &mut rng, &specs, layers, &|t| {
            (if t == Target::O { qd } else { h }, width(t))
        });
        // (adapters of the two segments, whether the GEMMs take the q/k/v and the o shrinks, copies expected
        // so far: one a group whose rows change).
        let cases: [([usize; 2], [bool; 2], u64); 7] = [
            ([0, 0], [true, true], 2),
            ([0, 0], [true, true], 2),
            ([1, 1], [true, true], 4),
            ([0, 0], [true, true], 6),
            ([2, 2], [false, true], 7),
            ([3, 3], [false, false], 7),
            ([0, 1], [false, false], 7),
        ];
        for (ads, in_gemm, copies) in cases {
            let rows: Vec<LoraRows<'_, CudaBackend>> = segs
                .iter()
                .zip(ads)
                .map(|(&(start, len), a)| LoraRows {
                    start,
                    len,
                    adapter: &dev[a],
                })
                .collect();
            let (steps0, _) = g.lora_in_gemm_counts();
            let step = g.lora_step(n, &rows).unwrap().expect("a decode step gets a plan");
            let (steps1, copied) = g.lora_in_gemm_counts();
            let what = format!("{dt:?} adapters {ads:?}");
            let any = in_gemm.contains(&true);
            assert_eq!(
                steps1 - steps0,
                u64::from(any),
                "{what}: steps with a shrink in the GEMM"
            );
            assert_eq!(copied, copies, "{what}: copies of lora_A rows");
            for (j, (l, w_cpu, w_gpu)) in ws.iter().enumerate() {
                let (l, (parts, k, out, slots)) = (*l, projections[j % 2]);
                let in_gemm = in_gemm[j % 2];
                let x = pair(&g, &mut rng, &[n, k], -1.0, 1.0);
                let plain_cpu = CpuBackend.linear(&x.cpu, w_cpu, None).unwrap();
                let mut want = CpuBackend.linear(&x.cpu, w_cpu, None).unwrap();
                let mut cpu_segs = Vec::new();
                for &(t, col) in parts {
                    for (&(start, len), a) in segs.iter().zip(ads) {
                        if let Some((ca, cb)) = &cpu[a][l][t.index()] {
                            cpu_segs.push(LoraSegment {
                                start,
                                len,
                                a: ca,
                                b: cb,
                                scale: specs[a].1,
                                col,
                            });
                        }
                    }
                }
                CpuBackend.lora(&mut want, &x.cpu, &cpu_segs).unwrap();
                let plain = g.to_f32(&g.linear(&x.gpu, w_gpu, None).unwrap()).unwrap();
                // `lora_project`, then the usual path (the product, then `lora_layer`) for comparison.
                for usual in [false, true] {
                    let y = if usual {
                        let mut y = g.linear(&x.gpu, w_gpu, None).unwrap();
                        g.lora_layer(&mut y, &x.gpu, &step, l, parts).unwrap();
                        y
                    } else {
                        g.lora_project(&x.gpu, w_gpu, None, &step, l, parts).unwrap()
                    };
                    let cols = g.shape(&y)[1];
                    let expect_cols = if in_gemm && !usual { out + slots * 32 } else { out };
                    assert_eq!(cols, expect_cols, "{what} layer {l} usual={usual}: output columns");
                    let all = g.to_f32(&y).unwrap();
                    let got: Vec<f32> = all.chunks(cols).flat_map(|r| r[..out].to_vec()).collect();
                    let w = format!("{what} layer {l} usual={usual}");
                    let d_got: Vec<f32> = got.iter().zip(&plain).map(|(a, b)| a - b).collect();
                    let d_want: Vec<f32> = want.data.iter().zip(&plain_cpu.data).map(|(a, b)| a - b).collect();
                    let adapter_rows = |v: &[f32]| -> Vec<f32> {
                        (0..n)
                            .filter(|r| !base_rows.contains(r))
                            .flat_map(|r| v[r * out..(r + 1) * out].to_vec())
                            .collect()
                    };
                    check(
                        &format!("{w}: LoRA terms"),
                        &adapter_rows(&d_got),
                        &adapter_rows(&d_want),
                        tol(dt),
                    );
                    let base = |v: &[f32]| -> Vec<f32> {
                        base_rows
                            .iter()
                            .flat_map(|&r| v[r * out..(r + 1) * out].to_vec())
                            .collect()
                    };
                    check(&format!("{w}: base rows"), &base(&got), &base(&plain_cpu.data), tol(dt));
                    if parts == o {
                        // The residual add and norm after o read the wide output's first columns.
                        let (res, nw) = (
                            pair(&g, &mut rng, &[n, h], -1.0, 1.0),
                            pair(&g, &mut rng, &[h], 0.5, 1.5),
                        );
                        let narrow = CpuBackend.tensor_from_f32(&[n, h], &got).unwrap();
                        let (mut r_cpu, mut r_gpu) = (res.cpu, res.gpu);
                        let want_n = CpuBackend.add_rms_norm(&mut r_cpu, &narrow, &nw.cpu, 1e-5).unwrap();
                        let got_n = g.add_rms_norm(&mut r_gpu, &y, &nw.gpu, 1e-5).unwrap();
                        check(
                            &format!("{w}: add_rms_norm"),
                            &g.to_f32(&got_n).unwrap(),
                            &want_n.data,
                            tol(dt),
                        );
                        check(
                            &format!("{w}: residual"),
                            &g.to_f32(&r_gpu).unwrap(),
                            &r_cpu.data,
                            tol(dt),
                        );
                    }
                }
            }
        }
    }
}
