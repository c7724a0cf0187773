"""Where does deterministic=False lose at FLUX 2048? (a diagnostic, one process, H100 / H200)

The full table (bench_attention_gpu.py) had FLUX 2048 b1 fwd+bwd with deterministic=False 12% slower than the
default (23.88 against 21.33 ms, thirty-sixth session; 24.46 / 21.59 the session before), while the backward alone
(bench_bwd_handoff.py "+nd", one mode per process) was 1.6% faster unordered. The op's two modes differ in the call
as well as in the backward's dQ: with deterministic=False, joint_attention passes the query text span explicitly
(equal to the key span) to taca::fwd and taca::bwd, where the default passes -1; the binding (check_common) resolves
-1 to the key span, so the kernels get the same integers either way, and the span forms are timed only to rule the
call path out. This times each piece in one process, rounds interleaved (triton do_bench median, 300 ms each, where
the table's fwd+bwd takes 100 ms: about five FLUX 2048 iterations), so the difference can be told apart:
  fwd -1 / fwd qspan     taca::fwd with the query span implicit / explicit
  bwd det|nd -1|qspan    taca::bwd alone (the forward's out and lse as inputs), ordered or unordered dQ
  f+b det / f+b nd       joint_attention forward + backward through autograd, as the table times it

Written in the thirty-sixth session, whose device time ran out before it ran: run on the CPU ops only (a tiny shape,
the device and dtype swapped), never yet on a GPU.

Usage: python3 benchmarks/bench_nondet_paths.py [--shapes flux2048_b1,flux1024_b2] [--rounds 3] [--out DIR]
Prints a table last; writes bench_nondet_paths.json to DIR.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import taca  # noqa: E402
from taca import ops as _ops, reference  # noqa: E402,F401  (ops loads taca._C: torch.ops.taca)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention_gpu import EXTRA_SHAPES, GAMMA, SHAPES  # noqa: E402


def _cases(name):
    B, H, D, L, n_img, tf = {**SHAPES, **EXTRA_SHAPES}[name]
    N = L + n_img
    tb, te = reference.text_range(N, L, tf)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    qn, kn, vn, don = (t.detach().transpose(1, 2) for t in (q, k, v, do))
    g = torch.full((B,), GAMMA, device="cuda", dtype=torch.float32)
    s = 1.0 / math.sqrt(D)
    out, lse, _ = torch.ops.taca.fwd(qn, kn, vn, g, 1.0, s, tb, te, False)
    ops = torch.ops.taca

    def fb(det):
        def run():
            o = taca.joint_attention(q, k, v, text_len=L, text_first=tf, gamma=g, layout="bhnd", backend="cuda",
                                     deterministic=det)
            o.backward(do)
        return run

    cases = {
        "fwd -1": lambda: ops.fwd(qn, kn, vn, g, 1.0, s, tb, te, False),
        "fwd qspan": lambda: ops.fwd(qn, kn, vn, g, 1.0, s, tb, te, False, tb, te, None, None, True),
        "bwd det -1": lambda: ops.bwd(don, qn, kn, vn, out, lse, g, 1.0, s, tb, te, -1, -1, None, None, True),
        "bwd det qspan": lambda: ops.bwd(don, qn, kn, vn, out, lse, g, 1.0, s, tb, te, tb, te, None, None, True),
        "bwd nd -1": lambda: ops.bwd(don, qn, kn, vn, out, lse, g, 1.0, s, tb, te, -1, -1, None, None, False),
        "bwd nd qspan": lambda: ops.bwd(don, qn, kn, vn, out, lse, g, 1.0, s, tb, te, tb, te, None, None, False),
        "f+b det": fb(True),
        "f+b nd": fb(False),
    }
    return cases, (q, k, v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="flux2048_b1,flux1024_b2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    known = {**SHAPES, **EXTRA_SHAPES}
    for name in args.shapes.split(","):
        if name not in known:
            ap.error(f"--shapes: {name!r}: expected one of {', '.join(known)}")
    if args.rounds < 1:
        ap.error(f"--rounds: expected >= 1, got {args.rounds}")
    from triton.testing import do_bench

    gpu = torch.cuda.get_device_name()
    res = {}
    for name in args.shapes.split(","):
        cases, grads = _cases(name)
        times = {c: [] for c in cases}
        for r in range(args.rounds):
            order = list(cases)[r % len(cases):] + list(cases)[:r % len(cases)]
            for c in order:
                times[c].append(do_bench(cases[c], warmup=50, rep=300, grad_to_none=list(grads),
                                         return_mode="median"))
        res[name] = {c: {"ms": t, "median": statistics.median(t)} for c, t in times.items()}
        del cases, grads
        torch.cuda.empty_cache()
    print(f"GPU: {gpu}; torch {torch.__version__}; bf16, gamma {GAMMA}; median of {args.rounds} rounds "
          "(each a do_bench median), ms")
    cols = list(next(iter(res.values())))
    print("| shape | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name, r in res.items():
        print(f"| {name} | " + " | ".join(f"{r[c]['median']:.3f}" for c in cols) + " |")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_nondet_paths.json"), "w") as f:
            json.dump({"gpu": gpu, "torch": torch.__version__, "results": res}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
