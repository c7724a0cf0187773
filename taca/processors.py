"""The model-independent half of every TACA attention processor.

A family's processor (in ``taca/models/<family>.py``) reproduces its stock processor's q/k/v
preparation (projections, QK-norm, RoPE, concatenation) and output projection, op for op, and
asks :meth:`TacaProcessor.taca_attention` for the attention in between. That helper decides:

- ``taca_gamma`` None (no sample of the batch is in the gamma window) and no telemetry recorder:
  it returns None and the caller runs its STOCK attention call, op for op (bit-identical to
  diffusers' own processor, no extra cost);
- otherwise ``taca.joint_attention`` with gamma ((B,) float32; ones where TACA is off but a
  recorder is active), and, while a recorder is active (``taca.telemetry.active()``),
  ``return_lse=True, return_text_mass=True`` and an :class:`~taca.telemetry.AttentionEvent`.

Per-call state arrives through the transformer's attention kwargs, injected by the forward
pre-hook of ``taca.enable`` (what the model's adapter computes from the transformer's inputs):

- ``taca_gamma``: (B,) float32 tensor on the device, or None.
- ``taca_text_len``: the number of text tokens of the joint sequence (single-stream blocks see
  only the joint sequence, so they need it; double-stream blocks use
  ``encoder_hidden_states.shape[1]``).

Models whose forward carries no attention kwargs to the processors (adapter ``kwargs_name``
None) get the same state in :attr:`TacaProcessor.taca_call` (read with :meth:`TacaProcessor.call_arg`),
set by the hook before every transformer call and cleared by a forward hook after it. A block
recomputed by gradient checkpointing in the backward pass would find that state gone, so the hook
refuses such models with gradient checkpointing on while autograd records.

Image-only queries (PRX, NucleusMoE: N_q != N_k): ``text_len`` / ``text_start`` give the text KEYS,
and no query is text (``taca.joint_attention``'s default when N_q != N_k).

Per-sample text spans (Z-Image, Lumina 2, AuraFlow's text after its registers):
``taca_attention(..., text_start=)`` with ``text_len`` and ``text_start`` ints or (B,) integer
tensors, passed to ``taca.joint_attention(text_start=, text_len=)``.

Masks: a mask the stock processor passes to attention is passed to ``taca.joint_attention`` as
``attn_mask`` (bool: True = attend; float: added to the logits after scale and gamma, as SDPA adds
it).

The processors' parameters are named (diffusers drops kwargs that the processor's ``__call__``
does not name) and never called ``scale`` (reserved for the LoRA scale).
"""
from __future__ import annotations

import collections
import math
import threading
import weakref
from typing import Optional

import torch

from . import ops, telemetry
from .ops import joint_attention


class TacaProcessor:
    """Base class of the TACA processors: one instance per attention module.

    ``text_first``: text tokens are the first ``text_len`` of the sequence (else the last).
    ``layout``: how the subclass's q, k, v are laid out, "bnhd" (B, N, H, D) or "bhnd".
    """

    _attention_backend = None
    _parallel_config = None
    text_first: bool = True
    layout: str = "bnhd"
    # models without attention kwargs (adapter kwargs_name None): the hook's state for the current
    # transformer call ({"taca_gamma": ..., "taca_text_len": ..., ...}), None outside a call
    taca_call: Optional[dict] = None
    # taca.joint_attention's deterministic (set by taca.enable): False = unordered dQ atomics on CUDA
    deterministic: bool = True
    # taca.enable(fp8=True): every call with text (gamma on or off) through joint_attention(fp8=True)
    fp8: bool = False

    def call_arg(self, name: str, default=None):
        """One value of the hook's state for the current call (kwargs-less models)."""
        c = self.taca_call
        return default if c is None else c.get(name, default)

    def __init__(self, name: str, gamma_reverse: float = 1.0, backend: str = "auto"):
        self.name = name
        self.gamma_reverse = float(gamma_reverse)
        self.backend = backend

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, gamma_reverse={self.gamma_reverse}, backend={self.backend!r})"

    def taca_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        text_len: Optional[int],
        gamma: Optional[torch.Tensor],
        attn_mask: Optional[torch.Tensor] = None,
        *,
        text_start=None,
        scale: Optional[float] = None,
        query_text_start=None,
        query_text_len=None,
        token_mask: Optional[torch.Tensor] = None,
    ) -> Optional[torch.Tensor]:
        """TACA attention of q, k, v (in ``self.layout``), or None: then the caller runs its stock
        attention call. ``text_len`` None means the call has no text (plain attention: stock).

        ``text_len`` / ``text_start``: an int, or a (B,) integer tensor (per-sample text spans);
        text keys (and text queries) of sample b are [text_start[b], text_start[b] + text_len[b]).
        ``text_start`` None: the first (``text_first``) or last ``text_len`` tokens. ``scale``: the
        stock processor's softmax scale (default 1/sqrt(D)). ``query_text_start`` /
        ``query_text_len``: the text QUERIES when they are not the key span (cached keys: FLUX.2
        Klein-KV's [txt, img] queries on [txt, ref, img] keys, GLM-Image's [txt, img] queries on
        [cond-image cache, txt, img] keys), passed on to ``taca.joint_attention``. ``token_mask``: the
        (B, N) token mask this module's ``attn_mask`` is the outer product of (Chroma's blocks build it
        from the transformer's mask; CogView4's and GLM-Image's from their text mask): the op then takes
        the mask as a key mask without reading it in every block (``ops._outer_hint``; on the devices
        of ``ops._MASK_ROUTES``: CUDA)."""
        record = telemetry.active() and text_len is not None
        if (gamma is None and not record and not self.fp8) or text_len is None:
            return None
        # text keys lie in the KEY sequence (image-only queries, PRX / NucleusMoE: N_q != N_k)
        N = k.shape[1] if self.layout == "bnhd" else k.shape[2]
        N_q = q.shape[1] if self.layout == "bnhd" else q.shape[2]
        spans = text_start is not None or isinstance(text_len, torch.Tensor)
        if not isinstance(text_len, torch.Tensor) and text_len > N:
            raise ValueError(f"taca: {self.name}: taca_text_len={text_len} exceeds sequence length {N}")
        if record and N_q != N:
            raise NotImplementedError(
                f"taca: {self.name}: telemetry events describe one token sequence for queries and keys; this "
                + (f"call's queries attend cached keys as well ({N_q} queries, {N} keys)"
                   if query_text_len is not None else
                   f"model's queries are the image tokens only ({N_q} queries, {N} keys)")
                + " and cannot be recorded yet"
            )
        if self._parallel_config is not None:
            raise NotImplementedError(
                f"taca: {self.name}: context parallelism is not supported while gamma is on"
            )
        extra = {}
        if attn_mask is not None:
            extra["attn_mask"] = attn_mask
            if token_mask is not None and attn_mask.device.type in ops._MASK_ROUTES:
                ops._outer_hint(attn_mask, token_mask, self.name.split(".")[0])
        if query_text_start is not None or query_text_len is not None:
            extra["query_text_start"] = query_text_start
            extra["query_text_len"] = query_text_len
        if spans:
            extra["text_start"] = text_start
            if record:
                raise NotImplementedError(
                    f"taca: {self.name}: telemetry events describe text as the first or last text_len tokens; "
                    f"this model's text spans (text_start={_short(text_start)}, text_len={_short(text_len)}) "
                    f"cannot be recorded yet"
                )
        B = q.shape[0]
        if gamma is None:
            gamma = torch.ones(B, device=q.device, dtype=torch.float32)
        if scale is None:
            scale = 1.0 / math.sqrt(q.shape[-1])
        kw = dict(text_len=text_len, text_first=self.text_first, gamma=gamma, gamma_reverse=self.gamma_reverse,
                  scale=scale, layout=self.layout, backend=self.backend, deterministic=self.deterministic,
                  fp8=self.fp8, **extra)
        if not record:
            return joint_attention(q, k, v, **kw)
        out, lse, text_mass = joint_attention(q, k, v, return_lse=True, return_text_mass=True, **kw)
        qb, kb = (q, k) if self.layout == "bhnd" else (q.transpose(1, 2), k.transpose(1, 2))
        telemetry.emit(telemetry.AttentionEvent(
            name=self.name, q=qb, k=kb, lse=lse, text_mass=text_mass, text_len=int(text_len),
            text_first=self.text_first, gamma=gamma.to(torch.float32), gamma_reverse=self.gamma_reverse,
            scale=scale, attn_mask=attn_mask,
        ))
        return out


def _short(x):
    return x.tolist() if isinstance(x, torch.Tensor) else x


# CogView4's and GLM-Image's processors build, in every block, the float 0/1 matrix ((mix @ mix^T) > 0) with
# mix = [text mask, ones over the image] from the transformer's (B, T) text mask: the outer product of the token mask
# m = mix > 0. The processors name m (``taca_attention(token_mask=)``) so that the op checks the first such matrix of
# a call and takes the others (``ops._outer_hint``); m must be ONE tensor across the blocks, so it is kept here per
# (text mask, image length, device), holding a weak reference to the text mask.
_JOINT_TOKEN_MASKS: "collections.OrderedDict" = collections.OrderedDict()
_JOINT_TOKEN_MASKS_LOCK = threading.Lock()


def joint_token_mask(text_mask: torch.Tensor, n_image: int, device) -> torch.Tensor:
    """The (B, T + n_image) bool token mask [text_mask > 0, True...] on ``device`` for a (B, T) ``text_mask``: the
    same tensor for every call with the same (unchanged) text mask, image length and device."""
    key = ops._tensor_key(text_mask) + (int(n_image), torch.device(device))
    hit = ops._cache_get(_JOINT_TOKEN_MASKS, _JOINT_TOKEN_MASKS_LOCK, key)
    if hit is not None and hit[0]() is text_mask:
        return hit[1]
    txt = text_mask.to(device=device, dtype=torch.float32) > 0
    m = torch.cat([txt, txt.new_ones(txt.shape[0], int(n_image))], dim=1)
    ops._cache_put(_JOINT_TOKEN_MASKS, _JOINT_TOKEN_MASKS_LOCK, key, (weakref.ref(text_mask), m),
                   ops._OUTER_MASKS_MAX)
    return m
