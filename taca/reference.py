"""Plain-PyTorch forms of gamma-scaled joint attention.

``attention_ref`` materializes the (N_q, N_k) logits in float64 (or a chosen dtype) and is the
oracle every test and benchmark compares against. ``attention_split_sdpa`` is the exact
two-call form on ``F.scaled_dot_product_attention``: it is the fallback backend for anything
the kernels do not cover.

Both take q as (B, N_q, H, D) ("bnhd") or (B, H, N_q, D) ("bhnd") and k, v as (B, N_k, H_kv, D)
or (B, H_kv, N_k, D), H % H_kv == 0 (query head h reads kv head h // (H // H_kv), as SDPA's
``enable_gqa=True``). The definition, per sample b:

    logit(i, j) = scale * (q_i . k_j) * m_ij + mask_ij
    m_ij = gamma[b]       if query i is visual and key j is text
           gamma_reverse  if query i is text and key j is visual
           1              otherwise

Key j is text when text_start[b] <= j < text_start[b] + text_len[b]; query i is text when it
lies in the query text span (see ``resolve_spans``). attn_mask is SDPA's: bool (True =
attend, False = logit -inf) or float (added), broadcastable to (B, H, N_q, N_k). A query row
whose every logit is -inf (fully masked) gets out = 0, lse = -inf, text_mass = 0 and zero
gradients, as torch 2.13's F.scaled_dot_product_attention returns on CPU.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F

GammaLike = Union[float, torch.Tensor]
SpanLike = Union[int, torch.Tensor]


def _to_bhnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.transpose(1, 2) if layout == "bnhd" else x


def _from_bhnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.transpose(1, 2) if layout == "bnhd" else x


def text_range(n: int, text_len: int, text_first: bool) -> Tuple[int, int]:
    """The [begin, end) token range of the text tokens in a sequence of n tokens."""
    return (0, text_len) if text_first else (n - text_len, n)


class Spans(NamedTuple):
    """Text spans [k_begin, k_end) of the keys and [q_begin, q_end) of the queries: each an
    int (shared by the batch) or a (B,) int64 tensor (per sample)."""

    k_begin: SpanLike
    k_end: SpanLike
    q_begin: SpanLike
    q_end: SpanLike

    @property
    def per_sample(self) -> bool:
        for x in self:  # (a loop: this runs on every call's host path)
            if isinstance(x, torch.Tensor):
                return True
        return False


def resolve_spans(
    n_q: int,
    n_k: int,
    text_len: SpanLike,
    text_first: bool = True,
    text_start: Optional[SpanLike] = None,
    query_text_start: Optional[SpanLike] = None,
    query_text_len: Optional[SpanLike] = None,
) -> Spans:
    """The key and query text spans the arguments of ``joint_attention`` describe.

    Keys: [text_start, text_start + text_len); text_start None means 0 (text_first) or
    n_k - text_len (text last; per sample for a tensor text_len). Queries: with n_q == n_k and
    neither query argument given, the key span (one token set). Otherwise query_text_len None
    means no text query (only allowed when query_text_start is None too, or n_q == n_k where it
    defaults to text_len), and query_text_start None follows text_first over n_q tokens.
    Values are not checked here (``taca.ops`` validates them).
    """
    k_begin = text_start
    if k_begin is None:
        k_begin = 0 if text_first else n_k - text_len
    k_end = k_begin + text_len
    if query_text_start is None and query_text_len is None:
        if n_q == n_k:
            return Spans(k_begin, k_end, k_begin, k_end)
        return Spans(k_begin, k_end, 0, 0)
    if query_text_len is None:
        if n_q != n_k:
            raise ValueError("taca: query_text_start needs query_text_len when q and k have "
                             f"different token counts ({n_q} != {n_k})")
        query_text_len = text_len
    q_begin = query_text_start
    if q_begin is None:
        q_begin = 0 if text_first else n_q - query_text_len
    return Spans(k_begin, k_end, q_begin, q_begin + query_text_len)


def span_masks(spans: Spans, batch: int, n_q: int, n_k: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(is_text_query (B, N_q), is_text_key (B, N_k)) bool tensors of the spans."""

    def one(begin, end, n):
        pos = torch.arange(n, device=device)
        b = begin.to(device).view(-1, 1) if isinstance(begin, torch.Tensor) else begin
        e = end.to(device).view(-1, 1) if isinstance(end, torch.Tensor) else end
        return ((pos >= b) & (pos < e)).expand(batch, n)

    return one(spans.q_begin, spans.q_end, n_q), one(spans.k_begin, spans.k_end, n_k)


def gamma_vector(gamma: GammaLike, batch: int, device, dtype=torch.float32) -> torch.Tensor:
    """gamma as a (B,) tensor of ``dtype`` on ``device``."""
    if isinstance(gamma, torch.Tensor):
        g = gamma.to(device=device, dtype=dtype)
        return g.reshape(1).expand(batch) if g.dim() == 0 else g
    return torch.full((batch,), float(gamma), device=device, dtype=dtype)


def logit_multiplier(
    n: int,
    text_len: SpanLike,
    text_first: bool,
    gamma: GammaLike,
    gamma_reverse: float,
    batch: int,
    device=None,
    dtype=torch.float64,
    *,
    n_k: Optional[int] = None,
    text_start: Optional[SpanLike] = None,
    query_text_start: Optional[SpanLike] = None,
    query_text_len: Optional[SpanLike] = None,
) -> torch.Tensor:
    """The multiplier of the scaled logits, (B, 1, N_q, N_k) (query rows, key columns): gamma
    for (visual query, text key), gamma_reverse for (text query, visual key), 1 elsewhere.
    n is N_q; n_k defaults to n."""
    n_k = n if n_k is None else n_k
    spans = resolve_spans(n, n_k, text_len, text_first, text_start, query_text_start, query_text_len)
    q_text, k_text = span_masks(spans, batch, n, n_k, device)
    vis_q_text_k = (~q_text)[:, None, :, None] & k_text[:, None, None, :]
    text_q_vis_k = q_text[:, None, :, None] & (~k_text)[:, None, None, :]
    g = gamma_vector(gamma, batch, device, dtype).view(batch, 1, 1, 1)
    m = torch.ones(batch, 1, n, n_k, dtype=dtype, device=device)
    m = torch.where(vis_q_text_k, g, m)
    m = torch.where(text_q_vis_k, torch.full_like(m, float(gamma_reverse)), m)
    return m


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    text_len: SpanLike,
    text_first: bool = True,
    gamma: GammaLike = 1.0,
    gamma_reverse: float = 1.0,
    scale: Optional[float] = None,
    layout: str = "bhnd",
    upcast: Optional[torch.dtype] = torch.float64,
    text_start: Optional[SpanLike] = None,
    query_text_start: Optional[SpanLike] = None,
    query_text_len: Optional[SpanLike] = None,
    attn_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Materialized reference: returns (out, lse, text_mass).

    out has q's layout and ``upcast`` dtype (q's dtype when ``upcast`` is None);
    lse and text_mass are (B, H, N_q) in the same dtype.
    """
    qb, kb, vb = (_to_bhnd(t, layout) for t in (q, k, v))
    if upcast is not None:
        qb, kb, vb = qb.to(upcast), kb.to(upcast), vb.to(upcast)
    B, H, Nq, D = qb.shape
    Hkv, Nk = kb.shape[1], kb.shape[2]
    if Hkv != H:
        kb, vb = kb.repeat_interleave(H // Hkv, dim=1), vb.repeat_interleave(H // Hkv, dim=1)
    s = math.sqrt(1.0 / D) if scale is None else scale
    logits = torch.matmul(qb, kb.transpose(-1, -2)) * s
    spans = resolve_spans(Nq, Nk, text_len, text_first, text_start, query_text_start, query_text_len)
    m = logit_multiplier(Nq, text_len, text_first, gamma, gamma_reverse, B, qb.device, qb.dtype,
                         n_k=Nk, text_start=text_start, query_text_start=query_text_start,
                         query_text_len=query_text_len)
    logits = logits * m
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask.to(qb.device), -math.inf)
        else:
            logits = logits + attn_mask.to(device=qb.device, dtype=qb.dtype)
    # softmax written so that a row of only -inf gives p = 0 (and finite gradients), not NaN
    if Nk == 0:
        mx = logits.new_zeros(logits.shape[:-1] + (1,))
    else:
        mx = logits.detach().amax(dim=-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    e = torch.exp(logits - mx)
    total = e.sum(-1, keepdim=True)
    p = e / torch.where(total == 0, torch.ones_like(total), total)
    lse = (mx + torch.log(total)).squeeze(-1)
    out = torch.matmul(p, vb)
    k_text = span_masks(spans, B, Nq, Nk, qb.device)[1]
    text_mass = (p * k_text[:, None, None, :].to(p.dtype)).sum(-1)
    return _from_bhnd(out, layout), lse, text_mass


def _mask_rows(mask: Optional[torch.Tensor], rows) -> Optional[torch.Tensor]:
    """The mask of a subset of query rows: rows is a list of (begin, end) slices."""
    if mask is None or mask.dim() < 2 or mask.shape[-2] == 1:
        return mask
    parts = [mask[..., a:b, :] for a, b in rows if b > a]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


def attention_split_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    text_len: SpanLike,
    text_first: bool = True,
    gamma: GammaLike = 1.0,
    gamma_reverse: float = 1.0,
    scale: Optional[float] = None,
    layout: str = "bhnd",
    text_start: Optional[SpanLike] = None,
    query_text_start: Optional[SpanLike] = None,
    query_text_len: Optional[SpanLike] = None,
    attn_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Exact TACA on two SDPA calls (differentiable, the backend SDPA picks).

    Visual queries attend to K with its text rows multiplied by gamma; text queries attend
    to K with its visual rows multiplied by gamma_reverse; attn_mask (sliced to each call's
    query rows) is added after that, as in the definition. Exact because RoPE and QK-norm are
    applied before attention. With per-sample (tensor) spans both calls run over every query
    and each row takes its own result (twice the work, no host sync). Returns out in q's
    layout and dtype.

    On CUDA with float16/bfloat16 q: a float mask of another dtype is cast to q's dtype (SDPA's
    CUDA backends take a bias in q's dtype only; with a float32 one the default pick returned
    NaN rows on an H200, torch 2.11), and under autograd the cuDNN backend is left out (its
    backward crashed in a FLUX-sized training step there).
    """
    qb, kb, vb = (_to_bhnd(t, layout) for t in (q, k, v))
    B, H, Nq, D = qb.shape
    Nk = kb.shape[2]
    if Nq == 0 or B == 0 or H == 0:
        return _from_bhnd(torch.empty_like(qb), layout)
    if Nk == 0:  # no key at all: every row is fully masked
        return _from_bhnd(qb * 0, layout)
    if attn_mask is None:
        return _from_bhnd(_split(qb, kb, vb, None, text_len, text_first, gamma, gamma_reverse, scale,
                                 text_start, query_text_start, query_text_len), layout)
    if attn_mask.is_floating_point() and attn_mask.dtype != qb.dtype and qb.dtype == torch.float64:
        attn_mask = attn_mask.to(torch.float64)  # exact; SDPA mixes a float32 mask in otherwise
    if (attn_mask.is_floating_point() and attn_mask.dtype != qb.dtype and qb.is_cuda
            and qb.dtype in (torch.float16, torch.bfloat16)):
        attn_mask = attn_mask.to(qb.dtype)  # see the docstring
    out = _split(qb, kb, vb, attn_mask, text_len, text_first, gamma, gamma_reverse, scale, text_start,
                 query_text_start, query_text_len)
    # Fully masked query rows are 0 (and get zero gradients) whatever SDPA backend ran: not all
    # of them agree on such rows.
    dead = ~attn_mask.any(-1) if attn_mask.dtype == torch.bool else (attn_mask == -math.inf).all(-1)
    if dead.dim() > 0:
        out = torch.where(dead[..., None], torch.zeros((), dtype=out.dtype, device=out.device), out)
    elif bool(dead):
        out = out * 0
    return _from_bhnd(out, layout)


def _split(qb, kb, vb, attn_mask, text_len, text_first, gamma, gamma_reverse, scale, text_start,
           query_text_start, query_text_len):
    B, H, Nq, D = qb.shape
    Hkv, Nk = kb.shape[1], kb.shape[2]
    extra = {"enable_gqa": True} if Hkv != H else {}

    def sdpa(qq, kk, mask):
        if qq.is_cuda and torch.is_grad_enabled() and any(t.requires_grad for t in (qb, kb, vb)):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
                return F.scaled_dot_product_attention(qq, kk, vb, attn_mask=mask, scale=scale, **extra)
        return F.scaled_dot_product_attention(qq, kk, vb, attn_mask=mask, scale=scale, **extra)

    spans = resolve_spans(Nq, Nk, text_len, text_first, text_start, query_text_start, query_text_len)
    g = gamma_vector(gamma, B, qb.device, qb.dtype).view(B, 1, 1, 1)
    gr = float(gamma_reverse)
    if spans.per_sample:
        q_text, k_text = span_masks(spans, B, Nq, Nk, qb.device)
        kt = k_text[:, None, :, None]
        o_vis = sdpa(qb, torch.where(kt, kb * g, kb), attn_mask)
        if not isinstance(spans.q_end, torch.Tensor) and spans.q_end == spans.q_begin:
            return o_vis  # statically no text query
        o_txt = sdpa(qb, kb if gr == 1.0 else torch.where(kt, kb, kb * gr), attn_mask)
        return torch.where(q_text[:, None, :, None], o_txt, o_vis)

    kb0, ke0, qb0, qe0 = (int(x) for x in spans)
    k_txt, k_before, k_after = kb[:, :, kb0:ke0], kb[:, :, :kb0], kb[:, :, ke0:]
    has_text_key, has_visual_key = ke0 > kb0, ke0 - kb0 < Nk
    k_for_vis = torch.cat([k_before, k_txt * g, k_after], dim=2) if has_text_key else kb
    if has_visual_key and gr != 1.0:
        k_for_txt = torch.cat([k_before * gr, k_txt, k_after * gr], dim=2)
    else:
        k_for_txt = kb
    if qe0 == qb0:  # no text query (text_len 0 on one token set: plain attention)
        return sdpa(qb, k_for_vis, attn_mask)
    if qe0 - qb0 == Nq:  # every query is text
        return sdpa(qb, k_for_txt, attn_mask)
    o_txt = sdpa(qb[:, :, qb0:qe0], k_for_txt, _mask_rows(attn_mask, [(qb0, qe0)]))
    q_vis = torch.cat([qb[:, :, :qb0], qb[:, :, qe0:]], dim=2) if qb0 > 0 else qb[:, :, qe0:]
    o_vis = sdpa(q_vis, k_for_vis, _mask_rows(attn_mask, [(0, qb0), (qe0, Nq)]))
    out = torch.cat([o_vis[:, :, :qb0], o_txt, o_vis[:, :, qb0:]], dim=2)
    return out


# ---------------------------------------------------------------------------------------
# The FP8 forward's arithmetic (``joint_attention(..., fp8=True)``), for its tests and error tables
# ---------------------------------------------------------------------------------------

FP8_MAX = 448.0  # float8 e4m3's largest finite value
FP8_TILE = 128   # tokens per scale block of Q and K (the CUDA kernel's query and key tiles)


class Fp8Inputs(NamedTuple):
    """q, k, v as the FP8 kernel quantizes them, (B, H, N, D) / (B, H_kv, N_k, D) float8_e4m3fn, with
    their scales: q_scale (B, H, ceil(N_q / 128)) and k_scale (B, H_kv, ceil(N_k / 128)) one per 128-token
    tile, v_scale (B, H_kv, D) one per channel. x ~= x8 * scale."""
    q8: torch.Tensor
    q_scale: torch.Tensor
    k8: torch.Tensor
    k_scale: torch.Tensor
    v8: torch.Tensor
    v_scale: torch.Tensor


# Every division and product below is made in float64 and rounded once to float32: the correctly rounded float32
# result (53 >= 2 * 24 + 2 bits, so the double rounding is innocuous), as the CUDA passes compute it (__fdiv_rn,
# __fmul_rn). torch's own float32 division by a scalar may multiply by a rounded reciprocal instead (on CUDA),
# which moves the result by an ulp and flips e4m3 roundings at ties.
def _fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    return torch.where(amax > 0, (amax.double() / FP8_MAX).float(), torch.ones_like(amax))


def _fp8_inv(amax: torch.Tensor) -> torch.Tensor:
    return torch.where(amax > 0, (FP8_MAX / amax.double()).float(), torch.ones_like(amax))


def _fp8_mul(x: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    return (x.double() * inv.double()).float()


def _fp8_round(y: torch.Tensor) -> torch.Tensor:
    return y.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def _fp8_tiles(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    B, H, N, D = x.shape
    T = -(-N // FP8_TILE)
    a = F.pad(x.abs(), (0, 0, 0, T * FP8_TILE - N)).reshape(B, H, T, FP8_TILE * D).amax(-1)
    rows = _fp8_inv(a).repeat_interleave(FP8_TILE, dim=2)[:, :, :N, None]
    return _fp8_round(_fp8_mul(x, rows)), _fp8_scale(a)


def quantize_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str = "bhnd") -> Fp8Inputs:
    """The FP8 kernel's quantization, bit for bit (taca_fwd_sm90_fp8.cuh): per 128-token tile of Q and of K
    (scale = amax / 448, 1 for an all-zero tile) and per channel of V over all keys: x * (448 / amax) in float32,
    rounded to the nearest e4m3. x ~= x8 * scale."""
    qb, kb, vb = (_to_bhnd(t, layout).float() for t in (q, k, v))
    q8, qs = _fp8_tiles(qb)
    k8, ks = _fp8_tiles(kb)
    va = vb.abs().amax(dim=2)
    v8 = _fp8_round(_fp8_mul(vb, _fp8_inv(va)[:, :, None, :]))
    return Fp8Inputs(q8, qs, k8, ks, v8, _fp8_scale(va))


def attention_fp8_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    text_len: SpanLike,
    round_p: bool,
    text_first: bool = True,
    gamma: GammaLike = 1.0,
    gamma_reverse: float = 1.0,
    scale: Optional[float] = None,
    layout: str = "bhnd",
    text_start: Optional[SpanLike] = None,
    query_text_start: Optional[SpanLike] = None,
    query_text_len: Optional[SpanLike] = None,
    logits_dtype: Optional[torch.dtype] = None,
    fp8_matmul: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 attention on the FP8 kernel's quantized inputs (``quantize_fp8``), dequantized: (out, lse,
    text_mass) as ``attention_ref`` returns them. round_p=False: the exact softmax of those inputs, the FP8
    forward's reference. round_p=True: also P = exp(logit - row max) rounded to e4m3 before P V, with the row sum
    taken before rounding, as the kernel does (its max is a running one, tile by tile): a float32 model of the
    kernel's own rounding, the yardstick of its tolerance rule (tests/test_cuda_fp8.py). logits_dtype (round_p
    only): the scaled logits rounded to it before the softmax. fp8_matmul (round_p only; CUDA, sm_89+): Q8 K8^T made by
    the tensor cores' own FP8 product (torch._scaled_mm with fast accumulation, the products the kernel's wgmma
    makes) instead of in float32: its rounding is relative to the largest term of each sum (about 2^-12 of it on an
    H200), not to each logit."""
    f = quantize_fp8(q, k, v, layout)
    B, H, Nq, D = f.q8.shape
    Hkv, Nk = f.k8.shape[1], f.k8.shape[2]
    q_rows = f.q_scale.repeat_interleave(FP8_TILE, dim=2)[:, :, :Nq, None]
    k_rows = f.k_scale.repeat_interleave(FP8_TILE, dim=2)[:, :, :Nk, None]
    span_kw = dict(text_len=text_len, text_first=text_first, gamma=gamma, gamma_reverse=gamma_reverse,
                   scale=scale, text_start=text_start, query_text_start=query_text_start,
                   query_text_len=query_text_len)
    if not round_p:
        out, lse, tm = attention_ref(f.q8.float() * q_rows, f.k8.float() * k_rows, f.v8.float() * f.v_scale[:, :, None, :],
                                     layout="bhnd", upcast=torch.float32, **span_kw)
        return _from_bhnd(out, layout), lse, tm
    rep = lambda x: x if Hkv == H else x.repeat_interleave(H // Hkv, dim=1)  # noqa: E731
    k8, k_rows, v8, vs = rep(f.k8), rep(k_rows), rep(f.v8.float()), rep(f.v_scale)
    s = math.sqrt(1.0 / D) if scale is None else scale
    m = logit_multiplier(Nq, text_len, text_first, gamma, gamma_reverse, B, f.q8.device, torch.float32, n_k=Nk,
                         text_start=text_start, query_text_start=query_text_start, query_text_len=query_text_len)
    if fp8_matmul:
        prod = _fp8_products(f.q8, k8)
    else:
        prod = torch.matmul(f.q8.float(), k8.float().transpose(-1, -2))
    logits = prod * q_rows * k_rows.transpose(-1, -2) * s * m
    if logits_dtype is not None:
        logits = logits.to(logits_dtype).float()
    mx = logits.amax(dim=-1, keepdim=True)
    e = torch.exp(logits - mx)
    total = e.sum(-1, keepdim=True)
    out = torch.matmul(e.to(torch.float8_e4m3fn).float(), v8) * vs[:, :, None, :] / total
    spans = resolve_spans(Nq, Nk, text_len, text_first, text_start, query_text_start, query_text_len)
    k_text = span_masks(spans, B, Nq, Nk, f.q8.device)[1]
    tm = (e * k_text[:, None, None, :].float()).sum(-1) / total.squeeze(-1)
    return _from_bhnd(out, layout), (mx + torch.log(total)).squeeze(-1), tm


def _fp8_products(q8: torch.Tensor, k8: torch.Tensor, fast_accum: bool = True) -> torch.Tensor:
    """q8 k8^T per (batch, head) by torch._scaled_mm, float32 out, fast accumulation by default (the tensor cores'
    own, as the kernel's wgmma accumulates): (B, H, N_q, N_k)."""
    B, H, Nq, _ = q8.shape
    Nk = k8.shape[2]
    pad = lambda x: F.pad(x.view(torch.uint8), (0, 0, 0, (-x.shape[0]) % 16)).view(torch.float8_e4m3fn)  # noqa: E731
    one = torch.ones((), device=q8.device)
    out = torch.empty(B, H, Nq, Nk, device=q8.device)
    for b in range(B):
        for h in range(H):
            r = torch._scaled_mm(pad(q8[b, h]), pad(k8[b, h]).t(), one, one, out_dtype=torch.float32,
                                 use_fast_accum=fast_accum)
            out[b, h] = r[:Nq, :Nk]
    return out
