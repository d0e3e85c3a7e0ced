#!/usr/bin/env bash
# Session 35 call 6 (binaries of 3bbab52: the prompt LoRA pair as in call 4, the default): bench.sh alone.
bin=.gpu-bin-serve; . scripts/gpu/call_prelude.sh
BENCH_TIMEOUT=330 BENCH_PEFT_BUDGET=120 timeout 340 scripts/gpu/bench.sh "$R/bench" "$bin" >"$R/bench.txt" 2>&1
echo "rc $?" >>"$R/bench.txt"
lap bench
tar -C "$OUT" -czf "$OUT/all.tgz" r
