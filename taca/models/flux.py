"""FLUX.1 and FLUX.1 Kontext: ``FluxTransformer2DModel``, ``FluxAttention`` modules.

Text first ([txt, img], Kontext's conditioning tokens after the image are visual tokens), layout
(B, N, H, D). Double-stream blocks know the text length from ``encoder_hidden_states``; single-
stream blocks see the joint sequence and get ``taca_text_len`` from the hook. The transformer
takes sigma in [0, 1] (the pipelines pass ``t / 1000`` in the latents' dtype).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..processors import TacaProcessor
from . import Adapter, register


class TacaFluxAttnProcessor(TacaProcessor):
    """TACA for ``FluxAttention`` (FLUX.1, FLUX Kontext, Chroma): text first, layout (B, N, H, D).

    Double-stream blocks (``encoder_hidden_states`` given) return ``(img, txt)``; single-stream
    blocks get the joint sequence and return it. QKV projections go through diffusers' own
    ``_get_qkv_projections`` (so ``fuse_qkv_projections`` works); QK RMSNorm and RoPE as stock.
    An attention mask (Chroma's additive one) is passed on as the stock processor passes it.
    """

    text_first = True
    layout = "bnhd"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        image_rotary_emb=None,
        taca_gamma: Optional[torch.Tensor] = None,
        taca_text_len: Optional[int] = None,
    ):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        text_len = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else taca_text_len
        hidden_states = self.taca_attention(query, key, value, text_len, taca_gamma, attention_mask)
        if hidden_states is None:
            # parallel_config only where set: dispatch_attention_fn has it since diffusers 0.36
            extra = {} if self._parallel_config is None else {"parallel_config": self._parallel_config}
            hidden_states = dispatch_attention_fn(
                query, key, value, attn_mask=attention_mask, backend=self._attention_backend, **extra
            )
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


@register
class FluxAdapter(Adapter):
    name = "flux"
    label = "FluxTransformer2DModel (FLUX.1, FLUX Kontext)"
    transformer_classes = ("FluxTransformer2DModel",)
    stock_processors = frozenset({"FluxAttnProcessor", "FluxAttnProcessor2_0", "FusedFluxAttnProcessor2_0"})
    timestep = "sigma"
    # diffusers 0.42.1: these set self._current_timestep = t, then call the transformer with
    # timestep = t.expand(B).to(latents.dtype) / 1000
    current_t_pipelines = frozenset({"FluxPipeline", "FluxKontextPipeline", "FluxKontextInpaintPipeline"})
    pipelines = ("FluxPipeline", "FluxKontextPipeline")

    @classmethod
    def serves_pipeline(cls, name):
        return name.startswith("Flux") and not name.startswith("Flux2")  # FluxImg2Img, Fill, Control, ...

    def processor(self, name, module):
        return TacaFluxAttnProcessor(name)
