#!/usr/bin/env bash
# Session 17 call 1 (L2 prefetch of the next product's weights, off by default): 32-layer eager steps with
# LORAX_CUDA_PREFETCH_MB 0/8/16/32, segments 1/2, o skipped; then cuda_graphs with prefetch on.
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
step() { # scenario label env...
  local x=$1 l=$2; shift 2
  echo "== $x $l" >> $R/steps32.txt
  env "$@" LORAX_PROFILE_LAYERS=32 LORAX_PROFILE_STEPS=6 LORAX_PROFILE_SCENARIO=$x timeout 150 $bin/cuda_graphs --ignored --exact decode_step_kernels_for_a_profiler --nocapture 2>&1 | grep -E "STEP|PROFILED|panick|rror" >> $R/steps32.txt
}
step b8 warm LORAX_CUDA_PREFETCH_MB=0; lap warm
for x in b128 b8 b1 b128-a8 b32; do
  step $x mb0 LORAX_CUDA_PREFETCH_MB=0
  for mb in 8 16 32; do step $x mb$mb LORAX_CUDA_PREFETCH_MB=$mb; done
  step $x mb16-segs2 LORAX_CUDA_PREFETCH_MB=16 LORAX_CUDA_PREFETCH_SEGS=2
  step $x mb16-skip-o LORAX_CUDA_PREFETCH_MB=16 LORAX_CUDA_PREFETCH_SKIP=o
  step $x mb0-again LORAX_CUDA_PREFETCH_MB=0
  lap $x
done
LORAX_CUDA_PREFETCH_MB=16 timeout 150 $bin/cuda_graphs > $R/graphs-prefetch16.txt 2>&1; echo "rc $?" >> $R/graphs-prefetch16.txt; lap graphs
tar -C $OUT -czf $OUT/all.tgz r
