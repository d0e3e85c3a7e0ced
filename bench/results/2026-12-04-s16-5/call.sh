#!/usr/bin/env bash
# Session 16 call 5: the whole benchmark (serving + transformers + peft) at 9b84df8 (the default decode
# path is session 14's: cuBLAS; the skinny GEMM off).
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
BENCH_TIMEOUT=420 BENCH_PEFT_BUDGET=135 timeout 430 scripts/gpu/bench.sh $R/bench $bin > $R/bench-stdout.txt 2>&1; echo "rc $?" >> $R/bench-stdout.txt; lap bench
tar -C $OUT -czf $OUT/all.tgz r
