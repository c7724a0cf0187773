"""The forward alone, taca (the public op, gamma 1.2) and plain cuDNN SDPA (no gamma) in one process, for A/B runs of
the forward's timing switches across processes (benchmarks/gpu_fwd_modes.sh sets one mode's environment per process).
Each cell: `--reps` medians of triton's do_bench (at least 20 iterations each), the median of those.

A shape name may end in "+spans" (per-sample text lengths: sample b > 0 has 60% of the shape's text length, its other
text slots then count as image tokens) or "+mask" (a bool (B, 1, 1, N) key mask: every sample's last 40% of text keys
padded out): the D = 128 instances with spans or a mask (cuDNN's cell stays plain attention without a mask).

Usage: python benchmarks/bench_fwd_modes.py [--shapes flux1024_b1,flux2048_b1,flux1024_b2+spans] [--reps 3] [--out DIR]
Writes DIR/bench_fwd_modes.json: {"shapes": {shape: {"taca": ms, "cudnn": ms}}, "env": {TACA_FWD_*: value}}."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from bench_attention_gpu import EXTRA_SHAPES, GAMMA, SHAPES, _bench  # noqa: E402  (the table's shapes and timer)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="flux1024_b1,flux2048_b1")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    shapes = {**SHAPES, **EXTRA_SHAPES}
    names = [s for s in args.shapes.split(",") if s]

    def parse(s):  # "flux1024_b2+spans" -> ("flux1024_b2", "+spans")
        for f in ("+spans", "+mask"):
            if s.endswith(f):
                return s[: -len(f)], f
        return s, ""

    split = [parse(s) for s in names]
    bad = [s for s, _ in split if s not in shapes]
    if bad:
        raise SystemExit(f"--shapes: unknown {bad}; expected names from {sorted(shapes)}")
    batch1 = [s for s, (b, f) in zip(names, split) if f == "+spans" and shapes[b][0] < 2]
    if batch1:
        raise SystemExit(f"--shapes: {batch1}: per-sample spans need a batch of 2 or more")
    if args.reps < 1:
        raise SystemExit(f"--reps: expected at least 1, got {args.reps}")
    if not torch.cuda.is_available():
        raise SystemExit("bench_fwd_modes.py needs a CUDA device")
    import taca

    res = {}
    for s, (base, feat) in zip(names, split):
        B, H, D, L, n_img, tf = shapes[base]
        N = L + n_img
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        g = torch.full((B,), GAMMA, device="cuda")
        kw = dict(text_len=L)
        if feat == "+spans":
            kw["text_len"] = torch.tensor([L] + [int(0.6 * L)] * (B - 1), device="cuda")
        elif feat == "+mask":
            m = torch.ones(B, 1, 1, N, dtype=torch.bool, device="cuda")
            pad = slice(int(0.6 * L), L) if tf else slice(n_img + int(0.6 * L), N)
            m[..., pad] = False
            kw["attn_mask"] = m

        def taca_fwd():
            return taca.joint_attention(q, k, v, text_first=tf, gamma=g, backend="cuda", **kw)

        def cudnn_fwd():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v)

        cell = {}
        for name, fn in (("taca", taca_fwd), ("cudnn", cudnn_fwd)):
            fn()
            torch.cuda.synchronize()
            cell[name] = statistics.median(_bench(fn, False) for _ in range(args.reps))
        res[s] = cell
        print(f"{s}: taca {cell['taca']:.4f} ms, cudnn {cell['cudnn']:.4f} ms, speed {cell['cudnn'] / cell['taca']:.3f}x",
              flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k.startswith("TACA_FWD_")}
        with open(os.path.join(args.out, "bench_fwd_modes.json"), "w") as f:
            json.dump({"shapes": res, "env": env, "device": torch.cuda.get_device_name()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
