# Session 27 call 4, on the same warm NVIDIA H100 right after call 3, binaries of e774e4a (.gpu-bin-serve), from the
# repository root (the `profile` part of next_call.sh at e774e4a, without p1000 and the detail pass):
bin=.gpu-bin-serve; . scripts/gpu/call_prelude.sh
LORAX_PROFILE_DETAIL= timeout 200 scripts/gpu/kernel_profile.sh "$R/ncu" "$bin" m64x8 m64x8-a8 > "$R/ncu.txt" 2>&1; lap ncu
profile_step m64x8 eager; profile_step m64x8-a8 eager; lap steps
