"""Whether a decode-sized GEMM runs faster as pieces on concurrent streams.

y[rows, n] = x[rows, k] . w[n, k]^T (bf16, PyTorch's cuBLAS; our engine's layout), timed through CUDA graphs of
200 repetitions: whole, and as `parts` products of n / parts output features each, every piece on its own stream
(forked from and joined to the first in each repetition), and the same pieces one after another. Prints one
SPLIT line per case (µs per repetition, the best of 5 replays).

    python3 scripts/gpu/split_probe.py [ROWS ...]
"""
import sys

import torch

from overlap_probe import timed  # the same timing through CUDA graphs

SHAPES = (("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336))


def main():
    rows_list = [int(r) for r in sys.argv[1:]] or [128, 64, 32]
    dev = torch.device("cuda")
    streams = [torch.cuda.Stream() for _ in range(4)]
    for rows in rows_list:
        x = torch.randn(rows, 4096 * 4, device=dev, dtype=torch.bfloat16)
        for name, n, k in SHAPES:
            xk = x[:, :k].contiguous()
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.01
            y = torch.empty(rows, n, device=dev, dtype=torch.bfloat16)

            def whole():
                torch.mm(xk, w.t(), out=y)

            base = timed(whole)
            line = [f"SPLIT rows {rows} {name} n {n} k {k} ({n * k * 2 / 1e6:.0f} MB): whole {base:.1f} us "
                    f"({n * k * 2 / base / 1e6:.2f} TB/s)"]
            for parts in (2, 3, 4):
                if n % (parts * 64):
                    continue
                step = n // parts
                ws = [w[i * step:(i + 1) * step] for i in range(parts)]
                ys = [torch.empty(rows, step, device=dev, dtype=torch.bfloat16) for _ in range(parts)]

                def concurrent():
                    main_s = torch.cuda.current_stream()
                    for i in range(1, parts):
                        streams[i].wait_stream(main_s)
                        with torch.cuda.stream(streams[i]):
                            torch.mm(xk, ws[i].t(), out=ys[i])
                    torch.mm(xk, ws[0].t(), out=ys[0])
                    for i in range(1, parts):
                        main_s.wait_stream(streams[i])

                def serial():
                    for i in range(parts):
                        torch.mm(xk, ws[i].t(), out=ys[i])

                line.append(f"{parts} pieces concurrent {timed(concurrent):.1f} / serial {timed(serial):.1f}")
            print("; ".join(line), flush=True)


if __name__ == "__main__":
    main()
