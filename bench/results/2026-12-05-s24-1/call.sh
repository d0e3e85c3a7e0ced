# Session 24 call 1: scripts/gpu/next_call.sh as of commit 53f08a2 (`git show 53f08a2:scripts/gpu/next_call.sh`),
# run from the repository root as
#   bash scripts/gpu/next_call.sh bench
# with .gpu-bin-serve carried, built by scripts/gpu/build.sh at 8e08148.
