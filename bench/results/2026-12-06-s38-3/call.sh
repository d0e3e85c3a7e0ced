#!/usr/bin/env bash
# Session 38 call 3 (binaries of 2237d76: the session's router mends, among them NaN logits failing a request and
# prompt alternatives read in the token's place): the e2e test through the server (f32 greedy tokens against
# transformers + peft; prompt scoring, its 700-token prompt in two LM-head pieces) and cuda_sampling.
bin=.gpu-bin-serve; . scripts/gpu/call_prelude.sh
RUN_SKIP="nvrtc kernels adapters sampling bench chunked graphs golden" timeout 90 scripts/gpu/run.sh "$R/run" "$bin" \
    >"$R/run.txt" 2>&1
echo "rc $?" >>"$R/run.txt"
grep -h "^E2E" "$R/run/e2e.log" >"$R/e2e.txt" 2>/dev/null
lap e2e
timeout 150 "$bin/cuda_sampling" --test-threads=1 >"$R/sampling.txt" 2>&1
echo "rc $?" >>"$R/sampling.txt"
lap sampling
tar -C "$OUT" -czf "$OUT/all.tgz" r
