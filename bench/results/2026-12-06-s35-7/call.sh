#!/usr/bin/env bash
# Session 35 call 7 (binaries of 3bbab52, as call 6): bench.sh alone with a longer deadline (call 6's slow
# host skipped the distinct regime at 330 s).
bin=.gpu-bin-serve; . scripts/gpu/call_prelude.sh
BENCH_TIMEOUT=390 BENCH_PEFT_BUDGET=110 timeout 400 scripts/gpu/bench.sh "$R/bench" "$bin" >"$R/bench.txt" 2>&1
echo "rc $?" >>"$R/bench.txt"
lap bench
tar -C "$OUT" -czf "$OUT/all.tgz" r
