"""Top SASS instructions by warp-stall samples from `ncu --page source --csv --print-source sass`.

Usage: python tools/ncu_sass_top.py FILE.csv[.gz] [N]
Prints the N instructions with the most samples (with the stall reasons that dominate each, where
the CSV has per-reason columns) and the samples summed per opcode.
"""
import csv
import gzip
import io
import sys
from collections import Counter


def num(x) -> float:
    """A CSV cell as a number (thousands separators dropped; 0 for anything else)."""
    try:
        return float(str(x).replace(",", ""))
    except ValueError:
        return 0.0


def load(path: str):
    """The export's instruction rows (dicts, one per SASS instruction) and the name of its all-samples column."""
    raw = gzip.open(path, "rt", errors="replace") if path.endswith(".gz") else open(path, errors="replace")
    with raw:
        lines = raw.read().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith('"') and "Source" in ln)
    rows = list(csv.DictReader(io.StringIO("\n".join(lines[start:]))))
    if not rows:
        raise SystemExit(f"{path}: no instruction rows")
    return rows, next(c for c in rows[0] if "Sampling (All" in c)


def main() -> int:
    path = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    rows, total_col = load(path)
    cols = list(rows[0].keys())
    reason_cols = [c for c in cols if c.lower().startswith("stall_") or "(stall" in c.lower()]

    tot = sum(num(r[total_col]) for r in rows)
    print(f"{len(rows)} instructions, {tot:.0f} samples ({total_col}); reason columns: {len(reason_cols)}")
    by_op = Counter()
    for r in rows:
        words = r.get("Source", "").split()
        op = words[1] if words and words[0].startswith("@") and len(words) > 1 else (words[0] if words else "")
        by_op[op.split(".")[0]] += num(r[total_col])
    print("per opcode:", ", ".join(f"{k} {100 * v / tot:.1f}%" for k, v in by_op.most_common(14)))
    for r in sorted(rows, key=lambda r: -num(r[total_col]))[:n]:
        reasons = sorted(((num(r[c]), c) for c in reason_cols), reverse=True)[:3]
        rs = " ".join(f"{c.replace('stall_', '')}={v:.0f}" for v, c in reasons if v > 0)
        print(f"{100 * num(r[total_col]) / tot:5.1f}%  {r.get('Address', '')[-5:]:>5}  {r.get('Source', '')[:70]:70s} {rs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
