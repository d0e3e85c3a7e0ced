#!/usr/bin/env bash
# Session 18 call 2: the _tcr kernels with warp-local rotation (no block barrier before the walk): the
# attention kernel tests, 32-layer eager steps at 1/8/32/64/128 rows and 128 rows with 8 adapters, fused
# and separate (LORAX_CUDA_ATTN_ROPE=0), then golden, graphs and e2e.
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
timeout 240 $bin/cuda_kernels attention --nocapture --test-threads 1 > $R/kernels-attention.txt 2>&1; echo "rc $?" >> $R/kernels-attention.txt; lap kernels
for x in b1 b8 b32 b64 b128 b128-a8; do
  profile_step $x fused
  profile_step $x separate LORAX_CUDA_ATTN_ROPE=0
  profile_step $x fused
  profile_step $x separate LORAX_CUDA_ATTN_ROPE=0
  lap $x
done
RUN_SKIP="nvrtc kernels sampling bench chunked adapters" timeout 200 scripts/gpu/run.sh $R/run $bin > $R/run.txt 2>&1; echo "rc $?" >> $R/run.txt; lap run
tar -C $OUT -czf $OUT/all.tgz r
