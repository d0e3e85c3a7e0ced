#!/usr/bin/env bash
# Session 20 call 5 (ae0fd97): P and the prefill output rounded by one cvt per pair, one division a row.
# The attention GPU test (every prefill shape, both orders, bf16/f16/f32), prefill_benchmarks, then golden
# and e2e, within the session's last device minutes.
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
timeout 130 $bin/cuda_kernels --exact attention_matches_cpu --nocapture --test-threads 1 > $R/kernels-attention.txt 2>&1; echo "rc $?" >> $R/kernels-attention.txt; lap attention
timeout 30 $bin/cuda_bench --ignored --exact prefill_benchmarks --nocapture > $R/prefill-bench.txt 2>&1; echo "rc $?" >> $R/prefill-bench.txt; lap prefill-bench
RUN_SKIP="nvrtc kernels sampling bench chunked adapters graphs" timeout 50 scripts/gpu/run.sh $R/run $bin > $R/run.txt 2>&1; echo "rc $?" >> $R/run.txt; lap run
tar -C $OUT -czf $OUT/all.tgz r
