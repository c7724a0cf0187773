"""Ideogram 4: ``Ideogram4Transformer2DModel``, ``Ideogram4Attention`` modules with
``Ideogram4AttnProcessor``.

One packed sequence per row, every block joint (self-attention over it): ``Ideogram4Pipeline``
builds, per sample, ``[left pad (max_sequence_length - n_b), text (n_b), image]``; the roles come
from the forward's ``indicator`` (3 = text, 2 = image, 0 = padding) and the attention mask from its
``segment_ids`` (bool (B, 1, N, N), True where two tokens share a segment id: the pipeline gives text
and image segment 1 and the padding -1, so the padding attends only to itself). Text keys of row b
are the positions where ``indicator == 3``: ``[first_b, first_b + n_b)``, a per-sample span
(``taca.joint_attention(text_start=, text_len=)``, (B,) tensors when the rows differ); the stock
block-diagonal mask is passed as is (after scale and gamma, as SDPA applies it). Image queries of
the text's segment get gamma on its keys; the padding's queries cannot see text (other segment),
so scaling their text logits changes nothing.

The adapter checks, per call, what makes that exact and refuses the rest before any attention runs
(ValueError): the text of a row must be one contiguous span in one segment, and no token that is
neither text nor image (padding) may share that segment (it would be a non-visual query seeing
text). Packed rows holding several prompts (several text spans) are refused.

The pipeline's unconditional pass (``unconditional_transformer``, a second model) is image only:
``indicator`` has no text token, so there is nothing to scale; ``taca.enable(pipe)`` serves
``pipe.transformer`` only, and a transformer called without text (or a row without text in a
batch with text: text_len 0) runs stock attention there.

``taca generate``: ``--guidance`` sets a constant ``guidance_scale`` (the pipeline's default
per-step ``guidance_schedule`` is dropped, as the pipeline requires); ``--steps`` alone stretches
the default schedule (7.0, then 3.0 for the last 3 steps). The pipeline takes no negative prompt.

Timestep: the transformer takes model time ``1 - sigma`` (0 = noise; the pipeline passes
``1 - t / 1000`` in the transformer's dtype), one per sample; a per-token (B, L) timestep is
refused. The blocks forward no attention kwargs: the hook hands the processors their state.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..processors import TacaProcessor
from . import Adapter, register

_TEXT = 3  # LLM_TOKEN_INDICATOR
_IMAGE = 2  # OUTPUT_IMAGE_INDICATOR


class TacaIdeogram4AttnProcessor(TacaProcessor):
    """TACA for Ideogram 4's attention: ``Ideogram4AttnProcessor`` op for op (split Q/K/V, q/k
    RMSNorm, MRoPE), the stock segment mask kept, per-sample text spans from :attr:`taca_call`."""

    text_first = True
    layout = "bnhd"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        image_rotary_emb: Tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_ideogram4 import _rotate_half

        query = attn.to_q(hidden_states).unflatten(-1, (attn.num_heads, attn.head_dim))
        key = attn.to_k(hidden_states).unflatten(-1, (attn.num_heads, attn.head_dim))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.num_heads, attn.head_dim))

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        cos, sin = image_rotary_emb
        cos = cos.unsqueeze(2)
        sin = sin.unsqueeze(2)
        query = (query * cos) + (_rotate_half(query) * sin)
        key = (key * cos) + (_rotate_half(key) * sin)

        out = self.taca_attention(query, key, value, self.call_arg("taca_text_len"), self.call_arg("taca_gamma"),
                                  attention_mask, text_start=self.call_arg("taca_text_start"))
        if out is None:
            out = dispatch_attention_fn(
                query,
                key,
                value,
                attn_mask=attention_mask,
                backend=self._attention_backend,
                parallel_config=self._parallel_config,
            )
        hidden_states = out.flatten(2, 3)
        return attn.to_out[0](hidden_states)


def text_spans(indicator: torch.Tensor, segment_ids: torch.Tensor) -> Tuple[Optional[object], Optional[object]]:
    """(text_start, text_len) of each row of an Ideogram 4 packed batch: ints when every row has the
    same span, (B,) int64 tensors on the indicator's device otherwise; (None, None) when no row has
    text. Raises ValueError for layouts TACA cannot scale exactly (see the module docstring). One
    host read."""
    if indicator.dim() != 2 or segment_ids.shape != indicator.shape:
        raise ValueError(f"taca: Ideogram4Transformer2DModel: indicator {tuple(indicator.shape)} and segment_ids "
                         f"{tuple(segment_ids.shape)} must both be (batch, sequence)")
    text = indicator == _TEXT
    B, N = text.shape
    idx = torch.arange(N, device=text.device)
    count = text.sum(1)
    first = torch.where(text, idx, N).amin(1)
    last = torch.where(text, idx, -1).amax(1)
    seg = segment_ids.to(torch.int64)
    lo = torch.iinfo(torch.int64)
    seg_hi = torch.where(text, seg, lo.min).amax(1)
    seg_lo = torch.where(text, seg, lo.max).amin(1)
    other = ~text & (indicator != _IMAGE)
    sees_text = (other & (seg == seg_hi[:, None])).any(1)
    has = count > 0
    info = torch.stack([count, first, last - first + 1, (seg_hi == seg_lo).to(torch.int64),
                        sees_text.to(torch.int64), has.to(torch.int64)]).tolist()  # the one host read
    count_h, first_h, extent_h, one_seg_h, sees_h, has_h = info
    for b in range(B):
        if not has_h[b]:
            continue
        if extent_h[b] != count_h[b]:
            raise ValueError(
                f"taca: Ideogram4Transformer2DModel: row {b} has {count_h[b]} text tokens (indicator == 3) spread over "
                f"{extent_h[b]} positions; TACA needs each row's text to be one contiguous span (the pipeline's "
                f"[left pad, text, image] layout); packed rows with several prompts are not supported"
            )
        if not one_seg_h[b]:
            raise ValueError(
                f"taca: Ideogram4Transformer2DModel: row {b}'s text tokens lie in more than one segment (segment_ids); "
                f"TACA supports one prompt per row (the pipeline's layout)"
            )
        if sees_h[b]:
            raise ValueError(
                f"taca: Ideogram4Transformer2DModel: in row {b}, tokens that are neither text nor image (indicator "
                f"not 3 or 2) share the text's segment and so attend to the text; TACA scales visual queries only "
                f"and cannot tell their role: give padding its own segment id (the pipeline uses -1)"
            )
    if not any(has_h):
        return None, None
    starts = [first_h[b] if has_h[b] else 0 for b in range(B)]
    if len(set(starts)) == 1 and len(set(count_h)) == 1:
        return starts[0], count_h[0]
    dev = indicator.device
    return (torch.tensor(starts, dtype=torch.int64, device=dev), torch.tensor(count_h, dtype=torch.int64, device=dev))


@register
class Ideogram4Adapter(Adapter):
    name = "ideogram4"
    label = "Ideogram4Transformer2DModel (Ideogram 4)"
    transformer_classes = ("Ideogram4Transformer2DModel",)
    stock_processors = frozenset({"Ideogram4AttnProcessor"})
    timestep = "1-sigma"
    kwargs_name = None  # the blocks forward no attention kwargs to the processors
    pipeline_t_is_1000_sigma = False  # Ideogram4Pipeline sets no _current_timestep
    pipelines = ("Ideogram4Pipeline",)
    negative_prompt = False  # the unconditional branch is a second, text-free transformer
    max_sequence_length = 2048

    def processor(self, name, module):
        return TacaIdeogram4AttnProcessor(name)

    @classmethod
    def generate_call(cls, call):
        """Ideogram4Pipeline takes a constant ``guidance_scale`` OR a per-step ``guidance_schedule``
        (default: 7.0 for 45 steps, 3.0 for the last 3 of 48) and raises on both, or on a schedule
        whose length is not the step count: ``--guidance G`` makes the schedule None (G at every
        step); ``--steps N`` alone keeps the default's shape, 7.0 then 3.0 for the last 3 steps
        (all 7.0 when N <= 3)."""
        call = dict(call)
        if "guidance_scale" in call:
            call["guidance_schedule"] = None
        elif "num_inference_steps" in call:
            n = int(call["num_inference_steps"])
            polish = 3 if n > 3 else 0
            call["guidance_schedule"] = (7.0,) * (n - polish) + (3.0,) * polish
        return call

    def call_state(self, arg):
        ind, seg, ts = arg("indicator"), arg("segment_ids"), arg("timestep")
        if ind is None or seg is None:
            raise ValueError("taca: Ideogram4Transformer2DModel was called without indicator or segment_ids")
        if isinstance(ts, torch.Tensor) and ts.dim() > 1 and ts.numel() != ts.shape[0]:
            raise NotImplementedError(
                f"taca: Ideogram4Transformer2DModel: a per-token timestep {tuple(ts.shape)} is not supported with TACA "
                f"on (gamma follows one sigma per sample); pass one timestep per sample, shape (batch,), as "
                f"Ideogram4Pipeline does"
            )
        start, length = text_spans(ind, seg)
        return {"taca_text_len": length, "taca_text_start": start}
