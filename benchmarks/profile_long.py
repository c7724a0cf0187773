"""taca's D = 128 forward + backward and plain cuDNN's at FLUX 1024 and FLUX 2048 (b1, 24 heads, text 512 first),
one iteration each between cudaProfilerStart / Stop, for a profiler that starts off (ncu --profile-from-start off
profiles every kernel of them). The question: why taca's ratio to cuDNN falls from ~1.0x (fwd) / 0.95x (fwd+bwd)
at 4608 tokens to 0.97x / 0.93x at 16896 (bench_attention_gpu.py, H100, 2026-12-05).
Order of the profiled iterations: taca 4608, cudnn 4608, taca 16896, cudnn 16896 (printed to stdout as well)."""
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from taca import ops  # noqa: E402,F401

B, H, D, L = 1, 24, 128, 512


def taca_iter(N):
    q, k, v, do = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    g = torch.full((B,), 1.2, device="cuda")

    def step():
        out, lse, _ = torch.ops.taca.fwd(q, k, v, g, 1.0, D ** -0.5, 0, L, False)
        torch.ops.taca.bwd(do, q, k, v, out, lse, g, 1.0, D ** -0.5, 0, L)
    return step


def cudnn_iter(N, B=B, H=H, D=D):
    """One plain cuDNN SDPA forward + backward (no gamma) on (B, H, N, D) bf16 inputs, as a closure."""
    q, k, v, do = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)

    def step():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            F.scaled_dot_product_attention(q, k, v).backward(do)
    return step


def main():
    for N in (L + 4096, L + 16384):
        for name, make in (("taca", taca_iter), ("cudnn", cudnn_iter)):
            step = make(N)
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            print(f"profiled: {name} N={N}", flush=True)
            torch.cuda.cudart().cudaProfilerStart()
            step()
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStop()
            del step
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
