#!/usr/bin/env bash
# Session 31 call 6 (an H100, a fresh machine after three failed starts; binaries of 45c1c4c):
# `bash scripts/gpu/next_call.sh expand-tiles` (next_call.sh of 7bc04d3). ncu kernel times (2 layers) of
# b128-identical-all and b128-a32-all with LORAX_CUDA_LORA_EXPAND_TILES=auto, 1 and 2; 32-layer steps through
# graphs of those and b128-distinct with each, one round.
bash scripts/gpu/next_call.sh expand-tiles
