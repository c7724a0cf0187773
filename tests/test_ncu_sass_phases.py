"""tools/ncu_sass_phases.py on a synthetic `ncu --page source --csv --print-source sass` export: the tile loop is
found by its latch (not by an mbarrier retry block's jump back, which runs less often, nor by the retry loop that
runs more often but holds few samples), phases start at wgmma waits, barriers, mbarrier waits and the first HGMMA of
each run, shares are of all the kernel's samples, and small phases fold into the one before."""
import csv
import gzip
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import ncu_sass_phases  # noqa: E402

BASE = 0x7F0000000000
COLS = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Warp Stall Sampling (Not-issued Samples)",
        "Instructions Executed", "stall_wait", "stall_barrier", "stall_long_sb", "stall_long_sb (Not Issued)"]

# (offset / 16, source, samples, executed, wait, barrier, long_sb); branch targets are absolute addresses
PROGRAM = [
    (0, "S2R R0, SR_TID.X", 1, 10, 0, 0, 0),
    (1, "IMAD R1, R0, 0x2, RZ", 4, 100, 4, 0, 0),  # loop head
    (2, "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [R1], R2", 2, 100, 0, 0, 2),
    (3, "@!P0  BRA {retry}", 1, 100, 0, 0, 1),
    (4, "HGMMA.64x64x16.F32.BF16 R8, gdesc[UR4], RZ, !UPT", 10, 100, 10, 0, 0),
    (5, "HGMMA.64x64x16.F32.BF16 R8, gdesc[UR4], R8, gsb0", 10, 100, 10, 0, 0),
    (6, "WARPGROUP.DEPBAR.LE gsb0, 0x0", 30, 100, 0, 30, 0),
    (7, "MUFU.EX2 R9, R9", 1, 100, 1, 0, 0),
    (8, "BAR.SYNC.DEFER_BLOCKING 0x1, 0x100", 20, 100, 0, 20, 0),
    (9, "FADD R3, R3, R9", 2, 100, 2, 0, 0),
    (10, "@!P1  BRA {head}", 1, 100, 1, 0, 0),  # the latch
    (11, "EXIT", 0, 10, 0, 0, 0),
    (12, "YIELD", 0, 500, 0, 0, 0),  # retry block: a tight loop that runs often but holds little
    (13, "@!P0  BRA {retry}", 3, 500, 0, 0, 3),
    (14, "BRA {after_wait}", 0, 20, 0, 0, 0),  # jump back into the loop: runs only on retries
]


def _write(path):
    sub = {"head": hex(BASE + 16), "retry": hex(BASE + 12 * 16), "after_wait": hex(BASE + 4 * 16)}
    with gzip.open(path, "wt", newline="") as f:
        f.write("==PROF== Connected to process\n")
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        w.writerow(COLS)
        for off, src, samples, ex, wait, barrier, long_sb in PROGRAM:
            w.writerow([hex(BASE + off * 16), "      " + src.format(**sub), samples, samples, ex, wait, barrier,
                        long_sb, long_sb])


def _run(capsys, path, *extra):
    assert ncu_sass_phases.main([str(path), *extra]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in out[3:]]
    return out[0], rows


def test_finds_the_latch_and_splits_phases(tmp_path, capsys):
    p = tmp_path / "sass.csv.gz"
    _write(p)
    head, rows = _run(capsys, p, "--min", "0")
    total = sum(r[2] for r in PROGRAM)  # 85
    loop = sum(r[2] for r in PROGRAM[1:11])  # 81
    assert head.startswith(f"loop {hex(BASE + 16)}..{hex(BASE + 160)} (10 instructions, executed 100 x)")
    assert f"{100 * loop / total:.1f}% of {total} samples" in head
    starts = [r[1].split()[0] for r in rows]
    # the loop head, the mbarrier wait, the HGMMA run, the wgmma wait, the barrier
    assert starts == ["00010", "00020", "00040", "00060", "00080"]
    shares = [float(r[0].rstrip("%")) for r in rows]
    assert shares == pytest.approx([round(100 * s / total, 1) for s in (4, 3, 20, 31, 23)], abs=0.05)
    assert "barrier=30" in rows[3][3] and "WARPGROUP.DEPBAR" in rows[3][2]


def test_min_folds_small_phases(tmp_path, capsys):
    p = tmp_path / "sass.csv.gz"
    _write(p)
    _, rows = _run(capsys, p, "--min", "5")
    # the 3-sample mbarrier phase (3.5%) folds into the loop head's (4.7%): 8.2% together
    assert [r[1].split()[0] for r in rows] == ["00010", "00040", "00060", "00080"]
    assert float(rows[0][0].rstrip("%")) == pytest.approx(100 * 7 / 85, abs=0.05)


def test_explicit_loop(tmp_path, capsys):
    p = tmp_path / "sass.csv.gz"
    _write(p)
    head, rows = _run(capsys, p, "--loop", "00040:00090", "--min", "0")
    assert head.startswith(f"loop {hex(BASE + 64)}..{hex(BASE + 144)} (6 instructions")
    assert [r[1].split()[0] for r in rows] == ["00040", "00060", "00080"]
    with pytest.raises(SystemExit):
        ncu_sass_phases.main([str(p), "--loop", "0:00090"])  # "0" ends many addresses: ambiguous
