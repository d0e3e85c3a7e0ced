#!/usr/bin/env bash
# Session 41 call 2 (binaries of 9d96069): the Hopper prefill attention (kernels/prefill_sm90.cu) checked against the
# CPU (cuda_kernels attention_matches_cpu: every case, its Hopper pass among them), timed beside the tensor-core
# kernel's shapes (cuda_bench prefill_benchmarks), then 32-layer eager steps of a 1000-token prompt (p1000) and the
# peft workload's mixed step (m64x8-a8) with it off and on (LORAX_CUDA_PREFILL_SM90), two rounds interleaved.
# (The golden and e2e models have head sizes 8-64: the kernel, head size 128 only, is checked against the CPU.)
bin=.gpu-bin-serve; . scripts/gpu/call_prelude.sh
timeout 240 "$bin/cuda_kernels" --exact attention_matches_cpu --nocapture >"$R/kernels.txt" 2>&1
echo "rc $?" >>"$R/kernels.txt"
lap kernels
timeout 150 "$bin/cuda_bench" --ignored --exact prefill_benchmarks --nocapture >"$R/prefill.txt" 2>&1
echo "rc $?" >>"$R/prefill.txt"
lap prefill
if grep -q "test result: ok. 1 passed" "$R/kernels.txt"; then
    for round in 1 2; do
        for on in 0 1; do
            profile_step p1000 "sm90=$on round $round" LORAX_CUDA_PREFILL_SM90=$on
            profile_step m64x8-a8 "sm90=$on round $round" LORAX_CUDA_PREFILL_SM90=$on
        done
    done
    lap steps
fi
tar -C "$OUT" -czf "$OUT/all.tgz" r
