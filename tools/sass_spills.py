"""Where ptxas spilled: the local-memory accesses (STL / LDL) of each function of a `cuobjdump -sass` listing,
with the instructions around each and the last register-count change (USETMAXREG) above it in the listing.

Usage: python3 tools/sass_spills.py FILE.sass [CONTEXT]   (CONTEXT: instructions shown either side, default 2)
Prints a summary line per function (spill stores / loads), then each spill with its neighbourhood.
"""
from __future__ import annotations

import re
import sys

INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    ctx = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    funcs: list[tuple[str, list[tuple[str, str]]]] = []
    with open(sys.argv[1]) as f:
        for line in f:
            if "Function :" in line:
                funcs.append((line.split("Function :", 1)[1].strip(), []))
                continue
            m = INSN.search(line)
            if m and funcs:
                funcs[-1][1].append((m.group(1), m.group(2)))
    details = []
    for name, insns in funcs:
        spills = [i for i, (_, op) in enumerate(insns) if re.search(r"\b(STL|LDL)\b", op)]
        n_st = sum(1 for i in spills if "STL" in insns[i][1])
        print(f"{name}: {len(insns)} instructions, {n_st} STL, {len(spills) - n_st} LDL")
        region = "entry"
        for i, (_, op) in enumerate(insns):
            if "USETMAXREG" in op:
                region = op
            if i in spills:
                lo, hi = max(0, i - ctx), min(len(insns), i + ctx + 1)
                details.append(f"{name} [{i}/{len(insns)}] after '{region}':\n" +
                               "\n".join(f"  {'>' if j == i else ' '} {insns[j][0]} {insns[j][1]}" for j in range(lo, hi)))
    print()
    print("\n".join(details))
    return 0


if __name__ == "__main__":
    sys.exit(main())
