#!/usr/bin/env bash
# Session 18 call 7 (6f6b3d7, the review mends): the rope_attention test with its new refusals.
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
timeout 120 $bin/cuda_kernels rope_attention --nocapture --test-threads 1 > $R/kernels-rope.txt 2>&1; echo "rc $?" >> $R/kernels-rope.txt; lap kernels
tar -C $OUT -czf $OUT/all.tgz r
