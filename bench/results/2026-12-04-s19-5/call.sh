#!/usr/bin/env bash
# Session 19 call 5: the final code (both experiments reverted: the kernels and host code of eabdbf1): the
# attention, rope and LoRA kernel tests, then golden, graphs, adapters and e2e.
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
timeout 200 $bin/cuda_kernels rope_attention --nocapture --test-threads 1 > $R/kernels-rope.txt 2>&1; echo "rc $?" >> $R/kernels-rope.txt; lap rope
timeout 150 $bin/cuda_kernels attention --nocapture --test-threads 1 > $R/kernels-attention.txt 2>&1; echo "rc $?" >> $R/kernels-attention.txt; lap attention
timeout 100 $bin/cuda_kernels lora --nocapture --test-threads 1 > $R/kernels-lora.txt 2>&1; echo "rc $?" >> $R/kernels-lora.txt; lap lora
RUN_SKIP="nvrtc kernels sampling bench chunked" timeout 150 scripts/gpu/run.sh $R/run $bin > $R/run.txt 2>&1; echo "rc $?" >> $R/run.txt; lap run
tar -C $OUT -czf $OUT/all.tgz r
