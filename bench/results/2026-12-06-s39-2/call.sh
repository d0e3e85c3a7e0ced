#!/usr/bin/env bash
# Session 39 call 2 (binaries of the commit that puts the q/k/v LoRA shrink inside the projection's GEMM for
# steps of one adapter): cuda_kernels (with the new lora_shrink_in_gemm_matches_cpu and the pitched
# rope_kv_write), 32-layer decode steps through graphs of b128 and b128-identical with the shrink in the GEMM
# (the default, slot 32) and off (LORAX_CUDA_LORA_IN_GEMM=0), two rounds; cuda_golden (against the
# transformers + peft references), cuda_graphs (graphs equal eager steps), the e2e test through the server.
bin=.gpu-bin-serve; . scripts/gpu/call_prelude.sh
timeout 200 "$bin/cuda_kernels" --test-threads=1 >"$R/kernels.txt" 2>&1
echo "rc $?" >>"$R/kernels.txt"
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
lap golden
timeout 150 "$bin/cuda_graphs" --test-threads=1 >"$R/graphs.txt" 2>&1
echo "rc $?" >>"$R/graphs.txt"
lap graphs
RUN_SKIP="nvrtc kernels adapters sampling bench chunked graphs golden" timeout 90 scripts/gpu/run.sh "$R/run" "$bin" \
    >"$R/run.txt" 2>&1
echo "rc $?" >>"$R/run.txt"
grep -h "^E2E" "$R/run/e2e.log" >"$R/e2e.txt" 2>/dev/null
lap e2e
tar -C "$OUT" -czf "$OUT/all.tgz" r
