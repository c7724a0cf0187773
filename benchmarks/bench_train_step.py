"""One LoRA training step with TACA against stock attention, in one process.

Question: does training with TACA cost more than training without it? Target (issue 10): s/step
ratio TACA / stock <= 1.00 on FLUX.1-dev-sized and SD3.5-Medium-sized transformers, with the same
peak memory within 2%. ``--models flux2,qwenimage`` adds FLUX.2-dev- and Qwen-Image-sized ones (configs
of bench_models_step.py; their taca train families' predict and "attn" targets: both streams); ``kontext`` a
FLUX.1-Kontext-dev edit step (FLUX.1-dev's transformer, one 1024x1024 reference: 8192 image tokens).

Models have the real configurations and random bf16 weights (no download). The step is taca
train's own: ``taca.train.loop.flow_matching_loss`` through the family's ``predict`` (FLUX: packed
latents, guidance 3.5, timestep = sigma; SD3: timestep = 1000 sigma), sigma uniform in [0.97, 1],
LoRA rank 16 (alpha 16) on the joint-attention projections (PEFT), gradient checkpointing, bf16
weights with float32 LoRA parameters under bf16 autocast (as accelerate's bf16 mixed precision),
AdamW, 1024x1024 (4096 image tokens; FLUX 512 text tokens, SD3.5 333).

Methods, interleaved over --rounds (each round times --steps steps of every method after one
warm-up step, starting one method later than the round before):
- stock: diffusers' stock processors; PyTorch SDPA with cuDNN disabled (its backward crashed in a
  FLUX-sized step on this machine), so flash attention runs, as in ``taca train --no-taca``;
- taca: ``taca.enable`` with taca's CUDA kernels (the default of ``taca train``);
- taca-sdpa: ``taca.enable(backend="sdpa")``, the exact two-call split form, for reference;
- taca-off: taca.enable with gamma 1 (its pre-hook and processors run, each attention call takes the
  stock path): what TACA's Python around the attention costs, apart from the attention call;
- taca-v5: taca with TACA_BWD_SM90_KERNEL=v5 (the Hopper backward before v6 became the default at
  D = 72..128), to measure that change end to end.

    python benchmarks/bench_train_step.py --out benchmarks/results            # GPU, real sizes
    python benchmarks/bench_train_step.py --tiny --out /tmp/bench              # CPU smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from types import SimpleNamespace

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import taca  # noqa: E402
from bench_models_step import FLUX2_DEV, QWEN_IMAGE, TINY_FLUX2, TINY_QWEN  # noqa: E402
from bench_pipeline import FLUX_DEV, TINY_FLUX  # noqa: E402
from taca.schedule import PaperSchedule  # noqa: E402
from taca.train import TrainConfig  # noqa: E402
from taca.train.families import FluxFamily, SD3Family  # noqa: E402
from taca.train.loop import flow_matching_loss  # noqa: E402

SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384, qk_norm="rms_norm",
                   dual_attention_layers=tuple(range(13)))
TINY_SD35M = dict(SD35_MEDIUM, sample_size=32, num_layers=3, attention_head_dim=8, num_attention_heads=4,
                  joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=96,
                  dual_attention_layers=(0, 1))
ATTN_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]


MODELS = ("flux", "sd35m", "flux2", "qwenimage", "kontext")


def build(kind, tiny, device, dtype):
    import diffusers

    if kind in ("flux2", "qwenimage"):  # bench_models_step.py's configs: the classes' defaults are the checkpoints'
        cls, cfg = {"flux2": (diffusers.Flux2Transformer2DModel, TINY_FLUX2 if tiny else FLUX2_DEV),
                    "qwenimage": (diffusers.QwenImageTransformer2DModel, TINY_QWEN if tiny else QWEN_IMAGE)}[kind]
    else:
        flux = kind in ("flux", "kontext")  # FLUX.1-Kontext-dev has FLUX.1-dev's transformer config
        cls = diffusers.FluxTransformer2DModel if flux else diffusers.SD3Transformer2DModel
        cfg = (TINY_FLUX if flux else TINY_SD35M) if tiny else (FLUX_DEV if flux else SD35_MEDIUM)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 on the device: no float32 copy of 12B weights
    try:
        with torch.device(device):
            model = cls(**cfg)
    finally:
        torch.set_default_dtype(old)
    return model


def family(kind, model):
    """taca train's family for ``kind``, on a stand-in pipeline (the families read the transformer's config, the
    pipeline's class name and the scheduler's shift; no encoder runs here)."""
    if kind == "flux":
        return FluxFamily(None)
    if kind == "kontext":  # an edit: the reference's tokens follow the target's
        return FluxFamily(type("FluxKontextPipeline", (SimpleNamespace,), {})(scheduler=None))
    if kind == "sd35m":
        return SD3Family(SimpleNamespace(scheduler=SimpleNamespace(config={"shift": 3.0})))
    from taca.train.families.flux2 import Flux2Family
    from taca.train.families.qwenimage import QwenImageFamily

    import diffusers

    pipe_cls = diffusers.Flux2Pipeline if kind == "flux2" else diffusers.QwenImagePipeline
    stand_in = type(pipe_cls.__name__, (SimpleNamespace,), {})  # the name the families check, nothing loaded
    pipe = stand_in(transformer=model, scheduler=None)
    return (Flux2Family if kind == "flux2" else QwenImageFamily)(pipe)


def batch_inputs(kind, model, batch, tiny, device, dtype):
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    if kind in ("flux2", "qwenimage"):
        # the latents the families' predict takes at 1024x1024: FLUX.2 2x2-patchified (B, 128, 64, 64); Qwen-Image
        # one frame (B, 16, 1, 128, 128), packed 2x2 by predict; 512 / 256 text tokens (bench_models_step.py's)
        side = 4 if tiny else 64
        if kind == "flux2":
            shape, L = (batch, cfg.in_channels, side, side), (8 if tiny else 512)
        else:
            shape, L = (batch, cfg.in_channels // 4, 1, 2 * side, 2 * side), (8 if tiny else 256)
        x0 = torch.randn(*shape, generator=g).to(device, dtype)
        cond = {"prompt_embeds": torch.randn(batch, L, cfg.joint_attention_dim, generator=g).to(device, dtype)}
        if kind == "qwenimage":
            cond["prompt_embeds_mask"] = torch.ones(batch, L, dtype=torch.long, device=device)  # unpadded
        return x0, cond, L
    side = 8 if tiny else 128  # latent side at 1024x1024 (VAE factor 8)
    flux = kind in ("flux", "kontext")
    ch = cfg.in_channels // 4 if flux else cfg.in_channels  # FLUX packs 2x2 latent pixels
    L = (12 if tiny else 512) if flux else (11 if tiny else 333)
    x0 = torch.randn(batch, ch, side, side, generator=g).to(device, dtype)
    cond = {"prompt_embeds": torch.randn(batch, L, cfg.joint_attention_dim, generator=g).to(device, dtype),
            "pooled_prompt_embeds": torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(device, dtype)}
    if kind == "kontext":  # one reference image at 1024x1024: 4096 more image tokens
        cond["reference_latents"] = torch.randn(batch, 1, ch, side, side, generator=g).to(device, dtype)
    return x0, cond, L


def _enable(model, m):
    if m == "taca-off":  # the hook and processors installed, gamma 1 in every call: the stock attention call
        taca.enable(model, gamma=1.0, schedule="constant")
    else:
        taca.enable(model, gamma=1.2, schedule=PaperSchedule(1.2, 0.97), backend="sdpa" if m == "taca-sdpa" else "auto")


def profile_methods(names, model, step, kind, batch, cuda, out):
    """One warm step per method under torch.profiler; prints (and writes) the top 20 rows by self device time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    for m in names:
        if m != "stock":
            _enable(model, m)
        if m == "taca-v5":
            os.environ["TACA_BWD_SM90_KERNEL"] = "v5"
        try:
            step()
            if cuda:
                torch.cuda.synchronize()
            with profile(activities=acts) as prof:
                float(step().detach())
            table = prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=70)
        finally:
            taca.disable(model)
            os.environ.pop("TACA_BWD_SM90_KERNEL", None)
        text = f"## profile {kind} batch {batch} {m}\n{table}"
        print(text, flush=True)
        if out:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, f"profile_{kind}_b{batch}_{m}.txt"), "w") as f:
                f.write(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="flux,sd35m", help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--methods", default="stock,taca,taca-sdpa")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per method per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke test)")
    ap.add_argument("--out", default=None, help="folder for the JSON and markdown results")
    ap.add_argument("--profile", action="store_true",
                    help="after the timing, one more step per method under torch.profiler: its top kernels by "
                         "device time (CPU ops on a CPU run) printed and written under --out")
    args = ap.parse_args(argv)

    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        torch.backends.cuda.enable_cudnn_sdp(False)
    gpu = torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu"
    env = dict(gpu=gpu, torch=torch.__version__, cuda=torch.version.cuda,
               diffusers=__import__("diffusers").__version__, peft=__import__("peft").__version__,
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    print(f"# {env}", flush=True)
    cfg = TrainConfig(model="-", data="-", out="-", mixed_precision="bf16" if cuda else "no")
    rows = []
    kinds = args.models.split(",")
    unknown = [k for k in kinds if k not in MODELS]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; expected some of {', '.join(MODELS)}")
    for kind in kinds:
        model = build(kind, args.tiny, device, dtype)
        model.requires_grad_(False)
        if not args.no_checkpointing:
            model.enable_gradient_checkpointing()
        fam = family(kind, model)
        model.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                     target_modules=ATTN_TARGETS if kind in ("flux", "sd35m", "kontext") else fam.target_modules("attn")))
        cast_training_params(model, dtype=torch.float32)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        n_lora = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=1e-5)
        for batch in [int(b) for b in args.batches.split(",")]:
            x0, cond, L = batch_inputs(kind, model, batch, args.tiny, device, dtype)
            gen = torch.Generator().manual_seed(7)

            def step():
                sigma = (0.97 + 0.03 * torch.rand(batch, generator=gen)).to(device)
                noise = torch.randn(x0.shape, generator=gen).to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                    loss = flow_matching_loss(fam, model, x0, cond, sigma, noise, cfg, dtype).mean()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss

            times = {m: [] for m in args.methods.split(",")}
            cpu = {m: [] for m in times}  # the launching thread's CPU time: ~ wall time when launch-bound
            peak = {m: 0 for m in times}
            names = list(times)
            for r in range(args.rounds):
                # each round starts one method later: no method keeps the first place (the SD3.5-M batch-1 ratio
                # followed the order, 1.03-1.04x with stock first, 1.00x with taca first: KERNEL_LOG, 33rd session)
                for m in names[r % len(names):] + names[:r % len(names)]:
                    if m != "stock":
                        _enable(model, m)
                    if m == "taca-v5":  # the previous Hopper backward kernel (read at every call)
                        os.environ["TACA_BWD_SM90_KERNEL"] = "v5"
                    try:
                        step()  # warm-up (and the first-call allocations)
                        if cuda:
                            torch.cuda.synchronize()
                            torch.cuda.reset_peak_memory_stats()
                        for _ in range(args.steps):
                            t0, c0 = time.perf_counter(), time.thread_time()
                            loss = step()
                            float(loss.detach())  # one sync per step, as taca train's logging does
                            times[m].append(time.perf_counter() - t0)
                            cpu[m].append(time.thread_time() - c0)
                        if cuda:
                            peak[m] = max(peak[m], torch.cuda.max_memory_allocated())
                    finally:
                        taca.disable(model)
                        os.environ.pop("TACA_BWD_SM90_KERNEL", None)
            if args.profile:
                profile_methods(names, model, step, kind, batch, cuda, args.out)
            base = statistics.median(times["stock"]) if "stock" in times else None
            for m, ts in times.items():
                med = statistics.median(ts)
                row = dict(model=kind, batch=batch, method=m, s_per_step=med, s_min=min(ts), n=len(ts),
                           cpu_s_per_step=statistics.median(cpu[m]),
                           peak_gib=peak[m] / 2**30, lora_params=n_lora, text_tokens=L,
                           ratio_to_stock=(med / base) if base else None,
                           min_ratio_to_stock=(min(ts) / min(times["stock"])) if base else None,
                           s_steps=[round(t, 5) for t in ts],  # every timed step, rounds in order (--steps each)
                           peak_ratio_to_stock=(peak[m] / peak["stock"]) if base and peak["stock"] else None)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "s_steps"}), flush=True)
        del model, opt, params
        if cuda:
            torch.cuda.empty_cache()

    lines = [f"LoRA training step, {gpu}, torch {env['torch']} (CUDA {env['cuda']}), diffusers {env['diffusers']}, "
             f"{env['date']}", "",
             "| model | batch | method | s/step (median) | min | ratio to stock | min ratio | CPU s/step | peak GiB | peak ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ratio_to_stock']:.3f}" if r["ratio_to_stock"] else "-"
        pr = f"{r['peak_ratio_to_stock']:.3f}" if r["peak_ratio_to_stock"] else "-"
        mr = f"{r['min_ratio_to_stock']:.3f}" if r["min_ratio_to_stock"] else "-"
        lines.append(f"| {r['model']} | {r['batch']} | {r['method']} | {r['s_per_step']:.4f} | {r['s_min']:.4f} | {ratio} | "
                     f"{mr} | "
                     f"{r['cpu_s_per_step']:.4f} | "
                     f"{r['peak_gib']:.2f} | {pr} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        tag = gpu.replace(" ", "_") + "_" + time.strftime("%Y%m%d_%H%M", time.gmtime())
        with open(os.path.join(args.out, f"train_step_{tag}.json"), "w") as f:
            json.dump(dict(env=env, args=vars(args), rows=rows), f, indent=1)
        with open(os.path.join(args.out, f"train_step_{tag}.md"), "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
