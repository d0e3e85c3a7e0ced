#!/usr/bin/env bash
# Session 39 call 4 (binaries of the commit that puts the o projection's LoRA shrink inside its GEMM too):
# cuda_kernels' LoRA, norm and rotary tests (lora_shrink_in_gemm_matches_cpu now with o and add_rms_norm on
# the wide output), 32-layer decode steps through graphs of b128 and b128-identical with the shrinks in the
# GEMMs (slot 32, the default) and off (0), two rounds; cuda_golden, cuda_graphs. (The server binaries did not fit
# the carried files with these: the e2e test and bench.sh ran in call 5, on the same commit.)
bin=.gpu-bin-serve; . scripts/gpu/call_prelude.sh
for t in lora_ norms rope; do
    timeout 100 "$bin/cuda_kernels" --test-threads=1 "$t" >>"$R/kernels.txt" 2>&1
    echo "rc $t $?" >>"$R/kernels.txt"
done
lap kernels
for round in 1 2; do
    profile_step b128 "base-$round" LORAX_PROFILE_GRAPHS=1
    for slot in 32 0; do
        profile_step b128-identical "slot$slot-$round" LORAX_PROFILE_GRAPHS=1 LORAX_CUDA_LORA_IN_GEMM=$slot
    done
done
lap steps
timeout 100 "$bin/cuda_golden" --test-threads=1 >"$R/golden.txt" 2>&1
echo "rc $?" >>"$R/golden.txt"
timeout 150 "$bin/cuda_graphs" --test-threads=1 >"$R/graphs.txt" 2>&1
echo "rc $?" >>"$R/graphs.txt"
lap tests
tar -C "$OUT" -czf "$OUT/all.tgz" r
