#!/usr/bin/env bash
# Session 16 call 3 (the TILES/SLICE experiments): the skinny test with whole tiles and 64-row slices
# (LORAX_CUDA_SKINNY_TILES=1 LORAX_CUDA_SKINNY_SLICE=64), then step_profile (linears at 8-256 rows, wgmma
# against cuBLAS) in three forms: stream-K (default), whole tiles, whole tiles + slices; 32-layer eager
# steps with the last form on and the skinny GEMM off.
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
LORAX_CUDA_SKINNY_TILES=1 LORAX_CUDA_SKINNY_SLICE=64 timeout 220 $bin/cuda_kernels skinny_gemm --nocapture --test-threads 1 > $R/skinny-test-sliced.txt 2>&1; rc=$?; echo "rc $rc" >> $R/skinny-test-sliced.txt; lap skinny-test
if [ $rc = 124 ]; then tar -C $OUT -czf $OUT/all.tgz r; exit 0; fi
for v in "streamk" "tiles LORAX_CUDA_SKINNY_TILES=1" "sliced LORAX_CUDA_SKINNY_TILES=1 LORAX_CUDA_SKINNY_SLICE=64"; do
  set -- $v; name=$1; shift
  env "$@" timeout 120 $bin/cuda_bench --ignored --exact step_profile --nocapture > $R/step-profile-$name.txt 2>&1; echo "rc $?" >> $R/step-profile-$name.txt; lap profile-$name
  grep -E "profile_linear_|rc " $R/step-profile-$name.txt | sed "s/^/$name /" >> $R/summary.txt
done
for x in b128 b88 b32 b8; do for sk in 1 0; do echo "== $x skinny=$sk (tiles, slices of 64)" >> $R/steps32.txt
  LORAX_CUDA_SKINNY_TILES=1 LORAX_CUDA_SKINNY_SLICE=64 LORAX_CUDA_SKINNY=$sk LORAX_PROFILE_LAYERS=32 LORAX_PROFILE_STEPS=4 LORAX_PROFILE_SCENARIO=$x timeout 60 $bin/cuda_graphs --ignored --exact decode_step_kernels_for_a_profiler --nocapture 2>&1 | grep -E "STEP|PROFILED|panick|rror" >> $R/steps32.txt; lap $x-$sk; done; done
tar -C $OUT -czf $OUT/all.tgz r
