"""What the CUDA forward's feature instance (FEAT: per-sample spans or a mask) costs, in one process.

For each shape, the same q / k / v and gamma through taca.joint_attention(backend="cuda") with:
  int          text_len an int (the plain instance)
  spans=       text_len a (B,) tensor equal to the int (FEAT; the same spans, so the same tiles)
  spans<       text_len (L, L // 3): sample 1's text shorter (FEAT; its text/image boundary mid-tile)
  mask1        the int plus an all-True (B, 1, 1, N) bool key mask (FEAT; every tile votes unmasked)
  maskpad      the int plus a key mask hiding sample 1's text past L // 3 (FEAT; padded text keys)
the mask cases again as "<case>@elem" under TACA_FWD_MASK=elem (the per-element path of general masks; on
Hopper a key mask otherwise takes per-tile terms; --mask-modes elem,tile adds "<case>@tile", D = 64's per-tile terms in
the two-consumer kernel instead of the three-consumer default), and plain cuDNN SDPA (no gamma) for scale. Rounds alternate the cases; per case the median of the
rounds' medians (triton do_bench), forward alone and forward + backward; and, per forward, where its
time goes: the device time of its kernels per call (torch.profiler, every CUDA kernel the call launched)
and the host time of the Python call (wall clock of back-to-back calls without a sync; an argument check
that reads a device tensor syncs and shows up here). Prints a table last, writes JSON to --out.

Run: python benchmarks/bench_feat_overhead.py --out DIR [--shapes flux1024_b2,sd35m_cfg] [--rounds 3]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_attention_gpu import EXTRA_SHAPES, SHAPES  # noqa: E402


def _bench(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=60, return_mode="median")


def _split(fn, calls=20):
    """(device ms per call: every CUDA kernel's time under torch.profiler, host ms per call: wall clock of
    back-to-back calls)."""
    import time

    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e3
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    dev_us = sum(getattr(e, "device_time_total", 0.0) or getattr(e, "cuda_time_total", 0.0)
                 for e in prof.key_averages() if getattr(e, "device_type", None) is not None
                 and str(e.device_type).endswith("CUDA"))
    return dev_us / calls / 1e3, host


def cases(B, L, n_img, first, dev):
    n = L + n_img
    short = torch.tensor([L, L // 3], device=dev)
    pad = torch.ones(B, 1, 1, n, dtype=torch.bool)
    lo = L // 3 if first else n_img + L // 3
    hi = L if first else n
    pad[-1, ..., lo:hi] = False
    return {
        "int": dict(text_len=L),
        "spans=": dict(text_len=torch.full((B,), L, device=dev)),
        "spans<": dict(text_len=short if B > 1 else short[:1]),
        "mask1": dict(text_len=L, attn_mask=torch.ones(B, 1, 1, n, dtype=torch.bool, device=dev)),
        "maskpad": dict(text_len=L, attn_mask=pad.to(dev)),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="flux1024_b2,sd35m_cfg")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=".")
    ap.add_argument("--mask-modes", default="elem", help="TACA_FWD_MASK values the mask cases run under too "
                    "(elem: the per-element path; tile: at D = 64 the two-consumer kernel's per-tile terms, nc3 the "
                    "three-consumer default's; a '+X' suffix sets TACA_FWD_KT_ARRIVE=X, e.g. nc3+lane0: lane-0 barrier "
                    "arrivals, the default before)")
    args = ap.parse_args(argv)
    import taca

    dev = torch.device("cuda")
    rows = []
    for name in args.shapes.split(","):
        shapes = {**SHAPES, **EXTRA_SHAPES}  # PERFORMANCE.md's shapes and the other resolutions (768, 1536 px, ...)
        if name not in shapes:
            raise SystemExit(f"--shapes: unknown shape {name!r}; expected some of {sorted(shapes)}")
        B, H, D, L, n_img, first = shapes[name]
        n = L + n_img
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, H, n, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
        dout = torch.randn_like(q)
        cs = cases(B, L, n_img, first, dev)
        fns = {}
        for cname, kw in cs.items():
            for env in ([None, *args.mask_modes.split(",")] if "attn_mask" in kw else [None]):
                def fwd(kw=kw, env=env, q=q, k=k, v=v):
                    if env:  # "<TACA_FWD_MASK>[+X]": +X sets TACA_FWD_KT_ARRIVE=X too
                        mode, _, arrive = env.partition("+")
                        os.environ["TACA_FWD_MASK"] = mode
                        if arrive:
                            os.environ["TACA_FWD_KT_ARRIVE"] = arrive
                    try:
                        return taca.joint_attention(q, k, v, text_first=first, gamma=1.2, backend="cuda", **kw)
                    finally:
                        os.environ.pop("TACA_FWD_MASK", None)
                        os.environ.pop("TACA_FWD_KT_ARRIVE", None)
                fns[cname + (f"@{env}" if env else "")] = fwd
        qg, kg, vg = (x.detach().clone().requires_grad_(True) for x in (q, k, v))

        def fb(fwd):
            def run():
                out = fwd(q=qg, k=kg, v=vg)
                torch.autograd.backward(out, dout)
            return run

        def cudnn_fwd():
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v)

        res = {c: {"fwd": [], "fwdbwd": [], "split": []} for c in list(fns) + ["cudnn"]}
        for _ in range(args.rounds):
            for cname, fwd in fns.items():
                res[cname]["fwd"].append(_bench(fwd))
                res[cname]["fwdbwd"].append(_bench(fb(fwd)))
                qg.grad = kg.grad = vg.grad = None
                res[cname]["split"].append(_split(fwd))
            res["cudnn"]["fwd"].append(_bench(cudnn_fwd))
            res["cudnn"]["split"].append(_split(cudnn_fwd))
        base = statistics.median(res["int"]["fwd"])
        base_fb = statistics.median(res["int"]["fwdbwd"])
        for cname, r in res.items():
            f = statistics.median(r["fwd"])
            fbm = statistics.median(r["fwdbwd"]) if r["fwdbwd"] else float("nan")
            dev_ms = statistics.median(x[0] for x in r["split"])
            host = statistics.median(x[1] for x in r["split"])
            rows.append(dict(shape=name, case=cname, fwd_ms=f, fwd_rounds=r["fwd"], fwdbwd_ms=fbm,
                             fwdbwd_rounds=r["fwdbwd"], fwd_vs_int=f / base, fwdbwd_vs_int=fbm / base_fb,
                             fwd_device_ms=dev_ms, fwd_host_ms=host))
    gpu = torch.cuda.get_device_name()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d_%H%M")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"feat_overhead_{gpu.replace(' ', '_')}_{stamp}.json")
    with open(path, "w") as fh:
        json.dump(dict(gpu=gpu, torch=torch.__version__, gamma=1.2, rows=rows), fh, indent=1)
    print(f"# {gpu}; wrote {path}")
    print("| shape | case | fwd ms | vs int | fwd device ms | fwd host ms | fwd+bwd ms | vs int |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['case']} | {r['fwd_ms']:.4f} | {r['fwd_vs_int']:.3f} | {r['fwd_device_ms']:.4f} | "
              f"{r['fwd_host_ms']:.4f} | {r['fwdbwd_ms']:.4f} | {r['fwdbwd_vs_int']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
