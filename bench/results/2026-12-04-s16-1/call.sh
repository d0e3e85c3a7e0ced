#!/usr/bin/env bash
# Session 16 call 1 (96c8ad8: the skinny GEMM's TMA form): its test; the linears at 8-256 rows against
# cuBLAS (step_profile) with a stage's MMAs in flight (SK_INFLIGHT=1, the default) and without
# (LORAX_CUDA_DEFINES=-DSK_INFLIGHT=0); whole-model eager steps at 32 layers with it on and off.
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
timeout 220 $bin/cuda_kernels skinny_gemm linear_matches --nocapture --test-threads 1 > $R/skinny-test.txt 2>&1; rc=$?; echo "rc $rc" >> $R/skinny-test.txt; lap skinny-test
if [ $rc = 124 ]; then tar -C $OUT -czf $OUT/all.tgz r; exit 0; fi
timeout 150 $bin/cuda_bench --ignored --exact step_profile --nocapture > $R/step-profile.txt 2>&1; echo "rc $?" >> $R/step-profile.txt; lap step-profile
for x in b128 b88 b32 b8; do for sk in 1 0; do echo "== $x skinny=$sk" >> $R/steps32.txt
  LORAX_CUDA_SKINNY=$sk LORAX_PROFILE_LAYERS=32 LORAX_PROFILE_STEPS=4 LORAX_PROFILE_SCENARIO=$x timeout 60 $bin/cuda_graphs --ignored --exact decode_step_kernels_for_a_profiler --nocapture 2>&1 | grep -E "STEP|PROFILED|panick|rror" >> $R/steps32.txt; lap $x-$sk; done; done
LORAX_CUDA_DEFINES=-DSK_INFLIGHT=0 timeout 200 $bin/cuda_bench --ignored --exact step_profile --nocapture > $R/step-profile-inflight0.txt 2>&1; echo "rc $?" >> $R/step-profile-inflight0.txt; lap step-profile-inflight0
grep -E "profile_linear|rc " $R/step-profile.txt > $R/summary.txt; grep -E "profile_linear|rc " $R/step-profile-inflight0.txt | sed 's/^/IF0 /' >> $R/summary.txt
tar -C $OUT -czf $OUT/all.tgz r
