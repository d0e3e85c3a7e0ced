#!/usr/bin/env bash
# Session 45, call 4 (an H100): the new tests (kernels.txt: the silu epilogues against silu_mul bit for bit, which
# failed on 5 outputs of 40800, all one gate of -0 the product sums to +0, a flaw of the test mended after; the
# default's sizes passed; silu_mul against the CPU passed), then the GEMM's times at 864-4160 rows (gemm-sweep.txt,
# one round, sizes back to back). Binaries of 2a88a38 (scripts/gpu/build.sh .gpu-bin-serve, repacked with xz),
# next_call.sh of 3f80589.
GEMM_ROWS="864 968 1000 1152 1440 2016 2048 2160 3024 4160" bash scripts/gpu/next_call.sh gemm-sweep
