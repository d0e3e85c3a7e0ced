#!/usr/bin/env bash
# Session 16 call 6 (the skinny_fixed_cost benchmark): what a skinny product costs besides streaming its
# weights: equal bytes and stages per block with tiles split over 1, 2 or 4 blocks; one-stage products.
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
timeout 200 $bin/cuda_bench --ignored --exact skinny_fixed_cost --nocapture > $R/fixed-cost.txt 2>&1; echo "rc $?" >> $R/fixed-cost.txt; lap fixed-cost
tar -C $OUT -czf $OUT/all.tgz r
