"""Warp-stall samples of a kernel's hottest loop, split into phases, from `ncu --page source --csv --print-source sass`.

Usage: python tools/ncu_sass_phases.py FILE.csv[.gz] [--loop START:END] [--min 0.2]

The loop is the span of the backward branch holding the most samples (the tile loop of a kernel such as the v6
backward), or START:END given as hex addresses (their last 5 digits suffice). A new
phase starts at each synchronisation or issue point: a wgmma wait (WARPGROUP.DEPBAR), a CTA or named barrier (BAR),
an mbarrier wait (SYNCS.PHASECHK), and the first HGMMA of each run of them. Each phase prints its share of ALL the
kernel's samples, its first instruction, its hottest instruction and that instruction's two largest stall reasons;
phases below --min percent are folded into the line of the phase before them. The KERNEL_LOG's thirty-fourth
session read its phase table off the same CSV by hand; this makes it repeatable.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ncu_sass_top import load, num as _num  # noqa: E402  (the export's reader, shared)

_BRA = re.compile(r"\bBRA(?:\.\S+)?\s+(0x[0-9a-fA-F]+)")


def _opcode(src: str) -> str:
    words = src.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0] if words else ""


def find_loop(rows, total_col) -> tuple[int, int]:
    """(first, last) row index of the hottest loop: the backward branch, run at least half as often as its target
    (a latch, not a retry block's jump back), whose span holds the most samples (an mbarrier's retry loop runs more
    often but holds few; a loop around the tile loop, as in a persistent kernel, would win: give --loop there)."""
    addr = [int(r["Address"], 16) for r in rows]
    index = {a: i for i, a in enumerate(addr)}
    acc = [0.0]
    for r in rows:
        acc.append(acc[-1] + _num(r[total_col]))
    best = None
    for i, r in enumerate(rows):
        m = _BRA.search(r.get("Source", ""))
        if not m:
            continue
        tgt = int(m.group(1), 16)
        if tgt >= addr[i] or tgt not in index:
            continue
        j = index[tgt]
        # a loop's latch runs about once per iteration (its target as often); a jump back from a retry block
        # placed after the loop (an mbarrier wait's) runs only on retries
        if _num(r.get("Instructions Executed", 0)) < 0.5 * _num(rows[j].get("Instructions Executed", 0)):
            continue
        key = (acc[i + 1] - acc[j], -(i - j))
        if best is None or key > best[0]:
            best = (key, j, i)
    if best is None:
        raise SystemExit("no backward branch found: give --loop START:END")
    return best[1], best[2]


def _by_suffix(rows, text: str) -> int:
    want = text.lower().removeprefix("0x")
    hits = [i for i, r in enumerate(rows) if r["Address"].lower().endswith(want)]
    if len(hits) != 1:
        raise SystemExit(f"--loop: address {text!r} matches {len(hits)} instructions")
    return hits[0]


def phases(rows, first: int, last: int):
    """Row-index ranges [a, b) of the loop's phases."""
    cuts = [first]
    prev_hgmma = _opcode(rows[first].get("Source", "")).startswith("HGMMA")
    for i in range(first + 1, last + 1):
        op = _opcode(rows[i].get("Source", ""))
        is_hgmma = op.startswith("HGMMA")
        if (op.startswith("WARPGROUP.DEPBAR") or op.startswith("BAR.") or op.startswith("SYNCS.PHASECHK")
                or (is_hgmma and not prev_hgmma)):
            cuts.append(i)
        prev_hgmma = is_hgmma
    cuts.append(last + 1)
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--loop", help="START:END, hex addresses (or their last digits)")
    ap.add_argument("--min", type=float, default=0.2, help="fold phases below this percent into the previous one")
    args = ap.parse_args(argv)
    rows, total_col = load(args.csv)
    tot = sum(_num(r[total_col]) for r in rows) or 1.0
    if args.loop:
        a, _, b = args.loop.partition(":")
        first, last = _by_suffix(rows, a), _by_suffix(rows, b)
    else:
        first, last = find_loop(rows, total_col)
    reasons = [c for c in rows[0] if c.startswith("stall_") and "Not Issued" not in c]
    loop_share = sum(_num(r[total_col]) for r in rows[first:last + 1]) / tot * 100
    print(f"loop {rows[first]['Address']}..{rows[last]['Address']} ({last - first + 1} instructions, executed "
          f"{_num(rows[first].get('Instructions Executed', 0)):.0f} x): {loop_share:.1f}% of {tot:.0f} samples")
    print("| share | from | hottest instruction | its top stalls |")
    print("|---|---|---|---|")
    merged = []
    for a, b in phases(rows, first, last):
        share = sum(_num(r[total_col]) for r in rows[a:b]) / tot * 100
        if merged and share < args.min:
            merged[-1] = (merged[-1][0], b, merged[-1][2] + share)
        else:
            merged.append((a, b, share))
    for a, b, share in merged:
        hot = max(rows[a:b], key=lambda r: _num(r[total_col]))
        top = sorted(((_num(hot[c]), c) for c in reasons), reverse=True)[:2]
        st = " ".join(f"{c.removeprefix('stall_')}={v:.0f}" for v, c in top if v > 0)
        print(f"| {share:5.1f}% | {rows[a]['Address'][-5:]} {rows[a]['Source'].strip()[:48]} | "
              f"{100 * _num(hot[total_col]) / tot:.1f}% {hot['Source'].strip()[:48]} | {st} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
