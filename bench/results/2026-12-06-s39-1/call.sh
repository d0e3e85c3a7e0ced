#!/usr/bin/env bash
# Session 39 call 1 (binaries of the commit that adds cuda_bench lora_in_gemm_shapes): the q/k/v and o
# projections' cuBLAS GEMMs with lora_A rows appended (what a shrink inside the base GEMM would cost), and
# 32-layer decode steps through graphs of b128 and b128-identical, two rounds, as this card's baseline.
bin=.gpu-bin-serve; . scripts/gpu/call_prelude.sh
timeout 150 "$bin/cuda_bench" --ignored --exact lora_in_gemm_shapes --nocapture >"$R/in-gemm.txt" 2>&1
echo "rc $?" >>"$R/in-gemm.txt"
lap shapes
for round in 1 2; do
    for x in b128 b128-identical; do
        profile_step "$x" "base-$round" LORAX_PROFILE_GRAPHS=1
    done
done
lap steps
tar -C "$OUT" -czf "$OUT/all.tgz" r
