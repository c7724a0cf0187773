"""One denoising step of FLUX.2-dev-sized and Qwen-Image-sized transformers at 1024x1024: stock
attention, a TACA step inside the gamma window, and a TACA step outside it (gamma = 1).

Question (issue 12): do the new model adapters cost what the FLUX.1 one does? Targets: gamma = 1
steps cost nothing (bit-identical to stock, <= 0.5%), gamma steps <= 2% over stock.

Real configurations, random bf16 weights (no download), built directly on the device:
- FLUX.2-dev: ``Flux2Transformer2DModel()``'s defaults are the dev checkpoint's config (8 double +
  48 single blocks, 48 heads x 128, joint_attention_dim 15360, guidance embedding); 4096 image
  tokens (1024x1024 with the VAE's 16x total reduction: a 64x64 token grid) + 512 text
  tokens, batch 1 (guidance-distilled: no CFG batch).
- Qwen-Image: ``QwenImageTransformer2DModel()``'s defaults are the checkpoint's (60 layers, 24
  heads x 128, joint_attention_dim 3584); 4096 image tokens + 256 text tokens, batch 1 (the
  pipeline runs the conditional and unconditional forwards separately), no mask (unpadded).
Only the transformer runs, called with the pipelines' keyword arguments and ``timestep = sigma``
in bf16 as both pipelines pass it.

    python benchmarks/bench_models_step.py --out benchmarks/results           # GPU, real sizes
    python benchmarks/bench_models_step.py --tiny --out /tmp/bench             # CPU smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import taca  # noqa: E402
import taca.ops  # noqa: E402
from bench_pipeline import Timer  # noqa: E402

FLUX2_DEV: dict = {}  # the class defaults are FLUX.2-dev
TINY_FLUX2 = dict(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2,
                  joint_attention_dim=24, timestep_guidance_channels=32, axes_dims_rope=(8, 8, 8, 8))
QWEN_IMAGE: dict = {}  # the class defaults are Qwen-Image
TINY_QWEN = dict(num_layers=1, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=24,
                 axes_dims_rope=(8, 12, 12))


def build(name: str, tiny: bool, device, dtype):
    from diffusers import Flux2Transformer2DModel, QwenImageTransformer2DModel

    cls, cfg = {"flux2-dev": (Flux2Transformer2DModel, TINY_FLUX2 if tiny else FLUX2_DEV),
                "qwen-image": (QwenImageTransformer2DModel, TINY_QWEN if tiny else QWEN_IMAGE)}[name]
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # straight to bf16 on the device: no fp32 copy of 20-32B weights
    try:
        with torch.device(device):
            model = cls(**cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def inputs(name: str, model, tiny: bool, device, dtype):
    """(kwargs without timestep, image tokens, text tokens) as the pipelines pass them."""
    cfg = model.config
    g = torch.Generator(device="cpu").manual_seed(1)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    side = 4 if tiny else 64  # 1024 / 16: the token grid after the VAE (8x) and 2x2 packing
    if name == "flux2-dev":
        L = 8 if tiny else 512
        img_ids = torch.cartesian_prod(torch.zeros(1), torch.arange(side).float(), torch.arange(side).float(),
                                       torch.zeros(1))
        txt_ids = torch.cartesian_prod(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.arange(L).float())
        kw = dict(hidden_states=r(1, side * side, cfg.in_channels), encoder_hidden_states=r(1, L, cfg.joint_attention_dim),
                  img_ids=img_ids[None].to(device), txt_ids=txt_ids[None].to(device), return_dict=False)
        if cfg.guidance_embeds:
            kw["guidance"] = torch.full((1,), 4.0, device=device)
        return kw, side * side, L
    L = 8 if tiny else 256
    return dict(hidden_states=r(1, side * side, cfg.in_channels), encoder_hidden_states=r(1, L, cfg.joint_attention_dim),
                encoder_hidden_states_mask=None, img_shapes=[[(1, side, side)]], return_dict=False), side * side, L


def bench_model(name: str, args, device, dtype):
    model = build(name, args.tiny, device, dtype)
    kw, n_img, L = inputs(name, model, args.tiny, device, dtype)
    timer = Timer(device)
    res = dict(model=name, batch=1, image_tokens=n_img, text_tokens=L, dtype=str(dtype).replace("torch.", ""),
               params_billion=sum(p.numel() for p in model.parameters()) / 1e9)

    def ts(sigma):  # both pipelines: timestep / 1000 in the latents' dtype
        return torch.full((1,), sigma, device=device).to(dtype)

    def step(sigma):
        return lambda: model(**kw, timestep=ts(sigma))

    with torch.inference_mode():
        out_stock_in = model(**kw, timestep=ts(1.0))[0].float()
        out_stock_off = model(**kw, timestep=ts(0.5))[0].float()
        stock = [timer(step(1.0), args.warmup, args.repeats)]
        h = taca.enable(model, gamma=args.gamma, backend=args.backend)
        try:
            on = [timer(step(1.0), args.warmup, args.repeats)]
            assert h.last_gamma is not None, "the gamma step did not get gamma"
            off = [timer(step(0.5), args.warmup, args.repeats)]
            assert h.last_gamma is None, "the sigma 0.5 step got gamma"
            out_on = model(**kw, timestep=ts(1.0))[0].float()
            out_off = model(**kw, timestep=ts(0.5))[0].float()
        finally:
            taca.disable(model)
        # a second round, interleaved, so drift between the first ones does not pose as overhead
        stock.append(timer(step(1.0), 1, args.repeats))
        h = taca.enable(model, gamma=args.gamma, backend=args.backend)
        try:
            on.append(timer(step(1.0), 1, args.repeats))
            off.append(timer(step(0.5), 1, args.repeats))
        finally:
            taca.disable(model)
    res.update(stock_ms=min(stock), taca_gamma_on_ms=min(on), taca_gamma_off_ms=min(off),
               rounds=dict(stock=stock, gamma_on=on, gamma_off=off),
               gamma_off_bit_identical_to_stock=bool(torch.equal(out_off, out_stock_off)),
               gamma_on_rel_change=float((out_on - out_stock_in).norm() / out_stock_in.norm()))
    res["gamma_on_overhead_pct"] = 100 * (res["taca_gamma_on_ms"] / res["stock_ms"] - 1)
    res["gamma_off_overhead_pct"] = 100 * (res["taca_gamma_off_ms"] / res["stock_ms"] - 1)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for the JSON results")
    ap.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke test)")
    ap.add_argument("--models", default="flux2-dev,qwen-image", help="comma list of flux2-dev, qwen-image")
    ap.add_argument("--device", default=None)
    ap.add_argument("--gamma", type=float, default=1.2)
    ap.add_argument("--backend", default="auto", help="taca.joint_attention backend")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    import diffusers

    env = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
               torch=torch.__version__, cuda=torch.version.cuda, diffusers=diffusers.__version__, tiny=args.tiny,
               gamma=args.gamma, backend=args.backend, kernels=taca.ops.HAVE_CUDA_KERNEL)
    rows = [bench_model(m.strip(), args, device, dtype) for m in args.models.split(",")]
    os.makedirs(args.out, exist_ok=True)
    tag = env["device"].replace(" ", "_").replace("/", "_")
    path = os.path.join(args.out, f"models_step_{tag}_{time.strftime('%Y%m%d_%H%M')}.json")
    with open(path, "w") as f:
        json.dump(dict(env=env, results=rows), f, indent=1)
    print(f"{env['device']}, torch {env['torch']}, CUDA {env['cuda']}, diffusers {env['diffusers']}, "
          f"gamma {args.gamma}, backend {args.backend} (CUDA kernels built: {env['kernels']}); min of 2 interleaved "
          f"rounds of median-of-{args.repeats}")
    print("| model | tokens img+txt | stock ms | gamma step ms (+%) | gamma=1 step ms (+%) | gamma=1 bit-identical |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} ({r['params_billion']:.1f}B) | {r['image_tokens']}+{r['text_tokens']} | {r['stock_ms']:.1f} | "
              f"{r['taca_gamma_on_ms']:.1f} ({r['gamma_on_overhead_pct']:+.2f}%) | {r['taca_gamma_off_ms']:.1f} "
              f"({r['gamma_off_overhead_pct']:+.2f}%) | {r['gamma_off_bit_identical_to_stock']} |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
