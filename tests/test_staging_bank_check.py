"""tools/staging_bank_check.py: the v6 D = 64 staging's float2 stores keep every dQ element at its swizzled place with
item 14 (CF) and touch each bank once per half-warp, where the default form touches banks twice (the 2-way conflicts
ncu counted)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import staging_bank_check as sbc  # noqa: E402


def test_cf_keeps_places_and_removes_conflicts(capsys):
    assert sbc.check(False) == (True, 2)
    assert sbc.check(True) == (True, 1)
    assert sbc.main() == 0
    assert "with CF:    every element at its place True, up to 1" in capsys.readouterr().out
