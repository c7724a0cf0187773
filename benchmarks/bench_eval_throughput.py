"""What does a T2I-CompBench run cost, and does ``taca eval`` work end to end on a GPU?

Two parts (``--part e2e|throughput|all``):

- e2e: ``taca eval generate`` (baseline and TACA) + ``score blip-vqa`` + ``score clip`` +
  ``report`` through the real CLI (``python -m taca eval ...`` subprocesses) on a tiny random-weight
  FLUX pipeline saved to a folder, with tiny BLIP/CLIP scorers built and saved on the fly (the real
  scorers cannot be downloaded on the device). Scores of random weights mean nothing; the point is
  that every file lands where the official scripts expect it, on CUDA.
- throughput: images/s of a FLUX.1-dev-sized FluxPipeline with random bf16 weights (the real
  transformer config: 19 double + 38 single blocks, 24 heads x 128, joint_attention_dim 4096,
  pooled 768, guidance embedding; the real VAE config), 1024x1024, 28 steps, guidance 3.5, batch 1
  and 4, TACA off and on (gamma 1.2, paper schedule). Text encoders are skipped by passing
  prompt_embeds (B, 512, 4096) and pooled (B, 768): T5/CLIP encoding runs once per prompt and is a
  small part of a call. Each configuration is timed over --repeats whole pipeline calls (VAE decode
  and PIL conversion included, PNG writing not) after one short warm-up call; the cost of a full
  category (300 prompts x 10 images = 3000 images) and of all 8 categories is extrapolated from
  those few calls, and says so.

    python benchmarks/bench_eval_throughput.py --out $OUT                # GPU (see gpu_eval_run.sh)
    python benchmarks/bench_eval_throughput.py --tiny --out /tmp/bench   # CPU smoke test, tiny shapes

Prints a short table last and writes eval_throughput.json / eval_e2e.json to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import taca  # noqa: E402

FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                            guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# black-forest-labs/FLUX.1-dev vae/config.json
FLUX_DEV_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                    layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu", norm_num_groups=32, sample_size=1024,
                    scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
                    force_upcast=True)
TINY_TRANSFORMER = dict(FLUX_DEV_TRANSFORMER, num_layers=2, num_single_layers=2, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                        axes_dims_rope=(4, 4, 8))
TINY_VAE = dict(FLUX_DEV_VAE, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
IMAGES_PER_CATEGORY = 3000


def _env():
    cuda = torch.cuda.is_available()
    has_cuda_kernels = False
    try:
        import taca._C  # noqa: F401

        has_cuda_kernels = bool(torch.ops.taca.has_cuda())
    except Exception:  # noqa: BLE001 (no built extension: TACA runs its PyTorch path)
        pass
    import diffusers

    return dict(device=torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
                torch=torch.__version__, cuda=torch.version.cuda, diffusers=diffusers.__version__,
                taca=taca.__version__, taca_cuda_kernels=has_cuda_kernels)


# throughput -----------------------------------------------------------------------------------------
def build_pipeline(tiny: bool, device, dtype):
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel

    from taca.tiny import flux_scheduler

    old = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)  # build in bf16 on the device: no fp32 copy of 12B weights
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(**(TINY_TRANSFORMER if tiny else FLUX_DEV_TRANSFORMER)).eval()
            vae = AutoencoderKL(**(TINY_VAE if tiny else FLUX_DEV_VAE)).eval()
    finally:
        torch.set_default_dtype(old)
    pipe = FluxPipeline(scheduler=flux_scheduler(), vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_calls(pipe, batch: int, steps: int, size: int, repeats: int, device, dtype) -> list:
    cfg = pipe.transformer.config
    g = torch.Generator().manual_seed(0)
    pe = torch.randn(1, 512 if size >= 256 else 12, cfg.joint_attention_dim, generator=g).to(device, dtype)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g).to(device, dtype)

    def call(n_steps):
        gens = [torch.Generator().manual_seed(42 + j) for j in range(batch)]
        return pipe(prompt_embeds=pe, pooled_prompt_embeds=pooled, num_images_per_prompt=batch, height=size,
                    width=size, num_inference_steps=n_steps, guidance_scale=3.5,
                    generator=gens if batch > 1 else gens[0], output_type="pil").images

    call(2)  # warm-up (kernels, allocator), 2 steps
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        imgs = call(steps)
        _sync(device)
        times.append(time.perf_counter() - t0)
        assert len(imgs) == batch
    return times


def throughput(args, device, dtype) -> dict:
    size = 64 if args.tiny else 1024
    steps = 2 if args.tiny else args.steps
    t0 = time.perf_counter()
    pipe = build_pipeline(args.tiny, device, dtype)
    build_s = time.perf_counter() - t0
    rows = []
    with torch.inference_mode():
        for batch in args.batches:
            for on in (False, True):
                if on:
                    taca.enable(pipe, gamma=1.2, schedule="paper")
                try:
                    times = time_calls(pipe, batch, steps, size, args.repeats, device, dtype)
                finally:
                    if on:
                        taca.disable(pipe)
                per_call = min(times)
                ips = batch / per_call
                rows.append(dict(batch=batch, taca=on, calls=len(times), seconds_per_call=times,
                                 images_per_s=ips, category_hours=IMAGES_PER_CATEGORY / ips / 3600,
                                 all_8_categories_hours=8 * IMAGES_PER_CATEGORY / ips / 3600))
                print(f"  batch {batch} TACA {'on ' if on else 'off'}: {per_call:.2f} s/call, {ips:.3f} img/s",
                      file=sys.stderr, flush=True)
    for r in rows:
        if r["taca"]:
            base = next(b for b in rows if b["batch"] == r["batch"] and not b["taca"])
            r["ratio_to_off"] = base["images_per_s"] / r["images_per_s"]
    return dict(size=size, steps=steps, dtype=str(dtype).replace("torch.", ""), build_s=build_s,
                note=(f"timed over {args.repeats} call(s) per configuration (best of them) after one 2-step warm-up; "
                      f"the 3000-image category cost is extrapolated from these calls (PNG writing and text "
                      f"encoding not included)"), rows=rows)


# e2e -----------------------------------------------------------------------------------------------
def _cli(args, env):
    cmd = [sys.executable, "-m", "taca", "eval"] + args
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    dt = time.perf_counter() - t0
    tail = "\n".join(l for l in p.stderr.splitlines() if l.startswith("taca eval"))[-800:]
    print(f"  $ taca eval {' '.join(args[:1])} ... rc={p.returncode} ({dt:.1f} s) {tail}", file=sys.stderr, flush=True)
    if p.returncode != 0:
        print(p.stderr[-3000:], file=sys.stderr)
    return dict(cmd=" ".join(["taca", "eval"] + args), rc=p.returncode, seconds=dt, stdout=p.stdout[-4000:],
                stderr_tail=tail)


def e2e(args, work: str) -> dict:
    from taca.demo import build_tiny_flux_pipeline
    from taca.eval.tiny_scorers import save_tiny_blip, save_tiny_clip

    pipe_dir = os.path.join(work, "tiny-flux")
    build_tiny_flux_pipeline().save_pretrained(pipe_dir)
    blip, clip = save_tiny_blip(os.path.join(work, "blip")), save_tiny_clip(os.path.join(work, "clip"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    gen = ["--categories", "color,non_spatial", "--limit-prompts", "2", "--images-per-prompt", "2", "--steps", "4",
           "--height", "32", "--width", "32", "--no-progress"]
    steps = []
    runs = {"base": ["--no-taca"], "taca": ["--taca", "gamma=1.2,schedule=paper"]}
    for name, flag in runs.items():
        run = os.path.join(work, name)
        steps.append(_cli(["generate", "--model", pipe_dir, "--out", run] + flag + gen, env))
        steps.append(_cli(["score", "blip-vqa", os.path.join(run, "color"), "--blip", blip, "--no-progress"], env))
        steps.append(_cli(["score", "clip", os.path.join(run, "non_spatial"), "--clip", clip, "--no-progress"], env))
    steps.append(_cli(["report", os.path.join(work, "base"), os.path.join(work, "taca")], env))
    files = {}
    for name in runs:
        for rel in ("run.json", "color/manifest.jsonl", "color/annotation_blip/vqa_result.json",
                    "color/annotation_blip/score.json", "non_spatial/annotation_clip/vqa_result.json",
                    "non_spatial/annotation_clip/score.json"):
            files[f"{name}/{rel}"] = os.path.isfile(os.path.join(work, name, rel))
        files[f"{name}/color/samples (count)"] = len(os.listdir(os.path.join(work, name, "color", "samples"))) \
            if os.path.isdir(os.path.join(work, name, "color", "samples")) else 0
    scores = {}
    for name in runs:
        for cat, sub in (("color", "annotation_blip"), ("non_spatial", "annotation_clip")):
            p = os.path.join(work, name, cat, sub, "score.json")
            if os.path.isfile(p):
                s = json.load(open(p))
                scores[f"{name}/{cat}"] = dict(mean=s["mean"], n_images=s["n_images"], official=s["official"],
                                               device=(s.get("models", {}).get("clip", {}) or {}).get("dtype"))
    ok = all(s["rc"] == 0 for s in steps) and all(v for v in files.values())
    return dict(ok=ok, steps=steps, files=files, scores=scores, report=steps[-1]["stdout"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("e2e", "throughput", "all"), default="all")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--repeats", type=int, default=1, help="timed pipeline calls per configuration")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    os.makedirs(args.out, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    env = _env()
    print(f"bench_eval_throughput: {env}", file=sys.stderr, flush=True)
    result = {}
    if args.part in ("e2e", "all"):
        with tempfile.TemporaryDirectory() as work:
            result["e2e"] = e2e(args, work)
        with open(os.path.join(args.out, "eval_e2e.json"), "w") as f:
            json.dump(dict(env=env, **result["e2e"]), f, indent=1)
    if args.part in ("throughput", "all"):
        result["throughput"] = throughput(args, device, dtype)
        with open(os.path.join(args.out, "eval_throughput.json"), "w") as f:
            json.dump(dict(env=env, **result["throughput"]), f, indent=1)

    print(f"\n{env['device']}, torch {env['torch']} (CUDA {env['cuda']}), diffusers {env['diffusers']}, "
          f"taca CUDA kernels: {env['taca_cuda_kernels']}")
    if "e2e" in result:
        e = result["e2e"]
        print(f"e2e (tiny FLUX + tiny BLIP/CLIP, CLI): {'OK' if e['ok'] else 'FAILED'}; "
              + ", ".join(f"{k} {v['mean']:.4f} ({v['n_images']} img)" for k, v in e["scores"].items()))
    if "throughput" in result:
        t = result["throughput"]
        print(f"FluxPipeline {'tiny' if args.tiny else 'FLUX.1-dev-sized'} random {t['dtype']}, {t['size']}x{t['size']}, "
              f"{t['steps']} steps ({t['note']})")
        print(f"{'batch':>5} {'TACA':>4} {'s/call':>8} {'img/s':>8} {'3000 img (h)':>13} {'8 cat (h)':>10} {'vs off':>7}")
        for r in t["rows"]:
            print(f"{r['batch']:>5} {'on' if r['taca'] else 'off':>4} {min(r['seconds_per_call']):>8.2f} "
                  f"{r['images_per_s']:>8.3f} {r['category_hours']:>13.2f} {r['all_8_categories_hours']:>10.2f} "
                  f"{r.get('ratio_to_off', 1.0):>7.3f}")
    return 0 if result.get("e2e", {}).get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
