#!/usr/bin/env bash
# Session 40 call 4 (cuda_bench of 0afbfb9, whose kernels/prefill.cu and its host code are 59c2f75's): what causal
# prefill attention costs in PyTorch's kernels (scripts/gpu/attn_probe.py: FlashAttention-2, cuDNN, memory-efficient)
# beside ours (cuda_bench prefill_benchmarks, every tile shape) at 1 x 1000, 8 x 512 and 1 x 4096 tokens.
bin=.gpu-bin-serve; . scripts/gpu/call_prelude.sh
timeout 90 python3 scripts/gpu/attn_probe.py >"$R/attn.txt" 2>&1
echo "rc $?" >>"$R/attn.txt"
lap probe
timeout 150 "$bin/cuda_bench" --ignored --exact prefill_benchmarks --nocapture >"$R/prefill.txt" 2>&1
echo "rc $?" >>"$R/prefill.txt"
lap prefill
tar -C "$OUT" -czf "$OUT/all.tgz" r
