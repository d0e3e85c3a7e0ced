#!/usr/bin/env bash
# Session 17 call 3 (experiment commit): decode attention with a row's KV-head blocks numbered side by side
# (LORAX_CUDA_DEFINES=-DATTN_HEADS_TOGETHER) against the default numbering: the attention alone at serving
# shapes (cuda_bench decode_attention_benchmarks), 32-layer eager steps, and the attention test under it.
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
step() { # scenario label
  echo "== $1 $2" >> $R/steps32.txt
  LORAX_PROFILE_LAYERS=32 LORAX_PROFILE_STEPS=6 LORAX_PROFILE_SCENARIO=$1 timeout 150 $bin/cuda_graphs --ignored --exact decode_step_kernels_for_a_profiler --nocapture 2>&1 | grep -E "STEP|PROFILED|panick|rror" >> $R/steps32.txt
}
round() { # label
  timeout 200 $bin/cuda_bench --ignored --exact decode_attention_benchmarks --nocapture > $R/attn-$1.txt 2>&1; echo "rc $?" >> $R/attn-$1.txt; lap attn-$1
  for x in b128 b8 b128-a8; do step $x $1; done; lap steps-$1
}
round default
export LORAX_CUDA_DEFINES=-DATTN_HEADS_TOGETHER
round together
timeout 200 $bin/cuda_kernels attention --nocapture --test-threads 1 > $R/kernels-attention-together.txt 2>&1; echo "rc $?" >> $R/kernels-attention-together.txt; lap test-together
unset LORAX_CUDA_DEFINES
round default2
tar -C $OUT -czf $OUT/all.tgz r
