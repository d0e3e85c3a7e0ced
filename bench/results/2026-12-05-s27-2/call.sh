# Session 27 call 2: scripts/gpu/next_call.sh as of commit 47032aa (`git show 47032aa:scripts/gpu/next_call.sh`),
# run from the repository root on an NVIDIA H200 (nvidia-h200) as
#   bash scripts/gpu/next_call.sh bench
# with .gpu-bin-serve carried, built by scripts/gpu/build.sh at 66ce381.
