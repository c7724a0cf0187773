"""Nucleus-Image: ``NucleusMoEImageTransformer2DModel``, legacy ``Attention`` modules (with
``kv_heads``) with ``NucleusMoEAttnProcessor2_0`` in every ``transformer_blocks.*.attn``.

Image queries only: Q = the image tokens, K / V = ``[img, txt]`` (text LAST among the keys, layout
(B, N, H, D)); the text stream has no queries, so every text-key logit is an image-query one and gets
gamma (``taca.joint_attention`` with N_q != N_k: no text queries). The text keys are the
``add_k_proj`` of ``encoder_hidden_states`` or, when the caller passes them, ``cached_txt_key`` /
``cached_txt_value`` (text K / V computed elsewhere): either way the last ``L_txt`` keys
(``cached_txt_key.shape[1]`` or ``encoder_hidden_states.shape[1]``). Grouped-query attention
(Nucleus-Image: 16 q / 4 kv heads): the stock processor ``repeat_interleave``s K / V to the query heads
before the call, and so does TACA (exact). With a prompt mask the model passes a 2-D bool key mask
(B, L_img + L_txt) as is; diffusers' native backend reshapes it to (B, 1, 1, N_k) (when its shape is
(B, N_k)), and TACA hands the op that same reshaped mask.

The blocks forward the transformer's ``attention_kwargs`` to the processors (``kwargs_name =
"attention_kwargs"``). The pipeline passes ``t / num_train_timesteps`` = sigma.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from ..processors import TacaProcessor
from . import Adapter, attention_modules, register


class TacaNucleusMoEAttnProcessor(TacaProcessor):
    """TACA for Nucleus-Image's attention: ``NucleusMoEAttnProcessor2_0`` op for op."""

    text_first = False
    layout = "bnhd"

    def __init__(self, name: str, gamma_reverse: float = 1.0, backend: str = "auto"):
        super().__init__(name, gamma_reverse, backend)
        if not hasattr(F, "scaled_dot_product_attention"):
            raise ImportError("NucleusMoEAttnProcessor2_0 requires PyTorch 2.0")

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        image_rotary_emb: Optional[torch.Tensor] = None,
        cached_txt_key: Optional[torch.Tensor] = None,
        cached_txt_value: Optional[torch.Tensor] = None,
        taca_gamma: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_nucleusmoe_image import _apply_rotary_emb_nucleus

        head_dim = attn.inner_dim // attn.heads
        num_kv_heads = attn.inner_kv_dim // head_dim
        num_kv_groups = attn.heads // num_kv_heads

        img_query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        img_key = attn.to_k(hidden_states).unflatten(-1, (num_kv_heads, -1))
        img_value = attn.to_v(hidden_states).unflatten(-1, (num_kv_heads, -1))

        if attn.norm_q is not None:
            img_query = attn.norm_q(img_query)
        if attn.norm_k is not None:
            img_key = attn.norm_k(img_key)

        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_query = _apply_rotary_emb_nucleus(img_query, img_freqs, use_real=False)
            img_key = _apply_rotary_emb_nucleus(img_key, img_freqs, use_real=False)

        text_len = None
        if cached_txt_key is not None and cached_txt_value is not None:
            txt_key, txt_value = cached_txt_key, cached_txt_value
            joint_key = torch.cat([img_key, txt_key], dim=1)
            joint_value = torch.cat([img_value, txt_value], dim=1)
            text_len = txt_key.shape[1]
        elif encoder_hidden_states is not None:
            txt_key = attn.add_k_proj(encoder_hidden_states).unflatten(-1, (num_kv_heads, -1))
            txt_value = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (num_kv_heads, -1))

            if attn.norm_added_k is not None:
                txt_key = attn.norm_added_k(txt_key)

            if image_rotary_emb is not None:
                txt_key = _apply_rotary_emb_nucleus(txt_key, txt_freqs, use_real=False)

            joint_key = torch.cat([img_key, txt_key], dim=1)
            joint_value = torch.cat([img_value, txt_value], dim=1)
            text_len = txt_key.shape[1]
        else:
            joint_key = img_key
            joint_value = img_value

        if num_kv_groups > 1:
            joint_key = joint_key.repeat_interleave(num_kv_groups, dim=2)
            joint_value = joint_value.repeat_interleave(num_kv_groups, dim=2)

        mask = attention_mask
        if (mask is not None and mask.ndim == 2 and mask.shape[0] == img_query.shape[0]
                and mask.shape[1] == joint_key.shape[1]):
            mask = mask[:, None, None, :]  # what diffusers' native backend does with a (B, N_k) mask
        out = self.taca_attention(img_query, joint_key, joint_value, text_len, taca_gamma, mask)
        if out is None:
            out = dispatch_attention_fn(
                img_query, joint_key, joint_value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend, parallel_config=self._parallel_config,
            )

        hidden_states = out.flatten(2, 3)
        hidden_states = hidden_states.to(img_query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        if len(attn.to_out) > 1:
            hidden_states = attn.to_out[1](hidden_states)

        return hidden_states


@register
class NucleusMoEAdapter(Adapter):
    name = "nucleusmoe"
    label = "NucleusMoEImageTransformer2DModel (Nucleus-Image)"
    transformer_classes = ("NucleusMoEImageTransformer2DModel",)
    stock_processors = frozenset({"NucleusMoEAttnProcessor2_0"})
    timestep = "sigma"
    kwargs_name = "attention_kwargs"
    # diffusers 0.42.1: _current_timestep = t, then timestep = t.expand(B).to(latents.dtype) / num_train_timesteps
    current_t_pipelines = frozenset({"NucleusMoEImagePipeline"})
    pipelines = ()  # taca.enable(pipe) only here: taca generate is not tied to this pipeline yet

    def joint_modules(self) -> Dict[str, torch.nn.Module]:
        return {n: m for n, m in attention_modules(self.transformer).items() if n.startswith("transformer_blocks.")}

    def processor(self, name, module):
        return TacaNucleusMoEAttnProcessor(name)

    def call_state(self, arg):
        return {}  # the processors read the text length from the text keys
