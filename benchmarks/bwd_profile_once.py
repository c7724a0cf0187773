"""One FLUX-1024-shaped (or SD3.5-M, or AuraFlow CFG) taca backward for a profiler: a warm-up call, then one.
Usage: ncu --kernel-name regex:bwd_main --launch-skip 1 --launch-count 1 python3 benchmarks/bwd_profile_once.py [d64|d256]
(d256: AuraFlow CFG, B 2, 12 heads, D 256, 264 text tokens first of 4360; the wgmma kernel with TACA_BWD_D256=wgmma)
With "cudnn": plain cuDNN SDPA (no gamma) forward + backward instead, warmed up, then one iteration
between cudaProfilerStart / Stop (ncu --profile-from-start off profiles every kernel of it)."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from taca import ops  # noqa: E402,F401

B, H, D, L, N = ((2, 24, 64, 333, 4429) if "d64" in sys.argv else (2, 12, 256, 264, 4360) if "d256" in sys.argv
                 else (1, 24, 128, 512, 4608))
tb, te = (N - L, N) if "d64" in sys.argv else (0, L)
if "cudnn" in sys.argv:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from profile_long import cudnn_iter

    step = cudnn_iter(N, B, H, D)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    sys.exit(0)
q, k, v, do = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
g = torch.full((B,), 1.2, device="cuda")
out, lse, _ = torch.ops.taca.fwd(q, k, v, g, 1.0, D ** -0.5, tb, te, False)
for _ in range(2):
    torch.ops.taca.bwd(do, q, k, v, out, lse, g, 1.0, D ** -0.5, tb, te)
torch.cuda.synchronize()
