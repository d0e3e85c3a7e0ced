"""Whether a decode-sized base GEMM leaves room for a small product beside it on a second stream.

Times, through CUDA graphs of 200 repetitions (PyTorch's cuBLAS, bf16): the q/k/v-shaped product
[rows, 4096] x [4096, 6144] and the o-shaped [rows, 4096] x [4096, 4096] alone; a LoRA-shrink-sized product
[rows, 4096] x [4096, width] alone; and both at once, the small one on a second stream forked from and joined
to the first in each repetition. Prints one PROBE line per case (µs per repetition).

    python3 scripts/gpu/overlap_probe.py [ROWS ...]
"""
import sys

import torch


def timed(fn, reps=200):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    best = None
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        us = a.elapsed_time(b) * 1e3 / reps
        best = us if best is None else min(best, us)
    return best


def main():
    rows_list = [int(r) for r in sys.argv[1:]] or [128, 64]
    dev = torch.device("cuda")
    side = torch.cuda.Stream()
    for rows in rows_list:
        x = torch.randn(rows, 4096, device=dev, dtype=torch.bfloat16)
        for name, n in (("qkv", 6144), ("o", 4096)):
            w = torch.randn(4096, n, device=dev, dtype=torch.bfloat16)
            for width in (48 * 8, 48 * 32, 48 * 128):
                a = torch.randn(4096, width, device=dev, dtype=torch.bfloat16)
                y = torch.empty(rows, n, device=dev, dtype=torch.bfloat16)
                t = torch.empty(rows, width, device=dev, dtype=torch.bfloat16)

                def big():
                    torch.mm(x, w, out=y)

                def small():
                    torch.mm(x, a, out=t)

                def serial():
                    big()
                    small()

                def both():
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        small()
                    big()
                    torch.cuda.current_stream().wait_stream(side)

                tb, ts, tser, tboth = timed(big), timed(small), timed(serial), timed(both)
                print(f"PROBE rows {rows} {name} n {n} small width {width}: big {tb:.1f} us, small {ts:.1f}, "
                      f"serial {tser:.1f}, overlapped {tboth:.1f} (saves {tser - tboth:.1f})", flush=True)


if __name__ == "__main__":
    main()
