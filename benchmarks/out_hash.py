"""SHA-256 of the CUDA op's outputs (out, lse, text_mass) and gradients (dq, dk, dv; deterministic backward) on fixed
seeded inputs at the PERFORMANCE.md shapes plus a float16 and a per-sample-span case: for an A/B of two builds whose
outputs must be bitwise equal (gpu_ab_run.sh HASH=1 prints both sides' lines; any differing line is a failure).
Usage: python benchmarks/out_hash.py"""
import hashlib
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import taca  # noqa: E402

CASES = [  # name, B, H, D, text, image tokens, text_first, dtype, per-sample spans
    ("flux1024_b1", 1, 24, 128, 512, 4096, True, torch.bfloat16, False),
    ("sd35m_cfg", 2, 24, 64, 333, 4096, False, torch.bfloat16, False),
    ("flux_f16_odd", 2, 8, 128, 300, 1000, True, torch.float16, False),
    ("spans_d64", 2, 8, 64, 200, 1500, True, torch.bfloat16, True),
]


def digest(*ts):
    h = hashlib.sha256()
    for t in ts:
        h.update(t.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> int:
    for name, B, H, D, L, img, tf, dt, per_sample in CASES:
        g = torch.Generator(device="cuda").manual_seed(1234)
        q, k, v, do = (torch.randn(B, H, L + img, D, device="cuda", dtype=dt, generator=g) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_(True)
        gamma = torch.linspace(1.1, 1.3, B, device="cuda")
        kw = dict(text_len=L, text_first=tf, gamma=gamma, layout="bhnd", backend="cuda", return_lse=True,
                  return_text_mass=True)
        if per_sample:
            kw["text_len"] = torch.tensor([L, L // 2][:B], device="cuda")
        out, lse, tm = taca.joint_attention(q, k, v, **kw)
        out.backward(do)
        print(f"{name}: fwd {digest(out, lse, tm)} bwd {digest(q.grad, k.grad, v.grad)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
