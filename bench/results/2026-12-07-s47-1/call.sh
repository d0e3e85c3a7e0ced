#!/usr/bin/env bash
# Session 47 call 1 (an H100): binaries of d140a75 (device-fed decode steps with the review's mends), the script of
# d140a75 (next_call.sh `feed`). Results: graphs.txt (cuda_graphs, with fed_steps_equal_steps_launched_by_the_host),
# chunked.txt (cuda_chunked: FAILED, a fed step's tokens went to the wrong rows where adapters reorder them; fixed in
# 7828a1f), golden.txt, e2e.txt, fed/ nofeed/ fed2/ (bench.sh: base at 128 streams and the regimes with
# LORAX_CUDA_GRAPH_FEED on, off, on; host-reports.txt are the shard's report lines).
bash scripts/gpu/next_call.sh feed
