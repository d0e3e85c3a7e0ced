#!/usr/bin/env bash
# Session 16 call 2 (96c8ad8): where the TMA skinny GEMM's ~12 us of fixed cost per product goes. ncu
# durations of every kernel of 2-layer eager decode steps at 8 and 128 rows with the skinny GEMM on and
# off (kernel_profile.sh), then ncu's sections for the skinny kernels alone at 8 and 128 rows.
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
for sk in 1 0; do LORAX_CUDA_SKINNY=$sk LORAX_PROFILE_DETAIL="" timeout 200 scripts/gpu/kernel_profile.sh $R/prof-sk$sk $bin b8 b128 > $R/prof-sk$sk.txt 2>&1; lap prof-sk$sk; done
for x in b8 b128; do
  LORAX_CUDA_SKINNY=1 LORAX_PROFILE_STEPS=1 LORAX_PROFILE_SCENARIO=$x timeout 150 $ncu --profile-from-start off --clock-control none --kernel-name regex:skinny --launch-count 4 \
    --section SpeedOfLight --section LaunchStats --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis --section Occupancy \
    $bin/cuda_graphs --ignored --exact decode_step_kernels_for_a_profiler --nocapture --test-threads 1 > $R/ncu-skinny-$x.txt 2>&1; lap ncu-$x
done
tar -C $OUT -czf $OUT/all.tgz r
