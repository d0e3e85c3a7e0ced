#!/usr/bin/env bash
# Session 35 call 2 (binaries of d1f434b: the prompt pair's expand loading its partials 32 at a time, t as
# hi + lo, the shrink's chunks for two blocks a multiprocessor): the `prompt` round of scripts/gpu/next_call.sh.
bin=.gpu-bin-serve; bash scripts/gpu/next_call.sh prompt
