#!/usr/bin/env bash
# Session 21 call 5 (908f0f8, the review's mends): the attention GPU tests with the new window cases
# (first positions 16 and 64: one table read a step with a window), rope_attention's too; golden and e2e;
# then the whole serving benchmark once more (prompts now tokenized on a pool of their own).
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
timeout 200 $bin/cuda_kernels --exact attention_matches_cpu rope_attention_matches_rope_kv_write_then_attention --nocapture --test-threads 2 > $R/kernels-attention.txt 2>&1; echo "rc $?" >> $R/kernels-attention.txt; lap attention
RUN_SKIP="nvrtc kernels sampling bench chunked adapters graphs" timeout 40 scripts/gpu/run.sh $R/run $bin > $R/run.txt 2>&1; echo "rc $?" >> $R/run.txt; lap run
BENCH_TIMEOUT=260 BENCH_PEFT_BUDGET=120 timeout 270 scripts/gpu/bench.sh $R/bench $bin > $R/bench.txt 2>&1; echo "rc $?" >> $R/bench.txt; lap bench
tar -C $OUT -czf $OUT/all.tgz r
