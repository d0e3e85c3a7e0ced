#!/usr/bin/env bash
# Session 36 call 7 (binaries of 1d6d34d, the third review's mends): call 2 again: streamed loads on the
# GPU (cuda_adapters: the gate's layer-by-layer waits, streamed loads against whole ones bit for bit, the
# NaN adapter, and the timing against the whole load then the pass; the beside-the-read uploads as before),
# golden's LoRA tests (the non-pair test now with the pair off), and the e2e test through the server (its
# adapter's first download now streams), with the server log's stream lines.
bin=.gpu-bin-serve; . scripts/gpu/call_prelude.sh
timeout 240 "$bin/cuda_adapters" --test-threads=1 --nocapture streamed gate file_uploads >"$R/adapters.txt" 2>&1
echo "rc $?" >>"$R/adapters.txt"
lap adapters
timeout 60 "$bin/cuda_golden" lora --test-threads=1 --nocapture >"$R/golden-lora.txt" 2>&1
echo "rc $?" >>"$R/golden-lora.txt"
lap golden
RUN_SKIP="nvrtc kernels adapters sampling bench chunked graphs golden" timeout 200 scripts/gpu/run.sh "$R/run" "$bin" \
    >"$R/run.txt" 2>&1
echo "rc $?" >>"$R/run.txt"
grep -rhE "via=stream|streamed=true|stream=true|streaming" "$R/run" 2>/dev/null | cut -c1-300 | head -20 >"$R/stream-lines.txt"
lap e2e
tar -C "$OUT" -czf "$OUT/all.tgz" r
