#!/usr/bin/env bash
# Session 41 call 1 (binaries of 9df3137): the wgmma probes (cuda_wgmma_probe: the P.V layout under both descriptor
# guesses, then the first wgmma attention against the CPU and timed at 1000 tokens), beside PyTorch's attention
# backends (scripts/gpu/attn_probe.py) and ours (cuda_bench prefill_benchmarks); then the prompt MLP in row chunks
# (scripts/gpu/mlp_chunk_probe.py: whether silu_mul reading an L2-resident gate/up product pays for smaller GEMMs).
bin=.gpu-bin-serve; . scripts/gpu/call_prelude.sh
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv >"$R/gpu.txt" 2>&1
timeout 120 "$bin/cuda_wgmma_probe" --test-threads=1 --nocapture >"$R/wgmma.txt" 2>&1
echo "rc $?" >>"$R/wgmma.txt"
lap probes
(cd scripts/gpu && timeout 150 python3 mlp_chunk_probe.py 1000 512) >"$R/mlp.txt" 2>&1
echo "rc $?" >>"$R/mlp.txt"
lap mlp
timeout 90 python3 scripts/gpu/attn_probe.py >"$R/attn.txt" 2>&1
echo "rc $?" >>"$R/attn.txt"
timeout 150 "$bin/cuda_bench" --ignored --exact prefill_benchmarks --nocapture >"$R/prefill.txt" 2>&1
echo "rc $?" >>"$R/prefill.txt"
lap attention
tar -C "$OUT" -czf "$OUT/all.tgz" r
