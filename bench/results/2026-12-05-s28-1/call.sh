#!/usr/bin/env bash
# Session 28 call 1 (an H100; binaries of e7a9b7c: split_plan, the first GPU run of the start-up decode
# warm-up): `bash scripts/gpu/next_call.sh graphs-bench` (next_call.sh of 3070973). golden (8 passed) and e2e
# passed; cuda_graphs: the new a_single_stream_keeps_its_graph_as_its_context_grows passed (1 capture, 219
# replays, 1 eager step) and decode_steps_through_graphs_equal_eager_steps passed (3 captures, was 4-5), but
# a_shrinking_batch_with_and_without_captures_at_first_sight and decode_step_time_with_and_without_graphs
# failed on "CUDA allocating 106300440576 bytes" at their prefill, and the bench's server exited at its
# warm-up ("CUDA allocating 59793997824 bytes"): split_plan gave a prompt step (no paged rows) a wave of
# splits and the partials were sized by every row. Mended in the next commit (unsplit when no context passes
# one chunk; partials sized by the paged rows).
bash scripts/gpu/next_call.sh graphs-bench
