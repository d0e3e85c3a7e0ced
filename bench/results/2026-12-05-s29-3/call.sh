#!/usr/bin/env bash
# Session 29 call 3 (an H200; binaries of 3ebdec9, the code of the session's end: the overlap removed, so the
# engine is session 28's): `bash scripts/gpu/next_call.sh round` (next_call.sh of 3ebdec9). graphs 5 passed,
# e2e passed (f32 32/32, bf16 7/16/18/4 as always); then bench.sh (with the host line).
bash scripts/gpu/next_call.sh round
