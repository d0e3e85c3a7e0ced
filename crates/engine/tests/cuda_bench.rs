//! Kernel benchmarks on the GPU, ignored by default (scripts/gpu/run.sh runs them with `--ignored`).
//!
//! Ceilings measured in the same run: a device-to-device copy (bytes read + written) and a bf16 cuBLAS
//! GEMM. Then SGMV shrink+expand at h=4096, r=16, batch 64 (all-distinct and identical adapters; Punica
//! reports 116 µs and 40 µs on an A100) and paged decode attention as a fraction of the copy bandwidth.
//! Kernels are timed from CUDA-graph replays (launch gaps excluded) with CUDA events after warm-up;
//! medians. Inputs are random (made on the device), and where one problem fits in the 60 MB L2, several
//! input sets rotate. Each result is one `BENCH` line: name | value | unit | detail.
#![allow(clippy::unwrap_used)]

mod cuda_common;

use cuda_common::{backend, bench, event, graph_ms, median, say, Rng};
use lorax_engine::backend::cuda::{AttnKernel, GemmSm90, PrefillShape, PREFILL_SM90_LABELS};
use lorax_engine::backend::{AttnMeta, AttnSeq, LoraSegment};
use lorax_engine::weights::DType;
use lorax_engine::{Backend, CudaBackend, CudaTensor, Result};

/// Median milliseconds of `f()` issued directly (host work between launches included), events per call.
fn direct_ms(g: &CudaBackend, reps: usize, f: &mut dyn FnMut() -> Result<()>) -> f64 {
    for _ in 0..3 {
        f().unwrap();
    }
    g.synchronize().unwrap();
    let s = g.stream();
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        let (a, b) = (event(g), event(g));
        a.record(s).unwrap();
        f().unwrap();
        b.record(s).unwrap();
        v.push(f64::from(a.elapsed_ms(&b).unwrap()));
    }
    median(v)
}

fn rand(g: &CudaBackend, shape: &[usize], seed: u32, range: f32) -> CudaTensor {
    g.random_uniform(shape, seed, -range, range).unwrap()
}

/// Copy bandwidth (GB/s, read + written) of a 2 GiB device-to-device copy.
fn copy_bandwidth(g: &CudaBackend) -> f64 {
    let n = 1usize << 30; // bf16 elements: 2 GiB
    let src = rand(g, &[n], 1, 1.0);
    let mut dst = g.zeros(&[n]).unwrap();
    let ms = direct_ms(g, 10, &mut || {
        g.stream()
            .memcpy_dtod(src.device_slice().unwrap(), dst.device_slice_mut().unwrap())
            .map_err(|e| lorax_engine::EngineError::Backend(format!("{e:?}")))
    });
    let gbs = (4 * n) as f64 / (ms * 1e-3) / 1e9;
    bench(
        "copy_bandwidth",
        gbs,
        "GB/s",
        "2 GiB device-to-device, bytes read + written",
    );
    gbs
}

fn gemm_rate(g: &CudaBackend) {
    let n = 8192;
    let x = rand(g, &[n, n], 2, 1.0);
    let w = rand(g, &[n, n], 3, 0.02);
    let ms = direct_ms(g, 10, &mut || g.linear(&x, &w, None).map(|_| ()));
    let tflops = 2.0 * (n as f64).powi(3) / (ms * 1e-3) / 1e12;
    bench(
        "gemm_bf16_8192",
        tflops,
        "TFLOP/s",
        &format!("cuBLAS via linear, {ms:.3} ms"),
    );
}

/// SGMV shrink+expand, `batch` rows of width h, rank r, `distinct` adapters (one per row) or one shared.
fn sgmv(g: &CudaBackend, h: usize, r: usize, batch: usize, distinct: bool, copy_gbs: f64) {
    const SETS: usize = 8;
    let n_ad = if distinct { batch } else { 1 };
    let mut seed = 100;
    let mut next = || {
        seed += 1;
        seed
    };
    let xs: Vec<CudaTensor> = (0..SETS).map(|_| rand(g, &[batch, h], next(), 1.0)).collect();
    let mut ys: Vec<CudaTensor> = (0..SETS).map(|_| rand(g, &[batch, h], next(), 1.0)).collect();
    let ads: Vec<Vec<(CudaTensor, CudaTensor)>> = (0..SETS)
        .map(|_| {
            (0..n_ad)
                .map(|_| (rand(g, &[r, h], next(), 0.02), rand(g, &[h, r], next(), 0.2)))
                .collect()
        })
        .collect();
    let segs: Vec<Vec<LoraSegment<'_, CudaTensor>>> = ads
        .iter()
        .map(|set| {
            set.iter()
                .enumerate()
                .map(|(i, (a, b))| LoraSegment {
                    start: if distinct { i } else { 0 },
                    len: if distinct { 1 } else { batch },
                    a,
                    b,
                    scale: 2.0,
                    col: 0,
                })
                .collect()
        })
        .collect();
    let what = if distinct { "distinct" } else { "identical" };
    // The whole op as the model calls it (host checks, segment table upload, memset, two launches).
    let mut k = 0;
    let op_ms = direct_ms(g, 50, &mut || {
        k = (k + 1) % SETS;
        g.lora(&mut ys[k], &xs[k], &segs[k])
    });
    let mut plans = Vec::new();
    let mut weight_bytes = 0;
    for ((y, x), s) in ys.iter_mut().zip(&xs).zip(&segs) {
        let p = g.lora_plan(y, x, s).unwrap().unwrap();
        weight_bytes = p.weight_bytes;
        plans.push(p);
    }
    let ms = graph_ms(g, SETS, 100, &|i| g.lora_run(&plans[i]));
    let bytes = weight_bytes + 3 * batch * h * 2;
    let gbs = bytes as f64 / (ms * 1e-3) / 1e9;
    bench(
        &format!("sgmv_{what}_h{h}_r{r}_b{batch}"),
        ms * 1e3,
        "us",
        &format!(
            "kernels from graph replay, {SETS} rotating input sets; {:.0} GB/s = {:.0}% of copy; whole op incl. host: {:.1} us",
            gbs,
            100.0 * gbs / copy_gbs,
            op_ms * 1e3
        ),
    );
}

/// Decode attention: `batch` sequences of `ctx` tokens, one query row each, paged in blocks of 16
/// scattered through the cache.
fn decode_attention(g: &CudaBackend, batch: usize, ctx: usize, heads: usize, kv_heads: usize, copy_gbs: f64) {
    let (hd, bs) = (128, 16);
    let per_seq = ctx.div_ceil(bs);
    let num_blocks = batch * per_seq;
    let kvw = kv_heads * hd;
    let k = rand(g, &[num_blocks * bs, kvw], 11, 1.0);
    let v = rand(g, &[num_blocks * bs, kvw], 12, 1.0);
    let q = rand(g, &[batch, heads * hd], 13, 1.0);
    let mut rng = Rng(7);
    let perm = rng.perm(num_blocks);
    let tables: Vec<&[u32]> = perm.chunks(per_seq).collect();
    let seqs: Vec<AttnSeq<'_>> = tables
        .iter()
        .enumerate()
        .map(|(i, t)| AttnSeq {
            q_start: i,
            q_len: 1,
            ctx_before: ctx - 1,
            block_table: t,
        })
        .collect();
    let meta = AttnMeta {
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim: hd,
        block_size: bs,
        scale: 1.0 / (hd as f32).sqrt(),
        sliding_window: None,
        seqs: &seqs,
    };
    let plan = g.attention_plan(&q, &k, &v, &meta).unwrap();
    let ms = graph_ms(g, 1, 20, &|_| g.attention_run(&plan));
    let gbs = plan.kv_bytes as f64 / (ms * 1e-3) / 1e9;
    bench(
        &format!(
            "decode_attention_b{batch}_ctx{ctx}_h{heads}kv{kv_heads}_{}_{}split",
            plan.kernel_name(),
            plan.splits
        ),
        100.0 * gbs / copy_gbs,
        "% of copy bw",
        &format!(
            "{ms:.3} ms, {gbs:.0} GB/s over {:.2} GB of K+V, hd {hd}, block {bs}, {} split(s)",
            plan.kv_bytes as f64 / 1e9,
            plan.splits
        ),
    );
}

/// Causal prefill of sequences of lengths `lens` in one launch (no cached prefix): the tensor-core kernel,
/// or (`tc` false) the paged kernel with one block per query row and KV head.
fn prefill_attention(g: &mut CudaBackend, tc: bool, lens: &[usize], heads: usize, kv_heads: usize) {
    g.set_tensor_core_prefill(tc);
    let g = &*g;
    let (hd, bs) = (128, 16);
    let rows: usize = lens.iter().sum();
    let nbs: Vec<usize> = lens.iter().map(|l| l.div_ceil(bs)).collect();
    let nb: usize = nbs.iter().sum();
    let k = rand(g, &[nb * bs, kv_heads * hd], 21, 1.0);
    let v = rand(g, &[nb * bs, kv_heads * hd], 22, 1.0);
    let q = rand(g, &[rows, heads * hd], 23, 1.0);
    let mut tables: Vec<Vec<u32>> = Vec::new();
    let mut first = 0u32;
    for &n in &nbs {
        tables.push((first..first + n as u32).collect());
        first += n as u32;
    }
    let mut q_start = 0;
    let seqs: Vec<AttnSeq<'_>> = lens
        .iter()
        .zip(&tables)
        .map(|(&len, table)| {
            let s = AttnSeq {
                q_start,
                q_len: len,
                ctx_before: 0,
                block_table: table,
            };
            q_start += len;
            s
        })
        .collect();
    let meta = AttnMeta {
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim: hd,
        block_size: bs,
        scale: 1.0 / (hd as f32).sqrt(),
        sliding_window: None,
        seqs: &seqs,
    };
    let plan = g.attention_plan(&q, &k, &v, &meta).unwrap();
    let ms = graph_ms(g, 1, 10, &|_| g.attention_run(&plan));
    // QKᵀ and PV over the causal triangles: 2 · 2 · len²/2 · heads · hd flops each.
    let flops: f64 = lens.iter().map(|&l| 2.0 * (l * l) as f64 * (heads * hd) as f64).sum();
    let shape = lens.iter().map(ToString::to_string).collect::<Vec<_>>().join("+");
    bench(
        &format!(
            "prefill_attention_{}_len{shape}_h{heads}kv{kv_heads}",
            if tc { "tc" } else { "paged" }
        ),
        ms,
        "ms",
        &format!("{:.1} TFLOP/s over the causal triangle(s)", flops / (ms * 1e-3) / 1e12),
    );
}

/// The tensor-core prefill kernel's tile shapes (`PrefillShape`) at the serving shapes: a 1000-token prompt
/// (the TTFT target), four and eight 512-token prompts (2048- and 4096-token prompt chunks), 4096 and 16384
/// tokens.
#[test]
#[ignore = "GPU benchmark: run with --ignored --nocapture"]
fn prefill_benchmarks() {
    let Some(mut g) = backend(DType::BF16) else { return };
    g.set_prefill_sm90(None); // the Hopper kernel (the default there) is timed below, on its own
    for shape in PrefillShape::ALL.into_iter().map(Some).chain([None]) {
        g.set_prefill_shape(shape);
        say(&format!("prefill tiles {}:", shape.map_or("auto", PrefillShape::label)));
        prefill_attention(&mut g, true, &[1000], 32, 8);
        prefill_attention(&mut g, true, &[512; 4], 32, 8);
        prefill_attention(&mut g, true, &[512; 8], 32, 8);
        prefill_attention(&mut g, true, &[4096], 32, 8);
        prefill_attention(&mut g, true, &[16384], 32, 8);
    }
    // The Hopper kernel (kernels/prefill_sm90.cu), where it builds, in each form.
    for form in PREFILL_SM90_LABELS {
        if !g.set_prefill_sm90(Some(form)) {
            say("SKIPPED: the Hopper prefill kernel (not compute capability 9.0, or its build failed: see the log)");
            break;
        }
        say(&format!("prefill on the Hopper kernel (sm90), form {form}:"));
        // 8192 too: where ws128 (faster at 16384, slower at 4096 in session 42) starts to pay.
        for lens in [&[1000][..], &[512; 4], &[512; 8], &[4096], &[8192], &[16384]] {
            prefill_attention(&mut g, true, lens, 32, 8);
        }
    }
    g.set_prefill_sm90(None);
}

/// Decode attention alone (the default kernel) at the serving shapes (1-128 streams of 640 tokens:
/// 512-token prompts halfway through 256 new tokens) and at longer contexts, as a fraction of the copy
/// bandwidth measured in the same run, under split targets of 2, 3 (the default), 4, 8 and 16 blocks per
/// multiprocessor (contexts split when the rows alone leave the GPU short of blocks; a shape that does not
/// split at a target repeats its unsplit figure).
#[test]
#[ignore = "GPU benchmark: run with --ignored --nocapture"]
fn decode_attention_benchmarks() {
    let Some(mut g) = backend(DType::BF16) else { return };
    let copy = copy_bandwidth(&g);
    for target in [2, 3, 4, 8, 16] {
        g.set_attention_split_target(target);
        say(&format!("split target {target} blocks per SM:"));
        for (batch, ctx) in [
            (1, 640),
            (8, 640),
            (16, 640),
            (32, 640),
            (86, 640),
            (128, 640),
            (256, 1024),
            (64, 4096),
            (8, 4096),
            (16, 2048),
            (4, 16384),
            (8, 32768),
            (1, 32768),
            (1, 131_072),
        ] {
            decode_attention(&g, batch, ctx, 32, 8, copy);
        }
    }
}

/// Decode attention at the serving shapes (86 to 256 streams of 512-1024 tokens, whose blocks fill a wave
/// or more unsplit) with their contexts split into parts of at least 16 chunks (the default: none of these
/// split), 4, 3 and 2, with the splits merged by `attn_reduce` and by each row's last block: whether
/// filling the last wave pays for the splits' fixed work (bench/NOTES.md session 38).
#[test]
#[ignore = "GPU benchmark: run with --ignored --nocapture"]
fn decode_attention_split_benchmarks() {
    let Some(mut g) = backend(DType::BF16) else { return };
    let copy = copy_bandwidth(&g);
    for merge in [false, true] {
        g.set_attention_merge(merge);
        for min_chunks in [16, 4, 3, 2] {
            g.set_attention_split_min_chunks(min_chunks);
            say(&format!(
                "splits of at least {min_chunks} chunks, merged by the last block: {merge}"
            ));
            for (batch, ctx) in [(86, 640), (128, 512), (128, 640), (128, 768), (256, 1024)] {
                decode_attention(&g, batch, ctx, 32, 8, copy);
            }
        }
    }
}

#[test]
#[ignore = "GPU benchmark: run by scripts/gpu/run.sh"]
fn kernel_benchmarks() {
    let Some(mut g) = backend(DType::BF16) else { return };
    say(&format!("backend: {}, {} SMs", g.name(), g.num_sms()));
    let copy = copy_bandwidth(&g);
    gemm_rate(&g);
    sgmv(&g, 4096, 16, 64, true, copy);
    sgmv(&g, 4096, 16, 64, false, copy);
    sgmv(&g, 4096, 64, 64, true, copy);
    decode_attention(&g, 64, 4096, 32, 32, copy);
    // GQA on each kernel family at head size 128 (16 and 8 lanes per token into registers; the default, on
    // the tensor cores).
    for kernel in AttnKernel::ALL {
        g.set_attention_kernel(kernel);
        decode_attention(&g, 64, 4096, 32, 8, copy);
        decode_attention(&g, 64, 4096, 64, 8, copy);
        // GQA 8 as two blocks of 4 heads per KV head (keys and values read twice, the second time mostly
        // from L2).
        g.set_attention_max_heads(4);
        decode_attention(&g, 64, 4096, 64, 8, copy);
        g.set_attention_max_heads(8);
        decode_attention(&g, 128, 640, 32, 8, copy);
        decode_attention(&g, 256, 1024, 32, 8, copy);
        decode_attention(&g, 8, 32768, 32, 8, copy);
        decode_attention(&g, 1, 131_072, 32, 8, copy);
        decode_attention(&g, 1, 768, 32, 8, copy);
    }
    g.set_attention_kernel(AttnKernel::Tensor); // the default
    prefill_attention(&mut g, true, &[4096], 32, 8);
    prefill_attention(&mut g, false, &[4096], 32, 8);
    prefill_attention(&mut g, true, &[16384], 32, 8);
}

/// The Hopper prompt GEMM (kernels/gemm_sm90.cu) against cuBLAS at the Mistral-7B shapes and prompt-sized row
/// counts: each linear layer's plain product, and the gate/up product with silu-mul in its epilogue against
/// cuBLAS's gate/up product and `silu_mul`. Two rounds, each pair back to back (the power cap moves the clock
/// between rounds). Weights rotate through copies as in `linear_ms`.
#[test]
#[ignore = "GPU benchmark (Hopper): run with --ignored --nocapture"]
fn gemm_sm90_benchmarks() {
    let Some(mut g) = backend(DType::BF16) else { return };
    if !g.set_gemm_sm90(GemmSm90::All, 1) {
        say("SKIPPED: the Hopper prompt GEMM runs on compute capability 9.0 with 16-bit storage only");
        return;
    }
    let (width, clusters) = g.gemm_sm90_clusters();
    say(&format!(
        "the Hopper prompt GEMM's grid: {clusters} clusters of {width} block(s) ({} multiprocessors)",
        g.num_sms()
    ));
    let linears = [
        ("qkv", 6144usize, 4096usize),
        ("o", 4096, 4096),
        ("gate_up", 28672, 4096),
        ("down", 4096, 14336),
    ];
    // GEMM_BENCH_ROWS="1000 4160" and GEMM_BENCH_ROUNDS=1 narrow it for a short device call.
    let rows: Vec<usize> = std::env::var("GEMM_BENCH_ROWS").map_or_else(
        |_| vec![128, 256, 512, 1000, 2048, 4160],
        |v| v.split_whitespace().map(|r| r.parse().unwrap()).collect(),
    );
    let rounds: usize = std::env::var("GEMM_BENCH_ROUNDS").map_or(2, |v| v.parse().unwrap());
    for round in 1..=rounds {
        for &m in &rows {
            for (i, &(name, n, k)) in linears.iter().enumerate() {
                let flop = 2.0 * (m * n * k) as f64;
                let mut line = Vec::new();
                for (label, which) in [("cublas", GemmSm90::Off), ("sm90", GemmSm90::All)] {
                    g.set_gemm_sm90(which, 1);
                    let ms = linear_ms(&g, m, n, k, 600 + 10 * i as u32);
                    line.push(format!(
                        "{label} {:.1} us ({:.0} TFLOP/s)",
                        ms * 1e3,
                        flop / (ms * 1e-3) / 1e12
                    ));
                    bench(
                        &format!("gemm_sm90_r{round}_{name}_m{m}_{label}"),
                        ms * 1e3,
                        "us",
                        &format!("[{m}, {k}] x [{n}, {k}]^T"),
                    );
                }
                say(&format!("  round {round} {name} m={m}: {}", line.join(", ")));
            }
            // o and down added into the residual stream, against cuBLAS's product then add_assign.
            for (name, n, k) in [("o", 4096usize, 4096usize), ("down", 4096, 14336)] {
                let ws: Vec<CudaTensor> = (0..2).map(|i| rand(&g, &[n, k], 800 + i as u32, 0.02)).collect();
                let x = rand(&g, &[m, k], 888, 1.0);
                let y = std::cell::RefCell::new(rand(&g, &[m, n], 889, 1.0));
                g.set_gemm_sm90(GemmSm90::Off, 1);
                let two = graph_ms(&g, 2, 20, &|i| {
                    g.add_assign(&mut y.borrow_mut(), &g.linear(&x, &ws[i], None)?)
                });
                g.set_gemm_sm90(GemmSm90::Fused, 1);
                let fused = graph_ms(&g, 2, 20, &|i| {
                    assert!(g.linear_add(&x, &ws[i], &mut y.borrow_mut())?, "the fused add runs");
                    Ok(())
                });
                bench(
                    &format!("gemm_sm90_r{round}_{name}_add_m{m}"),
                    fused * 1e3,
                    "us",
                    &format!("cuBLAS {name} + add_assign {:.1} us: {:.3}x", two * 1e3, fused / two),
                );
            }
            // gate/up then silu_mul, against the fused product.
            let (f, k) = (14336usize, 4096usize);
            let copies = 2;
            let ws: Vec<CudaTensor> = (0..copies)
                .map(|i| rand(&g, &[2 * f, k], 700 + i as u32, 0.02))
                .collect();
            let x = rand(&g, &[m, k], 777, 1.0);
            g.set_gemm_sm90(GemmSm90::Off, 1);
            let two = graph_ms(&g, copies, 20, &|i| {
                g.silu_mul(&g.linear(&x, &ws[i], None)?).map(|_| ())
            });
            g.set_gemm_sm90(GemmSm90::Silu, 1);
            for (label, swap) in [("", false), ("_t", true)] {
                g.set_gemm_sm90_swap(swap);
                let fused = graph_ms(&g, copies, 20, &|i| {
                    g.linear_silu_mul(&x, &ws[i], f)?.expect("the fused product runs");
                    Ok(())
                });
                bench(
                    &format!("gemm_sm90_r{round}_gate_up_silu{label}_m{m}"),
                    fused * 1e3,
                    "us",
                    &format!("cuBLAS gate/up + silu_mul {:.1} us: {:.3}x", two * 1e3, fused / two),
                );
            }
            g.set_gemm_sm90_swap(false);
        }
    }
    g.set_gemm_sm90(GemmSm90::Off, 1);
}

/// Milliseconds of y = x·wᵀ for an [m, k] x and an [n, k] w, the median over graph replays; the weights
/// rotate through 2-4 copies (at least 128 MB together) so that few are served from L2.
fn linear_ms(g: &CudaBackend, m: usize, n: usize, k: usize, seed: u32) -> f64 {
    let copies = if n * k * 2 < (64 << 20) { 4 } else { 2 };
    let ws: Vec<CudaTensor> = (0..copies).map(|i| rand(g, &[n, k], seed + i as u32, 0.02)).collect();
    let x = rand(g, &[m, k], seed + 100, 1.0);
    graph_ms(g, copies, 20, &|i| g.linear(&x, &ws[i], None).map(|_| ()))
}

/// Where a Mistral-7B-shaped decode step and a 1000-token prefill spend their time: every linear layer of
/// the model (q/k/v and gate/up fused, as the model runs them) at 1, 2, 4, 8-256 and 1000 rows (1-4 rows on
/// the gemv kernels, 8-256 on the wgmma skinny GEMM, each also on cuBLAS for comparison; weights rotated
/// through copies so that none is served from the 60 MB L2), the LM head, and attention at the serving shapes, each from graph replays. Summed per step, these
/// compare with the measured step times (`cuda_graphs`' decode-step benchmark, the serving TTFT).
#[test]
#[ignore = "GPU benchmark: needs about 5 GB free (the copy-bandwidth buffers); run with --ignored --nocapture"]
fn step_profile() {
    let Some(mut g) = backend(DType::BF16) else { return };
    let copy = copy_bandwidth(&g);
    let (vocab, layers) = (32000usize, 32.0);
    // The model's linear layers as it runs them: q/k/v and gate/up fused.
    let linears = [
        ("qkv", 6144usize, 4096usize),
        ("o", 4096, 4096),
        ("gate_up", 28672, 4096),
        ("down", 4096, 14336),
    ];
    // Rows 1-4 on the gemv kernels (1-2 by default) and on cuBLAS; 8-256 rows on the wgmma skinny GEMM
    // (where it is built; off by default) and on cuBLAS; 1000 rows on cuBLAS.
    let wg = g.set_skinny_gemm(true);
    let mut cases = vec![
        (1usize, 4usize, false),
        (1, 0, false),
        (2, 4, false),
        (2, 0, false),
        (4, 4, false),
        (4, 0, false),
    ];
    for m in [8, 32, 64, 88, 128, 256] {
        if wg {
            cases.push((m, 4, true));
        }
        cases.push((m, 4, false));
    }
    cases.push((1000, 4, false));
    for (m, gemv_rows, skinny) in cases {
        g.set_gemv_rows(gemv_rows);
        g.set_skinny_gemm(skinny);
        let how = if m <= gemv_rows {
            "gemv"
        } else if skinny {
            "wgmma"
        } else {
            "cublas"
        };
        let mut layer_ms = 0.0;
        for (i, &(name, n, k)) in linears.iter().enumerate() {
            let ms = linear_ms(&g, m, n, k, 200 + 10 * i as u32);
            layer_ms += ms;
            let gbs = (n * k * 2) as f64 / (ms * 1e-3) / 1e9;
            let tflops = 2.0 * (m * n * k) as f64 / (ms * 1e-3) / 1e12;
            bench(
                &format!("profile_linear_{name}_m{m}_{how}"),
                ms * 1e3,
                "us",
                &format!(
                    "[{m}, {k}] x [{n}, {k}]^T: weights at {gbs:.0} GB/s ({:.0}% of copy), {tflops:.0} TFLOP/s",
                    100.0 * gbs / copy
                ),
            );
        }
        // Logits: every row at decode, the last row only at a prefill.
        let head_rows = if m == 1000 { 1 } else { m };
        let head_ms = linear_ms(&g, head_rows, vocab, 4096, 400);
        bench(
            &format!("profile_linears_per_step_m{m}_{how}"),
            layers * layer_ms + head_ms,
            "ms",
            &format!(
                "32 layers x 4 linears ({:.3} ms per layer) + LM head on {head_rows} row(s) ({head_ms:.3} ms, {:.0}% of copy)",
                layer_ms,
                100.0 * (vocab * 4096 * 2) as f64 / (head_ms * 1e-3) / 1e9 / copy
            ),
        );
    }
    g.set_gemv_rows(2);
    g.set_skinny_gemm(false);
    // Attention per layer at the serving shapes (32 query heads, 8 KV heads): decode at batch 1 and 128,
    // and a 1000-token prefill on the tensor-core kernel.
    decode_attention(&g, 1, 640, 32, 8, copy);
    decode_attention(&g, 128, 640, 32, 8, copy);
    prefill_attention(&mut g, true, &[1000], 32, 8);
}

/// What one wgmma skinny product costs besides streaming its weights (bench/NOTES.md, session 16): shapes
/// of equal weight bytes and equal stages per block (stream-K over the 132 multiprocessors of an H200)
/// whose tiles are split over 1, 2 or 4 blocks (so 0, 2 or 4 shares to sum per tile), and products of
/// one stage per block (132 blocks, and 1 block; their weights fit in L2, so their GB/s are L2 speed), at
/// 8 and 128 rows; cuBLAS beside the first three. A stage is 16 KiB of weights plus the batch rows' slice.
/// The splits are exactly 1, 2 and 4 blocks per tile when the multiprocessor count is a multiple of 4
/// (132 on the H200).
#[test]
#[ignore = "GPU benchmark: needs about 5 GB free; run with --ignored --nocapture"]
fn skinny_fixed_cost() {
    let Some(mut g) = backend(DType::BF16) else { return };
    if !g.set_skinny_gemm(true) {
        say("SKIPPED: the wgmma skinny GEMM cannot be built on this device (Hopper and 16-bit storage only)");
        return;
    }
    let copy = copy_bandwidth(&g);
    let sms = g.num_sms();
    // (label, n, k): tiles of 128 features, stages of 64 k.
    let shapes = [
        ("split1", sms * 128, 4096),
        ("split2", sms * 64, 8192),
        ("split4", sms * 32, 16384),
        ("stage1", sms * 128, 64),
        ("oneblock", 128, 64),
    ];
    for m in [8usize, 128] {
        for &(label, n, k) in &shapes {
            for skinny in [true, false] {
                if !skinny && !label.starts_with("split") {
                    continue;
                }
                g.set_skinny_gemm(skinny);
                let ms = linear_ms(&g, m, n, k, 700);
                let gbs = (n * k * 2) as f64 / (ms * 1e-3) / 1e9;
                let how = if skinny { "wgmma" } else { "cublas" };
                bench(
                    &format!("skinny_cost_{label}_m{m}_{how}"),
                    ms * 1e3,
                    "us",
                    &format!(
                        "[{m}, {k}] x [{n}, {k}]^T, {} tiles x {} stages: weights at {gbs:.0} GB/s ({:.0}% of copy)",
                        n.div_ceil(128),
                        k / 64,
                        100.0 * gbs / copy
                    ),
                );
            }
        }
    }
    g.set_skinny_gemm(false);
}

/// What a LoRA shrink costs inside the base projection's GEMM (`lora_A`'s rows appended to the weight, so
/// one product gives the projection and the shrink): q/k/v (6144 features) and o (4096) at 64, 128 and 256
/// rows, plain and with 16 (one rank-16 part), 48 (three), 64 and 128 rows more, two rounds interleaved.
#[test]
#[ignore = "GPU benchmark: run with --ignored --nocapture"]
fn lora_in_gemm_shapes() {
    let Some(g) = backend(DType::BF16) else { return };
    let copy = copy_bandwidth(&g);
    for round in 0..2 {
        for m in [64usize, 128, 256] {
            for (name, n, extra) in [
                ("qkv", 6144usize, [0usize, 48, 64, 96, 128]),
                ("o", 4096, [0, 16, 48, 64, 128]),
            ] {
                for e in extra {
                    let ms = linear_ms(&g, m, n + e, 4096, 900 + e as u32);
                    let gbs = ((n + e) * 4096 * 2) as f64 / (ms * 1e-3) / 1e9;
                    bench(
                        &format!("in_gemm_{name}_m{m}_plus{e}_r{round}"),
                        ms * 1e3,
                        "us",
                        &format!("[{m}, 4096] x [{}, 4096]^T: {:.0}% of copy", n + e, 100.0 * gbs / copy),
                    );
                }
            }
        }
    }
}
