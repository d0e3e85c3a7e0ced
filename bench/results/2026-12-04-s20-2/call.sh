#!/usr/bin/env bash
# Session 20 call 2: prefill attention with two row groups (32 query rows) a warp (w4r2n32, w2r2n32) and
# shift-and-mask block lookups for power-of-two block sizes. GPU tests of attention (every tile shape, both
# orders); cuda_bench prefill_benchmarks; 32-layer eager steps of a 1000-token prompt and of 64 decode rows
# with eight 512-token prompts on each 128-row and 64-row shape, twice; ncu of the 1000-token launch on
# w4n64 and w4r2n32 with stall reasons; golden, graphs, e2e.
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
timeout 200 $bin/cuda_kernels attention --nocapture --test-threads 1 > $R/kernels-attention.txt 2>&1; echo "rc $?" >> $R/kernels-attention.txt; lap attention
timeout 150 $bin/cuda_bench --ignored --exact prefill_benchmarks --nocapture > $R/prefill-bench.txt 2>&1; echo "rc $?" >> $R/prefill-bench.txt; lap prefill-bench
for round in 1 2; do
  for t in w4n64 w8n64 w4r2n32 w2r2n32; do
    profile_step p1000 $t LORAX_CUDA_PREFILL_TILE=$t
    profile_step m64x8 $t LORAX_CUDA_PREFILL_TILE=$t
  done
  lap steps$round
done
ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
if [ -n "$ncu" ]; then
  # Launch 2 of a shape in prefill_benchmarks: the 1000-token prompt, heads first (13 graph launches a length).
  for k in w4n64 w4r2n32; do
    timeout 120 "$ncu" --kernel-name regex:prefill_attention_128_$k --launch-skip 2 --launch-count 1 --print-details all \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \
      --section ComputeWorkloadAnalysis --section InstructionStats \
      $bin/cuda_bench --ignored --exact prefill_benchmarks --nocapture > $R/ncu-prefill-$k.txt 2>&1; echo "rc $?" >> $R/ncu-prefill-$k.txt
  done
fi
lap ncu
RUN_SKIP="nvrtc kernels sampling bench chunked adapters" timeout 150 scripts/gpu/run.sh $R/run $bin > $R/run.txt 2>&1; echo "rc $?" >> $R/run.txt; lap run
tar -C $OUT -czf $OUT/all.tgz r
