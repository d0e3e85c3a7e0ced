#!/usr/bin/env bash
# Session 48 call 2 (an H100, another machine than call 1): binaries of 2db2148, whose default fed decode steps
# (LORAX_CUDA_GRAPH_FEED unset = on in those binaries; off again from the commit after, see bench/NOTES.md session 48),
# the script of 2db2148 (next_call.sh `bench-only`: bench.sh with the defaults). Results: bench.txt, bench/ (summary,
# results JSON, the shard's report lines in host-reports.txt, peft-compare.txt).
bash scripts/gpu/next_call.sh bench-only
