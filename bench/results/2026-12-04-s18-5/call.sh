#!/usr/bin/env bash
# Session 18 call 5 (ce41845, the final code): every cuda_kernels test, cuda_graphs (graph steps equal
# eager ones, the rotary embedding inside attention at one wave by default), then cuda_bench
# decode_attention_benchmarks (its reshaped sweep of split targets, first run on a GPU).
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
timeout 240 $bin/cuda_kernels --test-threads 2 > $R/kernels.txt 2>&1; echo "rc $?" >> $R/kernels.txt; lap kernels
timeout 60 $bin/cuda_graphs --test-threads 1 > $R/graphs.txt 2>&1; echo "rc $?" >> $R/graphs.txt; lap graphs
timeout 140 $bin/cuda_bench --ignored --exact decode_attention_benchmarks --nocapture > $R/attn.txt 2>&1; echo "rc $?" >> $R/attn.txt; lap attn
tar -C $OUT -czf $OUT/all.tgz r
