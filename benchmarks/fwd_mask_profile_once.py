"""One FLUX-1024-b2-shaped forward (B=2, H=24, N=4608, D=128, 512 text tokens first) through the public op, for a
profiler: a warm-up call, then one inside the NVTX range "prof". Argument: "int" (text_len an int: the plain
instance), "mask1" (an all-True (B, 1, 1, N) bool key mask: the key-mask instance with no masked tile), "spans"
(text_len a (B,) tensor: the spans-only instance).
Usage: ncu --nvtx --nvtx-include "prof/" --kernel-name regex:taca_fwd --launch-count 1 \\
       python3 benchmarks/fwd_mask_profile_once.py [int|mask1|spans]"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import taca  # noqa: E402

arg = sys.argv[1] if len(sys.argv) > 1 else "int"
if arg not in ("int", "mask1", "spans"):
    raise SystemExit(f"argument: expected int, mask1 or spans, got {arg!r}")
B, H, N, D, L = 2, 24, 4608, 128, 512
q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
kw = dict(text_len=L)
if arg == "mask1":
    kw["attn_mask"] = torch.ones(B, 1, 1, N, dtype=torch.bool, device="cuda")
elif arg == "spans":
    kw["text_len"] = torch.full((B,), L, device="cuda")
gamma = torch.full((B,), 1.2, device="cuda")


def call():
    return taca.joint_attention(q, k, v, gamma=gamma, backend="cuda", **kw)


call()
torch.cuda.synchronize()
torch.cuda.nvtx.range_push("prof")
call()
torch.cuda.nvtx.range_pop()
torch.cuda.synchronize()
