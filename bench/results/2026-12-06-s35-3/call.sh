#!/usr/bin/env bash
# Session 35 call 3 (binaries of d1f434b): ncu detail (speed of light, occupancy, warp states) of the 2-layer
# p512-identical step; ncu-detail-lora.txt keeps the LoRA kernels' sections.
bin=.gpu-bin-serve; . scripts/gpu/call_prelude.sh
LORAX_PROFILE_DETAIL="p512-identical" timeout 200 scripts/gpu/kernel_profile.sh "$R/ncu" "$bin" p512-identical > "$R/ncu.txt" 2>&1
tar -C "$OUT" -czf "$OUT/all.tgz" r
