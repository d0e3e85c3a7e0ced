#!/usr/bin/env bash
# Session 18 call 6: long contexts of batches that fill a wave split when that fills the last wave better
# (wanted_splits): the attention kernel tests (a case of 50 rows of 1500-2039 tokens), then cuda_bench
# decode_attention_benchmarks.
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
timeout 200 $bin/cuda_kernels attention --nocapture --test-threads 1 > $R/kernels-attention.txt 2>&1; echo "rc $?" >> $R/kernels-attention.txt; lap kernels
timeout 120 $bin/cuda_bench --ignored --exact decode_attention_benchmarks --nocapture > $R/attn.txt 2>&1; echo "rc $?" >> $R/attn.txt; lap attn
tar -C $OUT -czf $OUT/all.tgz r
