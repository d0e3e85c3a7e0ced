#!/usr/bin/env bash
# Session 41 call 2 (binaries of 0c54a20): the Hopper prefill attention (kernels/prefill_sm90.cu, 64
# and 128 keys a step) checked against the CPU (cuda_kernels attention_matches_cpu: every case, its Hopper passes
# among them), timed beside the tensor-core kernel's shapes (cuda_bench prefill_benchmarks), then 32-layer eager
# steps of a 1000-token prompt (p1000) with it off and at 64 and 128 keys (LORAX_CUDA_PREFILL_SM90=0|64|128), two
# rounds in opposite orders; then, if a Hopper form took less than the default shape at 1000 tokens in
# prefill_benchmarks, bench.sh with that form on (LORAX_CUDA_PREFILL_SM90 passes through the launcher to the shard),
# in 170 s without the peft baseline (the session's device time was short).
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
    best=$(awk '/^prefill tiles auto:/ {l = "auto"} /^prefill tiles w/ {l = ""} /sm90\), 64 keys/ {l = "64"}
        /sm90\), 128 keys/ {l = "128"}
        /^BENCH prefill_attention_tc_len1000_h32kv8/ && l != "" {split($0, a, "|"); v[l] = a[2] + 0}
        END {b = 0; bv = v["auto"]; for (k in v) if (k != "auto" && v[k] < bv) {b = k; bv = v[k]} print b}' "$R/prefill.txt")
    echo "prefill_benchmarks at 1000 tokens: the Hopper form to bench: ${best} (0: none faster)" | tee -a "$R/laps.txt"
    if [ "$best" != 0 ]; then
        LORAX_CUDA_PREFILL_SM90=$best BENCH_TIMEOUT=170 BENCH_PEFT_BUDGET=0 timeout 180 scripts/gpu/bench.sh \
            "$R/bench" "$bin" >"$R/bench.txt" 2>&1
        echo "rc $?" >>"$R/bench.txt"
        lap bench
    fi
fi
tar -C "$OUT" -czf "$OUT/all.tgz" r
