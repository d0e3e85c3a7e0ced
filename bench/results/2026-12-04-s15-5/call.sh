#!/usr/bin/env bash
# Session 15 call 5 (review mends, 10d50d3: the skinny GEMM built only when turned on; the kernel's final
# wait removed): cuda_kernels (the skinny test turns it on through set_skinny_gemm) and graphs.
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
timeout 200 $bin/cuda_kernels --nocapture --test-threads 1 > $R/kernels.txt 2>&1; echo "rc $?" >> $R/kernels.txt; lap kernels
timeout 100 $bin/cuda_graphs > $R/graphs.txt 2>&1; echo "rc $?" >> $R/graphs.txt; lap graphs
grep -E "skinny|test result|SKIPPED|panicked" $R/kernels.txt > $R/kernels-summary.txt
tar -C $OUT -czf $OUT/all.tgz r
