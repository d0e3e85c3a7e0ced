#!/usr/bin/env bash
# Session 30 call 3 (an H100; binaries of 9065c08: the shrink and the expand on the tensor cores, both by
# default; the shrink's lanes on 16 consecutive elements of 64-element stretches): `bash scripts/gpu/next_call.sh
# tc` (next_call.sh of 1051043). cuda_kernels lora with both tc kernels (2 passed) and with
# LORAX_CUDA_LORA_SHRINK=simt LORAX_CUDA_LORA_EXPAND=simt (2 passed); run.sh golden (7 passed, 1 failed:
# rslora-r16-patterns BF16 at 12.2% against its 10% bound, golden.log), graphs (5 passed), e2e (passed); ncu
# kernel times of b128-identical and b128-distinct; 32-layer steps with both on the tensor cores and with
# neither, two rounds; bench.sh. The expand on the tensor cores was removed afterwards (8b285f8).
bash scripts/gpu/next_call.sh tc
