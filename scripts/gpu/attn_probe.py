"""What causal prefill attention costs in PyTorch's kernels, against which to judge ours (kernels/prefill.cu).

The Mistral-7B shapes (32 query heads, 8 key/value heads, head size 128, bf16), causal, one sequence of T tokens
or B sequences of T: each of PyTorch's scaled_dot_product_attention backends that takes the shape (FlashAttention-2,
cuDNN, memory-efficient), timed through a CUDA graph of 50 calls, best of 5 replays. One ATTN line per case: µs a
call and TFLOP/s at 4 T² / 2 x 128 x 32 flops a sequence (the causal half).

    python3 scripts/gpu/attn_probe.py
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from overlap_probe import timed  # the same timing through CUDA graphs

CASES = ((1, 1000), (8, 512), (1, 4096))
BACKENDS = (("flash2", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION))


def main():
    dev = torch.device("cuda")
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name()}")
    for b, t in CASES:
        q = torch.randn(b, 32, t, 128, device=dev, dtype=torch.bfloat16)
        k = torch.randn(b, 8, t, 128, device=dev, dtype=torch.bfloat16)
        v = torch.randn(b, 8, t, 128, device=dev, dtype=torch.bfloat16)
        # Keys and values repeated to 32 heads, for backends without grouped queries.
        kr, vr = k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1)
        flops = b * 4 * t * t / 2 * 128 * 32
        for name, backend in BACKENDS:
            for gqa in (True, False):
                kk, vv = (k, v) if gqa else (kr, vr)

                def call():
                    with sdpa_kernel([backend]):
                        F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)

                try:
                    us = timed(call, reps=50)
                    print(f"ATTN {b} x {t} {name} gqa={gqa}: {us:.1f} us, {flops / us / 1e6:.0f} TFLOP/s", flush=True)
                except Exception as e:  # a backend that does not take the shape
                    print(f"ATTN {b} x {t} {name} gqa={gqa}: not run ({type(e).__name__}: {str(e)[:120]})", flush=True)


if __name__ == "__main__":
    main()
