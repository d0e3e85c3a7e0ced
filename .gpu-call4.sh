#!/usr/bin/env bash
# Session 18 call 4: the decode LoRA shrink beside its projection's GEMM (LORAX_CUDA_LORA_OVERLAP 0 after,
# 1 before, 2 beside on a second stream): lora_step_matches_cpu (all three modes), 32-layer eager steps
# with adapters in each mode, then golden, graphs (graph steps with adapters equal eager ones), adapters
# and e2e.
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
timeout 200 $bin/cuda_kernels lora_step --nocapture --test-threads 1 > $R/kernels-lora.txt 2>&1; echo "rc $?" >> $R/kernels-lora.txt; lap kernels
for x in b128-a8 b128-identical b128-distinct b32-a8 b8-a8; do
  for m in 0 2 1 0 2; do profile_step $x overlap$m LORAX_CUDA_LORA_OVERLAP=$m; done
  lap $x
done
RUN_SKIP="nvrtc kernels sampling bench chunked" timeout 260 scripts/gpu/run.sh $R/run $bin > $R/run.txt 2>&1; echo "rc $?" >> $R/run.txt; lap run
tar -C $OUT -czf $OUT/all.tgz r
