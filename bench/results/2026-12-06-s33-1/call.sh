#!/usr/bin/env bash
# Session 33 call 1 (an H100, after seven failed start attempts and one refused call over 75 minutes; binaries of e1b292a, whose engine
# is that of 35d5179: bgmv_expand_vx opt-in): `bash scripts/gpu/next_call.sh vx` (next_call.sh of 0f38ae6).
# cuda_kernels lora with LORAX_CUDA_LORA_EXPAND=vx (2 passed: lora_step_matches_cpu runs each plan with vx and
# ix); 32-layer steps through graphs of b128-identical, b128-distinct, b128-identical-all, b128-a32-all with
# vx and ix, and vx at 4-row records (LORAX_CUDA_LORA_EXPAND_ROWS=4) for the one-adapter pair; ncu kernel times
# (2 layers) with each (kernel-profile-vx.txt, kernel-profile-ix.txt); run.sh golden (8 passed), graphs (5
# passed), e2e (passed) with vx; a second round of steps in the other order. 238 s.
bash scripts/gpu/next_call.sh vx
