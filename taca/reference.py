"""Plain-PyTorch forms of gamma-scaled joint attention.

``attention_ref`` materializes the (N, N) logits in float64 (or a chosen dtype) and is the
oracle every test and benchmark compares against. ``attention_split_sdpa`` is the exact
two-call form on ``F.scaled_dot_product_attention``: it is the fallback backend for anything
the kernels do not cover.

Both take q, k, v as (B, N, H, D) ("bnhd") or (B, H, N, D) ("bhnd").
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

GammaLike = Union[float, torch.Tensor]


def _to_bhnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.transpose(1, 2) if layout == "bnhd" else x


def _from_bhnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.transpose(1, 2) if layout == "bnhd" else x


def text_range(n: int, text_len: int, text_first: bool) -> Tuple[int, int]:
    """The [begin, end) token range of the text tokens in a sequence of n tokens."""
    return (0, text_len) if text_first else (n - text_len, n)


def gamma_vector(gamma: GammaLike, batch: int, device, dtype=torch.float32) -> torch.Tensor:
    """gamma as a (B,) tensor of ``dtype`` on ``device``."""
    if isinstance(gamma, torch.Tensor):
        g = gamma.to(device=device, dtype=dtype)
        return g.reshape(1).expand(batch) if g.dim() == 0 else g
    return torch.full((batch,), float(gamma), device=device, dtype=dtype)


def logit_multiplier(
    n: int,
    text_len: int,
    text_first: bool,
    gamma: GammaLike,
    gamma_reverse: float,
    batch: int,
    device=None,
    dtype=torch.float64,
) -> torch.Tensor:
    """The multiplier of the scaled logits, (B, 1, N, N) (query rows, key columns): gamma for
    (image query, text key), gamma_reverse for (text query, image key), 1 elsewhere."""
    tb, te = text_range(n, text_len, text_first)
    is_text = torch.zeros(n, dtype=torch.bool, device=device)
    is_text[tb:te] = True
    vis_q_text_k = (~is_text)[:, None] & is_text[None, :]
    text_q_vis_k = is_text[:, None] & (~is_text)[None, :]
    g = gamma_vector(gamma, batch, device, dtype).view(batch, 1, 1, 1)
    m = torch.ones(batch, 1, n, n, dtype=dtype, device=device)
    m = torch.where(vis_q_text_k, g, m)
    m = torch.where(text_q_vis_k, torch.full_like(m, float(gamma_reverse)), m)
    return m


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    text_len: int,
    text_first: bool = True,
    gamma: GammaLike = 1.0,
    gamma_reverse: float = 1.0,
    scale: Optional[float] = None,
    layout: str = "bhnd",
    upcast: Optional[torch.dtype] = torch.float64,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Materialized reference: returns (out, lse, text_mass).

    out has q's layout and ``upcast`` dtype (q's dtype when ``upcast`` is None);
    lse and text_mass are (B, H, N) in the same dtype.
    """
    qb, kb, vb = (_to_bhnd(t, layout) for t in (q, k, v))
    if upcast is not None:
        qb, kb, vb = qb.to(upcast), kb.to(upcast), vb.to(upcast)
    B, H, N, D = qb.shape
    s = math.sqrt(1.0 / D) if scale is None else scale
    logits = torch.matmul(qb, kb.transpose(-1, -2)) * s
    m = logit_multiplier(N, text_len, text_first, gamma, gamma_reverse, B, qb.device, qb.dtype)
    logits = logits * m
    lse = torch.logsumexp(logits, dim=-1)
    p = torch.exp(logits - lse[..., None])
    out = torch.matmul(p, vb)
    tb, te = text_range(N, text_len, text_first)
    text_mass = p[..., tb:te].sum(-1)
    return _from_bhnd(out, layout), lse, text_mass


def attention_split_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    text_len: int,
    text_first: bool = True,
    gamma: GammaLike = 1.0,
    gamma_reverse: float = 1.0,
    scale: Optional[float] = None,
    layout: str = "bhnd",
) -> torch.Tensor:
    """Exact TACA on two SDPA calls (differentiable, any backend SDPA picks).

    Visual queries attend to K with its text rows multiplied by gamma; text queries attend
    to K with its visual rows multiplied by gamma_reverse. Exact because RoPE and QK-norm
    are applied before attention. Returns out in q's layout and dtype.
    """
    qb, kb, vb = (_to_bhnd(t, layout) for t in (q, k, v))
    B, H, N, D = qb.shape
    tb, te = text_range(N, text_len, text_first)
    if N == 0 or B == 0 or H == 0:
        return _from_bhnd(torch.empty_like(qb), layout)
    if text_len in (0, N):
        out = F.scaled_dot_product_attention(qb, kb, vb, scale=scale)
        return _from_bhnd(out, layout)
    g = gamma_vector(gamma, B, qb.device, qb.dtype).view(B, 1, 1, 1)
    k_txt = kb[:, :, tb:te]
    k_vis_before, k_vis_after = kb[:, :, :tb], kb[:, :, te:]
    k_for_vis = torch.cat([k_vis_before, k_txt * g, k_vis_after], dim=2)
    if gamma_reverse == 1.0:
        k_for_txt = kb
    else:
        k_for_txt = torch.cat(
            [k_vis_before * gamma_reverse, k_txt, k_vis_after * gamma_reverse], dim=2
        )
    q_txt = qb[:, :, tb:te]
    q_vis = torch.cat([qb[:, :, :tb], qb[:, :, te:]], dim=2) if tb > 0 else qb[:, :, te:]
    o_vis = F.scaled_dot_product_attention(q_vis, k_for_vis, vb, scale=scale)
    o_txt = F.scaled_dot_product_attention(q_txt, k_for_txt, vb, scale=scale)
    out = torch.cat([o_vis[:, :, :tb], o_txt, o_vis[:, :, tb:]], dim=2)
    return _from_bhnd(out, layout)
