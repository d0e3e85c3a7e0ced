#!/usr/bin/env bash
# Session 29 call 1 (an H100; binaries of b555703: the LoRA shrink beside the base GEMM, on by default):
# `bash scripts/gpu/next_call.sh overlap` (next_call.sh of b555703). cuda_kernels attention and lora: 5 passed
# (attention_matches_cpu with split_plan's grids, 75 s); graphs 5 passed (eager, graph, PDL and overlapped
# steps bit for bit in bf16 and f32); e2e passed (bf16 counts 7, 16, 18, 4 as always; f32 32/32); then
# 32-layer decode steps through graphs at 128 rows with LORAX_CUDA_LORA_OVERLAP=0 and 1, two rounds
# (steps32.txt): the overlap was slower in every adapter case of both rounds.
bash scripts/gpu/next_call.sh overlap
