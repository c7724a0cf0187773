"""Figure of a v6 backward trace (benchmarks/bwd_trace.py's bwd_trace_raw.safetensors): per mode, every CTA
as a bar on its SM from start to end, colored by its position in its dQ chain, and the CTAs' mean duration by
chain position. CPU only (matplotlib); the trace itself comes from a TACA_BWD_TRACE build on a Hopper GPU.

Usage: python3 benchmarks/plot_bwd_trace.py RAW.safetensors [--shape flux1024_b1] [--modes det,nd] [--out FIG.png]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def load(path: str, shape: str, modes: list[str]) -> dict:
    from safetensors.numpy import load_file

    raw = load_file(path)
    out = {}
    for m in modes:
        key = f"{shape}.{m}"
        if key not in raw:
            have = sorted(k for k in raw if "tiles" not in k)
            raise SystemExit(f"--modes / --shape: {key!r} is not in {path}; it has {have}")
        out[m] = raw[key].astype(np.int64)
    return out


def cta_table(tr: np.ndarray) -> dict:
    """Start, end (us after the first start), SM and chain position of every CTA."""
    start, end = tr[:, 1], np.maximum(tr[:, 2], np.maximum(tr[:, 13], tr[:, 14]))
    t0 = start.min()
    return {"start": (start - t0) / 1e3, "end": (end - t0) / 1e3, "sm": tr[:, 0],
            "pos": (tr[:, 3] >> 16) & 0xFF}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("raw")
    ap.add_argument("--shape", default="flux1024_b1")
    ap.add_argument("--modes", default="det,nd")
    ap.add_argument("--out", default=None, help="PNG path (default: beside RAW)")
    args = ap.parse_args()
    if not os.path.isfile(args.raw):
        raise SystemExit(f"RAW: no such file {args.raw!r}")
    modes = [m for m in args.modes.split(",") if m]
    if not modes:
        raise SystemExit("--modes: expected at least one mode")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.raw)), f"bwd_trace_{args.shape}.png")
    if os.path.exists(out):
        raise SystemExit(f"--out: {out} exists; not overwritten (pass another path)")
    traces = load(args.raw, args.shape, modes)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(modes) + 1, 1, figsize=(11, 3.2 * len(modes) + 3.2))
    cmap = plt.get_cmap("viridis")
    span = max(cta_table(t)["end"].max() for t in traces.values())
    for ax, m in zip(axes, modes):
        c = cta_table(traces[m])
        top = max(int(c["pos"].max()), 1)
        ax.hlines(c["sm"], c["start"], c["end"], colors=cmap(c["pos"] / top), linewidth=1.6)
        ax.set_xlim(0, span * 1.01)
        ax.set_ylabel("SM")
        ax.set_title(f"{args.shape}, {m}: {len(c['sm'])} CTAs, kernel span {c['end'].max():.0f} us "
                     f"(color: chain position 0..{top})", fontsize=9)
    axes[-2].set_xlabel("us after the first CTA's start")
    ax = axes[-1]
    for m in modes:
        c = cta_table(traces[m])
        dur = c["end"] - c["start"]
        pos = np.arange(int(c["pos"].max()) + 1)
        ax.plot(pos, [dur[c["pos"] == p].mean() for p in pos], marker="o", label=m)
    ax.set_xlabel("position in the dQ chain (nd: key tile; no order)")
    ax.set_ylabel("mean CTA duration, us")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
