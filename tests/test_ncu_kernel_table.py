"""tools/ncu_kernel_table.py on a synthetic `ncu --page raw --csv` export: units converted (ncu writes durations
as ns / us / ms or nsecond / usecond / msecond by version), missing metrics shown as "-", an unknown unit never
turned into a number, stall reasons ordered."""
import csv
import gzip
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import ncu_kernel_table  # noqa: E402

NAMES = ["ID", "Kernel Name", "gpu__time_duration.sum", "sm__cycles_elapsed.avg.per_second", "launch__grid_size",
         "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
         "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio",
         "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",
         "smsp__average_warps_issue_stalled_wait_per_issue_active.ratio"]


def _write(path, time_unit, freq_unit, rows):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(NAMES)
        w.writerow(["", "", time_unit, freq_unit, "", "%", "", "", ""])
        for r in rows:
            w.writerow(r)


def _table(capsys, path):
    assert ncu_kernel_table.main([str(path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def test_units_and_stalls(tmp_path, capsys):
    p = tmp_path / "raw.csv.gz"
    _write(p, "ms", "Ghz", [["0", "kernel_a", "0.411296", "1.78", "132", "67.3", "1.2", "0.67", "1.40"],
                            ["1", "kernel_b", "5.047072", "1.79", "3,168", "72.3", "1.14", "0.61", "1.41"]])
    a, b = _table(capsys, p)
    assert a["kernel"] == "kernel_a" and a["us"] == "411" and a["SM GHz"] == "1.78" and a["grid"] == "132"
    assert b["us"] == "5047" and b["grid"] == "3168" and b["tensor %"] == "72.3"
    assert a["top stalls (warps per issue)"] == "wait 1.40, barrier 1.20, long_scoreboard 0.67"
    assert a["issue %"] == "-" and a["DRAM %"] == "-"  # metrics the export lacks


def test_other_unit_spellings(tmp_path, capsys):
    p = tmp_path / "raw.csv"
    _write(p, "nsecond", "cycle/nsecond", [["0", "k", "411296", "1.78", "1", "1", "0", "0", "0"]])
    (row,) = _table(capsys, p)
    assert row["us"] == "411" and row["SM GHz"] == "1.78"
    _write(p, "fortnight", "furlong", [["0", "k", "411296", "1.78", "1", "1", "0", "0", "0"]])
    (row,) = _table(capsys, p)
    assert row["us"] == "-" and row["SM GHz"] == "-"  # unknown units: no number rather than a wrong one
