#!/usr/bin/env bash
# Session 29 call 5 (an H100 with an Intel Xeon host, a 281 ms Python loop; binaries of 3ebdec9, the engine and
# router as before the session): bench.sh alone, for a second H100 sample of call 2's figures. (Call 4, on the
# same warm machine, ran `next_call.sh timeline` of e4c5606: "SKIPPED: no nsys on this machine".)
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
BENCH_TIMEOUT=390 BENCH_PEFT_BUDGET=135 timeout 400 scripts/gpu/bench.sh "$R/bench" "$bin" >"$R/bench.txt" 2>&1
echo "rc $?" >>"$R/bench.txt"
lap bench
tar -C "$OUT" -czf "$OUT/all.tgz" r
