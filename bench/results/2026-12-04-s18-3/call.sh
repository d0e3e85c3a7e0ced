#!/usr/bin/env bash
# Session 18 call 3: the whole benchmark (serving + transformers + peft) with the rotary embedding inside
# decode attention at one wave of blocks (LORAX_CUDA_ATTN_ROPE=auto), then the rope_attention kernel test.
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
BENCH_TIMEOUT=420 BENCH_PEFT_BUDGET=135 timeout 430 scripts/gpu/bench.sh $R/bench $bin > $R/bench-stdout.txt 2>&1; echo "rc $?" >> $R/bench-stdout.txt; lap bench
timeout 130 $bin/cuda_kernels rope_attention --nocapture --test-threads 1 > $R/kernels-rope.txt 2>&1; echo "rc $?" >> $R/kernels-rope.txt; lap kernels
tar -C $OUT -czf $OUT/all.tgz r
