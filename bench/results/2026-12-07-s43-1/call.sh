#!/usr/bin/env bash
# Session 43 call 1 (binaries of 1897750, whose engine is a668425's: ws64 the Hopper prefill default; an H100):
# graphs, golden and e2e against transformers + peft with the defaults, then bench.sh (next_call.sh as of 1897750).
bash scripts/gpu/next_call.sh golden-bench
