#!/usr/bin/env bash
# Session 14 call 2: split prefill tiles: kernels, golden, graphs; prefill_benchmarks and whole-model
# 1000-token prompt steps at 32 layers with the split on and off (LORAX_CUDA_PREFILL_SPLIT=0).
bin=.gpu-bin-serve
. scripts/gpu/env.sh
R=$OUT/r; mkdir -p $R
(while sleep 15; do tar -C $OUT -czf $OUT/all.tgz r 2>/dev/null; done) &
t0=$(date +%s); lap() { echo "LAP $1 $(( $(date +%s) - t0 ))s" | tee -a $R/laps.txt; }
RUN_SKIP="nvrtc sampling bench e2e chunked adapters" timeout 300 scripts/gpu/run.sh $R/run $bin > $R/run-stdout.txt 2>&1; echo "rc $?" >> $R/run-stdout.txt; lap run
for sp in 1 0; do echo "== split=$sp" >> $R/prefill-bench.txt
  LORAX_CUDA_PREFILL_SPLIT=$sp timeout 60 $bin/cuda_bench --ignored --exact prefill_benchmarks --nocapture 2>&1 | grep -E "BENCH|prefill|panick|rror" >> $R/prefill-bench.txt; lap pb-$sp; done
for x in p1000 p2000 m128; do for sp in 1 0; do echo "== $x split=$sp" >> $R/steps32.txt
  LORAX_CUDA_PREFILL_SPLIT=$sp LORAX_PROFILE_LAYERS=32 LORAX_PROFILE_STEPS=4 LORAX_PROFILE_SCENARIO=$x timeout 60 $bin/cuda_graphs --ignored --exact decode_step_kernels_for_a_profiler --nocapture 2>&1 | grep -E "STEP|PROFILED|panick|rror" >> $R/steps32.txt; lap $x-$sp; done; done
tar -C $OUT -czf $OUT/all.tgz r
