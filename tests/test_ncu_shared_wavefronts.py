"""tools/ncu_shared_wavefronts.py on a synthetic `ncu --page source --csv --print-source sass` export: wavefronts are
summed by kind (HGMMA by shape and by where its A operand comes from, shared loads / stores by width), shares are of
all shared wavefronts, and --steps divides by the tile steps."""
import csv
import gzip
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import ncu_shared_wavefronts as nsw  # noqa: E402

COLS = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed", "L1 Wavefronts Shared"]
# (source, executed, wavefronts)
PROGRAM = [
    ("HGMMA.64x64x16.F32.BF16 R152, gdesc[UR24], RZ, !UPT", 100, 800),
    ("HGMMA.64x64x16.F32.BF16 R152, gdesc[UR24], R152, gsb0", 100, 800),
    ("HGMMA.64x128x16.F32.BF16 R88, R184, gdesc[UR20].tnspB, R88", 100, 800),
    ("LDS.64 R216, [R222]", 100, 200),
    ("@!P2 STS.64 [R14], R152", 100, 400),
    ("FFMA.FTZ R184, R184, R15, -R216", 100, 0),
]


def _write(path):
    with gzip.open(path, "wt", newline="") as f:
        f.write("==PROF== Connected to process\n")
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        w.writerow(COLS)
        for i, (src, ex, wf) in enumerate(PROGRAM):
            w.writerow([hex(0x7F0000000000 + 16 * i), "      " + src, 1, ex, wf])


def test_kinds_shares_and_steps(tmp_path, capsys):
    p = tmp_path / "sass.csv.gz"
    _write(p)
    assert nsw.main([str(p), "--steps", "10"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == "0.00 M shared-memory wavefronts, 300 per step"
    rows = {r[0]: r[1:] for r in ([c.strip() for c in ln.strip("|").split("|")] for ln in out[3:])}
    assert set(rows) == {"HGMMA.64x64x16 SS", "HGMMA.64x128x16 RS", "STS.64", "LDS.64"}
    # SS: 1600 of 3000 wavefronts, 8 per execution, 160 per step; the predicated store is still a store
    assert rows["HGMMA.64x64x16 SS"][1:] == ["53.3%", "8.0", "160"]
    assert rows["HGMMA.64x128x16 RS"][1:] == ["26.7%", "8.0", "80"]
    assert rows["STS.64"][1:] == ["13.3%", "4.0", "40"]
    assert rows["LDS.64"][1:] == ["6.7%", "2.0", "20"]


def test_bad_steps_and_missing_column(tmp_path):
    p = tmp_path / "sass.csv.gz"
    _write(p)
    with pytest.raises(SystemExit):
        nsw.main([str(p), "--steps", "-1"])
    q = tmp_path / "plain.csv"
    with open(q, "w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        w.writerow(["Address", "Source", "Warp Stall Sampling (All Samples)"])
        w.writerow(["0x10", "      NOP", 1])
    with pytest.raises(SystemExit, match="L1 Wavefronts Shared"):
        nsw.main([str(q)])
