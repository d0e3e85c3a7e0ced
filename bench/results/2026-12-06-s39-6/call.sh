#!/usr/bin/env bash
# Session 39 call 6 (binaries of e7461b9: the fused rotary attention takes q/k/v rows with the LoRA shrink's
# columns past them): cuda_kernels' rotary tests (wide rows now checked) and lora_shrink_in_gemm_matches_cpu;
# cuda_golden, cuda_graphs, the e2e test; 32-layer decode steps through graphs of b16-identical (the fused
# rotary attention's size) with the shrinks in the GEMMs (slot 32) and off (0), two rounds.
bin=.gpu-bin-serve; . scripts/gpu/call_prelude.sh
for t in rope lora_shrink_in_gemm; do
    timeout 100 "$bin/cuda_kernels" --test-threads=1 "$t" >>"$R/kernels.txt" 2>&1
    echo "rc $t $?" >>"$R/kernels.txt"
done
timeout 100 "$bin/cuda_golden" --test-threads=1 >"$R/golden.txt" 2>&1
echo "rc $?" >>"$R/golden.txt"
timeout 150 "$bin/cuda_graphs" --test-threads=1 >"$R/graphs.txt" 2>&1
echo "rc $?" >>"$R/graphs.txt"
RUN_SKIP="nvrtc kernels adapters sampling bench chunked graphs golden" timeout 90 scripts/gpu/run.sh "$R/run" "$bin" \
    >"$R/run.txt" 2>&1
echo "rc $?" >>"$R/run.txt"
grep -h "^E2E" "$R/run/e2e.log" >"$R/e2e.txt" 2>/dev/null
lap tests
for round in 1 2; do
    for slot in 32 0; do
        profile_step b16-identical "slot$slot-$round" LORAX_PROFILE_GRAPHS=1 LORAX_CUDA_LORA_IN_GEMM=$slot
    done
done
lap steps
tar -C "$OUT" -czf "$OUT/all.tgz" r
