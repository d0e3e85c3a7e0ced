#!/usr/bin/env bash
# Session 34 call 2 (an H100; binaries of 1d18656: rope_kv_write_lora, first form (one block of the row
# kernels' size per row), on by default; LORAX_CUDA_LORA_ROPE=0 the separate bgmv_expand_ix):
# `bash scripts/gpu/next_call.sh lora-rope` (next_call.sh of 1d18656).
# cuda_kernels lora rope: 4 passed (lora_step_matches_cpu checks rope_kv_write_lora against lora_layer then
# rope_kv_write value for value in bf16, f16 and f32, 6 plans x layers each); 32-layer steps through graphs
# on and off, two rounds (steps32.txt); run.sh with LORAX_CUDA_ATTN_ROPE=0 (every decode step on the separate
# rotary kernel, so on the fused expand): golden 8 passed, graphs 5 passed, e2e passed. 242 s.
# Medians of steps 1-5 (ms), on / off: b128-identical 10.48 / 10.10 and 10.53 / 10.27; b128-distinct
# 11.67 / 11.23 and 11.49 / 11.34; b64-a8 8.49 / 8.08 and 8.63 / 8.22; b32-a8 (rotary inside attention:
# the control) 7.18 / 7.09 and 7.18 / 7.16. Slower.
bash scripts/gpu/next_call.sh lora-rope
