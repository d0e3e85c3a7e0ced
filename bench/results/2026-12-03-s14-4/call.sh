#!/usr/bin/env bash
# Session 14 call 4: the whole benchmark (serving + transformers + peft) at the final code (955ab21).
bin=.gpu-bin-serve
. scripts/gpu/env.sh
R=$OUT/r; mkdir -p $R
(while sleep 15; do tar -C $OUT -czf $OUT/all.tgz r 2>/dev/null; done) &
t0=$(date +%s); lap() { echo "LAP $1 $(( $(date +%s) - t0 ))s" | tee -a $R/laps.txt; }
BENCH_TIMEOUT=420 BENCH_PEFT_BUDGET=135 timeout 430 scripts/gpu/bench.sh $R/bench $bin > $R/bench-stdout.txt 2>&1; echo "rc $?" >> $R/bench-stdout.txt; lap bench
tar -C $OUT -czf $OUT/all.tgz r
