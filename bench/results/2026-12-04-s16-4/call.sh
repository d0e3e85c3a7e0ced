#!/usr/bin/env bash
# Session 16 call 4 (9b84df8, the final skinny form: each stage's MMAs waited for; the experiments
# removed): the skinny and linear tests, step_profile, 32-layer eager steps with it on and off.
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
timeout 220 $bin/cuda_kernels skinny_gemm linear_matches --nocapture --test-threads 1 > $R/skinny-test.txt 2>&1; rc=$?; echo "rc $rc" >> $R/skinny-test.txt; lap skinny-test
if [ $rc = 124 ]; then tar -C $OUT -czf $OUT/all.tgz r; exit 0; fi
timeout 120 $bin/cuda_bench --ignored --exact step_profile --nocapture > $R/step-profile.txt 2>&1; echo "rc $?" >> $R/step-profile.txt; lap step-profile
grep -E "profile_linear|rc " $R/step-profile.txt > $R/summary.txt
for x in b128 b32 b8; do for sk in 1 0; do echo "== $x skinny=$sk" >> $R/steps32.txt
  LORAX_CUDA_SKINNY=$sk LORAX_PROFILE_LAYERS=32 LORAX_PROFILE_STEPS=4 LORAX_PROFILE_SCENARIO=$x timeout 60 $bin/cuda_graphs --ignored --exact decode_step_kernels_for_a_profiler --nocapture 2>&1 | grep -E "STEP|PROFILED|panick|rror" >> $R/steps32.txt; lap $x-$sk; done; done
timeout 100 $bin/cuda_graphs > $R/graphs.txt 2>&1; echo "rc $?" >> $R/graphs.txt; lap graphs
tar -C $OUT -czf $OUT/all.tgz r
