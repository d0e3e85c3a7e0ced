#!/usr/bin/env bash
# Session 39 call 7 (binaries of the review's mends: the shrink in the GEMM decided from the config's biases,
# ranks checked per part against the group's slot, slots a multiple of 8, adapters without k pairs take it):
# cuda_kernels lora_shrink_in_gemm_matches_cpu and the rotary tests, cuda_golden, cuda_graphs, the e2e test.
bin=.gpu-bin-serve; . scripts/gpu/call_prelude.sh
for t in lora_shrink_in_gemm rope; do
    timeout 100 "$bin/cuda_kernels" --test-threads=1 "$t" >>"$R/kernels.txt" 2>&1
    echo "rc $t $?" >>"$R/kernels.txt"
done
timeout 100 "$bin/cuda_golden" --test-threads=1 >"$R/golden.txt" 2>&1
echo "rc $?" >>"$R/golden.txt"
timeout 150 "$bin/cuda_graphs" --test-threads=1 >"$R/graphs.txt" 2>&1
echo "rc $?" >>"$R/graphs.txt"
RUN_SKIP="nvrtc kernels adapters sampling bench chunked graphs golden" timeout 90 scripts/gpu/run.sh "$R/run" "$bin" \
    >"$R/run.txt" 2>&1
echo "rc $?" >>"$R/run.txt"
grep -h "^E2E" "$R/run/e2e.log" >"$R/e2e.txt" 2>/dev/null
lap tests
tar -C "$OUT" -czf "$OUT/all.tgz" r
