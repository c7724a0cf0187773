"""Check the backward's skew (csrc/cuda/taca_bwd_sm90_v6.cu item 10; taca_bwd_kernel.cuh skew_tile / skew_rank)
on the CPU, for every flattened query-tile count nqt < --max, key-tile count 2 <= nk < --max and 1..8 chains where
the skew applies (chain length <= nqt): for every chain and tile, the links' ranks are a permutation of 0 .. len - 1
and follow the order of the links' visits (the step at which each link takes the tile), so a link only ever waits on
a link that visited the tile at an earlier step: no wait cycle. A mirror of the CUDA expressions, kept to make the
KERNEL_LOG's "checked exhaustively" reproducible; the GPU tests check the kernels themselves.

    python3 tools/skew_order_check.py [--max 80]
"""
from __future__ import annotations

import argparse


def skew_tile(it: int, soff: int, nqt: int) -> int:
    return it + soff if it + soff < nqt else it + soff - nqt


def skew_rank(x: int, p: int, length: int, chain0: int, nqt: int) -> int:
    y = x + chain0 % nqt
    if y >= nqt:
        y -= nqt
    head = nqt - y if y > nqt - length else 0
    return p - head if p >= head else p - head + length


def check(nqt: int, nk: int, seg_size: int) -> bool:
    """False where the skew does not apply (a chain longer than nqt); raises AssertionError on a wrong order."""
    if seg_size > nqt:
        return False
    for seg in range((nk + seg_size - 1) // seg_size):
        length = min(seg_size, nk - seg * seg_size)
        chain0 = seg * seg_size
        visits: dict[int, list[tuple[int, int]]] = {}
        for p in range(length):
            jt = chain0 + p
            soff = (nqt - jt % nqt) % nqt
            for step in range(nqt):
                x = skew_tile(step, soff, nqt)
                visits.setdefault(x, []).append((step, skew_rank(x, p, length, chain0, nqt)))
        assert len(visits) == nqt, (nqt, nk, seg_size, "not every tile visited")
        for x, v in visits.items():
            ranks = [r for _, r in sorted(v)]
            assert ranks == list(range(length)), (nqt, nk, seg_size, x, sorted(v))
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max", type=int, default=80)
    a = ap.parse_args()
    n = 0
    for nqt in range(1, a.max):
        for nk in range(2, a.max):
            for nseg in range(1, 9):
                n += check(nqt, nk, (nk + nseg - 1) // nseg)
    print(f"ok: {n} (nqt, nk, chains) configurations with the skew, every tile's ranks in visit order")


if __name__ == "__main__":
    main()
