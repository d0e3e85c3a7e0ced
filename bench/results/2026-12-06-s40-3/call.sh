#!/usr/bin/env bash
# Session 40 call 3 (binaries of 0afbfb9: the LoRA shrinks of steps with several adapters on a side stream beside the
# projection's GEMM, LORAX_CUDA_LORA_OVERLAP): cuda_kernels lora_step_matches_cpu (with the overlap's bit-equality
# check); cuda_graphs' decode_steps_through_graphs_equal_eager_steps (overlap runs eager and through graphs);
# cuda_golden and the e2e test with LORAX_CUDA_LORA_OVERLAP=1; 32-layer steps b128-a8, b128-distinct (graphs),
# b32-a8 (graphs), m64x8-a8 (eager) with the overlap off and on, two rounds.
bin=.gpu-bin-serve; . scripts/gpu/call_prelude.sh
timeout 150 "$bin/cuda_kernels" --test-threads=1 lora_step_matches_cpu >"$R/kernels.txt" 2>&1
echo "rc $?" >>"$R/kernels.txt"
timeout 150 "$bin/cuda_graphs" --test-threads=1 decode_steps_through_graphs_equal_eager_steps --nocapture >"$R/graphs.txt" 2>&1
echo "rc $?" >>"$R/graphs.txt"
LORAX_CUDA_LORA_OVERLAP=1 timeout 100 "$bin/cuda_golden" --test-threads=1 >"$R/golden.txt" 2>&1
echo "rc $?" >>"$R/golden.txt"
lap tests
for round in 1 2; do
    for o in 0 1; do
        profile_step b128-a8 "overlap$o-$round" LORAX_PROFILE_GRAPHS=1 LORAX_CUDA_LORA_OVERLAP=$o
        profile_step b128-distinct "overlap$o-$round" LORAX_PROFILE_GRAPHS=1 LORAX_CUDA_LORA_OVERLAP=$o
        profile_step b32-a8 "overlap$o-$round" LORAX_PROFILE_GRAPHS=1 LORAX_CUDA_LORA_OVERLAP=$o
        profile_step m64x8-a8 "overlap$o-$round" LORAX_CUDA_LORA_OVERLAP=$o
    done
    lap "steps round $round"
done
LORAX_CUDA_LORA_OVERLAP=1 RUN_SKIP="nvrtc kernels adapters sampling bench chunked graphs golden" timeout 90 \
    scripts/gpu/run.sh "$R/run" "$bin" >"$R/run.txt" 2>&1
echo "rc $?" >>"$R/run.txt"
grep -h "^E2E" "$R/run/e2e.log" >"$R/e2e.txt" 2>/dev/null
lap e2e
tar -C "$OUT" -czf "$OUT/all.tgz" r
