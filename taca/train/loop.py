"""The training loop of ``taca train`` (accelerate: one process, DDP or FSDP2 under ``accelerate launch``).

Per optimizer step, each of ``grad_accum`` micro-batches: cached latents x0 and text embeddings
of ``batch_size`` samples per process; per sample a timestep u drawn from the chosen law
restricted to the window, sigma = shift(1 - u) >= t_min / 1000, noise eps; x_t = (1 - sigma) x0
+ sigma eps; the transformer (TACA on through ``taca.enable``: the pre-hook gives each sample its
gamma from its sigma, the processors apply it) predicts eps - x0; loss = mean (w (pred - target)^2)
as diffusers' FLUX / SD3 LoRA scripts compute it.

Every random draw of a sample (u and eps) comes from a generator seeded by (seed, global
micro-batch, position in the global batch), so a resumed run and a run on a different number of
processes with the same global batch see exactly the same timesteps and noise.

Under FSDP2 (accelerate's plugin, ``fsdp_version: 2``) the frozen weights and the LoRA are sharded
over the processes; checkpoints and the saved adapter hold the gathered (full) tensors, in the
same files as a one-process or DDP run, so a run may resume under another layout.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from . import checkpoint as ckpt
from .config import RESUMABLE_CHANGES, ConfigError, TrainConfig, parse_targets
from .data import (Cache, Sampler, _mix, component_fingerprint, discover, file_sha256, load_image, load_pil,
                   n_references, text_sha256)

ADAPTER = "default"
ADAPTER_FILE = "pytorch_lora_weights.safetensors"
# what taca train writes in --out (--overwrite removes these and nothing else)
OUTPUTS = (ADAPTER_FILE, "train_config.json", "log.jsonl", "loss.png", "checkpoints", "logs")


class ModelNotFound(RuntimeError):
    """The model cannot be loaded here; the message says how to get it (exit code 2)."""


@dataclass
class TrainResult:
    out: str
    adapter: str
    steps: int
    losses: List[float] = field(default_factory=list)  # per optimizer step, this run only
    sigmas: List[float] = field(default_factory=list)  # every sigma this process trained on
    gammas: List[Optional[float]] = field(default_factory=list)  # per sample: the gamma its forward used


# ---------------------------------------------------------------------------------------------
def sample_sigmas(u_gen: List[torch.Generator], cfg: TrainConfig, shift: float) -> torch.Tensor:
    """One sigma per generator (float64 on the CPU), from the chosen law restricted to
    sigma >= t_min / 1000.

    As diffusers' scripts: u ~ law on [0, 1] (``uniform`` or ``logit-normal`` = sigmoid(N(m, s))),
    unshifted sigma 1 - u, then the scheduler's static shift (SD3: 3.0; FLUX: none). The window
    restricts u to [0, u_max] with shift(1 - u_max) = t_min / 1000, sampled exactly by inverting
    the law's CDF (no rejection loop), continuously rather than on the 1000-step grid (which
    would leave only 31 values in [970, 1000])."""
    s_lo = cfg.sigma_min
    # unshift: shift(s) = k s / (1 + (k - 1) s)  =>  s = x / (k - (k - 1) x)
    s_lo_unshifted = s_lo / (shift - (shift - 1.0) * s_lo) if s_lo > 0 else 0.0
    u_max = 1.0 - s_lo_unshifted
    p = torch.tensor([float(torch.rand((), generator=g, dtype=torch.float64)) for g in u_gen], dtype=torch.float64)
    if cfg.timestep_sampling == "uniform":
        u = p * u_max
    else:
        normal = torch.distributions.Normal(torch.tensor(cfg.logit_mean, dtype=torch.float64),
                                            torch.tensor(cfg.logit_std, dtype=torch.float64))
        if u_max >= 1.0:
            cdf_hi = torch.tensor(1.0, dtype=torch.float64)
        elif u_max <= 0.0:
            cdf_hi = torch.tensor(0.0, dtype=torch.float64)
        else:
            cdf_hi = normal.cdf(torch.logit(torch.tensor(u_max, dtype=torch.float64)))
        u = torch.sigmoid(normal.icdf((p * cdf_hi).clamp(1e-300, 1.0 - 1e-16)))
        u = torch.minimum(u, torch.tensor(u_max, dtype=torch.float64))
    s = 1.0 - u
    sigma = shift * s / (1.0 + (shift - 1.0) * s)
    return sigma.clamp(min=s_lo, max=1.0)


def _loss_weights(cfg: TrainConfig, sigma: torch.Tensor) -> torch.Tensor:
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(cfg.loss_weighting, sigma)


def flow_matching_loss(family, model, x0: torch.Tensor, cond: Dict[str, torch.Tensor], sigma: torch.Tensor,
                       noise: torch.Tensor, cfg: TrainConfig, weight_dtype: torch.dtype) -> torch.Tensor:
    """Per-sample loss (B,) float32 of diffusers' flow-matching LoRA scripts.

    x0, noise: (B, C, h, w) latents and noise; sigma: (B,) float32 on the device. x_t = (1 - sigma)
    x0 + sigma noise (in float32, handed to the model in ``weight_dtype``); target noise - x0, or
    with ``cfg.precondition_outputs`` (SD3's option) pred = x_t - sigma out against x0; weights from
    diffusers' ``compute_loss_weighting_for_sd3``."""
    sb = sigma.view(-1, *([1] * (x0.dim() - 1)))
    x0f = x0.float()
    noisy = (1.0 - sb) * x0f + sb * noise
    pred = family.predict(model, noisy.to(weight_dtype), sigma, cond, cfg.guidance).float()
    if cfg.precondition_outputs:
        pred = pred * (-sb) + noisy
        target = x0f
    else:
        target = noise - x0f
    w = _loss_weights(cfg, sb).float()
    return (w * (pred - target) ** 2).reshape(x0.shape[0], -1).mean(1)


def _weight_dtype(cfg: TrainConfig) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision, torch.float32)


def _load_pipeline(cfg: TrainConfig, dtype: torch.dtype):
    from ..cli import _load_pipeline as load

    pipe, msg = load(cfg.model, dtype, command="taca train", argument="--model")
    if pipe is None:
        raise ModelNotFound(msg)
    return pipe


def _transformer_skeleton(model: str):
    """The transformer built from its config on the meta device (no weights read), or None when
    the config is not available locally (hub ids not yet downloaded: checked when loading)."""
    import diffusers
    from accelerate import init_empty_weights

    path = os.path.join(os.path.expanduser(model), "transformer", "config.json")
    if not os.path.isfile(path):
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(model, "config.json", subfolder="transformer")
        except Exception:
            return None
    with open(path) as f:
        config = json.load(f)
    cls = getattr(diffusers, config.get("_class_name", ""), None)
    if cls is None:
        return None
    with init_empty_weights():
        return cls.from_config(config)


def check_model(cfg: TrainConfig, n_refs: int = 0) -> None:
    """Raise ConfigError before any weights are loaded when ``--model`` is known (a known hub id or
    a local folder's model_index.json) to be a family taca train does not train, to take fewer
    text tokens than ``--max-sequence-length``, or fewer reference images than the data's
    ``n_refs`` per sample."""
    from .. import models
    from ..cli import MAX_SEQUENCE_LENGTH, _peek_family, _peek_pipeline_class
    from .families import check_references, family_class, supported

    family = _peek_family(cfg.model)
    if family is None:
        return
    adapter = models.by_name("flux" if family == "flux-schnell" else family)
    if adapter is None:
        return
    label = adapter.short_label()
    if adapter.name not in supported():
        trained = [models.by_name(n) for n in supported()]
        names = [a.short_label() for a in trained if a is not None]
        raise ConfigError(f"taca train: argument --model: {cfg.model} is a {label} model, which taca train does "
                          f"not train (taca.enable runs it); taca train trains {'; '.join(names)}")
    pipeline_class = _peek_pipeline_class(cfg.model)
    if pipeline_class is not None:
        family_class(adapter.name).check_config(cfg, pipeline_class)  # a pipeline refused outright says so first
        check_references(family_class(adapter.name), pipeline_class, n_refs)
    n = cfg.max_sequence_length
    if n is None:
        return
    _check_takes_max_sequence_length(cfg, adapter)
    limit = MAX_SEQUENCE_LENGTH.get(family, adapter.max_sequence_length)
    if n > limit:
        raise ConfigError(f"taca train: argument --max-sequence-length: {label} pipelines take at most {limit} "
                          f"text tokens, got {n}")


def _check_takes_max_sequence_length(cfg: TrainConfig, adapter) -> None:
    if cfg.max_sequence_length is not None and adapter is not None and not adapter.takes_max_sequence_length:
        raise ConfigError(f"taca train: argument --max-sequence-length: {adapter.short_label()} pipelines set the "
                          f"prompt length themselves and take no max_sequence_length; leave it out")


def check_targets(model: str, spec) -> None:
    """Raise ConfigError when a module name of ``--lora-targets`` (a list) matches no Linear of
    the transformer; checked on the config-built skeleton before any weights are loaded."""
    if isinstance(spec, str):
        return
    skel = _transformer_skeleton(model)
    if skel is None:
        return
    names = [n for n, m in skel.named_modules() if isinstance(m, torch.nn.Linear)]
    unknown = [t for t in spec if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        sample = sorted({n.split(".", 2)[-1] for n in names if n.count(".") >= 2})[:12]
        raise ConfigError(f"taca train: argument --lora-targets: {unknown} match no linear layer of "
                          f"{type(skel).__name__}; names look like {sample}")


# ---------------------------------------------------------------------------------------------
def _prepare_out(cfg: TrainConfig, is_main: bool) -> None:
    if not is_main:
        return
    if cfg.overwrite and os.path.isdir(cfg.out):
        for name in OUTPUTS:
            p = os.path.join(cfg.out, name)
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.remove(p)
    os.makedirs(cfg.out, exist_ok=True)


def reference_resolution(cfg: TrainConfig, family) -> int:
    """The square side the references of edits are loaded at: ``--reference-resolution``, else what the
    pipeline feeds at inference (``family.reference_resolution``)."""
    return cfg.reference_resolution if cfg.reference_resolution is not None else family.reference_resolution(cfg.resolution)


def _build_cache(cfg, family, samples, accelerator, device, weight_dtype, bar) -> Cache:
    text_fp = component_fingerprint(cfg.model, family.text_modules())
    image_fp = component_fingerprint(cfg.model, family.image_modules())
    ref_res = reference_resolution(cfg, family)
    # a caption whose embedding sees the references (Qwen-Image-Edit's vision-language encoder) is
    # keyed by the references' content and size too
    text_refs = family.text_references() and any(s.references for s in samples)

    def image_key(res):
        return _short(f"{family.name}:{image_fp}:{res}:{cfg.center_crop}:{weight_dtype}")

    cache = Cache(
        cfg.resolved_cache_dir(),
        image_key=image_key(cfg.resolution),
        text_key=_short(f"{family.name}:{text_fp}:{cfg.max_sequence_length}:{weight_dtype}"
                        + (f":{family.pipeline_class}:{ref_res}:{cfg.center_crop}" if text_refs else "")),
    )
    ref_key = image_key(ref_res)
    rank, world = accelerator.process_index, accelerator.num_processes
    img_sha = [file_sha256(s.image) for s in samples]
    ref_sha = [tuple(file_sha256(r) for r in s.references) for s in samples]
    cap_sha = [text_sha256(s.caption + "".join(f"\0{h}" for h in hs)) if text_refs else text_sha256(s.caption)
               for s, hs in zip(samples, ref_sha)]
    # references are cached as latents like the targets (at the same size, an image that is both is one entry)
    images = {(cache.image_key, cfg.resolution, h, s.image) for h, s in zip(img_sha, samples)}
    images |= {(ref_key, ref_res, h, r) for hs, s in zip(ref_sha, samples) for h, r in zip(hs, s.references)}
    todo_img = sorted({(k, res, h) + (p,) for k, res, h, p in images if not os.path.isfile(cache.latent_path(h, k))})
    todo_img = [t for i, t in enumerate(todo_img) if i == 0 or t[:3] != todo_img[i - 1][:3]]  # one path per entry
    todo_txt = sorted({(h, s.caption, s.references if text_refs else ()) for h, s in zip(cap_sha, samples)
                       if not os.path.isfile(cache.text_path(h))})
    # every rank must list the same missing files before any rank writes one: otherwise a slow
    # rank lists fewer, the rank::world shares no longer cover the list, and entries go missing
    accelerator.wait_for_everyone()
    mine_img, mine_txt = todo_img[rank::world], todo_txt[rank::world]
    chunk = max(1, cfg.batch_size)  # encoder batch: the training batch fits in memory, so this does
    if mine_txt:
        mods = family.text_modules()
        for m in mods:
            m.to(device)
        for i in bar(range(0, len(mine_txt), chunk), desc="caching text embeddings", unit="batch"):
            part = mine_txt[i:i + chunk]
            kw = {"references": [[load_pil(p, ref_res, cfg.center_crop) for p in refs] for _, _, refs in part]} \
                if text_refs else {}
            enc = family.split_text(family.encode_text([c for _, c, _ in part], device, cfg.max_sequence_length, **kw))
            for (h, _, _), e in zip(part, enc):
                # embeddings in the weights' dtype; masks, lengths and ids as they are
                cache.write(cache.text_path(h), {k: v.to(weight_dtype) if v.is_floating_point() else v
                                                 for k, v in e.items()})
            if i == 0:  # every rank writes to this disk: the whole list's remainder must fit
                size = max(os.path.getsize(cache.text_path(h)) for h, _, _ in part)
                cache.check_space(size, len(todo_txt) - len(part), "text embeddings",
                                  " or a shorter --max-sequence-length (entries are padded to it)"
                                  if _takes_max_sequence_length(family) else "")
    if mine_img:
        for m in family.image_modules():
            m.to(device)
        # batches of one size (targets at --resolution, references at theirs)
        groups = [[t for t in mine_img if t[1] == res] for res in sorted({t[1] for t in mine_img})]
        chunks = [g[i:i + chunk] for g in groups for i in range(0, len(g), chunk)]
        for i, part in enumerate(bar(chunks, desc="caching latents", unit="batch")):
            px = torch.stack([load_image(p, res, cfg.center_crop) for _, res, _, p in part])
            lat = family.encode_images(px)
            for j, (k, _, h, _) in enumerate(part):
                cache.write(cache.latent_path(h, k), {"latents": lat[j].to(weight_dtype)})
            if i == 0:
                size = max(os.path.getsize(cache.latent_path(h, k)) for k, _, h, _ in part)
                cache.check_space(size, len(todo_img) - len(part), "latents", " or a lower --resolution")
    accelerator.wait_for_everyone()
    cache.entries = [(cache.latent_path(a), cache.text_path(b)) for a, b in zip(img_sha, cap_sha)]
    cache.references = [tuple(cache.latent_path(h, ref_key) for h in hs) for hs in ref_sha]
    return cache


def _how_to_load(family) -> str:
    """How a user loads the saved adapter into the family's pipeline (some have no LoRA loader)."""
    import diffusers

    from ..pipeline import loads_transformer_lora

    if family.load_hint is not None:
        return family.load_hint
    cls = getattr(diffusers, family.pipeline_class, None)
    if cls is None or loads_transformer_lora(cls):
        return "pipe.load_lora_weights(...) or taca.enable(pipe, lora=...)"
    return (f"taca.enable(pipe, lora=...) or pipe.transformer.load_lora_adapter(..., prefix='transformer'): "
            f"{family.pipeline_class} has no load_lora_weights")


def _takes_max_sequence_length(family) -> bool:
    """Whether --max-sequence-length means something to the family's pipeline (its adapter says)."""
    from ..models import adapter_class

    t = getattr(getattr(family, "pipe", None), "transformer", None)
    adapter = adapter_class(t) if isinstance(t, torch.nn.Module) else None
    return adapter is None or adapter.takes_max_sequence_length


def _short(s: str) -> str:
    import hashlib

    return hashlib.sha256(s.encode()).hexdigest()[:12]


def _check_resume_config(saved: Dict[str, Any], cfg: TrainConfig, world: int, saved_world: int) -> None:
    now = cfg.to_dict()
    diff = [k for k in now if k not in RESUMABLE_CHANGES and k != "batch_size" and saved.get(k) != now[k]]
    if saved.get("batch_size", cfg.batch_size) * saved_world != cfg.batch_size * world:
        diff.append(f"global batch ({saved.get('batch_size')} x {saved_world} processes then, "
                    f"{cfg.batch_size} x {world} now)")
    if diff:
        raise ConfigError(f"taca train: argument --resume: the checkpoint was trained with other settings: {diff}; "
                          f"resume with the same arguments (only {sorted(RESUMABLE_CHANGES)} may change)")


def _plot_losses(log_path: str, png: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    steps, losses = [], []
    with open(log_path) as f:
        for line in f:
            rec = json.loads(line)
            steps.append(rec["step"])
            losses.append(rec["loss"])
    if not steps:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    k = max(1, len(losses) // 20)
    if k > 1:
        sm = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
        ax.plot(steps, sm, lw=1.5, label=f"moving mean ({k} steps)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("flow-matching loss")
    ax.set_title("taca train")
    ax.legend()
    fig.tight_layout()
    tmp = png + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png)


def _truncate_log(path: str, step: int) -> None:
    if not os.path.isfile(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(keep)


def _check_distributed(accelerator, dist: str) -> None:
    """Refuse the accelerate layouts taca train does not run (before any model is loaded)."""
    if dist in ("DEEPSPEED", "MEGATRON_LM"):
        raise ConfigError(f"taca train: accelerate is configured for {dist}, which taca train does not support; "
                          f"use DDP (accelerate launch --multi_gpu) or FSDP2 (--use_fsdp --fsdp_version 2)")
    if dist != "FSDP":
        return
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise ConfigError("taca train: accelerate is configured for FSDP version 1; taca train shards with FSDP2 "
                          "(fsdp_version: 2 in the accelerate config, or accelerate launch --fsdp_version 2)")
    if plugin.activation_checkpointing:
        # accelerate's checkpoint wrapper renames every parameter inside the wrapped blocks, so the
        # adapter's tensors would no longer carry PEFT's names
        raise ConfigError("taca train: accelerate's fsdp_activation_checkpointing is not supported; "
                          "use taca train --gradient-checkpointing (diffusers' own) instead")
    if type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy":
        # the shards would live on the CPU, where the checkpoints' gathers (NCCL) cannot reach them;
        # not built, and torch refuses the policy on machines without an accelerator, so not testable here
        raise ConfigError("taca train: accelerate's fsdp_offload_params is not supported; FSDP2 without offload "
                          "already splits the frozen weights over the GPUs (FLUX.1-dev's 24 GB of bf16 weights: "
                          "12 GB each on 2)")


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a collective: every process calls it), else t."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(t, DTensor):
            return t.full_tensor()
    return t


def _like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``full`` on ref's device and dtype, sharded as ref when ref is an FSDP2 shard."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor, distribute_tensor

        if isinstance(ref, DTensor):
            local = ref.to_local()
            return distribute_tensor(full.to(device=local.device, dtype=local.dtype), ref.device_mesh, ref.placements)
    return full.to(device=ref.device, dtype=ref.dtype)


def _full_optimizer_state(optimizer) -> Dict[str, Any]:
    """The optimizer's state dict with FSDP2-sharded moments gathered (every process calls it)."""
    sd = optimizer.state_dict()
    return {"state": {i: {k: _full(v) if isinstance(v, torch.Tensor) else v for k, v in st.items()}
                      for i, st in sd["state"].items()},
            "param_groups": sd["param_groups"]}


def _shard_optimizer_state(sd: Dict[str, Any], optimizer) -> Dict[str, Any]:
    """A checkpoint's (full) optimizer state laid out like this run's parameters."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for i, st in sd["state"].items():
        p = params[int(i)]
        state[i] = {k: _like(v, p) if isinstance(v, torch.Tensor) and v.shape == p.shape else v
                    for k, v in st.items()}
    return {"state": state, "param_groups": sd["param_groups"]}


# ---------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, pipeline=None, progress: bool = True,
          on_step: Optional[Callable[[Dict[str, Any]], None]] = None) -> TrainResult:
    """Train a TACA LoRA (or, with ``cfg.taca=False``, the control LoRA) as ``cfg`` says.

    pipeline: an already-loaded pipeline to train instead of loading ``cfg.model`` (the Python
        API; ``cfg.model`` still names it in the cache key and the saved config).
    on_step: called on the main process after every optimizer step with the logged record.
    Returns a :class:`TrainResult`. Raises ConfigError for bad arguments (before loading any
    model or touching ``cfg.out``) and ModelNotFound when the model is not available here.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from tqdm.auto import tqdm

    cfg.validate()
    samples = discover(cfg.data)
    targets = parse_targets(cfg.lora_targets)
    if pipeline is None:
        check_model(cfg, n_references(samples))
        check_targets(cfg.model, targets)

    log_with = None
    if cfg.report_to != "none":
        import importlib.util

        if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
            log_with = "tensorboard"
        elif cfg.report_to == "tensorboard":
            raise ConfigError("taca train: argument --report-to: tensorboard is not installed (pip install tensorboard)")
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum, mixed_precision=cfg.mixed_precision, log_with=log_with,
        project_config=ProjectConfiguration(project_dir=cfg.out, logging_dir=os.path.join(cfg.out, "logs")),
        cpu=cfg.device == "cpu",
    )
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    dist = str(accelerator.distributed_type).split(".")[-1]
    _check_distributed(accelerator, dist)
    fsdp = dist == "FSDP"
    device = accelerator.device
    sampler = Sampler(len(samples), cfg.batch_size, world, rank, cfg.seed)  # raises if the data is < 1 global batch
    resume_from = ckpt.resolve(cfg.out, cfg.resume) if cfg.resume else None

    def say(msg: str) -> None:
        if is_main and progress:
            tqdm.write(f"taca train: {msg}")

    weight_dtype = _weight_dtype(cfg)
    if fsdp and weight_dtype != torch.float32:
        # accelerate's FSDP2 policy reduces gradients in the compute dtype; the LoRA's are few, so
        # reduce them in float32 as DDP does (the frozen weights have none)
        from torch.distributed.fsdp import MixedPrecisionPolicy

        accelerator.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(
            param_dtype=weight_dtype, reduce_dtype=torch.float32, output_dtype=weight_dtype)
    pipe = pipeline if pipeline is not None else _load_pipeline(cfg, weight_dtype)
    from .families import check_references, family_for

    try:
        family = family_for(pipe)
    except (TypeError, ValueError) as e:  # a pipeline the families refuse: one line naming --model, no traceback
        raise ConfigError(f"taca train: argument --model: {str(e).removeprefix('taca train: ')}") from e
    n_refs = n_references(samples)
    type(family).check_config(cfg, family.pipeline_class)  # before --out is touched
    check_references(type(family), family.pipeline_class, n_refs)
    if family.name != "protocol":
        from ..models import adapter_class

        _check_takes_max_sequence_length(cfg, adapter_class(pipe.transformer))
    _prepare_out(cfg, is_main)
    accelerator.wait_for_everyone()
    transformer = pipe.transformer
    say(f"{type(pipe).__name__} ({family.name}), {len(samples)} samples"
        f"{f' with {n_refs} reference image(s) each' if n_refs else ''}, {world} process(es) on {device}, "
        f"weights {str(weight_dtype).replace('torch.', '')}, TACA {'on: gamma %g for t >= %g' % (cfg.gamma, cfg.t_min) if cfg.taca else 'off (control LoRA)'}")
    if device.type == "cuda":
        # cuDNN's SDPA backward crashed (illegal memory access) in a FLUX-sized LoRA step on an H200
        # with torch 2.11: the stock path (and the split-SDPA fallback) use flash / efficient
        torch.backends.cuda.enable_cudnn_sdp(False)
        say("cuDNN SDPA disabled for training (its backward is unreliable here); stock attention uses "
            "PyTorch's flash / memory-efficient SDPA")

    def bar(it, **kw):
        return tqdm(it, disable=not (is_main and progress), **kw)

    cache = _build_cache(cfg, family, samples, accelerator, device, weight_dtype, bar)
    if is_main and resume_from is None:
        # after the cache: an --out that holds only the default cache (a run stopped while caching) starts afresh
        cfg.save(os.path.join(cfg.out, "train_config.json"))
    family.release_encoders()
    if pipeline is None and family.name != "protocol":
        del pipe
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # --- the adapter ------------------------------------------------------------------------
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer.requires_grad_(False)
    if next(transformer.parameters()).dtype != weight_dtype:
        transformer.to(dtype=weight_dtype)
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    # the LoRA is initialized where the model was loaded (the CPU for taca train), so one process,
    # DDP and FSDP2 start from the same adapter
    torch.manual_seed(cfg.seed)
    transformer.add_adapter(LoraConfig(
        r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, init_lora_weights="gaussian",
        target_modules=family.target_modules(targets)), adapter_name=ADAPTER)
    cast_training_params(transformer, dtype=torch.float32)
    if not fsdp:
        # FSDP2's fully_shard moves each block's shard to the device itself: the whole model never
        # sits on one GPU
        transformer.to(device)
    transformer.train()

    handle = None
    if cfg.taca:
        import taca
        from taca.schedule import PaperSchedule

        handle = taca.enable(transformer, gamma=cfg.gamma, schedule=PaperSchedule(cfg.gamma, cfg.sigma_min),
                             backend=cfg.attention_backend, deterministic=cfg.deterministic)

    params = [p for p in transformer.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    say(f"LoRA rank {cfg.rank}, alpha {cfg.lora_alpha:g} on {cfg.lora_targets}: {n_params / 1e6:.2f}M trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.max_steps)
    model, optimizer = accelerator.prepare(transformer, optimizer)
    # FSDP2 replaces the parameters by sharded ones (DTensors): take them from the prepared model
    named = {n: p for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
    params = list(named.values())
    if fsdp:
        from torch.distributed.tensor import DTensor

        all_params = list(accelerator.unwrap_model(model).parameters())
        say(f"FSDP2: {sum(isinstance(p, DTensor) for p in all_params)} of {len(all_params)} parameter tensors "
            f"sharded over {world} processes")

    step, position = 0, 0
    log_path = os.path.join(cfg.out, "log.jsonl")
    if resume_from is not None:
        st = ckpt.load(resume_from, rank)
        _check_resume_config(st["state"]["config"], cfg, world, st["state"]["world"])
        missing = set(named) ^ set(st["lora"])
        if missing:
            raise ConfigError(f"taca train: argument --resume: the checkpoint's adapter does not fit this model "
                              f"({len(missing)} tensors differ, e.g. {sorted(missing)[:3]})")
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(_like(st["lora"][n], p))
        optimizer.optimizer.load_state_dict(_shard_optimizer_state(st["optimizer"], optimizer.optimizer))
        lr_scheduler.load_state_dict(st["state"]["scheduler"])
        step, position = int(st["state"]["step"]), int(st["state"]["position"])
        ckpt.restore_rng(st["rng"])
        if is_main:
            _truncate_log(log_path, step)
        say(f"resumed from {resume_from} at step {step}")
    accelerator.wait_for_everyone()

    if log_with is not None:
        accelerator.init_trackers("taca-train", config={k: v for k, v in cfg.to_dict().items()
                                                        if isinstance(v, (int, float, str, bool))})

    shift = family.shift()
    result = TrainResult(out=cfg.out, adapter=os.path.join(cfg.out, ADAPTER_FILE), steps=step)

    def save_checkpoint():
        lora = {n: _full(p.detach()) for n, p in named.items()}
        ckpt.save(cfg.out, step, lora=lora, optimizer=_full_optimizer_state(optimizer.optimizer),
                  scheduler=lr_scheduler, position=position, config=cfg.to_dict(), rank=rank, world=world, is_main=is_main,
                  barrier=accelerator.wait_for_everyone, keep=cfg.checkpoints_total_limit)
        if is_main:
            _plot_losses(log_path, os.path.join(cfg.out, "loss.png"))

    pbar = tqdm(total=cfg.max_steps, initial=step, disable=not (is_main and progress), desc="taca train",
                unit="step", dynamic_ncols=True)
    try:
        while step < cfg.max_steps:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            micro_losses = []
            for _ in range(cfg.grad_accum):
                idx, pos = sampler.local(position)
                entries = [cache.entries[i] for i in idx]
                x0 = torch.stack([Cache.read(a)["latents"] for a, _ in entries]).to(device)
                cond = {k: v.to(device) for k, v in family.collate([Cache.read(b) for _, b in entries]).items()}
                if n_refs:  # (B, R, C, h, w)
                    cond["reference_latents"] = torch.stack([
                        torch.stack([Cache.read(r)["latents"] for r in cache.references[i]]) for i in idx]).to(device)
                seeds = [_mix(cfg.seed, position, p) for p in pos]
                sigma64 = sample_sigmas([torch.Generator().manual_seed(s) for s in seeds], cfg, shift)
                noise = torch.stack([
                    torch.randn(x0.shape[1:], generator=torch.Generator(device).manual_seed(s ^ 0x6E015E),
                                device=device, dtype=torch.float32) for s in seeds])
                sigma = sigma64.to(device=device, dtype=torch.float32)
                with accelerator.accumulate(model):
                    loss = flow_matching_loss(family, model, x0, cond, sigma, noise, cfg, weight_dtype).mean()
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                micro_losses.append(loss.detach())
                result.sigmas.extend(sigma64.tolist())
                if handle is not None:
                    g = handle.last_gamma
                    result.gammas.extend(g.tolist() if g is not None else [1.0] * len(idx))
                position += 1
            lr_scheduler.step()
            step += 1
            loss_val = float(accelerator.reduce(torch.stack(micro_losses).mean(), reduction="mean"))
            result.losses.append(loss_val)
            dt = time.perf_counter() - t0
            rec = {"step": step, "loss": loss_val, "lr": lr_scheduler.get_last_lr()[0], "s_per_step": dt,
                   "sigma_min": float(sigma64.min()), "epoch": sampler.epoch_of(position - 1)}
            if device.type == "cuda":  # this step's peak, the largest over the processes
                peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], device=device)
                rec["peak_mem_gib"] = float(accelerator.gather(peak).max())
            if is_main:
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    if log_with is not None:
                        accelerator.log({"loss": loss_val, "lr": rec["lr"], "s_per_step": dt}, step=step)
                pbar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{rec['lr']:.2e}", s_step=f"{dt:.2f}")
                pbar.update(1)
                if on_step is not None:
                    on_step(rec)
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                save_checkpoint()
    except KeyboardInterrupt:
        # keep what was trained: the next `--resume latest` continues from here
        if step > 0 and not (step % cfg.checkpoint_every == 0 or step == cfg.max_steps):
            save_checkpoint()
        raise
    finally:
        pbar.close()

    result.steps = step
    accelerator.wait_for_everyone()
    full = {n: _full(p.detach()) for n, p in named.items()}  # every process: FSDP2 gathers the shards
    if is_main:
        unwrapped = accelerator.unwrap_model(model)
        sd = get_peft_model_state_dict(unwrapped, state_dict=full, adapter_name=ADAPTER)
        sd = {k: v.detach().to(weight_dtype).contiguous() for k, v in sd.items()}
        meta = unwrapped.peft_config[ADAPTER].to_dict()
        family.lora_saver().save_lora_weights(cfg.out, transformer_lora_layers=sd,
                                              transformer_lora_adapter_metadata=meta, weight_name=ADAPTER_FILE)
        _plot_losses(log_path, os.path.join(cfg.out, "loss.png"))
        say(f"wrote {result.adapter} (load it with {_how_to_load(family)})")
    if log_with is not None:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    if handle is not None:
        import taca

        taca.disable(transformer)
    return result
