#!/usr/bin/env bash
# Time per kernel of eager decode steps, from Nsight Compute (ncu), on the GPU machine:
#   scripts/gpu/kernel_profile.sh OUT_DIR BIN_DIR [SCENARIO ...]
# Each scenario (default: b1 b128 b128-identical b128-distinct; see `decode_step_kernels_for_a_profiler`
# in crates/engine/tests/cuda_graphs.rs) runs the cuda_graphs test binary under ncu with the clocks and
# caches left alone; OUT_DIR gets each scenario's CSV and one summary (kernel-profile.txt): per kernel
# name, launches and microseconds per step, and its share of the step. LORAX_PROFILE_LAYERS (default 2)
# sets the layers: per-layer kernels then appear that many times per step, the LM head and sampling once.
set -uo pipefail
out=${1:?OUT_DIR}
bin=${2:?BIN_DIR}
shift 2
scenarios=${*:-b1 b128 b128-identical b128-distinct}
. scripts/gpu/env.sh
mkdir -p "$out"
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
if [ -z "$ncu" ]; then
    echo "SKIPPED: no ncu on this machine" | tee "$out/kernel-profile.txt"
    exit 0
fi
export LORAX_PROFILE_STEPS=${LORAX_PROFILE_STEPS:-2}
for s in $scenarios; do
    LORAX_PROFILE_SCENARIO=$s "$ncu" --profile-from-start off --clock-control none --cache-control none \
        --metrics gpu__time_duration.sum --csv --print-units base \
        "$bin/cuda_graphs" --ignored --exact decode_step_kernels_for_a_profiler --nocapture --test-threads 1 \
        >"$out/ncu-$s.csv" 2>"$out/ncu-$s.log"
    echo "$s: ncu exit $? ($(grep -c '^"' "$out/ncu-$s.csv") csv lines)"
done
python3 - "$out" "$LORAX_PROFILE_STEPS" $scenarios <<'PY' | tee "$out/kernel-profile.txt"
import csv, sys
out, steps, scenarios = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
for s in scenarios:
    rows = [l for l in open(f"{out}/ncu-{s}.csv") if l.startswith('"')]
    per = {}
    for r in csv.DictReader(rows):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        name = r["Kernel Name"].split("(")[0][:60]
        key = (name, r["Grid Size"], r["Block Size"])
        n, t = per.get(key, (0, 0.0))
        per[key] = (n + 1, t + float(r["Metric Value"].replace(",", "")))
    total = sum(t for _, t in per.values()) / steps
    print(f"## {s}: {total / 1e3:.1f} us of kernels per step ({sum(n for n, _ in per.values()) / steps:.0f} launches)")
    print(f"{'kernel':60} {'grid':>16} {'block':>12} {'n/step':>6} {'us each':>8} {'us/step':>8} {'share':>6}")
    for (name, grid, block), (n, t) in sorted(per.items(), key=lambda kv: -kv[1][1]):
        print(f"{name:60} {grid:>16} {block:>12} {n / steps:6.1f} {t / n / 1e3:8.2f} {t / steps / 1e3:8.1f} {100 * t / steps / total:5.1f}%")
    print()
PY
# Then the detail of one step per scenario given in LORAX_PROFILE_DETAIL (default b1 b128): each kernel's
# speed-of-light (DRAM and compute throughput), occupancy and launch figures, and where warps stall (warp
# state and scheduler statistics), as ncu prints them.
for s in ${LORAX_PROFILE_DETAIL-b1 b128}; do
    LORAX_PROFILE_STEPS=1 LORAX_PROFILE_SCENARIO=$s "$ncu" --profile-from-start off --clock-control none \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
        --section WarpStateStats --section SchedulerStats \
        "$bin/cuda_graphs" --ignored --exact decode_step_kernels_for_a_profiler --nocapture --test-threads 1 \
        >"$out/ncu-detail-$s.txt" 2>&1
    echo "$s detail: ncu exit $? ($(grep -c 'Duration' "$out/ncu-detail-$s.txt") kernels)"
done
