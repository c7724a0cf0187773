"""The opt-in FP8 forward (joint_attention(fp8=True)) against the 16-bit kernel and plain cuDNN: speed and error.

For each D = 128 shape (FLUX at 1024 / 2048), in one process, rounds alternating the methods (triton do_bench
medians, the median over rounds):
  cudnn        plain F.scaled_dot_product_attention, cuDNN backend, no gamma (the speed baseline)
  taca_bf16    taca.joint_attention, the 16-bit kernel, gamma 1.2
  taca_fp8     joint_attention(fp8=True), gamma 1.2: quantization passes + FP8 kernel (the default variant)
  taca_fp8@vN  the same with the kernel's variant N (--variants; TACA_FP8_VARIANT: 2 / 4 stages instead of 3,
               + 10 the intra-warpgroup overlap)
and, per FP8 call, the device time of its kernels by name (torch.profiler): the quantization passes against
the attention kernel. Error (shapes with --error, default the smallest): max and relative RMS error of out
against the float32 attention of the unquantized inputs, for taca_bf16 and taca_fp8, and FP8 against its own
reference (float32 attention on the quantized inputs, reference.attention_fp8_ref). Prints a table last,
writes JSON to --out.

Run: python benchmarks/bench_fp8.py --out DIR [--shapes flux1024_b1,flux2048_b1] [--rounds 3]
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
from benchmarks.bench_attention_gpu import SHAPES  # noqa: E402
from benchmarks.bwd_breakdown import kernel_times  # noqa: E402

SHAPES_128 = {k: v for k, v in SHAPES.items() if v[2] == 128}


def _bench(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=80, return_mode="median")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default=",".join(SHAPES_128))
    ap.add_argument("--error", default="flux1024_b1", help="shapes whose error is measured (comma-separated)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default="2,4,10",
                    help="FP8 kernel variants also timed (TACA_FP8_VARIANT: 2 / 4 stages instead of 3, + 10 the overlap)")
    args = ap.parse_args(argv)
    import taca
    from taca import reference

    os.makedirs(args.out, exist_ok=True)
    dev = torch.device("cuda")
    rows, meta = [], dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                          date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    for name in args.shapes.split(","):
        B, H, D, L, n_img, first = SHAPES_128[name]
        N = L + n_img
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(B, H, N, D, device=dev, generator=g, dtype=torch.bfloat16) for _ in range(3))
        kw = dict(text_len=L, text_first=first, gamma=1.2)
        flops = 4.0 * B * H * N * N * D

        fp8 = lambda: taca.joint_attention(q, k, v, fp8=True, **kw)  # noqa: E731
        methods = {  # name: (call, TACA_FP8_VARIANT or None)
            "cudnn": (lambda: _cudnn(q, k, v), None),
            "taca_bf16": (lambda: taca.joint_attention(q, k, v, **kw), None),
            "taca_fp8": (fp8, None),
        }
        for var in filter(None, args.variants.split(",")):
            methods[f"taca_fp8@v{var}"] = (fp8, var)
        times = {m: [] for m in methods}
        with torch.no_grad():
            for r in range(args.rounds):
                order = list(methods) if r % 2 == 0 else list(methods)[::-1]
                for m in order:
                    fn, var = methods[m]
                    if var is None:
                        os.environ.pop("TACA_FP8_VARIANT", None)
                    else:
                        os.environ["TACA_FP8_VARIANT"] = var
                    times[m].append(_bench(fn))
            os.environ.pop("TACA_FP8_VARIANT", None)
            split = kernel_times(fp8, 10, warmup=1)
        base = statistics.median(times["cudnn"])
        for m, ts in times.items():
            ms = statistics.median(ts)
            rows.append(dict(shape=name, method=m, ms=ms, ms_rounds=ts, tflops=flops / ms / 1e9,
                             vs_cudnn=base / ms))
        quant = sum(t for kname, t in split.items() if "fp8_quant" in kname or "fp8_vmax" in kname or "Memset" in kname)
        attn = sum(t for kname, t in split.items() if "taca_fwd_fp8_kernel" in kname)
        rows.append(dict(shape=name, method="taca_fp8 kernels", split_us=split, quant_us=quant, attn_us=attn))
        if name in args.error.split(","):
            with torch.no_grad():
                ref = reference.attention_ref(q, k, v, upcast=torch.float32, **kw)[0]
                o16 = taca.joint_attention(q, k, v, **kw).float()
                o8 = taca.joint_attention(q, k, v, fp8=True, **kw).float()
                ref8 = reference.attention_fp8_ref(q, k, v, round_p=False, **kw)[0]
            rms = lambda x: float(x.pow(2).mean().sqrt())  # noqa: E731
            err = dict(bf16_max=float((o16 - ref).abs().max()), bf16_rel_rms=rms(o16 - ref) / rms(ref),
                       fp8_max=float((o8 - ref).abs().max()), fp8_rel_rms=rms(o8 - ref) / rms(ref),
                       fp8_vs_own_ref_max=float((o8 - ref8).abs().max()),
                       fp8_cos=float(F.cosine_similarity(o8.flatten(), ref.flatten(), dim=0)))
            rows.append(dict(shape=name, method="error", **err))
            del ref, ref8
        del q, k, v
        torch.cuda.empty_cache()

    with open(os.path.join(args.out, "bench_fp8.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"GPU: {meta['gpu']}; torch {meta['torch']}; CUDA {meta['cuda']}; bf16 inputs, gamma 1.2; {meta['date']}")
    print("| shape | method | ms (rounds) | TFLOP/s | vs cuDNN |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "ms" in r:
            rs = " ".join(f"{t:.4f}" for t in r["ms_rounds"])
            print(f"| {r['shape']} | {r['method']} | {r['ms']:.4f} ({rs}) | {r['tflops']:.0f} | {r['vs_cudnn']:.2f}x |")
    for r in rows:
        if r["method"] == "taca_fp8 kernels":
            print(f"{r['shape']}: fp8 call device us: quantization {r['quant_us']:.1f}, attention {r['attn_us']:.1f}; "
                  + ", ".join(f"{k2[:60]} {v2:.1f}" for k2, v2 in r["split_us"].items()))
        if r["method"] == "error":
            print(f"{r['shape']} error vs fp32 exact: bf16 max {r['bf16_max']:.3e} relRMS {r['bf16_rel_rms']:.2e}; "
                  f"fp8 max {r['fp8_max']:.3e} relRMS {r['fp8_rel_rms']:.2e} cos {r['fp8_cos']:.6f}; "
                  f"fp8 vs its own reference max {r['fp8_vs_own_ref_max']:.3e}")
    return 0


def _cudnn(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


if __name__ == "__main__":
    sys.exit(main())
