"""The seam between attention processors and analysis code.

A processor that sees an active recorder computes its attention through
``taca.joint_attention(..., return_lse=True, return_text_mass=True)`` (even where gamma is 1,
so baselines are recorded too) and hands an :class:`AttentionEvent` to every active recorder.
No N x N matrix is ever built here: analyses work from lse, text_mass and chosen keys.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

import torch


@dataclass
class AttentionEvent:
    """One joint-attention call inside a patched transformer.

    name: the attention module's qualified name, e.g. "transformer_blocks.0.attn".
    q, k: (B, H, N, D) views after QK-norm and RoPE (what the kernel saw).
    lse, text_mass: (B, H, N) float32. gamma: (B,) float32. scale: the logit scale.
    Text tokens are [0, text_len) when text_first, else [N - text_len, N).
    attn_mask: the stock attention mask the call applied (None for FLUX.1, SD3; Qwen-Image's bool
    key mask, Chroma's additive float mask), broadcastable to (B, H, N, N).
    """

    name: str
    q: torch.Tensor
    k: torch.Tensor
    lse: torch.Tensor
    text_mass: torch.Tensor
    text_len: int
    text_first: bool
    gamma: torch.Tensor
    gamma_reverse: float
    scale: float
    attn_mask: Optional[torch.Tensor] = None


Recorder = Callable[[AttentionEvent], None]
_RECORDERS: List[Recorder] = []


def active() -> bool:
    """True while at least one recorder is installed."""
    return bool(_RECORDERS)


def emit(event: AttentionEvent) -> None:
    for r in list(_RECORDERS):
        r(event)


@contextlib.contextmanager
def recording(recorder: Recorder) -> Iterator[Recorder]:
    """Install ``recorder`` for the duration of the block."""
    _RECORDERS.append(recorder)
    try:
        yield recorder
    finally:
        _RECORDERS.remove(recorder)
