#!/usr/bin/env bash
# Session 20 call 3 (6cc0049, the final code: prefill blocks every head's longest tile first, shift-and-mask
# block lookups, w8n64 below 8192 keys and w4r2n32 from 8192): the whole benchmark first, then golden, graphs
# and e2e, then the attention GPU tests (every prefill tile shape and both orders against the CPU) with the
# time left.
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
BENCH_TIMEOUT=270 BENCH_PEFT_BUDGET=120 timeout 280 scripts/gpu/bench.sh $R/bench $bin > $R/bench.txt 2>&1; echo "rc $?" >> $R/bench.txt; lap bench
RUN_SKIP="nvrtc kernels sampling bench chunked adapters" timeout 60 scripts/gpu/run.sh $R/run $bin > $R/run.txt 2>&1; echo "rc $?" >> $R/run.txt; lap run
left=$((560 - $(date +%s) + t0))
timeout $left $bin/cuda_kernels --exact attention_matches_cpu attention_refuses_bad_tables --nocapture --test-threads 1 > $R/kernels-attention.txt 2>&1; echo "rc $? (limit ${left}s)" >> $R/kernels-attention.txt; lap attention
tar -C $OUT -czf $OUT/all.tgz r
