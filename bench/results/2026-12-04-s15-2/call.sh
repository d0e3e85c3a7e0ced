#!/usr/bin/env bash
# Session 15 call 2: the skinny GEMM's second form (one m64nTNk16 per k16, one stage of MMAs in flight,
# acquire-release tile counters): its test; the linears' timings at 8-256 rows against cuBLAS
# (step_profile); whole-model eager steps at 32 layers with it on and off (LORAX_CUDA_SKINNY=0); an ncu
# profile of 2-layer b128 steps.
bin=.gpu-bin-serve
. scripts/gpu/env.sh
R=$OUT/r; mkdir -p $R
(while sleep 15; do tar -C $OUT -czf $OUT/all.tgz r 2>/dev/null; done) &
t0=$(date +%s); lap() { echo "LAP $1 $(( $(date +%s) - t0 ))s" | tee -a $R/laps.txt; }
timeout 120 $bin/cuda_kernels skinny_gemm linear_matches --nocapture --test-threads 1 > $R/skinny-test.txt 2>&1; echo "rc $?" >> $R/skinny-test.txt; lap skinny-test
timeout 150 $bin/cuda_bench --ignored --exact step_profile --nocapture > $R/step-profile.txt 2>&1; echo "rc $?" >> $R/step-profile.txt; lap step-profile
for x in b128 b88 b32 b128-a8; do for sk in 1 0; do echo "== $x skinny=$sk" >> $R/steps32.txt
  LORAX_CUDA_SKINNY=$sk LORAX_PROFILE_LAYERS=32 LORAX_PROFILE_STEPS=4 LORAX_PROFILE_SCENARIO=$x timeout 60 $bin/cuda_graphs --ignored --exact decode_step_kernels_for_a_profiler --nocapture 2>&1 | grep -E "STEP|PROFILED|panick|rror" >> $R/steps32.txt; lap $x-$sk; done; done
LORAX_PROFILE_DETAIL="" timeout 150 scripts/gpu/kernel_profile.sh $R/prof $bin b128 > $R/prof-stdout.txt 2>&1; lap prof
tar -C $OUT -czf $OUT/all.tgz r
