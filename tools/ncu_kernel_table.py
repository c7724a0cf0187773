"""One row per profiled kernel from `ncu --import X.ncu-rep --page raw --csv`: duration (us), SM clock, issue
activity, tensor-pipe activity, DRAM throughput, L2 hit rate, and the stall reasons with the most warps per issued
instruction.

Usage: python tools/ncu_kernel_table.py RAW.csv[.gz] [--columns]  (--columns: list the metric names and exit)
Metrics a given ncu version does not report are shown as "-"; the candidates for each column are tried in order."""
import csv
import gzip
import re
import sys

COLS = [  # (header, candidate metric names)
    ("us", ["gpu__time_duration.sum"]),
    ("SM GHz", ["sm__cycles_elapsed.avg.per_second", "smsp__cycles_elapsed.avg.per_second"]),
    ("grid", ["launch__grid_size"]),
    ("block", ["launch__block_size"]),
    ("regs", ["launch__registers_per_thread"]),
    ("issue %", ["sm__inst_issued.avg.pct_of_peak_sustained_active", "smsp__issue_active.avg.pct_of_peak_sustained_active"]),
    ("tensor %", ["sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",
                  "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
                  "sm__inst_executed_pipe_tensor_op_gmma.avg.pct_of_peak_sustained_active"]),
    ("DRAM %", ["dram__throughput.avg.pct_of_peak_sustained_elapsed", "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed"]),
    ("L2 hit %", ["lts__t_sector_hit_rate.pct"]),
]
# a duration's unit as ncu writes it (its versions differ) -> factor to microseconds
TIME_US = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6, "second": 1e6}
FREQ_GHZ = {"hz": 1e-9, "khz": 1e-6, "mhz": 1e-3, "ghz": 1.0, "cycle/second": 1e-9, "cycle/nsecond": 1.0,
            "cycle/usecond": 1e-3}
STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$")


def num(s):
    try:
        return float(str(s).replace(",", ""))
    except ValueError:
        return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0]
    f = gzip.open(path, "rt", errors="replace") if path.endswith(".gz") else open(path, errors="replace")
    rows = list(csv.reader(f))
    head = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
    names, units, data = rows[head], rows[head + 1], rows[head + 2:]
    if "--columns" in argv:
        print("\n".join(n for n in names))
        return 0
    idx = {n: i for i, n in enumerate(names)}
    kn = idx["Kernel Name"]
    print("| kernel | " + " | ".join(h for h, _ in COLS) + " | top stalls (warps per issue) |")
    print("|---" * (len(COLS) + 2) + "|")
    for r in data:
        if len(r) < len(names):
            continue
        cells = []
        for h, cands in COLS:
            c = next((n for n in cands if n in idx), None)
            v = num(r[idx[c]]) if c else None
            if v is not None and c == "gpu__time_duration.sum":
                f_us = TIME_US.get(units[idx[c]])
                v = v * f_us if f_us is not None else None  # an unknown unit: "-", not a wrong number
            elif v is not None and c.endswith("per_second"):
                f_ghz = FREQ_GHZ.get(units[idx[c]].lower())
                v = v * f_ghz if f_ghz is not None else None
            cells.append("-" if v is None else f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}")
        stalls = sorted(((num(r[i]) or 0.0, m.group(1)) for n, i in idx.items() if (m := STALL.match(n))), reverse=True)
        top = ", ".join(f"{s} {v:.2f}" for v, s in stalls[:5])
        print(f"| {r[kn][:60]} | " + " | ".join(cells) + f" | {top} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
