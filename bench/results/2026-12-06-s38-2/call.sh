#!/usr/bin/env bash
# Session 38 call 2 (binaries of e5f205c: the last residual add and the final norm in one kernel over the logit
# rows; the LM head of a prompt scored whole 512 rows at a time): cuda_golden (logits and tokens against the
# transformers + peft references), the e2e test through the server, then bench.sh.
bin=.gpu-bin-serve; . scripts/gpu/call_prelude.sh
timeout 100 "$bin/cuda_golden" --test-threads=1 >"$R/golden.txt" 2>&1
echo "rc $?" >>"$R/golden.txt"
lap golden
RUN_SKIP="nvrtc kernels adapters sampling bench chunked graphs golden" timeout 60 scripts/gpu/run.sh "$R/run" "$bin" \
    >"$R/run.txt" 2>&1
echo "rc $?" >>"$R/run.txt"
grep -h "^E2E" "$R/run/e2e.log" >"$R/e2e.txt" 2>/dev/null
lap e2e
BENCH_TIMEOUT=390 BENCH_PEFT_BUDGET=110 timeout 400 scripts/gpu/bench.sh "$R/bench" "$bin" >"$R/bench.txt" 2>&1
echo "rc $?" >>"$R/bench.txt"
lap bench
tar -C "$OUT" -czf "$OUT/all.tgz" r
