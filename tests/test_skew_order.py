"""The backward's skewed walk (tools/skew_order_check.py, a mirror of csrc/cuda taca_bwd_kernel.cuh skew_tile /
skew_rank): every chain link's rank for a tile follows the order of the links' visits, so no link waits on one that
visits later (no wait cycle). A smaller range than the tool's default, to stay fast; the GPU tests run the kernels."""
from __future__ import annotations

import importlib.util
import pathlib

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "skew_order_check", pathlib.Path(__file__).resolve().parents[1] / "tools" / "skew_order_check.py")
skew = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(skew)


def test_ranks_follow_the_visits():
    applied = 0
    for nqt in range(1, 30):
        for nk in range(2, 30):
            for nseg in range(1, 9):
                applied += skew.check(nqt, nk, (nk + nseg - 1) // nseg)
    assert applied > 1000  # the skew applied in most of them (chains no longer than the query tiles)


def test_flux_1024_chain():
    """FLUX 1024's layout (72 query tiles, 36 key tiles in two chains of 18): the last tile's order starts at the
    link that visits it first (link 1 of each chain, at step 0) and ends with link 0."""
    assert skew.check(72, 36, 18)
    order = sorted(range(18), key=lambda p: skew.skew_rank(71, p, 18, 0, 72))
    assert order == list(range(1, 18)) + [0]


def test_longer_chain_than_tiles_is_refused():
    assert skew.check(4, 16, 8) is False


@pytest.mark.parametrize("nqt,p", [(5, 0), (5, 3), (72, 17)])
def test_every_link_heads_its_first_tile(nqt, p):
    """At step 0 each link takes the tile it is the head of (rank 0): no link waits at its start."""
    length = min(18, nqt)
    soff = (nqt - p % nqt) % nqt
    assert skew.skew_rank(skew.skew_tile(0, soff, nqt), p % length, length, 0, nqt) == 0
