#!/usr/bin/env bash
# Session 21 call 2 (646d5e5): the GPU tests of the row kernels (all three dtypes: call 1's f32 modules did
# not compile), golden and e2e (float32 and bf16 against the transformers + peft references; the bf16 e2e counts of equal tokens show whether the roundings stayed bit-identical), then the whole
# serving benchmark on the session's code (decode attention's block-table reads, the cvt pairs, prompts
# tokenized in pieces).
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
timeout 110 $bin/cuda_kernels norms rope elementwise --test-threads 3 > $R/kernels.txt 2>&1; echo "rc $?" >> $R/kernels.txt; lap kernels
RUN_SKIP="nvrtc kernels sampling bench chunked adapters graphs" timeout 60 scripts/gpu/run.sh $R/run $bin > $R/run.txt 2>&1; echo "rc $?" >> $R/run.txt; lap run
BENCH_TIMEOUT=390 BENCH_PEFT_BUDGET=135 timeout 400 scripts/gpu/bench.sh $R/bench $bin > $R/bench.txt 2>&1; echo "rc $?" >> $R/bench.txt; lap bench
tar -C $OUT -czf $OUT/all.tgz r
