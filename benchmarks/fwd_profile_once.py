"""One FLUX-1024-shaped (B=1, H=24, N=4608, D=128, 512 text tokens first) taca forward through the
ctypes harness for a profiler: a warm-up call, then one, of the chosen variant (default 0).
Usage: TACA_CUDA_LIB=build/libtaca_fwd_ctypes.so ncu --kernel-name regex:taca_fwd_sm90 --launch-skip 1 \\
       --launch-count 1 python3 benchmarks/fwd_profile_once.py [variant]"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "cuda_harness"))
import taca_ctypes  # noqa: E402

variant = int(sys.argv[1]) if len(sys.argv) > 1 else 0
q, k, v = (torch.randn(1, 24, 4608, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
for _ in range(2):
    taca_ctypes.fwd(q, k, v, text_len=512, text_first=True, gamma=1.2, variant=variant)
torch.cuda.synchronize()
