"""Qwen-Image (and its Edit, EditPlus, Layered, img2img, inpaint, ControlNet pipelines):
``QwenImageTransformer2DModel``, legacy ``Attention`` modules with ``QwenDoubleStreamAttnProcessor2_0``.

Double-stream blocks only; text first ([txt, img], layout (B, N, H, D)). Edit pipelines append
reference latents after the image (``[txt, img, ref...]``): visual tokens, gamma applies to their
queries on text keys. When prompts are padded the stock processor builds a bool key mask
(B, 1, 1, L_txt + L_img) from ``encoder_hidden_states_mask`` (True = attend): padded text keys stay
masked with TACA on (the mask is passed to ``taca.joint_attention``). The pipelines set the mask
to None when no prompt is padded. Attention kwargs arrive through ``attention_kwargs``. The
transformer takes sigma in [0, 1] (the pipelines pass ``t / 1000`` in the latents' dtype).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..processors import TacaProcessor
from . import Adapter, register


class TacaQwenDoubleStreamAttnProcessor(TacaProcessor):
    """TACA for Qwen-Image's joint attention: same computation as
    ``QwenDoubleStreamAttnProcessor2_0``; returns ``(img, txt)``."""

    text_first = True
    layout = "bnhd"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        encoder_hidden_states_mask: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        image_rotary_emb=None,
        taca_gamma: Optional[torch.Tensor] = None,
        taca_text_len: Optional[int] = None,
    ):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        if encoder_hidden_states is None:
            raise ValueError("QwenDoubleStreamAttnProcessor2_0 requires encoder_hidden_states (text stream)")
        if attention_mask is not None:
            raise ValueError(
                "QwenDoubleStreamAttnProcessor2_0 does not accept an external attention_mask. "
                "Pass encoder_hidden_states_mask to let the processor build the joint mask."
            )
        if encoder_hidden_states_mask is not None:
            seq_img = hidden_states.shape[1]
            image_mask = torch.ones((hidden_states.shape[0], seq_img), dtype=torch.bool, device=hidden_states.device)
            attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)
            attention_mask = attention_mask[:, None, None, :]

        seq_txt = encoder_hidden_states.shape[1]
        img_query = attn.to_q(hidden_states)
        img_key = attn.to_k(hidden_states)
        img_value = attn.to_v(hidden_states)
        txt_query = attn.add_q_proj(encoder_hidden_states)
        txt_key = attn.add_k_proj(encoder_hidden_states)
        txt_value = attn.add_v_proj(encoder_hidden_states)

        head_dim = attn.inner_dim // attn.heads
        img_query = img_query.unflatten(-1, (-1, head_dim))
        img_key = img_key.unflatten(-1, (-1, head_dim))
        img_value = img_value.unflatten(-1, (-1, head_dim))
        txt_query = txt_query.unflatten(-1, (-1, head_dim))
        txt_key = txt_key.unflatten(-1, (-1, head_dim))
        txt_value = txt_value.unflatten(-1, (-1, head_dim))

        if attn.norm_q is not None:
            img_query = attn.norm_q(img_query)
        if attn.norm_k is not None:
            img_key = attn.norm_k(img_key)
        if attn.norm_added_q is not None:
            txt_query = attn.norm_added_q(txt_query)
        if attn.norm_added_k is not None:
            txt_key = attn.norm_added_k(txt_key)

        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_query = apply_rotary_emb_qwen(img_query, img_freqs, use_real=False)
            img_key = apply_rotary_emb_qwen(img_key, img_freqs, use_real=False)
            txt_query = apply_rotary_emb_qwen(txt_query, txt_freqs, use_real=False)
            txt_key = apply_rotary_emb_qwen(txt_key, txt_freqs, use_real=False)

        joint_query = torch.cat([txt_query, img_query], dim=1)
        joint_key = torch.cat([txt_key, img_key], dim=1)
        joint_value = torch.cat([txt_value, img_value], dim=1)

        joint_hidden_states = self.taca_attention(joint_query, joint_key, joint_value, seq_txt, taca_gamma,
                                                  attention_mask)
        if joint_hidden_states is None:
            joint_hidden_states = dispatch_attention_fn(
                joint_query, joint_key, joint_value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend, parallel_config=self._parallel_config,
            )
        joint_hidden_states = joint_hidden_states.flatten(2, 3)
        joint_hidden_states = joint_hidden_states.to(joint_query.dtype)

        txt_attn_output = joint_hidden_states[:, :seq_txt, :]
        img_attn_output = joint_hidden_states[:, seq_txt:, :]
        img_attn_output = attn.to_out[0](img_attn_output.contiguous())
        if len(attn.to_out) > 1:
            img_attn_output = attn.to_out[1](img_attn_output)
        txt_attn_output = attn.to_add_out(txt_attn_output.contiguous())
        return img_attn_output, txt_attn_output


@register
class QwenImageAdapter(Adapter):
    name = "qwenimage"
    label = "QwenImageTransformer2DModel (Qwen-Image, Qwen-Image-Edit)"
    transformer_classes = ("QwenImageTransformer2DModel",)
    stock_processors = frozenset({"QwenDoubleStreamAttnProcessor2_0"})
    timestep = "sigma"
    kwargs_name = "attention_kwargs"
    # diffusers 0.42.1: _current_timestep = t, then timestep = t.expand(B).to(latents.dtype) / 1000
    current_t_pipelines = frozenset({
        "QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline", "QwenImageEditPipeline",
        "QwenImageEditInpaintPipeline", "QwenImageEditPlusPipeline", "QwenImageLayeredPipeline",
        "QwenImageControlNetPipeline", "QwenImageControlNetInpaintPipeline",
    })
    pipelines = ("QwenImagePipeline",)
    negative_prompt = True
    guidance_arg = "true_cfg_scale"  # guidance_scale is for guidance-distilled checkpoints only
    max_sequence_length = 1024

    def processor(self, name, module):
        return TacaQwenDoubleStreamAttnProcessor(name)
