# Session 26 call 2: scripts/gpu/next_call.sh as of commit 47032aa (`git show 47032aa:scripts/gpu/next_call.sh`),
# run from the repository root on an NVIDIA H100 (nvidia-h100-x1; no H200 could be started) as
#   bash scripts/gpu/next_call.sh bench
# with .gpu-bin-serve carried, built by scripts/gpu/build.sh at 8b116f8.
