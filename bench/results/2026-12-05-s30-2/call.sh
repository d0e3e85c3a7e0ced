#!/usr/bin/env bash
# Session 30 call 2 (an H100; binaries of 9588979: the LoRA shrink on the tensor cores, bgmv_shrink_tc*, by
# default): `bash scripts/gpu/next_call.sh tc` (next_call.sh of 9588979). cuda_kernels lora with the tc shrink
# (2 passed; 83 s with NVRTC's first compile) and with LORAX_CUDA_LORA_SHRINK=simt (2 passed); run.sh graphs
# (5 passed) and e2e (passed); ncu kernel times of b128-identical and b128-distinct (2 layers); 32-layer steps
# with each shrink, two rounds; bench.sh.
bash scripts/gpu/next_call.sh tc
