#!/usr/bin/env bash
# Session 20 call 1 (9bdf46d): prefill attention's blocks started every head's longest tile first.
# GPU tests of attention (prefill against the CPU reference); cuda_bench prefill_benchmarks (every tile shape,
# both orders); 32-layer eager steps of a
# 1000-token prompt, a 4096-token prompt, and 64 decode rows with eight 512-token prompts, in both orders,
# twice; ncu sections of the 1000-token launch (heads first); golden, graphs, e2e; the whole benchmark.
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
timeout 150 $bin/cuda_kernels attention --nocapture --test-threads 1 > $R/kernels-attention.txt 2>&1; echo "rc $?" >> $R/kernels-attention.txt; lap attention
timeout 150 $bin/cuda_bench --ignored --exact prefill_benchmarks --nocapture > $R/prefill-bench.txt 2>&1; echo "rc $?" >> $R/prefill-bench.txt; lap prefill-bench
for round in 1 2; do
  for x in p1000 p4096 m64x8; do
    profile_step $x heads
    profile_step $x tiles LORAX_CUDA_PREFILL_ORDER=tiles
  done
  lap steps$round
done
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
echo "ncu: $ncu; nsys: $(command -v nsys || ls /opt/nvidia/nsight-systems/*/bin/nsys /usr/local/cuda/bin/nsys 2>/dev/null | head -1)" > $R/ncu.txt
if [ -n "$ncu" ]; then
  # W4N64's launches in prefill_benchmarks: 13 per length (3 warm-up and 10 timed graph replays), heads first
  # for 1000, 4 x 512, 8 x 512, 4096, 16384 tokens (0-64), then tiles first (65-): launch 2 is the 1000-token
  # prompt, heads first.
  for o in 2:heads; do
    timeout 200 "$ncu" --kernel-name regex:prefill_attention_128_w4n64 --launch-skip ${o%%:*} --launch-count 1 \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \
      --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
      $bin/cuda_bench --ignored --exact prefill_benchmarks --nocapture > $R/ncu-prefill-${o#*:}.txt 2>&1; echo "rc $?" >> $R/ncu-prefill-${o#*:}.txt
  done
fi
lap ncu
RUN_SKIP="nvrtc kernels sampling bench chunked adapters" timeout 150 scripts/gpu/run.sh $R/run $bin > $R/run.txt 2>&1; echo "rc $?" >> $R/run.txt; lap run
BENCH_TIMEOUT=300 BENCH_PEFT_BUDGET=120 timeout 310 scripts/gpu/bench.sh $R/bench $bin > $R/bench.txt 2>&1; echo "rc $?" >> $R/bench.txt; lap bench
tar -C $OUT -czf $OUT/all.tgz r
