#!/usr/bin/env bash
# Session 20 call 4 (6cc0049, binaries of call 3): the whole benchmark again, with time for the popularity
# regimes that call 3's slow server start (30 s) left out.
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
BENCH_TIMEOUT=375 BENCH_PEFT_BUDGET=125 timeout 385 scripts/gpu/bench.sh $R/bench $bin > $R/bench.txt 2>&1; echo "rc $?" >> $R/bench.txt; lap bench
tar -C $OUT -czf $OUT/all.tgz r
