#!/usr/bin/env bash
# Session 46 call 3 (an H100, another machine than calls 1-2): binaries of 080e8a9 (the code of 57ee71c), the script
# of 080e8a9. Results: graphs.txt (both graph tests), kernels-lora.txt (lora_step_matches_cpu), golden.txt, ab-all.txt
# (bench.sh: base at 128 streams and the regimes), graph-log-all.txt (as call 2), ab-all/host-reports.txt.
bash scripts/gpu/next_call.sh stable-sigs
