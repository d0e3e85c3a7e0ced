#!/usr/bin/env bash
# Session 31 call 5 (the same H100, warm; binaries of 45c1c4c): `next_call.sh round` with the prompt rotation
# off (the default), right after call 4 with it on: run.sh graphs (5 passed) and e2e (passed), then bench.sh
# (complete). A sixth call (rope-ncu, of 38837cf) found no machine.
bash scripts/gpu/next_call.sh round
