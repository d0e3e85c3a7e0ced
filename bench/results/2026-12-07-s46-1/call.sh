#!/usr/bin/env bash
# Session 46 call 1 (an H100): binaries of d776f37 (scripts/gpu/build.sh, repacked into .gpu-bin-serve), the script of
# 08dee90 (`git show 08dee90:scripts/gpu/next_call.sh`). Results: kernels.txt (the Hopper silu tests), graphs.txt,
# ab-all.txt / ab-4.txt (bench.sh, base at 128 streams and the regimes, adapter threads all / 4), host-reports.txt
# (the shard's host-time and graph reports). The graph reports' gap_us here spans mixed steps (fixed in 62fa892).
DECODE_AB_KERNELS=1 bash scripts/gpu/next_call.sh decode-ab
