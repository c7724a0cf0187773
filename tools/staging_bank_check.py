"""The v6 backward's tensor-writer dQ staging (D = 64, BM = 128) in Python: where each lane's float2 lands and how many
4-byte words share a bank in each half-warp of one store, with and without item 14 (CF, TACA_BWD_V6_CF=1).

The kernel's float2 store (half, nt) of lane (g, t) writes rows 64 wg + 16 warp + g + 8 half, columns 2t + 8 nt (and
+1) of the tile into 32-column boxes of 128-byte rows, 16-byte unit c at (c & 7) ^ (row & 7) (sw128_offset). Without
CF a half-warp's 16 lanes (rows g = 0..3) land on four unit positions with eight units: two words per bank, two
wavefronts a half-warp (ncu counted four per store where two suffice). With CF the lanes of odd rows store block
nt ^ 2's pair in store nt, at that element's own place (offset ^ 64). Prints both counts and whether every element
keeps its place; exit status 1 if CF moved an element or left a conflict. Written in the thirty-seventh session, when
the switch could not be run on a GPU.
"""
from __future__ import annotations

import sys
from collections import defaultdict

BM = 128


def sw128(r: int, c: int, rows: int = BM) -> int:
    return (c >> 3) * rows * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4)


def check(cf: bool) -> tuple[bool, int]:
    """(every element at its place, the most distinct words one bank holds in a half-warp of any store)."""
    same, worst = True, 0
    for wg in (0, 1):
        for warp in range(4):
            for half in (0, 1):
                for nt in range(8):
                    banks = [defaultdict(set), defaultdict(set)]
                    for lane in range(32):
                        g, t = lane >> 2, lane & 3
                        qr0, qc0 = 64 * wg + 16 * warp + g, 2 * t
                        r, col = qr0 + 8 * half, qc0 + 8 * nt
                        off = sw128(r, col >> 2) + (col & 3) * 4
                        odd = cf and (qr0 & 1)
                        elem = nt ^ 2 if odd else nt
                        at = off ^ (64 if odd else 0)
                        ce = qc0 + 8 * elem
                        same &= at == sw128(r, ce >> 2) + (ce & 3) * 4
                        for w in (at // 4, at // 4 + 1):
                            banks[lane >> 4][w % 32].add(w)
                    worst = max(worst, *(len(v) for b in banks for v in b.values()))
    return same, worst


def main() -> int:
    base_same, base_worst = check(False)
    cf_same, cf_worst = check(True)
    print(f"without CF: every element at its place {base_same}, up to {base_worst} words per bank per half-warp")
    print(f"with CF:    every element at its place {cf_same}, up to {cf_worst} words per bank per half-warp")
    return 0 if cf_same and cf_worst == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
