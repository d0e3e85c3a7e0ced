#!/usr/bin/env bash
# Session 45, call 2 (an H100): the first run with the silu product on gemm_sm90_silu_t by default (auto). Golden
# with it on every gate/up product of any size first (golden-silu-t.txt), then graphs, golden and e2e against
# transformers + peft with the defaults (run.txt, golden.txt, graphs.txt, e2e.txt), then bench.sh (bench/), with
# its new TTFT from idle. Binaries of bb77d59 (scripts/gpu/build.sh .gpu-bin-serve, repacked with xz),
# next_call.sh and bench.py of bb77d59.
GOLDEN_SILU_T=1 bash scripts/gpu/next_call.sh golden-bench
