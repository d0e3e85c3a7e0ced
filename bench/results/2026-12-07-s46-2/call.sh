#!/usr/bin/env bash
# Session 46 call 2 (an H100): binaries of 62fa892 (scripts/gpu/build.sh, repacked into .gpu-bin-serve), the script
# of 62fa892 (`git show 62fa892:scripts/gpu/next_call.sh`). Results: graphs.txt, ab-all.txt (bench.sh: base at 128
# streams and the regimes), graph-log-all.txt (the shard's graph debug lines: each capture and each step run eagerly
# for a signature not seen often enough, with its rows, metadata bytes and LoRA records; the LoRA fields of a base
# step are the last LoRA plan's), ab-all/host-reports.txt.
DECODE_AB_RUNS=all DECODE_AB_LOG=1 bash scripts/gpu/next_call.sh decode-ab
