"""Forward+backward timing of the TACA CUDA kernels against PyTorch's SDPA backends.

Question: is taca's fwd (csrc/cuda/taca_fwd.cu) + bwd (csrc/cuda/taca_bwd.cu) at least as fast
as plain (no gamma) FlashAttention-2 SDPA forward+backward on the PERFORMANCE.md shapes, and
how far from cuDNN? Same process, same GPU, bf16, inputs in diffusers' (B, N, H, D) storage.
Correctness is checked first on two heads of each shape against the float32 reference.

Usage: python3 benchmarks/bench_cuda_bwd.py [--shapes flux1024_b1,sd35m_cfg,...] [--out DIR]
Prints a table last; writes the numbers as JSON (and a markdown table) to DIR.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from taca import ops, reference  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention_gpu import SHAPES  # noqa: E402  (name: B, H, D, text_len, image tokens, text_first)

GAMMA, GAMMA_REV = 1.2, 1.0
MODES = []  # TACA_BWD_MODE timing experiments (--modes atomic,racy,skipdq)


def bench(fn, warmup_ms=100, rep_ms=600):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def check(q, k, v, dout, gamma_t, L, text_first, heads=2):
    """Max errors of taca fwd+bwd and of bf16 split SDPA vs the fp32 reference, first heads."""
    B, N, H, D = q.shape
    tb, te = reference.text_range(N, L, text_first)
    out, lse, _ = torch.ops.taca.fwd(q, k, v, gamma_t, GAMMA_REV, D ** -0.5, tb, te, False)
    dq, dk, dv = torch.ops.taca.bwd(dout, q, k, v, out, lse, gamma_t, GAMMA_REV, D ** -0.5, tb, te)
    sl = slice(0, heads)
    qs, ks, vs, ds = (t[:, :, sl].contiguous() for t in (q, k, v, dout))
    kw = dict(text_len=L, text_first=text_first, gamma=gamma_t, gamma_reverse=GAMMA_REV)
    qf, kf, vf = (t.float().requires_grad_(True) for t in (qs, ks, vs))
    of, _, _ = reference.attention_ref(qf, kf, vf, layout="bnhd", upcast=torch.float32, **kw)
    of.backward(ds.float())
    ql, kl, vl = (t.clone().requires_grad_(True) for t in (qs, ks, vs))
    ol = reference.attention_split_sdpa(ql, kl, vl, layout="bnhd", **kw)
    ol.backward(ds)
    res = {}
    for name, got, base, ref in (("out", out[:, :, sl], ol, of), ("dq", dq[:, :, sl], ql.grad, qf.grad),
                                 ("dk", dk[:, :, sl], kl.grad, kf.grad), ("dv", dv[:, :, sl], vl.grad, vf.grad)):
        e = (got.float() - ref).abs().max().item()
        b = (base.float() - ref).abs().max().item()
        res[name] = {"taca": e, "sdpa": b, "ok": bool(e <= 2 * b + 1e-5)}
    del of, qf, kf, vf
    torch.cuda.empty_cache()
    return res


def run_shape(name, spec):
    B, H, D, L, img, text_first = spec
    N = L + img
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(B, N, H, D, generator=gen, device="cuda").to(torch.bfloat16)
                     for _ in range(4))
    gamma_t = torch.full((B,), GAMMA, device="cuda")
    tb, te = reference.text_range(N, L, text_first)
    scale = D ** -0.5
    fl = 4.0 * B * H * N * N * D
    r = {"shape": name, "B": B, "H": H, "N": N, "D": D, "text_len": L, "text_first": text_first}
    r["check"] = check(q, k, v, dout, gamma_t, L, text_first)

    qh, kh, vh, dh = (t.transpose(1, 2) for t in (q, k, v, dout))  # (B, H, N, D) views

    def sdpa_fwd_bwd(backend):
        qa, ka, va = (t.detach().requires_grad_(True) for t in (qh, kh, vh))

        def f():
            with sdpa_kernel(backend):
                o = F.scaled_dot_product_attention(qa, ka, va)
            torch.autograd.grad(o, (qa, ka, va), dh)

        def g():
            with sdpa_kernel(backend), torch.no_grad():
                F.scaled_dot_product_attention(qh, kh, vh)

        return bench(g), bench(f)

    t = {}
    for label, be in (("plain FA2 SDPA", SDPBackend.FLASH_ATTENTION),
                      ("plain cuDNN SDPA", SDPBackend.CUDNN_ATTENTION)):
        try:
            t[label] = sdpa_fwd_bwd(be)
        except Exception as e:  # a backend may refuse a shape
            print(f"{name}: {label} failed: {e}", flush=True)

    qa, ka, va = (t_.detach().requires_grad_(True) for t_ in (qh, kh, vh))

    def split_fb():
        o = reference.attention_split_sdpa(qa, ka, va, text_len=L, text_first=text_first,
                                           gamma=gamma_t, gamma_reverse=GAMMA_REV)
        torch.autograd.grad(o, (qa, ka, va), dh)

    def split_f():
        with torch.no_grad():
            reference.attention_split_sdpa(qh, kh, vh, text_len=L, text_first=text_first,
                                           gamma=gamma_t, gamma_reverse=GAMMA_REV)

    t["TACA split SDPA"] = (bench(split_f), bench(split_fb))

    out, lse, _ = torch.ops.taca.fwd(q, k, v, gamma_t, GAMMA_REV, scale, tb, te, False)

    def taca_f():
        torch.ops.taca.fwd(q, k, v, gamma_t, GAMMA_REV, scale, tb, te, False)

    def taca_b():
        torch.ops.taca.bwd(dout, q, k, v, out, lse, gamma_t, GAMMA_REV, scale, tb, te)

    def taca_fb():
        o, l, _ = torch.ops.taca.fwd(q, k, v, gamma_t, GAMMA_REV, scale, tb, te, False)
        torch.ops.taca.bwd(dout, q, k, v, o, l, gamma_t, GAMMA_REV, scale, tb, te)

    qa2, ka2, va2 = (t_.detach().requires_grad_(True) for t_ in (q, k, v))

    def taca_autograd():
        o = ops.joint_attention(qa2, ka2, va2, text_len=L, text_first=text_first, gamma=gamma_t,
                                gamma_reverse=GAMMA_REV, layout="bnhd", backend="cuda")
        torch.autograd.grad(o, (qa2, ka2, va2), dout)

    tb_ms = bench(taca_b)
    r["bwd_modes_ms"] = {}
    for mode in MODES:
        os.environ["TACA_BWD_MODE"] = mode
        try:
            r["bwd_modes_ms"][mode] = bench(taca_b)
        finally:
            del os.environ["TACA_BWD_MODE"]
    t["TACA CUDA kernels"] = (bench(taca_f), bench(taca_fb))
    t["TACA CUDA, autograd op"] = (None, bench(taca_autograd))
    r["taca_bwd_ms"] = tb_ms
    r["taca_bwd_tflops"] = 2.5 * fl / tb_ms / 1e9
    fa2 = t.get("plain FA2 SDPA")
    if fa2:
        r["fa2_bwd_ms"] = fa2[1] - fa2[0]
    r["times"] = {}
    for label, (fwd_ms, fb_ms) in t.items():
        r["times"][label] = {
            "fwd_ms": fwd_ms, "fwd_bwd_ms": fb_ms,
            "fwd_bwd_tflops": 3.5 * fl / fb_ms / 1e9,
            "ratio_to_fa2": (fa2[1] / fb_ms) if fa2 else None,
            "ratio_to_cudnn": (t["plain cuDNN SDPA"][1] / fb_ms) if "plain cuDNN SDPA" in t else None,
        }
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="flux1024_b1,sd35m_cfg")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--modes", default="")
    args = ap.parse_args()
    MODES.extend(m for m in args.modes.split(",") if m)
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.cuda.get_device_name()
    meta = {"gpu": dev, "torch": torch.__version__, "cuda": torch.version.cuda,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gamma": GAMMA,
            "gamma_reverse": GAMMA_REV}
    results = []
    for name in args.shapes.split(","):
        results.append(run_shape(name, SHAPES[name]))
        print(json.dumps(results[-1]), flush=True)
    lines = [f"GPU {dev}, torch {torch.__version__}, CUDA {torch.version.cuda}, bf16, gamma {GAMMA}",
             "", "| shape | method | fwd ms | fwd+bwd ms | fwd+bwd TFLOP/s | x FA2 | x cuDNN |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        for label, x in r["times"].items():
            f = "-" if x["fwd_ms"] is None else f"{x['fwd_ms']:.3f}"
            ra = "-" if x["ratio_to_fa2"] is None else f"{x['ratio_to_fa2']:.2f}"
            rc = "-" if x["ratio_to_cudnn"] is None else f"{x['ratio_to_cudnn']:.2f}"
            lines.append(f"| {r['shape']} | {label} | {f} | {x['fwd_bwd_ms']:.3f} | "
                         f"{x['fwd_bwd_tflops']:.0f} | {ra} | {rc} |")
        fa2b = r.get("fa2_bwd_ms")
        tbm = r["taca_bwd_ms"]
        rb = "-" if fa2b is None else f"{fa2b / tbm:.2f}"
        lines.append(f"| {r['shape']} | TACA bwd kernel alone | - | {tbm:.3f} | "
                     f"{r['taca_bwd_tflops']:.0f} (bwd FLOPs) | {rb} (vs FA2 bwd) | - |")
    for r in results:
        if r["bwd_modes_ms"]:
            lines.append(f"bwd alone {r['shape']}: ordered {r['taca_bwd_ms']:.3f} ms, " + ", ".join(
                f"{k} {v:.3f} ms" for k, v in r["bwd_modes_ms"].items()))
    lines.append("")
    for r in results:
        lines.append(f"check {r['shape']}: " + ", ".join(
            f"{k} {v['taca']:.3g} (sdpa {v['sdpa']:.3g}) {'ok' if v['ok'] else 'FAIL'}"
            for k, v in r["check"].items()))
    table = "\n".join(lines)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_bwd.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    with open(os.path.join(args.out, "bench_bwd.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
