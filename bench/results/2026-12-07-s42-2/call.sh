#!/usr/bin/env bash
# Session 42 call 2 (the same warm H100 and binaries as call 1, c99e87f): 32-layer eager p1000 steps with the Hopper
# prefill attention off and in form ws64, twice, interleaved (call 1 ran with SM90_ROUNDS=0: the device budget
# left no room for its steps then).
bin=.gpu-bin-serve; . scripts/gpu/call_prelude.sh; for on in 0 ws64 0 ws64; do profile_step p1000 "sm90=$on" LORAX_CUDA_PREFILL_SM90=$on; done; cat $R/steps32.txt | grep -E "==|STEP" | head -40
