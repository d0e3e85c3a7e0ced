#!/usr/bin/env bash
# Session 21 call 1 (18a397b): decode attention's block-table reads one a step (a step ahead), P and the row
# kernels' roundings by one cvt a pair. The GPU tests of the changed kernels (norms, rope, elementwise,
# attention, rope_attention) with the new block-size and window cases; decode_attention_benchmarks and
# 32-layer eager steps, new code against the old reads and roundings (one define set,
# -DATTN_TC_STEP_PAGES=0 -DLORAX_NO_CVT_PAIRS, the same binaries); the tokenizer's encode on this host.
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
OLD="-DATTN_TC_STEP_PAGES=0 -DLORAX_NO_CVT_PAIRS"
python3 bench/results/2026-12-04-s21-1/tok_time.py > $R/tokenize.txt 2>&1; echo "rc $?" >> $R/tokenize.txt; lap tokenize
timeout 230 $bin/cuda_kernels norms rope elementwise attention --test-threads 2 > $R/kernels.txt 2>&1; echo "rc $?" >> $R/kernels.txt; lap kernels
timeout 60 $bin/cuda_bench --ignored --exact decode_attention_benchmarks --nocapture > $R/dab-new.txt 2>&1; echo "rc $?" >> $R/dab-new.txt; lap dab-new
LORAX_CUDA_DEFINES="$OLD" timeout 150 $bin/cuda_bench --ignored --exact decode_attention_benchmarks --nocapture > $R/dab-old.txt 2>&1; echo "rc $?" >> $R/dab-old.txt; lap dab-old
for round in 1 2; do
  profile_step b128 new
  profile_step b128 old LORAX_CUDA_DEFINES="$OLD"
  profile_step p1000 new
  profile_step p1000 old LORAX_CUDA_DEFINES="$OLD"
done
lap steps
profile_step b128-a8 new; profile_step b128-a8 old LORAX_CUDA_DEFINES="$OLD"
profile_step b1 new; profile_step b1 old LORAX_CUDA_DEFINES="$OLD"
lap steps2
tar -C $OUT -czf $OUT/all.tgz r
