"""Did a change move a kernel's tile loop? Compare two nvdisasm listings function by function: whole-function
equality, then the loop region (the first HGMMA to `--tail` instructions past the last one) exactly, with register
and predicate numbers normalized away, and as a similarity ratio (difflib) of the normalized sequences.

Why: ptxas reschedules the v6 backward's tile loop on changes outside it (values kept live through it, an
epilogue added after it), and such moves cost 2-7% on an H200 (benchmarks/results/KERNEL_LOG.md, thirteenth and
fourteenth sessions). A loop that is "exact" here is the measured one; anything else needs a timing run.

Usage:
  python3 tools/sass_loop_cmp.py build TREE OUT.sass [--src csrc/cuda/taca_bwd_sm90_v6.cu]
      nvcc -cubin (sm_90a; setup.py's nvcc flags less -lineinfo, which adds no instructions) of TREE's source, then nvdisasm into OUT.sass
      (nvdisasm from PATH, CUDA_HOME/bin, or the `nvidia-cuda-nvdisasm` wheel installed with pip --target DIR and
      named by NVDISASM=DIR/nvidia/cu13/bin/nvdisasm).
  python3 tools/sass_loop_cmp.py cmp A.sass B.sass [--match v6_kernel] [--diff SUBSTRING] [--tail 60]
      one line per function present in both (names containing --match): "identical" or the loop's status;
      --diff prints the normalized loop differences of the first function whose name contains SUBSTRING.
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
import shutil
import subprocess
import sys

_LABEL = re.compile(r"^\s*\.text\.(\S+):")
_INSN = re.compile(r"/\*[0-9a-f]{4,}\*/")


def parse(text: str) -> dict[str, list[str]]:
    """Function name -> its instructions, addresses, encodings, comments, hex immediates and label names removed."""
    out: dict[str, list[str]] = {}
    cur = None
    for line in text.splitlines():
        m = _LABEL.match(line)
        if m:
            cur = m.group(1)
            out[cur] = []
            continue
        if cur is None or not _INSN.search(line):
            continue
        ins = _INSN.sub("", line)
        ins = re.sub(r"/\*.*?\*/", "", ins)
        ins = re.sub(r"0x[0-9a-f]+", "X", ins)
        ins = re.sub(r"\.L_x_\d+", "L", ins)
        ins = re.sub(r"\s+", " ", ins).strip()
        if ins:
            out[cur].append(ins)
    return out


def normalize(insns: list[str]) -> list[str]:
    """Register (R, UR) and predicate (P, UP) numbers replaced by their kind."""
    return [re.sub(r"\bU?R\d+\b", "R", re.sub(r"\bU?P\d\b", "P", x)) for x in insns]


def loop_region(insns: list[str], tail: int = 60) -> list[str]:
    """The first HGMMA to `tail` instructions past the last one; empty without HGMMA."""
    idx = [i for i, x in enumerate(insns) if "HGMMA" in x]
    return insns[idx[0]: idx[-1] + tail] if idx else []


def compare(a: dict[str, list[str]], b: dict[str, list[str]], match: str = "", tail: int = 60) -> list[dict]:
    rows = []
    for name in sorted(set(a) & set(b)):
        if match not in name:
            continue
        ra, rb = loop_region(a[name], tail), loop_region(b[name], tail)
        na, nb = normalize(ra), normalize(rb)
        rows.append({
            "name": name, "identical": a[name] == b[name], "loop_len": (len(ra), len(rb)),
            "loop_exact": ra == rb, "loop_normalized_equal": na == nb,
            "loop_ratio": difflib.SequenceMatcher(None, na, nb, autojunk=False).ratio() if (na or nb) else 1.0,
        })
    return rows


def _nvdisasm() -> str:
    for cand in (os.environ.get("NVDISASM"), shutil.which("nvdisasm"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvdisasm")):
        if cand and os.path.exists(cand):
            return cand
    raise SystemExit("nvdisasm not found: set NVDISASM (pip install --target DIR nvidia-cuda-nvdisasm gives "
                     "DIR/nvidia/cu13/bin/nvdisasm)")


def build(tree: str, out: str, src: str) -> None:
    cubin = os.path.splitext(out)[0] + ".cubin"
    cmd = ["nvcc", "-O3", "-std=c++17", "--use_fast_math", "--expt-relaxed-constexpr",
           "-gencode=arch=compute_90a,code=sm_90a", "-DTACA_HAVE_SM90A=1", "-Icsrc", "-Icsrc/cuda", "-cubin",
           "-o", os.path.abspath(cubin), src]
    subprocess.run(cmd, cwd=tree, check=True)
    with open(out, "w") as f:
        subprocess.run([_nvdisasm(), "-c", os.path.abspath(cubin)], stdout=f, check=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("tree")
    b.add_argument("out")
    b.add_argument("--src", default="csrc/cuda/taca_bwd_sm90_v6.cu")
    c = sub.add_parser("cmp")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--match", default="v6_kernel")
    c.add_argument("--diff", default="")
    c.add_argument("--tail", type=int, default=60)
    args = ap.parse_args(argv)
    if args.cmd == "build":
        build(args.tree, args.out, args.src)
        return 0
    with open(args.a) as f:
        fa = parse(f.read())
    with open(args.b) as f:
        fb = parse(f.read())
    rows = compare(fa, fb, args.match, args.tail)
    if not rows:
        print(f"no function containing {args.match!r} in both listings")
        return 1
    for r in rows:
        if r["identical"]:
            status = "identical"
        elif r["loop_exact"]:
            status = "loop exact (elsewhere different)"
        elif r["loop_normalized_equal"]:
            status = "loop: same instructions, other registers"
        else:
            status = f"loop MOVED (normalized similarity {r['loop_ratio']:.4f})"
        print(f"{status:45s} loop {r['loop_len'][0]}/{r['loop_len'][1]}  {r['name']}")
    if args.diff:
        name = next((r["name"] for r in rows if args.diff in r["name"]), None)
        if name is None:
            print(f"--diff: no compared function contains {args.diff!r}")
            return 1
        na, nb = normalize(loop_region(fa[name], args.tail)), normalize(loop_region(fb[name], args.tail))
        for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, na, nb, autojunk=False).get_opcodes():
            if op != "equal":
                print(op, i1, na[i1:i2][:6], "->", nb[j1:j2][:6])
    return 0


if __name__ == "__main__":
    sys.exit(main())
