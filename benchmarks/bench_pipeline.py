"""One denoising step of FLUX.1-dev-sized and SD3.5-Large-sized transformers: stock attention vs
TACA enabled (a step inside the gamma window and one outside), and a 28-step schedule with the
paper's rule.

Question: what does TACA cost end to end? Targets (PERFORMANCE.md): a 28-step FLUX.1-dev image at
1024x1024 costs <= 1% more with the paper's schedule, gamma = 1 steps cost nothing extra.

Models have the real configurations and random bf16 weights (no download): FLUX.1-dev (19 double
+ 38 single blocks, 24 heads x 128, 4096 image + 512 text tokens, batch 1, guidance embedding)
and SD3.5-Large (38 layers, 38 heads x 64, QK RMSNorm, 4096 image + 333 text tokens, CFG batch 2).
Only the transformer runs, called directly with the pipelines' keyword arguments.

    python benchmarks/bench_pipeline.py --out benchmarks/results            # GPU, real sizes
    python benchmarks/bench_pipeline.py --tiny --out /tmp/bench              # CPU smoke test

Timing: CUDA events (wall clock on CPU) around one transformer call, median over --repeats rounds in
which every mode runs once after an untimed call of its own: stock and TACA alternate, so the GPU's
clock and temperature drift reach them alike (measuring stock first, then TACA, put up to ~0.7% of
drift between them). Timesteps are views of one table, as a pipeline indexes its scheduler's, so the
hook takes its host path (no device sync); "sync" is TACA with a fresh timestep tensor per call (a
bare transformer outside a pipeline: one host sync per call). The 28-step rows run the real
scheduler's sigma sequence, stock and TACA alternating per repeat.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import taca  # noqa: E402
from taca import schedule as S  # noqa: E402

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                guidance_embeds=True, axes_dims_rope=(16, 56, 56))
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")
TINY_FLUX = dict(FLUX_DEV, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8))
TINY_SD35 = dict(SD35_LARGE, sample_size=32, num_layers=2, attention_head_dim=8, num_attention_heads=4,
                 joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=96)


def build(kind: str, tiny: bool, device, dtype):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = FluxTransformer2DModel if kind == "flux" else SD3Transformer2DModel
    cfg = (TINY_FLUX if kind == "flux" else TINY_SD35) if tiny else (FLUX_DEV if kind == "flux" else SD35_LARGE)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in bf16 on the device: no fp32 copy of 12B weights
    try:
        with torch.device(device):
            model = cls(**cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def inputs(kind: str, model, tiny: bool, device, dtype):
    """Keyword arguments as the pipelines pass them at 1024x1024 (tiny: 64x64 / 32x32)."""
    cfg = model.config
    g = torch.Generator(device="cpu").manual_seed(1)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    if kind == "flux":
        h = w = 64 if not tiny else 4  # latent grid after 2x2 packing: 1024/16
        L = 512 if not tiny else 12
        img_ids = torch.zeros(h, w, 3)
        img_ids[..., 1] = torch.arange(h)[:, None]
        img_ids[..., 2] = torch.arange(w)[None, :]
        return dict(hidden_states=r(1, h * w, cfg.in_channels), encoder_hidden_states=r(1, L, cfg.joint_attention_dim),
                    pooled_projections=r(1, cfg.pooled_projection_dim), img_ids=img_ids.reshape(-1, 3).to(device),
                    txt_ids=torch.zeros(L, 3, device=device), guidance=torch.full((1,), 3.5, device=device),
                    return_dict=False), h * w, L
    side = 128 if not tiny else 8  # 1024 / 8 latent pixels; patch 2 -> 4096 tokens
    L = 333 if not tiny else 11
    return dict(hidden_states=r(2, cfg.in_channels, side, side), encoder_hidden_states=r(2, L, cfg.joint_attention_dim),
                pooled_projections=r(2, cfg.pooled_projection_dim), return_dict=False), (side // 2) ** 2, L


def timestep(kind: str, sigma: float, batch: int, device, dtype):
    if kind == "flux":  # FluxPipeline: t.expand(B).to(latents.dtype) / 1000
        return (torch.full((batch,), sigma * 1000.0, device=device).to(dtype)) / 1000
    return torch.full((batch,), sigma * 1000.0, device=device)  # SD3: t in [0, 1000], float32


class Timer:
    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def once(self, fn) -> float:
        """ms of one call (CUDA events on the GPU, wall clock on the CPU)."""
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            return a.elapsed_time(b)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def timestep_table(kind: str, sigmas, device, dtype) -> torch.Tensor:
    """The transformer's timestep for each sigma, as one 1-D tensor: a call passes a view of one entry
    (expanded to the batch), as the pipelines index their scheduler's timesteps. TACA's hook then reads
    sigma from a host copy of this table (its "host" path, the one a diffusers pipeline call takes)
    instead of one device sync per call (its "sync" path, what a fresh timestep tensor gets)."""
    return torch.cat([timestep(kind, s, 1, device, dtype) for s in sigmas])


def bench_model(kind: str, args, device, dtype):
    model = build(kind, args.tiny, device, dtype)
    kw, n_img, L = inputs(kind, model, args.tiny, device, dtype)
    B = kw["hidden_states"].shape[0]
    timer = Timer(device)
    res = dict(model="FLUX.1-dev" if kind == "flux" else "SD3.5-Large", batch=B, image_tokens=n_img, text_tokens=L,
               dtype=str(dtype).replace("torch.", ""))
    n = args.steps
    sig = S.pipeline_sigmas(kind, n, image_seq_len=4096).tolist()  # 1024x1024, the real scheduler's sigmas
    window = S.window_steps("paper", kind, n)
    res["schedule_steps"] = n
    res["schedule_window_steps"] = window
    tab = timestep_table(kind, [1.0, 0.5] + sig, device, dtype)  # entry 0: sigma 1 (gamma on), 1: 0.5 (off)

    def ts(i):
        return tab[i:i + 1].expand(B)

    state = {"h": None}

    def use(taca_on: bool):
        if taca_on and state["h"] is None:
            state["h"] = taca.enable(model, gamma=args.gamma, backend=args.backend, fp8=args.fp8)
        elif not taca_on and state["h"] is not None:
            taca.disable(model)
            state["h"] = None

    # one step per mode, the modes interleaved round by round (stock and TACA alternate, so the GPU's
    # clock and temperature drift reach every mode alike); each timed call follows an untimed one
    modes = {
        "stock_ms": (False, lambda: model(**kw, timestep=ts(0))),
        "taca_gamma_on_ms": (True, lambda: model(**kw, timestep=ts(0))),
        "taca_gamma_off_ms": (True, lambda: model(**kw, timestep=ts(1))),
        "stock_off_ms": (False, lambda: model(**kw, timestep=ts(1))),
        # a fresh timestep tensor: the hook's sync path (a bare transformer called outside a pipeline)
        "taca_gamma_on_sync_ms": (True, lambda: model(**kw, timestep=timestep(kind, 1.0, B, device, dtype))),
    }
    paths = {}
    times = {m: [] for m in modes}
    try:
        with torch.inference_mode():
            out_stock = model(**kw, timestep=ts(0))[0].float()
            out_stock_off = model(**kw, timestep=ts(1))[0].float()
            for _ in range(args.warmup):
                for on, fn in modes.values():
                    use(on)
                    fn()
            for _ in range(args.repeats):
                for m, (on, fn) in modes.items():
                    use(on)
                    fn()
                    times[m].append(timer.once(fn))
                    if on:
                        paths[m] = state["h"].last_path
            use(True)
            out_taca = model(**kw, timestep=ts(0))[0].float()
            out_off = model(**kw, timestep=ts(1))[0].float()
            observed = []
            for i in range(len(sig)):  # the window the hook sees (FLUX passes bf16 timesteps)
                model(**kw, timestep=ts(2 + i))
                if state["h"].last_gamma is not None:
                    observed.append(i)
            res["schedule_window_steps_observed"] = observed

            def loop():
                for i in range(len(sig)):
                    model(**kw, timestep=ts(2 + i))

            sched = {False: [], True: []}
            for _ in range(args.schedule_repeats):
                for on in (False, True):
                    use(on)
                    sched[on].append(timer.once(loop))
    finally:
        use(False)
    for m in modes:
        res[m] = statistics.median(times[m])
        res[m.replace("_ms", "_all_ms")] = times[m]
    res["hook_path"] = paths
    res["gamma_off_bit_identical_to_stock"] = bool(torch.equal(out_off, out_stock_off))
    res["gamma_on_rel_change"] = float((out_taca - out_stock).norm() / out_stock.norm())
    res["gamma_off_rel_change"] = float((out_off - out_stock_off).norm() / out_stock_off.norm())
    res["schedule_stock_ms"] = statistics.median(sched[False])
    res["schedule_taca_ms"] = statistics.median(sched[True])
    res["schedule_estimate_taca_ms"] = len(window) * res["taca_gamma_on_ms"] + (n - len(window)) * res["taca_gamma_off_ms"]
    res["gamma_on_overhead_pct"] = 100 * (res["taca_gamma_on_ms"] / res["stock_ms"] - 1)
    res["gamma_on_sync_overhead_pct"] = 100 * (res["taca_gamma_on_sync_ms"] / res["stock_ms"] - 1)
    res["gamma_off_overhead_pct"] = 100 * (res["taca_gamma_off_ms"] / res["stock_off_ms"] - 1)
    res["schedule_overhead_pct"] = 100 * (res["schedule_taca_ms"] / res["schedule_stock_ms"] - 1)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for the JSON results")
    ap.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke test)")
    ap.add_argument("--models", default="flux,sd3", help="comma list of flux, sd3")
    ap.add_argument("--device", default=None)
    ap.add_argument("--gamma", type=float, default=1.2)
    ap.add_argument("--backend", default="auto", help="taca.joint_attention backend")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--schedule-repeats", type=int, default=2)
    ap.add_argument("--fp8", action="store_true",
                    help="taca.enable(fp8=True): every TACA-processed call (gamma on and off) through the FP8 forward")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    env = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
               torch=torch.__version__, cuda=torch.version.cuda, tiny=args.tiny, gamma=args.gamma, backend=args.backend,
               fp8=args.fp8)
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    results = [bench_model(k.strip(), args, device, dtype) for k in args.models.split(",") if k.strip()]
    os.makedirs(args.out, exist_ok=True)
    tag = "tiny" if args.tiny else device.type
    path = os.path.join(args.out, f"bench_pipeline_{tag}.json")
    with open(path, "w") as f:
        json.dump(dict(env=env, results=results), f, indent=2)
    print(f"# {env['device']}, torch {env['torch']}, CUDA {env['cuda']}, diffusers {env.get('diffusers')}, "
          f"gamma {args.gamma}, backend {args.backend}{', fp8' if args.fp8 else ''}"
          f"{' (TINY configs)' if args.tiny else ''}; JSON: {path}")
    hdr = f"{'model':12} {'B':>2} {'img+txt':>10} {'stock ms':>9} {'TACA on':>9} {'(+%)':>7} {'sync (+%)':>9} {'TACA off':>9} {'(+%)':>7} " \
          f"{'off==stock':>10} | {args.steps}-step: {'window':>8} {'stock ms':>10} {'TACA ms':>10} {'(+%)':>7}"
    print(hdr)
    for r in results:
        w = r["schedule_window_steps"]
        print(f"{r['model']:12} {r['batch']:>2} {str(r['image_tokens']) + '+' + str(r['text_tokens']):>10} "
              f"{r['stock_ms']:9.2f} {r['taca_gamma_on_ms']:9.2f} {r['gamma_on_overhead_pct']:+7.2f} "
              f"{r['gamma_on_sync_overhead_pct']:+9.2f} "
              f"{r['taca_gamma_off_ms']:9.2f} {r['gamma_off_overhead_pct']:+7.2f} {str(r['gamma_off_bit_identical_to_stock']):>10} | "
              f"{(str(w[0]) + '-' + str(w[-1])) if w else 'none':>16} "
              f"{r['schedule_stock_ms']:10.1f} {r['schedule_taca_ms']:10.1f} {r['schedule_overhead_pct']:+7.2f}")
        print(f"  output change against stock: gamma on {r['gamma_on_rel_change']:.4f}, gamma off "
              f"{r['gamma_off_rel_change']:.4f} (relative L2)")


if __name__ == "__main__":
    main()
