#!/usr/bin/env bash
# Session 15 call 3: the skinny GEMM's test alone (call 2's timed out in its 120 s, still in
# linear_matches_cpu's kernel compiles); step_profile with programmatic dependent launch off; ncu's
# warp-state and memory sections for the skinny kernels of a 2-layer b128 step.
bin=.gpu-bin-serve
. scripts/gpu/env.sh
R=$OUT/r; mkdir -p $R
(while sleep 15; do tar -C $OUT -czf $OUT/all.tgz r 2>/dev/null; done) &
t0=$(date +%s); lap() { echo "LAP $1 $(( $(date +%s) - t0 ))s" | tee -a $R/laps.txt; }
timeout 240 $bin/cuda_kernels --exact skinny_gemm_matches_cpu_and_cublas --nocapture > $R/skinny-test.txt 2>&1; echo "rc $?" >> $R/skinny-test.txt; lap skinny-test
LORAX_CUDA_PDL=0 timeout 100 $bin/cuda_bench --ignored --exact step_profile --nocapture > $R/step-profile-nopdl.txt 2>&1; echo "rc $?" >> $R/step-profile-nopdl.txt; lap step-profile
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
LORAX_PROFILE_LAYERS=2 LORAX_PROFILE_STEPS=1 LORAX_PROFILE_SCENARIO=b128 timeout 150 "$ncu" --profile-from-start off --clock-control none \
  --kernel-name regex:skinny --launch-count 4 --section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis --section LaunchStats \
  $bin/cuda_graphs --ignored --exact decode_step_kernels_for_a_profiler --nocapture --test-threads 1 > $R/ncu-skinny.txt 2>&1; lap ncu
tar -C $OUT -czf $OUT/all.tgz r
