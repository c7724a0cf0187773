"""Issue 15's measurements: taca train with DDP and FSDP2 against one process, and taca eval
generate on N processes against one. Driven by ``benchmarks/gpu_multi_run.sh``; two steps:

    python benchmarks/bench_multi_gpu.py make --out W [--tiny]      # W/model (pipeline), W/data
    python benchmarks/bench_multi_gpu.py report --work W --out OUT  # OUT/multi_gpu.json, table

``make`` writes a FluxPipeline whose transformer has FLUX.1-dev's configuration with fixed-seed
random bf16 weights (no download; --tiny: the demo's tiny FLUX), with small random text encoders
and VAE of the shapes FLUX.1-dev's transformer expects (T5 width 4096, CLIP pooled 768, 16 latent
channels, VAE factor 8), and a folder of synthetic captioned images at --resolution.

``report`` reads the runs the shell script made under W/runs:
- train/<layout>/log.jsonl for layout in one (1 process, global batch), ddp, fsdp (N processes,
  global batch / N each): per-step loss against one's (the draws are the same: differences are
  reduction order and bf16 rounding), beside the noise scale (one's step-to-step loss change), median s/step after the first 2 steps, images/s, per-process
  images/s over one process's (the "efficiency"), the median of each step's peak memory (the
  largest over the processes, taca train logs it);
- the adapters: same keys, shapes and dtypes as one process's, the largest difference, and that
  it loads into the transformer through diffusers (``load_lora_adapter``) with no key left over;
- eval/one and eval/n (``taca eval generate``): the same file names, byte-identical images and
  manifests; images/s from the generation times each process printed (model loading excluded:
  W/runs/eval_one.log, eval_n.log), N processes' rate = all images / the slowest process's time.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)



def make_pipeline(tiny: bool, device: str):
    """A FluxPipeline: FLUX.1-dev's transformer (random bf16, seed 0) with small encoders and VAE."""
    if tiny:
        from taca.demo import build_tiny_flux_pipeline

        return build_tiny_flux_pipeline(seed=0)
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    from bench_pipeline import FLUX_DEV
    from taca.tiny import FLUX_DEV_SCHEDULER_CONFIG
    from taca.demo import _clip_config, _clip_tokenizer, _t5_config, _t5_tokenizer

    clip_tok, clip_vocab = _clip_tokenizer()
    t5_tok, t5_vocab = _t5_tokenizer()
    torch.manual_seed(0)
    clip = CLIPTextModel(_clip_config(clip_vocab, hidden_size=FLUX_DEV["pooled_projection_dim"],
                                      intermediate_size=256, projection_dim=64, num_hidden_layers=1))
    t5 = T5EncoderModel(_t5_config(t5_vocab, d_model=FLUX_DEV["joint_attention_dim"], d_kv=64, d_ff=256,
                                   num_layers=1))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 32, 32), layers_per_block=1,
        latent_channels=16, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.1159, scaling_factor=0.3611)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # 12B weights built in bf16 on the device: no float32 copy
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(**FLUX_DEV)
    finally:
        torch.set_default_dtype(old)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER_CONFIG), vae=vae, text_encoder=clip,
                        tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer.cpu())
    return pipe


def make_data(folder: str, n: int, resolution: int) -> None:
    """n synthetic images (two colored rectangles) with captions naming their colors."""
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    colors = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
    names = list(colors)
    for i in range(n):
        a, b = names[i % 4], names[(i // 4 + 1 + i) % 4]
        arr = np.zeros((resolution, resolution, 3), np.uint8) + np.array(colors[b], np.uint8)
        h, w = (int(v) for v in rng.integers(resolution // 4, resolution // 2, 2))
        y, x = (int(v) for v in rng.integers(0, resolution - max(h, w), 2))
        arr[y:y + h, x:x + w] = colors[a]
        Image.fromarray(arr).save(os.path.join(folder, f"{i:04d}.png"))
        with open(os.path.join(folder, f"{i:04d}.txt"), "w") as f:
            f.write(f"a {a} rectangle on a {b} background")


def cmd_make(args) -> None:
    pipe = make_pipeline(args.tiny, "cuda" if torch.cuda.is_available() else "cpu")
    pipe.save_pretrained(os.path.join(args.out, "model"))
    make_data(os.path.join(args.out, "data"), args.n_images, args.resolution)
    n = sum(p.numel() for p in pipe.transformer.parameters())
    print(f"wrote {args.out}/model (transformer {n / 1e9:.3f}B parameters) and {args.n_images} images "
          f"at {args.resolution}x{args.resolution}")


# ---------------------------------------------------------------------------------------------
def _log(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _train_run(work: str, layout: str):
    d = os.path.join(work, "runs", "train", layout)
    if not os.path.isfile(os.path.join(d, "log.jsonl")):
        return None
    log = _log(os.path.join(d, "log.jsonl"))
    with open(os.path.join(d, "train_config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(d, "world.txt")) as f:
        world = int(f.read())
    timed = [r["s_per_step"] for r in log[2:]] or [r["s_per_step"] for r in log]
    s = statistics.median(timed)
    gb = cfg["batch_size"] * world * cfg.get("grad_accum", 1)
    mem = [r["peak_mem_gib"] for r in log if "peak_mem_gib" in r]
    return {"dir": d, "world": world, "batch_per_process": cfg["batch_size"], "global_batch": gb,
            "steps": len(log), "losses": [r["loss"] for r in log], "s_per_step": s, "images_per_s": gb / s,
            "images_per_s_per_process": gb / s / world,
            "peak_mem_gib": statistics.median(mem) if mem else None}


def _adapter_check(work: str, runs, device: str):
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    ref = load_file(os.path.join(runs["one"]["dir"], "pytorch_lora_weights.safetensors"))
    out = {}
    transformer = None
    for name, r in runs.items():
        path = os.path.join(r["dir"], "pytorch_lora_weights.safetensors")
        sd = load_file(path)
        same = sd.keys() == ref.keys() and all(sd[k].shape == ref[k].shape and sd[k].dtype == ref[k].dtype for k in sd)
        diff = max(float((sd[k].float() - ref[k].float()).abs().max()) for k in sd) if same else None
        scale = max(float(ref[k].float().abs().max()) for k in ref)
        if transformer is None:
            transformer = FluxTransformer2DModel.from_pretrained(os.path.join(work, "model", "transformer"),
                                                                 torch_dtype=torch.bfloat16).to(device)
        else:
            transformer.delete_adapters("check")
        transformer.load_lora_adapter(path, prefix="transformer", adapter_name="check")
        loaded = {n for n, _ in transformer.named_parameters() if ".check." in n}
        out[name] = {"keys": len(sd), "format_equal_to_one_process": same, "max_abs_diff_vs_one": diff,
                     "largest_entry_one": scale, "lora_tensors_loaded": len(loaded),
                     "loads": len(loaded) == len(sd)}
    return out


def _eval_check(work: str):
    a, b = (os.path.join(work, "runs", "eval", k) for k in ("one", "n"))
    if not (os.path.isdir(a) and os.path.isdir(b)):
        return None

    def files(root):
        found = {}
        for d, _, names in os.walk(root):
            for n in names:
                if n.endswith(".png") or n == "manifest.jsonl":
                    p = os.path.join(d, n)
                    with open(p, "rb") as f:
                        found[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
        return found

    def times(log):
        with open(os.path.join(work, "runs", log)) as f:
            return [(int(n), float(t)) for n, t in re.findall(r"\] generated (\d+) in ([0-9.]+) s", f.read())]

    fa, fb = files(a), files(b)
    one, n = times("eval_one.log"), times("eval_n.log")
    n_img = sum(1 for k in fa if k.endswith(".png"))
    return {"images": n_img, "same_names": sorted(fa) == sorted(fb), "identical_files": fa == fb,
            "differing": sorted(k for k in fa if fb.get(k) != fa[k])[:10], "processes": len(n),
            "per_process_one": one, "per_process_n": n,
            "images_per_s_one": sum(c for c, _ in one) / max(t for _, t in one),
            "images_per_s_n": sum(c for c, _ in n) / max(t for _, t in n)}


def cmd_report(args) -> None:
    runs = {k: r for k in ("one", "ddp", "fsdp") if (r := _train_run(args.work, k)) is not None}
    if "one" not in runs:
        raise SystemExit(f"{args.work}/runs/train/one/log.jsonl is missing: the one-process run is the reference")
    one = runs["one"]
    # the scale "within noise" is read against: how much the one-process loss moves from step to step
    # (each step draws other samples, timesteps and noise)
    steps = one["losses"]
    one["loss_step_to_step_rel_std"] = (statistics.pstdev([b - a for a, b in zip(steps, steps[1:])]) /
                                        statistics.mean(steps)) if len(steps) > 2 else None
    for name, r in runs.items():
        n = min(len(r["losses"]), len(one["losses"]))
        d = [abs(x - y) / abs(y) for x, y in zip(r["losses"][:n], one["losses"][:n])]
        r["loss_max_rel_diff_vs_one"] = max(d) if d else None
        r["efficiency_vs_one"] = r["images_per_s_per_process"] / one["images_per_s"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    adapters = _adapter_check(args.work, runs, device)
    ev = _eval_check(args.work)
    res = {"gpu": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
           "gpus": torch.cuda.device_count() if device == "cuda" else 0, "torch": torch.__version__,
           "train": runs, "adapters": adapters, "eval": ev}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "multi_gpu.json"), "w") as f:
        json.dump(res, f, indent=1)
    print("| run | processes | batch / process | s/step | images/s | per process vs one | peak GiB | "
          "max rel loss diff vs one | adapter max |diff| | loads |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        a = adapters[name]
        mem = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "-"
        print(f"| {name} | {r['world']} | {r['batch_per_process']} | {r['s_per_step']:.3f} | {r['images_per_s']:.2f} | "
              f"{r['efficiency_vs_one']:.3f} | {mem} | {r['loss_max_rel_diff_vs_one']:.2e} | "
              f"{a['max_abs_diff_vs_one']:.2e} (largest entry {a['largest_entry_one']:.2e}) | {a['loads']} |")
    if one["loss_step_to_step_rel_std"] is not None:
        print(f"noise scale: the one-process loss moves {one['loss_step_to_step_rel_std']:.2e} (relative std of "
              f"step-to-step changes)")
    if ev:
        print(f"eval generate: {ev['images']} images, {ev['processes']} processes: "
              f"identical files {ev['identical_files']} (names equal {ev['same_names']}); images/s one process {ev['images_per_s_one']:.3f}, "
              f"{ev['processes']} processes {ev['images_per_s_n']:.3f} "
              f"(per process {ev['images_per_s_n'] / ev['images_per_s_one'] / max(ev['processes'], 1):.3f} of one)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--out", required=True)
    m.add_argument("--tiny", action="store_true")
    m.add_argument("--n-images", type=int, default=64)
    m.add_argument("--resolution", type=int, default=1024)
    r = sub.add_parser("report")
    r.add_argument("--work", required=True)
    r.add_argument("--out", required=True)
    args = p.parse_args(argv)
    {"make": cmd_make, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
