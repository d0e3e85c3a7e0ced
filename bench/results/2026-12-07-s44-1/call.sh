#!/usr/bin/env bash
# Session 44, call 1 (an H100): the first run of the Hopper prompt GEMM (kernels/gemm_sm90.cu, one block a tile,
# no clusters), binaries of 0a8106b (scripts/gpu/build.sh .gpu-bin-serve, repacked with xz), next_call.sh of
# 0a8106b. Files: kernels.txt (its test), gemm.txt (times against cuBLAS), golden-all.txt (golden with every
# product on it), steps32.txt (32-layer eager steps: off / silu / all), laps.txt.
bash scripts/gpu/next_call.sh gemm
