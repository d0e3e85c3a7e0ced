#!/usr/bin/env bash
# Session 41 call 2 (binaries of 0c54a20): the Hopper prefill attention (kernels/prefill_sm90.cu, 64
# and 128 keys a step) checked against the CPU (cuda_kernels attention_matches_cpu: every case, its Hopper passes
# among them), timed beside the tensor-core kernel's shapes (cuda_bench prefill_benchmarks), then 32-layer eager
# steps of a 1000-token prompt (p1000) with it off and at 64 and 128 keys (LORAX_CUDA_PREFILL_SM90=0|64|128), two
# rounds in opposite orders. (bench.sh left out: failed machine starts left too little device time.)
# (The golden and e2e models have head sizes 8-64: the kernel, head size 128 only, is checked against the CPU.)
bin=.gpu-bin-serve; . scripts/gpu/call_prelude.sh
timeout 240 "$bin/cuda_kernels" --exact attention_matches_cpu --nocapture >"$R/kernels.txt" 2>&1
echo "rc $?" >>"$R/kernels.txt"
lap kernels
timeout 150 "$bin/cuda_bench" --ignored --exact prefill_benchmarks --nocapture >"$R/prefill.txt" 2>&1
echo "rc $?" >>"$R/prefill.txt"
lap prefill
if grep -q "test result: ok. 1 passed" "$R/kernels.txt"; then
    for on in 0 64 128; do
        profile_step p1000 "sm90=$on round 1" LORAX_CUDA_PREFILL_SM90=$on
    done
    for on in 128 64 0; do
        profile_step p1000 "sm90=$on round 2" LORAX_CUDA_PREFILL_SM90=$on
    done
    lap steps
fi
tar -C "$OUT" -czf "$OUT/all.tgz" r
