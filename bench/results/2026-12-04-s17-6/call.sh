#!/usr/bin/env bash
# Session 17 call 6: the whole benchmark (serving + transformers + peft) at de6a819 (decode attention's split
# target 3; everything else as in session 16 call 5).
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
BENCH_TIMEOUT=420 BENCH_PEFT_BUDGET=135 timeout 430 scripts/gpu/bench.sh $R/bench $bin > $R/bench-stdout.txt 2>&1; echo "rc $?" >> $R/bench-stdout.txt; lap bench
tar -C $OUT -czf $OUT/all.tgz r
