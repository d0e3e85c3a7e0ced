#!/usr/bin/env bash
# Session 34 call 5 (an H100, a fresh machine; binaries of 75d0197: the engine's kernels as at 76bcb8e (session
# 33), the adapter parse with its range flags (range_flags) and the shard's check of the served type): bench.sh
# alone. 277 s. Host: Intel Xeon, 16 cores, a 271 ms Python loop (session 33's hosts: 154).
# Targets: base 89 / 80%; identical / uniform / Zipf / distinct 76 / 78 / 77 / 78% (all met); Zipf / distinct
# vs base 88 / 86%; peft 16.1x (7298 vs 453 tok/s); TTFT 1.41x (1.33x at the power-capped rate); cold load
# 20.7 ms (read+parse p50 17.0 ms); ITL during cold loads +0.46 steps.
bin=.gpu-bin-serve; . scripts/gpu/call_prelude.sh
BENCH_TIMEOUT=330 BENCH_PEFT_BUDGET=120 timeout 340 scripts/gpu/bench.sh "$R/bench" "$bin" >"$R/bench.txt" 2>&1
