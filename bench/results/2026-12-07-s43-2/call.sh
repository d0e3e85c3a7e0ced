#!/usr/bin/env bash
# Session 43 call 2 (binaries of 94bf0a8: prompts tokenized word by word; ws64 the default; an H100): PyTorch's
# prefill attention backends beside ours (prefill_benchmarks, both Hopper forms at 8192 tokens too), then bench.sh
# with ws64 (next_call.sh as of e482d83).
bash scripts/gpu/next_call.sh attn
FORM=ws64 bash scripts/gpu/next_call.sh sm90-bench
