#!/usr/bin/env bash
# The serving benchmark on one GPU, in one call: copy bandwidth (PyTorch, 2 GiB device-to-device), then
# scripts/gpu/bench.py (Mistral-7B-shaped dummy model, 1000 random adapters, lorax-bench runs, rooflines).
# Binaries come from scripts/gpu/build.sh.
#
#   scripts/gpu/bench.sh LOG_DIR [BIN_DIR]        (BIN_DIR defaults to .gpu-bin)
set -uo pipefail
logs=${1:?usage: scripts/gpu/bench.sh LOG_DIR [BIN_DIR]}
bin=${2:-.gpu-bin}
cd "$(dirname "$0")/../.."
mkdir -p "$logs"
logs=$(cd "$logs" && pwd)
. scripts/gpu/env.sh
nvidia-smi >"$logs/nvidia-smi.txt" 2>&1
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
echo "copy bandwidth: ${copy} GB/s (2 GiB, read + written, median of 20)" | tee "$logs/bench-summary.txt"
BENCH_COPY_GBS=${copy:-4200} timeout "${BENCH_TIMEOUT:-560}" python3 scripts/gpu/bench.py "$bin" "$logs"
