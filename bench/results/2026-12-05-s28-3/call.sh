#!/usr/bin/env bash
# Session 28 call 3 (an H100; binaries of 545a26f, the split mend: a small batch splits from its first decode step;
# only cuda_graphs and cuda_kernels carried), the device time's last 297 s. cuda_graphs (not the ignored
# benchmarks): a_single_stream_keeps_its_graph_as_its_context_grows passed (1 capture, 219 replays, 1 eager
# step); decode_steps_through_graphs_equal_eager_steps passed its bf16 half (3 captures, graph tokens equal
# eager ones) and was cut by the 60 s timeout in its f32 half. cuda_kernels attention: only
# attention_refuses_bad_tables finished within 75 s; attention_matches_cpu and the rope test were cut.
bin=.gpu-bin-serve; . scripts/gpu/call_prelude.sh
timeout 60 $bin/cuda_graphs --test-threads=1 --nocapture > $R/graphs.txt 2>&1; echo "rc $?" >> $R/graphs.txt; lap graphs
timeout 75 $bin/cuda_kernels attention --test-threads=2 --nocapture > $R/kernels-attention.txt 2>&1; echo "rc $?" >> $R/kernels-attention.txt; lap attention
tar -C $OUT -czf $OUT/all.tgz r
