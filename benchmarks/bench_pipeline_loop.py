"""Whole pipeline calls, 28 steps at 1024x1024: stock attention vs TACA (paper rule, gamma 1.2)
with the hook's host-sigma path vs its one-sync-per-step path.

Question: what does TACA cost end to end in a real diffusers pipeline loop (scheduler, CFG,
hook, LoRA-free), and does the host-sigma path remove the per-step sync's cost? Target
(PERFORMANCE.md / issue 4): <= 1% over stock for the 28-step schedule.

Models: FLUX.1-dev-sized FluxPipeline (batch 1, guidance 3.5, 512 text tokens) and an
SD3.5-Large-sized StableDiffusion3Pipeline (CFG 5.0, 333 text tokens), real transformer configs
(benchmarks/bench_pipeline.py's builders), random bf16 weights, precomputed random prompt
embeddings, output_type="latent" (no VAE, no text encoders). Modes are interleaved per round;
each mode's first call is a warm-up and also checks that host and sync paths give bit-identical
latents.

    python benchmarks/bench_pipeline_loop.py --out DIR [--rounds 3] [--models flux,sd3] [--tiny]

Prints one JSON line per model and writes pipeline_loop_<gpu>_<date>.json into --out.
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

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]


def main(argv=None) -> int:
    import bench_pipeline as bp
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    import taca
    from taca import tiny

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", default="flux,sd3")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke test)")
    args = ap.parse_args(argv)
    T = args.tiny
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    results = {}
    for kind in args.models.split(","):
        m = bp.build(kind, T, dev, dt)
        c = m.config
        g = torch.Generator().manual_seed(0)

        def r(*s):
            return torch.randn(*s, generator=g).to(dev, dt)

        L = (12 if kind == "flux" else 11) if T else (512 if kind == "flux" else 333)
        kw = dict(prompt_embeds=r(1, L, c.joint_attention_dim), pooled_prompt_embeds=r(1, c.pooled_projection_dim),
                  height=64 if T else 1024, width=64 if T else 1024, num_inference_steps=args.steps,
                  output_type="latent")
        if kind == "flux":
            pipe = FluxPipeline(scheduler=tiny.flux_scheduler(), vae=None, text_encoder=None, tokenizer=None,
                                text_encoder_2=None, tokenizer_2=None, transformer=m)
            kw["guidance_scale"] = 3.5
        else:
            pipe = StableDiffusion3Pipeline(transformer=m, scheduler=tiny.sd3_scheduler(), vae=None,
                                            text_encoder=None, tokenizer=None, text_encoder_2=None,
                                            tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
            kw.update(negative_prompt_embeds=r(1, L, c.joint_attention_dim),
                      negative_pooled_prompt_embeds=r(1, c.pooled_projection_dim), guidance_scale=5.0)
        pipe.set_progress_bar_config(disable=True)

        def call(mode):
            h = taca.enable(pipe, gamma=1.2) if mode != "stock" else None
            if h is not None:
                h.host_sigma = mode == "host"
            sync()
            t0 = time.perf_counter()
            out = pipe(**kw, generator=torch.Generator().manual_seed(1)).images
            sync()
            ms = (time.perf_counter() - t0) * 1e3
            info = (h.last_path, h.host_copies) if h is not None else None
            taca.disable(pipe)
            return ms, out, info

        modes = ("stock", "host", "sync")
        first = {k: call(k) for k in modes}
        ms = {k: [] for k in modes}
        for _ in range(args.rounds):
            for k in modes:
                ms[k].append(call(k)[0])
        med = {k: statistics.median(v) for k, v in ms.items()}
        res = dict(median_ms=med, all_ms=ms,
                   host_pct=100 * (med["host"] / med["stock"] - 1),
                   sync_pct=100 * (med["sync"] / med["stock"] - 1),
                   path_copies={k: first[k][2] for k in ("host", "sync")},
                   host_equals_sync=bool(torch.equal(first["host"][1], first["sync"][1])))
        results[kind] = res
        print(kind, json.dumps(res), flush=True)
        del pipe, m
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    header = f"device {name}; torch {torch.__version__}; {args.steps} steps; rounds {args.rounds}"
    print("#", header)
    os.makedirs(args.out, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
    path = os.path.join(args.out, f"pipeline_loop_{slug}_{datetime.datetime.now(datetime.timezone.utc):%Y%m%d}.json")
    with open(path, "w") as f:
        json.dump({"header": header, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
