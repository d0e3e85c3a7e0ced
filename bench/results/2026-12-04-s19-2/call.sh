#!/usr/bin/env bash
# Session 19 call 2: the o-projection LoRA expand folded into the norm (add_rms_norm_lora): the LoRA kernel
# tests; 32-layer eager steps with adapters (8 rows / 32 / 86 / 128 rows with 8 adapters, 128 rows identical
# and distinct), fold on and off (LORAX_CUDA_LORA_NORM=0), twice each; golden, graphs, adapters, e2e.
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
timeout 200 $bin/cuda_kernels lora --nocapture --test-threads 1 > $R/kernels-lora.txt 2>&1; echo "rc $?" >> $R/kernels-lora.txt; lap lora
for x in b128-a8 b86-a8 b32-a8 b8-a8 b128-identical b128-distinct; do
  for round in 1 2; do
    profile_step $x fold
    profile_step $x expand LORAX_CUDA_LORA_NORM=0
  done
  lap $x
done
RUN_SKIP="nvrtc kernels sampling bench chunked" timeout 240 scripts/gpu/run.sh $R/run $bin > $R/run.txt 2>&1; echo "rc $?" >> $R/run.txt; lap run
tar -C $OUT -czf $OUT/all.tgz r
