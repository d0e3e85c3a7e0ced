#!/usr/bin/env bash
# Session 38 call 1 (binaries of the commit that adds LORAX_CUDA_ATTN_SPLIT_MIN_CHUNKS): decode attention at the
# serving shapes with contexts split into parts of at least 16 (the default: unsplit), 4, 3 and 2 chunks, either
# merge (cuda_bench decode_attention_split_benchmarks); 32-layer decode steps through graphs of b128 and
# b128-identical at 16/3/2, two rounds; cuda_graphs (graphs equal eager steps) at the default and at 3; the e2e
# test through the server (its prompt scoring's 700-token prompt now takes the LM head in two pieces).
bin=.gpu-bin-serve; . scripts/gpu/call_prelude.sh
timeout 120 "$bin/cuda_bench" --ignored --exact decode_attention_split_benchmarks --nocapture >"$R/attn-splits.txt" 2>&1
echo "rc $?" >>"$R/attn-splits.txt"
lap attn
for round in 1 2; do
    for x in b128 b128-identical; do
        for m in 16 3 2; do
            profile_step "$x" "min$m-$round" LORAX_PROFILE_GRAPHS=1 LORAX_CUDA_ATTN_SPLIT_MIN_CHUNKS=$m
        done
    done
done
lap steps
timeout 150 "$bin/cuda_graphs" --test-threads=1 >"$R/graphs.txt" 2>&1
echo "rc $?" >>"$R/graphs.txt"
LORAX_CUDA_ATTN_SPLIT_MIN_CHUNKS=3 timeout 150 "$bin/cuda_graphs" --test-threads=1 >"$R/graphs-min3.txt" 2>&1
echo "rc $?" >>"$R/graphs-min3.txt"
lap graphs
RUN_SKIP="nvrtc kernels adapters sampling bench chunked graphs golden" timeout 200 scripts/gpu/run.sh "$R/run" "$bin" \
    >"$R/run.txt" 2>&1
echo "rc $?" >>"$R/run.txt"
grep -h "^E2E" "$R/run/e2e.log" >"$R/e2e.txt" 2>/dev/null
lap e2e
tar -C "$OUT" -czf "$OUT/all.tgz" r
