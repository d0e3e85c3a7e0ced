#!/usr/bin/env bash
# Session 43 call 3 (binaries of 1af9e56, only cuda_kernels carried; an H100): attention_matches_cpu, every case, with
# the new one past 8192 keys under both Hopper forms (auto runs ws128 there).
bin=.gpu-bin-serve; . scripts/gpu/env.sh >/dev/null
timeout 200 $bin/cuda_kernels --exact attention_matches_cpu --nocapture > $OUT/kernels.txt 2>&1
echo "rc $?" >> $OUT/kernels.txt
