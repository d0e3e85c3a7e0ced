#!/usr/bin/env bash
# Session 19 call 1: decode attention's first loads before the rotation prologue (ATTN_TC_PRELOAD, on by
# default): the attention kernel tests; 32-layer eager steps at 8/32/64/86/128 rows and 128 with 8 adapters,
# fused everywhere (LORAX_CUDA_ATTN_ROPE=256), separate (=0) and fused with the old order (-DATTN_TC_PRELOAD=0),
# twice each; decode_attention_benchmarks with and without the preload; golden, graphs, e2e.
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
timeout 150 $bin/cuda_kernels rope_attention --nocapture --test-threads 1 > $R/kernels-rope.txt 2>&1; echo "rc $?" >> $R/kernels-rope.txt; lap rope
timeout 240 $bin/cuda_kernels attention --nocapture --test-threads 1 > $R/kernels-attention.txt 2>&1; echo "rc $?" >> $R/kernels-attention.txt; lap kernels
for x in b8 b32 b64 b86 b128 b128-a8; do
  for round in 1 2; do
    profile_step $x fused LORAX_CUDA_ATTN_ROPE=256
    profile_step $x separate LORAX_CUDA_ATTN_ROPE=0
    profile_step $x fused-old-order LORAX_CUDA_ATTN_ROPE=256 LORAX_CUDA_DEFINES=-DATTN_TC_PRELOAD=0
  done
  lap $x
done
timeout 150 $bin/cuda_bench --ignored --exact decode_attention_benchmarks --nocapture > $R/attn-bench.txt 2>&1; echo "rc $?" >> $R/attn-bench.txt; lap attn-bench
LORAX_CUDA_DEFINES=-DATTN_TC_PRELOAD=0 timeout 150 $bin/cuda_bench --ignored --exact decode_attention_benchmarks --nocapture > $R/attn-bench-old.txt 2>&1; echo "rc $?" >> $R/attn-bench-old.txt; lap attn-bench-old
RUN_SKIP="nvrtc kernels sampling bench chunked adapters" timeout 200 scripts/gpu/run.sh $R/run $bin > $R/run.txt 2>&1; echo "rc $?" >> $R/run.txt; lap run
tar -C $OUT -czf $OUT/all.tgz r
