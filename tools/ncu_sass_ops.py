"""Instruction mix per kernel from `ncu --page source --csv --print-source sass` (several kernels allowed).

Usage: python tools/ncu_sass_ops.py FILE.csv[.gz] [KERNEL_REGEX]
Prints, per kernel whose name matches: executed instructions by opcode, warp-stall samples by
opcode and the wgmma (HGMMA) shapes with their counts. Counts only, no instruction text: what
benchmarks/gpu_breakdown_run.sh keeps of a library's kernel (cuDNN's) instead of its SASS.
"""
import csv
import gzip
import io
import re
import sys
from collections import Counter


def _num(x):
    try:
        return float(str(x).replace(",", ""))
    except ValueError:
        return 0.0


def kernels(path):
    """{kernel name: rows of its SASS table}."""
    raw = gzip.open(path, "rt", errors="replace") if path.endswith(".gz") else open(path, errors="replace")
    blocks = re.split(r'(?m)^"Kernel Name",', raw.read())
    out = {}
    for b in blocks[1:]:
        lines = b.splitlines()
        out[lines[0].strip().strip(",").strip('"')] = list(csv.DictReader(io.StringIO("\n".join(lines[1:]))))
    return out


def main() -> int:
    pat = sys.argv[2] if len(sys.argv) > 2 else "."
    for name, rows in kernels(sys.argv[1]).items():
        if not re.search(pat, name):
            continue
        ex, st, hg = Counter(), Counter(), Counter()
        for r in rows:
            w = r.get("Source", "").split()
            if not w:
                continue
            op = w[1] if w[0].startswith("@") and len(w) > 1 else w[0]
            e = _num(r.get("Instructions Executed", 0))
            ex[op.split(".")[0]] += e
            st[op.split(".")[0]] += _num(r.get("Warp Stall Sampling (All Samples)", 0))
            if op.startswith("HGMMA"):
                hg[op] += e
        tot, stot = sum(ex.values()), sum(st.values()) or 1
        print(f"{name[:150]}\n  executed {tot / 1e6:.1f}M instructions, {len(rows)} static")
        print("  executed by opcode: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in ex.most_common(28)))
        print("  stall samples by opcode: " + ", ".join(f"{k} {100 * v / stot:.1f}%" for k, v in st.most_common(16)))
        print("  wgmma: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in hg.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
