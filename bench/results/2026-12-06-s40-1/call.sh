#!/usr/bin/env bash
# Session 40 call 1 (binaries of 723f90d, the code of 59c2f75): the checks left from session 39 (its mends never
# ran on a GPU): cuda_kernels' LoRA, rotary and norm tests, cuda_golden, cuda_graphs (with
# one_adapter_steps_through_graphs_equal_eager_steps, new), cuda_adapters, cuda_chunked, the e2e test; a probe of
# whether a decode-sized GEMM leaves room for a product beside it on a second stream (scripts/gpu/overlap_probe.py);
# 32-layer decode steps through graphs b128, b128-a8, b128-distinct; then bench.sh.
bin=.gpu-bin-serve; . scripts/gpu/call_prelude.sh
for t in lora_ rope norm; do
    timeout 120 "$bin/cuda_kernels" --test-threads=2 "$t" >>"$R/kernels.txt" 2>&1
    echo "rc $t $?" >>"$R/kernels.txt"
done
lap kernels
timeout 100 "$bin/cuda_golden" --test-threads=1 >"$R/golden.txt" 2>&1
echo "rc $?" >>"$R/golden.txt"
timeout 150 "$bin/cuda_graphs" --test-threads=1 >"$R/graphs.txt" 2>&1
echo "rc $?" >>"$R/graphs.txt"
timeout 100 "$bin/cuda_adapters" --test-threads=1 >"$R/adapters.txt" 2>&1
echo "rc $?" >>"$R/adapters.txt"
timeout 100 "$bin/cuda_chunked" --test-threads=1 >"$R/chunked.txt" 2>&1
echo "rc $?" >>"$R/chunked.txt"
lap tests
RUN_SKIP="nvrtc kernels adapters sampling bench chunked graphs golden" timeout 90 scripts/gpu/run.sh "$R/run" "$bin" \
    >"$R/run.txt" 2>&1
echo "rc $?" >>"$R/run.txt"
grep -h "^E2E" "$R/run/e2e.log" >"$R/e2e.txt" 2>/dev/null
lap e2e
timeout 60 python3 scripts/gpu/overlap_probe.py 128 64 >"$R/overlap.txt" 2>&1
echo "rc $?" >>"$R/overlap.txt"
lap probe
for s in b128 b128-a8 b128-distinct; do
    profile_step $s graphs LORAX_PROFILE_GRAPHS=1
done
lap steps
left=$((575 - $(date +%s) + t0))
echo "bench budget ${left}s" >"$R/bench.txt"
BENCH_TIMEOUT=$((left - 10)) BENCH_PEFT_BUDGET=110 timeout $left scripts/gpu/bench.sh "$R/bench" "$bin" >>"$R/bench.txt" 2>&1
echo "rc $?" >>"$R/bench.txt"
lap bench
tar -C "$OUT" -czf "$OUT/all.tgz" r
