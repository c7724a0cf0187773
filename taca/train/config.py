"""The training configuration of ``taca train`` and its checks.

Everything a user can get wrong is checked by :meth:`TrainConfig.validate` before any model or
image is loaded and before ``out`` is touched; errors name the argument
(``ValueError("taca train: argument --rank: ...")``).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

TIMESTEP_SAMPLING = ("uniform", "logit-normal")
MIXED_PRECISION = ("no", "bf16", "fp16")
# named target sets; anything else is a comma-separated list of module-name suffixes
TARGET_SETS = ("attn", "attn+ff")
# fields that may differ between a run and its resumption (they do not change what is computed
# up to the checkpoint)
RESUMABLE_CHANGES = frozenset({
    "max_steps", "checkpoint_every", "checkpoints_total_limit", "resume", "overwrite", "log_every",
    "cache_dir", "num_workers", "dataloader_workers", "report_to", "deterministic",
})


class ConfigError(ValueError):
    """A bad argument of ``taca train``; the message names it."""


def _err(arg: str, msg: str) -> ConfigError:
    return ConfigError(f"taca train: argument {arg}: {msg}")


@dataclass
class TrainConfig:
    """Everything that decides a training run (``taca train --help`` documents each field).

    Defaults are the paper's recipe (section 3.3: TACA on with gamma 1.2, t >= 970, LoRA rank =
    alpha = 16 on the attention layers, AdamW lr 1e-4, batch 4). Steps and resolution are not
    published; 1024x1024 is the likely one.
    """

    model: str
    data: str
    out: str
    rank: int = 16
    alpha: Optional[float] = None  # None: = rank (the paper's and ai-toolkit's choice)
    lora_dropout: float = 0.0
    lora_targets: str = "attn"
    gamma: float = 1.2
    t_min: float = 970.0
    taca: bool = True  # False: the control LoRA (same recipe, stock attention)
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    loss_weighting: str = "none"  # "none" | "sigma_sqrt" | "cosmap" (diffusers' compute_loss_weighting_for_sd3)
    precondition_outputs: bool = False  # SD3 only: pred = x_t - sigma * out, target x0 (diffusers' SD3 option)
    guidance: float = 3.5  # FLUX.1-dev's guidance embedding during training (diffusers' FLUX script default)
    lr: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    batch_size: int = 4  # per process
    grad_accum: int = 1
    max_steps: int = 1000  # optimizer steps
    resolution: int = 1024
    # square side of the reference images of edits; None: the pipeline's own (Kontext / Qwen / LongCat edits 1024
    # whatever the output size, FLUX.2 the output's)
    reference_resolution: Optional[int] = None
    center_crop: bool = True
    random_flip: bool = False
    max_sequence_length: Optional[int] = None  # text tokens; None: the pipeline's default (FLUX 512, SD3 256)
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = False
    attention_backend: str = "auto"  # taca.joint_attention backend for the TACA path
    deterministic: bool = True  # False: the CUDA backward adds dQ with unordered atomics (not bitwise repeatable; no faster)
    seed: int = 0
    checkpoint_every: int = 500
    checkpoints_total_limit: int = 3
    log_every: int = 1
    cache_dir: Optional[str] = None  # None: <out>/cache
    resume: Optional[str] = None  # "latest" or a checkpoint folder
    overwrite: bool = False
    report_to: str = "auto"  # "auto" (TensorBoard when installed), "tensorboard", "none"
    device: Optional[str] = None  # None: what accelerate picks; "cpu" forces the CPU
    extra: Dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------------------------------
    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def sigma_min(self) -> float:
        """The lowest sigma trained: t_min / 1000."""
        return self.t_min / 1000.0

    def resolved_cache_dir(self) -> str:
        return self.cache_dir if self.cache_dir is not None else os.path.join(self.out, "cache")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"taca train: unknown configuration fields {unknown}")
        return cls(**d)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    # ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every argument that can be checked without loading a model. Raises ConfigError."""
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise _err("--rank", f"must be an integer > 0, got {self.rank!r}")
        if self.alpha is not None and not (self.alpha > 0 and self.alpha < float("inf")):
            raise _err("--alpha", f"must be finite and > 0, got {self.alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise _err("--lora-dropout", f"must be in [0, 1), got {self.lora_dropout!r}")
        if not (self.gamma > 0 and self.gamma < float("inf")):
            raise _err("--gamma", f"must be finite and > 0, got {self.gamma!r}")
        if not (0.0 <= self.t_min <= 1000.0):
            raise _err("--t-min", f"must be in [0, 1000] (the timestep scale of 1000 training steps), got {self.t_min!r}")
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise _err("--timestep-sampling", f"must be one of {TIMESTEP_SAMPLING}, got {self.timestep_sampling!r}")
        if not self.logit_std > 0:
            raise _err("--logit-std", f"must be > 0, got {self.logit_std!r}")
        if self.loss_weighting not in ("none", "sigma_sqrt", "cosmap"):
            raise _err("--loss-weighting", f"must be one of none, sigma_sqrt, cosmap, got {self.loss_weighting!r}")
        if not (self.lr > 0 and self.lr < float("inf")):
            raise _err("--lr", f"must be finite and > 0, got {self.lr!r}")
        for arg, v, lo in (("--batch-size", self.batch_size, 1), ("--grad-accum", self.grad_accum, 1),
                           ("--max-steps", self.max_steps, 1), ("--checkpoint-every", self.checkpoint_every, 1),
                           ("--checkpoints-total-limit", self.checkpoints_total_limit, 1),
                           ("--log-every", self.log_every, 1), ("--lr-warmup-steps", self.lr_warmup_steps, 0)):
            if not isinstance(v, int) or v < lo:
                raise _err(arg, f"must be an integer >= {lo}, got {v!r}")
        if not isinstance(self.resolution, int) or self.resolution < 16 or self.resolution % 16:
            raise _err("--resolution", f"must be a multiple of 16 (VAE factor 8 x patch 2), got {self.resolution!r}")
        r = self.reference_resolution
        if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r < 16 or r % 16):
            raise _err("--reference-resolution", f"must be a multiple of 16, got {r!r}")
        if self.max_sequence_length is not None and (not isinstance(self.max_sequence_length, int)
                                                     or isinstance(self.max_sequence_length, bool)
                                                     or self.max_sequence_length < 1):
            # the model's own limit is checked before loading where the model is known (check_model)
            raise _err("--max-sequence-length", f"must be a positive integer, got {self.max_sequence_length!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise _err("--mixed-precision", f"must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.attention_backend not in ("auto", "cpu", "cuda", "sdpa", "reference"):
            raise _err("--attention-backend", f"must be auto, cpu, cuda, sdpa or reference, got {self.attention_backend!r}")
        if self.report_to not in ("auto", "tensorboard", "none"):
            raise _err("--report-to", f"must be auto, tensorboard or none, got {self.report_to!r}")
        if self.device not in (None, "cpu", "cuda"):
            raise _err("--device", f"must be cpu or cuda, got {self.device!r}")
        if not self.max_grad_norm > 0:
            raise _err("--max-grad-norm", f"must be > 0, got {self.max_grad_norm!r}")
        parse_targets(self.lora_targets)  # syntax; names are checked against the model skeleton
        self._validate_paths()

    def _validate_paths(self) -> None:
        from ..cli import _looks_like_path

        if _looks_like_path(self.model):
            path = os.path.expanduser(self.model)
            if not os.path.isdir(path):
                raise _err("--model", f"{self.model} is not a folder (pass a hub id such as "
                                      f"black-forest-labs/FLUX.1-dev, or a folder written by save_pretrained)")
            if not os.path.isfile(os.path.join(path, "model_index.json")):
                raise _err("--model", f"{self.model} has no model_index.json (not a diffusers pipeline folder)")
        if not os.path.exists(self.data):
            raise _err("--data", f"{self.data} does not exist (a folder of images with same-named .txt "
                                 f"captions, or a .jsonl of {{\"image\", \"caption\"}})")
        out = self.out
        if os.path.exists(out) and not os.path.isdir(out):
            raise _err("--out", f"{out} exists and is not a folder")
        if self.resume is not None:
            if self.resume != "latest" and not os.path.isdir(self.resume):
                raise _err("--resume", f"{self.resume} is not a checkpoint folder (or pass 'latest')")
            if self.overwrite:
                raise _err("--overwrite", "cannot be combined with --resume (resuming keeps what --out holds)")
        elif os.path.isdir(out) and set(os.listdir(out)) - {"cache"} and not self.overwrite:
            # (a folder holding only the default cache, left by a run stopped while caching, starts afresh and
            # reuses it)
            raise _err("--out", f"{out} is not empty; pass --resume latest to continue its run, --overwrite to "
                                f"replace it, or another folder (an earlier adapter is never overwritten silently)")


def parse_targets(spec: str) -> Union[str, List[str]]:
    """``"attn"`` / ``"attn+ff"`` or a list of module-name suffixes (e.g. ``"to_q,to_k,ff.net.2"``)."""
    if not isinstance(spec, str) or not spec.strip():
        raise _err("--lora-targets", f"expected attn, attn+ff or a comma-separated list of module names, got {spec!r}")
    s = spec.strip()
    if s in TARGET_SETS:
        return s
    names = [x.strip() for x in s.split(",")]
    bad = [x for x in names if not x or not all(c.isalnum() or c in "._" for c in x)]
    if bad:
        raise _err("--lora-targets", f"{bad} are not module names; expected attn, attn+ff or names such as to_q,to_k")
    return names
