#!/usr/bin/env bash
# Session 33 call 3 (the same warm H100 right after call 2, same binaries and script): a second sample of
# `bash scripts/gpu/next_call.sh round`: graphs (5 passed), e2e (passed), bench.sh (complete).
bash scripts/gpu/next_call.sh round
