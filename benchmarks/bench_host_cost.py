"""The host (CPU) time of one attention call, taca against PyTorch SDPA, in one process.

Question: where a training step is bound by the host (SD3.5-Medium-sized at batch 1, KERNEL_LOG
forty-fourth session), what does each attention call cost the CPU? The shape is tiny (B 1, 2 heads,
256 + 64 tokens, D 64, bf16), so the GPU finishes every kernel long before the next call is issued:
back-to-back calls without a sync measure the host path alone (Python, dispatch, autograd, the C++
host code, the launches). One sync at the end of each timed loop; the median of --rounds loops.

Cases (each forward alone, with torch.no_grad, and forward + backward under autograd):
  joint        taca.joint_attention(backend="cuda", layout "bnhd", gamma 1.2): the public call the processors make
  op           torch.ops.taca.fwd directly (the registered op and its C++ autograd node): joint's Python removed
  sdpa-flash   F.scaled_dot_product_attention on the flash backend (what stock training runs)
  sdpa-eff     the memory-efficient backend
  sdpa-cudnn   cuDNN (forward only: its backward is not used on the device machine)
The backward's host time two ways: (fwd+bwd) - fwd, and directly ("bwd direct": --calls outputs made first under
autograd, then only their .backward() calls timed). The difference form moved with the order of the cases (the
forty-sixth session: joint's backward 7 us more than the op's with joint timed first, even with it timed second).

Run: python benchmarks/bench_host_cost.py --out DIR [--calls 400] [--rounds 5]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _time_loop(fn, calls: int) -> float:
    """Microseconds per call of `calls` back-to-back calls, one sync at the end."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def _time_bwd(fg, dout, calls: int) -> float:
    """Microseconds per .backward() of `calls` outputs of fg (made first, untimed), back to back, one sync at the end."""
    outs = [fg() for _ in range(calls)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for o in outs:
        o.backward(dout)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def cases(B=1, H=2, n_img=256, n_txt=64, D=64, dtype=torch.bfloat16):
    import taca
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = torch.device("cuda")
    N = n_img + n_txt
    g = torch.Generator(device=dev).manual_seed(0)
    mk = lambda: torch.randn(B, N, H, D, device=dev, dtype=dtype, generator=g)  # noqa: E731
    q, k, v = mk(), mk(), mk()
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    dout = torch.randn(B, N, H, D, device=dev, dtype=dtype, generator=g)
    # SDPA takes (B, H, N, D): transposed views, as diffusers' processors pass them
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    qtg, ktg, vtg = (t.detach().transpose(1, 2).requires_grad_(True) for t in (q, k, v))
    doutt = dout.transpose(1, 2)

    def joint(a, b, c):
        return taca.joint_attention(a, b, c, text_len=n_txt, text_first=True, gamma=1.2, layout="bnhd",
                                    backend="cuda")

    # the registered op itself, as _kernel_forward calls it for an int text span (no Python around it)
    gamma_vec = torch.full((B,), 1.2, device=dev, dtype=torch.float32)
    scale = D ** -0.5

    def op(a, b, c):
        return torch.ops.taca.fwd(a, b, c, gamma_vec, 1.0, scale, 0, n_txt, False)[0]

    def sdpa(backend):
        def f(a, b, c):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(a, b, c)
        return f

    # name -> (forward, forward under autograd returning its output, that output's gradient); None: no backward
    out = {}
    out["joint"] = (lambda: joint(q, k, v), lambda: joint(qg, kg, vg), dout)
    out["op"] = (lambda: op(q, k, v), lambda: op(qg, kg, vg), dout)
    out["sdpa-flash"] = (lambda: sdpa(SDPBackend.FLASH_ATTENTION)(qt, kt, vt),
                         lambda: sdpa(SDPBackend.FLASH_ATTENTION)(qtg, ktg, vtg), doutt)
    out["sdpa-eff"] = (lambda: sdpa(SDPBackend.EFFICIENT_ATTENTION)(qt, kt, vt),
                       lambda: sdpa(SDPBackend.EFFICIENT_ATTENTION)(qtg, ktg, vtg), doutt)
    out["sdpa-cudnn"] = (lambda: sdpa(SDPBackend.CUDNN_ATTENTION)(qt, kt, vt), None, None)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_host_cost.py needs a CUDA device")
    cs = cases()
    res = {name: {"fwd": [], "fwd_bwd": [], "bwd": []} for name in cs}
    for name, (f, fg, d) in cs.items():  # warm-up (first-call set-up, autotuning, caches)
        for _ in range(20):
            with torch.no_grad():
                f()
            if fg is not None:
                fg().backward(d)
    for r in range(args.rounds):
        names = list(cs)
        names = names[r % len(names):] + names[:r % len(names)]
        for name in names:
            f, fg, d = cs[name]
            with torch.no_grad():
                res[name]["fwd"].append(_time_loop(f, args.calls))
            if fg is not None:
                res[name]["fwd_bwd"].append(_time_loop(lambda fg=fg, d=d: fg().backward(d), args.calls))
                res[name]["bwd"].append(_time_bwd(fg, d, args.calls))
    rows = []
    for name, d in res.items():
        fwd = statistics.median(d["fwd"])
        fb = statistics.median(d["fwd_bwd"]) if d["fwd_bwd"] else None
        bd = statistics.median(d["bwd"]) if d["bwd"] else None
        rows.append({"case": name, "fwd_us": fwd, "fwd_bwd_us": fb, "bwd_us": None if fb is None else fb - fwd,
                     "bwd_direct_us": bd, "fwd_rounds": d["fwd"], "fwd_bwd_rounds": d["fwd_bwd"],
                     "bwd_direct_rounds": d["bwd"]})
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, "calls": args.calls,
            "rounds": args.rounds, "shape": "B1 H2 N 256+64 D64 bf16 bnhd"}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "host_cost.json"), "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    print(f"host time per call, us ({meta['device']}, {args.calls} calls x {args.rounds} rounds, medians)")
    print("| case | fwd | fwd+bwd | bwd (difference) | bwd direct |")
    print("|---|---|---|---|---|")
    for r in rows:
        fb, bw, bd = ("-" if r[key] is None else f"{r[key]:.1f}" for key in ("fwd_bwd_us", "bwd_us", "bwd_direct_us"))
        print(f"| {r['case']} | {r['fwd_us']:.1f} | {fb} | {bw} | {bd} |")


if __name__ == "__main__":
    main()
