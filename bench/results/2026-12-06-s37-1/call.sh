#!/usr/bin/env bash
# Session 37 call 1 (binaries of 428939e): prompt tokens' alternatives on the device and prompt scoring
# through the server. cuda_sampling's random cases now give the logprob rows (forced rows) alternatives
# (0-40: over 32 they take the host path), each compared with the host sampler; cuda_golden whole; the e2e
# test through the server, which now scores the reference continuations with /v1/completions (token ids,
# echo, max_tokens 0, logprobs 1) against transformers + peft's greedy choices and the generation's logprobs.
bin=.gpu-bin-serve; . scripts/gpu/call_prelude.sh
timeout 120 "$bin/cuda_sampling" --test-threads=1 --nocapture >"$R/sampling.txt" 2>&1
echo "rc $?" >>"$R/sampling.txt"
lap sampling
timeout 150 "$bin/cuda_golden" --test-threads=2 >"$R/golden.txt" 2>&1
echo "rc $?" >>"$R/golden.txt"
lap golden
RUN_SKIP="nvrtc kernels adapters sampling bench chunked graphs golden" timeout 200 scripts/gpu/run.sh "$R/run" "$bin" \
    >"$R/run.txt" 2>&1
echo "rc $?" >>"$R/run.txt"
grep -h "^E2E" "$R/run/e2e.log" >"$R/e2e.txt" 2>/dev/null
lap e2e
tar -C "$OUT" -czf "$OUT/all.tgz" r
