"""Attention benchmark: TACA's kernels against PyTorch's attention, same process, same threads.

CPU (this script): shapes B=1, H=8, 128 text + 1024 image tokens with D=64 and D=128, and a
FLUX-like one (H=24, D=128, 512 text + 1024 image tokens; skipped with --quick). Methods:
  taca         the C kernel through taca.joint_attention(backend="cpu"), gamma=1.2
  taca_avx2    the same with its AVX2 GEMM micro-kernel (TACA_CPU_AVX512=0; only on CPUs with AVX-512F, where
               taca takes the AVX-512 one)
  sdpa_plain   F.scaled_dot_product_attention without gamma: the floor TACA should reach
  split_sdpa   the exact two-call SDPA form with gamma (reference.attention_split_sdpa)
  materialized the float32 materialized softmax with gamma (reference.attention_ref)
each forward and forward+backward. Correctness is checked (float64 reference) before timing.
Timing: rounds that run every method once, interleaved, so load drifts hit all alike; the
median over rounds is reported. FLOPs: forward 4*B*H*N^2*D, forward+backward 3.5x that.

CUDA: delegates to benchmarks/bench_attention_gpu.py (owned by the CUDA kernels) when present.

Usage: python benchmarks/bench_attention.py [--device auto|cpu|cuda] [--quick] [--threads N]
Prints the table last; writes benchmarks/results/cpu_<date>.json and .md (full runs only,
unless --out is given).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import taca  # noqa: E402
from taca import ops, reference  # noqa: E402

GAMMA = 1.2
# name: B, H, D, text_len, image tokens, text_first
CPU_SHAPES = {
    "b1_h8_d64_t128_i1024": (1, 8, 64, 128, 1024, True),
    "b1_h8_d128_t128_i1024": (1, 8, 128, 128, 1024, True),
    "flux_like_h24_d128_t512_i1024": (1, 24, 128, 512, 1024, True),
}
QUICK_SHAPES = ("b1_h8_d64_t128_i1024", "b1_h8_d128_t128_i1024")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def has_avx512f() -> bool:
    """Whether the CPU reports AVX-512F (Linux /proc/cpuinfo; False elsewhere): the C kernels then take their
    AVX-512 GEMM unless TACA_CPU_AVX512=0."""
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512f" in f.read()
    except OSError:
        return False


def make_methods(q, k, v, text_len, text_first) -> Dict[str, Callable[[], torch.Tensor]]:
    """Forward callables on (B, H, N, D) inputs; each returns out."""
    g = torch.full((q.shape[0],), GAMMA)
    kw = dict(text_len=text_len, text_first=text_first, layout="bhnd")

    def taca_avx2():  # TACA_CPU_AVX512 is read at every call of the kernels
        old = os.environ.get("TACA_CPU_AVX512")
        os.environ["TACA_CPU_AVX512"] = "0"
        try:
            return taca.joint_attention(q, k, v, gamma=g, backend="cpu", **kw)
        finally:
            if old is None:
                del os.environ["TACA_CPU_AVX512"]
            else:
                os.environ["TACA_CPU_AVX512"] = old

    methods = {"taca": lambda: taca.joint_attention(q, k, v, gamma=g, backend="cpu", **kw)}
    if has_avx512f():
        methods["taca_avx2"] = taca_avx2
    methods.update({
        "sdpa_plain": lambda: F.scaled_dot_product_attention(q, k, v),
        "split_sdpa": lambda: reference.attention_split_sdpa(q, k, v, gamma=g, **kw),
        "materialized": lambda: reference.attention_ref(q, k, v, gamma=g, upcast=torch.float32, **kw)[0],
    })
    return methods


def check(q, k, v, text_len, text_first, methods) -> Dict[str, float]:
    """Max abs error of each gamma method's out, dq, dk, dv against the float64 reference."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference.attention_ref(q64, k64, v64, text_len=text_len, text_first=text_first,
                                  gamma=GAMMA, upcast=torch.float64)[0]
    dout = torch.randn_like(ref)
    ref_g = torch.autograd.grad(ref, (q64, k64, v64), dout)
    errs = {}
    for name, fn in methods.items():
        if name == "sdpa_plain":
            continue
        out = fn()
        grads = torch.autograd.grad(out, (q, k, v), dout.float())
        errs[name] = max((a.double() - b).abs().max().item() for a, b in zip((out, *grads), (ref, *ref_g)))
        if errs[name] > 1e-4:
            raise SystemExit(f"bench_attention: {name} is wrong (max error {errs[name]:.3g})")
    return errs


def timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def bench_cpu(args) -> dict:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not ops.HAVE_KERNELS:
        raise SystemExit(f"bench_attention: taca._C is not available ({ops._EXT_ERROR})")
    shapes = QUICK_SHAPES if args.quick else tuple(CPU_SHAPES)
    rounds = 3 if args.quick else args.rounds
    rows = []
    for sname in shapes:
        B, H, D, L, img, first = CPU_SHAPES[sname]
        N = L + img
        q, k, v = (torch.randn(B, H, N, D).requires_grad_() for _ in range(3))
        methods = make_methods(q, k, v, L, first)
        errs = check(q, k, v, L, first, methods)
        dout = torch.randn(B, H, N, D)
        work = {}
        for name, fn in methods.items():
            work[(name, "fwd")] = lambda fn=fn: fn()
            work[(name, "fwd+bwd")] = lambda fn=fn: torch.autograd.grad(fn(), (q, k, v), dout)
        for f in work.values():  # warm-up round
            f()
        times = {key: [] for key in work}
        for _ in range(rounds):
            for key, f in work.items():
                with torch.no_grad() if key[1] == "fwd" else torch.enable_grad():
                    times[key].append(timed(f))
        flops_fwd = 4 * B * H * N * N * D
        for (name, pas), ts in times.items():
            ms = statistics.median(ts)
            plain = statistics.median(times[("sdpa_plain", pas)])
            flops = flops_fwd * (3.5 if pas == "fwd+bwd" else 1.0)
            rows.append(dict(shape=sname, B=B, H=H, N=N, D=D, text_len=L, pass_=pas, method=name,
                             gamma=None if name == "sdpa_plain" else GAMMA, ms=ms, ms_all=ts,
                             tflops=flops / ms / 1e9, ratio_to_plain=ms / plain,
                             max_err_vs_f64=errs.get(name)))
        print(f"  {sname}: done", file=sys.stderr, flush=True)
    return dict(
        device=cpu_name(), device_kind="cpu", threads=torch.get_num_threads(),
        torch=torch.__version__, cuda=None, python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        rounds=rounds, timing="median over interleaved rounds, time.perf_counter", rows=rows,
    )


def table(res: dict) -> str:
    lines = [
        f"device: {res['device']} ({res['threads']} threads); torch {res['torch']}; CUDA {res['cuda']}; "
        f"{res['date']}; gamma={GAMMA}; median of {res['rounds']} interleaved rounds",
        "",
        "| shape (B, H, N, D, text) | pass | method | ms | TFLOP/s | x plain SDPA |",
        "|---|---|---|---|---|---|",
    ]
    order = {"taca": 0, "taca_avx2": 1, "sdpa_plain": 2, "split_sdpa": 3, "materialized": 4}
    for r in sorted(res["rows"], key=lambda r: (list(CPU_SHAPES).index(r["shape"]), r["pass_"], order[r["method"]])):
        shp = f"{r['B']}, {r['H']}, {r['N']}, {r['D']}, {r['text_len']}"
        lines.append(f"| {shp} | {r['pass_']} | {r['method']} | {r['ms']:.1f} | {r['tflops']:.3f} | {r['ratio_to_plain']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--quick", action="store_true", help="two shapes, three rounds")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    ap.add_argument("--rounds", type=int, default=9, help="timed rounds per shape (CPU)")
    ap.add_argument("--out", default=None, help="directory for JSON + md (default: benchmarks/results on full runs)")
    args, rest = ap.parse_known_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not os.path.exists(os.path.join(HERE, "bench_attention_gpu.py")):
            print("bench_attention: benchmarks/bench_attention_gpu.py is missing; no CUDA benchmark", file=sys.stderr)
            return 2
        sys.path.insert(0, HERE)
        from bench_attention_gpu import main as gpu_main

        return gpu_main((["--quick"] if args.quick else []) + (["--out", args.out] if args.out else []) + rest)
    if rest:
        ap.error(f"unrecognized arguments for the CPU benchmark: {' '.join(rest)}")
    res = bench_cpu(args)
    text = table(res)
    out_dir = args.out or (None if args.quick else os.path.join(HERE, "results"))
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        stem = os.path.join(out_dir, f"cpu_{datetime.date.today().isoformat()}")
        with open(stem + ".json", "w") as f:
            json.dump(res, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write("# CPU attention benchmark (benchmarks/bench_attention.py)\n\n" + text + "\n")
        print(f"wrote {stem}.json and .md", file=sys.stderr)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
