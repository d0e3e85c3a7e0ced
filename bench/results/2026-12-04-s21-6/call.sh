#!/usr/bin/env bash
# Session 21 call 6 (1706be9): the device command, run from the repository root (no binaries needed).
mkdir -p $OUT/r && timeout 120 python3 scripts/gpu/gemm_rate.py 3 2>&1 | tee $OUT/r/gemm-rate.txt
