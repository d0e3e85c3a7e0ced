#!/usr/bin/env bash
# Session 44, call 4 (an H100): the Hopper prompt GEMM with the remote arrival at CTA scope, in clusters of two
# (gemm-c2.txt) and of one (gemm-c1.txt, -DGM_CLUSTER=1) at 1000 and 4160 rows; its test (kernels.txt). Binaries of
# d2d9b0d (scripts/gpu/build.sh .gpu-bin-serve, repacked with xz), next_call.sh of d2d9b0d.
bash scripts/gpu/next_call.sh gemm-ab
