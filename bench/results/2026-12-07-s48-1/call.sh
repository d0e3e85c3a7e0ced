#!/usr/bin/env bash
# Session 48 call 1 (an H100): binaries of 2db2148 (feeding on by default in those binaries; LORAX_CUDA_GRAPH_POW2_ROWS
# new), the script of 2db2148 (next_call.sh `buckets`). Results: graphs.txt (cuda_graphs with
# LORAX_CUDA_GRAPH_POW2_ROWS=128: fed_steps_equal_steps_launched_by_the_host passed with two sequences on an adapter),
# chunked.txt (cuda_chunked: steps_launched_ahead_match_prefill_then_decode passed, the adapter-row fix 7828a1f on a
# GPU), golden.txt (9 passed), e2e.txt (powers of two, fed: passed), then bench.sh's base step at 128 streams and the
# regimes: p0/ (fed, multiples of 8), p128/ (fed, powers of two up to 128), nofeed/ (not fed, multiples of 8), p0b/
# (fed, multiples of 8 again); p128b was skipped (time). host-reports.txt: the shard's report lines.
bash scripts/gpu/next_call.sh buckets
