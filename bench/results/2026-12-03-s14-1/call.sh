#!/usr/bin/env bash
# Session 14 call 1: tuned cuBLASLt decode GEMMs: kernels (tuned_linear_matches_cpu new), golden, graphs,
# adapters; whole-model steps at 32 layers with tuning on and off (LORAX_CUDA_GEMM_TUNE=0).
bin=.gpu-bin-serve
. scripts/gpu/env.sh
R=$OUT/r; mkdir -p $R
(while sleep 15; do tar -C $OUT -czf $OUT/all.tgz r 2>/dev/null; done) &
t0=$(date +%s); lap() { echo "LAP $1 $(( $(date +%s) - t0 ))s" | tee -a $R/laps.txt; }
RUN_SKIP="nvrtc sampling bench e2e chunked" timeout 260 scripts/gpu/run.sh $R/run $bin > $R/run-stdout.txt 2>&1; echo "rc $?" >> $R/run-stdout.txt; lap run
for x in b128 b128-a8 b32 m128; do for tune in 1 0; do echo "== $x tune=$tune" >> $R/steps32.txt
  LORAX_CUDA_GEMM_TUNE=$tune LORAX_PROFILE_LAYERS=32 LORAX_PROFILE_STEPS=4 LORAX_PROFILE_SCENARIO=$x timeout 60 $bin/cuda_graphs --ignored --exact decode_step_kernels_for_a_profiler --nocapture 2>&1 | grep -E "STEP|PROFILED|TUNED|panick|rror" >> $R/steps32.txt; lap $x-$tune; done; done
tar -C $OUT -czf $OUT/all.tgz r
