#!/usr/bin/env bash
# Session 35 call 5 (binaries of the commit that adds this file: the prompt expand issues its first pass's
# loads of y and B before summing the partials, 160 registers): the LoRA kernel and golden tests, then
# 32-layer eager steps of p512-identical and m64x8-a8 with the pair at one block a multiprocessor (the
# default), at two (-DPF_EXPAND_MINB=2: 128 registers, 32 bytes spilled) and with cuBLAS (gemm), two rounds;
# ncu kernel times (2 layers) of p512-identical with each of the pair's forms.
bin=.gpu-bin-serve; . scripts/gpu/call_prelude.sh
gemm="LORAX_CUDA_LORA_PROMPT=gemm"; two="LORAX_CUDA_DEFINES=-DPF_EXPAND_MINB=2"
timeout 120 "$bin/cuda_kernels" lora --nocapture --test-threads 2 >"$R/kernels-lora.txt" 2>&1
echo "rc $?" >>"$R/kernels-lora.txt"
timeout 120 "$bin/cuda_golden" lora --nocapture --test-threads 1 >"$R/golden-lora.txt" 2>&1
echo "rc $?" >>"$R/golden-lora.txt"
lap tests
for round in 1 2; do
    for x in p512-identical m64x8-a8; do
        profile_step "$x" "tc-$round"
        profile_step "$x" "tc2-$round" $two
        profile_step "$x" "gemm-$round" $gemm
    done
done
lap steps
LORAX_PROFILE_DETAIL="" timeout 60 scripts/gpu/kernel_profile.sh "$R/ncu" "$bin" p512-identical >"$R/ncu.txt" 2>&1
env $two LORAX_PROFILE_DETAIL="" timeout 60 scripts/gpu/kernel_profile.sh "$R/ncu-two" "$bin" p512-identical >"$R/ncu-two.txt" 2>&1
lap ncu
tar -C "$OUT" -czf "$OUT/all.tgz" r
