"""FLUX.2 (dev, klein): ``Flux2Transformer2DModel``.

Double-stream blocks: ``Flux2Attention`` with ``Flux2AttnProcessor``; single-stream blocks:
``Flux2ParallelSelfAttention`` with ``Flux2ParallelSelfAttnProcessor`` (QKV and the MLP input in
one projection, attention output and MLP output in one). Text first ([txt, img], layout
(B, N, H, D)); edit reference latents are appended after the image (``[txt, img, ref]``): they
are visual tokens, so gamma applies to their queries on text keys. The single-stream processor
sees only the joint sequence: the hook injects ``taca_text_len``. The transformer takes sigma in
[0, 1] (the pipelines pass ``t / 1000`` in the latents' dtype).

Klein-KV (``Flux2KleinKVPipeline``) installs ``Flux2KVAttnProcessor`` /
``Flux2KVParallelSelfAttnProcessor``: its cached steps attend [txt, img] queries to
[txt, ref, img] keys, which needs different query and key text spans; ``taca.enable`` refuses
them (TypeError) rather than run them without their cache.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..processors import TacaProcessor
from . import Adapter, register

_KV = frozenset({"Flux2KVAttnProcessor", "Flux2KVParallelSelfAttnProcessor"})


def _dispatch(self, query, key, value, attention_mask):
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    return dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                                 parallel_config=self._parallel_config)


class TacaFlux2AttnProcessor(TacaProcessor):
    """TACA for ``Flux2Attention`` (double-stream): returns ``(img, txt)``, as stock."""

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
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux2 import _get_qkv_projections

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
            hidden_states = _dispatch(self, query, key, value, attention_mask)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class TacaFlux2ParallelSelfAttnProcessor(TacaProcessor):
    """TACA for ``Flux2ParallelSelfAttention`` (single-stream): the text length comes from the
    hook (``taca_text_len``)."""

    text_first = True
    layout = "bnhd"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        image_rotary_emb=None,
        taca_gamma: Optional[torch.Tensor] = None,
        taca_text_len: Optional[int] = None,
    ):
        from diffusers.models.embeddings import apply_rotary_emb

        hidden_states = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = hidden_states.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp_hidden_states = torch.split(hidden_states, [local_qkv, hidden_states.shape[-1] - local_qkv], dim=-1)
        query, key, value = qkv.chunk(3, dim=-1)
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = self.taca_attention(query, key, value, taca_text_len, taca_gamma, attention_mask)
        if hidden_states is None:
            hidden_states = _dispatch(self, query, key, value, attention_mask)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        mlp_hidden_states = attn.mlp_act_fn(mlp_hidden_states)
        hidden_states = torch.cat([hidden_states, mlp_hidden_states], dim=-1)
        hidden_states = attn.to_out(hidden_states)
        return hidden_states


@register
class Flux2Adapter(Adapter):
    name = "flux2"
    label = "Flux2Transformer2DModel (FLUX.2 dev, klein)"
    transformer_classes = ("Flux2Transformer2DModel",)
    stock_processors = frozenset({"Flux2AttnProcessor", "Flux2ParallelSelfAttnProcessor"})
    timestep = "sigma"
    # diffusers 0.42.1: _current_timestep = t, then timestep = t.expand(B).to(latents.dtype) / 1000
    current_t_pipelines = frozenset({"Flux2Pipeline", "Flux2KleinPipeline", "Flux2KleinInpaintPipeline"})
    pipelines = ("Flux2Pipeline", "Flux2KleinPipeline")

    def processor(self, name, module):
        from diffusers.models.transformers.transformer_flux2 import Flux2ParallelSelfAttention

        if isinstance(module, Flux2ParallelSelfAttention):
            return TacaFlux2ParallelSelfAttnProcessor(name)
        return TacaFlux2AttnProcessor(name)

    def check_processor(self, name, module):
        cls = type(module.processor).__name__
        if cls in _KV:
            raise TypeError(
                f"taca: {name} uses {cls} (Flux2KleinKVPipeline's KV cache); TACA does not support the KV-cache "
                f"processors yet (their cached steps attend [txt, img] queries to [txt, ref, img] keys); use "
                f"Flux2KleinPipeline, or restore the stock processors and run without kv_cache_mode"
            )
        super().check_processor(name, module)

    def call_state(self, arg):
        mode = arg("kv_cache_mode")
        if mode is not None:
            raise ValueError(f"taca: kv_cache_mode={mode!r} (Klein-KV) is not supported with TACA on")
        return super().call_state(arg)
