"""How much of the ratios to cuDNN is host time: the same calls timed eagerly and replayed from CUDA graphs.

triton's do_bench (what bench_attention_gpu.py uses) records each call's start event right after its L2 flush; a
call whose host part (Python, argument checks, tensor maps, the launches) outlasts the flush on the GPU shows that
difference in its time. A training or sampling step queues its attention calls while the GPU is busy, so there the
host part is hidden. do_bench_cudagraph captures the calls in one CUDA graph (several unrolled calls, replayed) and
measures device time only: the two columns bound where the kernels stand with and without host exposure.

Methods (same process, rounds rotated): taca's public op (gamma 1.2, deterministic and unordered backward) and plain
cuDNN SDPA (no gamma), forward alone and forward + backward (autograd, grads dropped each call).

Usage: python3 benchmarks/bench_graph.py [--shapes flux1024_b1,flux1024_b2,sd35m_cfg] [--rounds 3] [--out DIR]
Prints a table last; writes graph_timing.json to DIR.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

METHODS = ("taca_cuda", "taca_cuda_nondet", "plain_cudnn")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="flux1024_b1,flux1024_b2,sd35m_cfg")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds: expected a positive integer, got {args.rounds}")
    from bench_attention_gpu import EXTRA_SHAPES, SHAPES, _methods

    shapes = {**SHAPES, **EXTRA_SHAPES}
    names = [s for s in args.shapes.split(",") if s]
    bad = [s for s in names if s not in shapes]
    if not names or bad:
        ap.error(f"--shapes: unknown {bad or names!r}; expected some of {sorted(shapes)}")
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    from triton.testing import do_bench, do_bench_cudagraph

    res = {s: {f"{m}_{p}_{mode}": [] for m in METHODS for p in ("fwd", "fb") for mode in ("eager", "graph")}
           for s in names}
    def one_shape(s, r):
        B, H, D, L, n_img, tf = shapes[s]
        N = L + n_img
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, do = (torch.randn(B, H, N, D, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(4))
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
        ms = {m: f for m, (f, _) in _methods(shapes[s], True, None, False).items() if m in METHODS}
        calls = []
        for m, f in ms.items():
            def fwd(f=f):
                return f(q, k, v)

            def fb(f=f):
                o = f(qg, kg, vg)
                torch.autograd.backward(o, do)
                qg.grad = kg.grad = vg.grad = None
            calls += [(f"{m}_fwd", fwd), (f"{m}_fb", fb)]
        calls = calls[r % len(calls):] + calls[:r % len(calls)]  # no method keeps a position
        side = torch.cuda.Stream()  # graphs are captured off the default stream
        for name, fn in calls:
            res[s][f"{name}_eager"].append(do_bench(fn, warmup=10, rep=60, return_mode="median"))
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                res[s][f"{name}_graph"].append(do_bench_cudagraph(fn, rep=60, return_mode="median"))
            torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()

    t0 = time.time()
    for r in range(args.rounds):
        for s in names:
            one_shape(s, r)
            torch.cuda.empty_cache()
        print(f"round {r + 1}/{args.rounds} done ({time.time() - t0:.0f} s)", flush=True)

    med = {s: {k: statistics.median(v) for k, v in d.items() if v} for s, d in res.items()}
    out = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "rounds": args.rounds,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "median_ms": med, "raw_ms": res}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "graph_timing.json"), "w") as fh:
            json.dump(out, fh, indent=1)
    print(f"GPU {out['gpu']}, torch {out['torch']}; ms, medians of {args.rounds} rounds; x cuDNN = cuDNN's time over "
          "the method's (> 1: faster), eager (do_bench) and CUDA graph (do_bench_cudagraph)")
    print("| shape | method | fwd eager | fwd graph | fwd x cuDNN eager / graph | f+b eager | f+b graph | "
          "f+b x cuDNN eager / graph |")
    print("|---|---|---|---|---|---|---|---|")
    for s in names:
        d = med[s]
        for m in METHODS:
            cells = []
            for p in ("fwd", "fb"):
                e, g = d[f"{m}_{p}_eager"], d[f"{m}_{p}_graph"]
                ce, cg = d[f"plain_cudnn_{p}_eager"], d[f"plain_cudnn_{p}_graph"]
                cells += [f"{e:.4f}", f"{g:.4f}", f"{ce / e:.3f} / {cg / g:.3f}"]
            print(f"| {s} | {m} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
