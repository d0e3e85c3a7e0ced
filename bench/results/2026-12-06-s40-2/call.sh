#!/usr/bin/env bash
# Session 40 call 2 (binaries of b3bcf6d: decode-sized GEMMs in pieces on side streams, LORAX_CUDA_GEMM_PIECES):
# the torch probe of the split (scripts/gpu/split_probe.py); cuda_kernels' linear tests (pieces against the CPU and
# the whole); cuda_graphs (graph steps in pieces equal eager steps in pieces); cuda_golden with 2 pieces;
# 32-layer decode steps through graphs, b128 / b32 / b128-a8 at 1-4 pieces, two rounds.
bin=.gpu-bin-serve; . scripts/gpu/call_prelude.sh
timeout 120 python3 scripts/gpu/split_probe.py 128 64 32 >"$R/split.txt" 2>&1
echo "rc $?" >>"$R/split.txt"
lap probe
timeout 150 "$bin/cuda_kernels" --test-threads=1 linear --nocapture >"$R/kernels.txt" 2>&1
echo "rc $?" >>"$R/kernels.txt"
timeout 150 "$bin/cuda_graphs" --test-threads=1 decode_steps_through_graphs_equal_eager_steps --nocapture >"$R/graphs.txt" 2>&1
echo "rc $?" >>"$R/graphs.txt"
LORAX_CUDA_GEMM_PIECES=2 timeout 100 "$bin/cuda_golden" --test-threads=1 >"$R/golden.txt" 2>&1
echo "rc $?" >>"$R/golden.txt"
lap tests
for round in 1 2; do
    for s in b128 b32 b128-a8; do
        for p in 1 2 3 4; do
            profile_step $s "pieces$p-$round" LORAX_PROFILE_GRAPHS=1 LORAX_CUDA_GEMM_PIECES=$p
        done
    done
    lap "steps round $round"
done
tar -C "$OUT" -czf "$OUT/all.tgz" r
