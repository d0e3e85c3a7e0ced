#!/usr/bin/env bash
# Session 35 call 1 (binaries of fb74bdb: the prompt LoRA pair lora_shrink_pf* + lora_expand_pf): the `prompt`
# round of scripts/gpu/next_call.sh (as of this commit).
bin=.gpu-bin-serve; bash scripts/gpu/next_call.sh prompt
