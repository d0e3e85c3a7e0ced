#!/usr/bin/env bash
# Where a step's device time goes between kernels, from an Nsight Systems timeline (nsys), on the GPU machine:
#   scripts/gpu/timeline.sh OUT_DIR BIN_DIR [SCENARIO ...]
# Unlike kernel_profile.sh (ncu, which serialises kernels and times each alone), this keeps the step as the
# server runs it: decode steps through CUDA graphs (`LORAX_PROFILE_GRAPHS=1`, each graph node traced) with
# programmatic dependent launch, 32 layers. Each scenario (default: b128 b128-identical; see
# `decode_step_kernels_for_a_profiler` in crates/engine/tests/cuda_graphs.rs; a `p<len>` scenario runs eager
# prompt steps) is run for LORAX_PROFILE_STEPS (default 3) profiled steps; OUT_DIR/timeline.txt takes that
# many last stretches of device work (split where the device idles over 200 us: the host between steps) and
# lists per kernel name its launches, its time on the device and the idle time just before it, per step.
set -uo pipefail
out=${1:?OUT_DIR}
bin=${2:?BIN_DIR}
shift 2
scenarios=${*:-b128 b128-identical}
. scripts/gpu/env.sh
mkdir -p "$out"
nsys=$(command -v nsys || ls /opt/nvidia/nsight-systems/*/bin/nsys /usr/local/cuda/bin/nsys /usr/local/cuda/nsight-systems*/bin/nsys 2>/dev/null | head -1)
if [ -z "$nsys" ]; then
    echo "SKIPPED: no nsys on this machine" | tee "$out/timeline.txt"
    exit 0
fi
export LORAX_PROFILE_STEPS=${LORAX_PROFILE_STEPS:-3} LORAX_PROFILE_LAYERS=${LORAX_PROFILE_LAYERS:-32} LORAX_PROFILE_GRAPHS=1
for s in $scenarios; do
    # The whole run is traced (the graphs' capture included, so that their nodes are known); the summary
    # keeps the last LORAX_PROFILE_STEPS steps.
    LORAX_PROFILE_SCENARIO=$s timeout 150 "$nsys" profile --trace=cuda --cuda-graph-trace=node \
        --force-overwrite=true -o "$out/$s" \
        "$bin/cuda_graphs" --ignored --exact decode_step_kernels_for_a_profiler --nocapture --test-threads 1 \
        >"$out/nsys-$s.log" 2>&1
    echo "$s: nsys profile exit $?"
    # The report's name before nsys 2023 was gputrace.
    for report in cuda_gpu_trace gputrace; do
        timeout 120 "$nsys" stats --report $report --format csv --force-export=true --output "$out/$s" \
            "$out/$s.nsys-rep" >>"$out/stats-$s.log" 2>&1
        ls "$out/${s}_"*trace*.csv >/dev/null 2>&1 && break
    done
    echo "$s: nsys stats: $(ls "$out/${s}_"*trace*.csv 2>/dev/null | head -1)"
done
python3 scripts/gpu/timeline_summary.py "$out" "$LORAX_PROFILE_STEPS" $scenarios | tee "$out/timeline.txt"
