# Session 25 call 1: scripts/gpu/next_call.sh as of commit bdc882f (`git show bdc882f:scripts/gpu/next_call.sh`),
# run from the repository root as
#   bash scripts/gpu/next_call.sh bench
# with .gpu-bin-serve carried, built by scripts/gpu/build.sh at 132401a.
