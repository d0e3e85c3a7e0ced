#!/usr/bin/env bash
# Session 28 call 2 (an H100; binaries of 707438a: split_plan unsplit at one chunk, partials by paged rows;
# the fused o expand, off by default): `bash scripts/gpu/next_call.sh round` (next_call.sh of e20fd8e). graphs: 4 passed, 1 failed (the one-stream test captured twice,
# at the unsplit-to-split change at 64 tokens: mended in the next commit); e2e passed (also with
# LORAX_CUDA_LORA_FUSE=1); lora_step_matches_cpu with LORAX_CUDA_LORA_FUSE=1 passed, the fused norm bit for
# bit in bf16/f16/f32; 32-layer eager steps with the fusion off and on (steps32.txt); then bench.sh with the
# defaults (the first serving run of the start-up decode warm-up).
bash scripts/gpu/next_call.sh round
