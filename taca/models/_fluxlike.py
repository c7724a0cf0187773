"""The TACA processor of FLUX.1's ``FluxAttnProcessor`` and of its clones (LongCat-Image, Ovis-Image, Bria,
Bria FIBO).

Each of these model files carries its own copy of ``FluxAttnProcessor`` (``LongCatImageAttnProcessor``,
``OvisImageAttnProcessor``, ``BriaAttnProcessor``, ``BriaFiboAttnProcessor``) with its own
``_get_qkv_projections``. One difference can change bits: FLUX.1's and FIBO's double-stream
processors make the attention output contiguous before the output projections, the others do not
(``contiguous_out``). :class:`TacaFluxLikeProcessor` runs the stock processor's own steps op for op,
with that model file's ``_get_qkv_projections``, ``apply_rotary_emb`` and ``dispatch_attention_fn``.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from ..processors import TacaProcessor


class TacaFluxLikeProcessor(TacaProcessor):
    """TACA for a FLUX.1-clone attention module: text first ([txt, img, ...]), layout (B, N, H, D).

    ``model_module``: the diffusers model file whose processor this copies; ``contiguous_out``: the
    stock processor calls ``.contiguous()`` on the attention output before ``to_out`` /
    ``to_add_out`` (FIBO's double-stream one); ``from_state``: the model's forward carries no
    attention kwargs to the processors, so ``taca_gamma`` / ``taca_text_len`` come from
    :meth:`call_arg`. Double-stream modules (``encoder_hidden_states`` given) return
    ``(img, txt)``; single-stream ones get the joint sequence and return it. ``taca_token_mask`` (Chroma's
    adapter injects it): the transformer's (B, N) mask whose outer product the blocks pass as ``attention_mask``.
    """

    text_first = True
    layout = "bnhd"

    def __init__(self, name: str, model_module: str, contiguous_out: bool = False, from_state: bool = False, **kw):
        super().__init__(name, **kw)
        self.model_module = model_module
        self.contiguous_out = contiguous_out
        self.from_state = from_state
        self._mod = importlib.import_module(model_module)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        image_rotary_emb=None,
        taca_gamma: Optional[torch.Tensor] = None,
        taca_text_len: Optional[int] = None,
        taca_token_mask: Optional[torch.Tensor] = None,
    ):
        mod = self._mod
        if self.from_state:
            taca_gamma = self.call_arg("taca_gamma")
            taca_text_len = self.call_arg("taca_text_len")
        query, key, value, encoder_query, encoder_key, encoder_value = mod._get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = query.unflatten(-1, (attn.heads, -1))
        key = key.unflatten(-1, (attn.heads, -1))
        value = value.unflatten(-1, (attn.heads, -1))
        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (attn.heads, -1))
            encoder_key = encoder_key.unflatten(-1, (attn.heads, -1))
            encoder_value = encoder_value.unflatten(-1, (attn.heads, -1))
            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        if image_rotary_emb is not None:
            query = mod.apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = mod.apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        text_len = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else taca_text_len
        hidden_states = self.taca_attention(query, key, value, text_len, taca_gamma, attention_mask,
                                            token_mask=taca_token_mask)
        if hidden_states is None:
            # parallel_config only where set: dispatch_attention_fn has it since diffusers 0.36 (FLUX.1's
            # processor is supported from 0.35)
            extra = {} if self._parallel_config is None else {"parallel_config": self._parallel_config}
            hidden_states = mod.dispatch_attention_fn(
                query, key, value, attn_mask=attention_mask, backend=self._attention_backend, **extra
            )
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            if self.contiguous_out:
                hidden_states = hidden_states.contiguous()
                encoder_hidden_states = encoder_hidden_states.contiguous()
            hidden_states = attn.to_out[0](hidden_states)
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
            return hidden_states, encoder_hidden_states
        return hidden_states
