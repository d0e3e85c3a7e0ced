#!/usr/bin/env bash
# Session 29 call 2 (the same H100 as call 1, warm: nvidia-smi.txt; binaries of b555703 with the overlap turned off by the environment,
# so the code measured is the code before the session; bench.py of 166153a with the gaps' breadth): bench.sh
# alone (no disk_read.py).
export LORAX_CUDA_LORA_OVERLAP=0
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
BENCH_TIMEOUT=390 BENCH_PEFT_BUDGET=135 timeout 400 scripts/gpu/bench.sh "$R/bench" "$bin" >"$R/bench.txt" 2>&1
echo "rc $?" >>"$R/bench.txt"
lap bench
tar -C "$OUT" -czf "$OUT/all.tgz" r
