#!/usr/bin/env bash
# Session 19 call 6: the review's single rule for the fused rotary attention kernel (attn_rope_heads):
# the rope and attention kernel tests (which batches are fused: prefill rows, fusion off, a group over two
# blocks, f32), then golden, graphs and e2e.
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
timeout 200 $bin/cuda_kernels rope_attention --nocapture --test-threads 1 > $R/kernels-rope.txt 2>&1; echo "rc $?" >> $R/kernels-rope.txt; lap rope
timeout 150 $bin/cuda_kernels attention --nocapture --test-threads 1 > $R/kernels-attention.txt 2>&1; echo "rc $?" >> $R/kernels-attention.txt; lap attention
RUN_SKIP="nvrtc kernels sampling bench chunked adapters" timeout 100 scripts/gpu/run.sh $R/run $bin > $R/run.txt 2>&1; echo "rc $?" >> $R/run.txt; lap run
tar -C $OUT -czf $OUT/all.tgz r
