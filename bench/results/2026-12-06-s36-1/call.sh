#!/usr/bin/env bash
# Session 36 call 1 (binaries of the commit that adds LORAX_CUDA_MARKS): the LoRA kernel and golden tests
# (session 35's new assertions on the prompt pair's plans, not yet run on a GPU), then 32-layer eager steps
# of a 1000-token base prompt with marks off and on (and on with PDL off), and of p512-identical with marks:
# where a prompt step's time goes between the device's work and the host.
bin=.gpu-bin-serve; . scripts/gpu/call_prelude.sh
timeout 120 "$bin/cuda_kernels" lora --nocapture --test-threads 2 >"$R/kernels-lora.txt" 2>&1
echo "rc $?" >>"$R/kernels-lora.txt"
timeout 120 "$bin/cuda_golden" lora --nocapture --test-threads 1 >"$R/golden-lora.txt" 2>&1
echo "rc $?" >>"$R/golden-lora.txt"
lap tests
for round in 1 2; do
    profile_step p1000 "plain-$round"
    profile_step p1000 "marks-$round" LORAX_CUDA_MARKS=1
done
profile_step p1000 marks-nopdl LORAX_CUDA_MARKS=1 LORAX_CUDA_PDL=0
profile_step p512-identical marks LORAX_CUDA_MARKS=1
profile_step p512 marks LORAX_CUDA_MARKS=1
lap steps
tar -C "$OUT" -czf "$OUT/all.tgz" r
