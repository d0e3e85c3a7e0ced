#!/usr/bin/env bash
# Session 45, call 1 (an H100): the Hopper prompt GEMM's test with silu_f (the fast silu) in silu_mul and both silu
# epilogues (kernels.txt), its times against cuBLAS at 512-4160 rows in clusters of two (gemm-c2.txt) and of one
# (gemm-c1.txt), golden with gemm_sm90_silu_t on every gate/up product (golden-silu-t.txt: bf16/f16 passed, f32
# failed to compile silu_f's std::exp, mended in bb77d59), 32-layer p1000 steps off and with silu_t on
# (steps32.txt). Binaries of ac64fd2 (scripts/gpu/build.sh .gpu-bin-serve, repacked with xz), next_call.sh of ac64fd2.
GEMM_AB_C1=1 GEMM_AB_GOLDEN=1 bash scripts/gpu/next_call.sh gemm-ab
