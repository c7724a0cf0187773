"""The FP8 forward's kernels under compute-sanitizer (memcheck, racecheck): quantization passes and the attention
kernel on shapes that exercise ragged tiles, fewer keys than a 16-key group, GQA with cross attention, strided
views, and more items than SMs (the persistent grid's rings wrap across items).

Run: compute-sanitizer --tool memcheck --kernel-name kns=taca_ python3 tests/cuda_harness/sanitize_fp8.py
"""
import torch

import taca

CASES = [  # B, H, Hkv, N, Nk, text_len, text_first
    (1, 2, 2, 1101, 1101, 77, True),
    (2, 2, 2, 200, 17, 5, False),
    (1, 4, 2, 300, 1001, 100, True),
    (1, 40, 40, 1000, 1000, 64, True),  # 320 items > 132 SMs
]


def main():
    calls = 0
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for B, H, Hkv, N, Nk, L, first in CASES:
            q = torch.randn(B, N, H, 128, device="cuda", generator=g, dtype=torch.bfloat16)
            kv = torch.randn(B, Nk, 2, Hkv, 128, device="cuda", generator=g, dtype=torch.bfloat16)
            k, v = kv.unbind(2)  # strided views
            out, lse, tm = taca.joint_attention(q, k, v, text_len=L, text_first=first, gamma=1.2, layout="bnhd",
                                                fp8=True, return_lse=True, return_text_mass=True)
            torch.cuda.synchronize()
            assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(lse).all())
            calls += 1
    print(f"sanitize_fp8: {calls} fp8 calls done")


if __name__ == "__main__":
    main()
