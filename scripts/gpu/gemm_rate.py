#!/usr/bin/env python3
"""cuBLAS bf16 GEMM rates on this GPU, in a burst and under load, with the SM clock beside them.

    python3 scripts/gpu/gemm_rate.py [SECONDS]     burst, TTFT pattern and sustained rates, with clocks
    python3 scripts/gpu/gemm_rate.py --roofline    "PATTERN BURST" at 8192^3, whole TFLOP/s (bench.sh)

The H200's 700 W power cap lowers the SM clock within the first tens of milliseconds of load (bench/NOTES.md
sessions 21-22), so one GEMM rate does not fit every test. For 8192^3 and for a 1000-token prompt's gate/up
product (1000 x 4096 x 28672) this prints, each from an idle GPU (2 s of rest): the rate of a burst of 10
products; the rate in the serving benchmark's TTFT pattern (9 rounds of about 23 ms of products, 2 ms
apart, as its 9 prompts of 1000 tokens run one after another); and the rate over consecutive quarter-second
windows of back-to-back products for SECONDS (default 3), with the SM clock and power that NVML reports at
each window's end. `--roofline` measures only the first two at 8192^3: bench.sh's compute roofline takes
the pattern's rate and reports the burst's beside it. Needs PyTorch with CUDA (the GPU machine's python3).
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


class Gemm:
    """Products of two random bf16 matrices, m x k by k x n."""

    def __init__(self, m, k, n):
        self.a = torch.randn(m, k, dtype=torch.bfloat16, device=0)
        self.b = torch.randn(k, n, dtype=torch.bfloat16, device=0)
        self.flops = 2 * m * k * n
        self.name = f"{m}x{k}x{n}"
        for _ in range(3):
            torch.matmul(self.a, self.b)
        torch.cuda.synchronize()

    def seconds(self, count):
        """Device time of `count` products enqueued at once (CUDA events)."""
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(count):
            torch.matmul(self.a, self.b)
        e.record()
        e.synchronize()
        return s.elapsed_time(e) * 1e-3

    def tflops(self, count, seconds):
        return count * self.flops / seconds / 1e12

    def burst(self):
        """10 products from an idle GPU."""
        time.sleep(2)
        return self.tflops(10, self.seconds(10))

    def ttft_pattern(self, burst):
        """9 rounds of about 23 ms of products (sized at the burst rate), 2 ms apart, from an idle GPU."""
        per = max(1, round(0.023 * burst * 1e12 / self.flops))
        time.sleep(2)
        busy = 0.0
        for _ in range(9):
            busy += self.seconds(per)
            time.sleep(0.002)
        return self.tflops(9 * per, busy)

    def sustained(self, seconds):
        """Quarter-second windows of back-to-back products for `seconds`, printed with clock and power."""
        time.sleep(2)
        end = time.time() + seconds
        window = []
        while time.time() < end:
            busy, count, t0 = 0.0, 0, time.time()
            while time.time() - t0 < 0.25:
                busy += self.seconds(8)
                count += 8
            clock, power = smi()
            window.append(self.tflops(count, busy))
            print(f"  sustained window {len(window)}: {window[-1]:.0f} TFLOP/s, SM {clock} MHz, {power} W")
        tail = window[len(window) // 2:]
        return sum(tail) / len(tail), len(tail)


def report(m, k, n, seconds):
    g = Gemm(m, k, n)
    burst = g.burst()
    print(f"GEMM {g.name}: burst of 10 from idle {burst:.0f} TFLOP/s (clock after: {smi()[0]} MHz)")
    pattern = g.ttft_pattern(burst)
    print(f"GEMM {g.name}: TTFT pattern from idle {pattern:.0f} TFLOP/s (clock after: {smi()[0]} MHz)")
    rate, windows = g.sustained(seconds)
    print(f"GEMM {g.name}: sustained {rate:.0f} TFLOP/s (mean of the last {windows} windows)")


if __name__ == "__main__":
    if sys.argv[1:] == ["--roofline"]:
        g = Gemm(8192, 8192, 8192)
        burst = g.burst()
        print(f"{g.ttft_pattern(burst):.0f} {burst:.0f}")
        sys.exit(0)
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    print(f"{torch.cuda.get_device_name(0)}; idle SM clock {smi()[0]} MHz")
    report(8192, 8192, 8192, seconds)
    report(1000, 4096, 28672, seconds)
