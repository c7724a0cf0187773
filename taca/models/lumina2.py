"""Lumina-Image 2.0: ``Lumina2Transformer2DModel``, legacy ``Attention`` modules with
``Lumina2AttnProcessor2_0``.

Joint blocks: ``layers.*.attn``; the ``context_refiner`` (text only) and ``noise_refiner`` (image
only) blocks share the processor class and keep their stock processors. Per sample, the joint
sequence is ``[valid caption (cap_len[b]), img]``, right-padded to the batch's longest, layout
(B, N, H, D): the caption's padded tokens are DROPPED before the joint blocks (only the first
``encoder_attention_mask[b].sum()`` caption tokens are copied in), so sample b's text keys are
``[0, cap_len[b])``. When the lengths differ within the batch the model passes a bool key mask
(B, 1, 1, N) removing each sample's tail padding; it is kept as is. With one length for the
whole batch text_len is an int; with different lengths it is a (B,) tensor (per-sample spans of
``taca.joint_attention``).

Grouped-query attention (24 q / 8 kv heads in the checkpoint): the stock processor repeats K and V to
the query heads before SDPA, and so does TACA (exact). The softmax scale is the stock one
(``attn.scale``, or the proportional-attention scale when ``base_sequence_length`` is passed). The
blocks pass no attention kwargs: the hook hands the state to the processors. The transformer takes
the REVERSED time 1 - sigma (the pipeline passes ``(1 - t / 1000).expand(B)``).
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from ..processors import TacaProcessor
from . import Adapter, attention_modules, register


class TacaLumina2AttnProcessor(TacaProcessor):
    """TACA for Lumina 2's joint ``attn``: same computation as ``Lumina2AttnProcessor2_0``."""

    text_first = True
    layout = "bhnd"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        image_rotary_emb: Optional[torch.Tensor] = None,
        base_sequence_length: Optional[int] = None,
    ) -> torch.Tensor:
        from diffusers.models.embeddings import apply_rotary_emb

        batch_size, sequence_length, _ = hidden_states.shape

        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        query_dim = query.shape[-1]
        inner_dim = key.shape[-1]
        head_dim = query_dim // attn.heads
        dtype = query.dtype
        kv_heads = inner_dim // head_dim

        query = query.view(batch_size, -1, attn.heads, head_dim)
        key = key.view(batch_size, -1, kv_heads, head_dim)
        value = value.view(batch_size, -1, kv_heads, head_dim)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, use_real=False)
            key = apply_rotary_emb(key, image_rotary_emb, use_real=False)

        query, key = query.to(dtype), key.to(dtype)

        if base_sequence_length is not None:
            softmax_scale = math.sqrt(math.log(sequence_length, base_sequence_length)) * attn.scale
        else:
            softmax_scale = attn.scale

        n_rep = attn.heads // kv_heads
        if n_rep >= 1:
            key = key.unsqueeze(3).repeat(1, 1, 1, n_rep, 1).flatten(2, 3)
            value = value.unsqueeze(3).repeat(1, 1, 1, n_rep, 1).flatten(2, 3)

        if attention_mask is not None:
            attention_mask = attention_mask.bool().view(batch_size, 1, 1, -1)

        query = query.transpose(1, 2)
        key = key.transpose(1, 2)
        value = value.transpose(1, 2)

        out = self.taca_attention(query, key, value, self.call_arg("taca_text_len"), self.call_arg("taca_gamma"),
                                  attention_mask, scale=softmax_scale)
        if out is None:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=softmax_scale)
        hidden_states = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.type_as(query)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


@register
class Lumina2Adapter(Adapter):
    name = "lumina2"
    label = "Lumina2Transformer2DModel (Lumina-Image 2.0)"
    transformer_classes = ("Lumina2Transformer2DModel",)
    stock_processors = frozenset({"Lumina2AttnProcessor2_0"})
    timestep = "1-sigma"
    kwargs_name = None  # the blocks forward no attention kwargs to the processors
    pipeline_t_is_1000_sigma = False  # _current_timestep is not set by Lumina2Pipeline
    pipelines = ("Lumina2Pipeline",)
    negative_prompt = True
    max_sequence_length = 256

    def joint_modules(self) -> Dict[str, torch.nn.Module]:
        return {n: m for n, m in attention_modules(self.transformer).items() if n.startswith("layers.")}

    def processor(self, name, module):
        return TacaLumina2AttnProcessor(name)

    def call_state(self, arg):
        mask = arg("encoder_attention_mask")
        ehs = arg("encoder_hidden_states")
        if mask is None or ehs is None:
            raise ValueError("taca: Lumina2Transformer2DModel was called without encoder_hidden_states or "
                             "encoder_attention_mask")
        lens = mask.sum(dim=1)
        host = lens.tolist()  # the model does the same (rope_embedder): one host read per call
        if len(set(host)) == 1:
            return {"taca_text_len": int(host[0])}
        return {"taca_text_len": lens.to(torch.int64)}
