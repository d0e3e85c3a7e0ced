#!/usr/bin/env bash
# Session 17 call 7: the final code (dc9e0fe: split target 3 the default) checked: the attention tests,
# then golden (against transformers + peft references), graphs and e2e (launcher + router + shard).
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
timeout 150 $bin/cuda_kernels attention --nocapture --test-threads 1 > $R/kernels-attention.txt 2>&1; echo "rc $?" >> $R/kernels-attention.txt; lap kernels
RUN_SKIP="nvrtc kernels sampling bench chunked adapters" timeout 200 scripts/gpu/run.sh $R/run $bin > $R/run-stdout.txt 2>&1; echo "rc $?" >> $R/run-stdout.txt; lap run
tar -C $OUT -czf $OUT/all.tgz r
