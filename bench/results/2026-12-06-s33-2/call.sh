#!/usr/bin/env bash
# Session 33 call 2 (the same warm H100 right after call 1; binaries of e1b292a: streams wait for their
# adapter before their headers, alternatives decoded in context, NaN/Inf adapter weights refused at parse;
# ix expand, the default): `bash scripts/gpu/next_call.sh round` (next_call.sh of 0f38ae6): run.sh graphs
# (5 passed) and e2e (passed), then bench.sh (complete, 214 s).
bash scripts/gpu/next_call.sh round
