#!/usr/bin/env python3
"""cuBLAS bf16 GEMM rates on this GPU, in a burst and sustained, with the SM clock beside them.

    python3 scripts/gpu/gemm_rate.py [SECONDS]

Until session 22 the serving benchmark's compute roofline divided a step's FLOPs by a fixed 790 TFLOP/s
(cuBLAS at 8192^3, measured in early sessions over a few repetitions); bench.sh now measures the rate in
the same run (in the TTFT test's pattern from idle, and in a burst). Under sustained load the H200's 700 W
power cap lowers the SM clock (bench/NOTES.md session 21 call 4), so this prints, for 8192^3 and for a 1000-token prompt's
gate/up product (1000 x 4096 x 28672), the rate of a burst of 10 products from an idle GPU and then the
rate over consecutive quarter-second windows of back-to-back products for SECONDS (default 3), with the
SM clock and power that NVML reports at each window's end. Needs PyTorch with CUDA (the GPU machine's python3).
"""

import subprocess
import sys
import time

import torch


def smi():
    """The SM clock (MHz) and power draw (W) nvidia-smi reports now."""
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, check=False,
    ).stdout.strip().split(",")
    return out[0].strip(), out[-1].strip()


def rate(m, k, n, seconds):
    a = torch.randn(m, k, dtype=torch.bfloat16, device=0)
    b = torch.randn(k, n, dtype=torch.bfloat16, device=0)
    flops = 2 * m * k * n
    torch.matmul(a, b)
    torch.cuda.synchronize()
    time.sleep(2)  # let the clock recover from the allocation and warm-up
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(10):
        torch.matmul(a, b)
    e.record()
    e.synchronize()
    burst = 10 * flops / (s.elapsed_time(e) * 1e-3) / 1e12
    print(f"GEMM {m}x{k}x{n}: burst of 10 from idle {burst:.0f} TFLOP/s (clock after: {smi()[0]} MHz)")
    end = time.time() + seconds
    window = []
    while time.time() < end:
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        n_ops = 0
        t0 = time.time()
        while time.time() - t0 < 0.25:
            for _ in range(8):
                torch.matmul(a, b)
            n_ops += 8
            torch.cuda.synchronize()
        e.record()
        e.synchronize()
        tf = n_ops * flops / (s.elapsed_time(e) * 1e-3) / 1e12
        clock, power = smi()
        window.append(tf)
        print(f"  sustained window {len(window)}: {tf:.0f} TFLOP/s, SM {clock} MHz, {power} W")
    tail = window[len(window) // 2:]
    print(f"GEMM {m}x{k}x{n}: sustained {sum(tail) / len(tail):.0f} TFLOP/s (mean of the last {len(tail)} windows)")
    time.sleep(2)


if __name__ == "__main__":
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    print(f"{torch.cuda.get_device_name(0)}; idle SM clock {smi()[0]} MHz")
    rate(8192, 8192, 8192, seconds)
    rate(1000, 4096, 28672, seconds)
