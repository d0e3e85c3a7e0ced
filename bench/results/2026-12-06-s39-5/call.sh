#!/usr/bin/env bash
# Session 39 call 5 (binaries of the commit of call 4: the q/k/v and o LoRA shrinks inside their GEMMs for
# steps of one adapter): the e2e test through the server, then bench.sh.
bin=.gpu-bin-serve; . scripts/gpu/call_prelude.sh
RUN_SKIP="nvrtc kernels adapters sampling bench chunked graphs golden" timeout 90 scripts/gpu/run.sh "$R/run" "$bin" \
    >"$R/run.txt" 2>&1
echo "rc $?" >>"$R/run.txt"
grep -h "^E2E" "$R/run/e2e.log" >"$R/e2e.txt" 2>/dev/null
lap e2e
BENCH_TIMEOUT=390 BENCH_PEFT_BUDGET=110 timeout 400 scripts/gpu/bench.sh "$R/bench" "$bin" >"$R/bench.txt" 2>&1
echo "rc $?" >>"$R/bench.txt"
lap bench
tar -C "$OUT" -czf "$OUT/all.tgz" r
