#!/usr/bin/env bash
# Session 17 call 4: decode attention's split target and last-block merge at small batches: the attention
# alone (cuda_bench decode_attention_benchmarks) and 32-layer eager steps at 1, 8 and 32 rows.
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
step() { # scenario label env...
  local x=$1 l=$2; shift 2
  echo "== $x $l" >> $R/steps32.txt
  env "$@" LORAX_PROFILE_LAYERS=32 LORAX_PROFILE_STEPS=6 LORAX_PROFILE_SCENARIO=$x timeout 150 $bin/cuda_graphs --ignored --exact decode_step_kernels_for_a_profiler --nocapture 2>&1 | grep -E "STEP|PROFILED|panick|rror" >> $R/steps32.txt
}
timeout 240 $bin/cuda_bench --ignored --exact decode_attention_benchmarks --nocapture > $R/attn.txt 2>&1; echo "rc $?" >> $R/attn.txt; lap attn
for x in b8 b1 b32; do
  for t in 8 4 2; do for m in 0 1; do step $x t$t-m$m LORAX_CUDA_ATTN_SPLIT_TARGET=$t LORAX_CUDA_ATTN_MERGE=$m; done; done
  step $x t8-m0-again LORAX_CUDA_ATTN_SPLIT_TARGET=8 LORAX_CUDA_ATTN_MERGE=0
  lap $x
done
tar -C $OUT -czf $OUT/all.tgz r
