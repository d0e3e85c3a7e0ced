# Sourced first by a device call's script (bench/results/*/call.sh), from the repository root, with $bin
# set to the carried binaries folder (.gpu-bin-serve): sets up the environment (env.sh), makes $R under
# the device tool's $OUT, keeps $OUT/all.tgz current every 15 s (the tool returns only a few files, so
# everything under $R travels in that archive), and defines `lap NAME`, which logs the seconds since start,
# and `profile_step` (below).
# The script should end with `tar -C $OUT -czf $OUT/all.tgz r` for the final state.
. scripts/gpu/env.sh
R=$OUT/r
mkdir -p "$R"
(while sleep 15; do tar -C "$OUT" -czf "$OUT/all.tgz" r 2>/dev/null; done) &
t0=$(date +%s)
lap() { echo "LAP $1 $(($(date +%s) - t0))s" | tee -a "$R/laps.txt"; }
# `profile_step SCENARIO LABEL [VAR=VALUE ...]`: the 32-layer eager decode steps of the profiler scenario
# (cuda_graphs decode_step_kernels_for_a_profiler, 6 steps) with the given environment, their STEP lines
# appended to $R/steps32.txt under "== SCENARIO LABEL".
profile_step() {
    local x=$1 l=$2
    shift 2
    echo "== $x $l" >>"$R/steps32.txt"
    env "$@" LORAX_PROFILE_LAYERS=32 LORAX_PROFILE_STEPS=6 LORAX_PROFILE_SCENARIO="$x" timeout 150 \
        "$bin/cuda_graphs" --ignored --exact decode_step_kernels_for_a_profiler --nocapture 2>&1 |
        grep -E "STEP|MARKS|PROFILED|panick|rror" >>"$R/steps32.txt"
    echo "rc ${PIPESTATUS[0]}" >>"$R/steps32.txt"
}
