"""Whether a prompt's MLP runs faster in row chunks whose gate/up output stays in the L2 cache.

At 1000 prompt rows the Mistral-7B MLP writes a [1000, 28672] bf16 gate/up product (57 MB, more than the L2
cache), which silu_mul then reads back from memory (about 24 us a layer, session 21's profile). In chunks of
500 or 250 rows that product is 29 or 14 MB and may still be in L2 when silu_mul reads it, and the activation
when the down product reads it; the GEMMs run on fewer rows (more waves' tails, weights read once per chunk).

Times through CUDA graphs (overlap_probe.timed, best of 5 replays, us per MLP) the whole MLP (gate/up GEMM,
silu_mul, down GEMM), its GEMMs alone, and silu_mul alone, at each row count whole and in chunks, two rounds
in alternating order. silu_mul is a Triton kernel of the engine's form (one pass: read gate and up, write
silu(gate) * up) when Triton imports, else PyTorch's two kernels (printed). Prints MLP lines.

    python3 scripts/gpu/mlp_chunk_probe.py [ROWS ...]
"""
import sys

import torch

from overlap_probe import timed

HIDDEN, FFN = 4096, 14336

try:
    import triton
    import triton.language as tl

    @triton.jit
    def _silu_mul(gu, out, ffn, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < ffn
        g = tl.load(gu + row * 2 * ffn + cols, mask=m).to(tl.float32)
        u = tl.load(gu + row * 2 * ffn + ffn + cols, mask=m).to(tl.float32)
        tl.store(out + row * ffn + cols, (g / (1.0 + tl.exp(-g)) * u).to(tl.bfloat16), mask=m)

    def silu_mul(gu, out):
        _silu_mul[(gu.shape[0], triton.cdiv(FFN, 2048))](gu, out, FFN, BLOCK=2048)

    KIND = "triton, one pass"
except Exception as e:  # noqa: BLE001 - any import or compile failure falls back
    def silu_mul(gu, out):
        torch.mul(torch.nn.functional.silu(gu[:, :FFN]), gu[:, FFN:], out=out)

    KIND = f"torch, two kernels (no triton: {e})"


def main():
    rows_list = [int(r) for r in sys.argv[1:]] or [1000, 512]
    dev = torch.device("cuda")
    wgu = torch.randn(2 * FFN, HIDDEN, device=dev, dtype=torch.bfloat16) * 0.01
    wd = torch.randn(HIDDEN, FFN, device=dev, dtype=torch.bfloat16) * 0.01
    print(f"silu_mul: {KIND}", flush=True)
    for rows in rows_list:
        x = torch.randn(rows, HIDDEN, device=dev, dtype=torch.bfloat16)
        gu = torch.empty(rows, 2 * FFN, device=dev, dtype=torch.bfloat16)
        act = torch.empty(rows, FFN, device=dev, dtype=torch.bfloat16)
        y = torch.empty(rows, HIDDEN, device=dev, dtype=torch.bfloat16)
        # A silu_mul check against PyTorch's, once.
        torch.mm(x, wgu.t(), out=gu)
        silu_mul(gu, act)
        ref = torch.nn.functional.silu(gu[:, :FFN].float()) * gu[:, FFN:].float()
        err = ((act.float() - ref).abs().max() / ref.abs().max()).item()

        def cases(chunks):
            step = -(-rows // chunks)
            spans = [(a, min(a + step, rows)) for a in range(0, rows, step)]

            def mlp():
                for a, b in spans:
                    torch.mm(x[a:b], wgu.t(), out=gu[a:b])
                    silu_mul(gu[a:b], act[a:b])
                    torch.mm(act[a:b], wd.t(), out=y[a:b])

            def gemms():
                for a, b in spans:
                    torch.mm(x[a:b], wgu.t(), out=gu[a:b])
                    torch.mm(act[a:b], wd.t(), out=y[a:b])

            def elementwise():
                for a, b in spans:
                    silu_mul(gu[a:b], act[a:b])

            return mlp, gemms, elementwise

        for rnd, order in enumerate(((1, 2, 4), (4, 2, 1))):
            for chunks in order:
                mlp, gemms, elementwise = cases(chunks)
                t_mlp, t_gemms, t_el = timed(mlp, 50), timed(gemms, 50), timed(elementwise, 50)
                print(f"MLP rows {rows} chunks {chunks} round {rnd + 1}: mlp {t_mlp:.1f} us, gemms alone "
                      f"{t_gemms:.1f}, silu_mul alone {t_el:.1f} (mlp - gemms {t_mlp - t_gemms:.1f}); "
                      f"silu_mul rel err {err:.1e}", flush=True)


if __name__ == "__main__":
    main()
