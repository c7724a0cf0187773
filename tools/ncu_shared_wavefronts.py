"""Shared-memory wavefronts of a kernel by instruction kind, from `ncu --page source --csv --print-source sass`.

Usage: python tools/ncu_shared_wavefronts.py FILE.csv[.gz] [--steps N]

Each wavefront is one cycle of the SM's shared-memory pipe (128 bytes). Prints every kind's total, share, wavefronts
per warp-level execution and, with --steps (the kernel's tile steps over all CTAs, e.g. 864 CTAs x 72 query tiles =
62208 for the v6 backward at FLUX 1024 b1), per step, to set against the tensor work per step. Written in the
thirty-seventh session to test the reading that the v6 backward's loop is as much shared-memory-bound as
tensor-bound: an SS m64n64k16 wgmma reads 32 wavefronts (4 KB) per warpgroup in its 32 tensor cycles. The copy
engine's traffic (TMA tile loads, the bulk reduce-add's reads of the dQ staging) is not in these counters.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ncu_sass_top import load, num  # noqa: E402  (the export's reader, shared)


def kind(src: str) -> str:
    """The instruction's kind: opcode and width for shared loads / stores, shape and operand source for HGMMA (SS: A
    from shared memory by descriptor, RS: A from registers), else the opcode."""
    words = src.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    if not words:
        return ""
    parts = words[0].split(".")
    if parts[0] == "HGMMA":
        operands = " ".join(words[1:]).split(",")
        a = operands[1].strip() if len(operands) > 1 else ""
        return f"HGMMA.{parts[1]} {'SS' if a.startswith('gdesc') else 'RS'}"
    return ".".join(parts[:2]) if parts[0] in ("LDS", "STS", "STSM", "LDSM") else parts[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--steps", type=int, default=0, help="tile steps over all CTAs (per-step column)")
    args = ap.parse_args(argv)
    if args.steps < 0:
        ap.error(f"--steps: expected >= 0, got {args.steps}")
    rows, _ = load(args.csv)
    if "L1 Wavefronts Shared" not in rows[0]:
        raise SystemExit(f"{args.csv}: no 'L1 Wavefronts Shared' column (profile with --set full)")
    wf, ex = collections.Counter(), collections.Counter()
    for r in rows:
        w = num(r["L1 Wavefronts Shared"])
        if w:
            k = kind(r["Source"])
            wf[k] += w
            ex[k] += num(r["Instructions Executed"])
    total = sum(wf.values())
    per_step = f", {total / args.steps:.0f} per step" if args.steps else ""
    print(f"{total / 1e6:.2f} M shared-memory wavefronts{per_step}")
    print("| kind | M wavefronts | share | per warp execution |" + (" per step |" if args.steps else ""))
    print("|---|---|---|---|" + ("---|" if args.steps else ""))
    for k, v in wf.most_common():
        line = f"| {k} | {v / 1e6:.2f} | {100 * v / total:.1f}% | {v / max(ex[k], 1):.1f} |"
        print(line + (f" {v / args.steps:.0f} |" if args.steps else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
