#!/usr/bin/env bash
# Session 44, call 3 (an H100; call 2 found no machine): the Hopper prompt GEMM in clusters of two blocks with w's
# boxes multicast and the residual-add epilogue, binaries of afbfb2b (scripts/gpu/build.sh .gpu-bin-serve, repacked
# with xz), next_call.sh of afbfb2b. Files: kernels.txt, gemm.txt, golden-all.txt, steps32.txt, laps.txt, and
# ncu/ (kernel times and detail of 2-layer p1000 steps, every product on ours: *-all, on cuBLAS: *-0).
GEMM_NCU=1 bash scripts/gpu/next_call.sh gemm
