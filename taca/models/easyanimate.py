"""EasyAnimate (V5 / V5.1): ``EasyAnimateTransformer3DModel``, legacy ``Attention`` modules (``attn1`` of
every block) with ``EasyAnimateAttnProcessor2_0``.

Text first: ``[txt, video]``, layout (B, H, N, D), every block joint. The text is the prompt embedding
(plus the T5 one, concatenated after it, where the model has a second text encoder); MMDiT blocks
(``mmdit_layers``) project it with their own ``add_*_proj``, the others with the shared projections
after concatenation: either way the text keys are the first ``encoder_hidden_states.shape[1]``. RoPE
touches the video tokens only; no mask reaches attention (the blocks pass none), so the pipeline's
padded prompt tokens are text.

The blocks call ``attn1`` without attention kwargs and the transformer's ``forward`` takes none:
``kwargs_name = None``, the hook hands the processors their state (:meth:`TacaProcessor.call_arg`).
The timestep: ``EasyAnimatePipeline`` samples with ``FlowMatchEulerDiscreteScheduler`` and passes its
t = 1000 sigma (``timestep = "t1000"``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..processors import TacaProcessor
from . import Adapter, register


class TacaEasyAnimateAttnProcessor(TacaProcessor):
    """TACA for EasyAnimate's ``attn1``: the computation of ``EasyAnimateAttnProcessor2_0`` (shared or
    MMDiT projections), gamma from the hook's per-call state; returns ``(video, txt)``."""

    text_first = True
    layout = "bhnd"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        image_rotary_emb: Optional[torch.Tensor] = None,
    ):
        if attn.add_q_proj is None and encoder_hidden_states is not None:
            hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        query = query.unflatten(2, (attn.heads, -1)).transpose(1, 2)
        key = key.unflatten(2, (attn.heads, -1)).transpose(1, 2)
        value = value.unflatten(2, (attn.heads, -1)).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            encoder_query = attn.add_q_proj(encoder_hidden_states)
            encoder_key = attn.add_k_proj(encoder_hidden_states)
            encoder_value = attn.add_v_proj(encoder_hidden_states)

            encoder_query = encoder_query.unflatten(2, (attn.heads, -1)).transpose(1, 2)
            encoder_key = encoder_key.unflatten(2, (attn.heads, -1)).transpose(1, 2)
            encoder_value = encoder_value.unflatten(2, (attn.heads, -1)).transpose(1, 2)

            if attn.norm_added_q is not None:
                encoder_query = attn.norm_added_q(encoder_query)
            if attn.norm_added_k is not None:
                encoder_key = attn.norm_added_k(encoder_key)

            query = torch.cat([encoder_query, query], dim=2)
            key = torch.cat([encoder_key, key], dim=2)
            value = torch.cat([encoder_value, value], dim=2)

        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query[:, :, encoder_hidden_states.shape[1]:] = apply_rotary_emb(
                query[:, :, encoder_hidden_states.shape[1]:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, encoder_hidden_states.shape[1]:] = apply_rotary_emb(
                    key[:, :, encoder_hidden_states.shape[1]:], image_rotary_emb)

        out = None
        if encoder_hidden_states is not None:
            out = self.taca_attention(query, key, value, encoder_hidden_states.shape[1], self.call_arg("taca_gamma"),
                                      attention_mask)
        if out is None:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                 is_causal=False)
        hidden_states = out.transpose(1, 2).flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = (
                hidden_states[:, : encoder_hidden_states.shape[1]],
                hidden_states[:, encoder_hidden_states.shape[1]:],
            )
            if getattr(attn, "to_out", None) is not None:
                hidden_states = attn.to_out[0](hidden_states)
                hidden_states = attn.to_out[1](hidden_states)
            if getattr(attn, "to_add_out", None) is not None:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        else:
            if getattr(attn, "to_out", None) is not None:
                hidden_states = attn.to_out[0](hidden_states)
                hidden_states = attn.to_out[1](hidden_states)
        return hidden_states, encoder_hidden_states


@register
class EasyAnimateAdapter(Adapter):
    name = "easyanimate"
    label = "EasyAnimateTransformer3DModel (EasyAnimate)"
    transformer_classes = ("EasyAnimateTransformer3DModel",)
    stock_processors = frozenset({"EasyAnimateAttnProcessor2_0"})
    timestep = "t1000"  # the pipeline passes the flow-matching scheduler's t = 1000 sigma
    kwargs_name = None
    # video: EasyAnimate*Pipeline are supported through taca.enable(pipe) only (taca generate writes images)
    pipelines = ()

    def processor(self, name, module):
        return TacaEasyAnimateAttnProcessor(name)
