"""Warp-stall samples of a kernel split at given SASS addresses, from `ncu --page source --csv --print-source sass`.

Usage: python tools/ncu_sass_regions.py FILE.csv[.gz] ADDR,ADDR,... [--names a,b,...]

ADDR: hex addresses (their last 5 digits suffice), ascending; region i runs from ADDR i to ADDR i + 1 (the first
region is everything before the first address, the last everything from the last one on). Each region prints its
share of ALL the kernel's samples, its absolute sample count (comparable between two kernels profiled the same way:
samples are taken per warp at a fixed interval, so a count is warps x time) and its stall reasons' shares. The
fortieth session compared taca's forward loop with cuDNN's this way (KERNEL_LOG): the regions were read off a listing
from tools/ncu_sass_top.py.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ncu_sass_top import load, num  # noqa: E402  (the export's reader, shared)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv")
    ap.add_argument("addrs", help="hex addresses, comma-separated, ascending")
    ap.add_argument("--names", default="", help="a name per region (one more than the addresses)")
    args = ap.parse_args(argv)
    try:
        bounds = [int(x, 16) & 0xFFFFF for x in args.addrs.split(",") if x]
    except ValueError:
        raise SystemExit(f"addrs: expected comma-separated hex addresses, got {args.addrs!r}")
    if bounds != sorted(bounds):
        raise SystemExit(f"addrs: expected ascending addresses, got {args.addrs!r}")
    names = [n for n in args.names.split(",")] if args.names else []
    if names and len(names) != len(bounds) + 1:
        raise SystemExit(f"--names: expected {len(bounds) + 1} names (one per region), got {len(names)}")
    rows, total_col = load(args.csv)
    cols = list(rows[0].keys())
    reason_cols = [c for c in cols if (c.lower().startswith("stall_") or "(stall" in c.lower()) and "Not Issued" not in c]
    samples = [0.0] * (len(bounds) + 1)
    reasons = [Counter() for _ in samples]
    for r in rows:
        a = int(r["Address"], 16) & 0xFFFFF
        i = sum(a >= b for b in bounds)
        samples[i] += num(r[total_col])
        for c in reason_cols:
            reasons[i][c] += num(r[c])
    tot = sum(samples)
    print(f"{tot:.0f} samples")
    print("| region | from | share | samples | top stall reasons |")
    print("|---|---|---|---|---|")
    for i, (s, rc) in enumerate(zip(samples, reasons)):
        start = "start" if i == 0 else f"{bounds[i - 1]:05x}"
        rs = sum(rc.values()) or 1.0
        top = ", ".join(f"{k.replace('stall_', '')} {100 * v / rs:.0f}%" for k, v in rc.most_common(4) if v > 0)
        print(f"| {names[i] if names else i} | {start} | {100 * s / tot:.1f}% | {s:.0f} | {top} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
