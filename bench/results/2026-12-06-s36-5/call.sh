#!/usr/bin/env bash
# Session 36 call 5 (binaries of eec6491, the review mends, as call 4): bench.sh alone again, with streamed adapter loads (a cold
# adapter asked while no stream decodes is placed after its header and its weights read beside the prompt).
bin=.gpu-bin-serve; . scripts/gpu/call_prelude.sh
BENCH_TIMEOUT=390 BENCH_PEFT_BUDGET=110 timeout 400 scripts/gpu/bench.sh "$R/bench" "$bin" >"$R/bench.txt" 2>&1
echo "rc $?" >>"$R/bench.txt"
lap bench
tar -C "$OUT" -czf "$OUT/all.tgz" r
