#!/usr/bin/env bash
# Session 49 call 1 (an H100): binaries of c900046 (feeding off by default; the round turns it on with
# LORAX_CUDA_GRAPH_FEED=1), the script of c900046 (next_call.sh `feed-bench`: cuda_graphs and cuda_chunked, then
# bench.sh with fed decode steps). Results: graphs.txt, chunked.txt, bench.txt, bench-summary.txt,
# bench-results.json, peft-compare.txt, and the shard's report lines in host-reports.txt.
bash scripts/gpu/next_call.sh feed-bench
