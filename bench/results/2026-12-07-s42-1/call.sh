#!/usr/bin/env bash
# Session 42 call 1 (binaries of c99e87f; next_call.sh as committed with this record): the Hopper prefill attention's four forms
# (kernels/prefill_sm90.cu: 64 and 128 keys a step, session 41; ws64 and ws128 warp-specialized, session 42; none
# run on a GPU before) against the CPU, timed beside the tensor-core kernel's shapes, and 32-layer p1000 steps off
# and with each form that passed.
SM90_ROUNDS=${SM90_ROUNDS:-2} bash scripts/gpu/next_call.sh sm90
# Run as `SM90_ROUNDS=0 bash bench/results/2026-12-07-s42-1/call.sh` (the device budget left about 340 s): no steps.
