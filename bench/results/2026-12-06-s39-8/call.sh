#!/usr/bin/env bash
# Session 39 call 8 (binaries of the commit that again requires every part of a projection for the shrink in
# the GEMM): cuda_golden and the e2e test (an H200: no H100 could be started; the device budget was nearly spent).
bin=.gpu-bin-serve; . scripts/gpu/call_prelude.sh
timeout 100 "$bin/cuda_golden" --test-threads=1 >"$R/golden.txt" 2>&1
echo "rc $?" >>"$R/golden.txt"
RUN_SKIP="nvrtc kernels adapters sampling bench chunked graphs golden" timeout 90 scripts/gpu/run.sh "$R/run" "$bin" \
    >"$R/run.txt" 2>&1
echo "rc $?" >>"$R/run.txt"
grep -h "^E2E" "$R/run/e2e.log" >"$R/e2e.txt" 2>/dev/null
lap tests
tar -C "$OUT" -czf "$OUT/all.tgz" r
