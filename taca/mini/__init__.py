"""The miniature: a small MM-DiT trained here on synthetic compositional scenes.

- ``taca.mini.data``: the scene grammar (colors, shapes, counts, spatial relations), a batched
  torch renderer (signed distances, anti-aliased, CPU or GPU), the fixed evaluation prompt set
  and a writer for a folder of PNG + same-named .txt captions.
- ``taca.mini.judge``: a rule-based judge scoring an image against its caption per category,
  and Wilson confidence intervals.
- ``taca.mini.model``: ``MiniPipeline`` (a diffusers ``DiffusionPipeline``) around a small
  ``FluxTransformer2DModel`` in pixel space and a small T5 text encoder trained from scratch.
- ``taca.mini.pretrain``: from-scratch training of that model (``python -m taca.mini.pretrain``).

- ``taca.mini.experiment``: the TACA experiment on it (``taca eval mini`` is its quick version).

The trained model ships in ``taca/mini/weights/`` (``shipped("pipeline")``, with the TACA LoRA and
the control LoRA beside it; see its MODEL_CARD.md). Only ``data`` and ``judge`` are torch-only; ``model`` and ``pretrain`` import diffusers and
transformers when they are used.
"""

import os as _os

WEIGHTS = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "weights")
_SHIPPED = {"pipeline": "pipeline", "taca_lora": "lora-taca", "control_lora": "lora-control"}


def shipped(name: str):
    """Path of a shipped artifact ("pipeline", "taca_lora", "control_lora"), or None when this
    checkout has no trained weights."""
    path = _os.path.join(WEIGHTS, _SHIPPED[name])
    return path if _os.path.exists(path) else None
