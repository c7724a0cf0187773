"""``taca eval generate``: T2I-CompBench images in the official layout, resumable and sharded.

Protocol (the reference generator ``GORS_finetune/inference_eval.py``): every prompt of a
category's ``*_val.txt`` gets ``images_per_prompt`` images (10), image j with seed ``seed + j``
(42..51), one ``torch.Generator`` per image, so batching (``--batch-size``) and sharding do not
change which noise an image starts from. Images go to ``RUN/<category>/samples/<prompt>_<NNNNNN>.png``
with ``NNNNNN = prompt_index * images_per_prompt + j``.

Sharding: under ``accelerate launch`` process r of n generates the prompts with
``prompt_index % n == r`` on its own device; every process writes whole PNGs through a temporary
file and ``os.replace``, so a killed run leaves no partial image and a re-run skips what exists.
``run.json`` and ``manifest.jsonl`` depend only on the settings, never on the number of processes.
"""
from __future__ import annotations

import datetime
import os
import sys
import textwrap
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence

from . import layout

RUN_FORMAT = "taca-eval-run/1"
_TACA_KEYS = {"gamma": float, "schedule": str, "lora": str, "gamma_reverse": float, "backend": str}


class UsageError(ValueError):
    """Bad arguments or inputs, found before any expensive work (exit code 2)."""


def parse_taca_spec(spec: Optional[str]) -> Dict[str, Any]:
    """``"gamma=1.2,schedule=paper,lora=PATH"`` → keyword arguments of ``taca.enable``.

    Defaults: gamma 1.2, schedule "paper" (the paper's sigma >= 0.97 window). Keys: gamma,
    schedule, lora, gamma_reverse, backend. A schedule with a colon ("paper:0.95") is fine.
    """
    out: Dict[str, Any] = {"gamma": 1.2, "schedule": "paper"}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise UsageError(f"taca eval generate: argument --taca: {part!r} is not key=value "
                             f"(keys: {', '.join(_TACA_KEYS)})")
        k, v = (x.strip() for x in part.split("=", 1))
        k = k.replace("-", "_")
        if k not in _TACA_KEYS:
            raise UsageError(f"taca eval generate: argument --taca: unknown key {k!r} (keys: {', '.join(_TACA_KEYS)})")
        try:
            out[k] = _TACA_KEYS[k](v)
        except ValueError:
            raise UsageError(f"taca eval generate: argument --taca: {k}={v!r} is not a number") from None
        if _TACA_KEYS[k] is float and not (0 < out[k] < float("inf")):
            raise UsageError(f"taca eval generate: argument --taca: {k} must be finite and > 0, got {v}")
    from .. import schedule as _schedule

    try:
        _schedule.parse(out["schedule"], out["gamma"])
    except (ValueError, TypeError) as e:
        raise UsageError(f"taca eval generate: argument --taca: {str(e).replace('taca: ', '')}") from None
    if out.get("lora") is not None:
        out["lora"] = os.path.expanduser(out["lora"])
    return out


@dataclass
class GenerateConfig:
    """Everything that decides the images (plus how to run)."""
    model: str
    out: str
    categories: Sequence[str] = layout.CATEGORIES
    prompts_dir: Optional[str] = None
    prompt_set: str = "current"
    images_per_prompt: int = 10
    seed: int = 42
    taca: Optional[Dict[str, Any]] = None   # None: TACA off
    steps: Optional[int] = None
    guidance: Optional[float] = None
    height: Optional[int] = None
    width: Optional[int] = None
    max_sequence_length: Optional[int] = None
    negative_prompt: Optional[str] = None   # for the families that take one (recorded with the pipeline args)
    dtype: Optional[str] = None             # bf16 | fp16 | fp32 (default bf16 on GPU, fp32 on CPU)
    batch_size: int = 1
    limit_prompts: Optional[int] = None     # first N prompts of each category (smoke tests)
    progress: bool = True


def plan(prompts: Sequence[str], images_per_prompt: int, seed: int) -> List[Dict[str, Any]]:
    """One manifest row per image, in index order: prompt_index, image_index (j), index
    (prompt_index * images_per_prompt + j), seed (seed + j), prompt, file."""
    rows = []
    for i, p in enumerate(prompts):
        for j in range(images_per_prompt):
            idx = i * images_per_prompt + j
            rows.append(dict(prompt_index=i, image_index=j, index=idx, seed=seed + j, prompt=p,
                             file=f"samples/{layout.image_name(p, idx)}"))
    return rows


def _pipeline_args(cfg: GenerateConfig) -> Dict[str, Any]:
    return {k: v for k, v in dict(num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, height=cfg.height,
                                  width=cfg.width, max_sequence_length=cfg.max_sequence_length,
                                  negative_prompt=cfg.negative_prompt).items()
            if v is not None}


def _settings(cfg: GenerateConfig, prompt_info: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    taca = None
    if cfg.taca is not None:
        taca = dict(cfg.taca)
        lora = taca.get("lora")
        if lora is not None and os.path.isfile(lora):
            taca["lora_sha256"] = layout.sha256_file(lora)
    return dict(
        format=RUN_FORMAT, model=cfg.model, taca=taca, pipeline_args=_pipeline_args(cfg),
        dtype=cfg.dtype, images_per_prompt=cfg.images_per_prompt, seed=cfg.seed,
        seeds="seed + j for image j of each prompt; one CPU torch.Generator per image",
        prompts=prompt_info,
    )


_COMPARED = ("format", "model", "taca", "pipeline_args", "dtype", "images_per_prompt", "seed")


def check_run_json(path: str, new: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The existing run.json when it agrees with ``new`` (same settings; a category present in
    both has the same prompt file hash), else UsageError. None when there is none."""
    if not os.path.isfile(path):
        return None
    import json

    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"taca eval generate: argument --out: {path} is not readable JSON ({e}); "
                         f"use a new --out folder") from None
    diffs = [k for k in _COMPARED if old.get(k) != new.get(k)]
    for cat, info in new["prompts"].items():
        o = old.get("prompts", {}).get(cat)
        # n_prompts may grow (a --limit-prompts run extended): image i*n+j is the same image either way
        if o is not None and o.get("sha256") != info["sha256"]:
            diffs.append(f"prompts[{cat}]")
    if diffs:
        detail = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diffs if not k.startswith("prompts["))
        raise UsageError(textwrap.fill(
            f"taca eval generate: argument --out: {path} was written with other settings "
            f"({', '.join(diffs)}{': ' + detail if detail else ''}). Resuming would mix images of two "
            f"settings; pass a new --out folder.", width=100))
    return old


def _versions() -> Dict[str, Optional[str]]:
    import importlib.metadata as md

    out: Dict[str, Optional[str]] = {}
    for pkg in ("taca", "diffusers", "transformers", "torch", "peft", "accelerate"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    if out["taca"] is None:  # a source checkout on PYTHONPATH
        from .. import __version__

        out["taca"] = __version__
    return out


def load_pipeline(model: str, dtype):
    """The pipeline ``model`` names (hub id or local folder), through the loader ``taca generate``
    uses: FLUX.1, SD3/SD3.5 or another family whose pipeline ``taca generate`` takes (an adapter in
    ``taca.models``); UsageError with its one-paragraph message otherwise."""
    from .. import models
    from ..cli import _family, _load_pipeline

    pipe, msg = _load_pipeline(model, dtype, command="taca eval generate", argument="--model")
    if pipe is None:
        raise UsageError(msg)
    if _family(pipe) is None:
        raise UsageError(f"taca eval generate: argument --model: {model} loads as {type(pipe).__name__}, which no "
                         f"taca adapter generates with; TACA supports the pipelines of {models.supported()}")
    return pipe


def pipeline_call(cfg: GenerateConfig, pipe) -> Dict[str, Any]:
    """The arguments of every ``pipe(prompt=..., generator=..., output_type="pil", **call)`` of the run
    (``num_images_per_prompt`` added per call): ``taca generate``'s rules for the pipeline's family
    (its guidance argument, its limits and adjustments: taca.cli.pipeline_call) without its
    FLUX.1-schnell defaults (a run records the options as given: pass --steps 4 --guidance 0 there).
    A pipeline no adapter serves (a Python caller's) gets the options under diffusers' usual names.
    UsageError for an option the pipeline does not take."""
    from .. import cli

    family = cli._family(pipe)
    if family is None:
        return _pipeline_args(cfg)
    command = "taca eval generate"
    opts = SimpleNamespace(max_sequence_length=cfg.max_sequence_length, negative_prompt=cfg.negative_prompt)
    try:  # (FLUX.1-schnell's own limits, as taca generate checks them)
        cli._check_family_args(opts, "flux-schnell" if cli._is_schnell(pipe, family) else family, command=command)
        return cli.pipeline_call(pipe, family, steps=cfg.steps, guidance=cfg.guidance,
                                 max_sequence_length=cfg.max_sequence_length, height=cfg.height, width=cfg.width,
                                 negative_prompt=cfg.negative_prompt,
                                 extra={"num_images_per_prompt": "--batch-size"} if cfg.batch_size > 1 else None,
                                 command=command)
    except cli.UsageError as e:
        raise UsageError(str(e)) from None


def _shard() -> tuple:
    """(process_index, num_processes, device) from accelerate (one process without a launcher)."""
    import torch
    from accelerate import PartialState

    # Without CUDA (or with `accelerate launch --cpu`) the processes talk over gloo; accelerate only
    # picks that when asked for the CPU.
    cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    st = PartialState(cpu=cpu)
    return st.process_index, st.num_processes, st.device


def prepare(cfg: GenerateConfig) -> Dict[str, Any]:
    """Checks everything cheap (categories, prompts, --out, run.json agreement) and returns the
    plan: {"settings", "plans": {category: rows}}. Raises UsageError."""
    cats = list(cfg.categories)
    for c in cats:
        if c not in layout.CATEGORIES:
            raise UsageError(f"taca eval generate: argument --categories: unknown category {c!r}; "
                             f"known: {','.join(layout.CATEGORIES)}")
    if cfg.images_per_prompt < 1 or cfg.batch_size < 1:
        raise UsageError("taca eval generate: --images-per-prompt and --batch-size must be >= 1")
    for name in ("height", "width"):
        v = getattr(cfg, name)
        if v is not None and v % 16:
            raise UsageError(f"taca eval generate: argument --{name}: must be a multiple of 16, got {v}")
    if cfg.prompts_dir is not None and not os.path.isdir(cfg.prompts_dir):
        raise UsageError(f"taca eval generate: argument --prompts: {cfg.prompts_dir} is not a folder")
    parent = os.path.dirname(os.path.abspath(cfg.out))
    if not os.path.isdir(parent):
        raise UsageError(f"taca eval generate: argument --out: folder {parent} does not exist")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise UsageError(f"taca eval generate: argument --out: {cfg.out} exists and is not a folder")
    lora = (cfg.taca or {}).get("lora")
    lora_is_path = lora is not None and (lora.count("/") != 1 or lora.startswith((".", "/", "~")))
    if lora_is_path and not os.path.exists(lora):  # a hub id ("owner/name") is left to taca.enable
        raise UsageError(f"taca eval generate: argument --taca: lora={lora} does not exist")
    if cfg.dtype is None:  # recorded resolved, so a later explicit --dtype of the same type resumes
        import torch

        cfg.dtype = "bf16" if torch.cuda.is_available() else "fp32"
    if cfg.dtype not in ("bf16", "fp16", "fp32"):
        raise UsageError(f"taca eval generate: argument --dtype: {cfg.dtype!r} is not one of bf16, fp16, fp32")
    info, plans = {}, {}
    for c in cats:
        try:
            prompts, path, sha = layout.load_prompts(c, cfg.prompts_dir, cfg.prompt_set)
        except layout.LayoutError as e:
            raise UsageError(str(e)) from None
        if cfg.limit_prompts is not None:
            prompts = prompts[:cfg.limit_prompts]
        legacy = c == "color" and cfg.prompt_set == "7728dea"
        commit = layout.COLOR_VAL_LEGACY_COMMIT if legacy else layout.PROMPTS_COMMIT
        info[c] = dict(file=os.path.basename(path), sha256=sha, n_prompts=len(prompts),
                       source=(f"{layout.PROMPTS_SOURCE} @ {commit}" if cfg.prompts_dir is None
                               else os.path.abspath(path)),
                       limited=cfg.limit_prompts is not None)
        plans[c] = plan(prompts, cfg.images_per_prompt, cfg.seed)
    settings = _settings(cfg, info)
    check_run_json(os.path.join(cfg.out, "run.json"), settings)
    return dict(settings=settings, plans=plans)


def generate(cfg: GenerateConfig, pipe=None) -> Dict[str, int]:
    """Generate every missing image of ``cfg`` on this process's shard.

    pipe: an already loaded pipeline to use instead of loading ``cfg.model`` (Python callers;
    ``cfg.model`` is still recorded in run.json). Returns {"generated": n, "skipped": n} for this
    process. Raises UsageError for bad input (before loading the model).
    """
    import torch

    prepared = prepare(cfg)
    rank, world, device = _shard()
    todo = {c: [r for r in rows if r["prompt_index"] % world == rank
                and not os.path.isfile(os.path.join(cfg.out, c, r["file"]))]
            for c, rows in prepared["plans"].items()}
    mine = sum(1 for rows in prepared["plans"].values() for r in rows if r["prompt_index"] % world == rank)
    n_todo = sum(len(v) for v in todo.values())
    stats = {"generated": 0, "skipped": mine - n_todo}
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.dtype]
    if n_todo and pipe is None:
        pipe = load_pipeline(cfg.model, dtype)  # before writing anything: a missing model leaves no folder
    call = pipeline_call(cfg, pipe) if n_todo else None  # so does an option the pipeline does not take

    os.makedirs(cfg.out, exist_ok=True)
    for c in prepared["plans"]:
        os.makedirs(os.path.join(cfg.out, c, "samples"), exist_ok=True)
    if rank == 0:
        _write_run_files(cfg, prepared)
    if n_todo == 0:
        _say(rank, f"nothing to do ({stats['skipped']} image(s) already there)")
        return stats

    pipe.to(dev)
    pipe.set_progress_bar_config(disable=not cfg.progress, leave=False, position=1 + rank if world > 1 else 1)
    import taca

    if cfg.taca is not None:
        taca.enable(pipe, **cfg.taca)
    else:
        taca.disable(pipe)
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    bar = tqdm(total=n_todo, desc=f"taca eval generate [{rank + 1}/{world}]" if world > 1 else "taca eval generate",
               unit="img", disable=not cfg.progress, position=rank if world > 1 else 0)
    try:
        for c, rows in todo.items():
            by_prompt: Dict[int, List[Dict[str, Any]]] = {}
            for r in rows:
                by_prompt.setdefault(r["prompt_index"], []).append(r)
            for _, prow in sorted(by_prompt.items()):
                for k in range(0, len(prow), cfg.batch_size):
                    chunk = prow[k:k + cfg.batch_size]
                    gens = [torch.Generator(device="cpu").manual_seed(r["seed"]) for r in chunk]
                    many = {"num_images_per_prompt": len(chunk)} if len(chunk) > 1 else {}
                    out = pipe(prompt=chunk[0]["prompt"], generator=gens if len(gens) > 1 else gens[0],
                               output_type="pil", **many, **call)
                    for r, img in zip(chunk, out.images):
                        final = os.path.join(cfg.out, c, r["file"])
                        # beside samples/, never in it (the official scripts read every file there)
                        tmp = os.path.join(cfg.out, c, f".{rank}-{r['index']:06d}.png.tmp")
                        img.save(tmp, format="PNG")
                        os.replace(tmp, final)
                        stats["generated"] += 1
                        bar.update(1)
    finally:
        bar.close()
        if cfg.taca is not None:
            taca.disable(pipe)
    dt = time.perf_counter() - t0
    _say(rank, f"generated {stats['generated']} in {dt:.2f} s ({stats['generated'] / max(dt, 1e-9):.3f} img/s, model "
               f"loading excluded), kept {stats['skipped']} existing image(s)")
    return stats


def _write_run_files(cfg: GenerateConfig, prepared: Dict[str, Any]) -> None:
    run_json = os.path.join(cfg.out, "run.json")
    old = check_run_json(run_json, prepared["settings"])
    settings = dict(prepared["settings"])
    created = None
    keep = set()
    if old is not None:
        old_prompts = old.get("prompts", {})
        # a --limit-prompts run after a larger one does not shrink what run.json and the manifest list
        keep = {c for c, info in settings["prompts"].items()
                if c in old_prompts and old_prompts[c].get("n_prompts", 0) >= info["n_prompts"]}
        settings["prompts"] = {**old_prompts, **{c: i for c, i in settings["prompts"].items() if c not in keep}}
        created = old.get("created")
    settings["created"] = created or datetime.datetime.now(datetime.timezone.utc).isoformat()
    settings["versions"] = _versions()
    layout.write_json_atomic(run_json, settings)
    for c, rows in prepared["plans"].items():
        if c not in keep or not os.path.isfile(os.path.join(cfg.out, c, "manifest.jsonl")):
            layout.write_jsonl_atomic(os.path.join(cfg.out, c, "manifest.jsonl"), rows)


def _say(rank: int, msg: str) -> None:
    print(f"taca eval generate: [process {rank}] {msg}", file=sys.stderr)
