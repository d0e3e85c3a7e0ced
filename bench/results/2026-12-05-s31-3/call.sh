#!/usr/bin/env bash
# Session 31 call 3 (the same H100, warm; binaries of 45c1c4c): `bash scripts/gpu/next_call.sh mlp`
# (next_call.sh of 45c1c4c). ncu kernel times (2 layers) of b128-identical-all and b128-a32-all (adapters of
# every linear layer) with the tc shrink and with LORAX_CUDA_LORA_SHRINK=simt, then 32-layer steps through
# graphs with each shrink, two rounds.
bash scripts/gpu/next_call.sh mlp
