"""The D = 136..256 wgmma backward (taca_bwd_sm90_d256.cu) alone, for compute-sanitizer (memcheck / racecheck /
synccheck), short enough for racecheck in one device call.

Run: compute-sanitizer --tool racecheck --kernel-name kns=taca_bwd python3 tests/cuda_harness/sanitize_bwd_d256.py
Calls (forward + backward each): D = 256, 1 x 2 heads, 1100 tokens (18 key tiles of 64, 18 query tiles: the Q ring, the
dO buffer and both staging buffers reused many times, the skew on), 77 text tokens first, deterministic and not; D = 200
(zero-filled columns), fp16, text last, bnhd; grouped KV heads (4 query heads on 2) with N_q = 300 != N_k = 700; the
masked instance with a key mask (padded text keys: masked and unmasked key tiles) and with a float mask per query at
D = 224.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main():
    import taca

    os.environ.setdefault("TACA_BWD_D256", "wgmma")  # (read per call; until the kernel is the default)
    torch.manual_seed(0)
    runs = 0
    calls = ((256, torch.bfloat16, True, "bhnd", True), (256, torch.bfloat16, False, "bhnd", True),
             (200, torch.float16, True, "bnhd", False))
    for D, dt, det, layout, first in calls:
        shape = (1, 2, 1100, D) if layout == "bhnd" else (1, 1100, 2, D)
        q, k, v = (torch.randn(shape, device="cuda", dtype=dt, requires_grad=True) for _ in range(3))
        o = taca.joint_attention(q, k, v, text_len=77, text_first=first, gamma=1.3, layout=layout, backend="cuda",
                                 deterministic=det)
        o.backward(torch.randn_like(o))
        runs += 2
    q = torch.randn(2, 4, 300, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 2, 700, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    o = taca.joint_attention(q, k, v, text_len=64, query_text_len=64, gamma=1.2, layout="bhnd", backend="cuda")
    o.backward(torch.randn_like(o))
    runs += 2
    q, k, v = (torch.randn(2, 2, 700, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    keep = torch.ones(2, 1, 1, 700, dtype=torch.bool, device="cuda")
    keep[1, ..., 40:77] = False  # sample 1's padded text
    o = taca.joint_attention(q, k, v, text_len=77, gamma=1.2, layout="bhnd", backend="cuda", attn_mask=keep)
    o.backward(torch.randn_like(o))
    q, k, v = (torch.randn(1, 2, 300, 224, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
    fm = torch.randn(1, 2, 300, 300, device="cuda")
    o = taca.joint_attention(q, k, v, text_len=50, gamma=1.2, layout="bhnd", backend="cuda", attn_mask=fm)
    o.backward(torch.randn_like(o))
    runs += 4
    torch.cuda.synchronize()
    print(f"sanitize_bwd_d256: {runs} kernel calls done")
    return runs


if __name__ == "__main__":
    main()
