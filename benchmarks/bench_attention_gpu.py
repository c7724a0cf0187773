"""GPU attention benchmark: the fused TACA CUDA kernel against every PyTorch alternative.

One process, one GPU, every shape of shared/PERFORMANCE.md; forward and forward+backward:
  taca (gamma=1.2) through the public op (or the ctypes harness for forward when the torch
  binding has no CUDA kernel), plain SDPA per backend (cuDNN, FLASH_ATTENTION, EFFICIENT; no
  gamma), split-SDPA with gamma, flex_attention compiled with a score_mod, and the authors' two
  forms (eager flex_attention; materialized softmax) where they fit. A correctness check against
  the fp32 reference runs first on every shape, of the output and (with the backward, where the
  reference's N x N fits) of the gradients: each gamma method's dq / dk / dv against the fp32
  reference's under one shared output gradient, beside split SDPA's (the tolerance rule of STYLE.md:
  at most 2x split SDPA's error + 1e-5). Timing: triton.testing.do_bench median.
FLOPs: forward 4*B*H*N^2*D, forward+backward 3.5x that.

Usage: python benchmarks/bench_attention_gpu.py [--quick] [--shapes a,b] [--variants] [--out DIR]
Writes gpu_<gpu>_<date>.json and .md into --out (default benchmarks/results) and prints the
table last.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "cuda_harness"))

SHAPES = {
    # name: B, H, D, text_len, n_img, text_first
    "flux1024_b1": (1, 24, 128, 512, 4096, True),
    "flux1024_b2": (2, 24, 128, 512, 4096, True),
    "sd35l_cfg": (2, 38, 64, 333, 4096, False),
    "sd35m_cfg": (2, 24, 64, 333, 4096, False),
    "flux2048_b1": (1, 24, 128, 512, 16384, True),
}
# Other models' head dims (not in PERFORMANCE.md; pick them with --shapes): AuraFlow (12 x 256,
# 8 registers + 256 text tokens first), Ideogram 4 (18 x 256), Lumina 2 without GQA (D = 96)
EXTRA_SHAPES = {
    # FLUX at other resolutions (D = 128 key counts between and around the PERFORMANCE.md ones)
    "flux512_b1": (1, 24, 128, 512, 1024, True),
    "flux1536_b1": (1, 24, 128, 512, 9216, True),
    "flux1792_b1": (1, 24, 128, 512, 12544, True),  # 13056 keys: past fwd_overlap's first threshold (12288)
    "flux1920_b1": (1, 24, 128, 512, 14400, True),  # 14912 keys
    "auraflow_cfg": (2, 12, 256, 264, 4096, True),
    "ideogram4_cfg": (2, 18, 256, 512, 4096, True),
    "d96_cfg": (2, 24, 96, 256, 4096, True),
    # SD3.5-M CFG at other resolutions: other key counts for the D = 64 key-tile choice (d64_key_tile)
    "sd35m_cfg_512": (2, 24, 64, 333, 1024, False),
    "sd35m_cfg_768": (2, 24, 64, 333, 2304, False),
    "sd35m_cfg_1536": (2, 24, 64, 333, 9216, False),
    "sd35m_cfg_2048": (2, 24, 64, 333, 16384, False),
    # one sample (a batch-1 LoRA training step's attention)
    "sd35m_b1": (1, 24, 64, 333, 4096, False),
    # FlashAttention-3's own benchmark setting (its paper, section 4.1: hidden size 2048, so 32 heads at D = 64 and
    # 16 at D = 128, batch x tokens = 16k), for its published rates; here 512 of the tokens are text, first
    **{f"fa3_d{d}_{n // 1024}k": (16384 // n, 2048 // d, d, 512, n - 512, True)
       for d in (64, 128) for n in (4096, 8192, 16384)},
}
GAMMA = 1.2


MIN_ITERS = 20  # timed iterations per cell at least (not with --quick)


def _bench(fn: Callable, quick: bool) -> float:
    """Median ms of fn. do_bench times rep / (its estimate) iterations: at FLUX 2048 (about 22 ms fwd+bwd) 100 ms
    were four, and cells of the same kernel differed by 6% (5.47 / 5.83 ms forward; a deterministic=False fwd+bwd
    12% slower than the default there, while bench_nondet_paths.py, 300 ms a cell, had it +1.2%: thirty-seventh
    session). So a cell whose first timing covered fewer than MIN_ITERS iterations is timed again over that many."""
    from triton.testing import do_bench

    rep = 40 if quick else 100
    ms = do_bench(fn, warmup=10 if quick else 25, rep=rep, return_mode="median")
    if not quick and ms * MIN_ITERS > rep:
        ms = do_bench(fn, warmup=25, rep=ms * MIN_ITERS, return_mode="median")
    return ms


def _taca_paths():
    """(public_op_ok, ctypes_module_or_None)."""
    import taca

    ok = False
    try:
        q = torch.randn(1, 1, 8, 64, device="cuda", dtype=torch.bfloat16)
        taca.joint_attention(q, q, q, text_len=2, backend="cuda")
        ok = True
    except (NotImplementedError, RuntimeError, AttributeError):
        ok = False
    tc = None
    try:
        import taca_ctypes

        if taca_ctypes.load() is not None:
            tc = taca_ctypes
    except ImportError:
        pass
    return ok, tc


def _methods(shape, op_ok, tc, variants: bool):
    """name -> (fwd closure factory, supports backward)."""
    import taca
    from taca import reference
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, H, D, L, n_img, tf = shape
    N = L + n_img
    tb, te = reference.text_range(N, L, tf)
    gamma = torch.full((B,), GAMMA, device="cuda")
    m = {}

    if op_ok:
        m["taca_cuda"] = (lambda q, k, v: taca.joint_attention(
            q, k, v, text_len=L, text_first=tf, gamma=gamma, layout="bhnd", backend="cuda"), True)
        # deterministic=False: the backward adds dQ with unordered atomics (forward unchanged)
        m["taca_cuda_nondet"] = (lambda q, k, v: taca.joint_attention(
            q, k, v, text_len=L, text_first=tf, gamma=gamma, layout="bhnd", backend="cuda",
            deterministic=False), True)
    if tc is not None:
        # 0: default (Hopper wgmma on sm_90a; the warp-specialized kernel: = 10 at D = 128, = 17 at D = 64);
        # 6: the mma.sync default; 7..9, 13: cp.async wgmma tilings (13: the default before);
        # 11, 12: warp-specialized options (D = 128: overlap, no turns; D = 64: overlap, 4 stages);
        # 14: one CTA per item; 15, 16: wider key tiles (D = 128: 160 persistent, 192 one CTA per item;
        # D = 64: 192 / 160 persistent); 17: D = 64, three consumer warpgroups (D = 128: the default);
        # 18: D = 64, two consumers with the key tile by count (the default before)
        vs = (0, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18) if variants else ((0,) if not op_ok else ())
        for var in vs:
            m[f"taca_ctypes_v{var}"] = (lambda q, k, v, var=var: tc.fwd(
                q, k, v, text_len=L, text_first=tf, gamma=gamma, layout="bhnd", variant=var)[0], False)

    def plain(backend):
        def f(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        return f

    m["plain_cudnn"] = (plain(SDPBackend.CUDNN_ATTENTION), True)
    m["plain_flash2"] = (plain(SDPBackend.FLASH_ATTENTION), True)
    m["plain_efficient"] = (plain(SDPBackend.EFFICIENT_ATTENTION), True)
    m["split_sdpa"] = (lambda q, k, v: reference.attention_split_sdpa(
        q, k, v, text_len=L, text_first=tf, gamma=gamma), True)

    from torch.nn.attention.flex_attention import flex_attention

    def score_mod(score, b, h, qi, kv):
        qt = (qi >= tb) & (qi < te)
        kt = (kv >= tb) & (kv < te)
        return torch.where(~qt & kt, score * gamma[b], score)

    flex_c = torch.compile(flex_attention, dynamic=False)
    m["flex_compiled"] = (lambda q, k, v: flex_c(q, k, v, score_mod=score_mod), True)
    m["flex_eager_authors"] = (lambda q, k, v: flex_attention(q, k, v, score_mod=score_mod), False)

    def materialized(q, k, v):
        s = torch.matmul(q, k.transpose(-1, -2)) * (D ** -0.5)
        s[:, :, :tb, tb:te] *= gamma.view(B, 1, 1, 1).to(s.dtype)
        s[:, :, te:, tb:te] *= gamma.view(B, 1, 1, 1).to(s.dtype)
        return torch.matmul(s.softmax(-1), v)

    m["materialized_authors"] = (materialized, True)
    return m


_HEAVY = ("flex_compiled", "flex_eager_authors", "materialized_authors")


def reference_grads(q, k, v, do, **kw) -> List[torch.Tensor]:
    """dq, dk, dv (float32) of the materialized float32 reference (reference.attention_ref on float32 copies of
    q, k, v; keyword arguments as its) under the output gradient do."""
    from taca import reference

    qf, kf, vf = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    out = reference.attention_ref(qf, kf, vf, upcast=torch.float32, **kw)[0]
    return list(torch.autograd.grad(out, (qf, kf, vf), do.float()))


def grad_errors(fn, q, k, v, do, ref) -> List[float]:
    """Max |g - r| of fn's dq, dk, dv at (q, k, v) under the output gradient do, against ref (reference_grads)."""
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    g = torch.autograd.grad(fn(qg, kg, vg), (qg, kg, vg), do)
    return [float((a.float() - r).abs().max()) for a, r in zip(g, ref)]


def grad_rule(errs, sdpa_errs) -> bool:
    """STYLE.md's tolerance rule for each of dq, dk, dv: error <= 2 x split SDPA's + 1e-5."""
    return all(e <= 2 * s + 1e-5 for e, s in zip(errs, sdpa_errs))


def run_shape(sname, shape, op_ok, tc, quick, variants, do_bwd, log, skip_heavy=False, rounds=1):
    from taca import reference

    B, H, D, L, n_img, tf = shape
    N = L + n_img
    flops = 4.0 * B * H * N * N * D
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(3))
    do = torch.randn(B, H, N, D, device="cuda", generator=gen).to(torch.bfloat16)  # every method's output gradient
    methods = _methods(shape, op_ok, tc, variants)
    rows = []

    # correctness against the fp32 materialized reference where its N x N logits fit
    gamma = torch.full((B,), GAMMA, device="cuda")
    ref_full = ref_plain = base_err = ref_grads = sdpa_grad_err = None
    if B * H * N * N * 4 < 8e9:
        ref_full = reference.attention_ref(q, k, v, text_len=L, text_first=tf, gamma=gamma,
                                           upcast=torch.float32)[0]
        split = reference.attention_split_sdpa(q, k, v, text_len=L, text_first=tf, gamma=gamma)
        base_err = (split.float() - ref_full).abs().max().item()
        del split
        if do_bwd:  # the gradients' reference and split SDPA's distance to it (the tolerance rule's baseline)
            ref_grads = reference_grads(q, k, v, do, text_len=L, text_first=tf, gamma=gamma)
            sdpa_grad_err = grad_errors(
                lambda a, b, c: reference.attention_split_sdpa(a, b, c, text_len=L, text_first=tf, gamma=gamma),
                q, k, v, do, ref_grads)
        if any(n.startswith("plain") for n in methods):
            ref_plain = reference.attention_ref(q, k, v, text_len=L, text_first=tf, gamma=1.0,
                                                upcast=torch.float32)[0]
    torch.cuda.empty_cache()
    # Every method is timed with the same tensors alive (its own are freed before the next method's are
    # made): in bench_bwd_handoff.py, timing each mode beside other modes' tensors put one kernel 1.5-2%
    # apart from itself (results/bench_bwd_H200_20261204_positions/).

    for name, (fn, has_bwd) in methods.items():
        rec = {"shape": sname, "method": name, "B": B, "H": H, "N": N, "D": D, "text_len": L}
        if skip_heavy and name in _HEAVY:
            rec.update(fwd_ms=None, note="skipped: benchmark time budget (--max-seconds) spent")
            rows.append(rec)
            continue
        gamma_free = name.startswith("plain")
        try:
            out = fn(q, k, v)
            torch.cuda.synchronize()
            if ref_full is not None:
                r = ref_plain if gamma_free else ref_full
                rec["max_err"] = (out.float() - r).abs().max().item()
                rec["sdpa_err"] = base_err
            del out
            ms = _bench(lambda q=q, k=k, v=v: fn(q, k, v), quick)  # bound now: q, k, v are deleted after the loop
            rec["fwd_ms"] = ms
            rec["fwd_tflops"] = flops / ms / 1e9
        except torch.OutOfMemoryError:
            rec["fwd_ms"] = None
            rec["note"] = "out of memory"
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 - record and go on: one failing baseline must not stop the run
            rec["fwd_ms"] = None
            rec["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            torch.cuda.empty_cache()
        if do_bwd and has_bwd and rec.get("fwd_ms") is not None:
            try:
                if ref_grads is not None and not gamma_free:
                    rec["grad_err"] = grad_errors(fn, q, k, v, do, ref_grads)  # dq, dk, dv
                    rec["sdpa_grad_err"] = sdpa_grad_err
                    rec["grad_rule"] = grad_rule(rec["grad_err"], sdpa_grad_err)
                qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
                fb = _fwd_bwd(fn, qg, kg, vg, do)
                fb()
                ms = _bench(fb, quick)
                rec["fwdbwd_ms"] = ms
                rec["fwdbwd_tflops"] = 3.5 * flops / ms / 1e9
                del qg, kg, vg, fb
            except torch.OutOfMemoryError:
                rec["fwdbwd_note"] = "out of memory"
                torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001
                rec["fwdbwd_note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                torch.cuda.empty_cache()
        rows.append(rec)
        log(f"{sname:12s} {name:22s} fwd {rec.get('fwd_ms')} fb {rec.get('fwdbwd_ms')} "
            f"err {rec.get('max_err')} {rec.get('note', '')} {rec.get('fwdbwd_note', '')}")
    if rounds > 1:
        _more_rounds(rows, methods, q, k, v, rounds, quick, do_bwd, log)
    del q, k, v, do, ref_full, ref_plain, ref_grads
    torch.cuda.empty_cache()
    return rows


def _fwd_bwd(fn, qg, kg, vg, do):
    """A closure running fn's forward and its gradient with respect to (qg, kg, vg), as the table times it."""
    def fb():
        o = fn(qg, kg, vg)
        torch.autograd.grad(o, (qg, kg, vg), do)
    return fb


def _more_rounds(rows, methods, q, k, v, rounds, quick, do_bwd, log):
    """Rounds 2..`rounds` of every timed method but the slow alternatives (_HEAVY, efficient), the methods in a
    rotated order each round, every fwd+bwd on one shared set of gradient inputs; each cell becomes the median of its
    rounds (the first pass's included), the rounds kept under fwd_ms_rounds / fwdbwd_ms_rounds. One pass in a fixed
    order left the FLUX 2048 fwd+bwd cells 10% apart between runs (deterministic and not swapped places: thirty-seventh
    session), where an interleaved measurement had them 1.2% apart."""
    timed = [r for r in rows if r.get("fwd_ms") is not None and r["method"] not in _HEAVY
             and r["method"] != "plain_efficient"]
    if not timed:  # (every method failed or is a slow alternative)
        return
    for r in timed:
        r["fwd_ms_rounds"] = [r["fwd_ms"]]
        if r.get("fwdbwd_ms") is not None:
            r["fwdbwd_ms_rounds"] = [r["fwdbwd_ms"]]
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    do = torch.randn_like(q)
    for rd in range(1, rounds):
        for r in timed[rd % len(timed):] + timed[:rd % len(timed)]:
            fn = methods[r["method"]][0]
            r["fwd_ms_rounds"].append(_bench(lambda fn=fn: fn(q, k, v), quick))
            if do_bwd and "fwdbwd_ms_rounds" in r:
                r["fwdbwd_ms_rounds"].append(_bench(_fwd_bwd(fn, qg, kg, vg, do), quick))
    for r in timed:
        r["fwd_ms"] = statistics.median(r["fwd_ms_rounds"])
        r["fwd_tflops"] *= r["fwd_ms_rounds"][0] / r["fwd_ms"]
        if "fwdbwd_ms_rounds" in r:
            r["fwdbwd_ms"] = statistics.median(r["fwdbwd_ms_rounds"])
            r["fwdbwd_tflops"] *= r["fwdbwd_ms_rounds"][0] / r["fwdbwd_ms"]
        log(f"{r['shape']:12s} {r['method']:22s} rounds fwd {[round(x, 3) for x in r['fwd_ms_rounds']]} "
            f"fb {[round(x, 3) for x in r.get('fwdbwd_ms_rounds', [])]}")


def _fmt(x, f="{:.3f}"):
    return "-" if x is None else f.format(x)


def table(rows: List[Dict], header: str) -> str:
    out = [header, "",
           "| shape | method | fwd ms | fwd TFLOP/s | fwd vs cuDNN | fwd vs FA2 | fwd+bwd ms | f+b TFLOP/s | f+b vs cuDNN | f+b vs FA2 | max err (sdpa err) | grad err dq / dk / dv (sdpa) | note |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by = {}
    for r in rows:
        by.setdefault(r["shape"], {})[r["method"]] = r
    for r in rows:
        base = by[r["shape"]]
        cud, fa2 = base.get("plain_cudnn", {}), base.get("plain_flash2", {})

        def ratio(key, ref):
            a, b = r.get(key), ref.get(key)
            return None if a is None or b is None else b / a

        note = " ".join(x for x in (r.get("note", ""), r.get("fwdbwd_note", "")) if x)
        err = "-" if r.get("max_err") is None else f"{r['max_err']:.2e} ({_fmt(r.get('sdpa_err'), '{:.2e}')})"
        gerr = "-"
        if r.get("grad_err") is not None:
            gerr = (" / ".join(f"{e:.1e}" for e in r["grad_err"]) + " (" +
                    " / ".join(f"{e:.1e}" for e in r["sdpa_grad_err"]) + ")" +
                    ("" if r.get("grad_rule") else " **beyond the rule**"))
        out.append(f"| {r['shape']} | {r['method']} | {_fmt(r.get('fwd_ms'))} | {_fmt(r.get('fwd_tflops'), '{:.0f}')} | "
                   f"{_fmt(ratio('fwd_ms', cud), '{:.2f}x')} | {_fmt(ratio('fwd_ms', fa2), '{:.2f}x')} | "
                   f"{_fmt(r.get('fwdbwd_ms'))} | {_fmt(r.get('fwdbwd_tflops'), '{:.0f}')} | "
                   f"{_fmt(ratio('fwdbwd_ms', cud), '{:.2f}x')} | {_fmt(ratio('fwdbwd_ms', fa2), '{:.2f}x')} | {err} | "
                   f"{gerr} | {note} |")
    out.append("")
    out.append("Ratios are speed relative to the plain (no gamma) baseline: >1x is faster than it.")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short timing windows")
    ap.add_argument("--shapes", default=",".join(SHAPES),
                    help="comma-separated subset of " + ",".join(list(SHAPES) + list(EXTRA_SHAPES)))
    ap.add_argument("--methods", default="", help="regex: only methods matching it (plus plain baselines)")
    ap.add_argument("--variants", action="store_true", help="also time the kernel's tiling variants (ctypes)")
    ap.add_argument("--no-bwd", action="store_true", help="forward only")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="directory for JSON + md")
    ap.add_argument("--tag", default="", help="suffix for the output file names")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time every method but the slow alternatives this many times, rotated, and keep the median")
    ap.add_argument("--max-seconds", type=float, default=0.0,
                    help="after this many seconds, skip the slow alternatives (flex, materialized) on the remaining shapes")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds: expected >= 1, got {args.rounds}")
    if not torch.cuda.is_available():
        print("bench_attention_gpu: no CUDA device", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    op_ok, tc = _taca_paths()
    gpu = torch.cuda.get_device_name()
    header = (f"GPU: {gpu}; torch {torch.__version__}; CUDA {torch.version.cuda}; "
              f"cuDNN {torch.backends.cudnn.version()}; bf16, gamma={GAMMA}; "
              f"taca path: {'public op' if op_ok else 'ctypes harness (forward only)' if tc else 'none'}; "
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(header, flush=True)
    t0 = time.time()
    rows = []

    def heavy_off():
        return args.max_seconds > 0 and time.time() - t0 > args.max_seconds

    rx = re.compile(args.methods) if args.methods else None
    for s in args.shapes.split(","):
        shape = SHAPES[s] if s in SHAPES else EXTRA_SHAPES[s]
        if rx is not None:
            global _methods
            orig = _methods

            def _filtered(*a, orig=orig, **kw):
                return {k: v for k, v in orig(*a, **kw).items() if k.startswith("plain") or rx.search(k)}
            _methods = _filtered
            try:
                rows += run_shape(s, shape, op_ok, tc, args.quick, args.variants, not args.no_bwd, print, heavy_off(),
                                  args.rounds)
            finally:
                _methods = orig
        else:
            rows += run_shape(s, shape, op_ok, tc, args.quick, args.variants, not args.no_bwd, print, heavy_off(),
                              args.rounds)
        print(f"[{time.time() - t0:.0f} s]", flush=True)
    os.makedirs(args.out, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_")
    stem = os.path.join(args.out, f"gpu_{slug}_{datetime.datetime.now(datetime.timezone.utc):%Y%m%d}{args.tag}")
    with open(stem + ".json", "w") as f:
        json.dump({"header": header, "rows": rows}, f, indent=1)
    md = table(rows, header)
    with open(stem + ".md", "w") as f:
        f.write(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
