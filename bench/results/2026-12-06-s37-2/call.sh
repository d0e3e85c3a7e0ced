#!/usr/bin/env bash
# Session 37 call 2 (binaries of 428939e, on the machine call 1 warmed): bench.sh, the whole benchmark,
# on this session's code (its changes touch no step of the benchmark: prompt-token alternatives are computed
# only when asked, and the router's changes are in the OpenAI routes and the stream's held bytes).
bin=.gpu-bin-serve; . scripts/gpu/call_prelude.sh
BENCH_TIMEOUT=390 BENCH_PEFT_BUDGET=110 timeout 420 scripts/gpu/bench.sh "$R/bench" "$bin" >"$R/bench.txt" 2>&1
echo "rc $?" >>"$R/bench.txt"
lap bench
tar -C "$OUT" -czf "$OUT/all.tgz" r
