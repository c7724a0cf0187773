"""compute-sanitizer harness of the v6 backward's CTA pairs (TACA_BWD_PAIR=1 / 3 / 4: dQ chains in clusters of
two, rank 1's part read by rank 0 from its shared memory, or stored by rank 1 into rank 0's, plainly or by
st.async). Backward calls at D = 128 (and 96) with an even and an odd number of key tiles (a rank 1 past the
last key tile), several query tiles (both staging buffers reused on both ranks), 1 and 2 chains, with and without
a key mask. Run:
  compute-sanitizer --tool memcheck --kernel-name kns=taca_bwd python3 tests/cuda_harness/sanitize_bwd_pair.py
"""
from __future__ import annotations

import os

import torch

import taca


def main() -> int:
    torch.manual_seed(0)
    runs = 0
    for form in ("1", "3", "4"):  # rank 0 pulls rank 1's part, rank 1 pushes it (plain stores, st.async)
        os.environ["TACA_BWD_PAIR"] = form
        runs += _calls()
    torch.cuda.synchronize()
    print(f"sanitize_bwd_pair: {runs} kernel calls done")
    return runs


def _calls() -> int:
    runs = 0
    # (B, H, N, D, text_len, dtype, TACA_BWD_NSEG): key tiles 3 (odd), 4, 5 (odd, two chains of 4 and 1 ->
    # pairs: 4 + 1), 2 at D = 96
    cases = ((1, 2, 300, 128, 77, torch.bfloat16, None), (2, 2, 512, 128, 100, torch.float16, None),
             (1, 3, 600, 128, 64, torch.bfloat16, "2"), (1, 2, 250, 96, 40, torch.bfloat16, None))
    for B, H, N, D, L, dt, nseg in cases:
        if nseg:
            os.environ["TACA_BWD_NSEG"] = nseg
        for masked in (False, True):
            q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dt, requires_grad=True) for _ in range(3))
            kw = {}
            if masked:
                km = torch.ones(B, 1, 1, N, dtype=torch.bool, device="cuda")
                km[-1, ..., L // 2:L] = False
                kw["attn_mask"] = km
            o = taca.joint_attention(q, k, v, text_len=L, text_first=True, gamma=1.3, backend="cuda", **kw)
            o.backward(torch.randn_like(o))
            runs += 2
        os.environ.pop("TACA_BWD_NSEG", None)
    return runs


if __name__ == "__main__":
    main()
