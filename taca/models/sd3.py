"""SD3, SD3.5 (Medium, Large): ``SD3Transformer2DModel``, legacy ``Attention`` modules.

Image first, text last ([img, txt]), layout (B, H, N, D). The transformer takes t = 1000 sigma.
SD3.5-Medium's image-only ``attn2`` (called without ``encoder_hidden_states``) gets the TACA
processor too and runs stock attention there; the ``context_pre_only`` last block still applies
gamma (image queries see text keys).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..processors import TacaProcessor
from . import Adapter, register


class TacaJointAttnProcessor(TacaProcessor):
    """TACA for SD3/SD3.5 ``Attention`` modules: image first, text last, layout (B, H, N, D).

    Same computation as diffusers' ``JointAttnProcessor2_0`` (and ``FusedJointAttnProcessor2_0``
    when the module's projections are fused): optional QK RMSNorm, ``attention_mask`` ignored (as
    stock), the ``context_pre_only`` last block returns no text projection. Modules called
    without ``encoder_hidden_states`` get plain attention.
    """

    text_first = False
    layout = "bhnd"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        taca_gamma: Optional[torch.Tensor] = None,
        taca_text_len: Optional[int] = None,
    ):
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        fused = getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv")

        if fused:
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

        if encoder_hidden_states is not None:
            if fused and hasattr(attn, "to_added_qkv"):
                eqkv = attn.to_added_qkv(encoder_hidden_states)
                split_size = eqkv.shape[-1] // 3
                e_q, e_k, e_v = torch.split(eqkv, split_size, dim=-1)
            else:
                e_q = attn.add_q_proj(encoder_hidden_states)
                e_k = attn.add_k_proj(encoder_hidden_states)
                e_v = attn.add_v_proj(encoder_hidden_states)
            e_q = e_q.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            e_k = e_k.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            e_v = e_v.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_added_q is not None:
                e_q = attn.norm_added_q(e_q)
            if attn.norm_added_k is not None:
                e_k = attn.norm_added_k(e_k)
            query = torch.cat([query, e_q], dim=2)
            key = torch.cat([key, e_k], dim=2)
            value = torch.cat([value, e_v], dim=2)

        text_len = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else None
        hidden_states = self.taca_attention(query, key, value, text_len, taca_gamma)
        if hidden_states is None:
            hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


@register
class SD3Adapter(Adapter):
    name = "sd3"
    label = "SD3Transformer2DModel (SD3, SD3.5)"
    transformer_classes = ("SD3Transformer2DModel",)
    stock_processors = frozenset({"JointAttnProcessor2_0", "FusedJointAttnProcessor2_0"})
    timestep = "t1000"
    # the SD3 pipelines pass t.expand(B) itself (a view into scheduler.timesteps): the host path
    # reads it without the pipeline's help
    current_t_pipelines = frozenset()
    pipelines = ("StableDiffusion3Pipeline",)
    negative_prompt = True

    @classmethod
    def serves_pipeline(cls, name):
        return "StableDiffusion3" in name  # img2img, inpaint, PAG, ControlNet

    def processor(self, name, module):
        return TacaJointAttnProcessor(name)
