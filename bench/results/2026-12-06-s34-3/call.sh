#!/usr/bin/env bash
# Session 34 calls 3 and 4 (one H100, warm between them; asked as nvidia-h200 after an nvidia-h100-x1 start
# failed; binaries of 9ee9c5d: rope_kv_write_lora, second form (a row over 4 blocks of 128 threads, the
# pairs looked up before the wait, B loads of a rotated pair together), on by default).
# Call 3: `bash scripts/gpu/next_call.sh lora-rope` (next_call.sh of 9ee9c5d with the kernel tests filtered to
# `lora_step rope`): cuda_kernels 3 passed (lora_step_matches_cpu: the fused kernel equals lora_layer then
# rope_kv_write value for value in bf16, f16, f32); steps on / off (steps32.txt), two rounds; run.sh with
# LORAX_CUDA_ATTN_ROPE=0: golden 8 passed, graphs 5 passed, e2e passed. 247 s.
# Medians of steps 1-5 (ms), on / off: b128-identical 10.44 / 10.07 and 10.32 / 9.99; b128-distinct
# 11.61 / 11.41 and 11.52 / 11.22; b64-a8 8.40 / 8.24 and 8.36 / 8.17; b32-a8 (control) 7.06 / 7.07 and
# 7.15 / 7.19. Slower.
bash scripts/gpu/next_call.sh lora-rope
# Call 4 (18 s): ncu kernel times of 2-layer eager steps, on and off (kernel-profile-on.txt, -off.txt):
bin=.gpu-bin-serve; . scripts/gpu/call_prelude.sh
LORAX_PROFILE_DETAIL="" timeout 150 scripts/gpu/kernel_profile.sh "$R/ncu-on" "$bin" b128-identical b128-distinct >"$R/ncu-on.txt" 2>&1
LORAX_CUDA_LORA_ROPE=0 LORAX_PROFILE_DETAIL="" timeout 150 scripts/gpu/kernel_profile.sh "$R/ncu-off" "$bin" b128-identical b128-distinct >"$R/ncu-off.txt" 2>&1
# rope_kv_write_lora 17.1 us (one adapter) and 23.4 us (128 distinct) a layer, against bgmv_expand_ix + rope_kv_write
# 7.46 + 5.36 = 12.8 us and 15.94 + 5.37 = 21.3 us.
