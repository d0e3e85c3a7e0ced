# Sourced first by a device call's script (bench/results/*/call.sh), from the repository root, with $bin
# set to the carried binaries folder (.gpu-bin-serve): sets up the environment (env.sh), makes $R under
# the device tool's $OUT, keeps $OUT/all.tgz current every 15 s (the tool returns only a few files, so
# everything under $R travels in that archive), and defines `lap NAME`, which logs the seconds since start.
# The script should end with `tar -C $OUT -czf $OUT/all.tgz r` for the final state.
. scripts/gpu/env.sh
R=$OUT/r
mkdir -p "$R"
(while sleep 15; do tar -C "$OUT" -czf "$OUT/all.tgz" r 2>/dev/null; done) &
t0=$(date +%s)
lap() { echo "LAP $1 $(($(date +%s) - t0))s" | tee -a "$R/laps.txt"; }
