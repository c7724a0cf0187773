"""taca.joint_attention: the one op everything else calls.

Dispatch (backend="auto"): tensors the compiled kernels support go to the C/CUDA kernels
through the ``torch.ops.taca`` ops; everything else goes to the exact split-SDPA form.
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Tuple, Union

import torch

from . import reference

logger = logging.getLogger("taca")

_LAYOUTS = ("bhnd", "bnhd")
_BACKENDS = ("auto", "cpu", "cuda", "sdpa", "reference")


def _validate(q, k, v, text_len, gamma, gamma_reverse, scale, layout, backend):
    if layout not in _LAYOUTS:
        raise ValueError(f"taca: layout={layout!r} is not one of {_LAYOUTS}")
    if backend not in _BACKENDS:
        raise ValueError(f"taca: backend={backend!r} is not one of {_BACKENDS}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"taca: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"taca: {name} must have 4 dimensions ({'B, H, N, D' if layout == 'bhnd' else 'B, N, H, D'}), "
                f"got shape {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"taca: {name} must be a floating-point tensor, got {t.dtype}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"taca: q, k, v must have the same shape, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"taca: q, k, v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"taca: q, k, v must be on the same device, got {q.device}, {k.device}, {v.device}")
    D = q.shape[-1]
    if D < 1 or D > 256:
        raise ValueError(f"taca: head dim must be in [1, 256], got {D}")
    N = q.shape[2] if layout == "bhnd" else q.shape[1]
    if isinstance(text_len, bool) or not isinstance(text_len, int):
        if isinstance(text_len, torch.SymInt):
            pass
        else:
            raise TypeError(f"taca: text_len must be an int, got {type(text_len).__name__}")
    if text_len < 0 or text_len > N:
        raise ValueError(f"taca: text_len={text_len} must be in [0, {N}] (the sequence length)")
    if isinstance(gamma, torch.Tensor):
        B = q.shape[0]
        if gamma.dim() > 1 or (gamma.dim() == 1 and gamma.shape[0] != B):
            raise ValueError(f"taca: gamma must be a float, a 0-d tensor or a ({B},) tensor, got shape {tuple(gamma.shape)}")
        if not gamma.is_floating_point():
            raise TypeError(f"taca: gamma tensor must be floating point, got {gamma.dtype}")
    else:
        g = float(gamma)
        if not math.isfinite(g) or g <= 0:
            raise ValueError(f"taca: gamma={gamma} must be finite and > 0")
    gr = float(gamma_reverse)
    if not math.isfinite(gr) or gr <= 0:
        raise ValueError(f"taca: gamma_reverse={gamma_reverse} must be finite and > 0")
    if scale is not None and not math.isfinite(float(scale)):
        raise ValueError(f"taca: scale={scale} must be finite")
    return N


def joint_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    text_len: int,
    text_first: bool = True,
    gamma: Union[float, torch.Tensor] = 1.0,
    gamma_reverse: float = 1.0,
    scale: Optional[float] = None,
    layout: str = "bhnd",
    return_lse: bool = False,
    return_text_mass: bool = False,
    backend: str = "auto",
):
    """Gamma-scaled joint attention (TACA).

    q, k, v: (B, H, N, D) for layout "bhnd" or (B, N, H, D) for "bnhd"; text tokens are the
    first ``text_len`` tokens (``text_first=True``, FLUX) or the last (SD3).
    gamma: float or (B,) tensor, multiplies the scaled logits of (visual query, text key)
    pairs; gamma_reverse those of (text query, visual key) pairs. scale defaults to 1/sqrt(D).

    Returns out (same layout and dtype as q), plus lse (B, H, N) float32 and text_mass
    (B, H, N) float32 when asked (float64 for float64 inputs).
    """
    _validate(q, k, v, text_len, gamma, gamma_reverse, scale, layout, backend)
    if backend == "reference" or (return_lse or return_text_mass) and backend == "sdpa":
        out, lse, tm = reference.attention_ref(
            q, k, v, text_len=text_len, text_first=text_first, gamma=gamma,
            gamma_reverse=gamma_reverse, scale=scale, layout=layout, upcast=torch.float32
            if q.dtype != torch.float64 else torch.float64,
        )
        out = out.to(q.dtype)
        return _pack(out, lse, tm, return_lse, return_text_mass)
    if backend in ("auto", "sdpa"):
        out = reference.attention_split_sdpa(
            q, k, v, text_len=text_len, text_first=text_first, gamma=gamma,
            gamma_reverse=gamma_reverse, scale=scale, layout=layout,
        )
        return _pack(out, None, None, False, False)
    raise NotImplementedError(f"taca: backend={backend!r} needs the compiled extension")


def _pack(out, lse, tm, return_lse, return_text_mass):
    if not (return_lse or return_text_mass):
        return out
    res = (out,)
    if return_lse:
        res += (lse,)
    if return_text_mass:
        res += (tm,)
    return res
