#!/usr/bin/env bash
# Session 15 call 4 (final code: skinny GEMM off by default, its test trimmed): the whole GPU test round
# (kernels with the skinny test, golden, graphs, adapters, chunked).
bin=.gpu-bin-serve
. scripts/gpu/env.sh
R=$OUT/r; mkdir -p $R
(while sleep 15; do tar -C $OUT -czf $OUT/all.tgz r 2>/dev/null; done) &
t0=$(date +%s); lap() { echo "LAP $1 $(( $(date +%s) - t0 ))s" | tee -a $R/laps.txt; }
RUN_SKIP="nvrtc sampling bench e2e" timeout 420 scripts/gpu/run.sh $R/run $bin > $R/run-stdout.txt 2>&1; echo "rc $?" >> $R/run-stdout.txt; lap run
grep -E "skinny|test result" $R/run/kernels.log > $R/skinny-lines.txt
tar -C $OUT -czf $OUT/all.tgz r
