#!/usr/bin/env bash
# Session 21 call 3 (b414372): the tiles-first prefill order removed (every prefill kernel lost two
# arguments): the attention GPU test (every prefill shape, bf16/f16; the f32 pass if time allows),
# prefill_benchmarks, golden and e2e, then the whole serving benchmark again (a second run of the session's
# code, for the spread).
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
timeout 170 $bin/cuda_kernels --exact attention_matches_cpu --nocapture --test-threads 1 > $R/kernels-attention.txt 2>&1; echo "rc $?" >> $R/kernels-attention.txt; lap attention
timeout 30 $bin/cuda_bench --ignored --exact prefill_benchmarks --nocapture > $R/prefill-bench.txt 2>&1; echo "rc $?" >> $R/prefill-bench.txt; lap prefill-bench
RUN_SKIP="nvrtc kernels sampling bench chunked adapters graphs" timeout 40 scripts/gpu/run.sh $R/run $bin > $R/run.txt 2>&1; echo "rc $?" >> $R/run.txt; lap run
BENCH_TIMEOUT=300 BENCH_PEFT_BUDGET=130 timeout 310 scripts/gpu/bench.sh $R/bench $bin > $R/bench.txt 2>&1; echo "rc $?" >> $R/bench.txt; lap bench
tar -C $OUT -czf $OUT/all.tgz r
