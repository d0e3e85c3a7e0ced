#!/usr/bin/env bash
# Session 17 call 5: decode attention's split target (blocks per multiprocessor, LORAX_CUDA_ATTN_SPLIT_TARGET)
# at small batches and long contexts (cuda_bench decode_attention_benchmarks), 32-layer eager steps at 8-64
# rows, and the attention and graph tests with target 2.
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
step() { # scenario label env...
  local x=$1 l=$2; shift 2
  echo "== $x $l" >> $R/steps32.txt
  env "$@" LORAX_PROFILE_LAYERS=32 LORAX_PROFILE_STEPS=6 LORAX_PROFILE_SCENARIO=$x timeout 150 $bin/cuda_graphs --ignored --exact decode_step_kernels_for_a_profiler --nocapture 2>&1 | grep -E "STEP|PROFILED|panick|rror" >> $R/steps32.txt
}
timeout 240 $bin/cuda_bench --ignored --exact decode_attention_benchmarks --nocapture > $R/attn.txt 2>&1; echo "rc $?" >> $R/attn.txt; lap attn
for x in b8 b16 b32 b64; do
  for t in 8 2 3 8; do step $x t$t LORAX_CUDA_ATTN_SPLIT_TARGET=$t; done
  lap $x
done
LORAX_CUDA_ATTN_SPLIT_TARGET=2 timeout 200 $bin/cuda_kernels attention --nocapture --test-threads 1 > $R/kernels-attention-t2.txt 2>&1; echo "rc $?" >> $R/kernels-attention-t2.txt; lap kernels
LORAX_CUDA_ATTN_SPLIT_TARGET=2 timeout 150 $bin/cuda_graphs > $R/graphs-t2.txt 2>&1; echo "rc $?" >> $R/graphs-t2.txt; lap graphs
tar -C $OUT -czf $OUT/all.tgz r
