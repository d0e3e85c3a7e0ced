#!/usr/bin/env bash
# Session 19 call 4 (binaries of call 3): what a mixed step's prompt LoRA costs. 32-layer eager mixed steps of
# 64 decode rows and 8 new 512-token prompts (m64x8): base, 8 adapters round-robin (eight 512-row prompt
# segments of equal length), 3 adapters (unequal segments), one adapter, and 8 adapters with the prompt
# segments on SGMV instead of cuBLAS (LORAX_CUDA_LORA_GEMM=0); twice each. STEP lines give wall and host time.
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
for round in 1 2; do
  profile_step m64x8 base
  profile_step m64x8-a8 cublas
  profile_step m64x8-a3 cublas
  profile_step m64x8-identical cublas
  profile_step m64x8-a8 sgmv LORAX_CUDA_LORA_GEMM=0
  lap round$round
done
tar -C $OUT -czf $OUT/all.tgz r
