"""Key-mask forward runs for compute-sanitizer racecheck: the per-tile key terms' slots (2 x STAGES of them) reused
across many key tiles and persistent items, at D = 64 and 128, bool and float masks.

Run: compute-sanitizer --tool racecheck --kernel-name kns=taca_ python3 tests/cuda_harness/sanitize_fwd_keymask.py
(the default: at D = 64 the three-consumer instance, every lane arriving on the key-term barriers; TACA_FWD_MASK=tile
the two-consumer one, TACA_FWD_KT_ARRIVE=lane0 the lane-0 arrivals).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import taca  # noqa: E402


def main():
    torch.manual_seed(0)
    runs = 0
    for D in (64, 128):
        # 1200 keys = 10 key tiles of 128 (slots reused 2.5 times per item); 2 x 12 heads x 7 / 10 query tiles
        q, k, v = (torch.randn(2, 12, 1200, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        km = torch.ones(2, 1, 1, 1200, dtype=torch.bool, device="cuda")
        km[0, ..., 1100:] = False  # padded keys: the last tile mixed, the others all attend
        km[1, ..., 300:340] = False  # a masked run inside an image tile
        fm = torch.zeros(2, 1, 1, 1200, device="cuda")
        fm[1, ..., 500:520] = float("-inf")
        fm[0, ..., ::7] = -1.5
        for mask in (km, fm):
            taca.joint_attention(q, k, v, text_len=104, text_first=True, gamma=1.2, attn_mask=mask, backend="cuda")
            runs += 1
    torch.cuda.synchronize()
    print(f"sanitize_fwd_keymask: {runs} kernel calls done")


if __name__ == "__main__":
    main()
