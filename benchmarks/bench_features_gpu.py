"""The op's model features on the CUDA kernels against what ran them before (split SDPA).

Shapes from the models the adapters cover (bf16, 1024x1024 images, CFG batch 2 where the model
pads text): Qwen-Image (text first, padded text as a (B, 1, 1, N_k) bool key mask), HunyuanImage
2.1 (text last, key mask), Chroma (additive (B, 1, N, N) mask), Krea2 (48 q / 12 kv heads), Lumina
2 (24 / 8 heads, D = 96, key mask), FLUX.2 Klein-KV-like image-only queries (N_q != N_k) and
per-sample text lengths without a mask. Per shape, fwd and fwd+bwd medians (triton do_bench) of:
  kernel  taca.joint_attention(backend="cuda")   (the kernels' feature paths, new)
  split   taca.joint_attention(backend="sdpa")   (what backend="auto" ran before)
  auto    taca.joint_attention(backend="auto")   (what runs by default: the kernel, or for Chroma's outer-product
          mask the key-mask kernel plus a maskless one over the rows whose token mask is 0)
  plain   F.scaled_dot_product_attention with the same mask, no gamma (efficient / flash / math:
          torch's pick; cuDNN is left out, its backward is unsafe on the lent GPU)
and the max error of the kernel and of split SDPA against the float32 reference (a 1/4 query
subset to keep the reference small). Writes JSON under --out and prints a table.

Run: python benchmarks/bench_features_gpu.py --out DIR [--quick]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bench(fn, quick):
    from triton.testing import do_bench

    return do_bench(fn, warmup=5 if quick else 20, rep=30 if quick else 80, return_mode="median")


def shapes():
    img = 4096
    return {
        # name: (B, H, Hkv, Nq, Nk, D, kwargs builder)
        "qwen-image cfg, key mask": (2, 24, 24, img + 256, img + 256, 128, "qwen"),
        "hunyuanimage cfg, key mask": (2, 28, 28, img + 256, img + 256, 128, "hunyuan"),
        "chroma cfg, float mask": (2, 24, 24, img + 512, img + 512, 128, "chroma"),
        "krea2 GQA 48/12": (1, 48, 12, img + 512, img + 512, 128, "krea2"),
        "lumina2 GQA 24/8 D96, key mask": (2, 24, 8, img + 256, img + 256, 96, "lumina"),
        "image-only queries": (1, 24, 24, img, img + 512, 128, "imageq"),
        "per-sample text lengths": (2, 24, 24, img + 512, img + 512, 128, "spans"),
        # head dim 256 (the Hopper D = 256 forward since 2026-12-03): AuraFlow (8 registers + 256
        # text tokens first, CFG), Ideogram 4 (18 heads, per-sample text)
        "auraflow cfg D256": (2, 12, 12, img + 264, img + 264, 256, "auraflow"),
        "ideogram4 D256, per-sample text": (2, 18, 18, img + 512, img + 512, 256, "spans"),
        # masks whose rows all equal one row outside a few (ops._row_range_mask): OmniGen's image rows (32 heads,
        # D = 96, CFG batch, the negative prompt left-padded; the processor passes those rows of the model's float
        # (B, 1, N, N) mask), Ideogram 4's bool segment mask (the left padding sees only itself)
        "omnigen cfg D96, image rows of the float mask": (2, 32, 32, img, img + 121, 96, "omnigen"),
        "ideogram4 D256, segment mask, per-sample text": (2, 18, 18, img + 512, img + 512, 256, "segment"),
    }


def build_kwargs(kind, B, H, Nq, Nk, dev):
    if kind in ("qwen", "hunyuan", "lumina"):
        L = Nk - 4096
        m = torch.ones(B, 1, 1, Nk, dtype=torch.bool)
        valid = [L, L // 3]  # the negative prompt is shorter: padded keys masked
        first = kind != "hunyuan"
        for b in range(B):
            if first:
                m[b, ..., valid[b]:L] = False
            else:
                m[b, ..., Nk - L + valid[b]:] = False
        return dict(text_len=L, text_first=first, attn_mask=m.to(dev))
    if kind == "chroma":
        L = Nk - 4096
        t = torch.ones(B, Nk)
        t[1, L // 2:L] = 0.0
        return dict(text_len=L, attn_mask=(t[:, :, None] * t[:, None, :])[:, None].to(dev, torch.bfloat16))
    if kind == "omnigen":  # [condition (L, left-padded), time token, image]: text causal, image sees every unpadded key
        L, N = Nk - Nq - 1, Nk
        m = torch.zeros(B, N, N, dtype=torch.bool)
        for b, pad in enumerate([0, L - 9]):  # the negative prompt: 9 tokens
            m[b, :L + 1, :L + 1] = torch.ones(L + 1, L + 1, dtype=torch.bool).tril()
            m[b, L + 1:] = True
            m[b, :, :pad] = False
            m[b, torch.arange(pad), torch.arange(pad)] = True
        full = ((~m).to(torch.bfloat16) * torch.finfo(torch.bfloat16).min)[:, None].to(dev)
        return dict(text_len=L, text_first=True, attn_mask=full[:, :, L + 1:])  # the processor's view
    if kind == "segment":
        L, pad = Nk - 4096, torch.tensor([0, 512 - 170])
        seg = torch.ones(B, Nk, dtype=torch.long)
        seg[1, :int(pad[1])] = -1
        return dict(text_len=torch.tensor([512, 170], device=dev), text_start=pad.to(dev),
                    attn_mask=(seg[:, :, None] == seg[:, None, :])[:, None].to(dev))
    if kind == "auraflow":
        return dict(text_len=264)
    if kind == "krea2":
        return dict(text_len=512)
    if kind == "imageq":
        return dict(text_len=512, text_first=True)
    if kind == "spans":
        return dict(text_len=torch.tensor([512, 170], device=dev))
    raise ValueError(kind)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--shapes", default="", help="regex: only shapes whose name matches")
    args = ap.parse_args(argv)
    import re
    import taca
    from taca import ops, reference

    dev = "cuda"
    rows = []
    for name, (B, H, Hkv, Nq, Nk, D, kind) in shapes().items():
        if args.shapes and not re.search(args.shapes, name):
            continue
        torch.manual_seed(0)
        q = torch.randn(B, H, Nq, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(B, Hkv, Nk, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        kw = build_kwargs(kind, B, H, Nq, Nk, dev)
        kw["gamma"] = 1.2
        dout = torch.randn(B, H, Nq, D, device=dev, dtype=torch.bfloat16)
        mask = kw.get("attn_mask")
        kr, vr = (t.repeat_interleave(H // Hkv, dim=1) if Hkv != H else t for t in (k, v))

        def run(backend):
            return lambda: taca.joint_attention(q, k, v, backend=backend, **kw)

        def plain():
            return F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)

        row = dict(shape=name, B=B, H=H, H_kv=Hkv, N_q=Nq, N_k=Nk, D=D)
        for label, fn in (("kernel", run("cuda")), ("split", run("sdpa")), ("auto", run("auto")), ("plain", plain)):
            with torch.no_grad():
                row[f"{label}_fwd_ms"] = _bench(fn, args.quick)

            def fb(fn=fn):
                o = fn()
                torch.autograd.grad(o, (q, k, v), dout)

            row[f"{label}_fwdbwd_ms"] = _bench(fb, args.quick)
        if mask is not None and ops._outer_mask_rows(mask) is not None:
            # the outer-product check, uncached: paid once per mask tensor (Chroma: once per block kind and call)
            def check():
                ops._OUTER_MASKS.clear()
                return ops._outer_mask_rows(mask)

            row["outer_check_ms"] = _bench(check, args.quick)
            print(f"{name}: the outer-product check (once per mask tensor) {row['outer_check_ms']:.3f} ms", flush=True)
        elif mask is not None and mask.shape[-2] > 1 and ops._row_range_mask(mask) is not None:
            def check():
                ops._ROW_MASKS.clear()
                return ops._row_range_mask(mask)

            row["row_check_ms"] = _bench(check, args.quick)
            row["row_range"] = list(ops._row_range_mask(mask)[1:])
            print(f"{name}: the row check (once per mask) {row['row_check_ms']:.3f} ms, rows apart "
                  f"{row['row_range']}", flush=True)
        # errors against the float32 reference on a quarter of the queries (memory)
        sub = slice(0, Nq // 4)
        qs = q.detach()[:, :, sub]
        with torch.no_grad():
            kw_ref = dict(kw)
            if mask is not None:
                kw_ref["attn_mask"] = mask[:, :, sub] if mask.shape[2] > 1 else mask
                if kw_ref["attn_mask"].is_floating_point():
                    kw_ref["attn_mask"] = kw_ref["attn_mask"].float()
            ref = reference.attention_ref(qs.float(), k.detach().float(), v.detach().float(),
                                          upcast=torch.float32, **_subset_spans(kw_ref, Nq, Nk))[0]
            outs = {b: taca.joint_attention(q.detach(), k.detach(), v.detach(), backend=b, **kw)[:, :, sub]
                    for b in ("cuda", "sdpa", "auto")}
        row["kernel_err"] = (outs["cuda"].float() - ref).abs().max().item()
        row["split_err"] = (outs["sdpa"].float() - ref).abs().max().item()
        row["auto_err"] = (outs["auto"].float() - ref).abs().max().item()
        rows.append(row)
        print(f"{name}: kernel {row['kernel_fwd_ms']:.3f}/{row['kernel_fwdbwd_ms']:.3f} ms, split "
              f"{row['split_fwd_ms']:.3f}/{row['split_fwdbwd_ms']:.3f}, plain {row['plain_fwd_ms']:.3f}/"
              f"{row['plain_fwdbwd_ms']:.3f}, auto {row['auto_fwd_ms']:.3f}/{row['auto_fwdbwd_ms']:.3f}; err "
              f"{row['kernel_err']:.2e} vs {row['split_err']:.2e} (auto {row['auto_err']:.2e})", flush=True)
        torch.cuda.empty_cache()

    gpu = torch.cuda.get_device_name().replace(" ", "_")
    stamp = datetime.datetime.utcnow().strftime("%Y%m%d_%H%M")
    path = os.path.join(args.out, f"features_{gpu}_{stamp}.json")
    with open(path, "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)
    print("\n| shape | kernel fwd / fwd+bwd ms | split SDPA | auto | plain SDPA (same mask, no gamma) | kernel vs split | "
          "auto vs plain | max err kernel / split / auto |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['kernel_fwd_ms']:.3f} / {r['kernel_fwdbwd_ms']:.3f} | {r['split_fwd_ms']:.3f} / "
              f"{r['split_fwdbwd_ms']:.3f} | {r['auto_fwd_ms']:.3f} / {r['auto_fwdbwd_ms']:.3f} | "
              f"{r['plain_fwd_ms']:.3f} / {r['plain_fwdbwd_ms']:.3f} | "
              f"{r['split_fwd_ms'] / r['kernel_fwd_ms']:.2f}x / {r['split_fwdbwd_ms'] / r['kernel_fwdbwd_ms']:.2f}x | "
              f"{r['plain_fwd_ms'] / r['auto_fwd_ms']:.2f}x / {r['plain_fwdbwd_ms'] / r['auto_fwdbwd_ms']:.2f}x | "
              f"{r['kernel_err']:.1e} / {r['split_err']:.1e} / {r['auto_err']:.1e} |")
    print(f"wrote {path}")
    return 0


def _subset_spans(kw, Nq, Nk):
    """The span arguments for the first quarter of the queries: explicit query spans, so the
    subset keeps the full call's query text span (text first: [0, L) lies in the first quarter)."""
    kw = dict(kw)
    if Nq != Nk:  # image-only queries: no text query
        kw["query_text_len"] = 0
        kw["query_text_start"] = 0
        return kw
    L = kw["text_len"]
    first = kw.get("text_first", True)
    if first:  # (text_start given: the text queries start there, inside the first quarter in these shapes)
        kw["query_text_start"] = kw.get("text_start", 0)
        kw["query_text_len"] = L
    else:  # text last: no text query among the first quarter
        kw["query_text_start"] = 0
        kw["query_text_len"] = 0
    return kw


if __name__ == "__main__":
    sys.exit(main())
