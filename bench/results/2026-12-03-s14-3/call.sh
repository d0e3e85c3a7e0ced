#!/usr/bin/env bash
# Session 14 call 3: the final binaries (tuning off, split reverted, the warm-up in pieces): golden,
# graphs, and e2e (launcher + router + shard on the GPU against transformers + peft).
bin=.gpu-bin-serve
. scripts/gpu/env.sh
R=$OUT/r; mkdir -p $R
(while sleep 15; do tar -C $OUT -czf $OUT/all.tgz r 2>/dev/null; done) &
t0=$(date +%s); lap() { echo "LAP $1 $(( $(date +%s) - t0 ))s" | tee -a $R/laps.txt; }
RUN_SKIP="nvrtc kernels sampling bench chunked adapters" timeout 400 scripts/gpu/run.sh $R/run $bin > $R/run-stdout.txt 2>&1; echo "rc $?" >> $R/run-stdout.txt; lap run
tar -C $OUT -czf $OUT/all.tgz r
