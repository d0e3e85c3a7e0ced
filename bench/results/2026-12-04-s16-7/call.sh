#!/usr/bin/env bash
# Session 16 call 7 (1ba6639, review mends): graph decode steps with the skinny GEMM on (graphs, PDL and
# steps recorded ahead must equal eager steps bit for bit: tensor maps encoded in record passes and
# captured), and the skinny test again after the TmaMap alignment change.
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
LORAX_CUDA_SKINNY=1 timeout 200 $bin/cuda_graphs --nocapture --test-threads 1 > $R/graphs-skinny.txt 2>&1; echo "rc $?" >> $R/graphs-skinny.txt; lap graphs-skinny
timeout 150 $bin/cuda_kernels skinny_gemm --nocapture --test-threads 1 > $R/skinny-test.txt 2>&1; echo "rc $?" >> $R/skinny-test.txt; lap skinny-test
tar -C $OUT -czf $OUT/all.tgz r
