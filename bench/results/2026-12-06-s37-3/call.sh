#!/usr/bin/env bash
# Session 37 call 3 (binaries of e778ee7): sampling in launches of at most 512 rows. cuda_sampling (now with a
# 600-row case: two launches) against the host sampler; the e2e test through the server, whose prompt scoring
# now also scores a 700-token prompt whole (two sampling launches in the engine's step) and checks its first
# positions against the short prompt's scores.
bin=.gpu-bin-serve; . scripts/gpu/call_prelude.sh
timeout 150 "$bin/cuda_sampling" --test-threads=1 --nocapture >"$R/sampling.txt" 2>&1
echo "rc $?" >>"$R/sampling.txt"
lap sampling
RUN_SKIP="nvrtc kernels adapters sampling bench chunked graphs golden" timeout 200 scripts/gpu/run.sh "$R/run" "$bin" \
    >"$R/run.txt" 2>&1
echo "rc $?" >>"$R/run.txt"
grep -h "^E2E" "$R/run/e2e.log" >"$R/e2e.txt" 2>/dev/null
lap e2e
tar -C "$OUT" -czf "$OUT/all.tgz" r
