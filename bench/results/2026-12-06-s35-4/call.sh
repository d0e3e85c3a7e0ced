#!/usr/bin/env bash
# Session 35 call 4 (binaries of the commit that adds this file: the prompt expand in two passes of 64 columns
# a warp, 122 registers, pairs rounded by pack_f; the shrink's first A vectors before pdl_wait): the `prompt`
# round of scripts/gpu/next_call.sh.
bin=.gpu-bin-serve; bash scripts/gpu/next_call.sh prompt
