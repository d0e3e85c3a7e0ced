#!/usr/bin/env bash
# Session 34 call 1 (an H100; binaries of 99eec4d: rope_kv_write_lora, first form, on by default):
# `bash scripts/gpu/next_call.sh lora-rope` (next_call.sh as committed in 1d18656). Every check that reached the
# fused kernel failed with "kernel rope_kv_write_lora is not loaded": the kernel was missing from the lora
# module's list in KERNELS (mod.rs). Mended in 1d18656, with a CPU test (compile.rs
# `every_named_kernel_is_loaded`) that fails on such an omission. No timings from this call (every "on"
# step panicked). 223 s.
bash scripts/gpu/next_call.sh lora-rope
