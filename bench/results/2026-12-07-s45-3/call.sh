#!/usr/bin/env bash
# Session 45, call 3 (an H100, another machine than call 2's): bench.sh alone with the defaults, a second run of
# the targets with the silu product on gemm_sm90_silu_t (auto). Binaries of bb77d59 (scripts/gpu/build.sh
# .gpu-bin-serve, repacked with xz), next_call.sh of 87a926f (bench-only), bench.py of bb77d59.
bash scripts/gpu/next_call.sh bench-only
