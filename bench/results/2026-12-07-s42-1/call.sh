#!/usr/bin/env bash
# Session 42 call 1 (binaries of ee4b4bf; next_call.sh as committed with this record): the Hopper prefill attention
# (kernels/prefill_sm90.cu, session 41, never run on a GPU before) against the CPU, timed, 32-layer p1000 steps off
# and with each form, then bench.sh with the faster form on.
bash scripts/gpu/next_call.sh sm90
