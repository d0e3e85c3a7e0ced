#!/usr/bin/env bash
# The two-GPU tensor-parallel round, in one call on a machine with two GPUs (device kind nvidia-h200-x2):
# copy bandwidth of each GPU (PyTorch, 2 GiB device-to-device, bytes read + written), the cuda_tp test
# binary (dummy weights on the device == host, NCCL sums, TP=2 == TP=1 on a small dummy model), then
# scripts/gpu/tp.py: TP=2 vs TP=1 agreement on a Mistral-7B-shaped dummy model with random adapters, and
# the decode throughput of a Llama-3-70B-shaped dummy model on two GPUs against the memory roofline.
# Binaries come from scripts/gpu/build.sh (the GPU machine has no Rust toolchain).
#
#   scripts/gpu/tp.sh LOG_DIR [BIN_DIR]        (BIN_DIR defaults to .gpu-bin)
#
# Logs go to LOG_DIR; the summary (tp-summary.txt) is printed last. Non-zero exit if a step failed.
set -uo pipefail
logs=${1:?usage: scripts/gpu/tp.sh LOG_DIR [BIN_DIR]}
bin=${2:-.gpu-bin}
cd "$(dirname "$0")/../.."
mkdir -p "$logs"
logs=$(cd "$logs" && pwd)
. scripts/gpu/env.sh

{ nvidia-smi; nvidia-smi topo -m; ldconfig -p | grep -i nccl; } >"$logs/nvidia-smi.txt" 2>&1
failed=0

python3 - >"$logs/copy-bandwidth.log" 2>&1 <<'PY'
import torch
for dev in range(torch.cuda.device_count()):
    a = torch.empty(2 << 30, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(torch.cuda.current_stream(dev))
        b.copy_(a)
        e.record(torch.cuda.current_stream(dev))
        e.synchronize()
        times.append(s.elapsed_time(e))
    ms = sorted(times)[len(times) // 2]
    print(f"COPY cuda:{dev} {2 * a.numel() / ms / 1e6:.0f} GB/s (2 GiB, read + written, median of 20)")
    del a, b
    torch.cuda.empty_cache()
PY
cat "$logs/copy-bandwidth.log"
copy=$(grep -oE 'COPY cuda:[0-9]+ [0-9]+' "$logs/copy-bandwidth.log" | awk '{print $3}' | sort -n | head -1)

timeout 150 "$bin/cuda_tp" --test-threads=1 >"$logs/cuda_tp.log" 2>&1 || failed=1
grep -hE "SKIPPED|dummy weights|nccl all-reduce|TP=2 \(NCCL\)|test result|panicked" "$logs/cuda_tp.log"

TP_SAMPLING=${TP_SAMPLING:-device,host} TP_COPY_GBS=${copy:-0} timeout 400 python3 scripts/gpu/tp.py "$bin" "$logs" >"$logs/tp.log" 2>&1 || failed=1
echo
echo "== tp.py (full log $logs/tp.log) =="
grep -E "^TP .*(SUMMARY|FAIL|up in|memory|batch)" "$logs/tp.log" || tail -20 "$logs/tp.log"
grep -hE "NCCL group joined|panicked|ERROR" "$logs"/tp-server-*.log 2>/dev/null | cut -c1-200 | sort | uniq -c | head -10
exit $failed
