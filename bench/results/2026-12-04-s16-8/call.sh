#!/usr/bin/env bash
# Session 16 call 8 (40ff05f, second review: launch signatures through SigArg::sign_into): graph decode
# steps equal eager ones with the skinny GEMM off (the default path) and on.
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
timeout 150 $bin/cuda_graphs --nocapture --test-threads 1 > $R/graphs.txt 2>&1; echo "rc $?" >> $R/graphs.txt; lap graphs
LORAX_CUDA_SKINNY=1 timeout 120 $bin/cuda_graphs --nocapture --test-threads 1 > $R/graphs-skinny.txt 2>&1; echo "rc $?" >> $R/graphs-skinny.txt; lap graphs-skinny
tar -C $OUT -czf $OUT/all.tgz r
