#!/usr/bin/env bash
# The serving benchmark on one GPU, in one call of under 10 minutes: copy bandwidth (PyTorch, 2 GiB
# device-to-device) and GEMM rate (cuBLAS bf16 8192^3), scripts/gpu/bench.py (Mistral-7B-shaped dummy
# model, 1000 random adapters, TTFT, cold loads alone and under load, base sweep, popularity regimes,
# rooflines), then scripts/gpu/peft_compare.py
# (the same server against transformers + peft: 128 streams, 8 adapters, 512-token prompts, 256 new
# tokens), then the issue's targets table. Binaries come from scripts/gpu/build.sh.
#
#   scripts/gpu/bench.sh LOG_DIR [BIN_DIR]        (BIN_DIR defaults to .gpu-bin)
#
# Everything is appended to LOG_DIR/bench-summary.txt as it is measured (a killed call keeps what it got);
# JSON reports go to LOG_DIR. BENCH_TIMEOUT (default 570) is the seconds the whole script may take (the
# device command is killed at 600); BENCH_PEFT_BUDGET (default 190) of them are kept for peft_compare.py.
# BENCH_TINY=1: a dry run on the CPU (no copy or GEMM measurement; BIN_DIR e.g. target/release).
set -uo pipefail
logs=${1:?usage: scripts/gpu/bench.sh LOG_DIR [BIN_DIR]}
bin=${2:-.gpu-bin}
cd "$(dirname "$0")/../.."
mkdir -p "$logs"
logs=$(cd "$logs" && pwd)
summary=$logs/bench-summary.txt
budget=${BENCH_TIMEOUT:-570}
peft_budget=${BENCH_PEFT_BUDGET:-190}
start=$(date +%s)
elapsed() { echo $(($(date +%s) - start)); }
section() { echo "SECTION $1: $(($(date +%s) - $2))s (bench.sh at $(elapsed)s)" | tee -a "$summary"; }

t=$(date +%s)
. scripts/gpu/env.sh
nvidia-smi >"$logs/nvidia-smi.txt" 2>&1
copy= gemm= gemm_burst=
if [ "${BENCH_TINY:-}" != 1 ]; then
    # The copy bandwidth, which every memory roofline uses.
    copy=$(python3 - <<'PY'
import torch
a = torch.empty(2 << 30, dtype=torch.uint8, device=0)
b = torch.empty_like(a)
for _ in range(3):
    b.copy_(a)
times = []
for _ in range(20):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record(); b.copy_(a); e.record(); e.synchronize()
    times.append(s.elapsed_time(e))
print(f"{2 * a.numel() / sorted(times)[10] / 1e6:.0f}")
PY
)
    # cuBLAS's bf16 GEMM rate at 8192^3 (scripts/gpu/gemm_rate.py), each from an idle GPU: in the TTFT test's
    # pattern (reported beside the target), and in a burst of 10 products, the highest rate measured, which
    # the compute rooflines use. Values that are not whole numbers are dropped (790 is then assumed).
    read -r gemm gemm_burst <<<"$(python3 scripts/gpu/gemm_rate.py --roofline)"
    [[ $gemm =~ ^[0-9]+$ && $gemm -gt 0 && $gemm_burst =~ ^[0-9]+$ && $gemm_burst -gt 0 ]] || gemm= gemm_burst=
fi
echo "copy bandwidth: ${copy:-not measured, 4200 assumed} GB/s (2 GiB, read + written, median of 20)" | tee -a "$summary"
echo "GEMM rate (cuBLAS bf16, 8192^3): a burst of 10 from idle ${gemm_burst:-not measured, 790 assumed} TFLOP/s" \
    "(the compute rooflines' rate); in the TTFT test's pattern from idle ${gemm:-not measured} TFLOP/s" | tee -a "$summary"
# The host's CPU, and one core's speed at plain Python (a loop of 5 million additions, best of 3): the
# transformers + peft baseline is a Python loop launching many small kernels a step, so its rate, and the
# ratio against it, follows the host's CPU (279-583 tok/s on H100 hosts over sessions 20-29).
echo "host CPU: $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores;" \
    "python loop $(python3 -c 'import time
def f():
    t = time.perf_counter(); s = 0
    for i in range(5_000_000): s += i
    return time.perf_counter() - t
print(f"{min(f() for _ in range(3)) * 1e3:.0f}")') ms (5M additions, best of 3)" | tee -a "$summary"
section "setup, copy bandwidth and GEMM rate" "$t"

# bench.py skips or cuts runs so as to have stopped its server by BENCH_DEADLINE; `timeout` is the
# backstop (on SIGTERM bench.py still stops the server; SIGKILL 20 s later).
t=$(date +%s)
bench_s=$((budget - peft_budget - $(elapsed)))
BENCH_COPY_GBS=${copy:-} BENCH_GEMM_TFLOPS=${gemm:-790} BENCH_GEMM_BURST_TFLOPS=${gemm_burst:-} BENCH_DEADLINE=$((start + budget - peft_budget)) \
    timeout -k 20 "$((bench_s + 10))" python3 scripts/gpu/bench.py "$bin" "$logs"
echo "bench.py exit status $?" | tee -a "$summary"
# A server left behind (bench.py killed) would hold the GPU memory peft needs.
if [ -f /tmp/lorax-bench/launcher.pid ]; then
    pid=$(cat /tmp/lorax-bench/launcher.pid)
    if kill -0 "$pid" 2>/dev/null; then
        echo "stopping the server bench.py left (pid $pid)" | tee -a "$summary"
        kill -TERM -- "-$pid" 2>/dev/null
        sleep 10
        kill -KILL -- "-$pid" 2>/dev/null
    fi
    rm -f /tmp/lorax-bench/launcher.pid
fi
section "bench.py" "$t"

t=$(date +%s)
peft_s=$((budget - $(elapsed) - 10))
if [ "${BENCH_PEFT:-1}" = 0 ]; then
    echo "peft_compare.py SKIPPED: BENCH_PEFT=0" | tee -a "$summary"
elif [ "$peft_s" -gt 60 ]; then
    timeout -k 10 "$peft_s" python3 scripts/gpu/peft_compare.py "$bin" "$logs" 2>&1 | tee -a "$summary"
    echo "peft_compare.py exit status ${PIPESTATUS[0]}" | tee -a "$summary"
else
    echo "peft_compare.py SKIPPED: ${peft_s}s left" | tee -a "$summary"
fi
section "peft_compare.py" "$t"

# Decode steps the shard logged as slow (over twice the typical step; crates/shard/src/slow.rs), by how
# they ran, and the last few of each server; then the router's slow handlings of a step's results (3 ms or
# more and over half the shard call: tokens to their streams, retirements, the FilterBatch call).
for log in "$logs/bench-server.log" "$logs/peft-compare-server.log"; do
    [ -f "$log" ] || continue
    {
        # The start-up decode warm-up (crates/shard/src/service.rs warm_decode_steps).
        sed 's/\x1b\[[0-9;]*m//g' "$log" | grep "decode steps warmed up\|decode steps' warm-up failed" | cut -c1-200
        # Lines logged, and the steps over the log's 10 a second (unlogged_before) beside them.
        echo "slow decode steps in $(basename "$log"): $(grep -c 'slow decode step' "$log") logged, and" \
            "$(grep 'slow decode step' "$log" | grep -o 'unlogged_before=[0-9]*' | awk -F= '{s += $2} END {print s + 0}') not"
        sed 's/\x1b\[[0-9;]*m//g' "$log" | grep 'slow decode step' | grep -o 'how="[^"]*"' | sort | uniq -c
        sed 's/\x1b\[[0-9;]*m//g' "$log" | grep 'slow decode step' | tail -12 | cut -c1-240
        echo "slow step handling in the router, $(basename "$log"): $(grep -c 'slow step handling' "$log") logged, and" \
            "$(grep 'slow step handling' "$log" | grep -o 'unlogged_before=[0-9]*' | awk -F= '{s += $2} END {print s + 0}') not"
        # Those whose thread had the CPU for under half of the handling before the filter call (cpu_ms against
        # ms - filter_ms; session 30), and those the kernel took the CPU from (involuntary_switches > 0): both
        # together mean the thread waited for a core, little CPU time alone that it blocked.
        sed 's/\x1b\[[0-9;]*m//g' "$log" | grep 'slow step handling' |
            grep -o ' ms="[0-9.]*".*involuntary_switches=[0-9]*' | tr -d '"' |
            awk '{for (i = 1; i <= NF; i++) {split($i, kv, "="); v[kv[1]] = kv[2]}
                n++; if (v["cpu_ms"] < (v["ms"] - v["filter_ms"]) / 2) w++; if (v["involuntary_switches"] > 0) s++}
                END {if (n) print "  of them " w + 0 " of " n " with the CPU for under half the time before the filter call, " s + 0 " with involuntary switches"}'
        sed 's/\x1b\[[0-9;]*m//g' "$log" | grep 'slow step handling' | tail -8 | cut -c1-320
    } | tee -a "$summary"
done

echo | tee -a "$summary"
echo "== the benchmark issue's targets, measured in this run" | tee -a "$summary"
python3 scripts/gpu/bench.py --summary "$logs"
section "total" "$start"
