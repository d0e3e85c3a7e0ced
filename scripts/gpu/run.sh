#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root: every CUDA test binary, the kernel benchmarks and an
# end-to-end HTTP test through the launcher on the CUDA backend, in one go. Binaries come from
# scripts/gpu/build.sh (built where Rust is; that machine has none).
#
#   scripts/gpu/run.sh LOG_DIR [BIN_DIR]      (BIN_DIR defaults to .gpu-bin)
#
# Full logs go to LOG_DIR (one file per step); a short table of steps and benchmark numbers is printed
# last. Exit status: non-zero when any step failed. RUN_SKIP="nvrtc sampling" leaves those steps out (CI
# compiles every kernel with NVRTC already; a short device call can spend its minutes elsewhere).
set -uo pipefail
logs=${1:?usage: scripts/gpu/run.sh LOG_DIR [BIN_DIR]}
bin=${2:-.gpu-bin}
cd "$(dirname "$0")/../.."
mkdir -p "$logs"
. scripts/gpu/env.sh

{ nvidia-smi; nvidia-smi -q -d CLOCK; } >"$logs/nvidia-smi.txt" 2>&1

summary=()
failed=0
step() {
    local name=$1
    shift
    if [[ " ${RUN_SKIP:-} " == *" $name "* ]]; then
        summary+=("$(printf '%-8s skipped (RUN_SKIP)' "$name")")
        : >"$logs/$name.log"
        return
    fi
    local t0=$SECONDS
    "$@" >"$logs/$name.log" 2>&1
    local rc=$?
    local counts
    counts=$(grep -E "^test result:" "$logs/$name.log" | awk '{p+=$4; f+=$6; i+=$8} END {if (NR) printf "%d passed, %d failed, %d ignored", p, f, i}')
    local skipped
    skipped=$(grep -c "SKIPPED" "$logs/$name.log")
    [ "$rc" -ne 0 ] && failed=1
    summary+=("$(printf '%-8s %-4s %4ss  %s%s' "$name" "$([ "$rc" -eq 0 ] && echo ok || echo FAIL)" "$((SECONDS - t0))" "${counts:-}" "$([ "$skipped" -gt 0 ] && echo ", $skipped SKIPPED")")")
}

step nvrtc "$bin/cuda_nvrtc" --test-threads=1
step kernels "$bin/cuda_kernels" --test-threads=2
step golden "$bin/cuda_golden" --test-threads=2
step graphs "$bin/cuda_graphs" --include-ignored --test-threads=1 --nocapture
step adapters "$bin/cuda_adapters" --test-threads=1 --nocapture
step chunked "$bin/cuda_chunked" --test-threads=1
step sampling "$bin/cuda_sampling" --include-ignored --test-threads=1
step bench "$bin/cuda_bench" --ignored --test-threads=1
step e2e python3 scripts/gpu/e2e.py "$bin" "$logs"

echo
echo "== failures (first lines) =="
grep -hE "panicked|FAILED|^E2E.*FAIL|error" "$logs"/{nvrtc,kernels,golden,graphs,adapters,chunked,sampling,bench,e2e}.log | head -20
echo
echo "== measured checks =="
grep -hE "^(llama|mistral|qwen2) logits|^adapter |^peft mixed" "$logs/golden.log" | cut -c1-150
grep -hE "^E2E" "$logs/e2e.log"
grep -hE "total: Tally" "$logs/sampling.log"
grep -hE "rel err" "$logs/kernels.log" | sort -t: -k2 | awk '{print}' | sort -k6 -g -r 2>/dev/null | head -5
echo
echo "== benchmarks ($(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)) =="
grep -h "BENCH" "$logs/bench.log" "$logs/graphs.log" "$logs/adapters.log" "$logs/sampling.log" | sed 's/^.*BENCH //' | cut -c1-170
echo
echo "== steps (logs in $logs) =="
printf '%s\n' "${summary[@]}"
exit $failed
