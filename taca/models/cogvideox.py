"""CogVideoX (2B, 5B, 1.5): ``CogVideoXTransformer3DModel``, legacy ``Attention`` modules (``attn1``
of every block) with ``CogVideoXAttnProcessor2_0`` (``FusedCogVideoXAttnProcessor2_0`` after
``fuse_qkv_projections``).

Text first: ``[txt (226 T5 tokens), video]``, layout (B, H, N, D), every block joint. The pipelines
pad every prompt to ``max_sequence_length`` (226) and pass no mask (the padding is attended in
stock), so all 226 keys are text. RoPE (5B / 1.5) is applied to the video tokens only, in place.

The timestep: CogVideoX is NOT a flow-matching model. Its schedulers (``CogVideoXDDIMScheduler``,
``CogVideoXDPMScheduler``) are DDPM-style, v-prediction, discrete t in [0, 999] on the 1000-step
training grid, and there is no sigma in the paper's sense. Translation used here: the paper states
its rule as sigma >= 0.97, which for its models is t >= 970 on the same 1000-step grid (t = 1000
sigma); taca applies that grid rule: sigma := t / 1000 (``timestep = "t1000"``), so gamma is on while
t >= 970, the first 3% of the training timesteps. (A noise-level match, e.g. the flow sigma of equal
signal-to-noise ratio sqrt(1 - abar_t) / (sqrt(abar_t) + sqrt(1 - abar_t)), would give a different
window with CogVideoX's zero-terminal-SNR, SNR-shifted betas; it is not what taca does.)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..processors import TacaProcessor
from . import Adapter, register


class TacaCogVideoXAttnProcessor(TacaProcessor):
    """TACA for CogVideoX's ``attn1``: same computation as ``CogVideoXAttnProcessor2_0`` or, for a
    module that had ``FusedCogVideoXAttnProcessor2_0`` when TACA was enabled, as that one; returns
    ``(video, txt)``. Also CogView3-Plus's and ConsisID's, whose blocks forward no attention kwargs:
    there gamma comes from the hook's per-call state (:meth:`call_arg`)."""

    text_first = True
    layout = "bhnd"

    def __init__(self, name: str, fused: bool = False, **kw):
        super().__init__(name, **kw)
        self.fused = bool(fused)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        image_rotary_emb: Optional[torch.Tensor] = None,
        taca_gamma: Optional[torch.Tensor] = None,
        taca_text_len: Optional[int] = None,
    ):
        text_seq_length = encoder_hidden_states.size(1)

        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)

        if self.fused:  # as FusedCogVideoXAttnProcessor2_0, which sizes the mask from the text
            batch_size, sequence_length, _ = encoder_hidden_states.shape
        else:
            batch_size, sequence_length, _ = hidden_states.shape

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if self.fused:
            qkv = attn.to_qkv(hidden_states)
            split_size = qkv.shape[-1] // 3
            query, key, value = torch.split(qkv, split_size, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            key = attn.to_k(hidden_states)
            value = attn.to_v(hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query[:, :, text_seq_length:] = apply_rotary_emb(query[:, :, text_seq_length:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_seq_length:] = apply_rotary_emb(key[:, :, text_seq_length:], image_rotary_emb)

        if taca_gamma is None:
            taca_gamma = self.call_arg("taca_gamma")
        out = self.taca_attention(query, key, value, text_seq_length, taca_gamma, attention_mask)
        if out is None:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                 is_causal=False)

        hidden_states = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1
        )
        return hidden_states, encoder_hidden_states


@register
class CogVideoXAdapter(Adapter):
    name = "cogvideox"
    label = "CogVideoXTransformer3DModel (CogVideoX)"
    transformer_classes = ("CogVideoXTransformer3DModel",)
    stock_processors = frozenset({"CogVideoXAttnProcessor2_0", "FusedCogVideoXAttnProcessor2_0"})
    timestep = "t1000"  # DDPM t in [0, 999]: the paper's rule on the 1000-step grid, t >= 970 (see above)
    kwargs_name = "attention_kwargs"
    # taca generate writes images; the video pipelines are supported through taca.enable(pipe) only
    pipelines = ()
    max_sequence_length = 226

    def processor(self, name, module):
        fused = type(module.processor).__name__ == "FusedCogVideoXAttnProcessor2_0"
        return TacaCogVideoXAttnProcessor(name, fused=fused)
