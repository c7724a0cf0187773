"""One FLUX-1024-shaped (B=1, H=24, N=4608, D=128, 512 text tokens first) forward for a profiler:
a warm-up call, then one inside the NVTX range "prof". Argument: a taca variant (default 0,
through the ctypes harness) or "cudnn" (plain SDPA on cuDNN, no gamma: the reference speed).
Usage: TACA_CUDA_LIB=build/libtaca_fwd_ctypes.so ncu --nvtx --nvtx-include "prof/" \\
       --kernel-name regex:"taca_fwd_sm90|sdpa|fprop|fmha" --launch-count 1 \\
       python3 benchmarks/fwd_profile_once.py [variant|cudnn]"""
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "cuda_harness"))
import taca_ctypes  # noqa: E402

arg = sys.argv[1] if len(sys.argv) > 1 else "0"
q, k, v = (torch.randn(1, 24, 4608, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))


def call():
    if arg == "cudnn":
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)
    return taca_ctypes.fwd(q, k, v, text_len=512, text_first=True, gamma=1.2, variant=int(arg))


call()
torch.cuda.synchronize()
torch.cuda.nvtx.range_push("prof")
call()
torch.cuda.nvtx.range_pop()
torch.cuda.synchronize()
