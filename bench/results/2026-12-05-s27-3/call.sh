# Session 27 call 3: scripts/gpu/next_call.sh as of commit e774e4a (`git show e774e4a:scripts/gpu/next_call.sh`),
# run from the repository root on an NVIDIA H100 (nvidia-h100-x1; no H200 could be started) as
#   bash scripts/gpu/next_call.sh graphs-bench
# with .gpu-bin-serve carried, built by scripts/gpu/build.sh at e774e4a.
