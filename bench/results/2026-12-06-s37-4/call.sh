#!/usr/bin/env bash
# Session 37 call 4 (binaries of e778ee7; the router's later change, the echoed prompt's texts, is in no step the
# benchmark times): bench.sh again, on whichever host comes, to tell the ITL-during-cold-loads miss of call 2
# (a slow host, 55 and 40 ms disk reads) from the code.
bin=.gpu-bin-serve; . scripts/gpu/call_prelude.sh
BENCH_TIMEOUT=390 BENCH_PEFT_BUDGET=110 timeout 420 scripts/gpu/bench.sh "$R/bench" "$bin" >"$R/bench.txt" 2>&1
echo "rc $?" >>"$R/bench.txt"
lap bench
tar -C "$OUT" -czf "$OUT/all.tgz" r
