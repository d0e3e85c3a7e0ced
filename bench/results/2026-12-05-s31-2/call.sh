#!/usr/bin/env bash
# Session 31 call 2 (the same H100, warm; binaries of 45c1c4c): `bash scripts/gpu/next_call.sh rope`
# (next_call.sh of 45c1c4c; the round was removed with the code it measured, both at 38837cf).
# cuda_kernels rope (3 passed; prefill_rope_inside_attention_matches_rope_kv_write printed how many outputs
# differ from rope_kv_write's path), run.sh golden (8 passed), graphs (5 passed) and e2e (passed) with
# LORAX_CUDA_PREFILL_ROPE=1; 32-layer eager steps p1000 and m64x8 with it off and on, two rounds.
bash scripts/gpu/next_call.sh rope
