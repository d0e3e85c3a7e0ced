#!/usr/bin/env bash
# Session 30 call 1 (an H200; binaries of 7bfd6b5: the engine as in session 29, the router handing out a
# step's tokens on one thread, 40aea91): `bash scripts/gpu/next_call.sh detail-bench` (next_call.sh of
# a2cc4c0). ncu kernel times and detail sections (speed of light, occupancy, launch, memory, warp state,
# scheduler) of the 2-layer profiler steps b128-identical and p1000, then bench.sh. The whole ncu detail
# output is kept (ncu-detail-*.txt); the bench's server logs are not (their graph lines are in
# server-graph-lines.txt).
bash scripts/gpu/next_call.sh detail-bench
