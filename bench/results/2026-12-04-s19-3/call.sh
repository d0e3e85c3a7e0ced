#!/usr/bin/env bash
# Session 19 call 3: add_rms_norm_lora with launch bounds (call 2's launch failed for registers): the LoRA
# kernel tests; 32-layer eager steps at 128 rows with 8 adapters and with 128 distinct adapters, fold on and
# off (LORAX_CUDA_LORA_NORM=0), twice each; graphs and adapters; then the whole benchmark (serving +
# transformers + peft).
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
timeout 150 $bin/cuda_kernels lora --nocapture --test-threads 1 > $R/kernels-lora.txt 2>&1; echo "rc $?" >> $R/kernels-lora.txt; lap lora
for x in b128-a8 b128-distinct; do
  for round in 1 2; do
    profile_step $x fold
    profile_step $x expand LORAX_CUDA_LORA_NORM=0
  done
  lap $x
done
RUN_SKIP="nvrtc kernels sampling bench chunked golden e2e" timeout 100 scripts/gpu/run.sh $R/run $bin > $R/run.txt 2>&1; echo "rc $?" >> $R/run.txt; lap run
BENCH_TIMEOUT=390 BENCH_PEFT_BUDGET=135 timeout 400 scripts/gpu/bench.sh $R/bench $bin > $R/bench.txt 2>&1; echo "rc $?" >> $R/bench.txt; lap bench
tar -C $OUT -czf $OUT/all.tgz r
