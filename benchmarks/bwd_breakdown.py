"""Where the time of one attention forward + backward goes, per CUDA kernel: taca (deterministic and
not) against plain cuDNN SDPA (no gamma), same process, torch.profiler device times.

Question: of taca's backward (about 1.6 ms on FLUX 1024 b1, H200), how much is the main kernel and how
much the preprocess, the order-counter memset and the dQ conversion; and how does cuDNN's backward split?

Usage: python3 benchmarks/bwd_breakdown.py [--shapes flux1024_b1,sd35m_cfg] [--iters 20] [--out DIR]
Prints a table per shape last (microseconds per iteration, per kernel); writes JSON to DIR.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention_gpu import SHAPES  # noqa: E402


def _methods(shape):
    import taca
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, H, D, L, n_img, tf = shape
    gamma = torch.full((B,), 1.2, device="cuda")

    def plain(q, k, v):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    return {
        "taca": lambda q, k, v: taca.joint_attention(q, k, v, text_len=L, text_first=tf, gamma=gamma,
                                                     layout="bhnd", backend="cuda"),
        "taca_nondet": lambda q, k, v: taca.joint_attention(q, k, v, text_len=L, text_first=tf, gamma=gamma,
                                                            layout="bhnd", backend="cuda", deterministic=False),
        "cudnn": plain,
    }


def kernel_times(step, iters, warmup=5):
    """{CUDA kernel name: device us per call of step}, sorted by time, over iters calls (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    per = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
    return {k: v / iters for k, v in sorted(per.items(), key=lambda kv: -kv[1])}


def _profile(fn, q, k, v, do, iters):
    def step():
        out = fn(q, k, v)
        out.backward(do)

    return kernel_times(step, iters)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="flux1024_b1,sd35m_cfg")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "shapes": {}}
    lines = []
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        B, H, D, L, n_img, _ = shape
        N = L + n_img
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, do = (torch.randn(B, H, N, D, generator=gen, device="cuda").to(torch.bfloat16) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_(True)
        res["shapes"][name] = {}
        for m, fn in _methods(shape).items():
            per = _profile(fn, q, k, v, do, args.iters)
            res["shapes"][name][m] = per
            lines.append(f"\n{name} {m}: total {sum(per.values()):.1f} us / iteration (fwd + bwd, device time)")
            for kname, us in per.items():
                if us >= 1.0:
                    lines.append(f"  {us:8.1f} us  {kname[:110]}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bwd_breakdown.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"GPU {res['gpu']}, torch {res['torch']}, bf16; per-kernel device time per fwd+bwd iteration")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
