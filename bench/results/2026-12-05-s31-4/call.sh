#!/usr/bin/env bash
# Session 31 call 4 (the same H100, warm; binaries of 45c1c4c): `next_call.sh round` with the prompt rotation
# inside the prefill kernel on (next_call.sh of 45c1c4c): run.sh graphs (5 passed) and e2e (passed), then
# bench.sh (complete). Call 5 is the same round with it off, right after.
LORAX_CUDA_PREFILL_ROPE=1 bash scripts/gpu/next_call.sh round
