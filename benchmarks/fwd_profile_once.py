"""One FLUX-1024-shaped (H=24, N=4608, D=128, 512 text tokens first) forward for a profiler: a warm-up call,
then one inside the NVTX range "prof". Argument: a taca variant (default 0, through the ctypes harness, B=1),
"cudnn" (plain SDPA on cuDNN, no gamma: the reference speed, B=1), or the public op at B=2 (FLUX b2) with
"op-int" (text_len an int: the plain instance), "op-mask1" (an all-True (B, 1, 1, N) bool key mask: the
key-mask instance with no masked tile), "op-spans" (text_len a (B,) tensor: the spans-only instance).
Env TACA_PROF_N: the token count (default 4608; 16896 is FLUX 2048).
Usage: TACA_CUDA_LIB=build/libtaca_fwd_ctypes.so ncu --nvtx --nvtx-include "prof/" \\
       --kernel-name regex:"taca_fwd|sdpa|fprop|fmha" --launch-count 1 \\
       python3 benchmarks/fwd_profile_once.py [variant|cudnn|op-int|op-mask1|op-spans]"""
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HERE = os.path.dirname(os.path.abspath(__file__))
arg = sys.argv[1] if len(sys.argv) > 1 else "0"
OPS = ("op-int", "op-mask1", "op-spans")
if arg not in OPS and arg != "cudnn" and not arg.isdigit():
    raise SystemExit(f"argument: expected a variant number, cudnn or one of {OPS}, got {arg!r}")
B = 2 if arg in OPS else 1
N = int(os.environ.get("TACA_PROF_N", "4608"))
if N < 513:
    raise SystemExit(f"TACA_PROF_N: expected more than the 512 text tokens, got {N}")
q, k, v = (torch.randn(B, 24, N, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))

if arg in OPS:
    sys.path.insert(0, os.path.dirname(HERE))
    import taca

    kw = dict(text_len=512, gamma=torch.full((B,), 1.2, device="cuda"))
    if arg == "op-mask1":
        kw["attn_mask"] = torch.ones(B, 1, 1, N, dtype=torch.bool, device="cuda")
    elif arg == "op-spans":
        kw["text_len"] = torch.full((B,), 512, device="cuda")
elif arg != "cudnn":
    sys.path.insert(0, os.path.join(HERE, "..", "tests", "cuda_harness"))
    import taca_ctypes


def call():
    if arg == "cudnn":
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)
    if arg in OPS:
        return taca.joint_attention(q, k, v, backend="cuda", **kw)
    return taca_ctypes.fwd(q, k, v, text_len=512, text_first=True, gamma=1.2, variant=int(arg))


call()
torch.cuda.synchronize()
torch.cuda.nvtx.range_push("prof")
call()
torch.cuda.nvtx.range_pop()
torch.cuda.synchronize()
