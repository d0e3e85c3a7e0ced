#!/usr/bin/env bash
# Session 39 call 3 (binaries of 14e56b5, as call 2): ncu kernel times of 2-layer eager b128-identical steps
# with the q/k/v shrink in the GEMM (slot 32, the default) and off (0), then 32-layer eager and graph steps
# of b128-identical at both, interleaved, two rounds.
bin=.gpu-bin-serve; . scripts/gpu/call_prelude.sh
for slot in 32 0; do
    LORAX_CUDA_LORA_IN_GEMM=$slot timeout 100 scripts/gpu/kernel_profile.sh "$R/ncu-slot$slot" "$bin" b128-identical \
        >"$R/ncu-slot$slot.txt" 2>&1
done
lap ncu
for round in 1 2; do
    for slot in 32 0; do
        profile_step b128-identical "eager-slot$slot-$round" LORAX_CUDA_LORA_IN_GEMM=$slot
        profile_step b128-identical "graphs-slot$slot-$round" LORAX_PROFILE_GRAPHS=1 LORAX_CUDA_LORA_IN_GEMM=$slot
    done
done
lap steps
tar -C "$OUT" -czf "$OUT/all.tgz" r
