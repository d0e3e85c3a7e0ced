#!/usr/bin/env bash
# Session 31 call 1 (an H100; binaries of 45c1c4c: the tc shrink and the CUDA-core expand as session 30 left
# them, the prompt rotation in prefill present but off): `bash scripts/gpu/next_call.sh tc` (next_call.sh of
# 45c1c4c). cuda_kernels lora with the tc shrink and with LORAX_CUDA_LORA_SHRINK=simt (2 passed each); run.sh
# golden (8 passed; rslora-r16-patterns BF16 8.609e-2 against its 1e-1 bound), graphs (5 passed), e2e
# (passed); ncu kernel times of b128-identical and b128-distinct (2 layers) with each shrink; 32-layer steps
# through graphs with each shrink, two rounds; bench.sh (complete, 190 s).
bash scripts/gpu/next_call.sh tc
