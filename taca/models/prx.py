"""PRX: ``PRXTransformer2DModel``, ``PRXAttention`` modules with ``PRXAttnProcessor2_0`` in every block.

Image queries only: each block's attention takes Q from the image tokens and K / V from
``[txt, img]`` (text FIRST among the keys, layout (B, N, H, D)); the text stream has no queries and is
never updated, so every (query, text key) pair of the softmax is an (image query, text key) pair and
gets gamma. The text length is ``encoder_hidden_states.shape[1]``. ``taca.joint_attention`` takes the
N_q != N_k call directly (its default: no text queries). With a prompt mask the stock processor passes
the bool key mask (B, 1, 1, L_txt + L_img) (False on padded text keys); it is kept as is.

The blocks forward no attention kwargs to the processors: the hook hands them the state
(``kwargs_name = None``). The pipelines pass ``t / num_train_timesteps`` = sigma (pipeline_prx.py
L779-783; the model multiplies by its ``time_factor`` inside).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..processors import TacaProcessor
from . import Adapter, attention_modules, register


class TacaPRXAttnProcessor(TacaProcessor):
    """TACA for PRX's attention: ``PRXAttnProcessor2_0`` op for op; gamma from :meth:`call_arg`."""

    text_first = True
    layout = "bnhd"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        image_rotary_emb: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_prx import apply_rope

        if encoder_hidden_states is None:
            raise ValueError("PRXAttnProcessor2_0 requires 'encoder_hidden_states' containing text tokens.")

        img_qkv = attn.img_qkv_proj(hidden_states)
        B, L_img, _ = img_qkv.shape
        img_qkv = img_qkv.reshape(B, L_img, 3, attn.heads, attn.head_dim)
        img_qkv = img_qkv.permute(2, 0, 3, 1, 4)
        img_q, img_k, img_v = img_qkv[0], img_qkv[1], img_qkv[2]

        img_q = attn.norm_q(img_q)
        img_k = attn.norm_k(img_k)

        txt_kv = attn.txt_kv_proj(encoder_hidden_states)
        B, L_txt, _ = txt_kv.shape
        txt_kv = txt_kv.reshape(B, L_txt, 2, attn.heads, attn.head_dim)
        txt_kv = txt_kv.permute(2, 0, 3, 1, 4)
        txt_k, txt_v = txt_kv[0], txt_kv[1]

        txt_k = attn.norm_added_k(txt_k)

        if image_rotary_emb is not None:
            img_q = apply_rope(img_q, image_rotary_emb)
            img_k = apply_rope(img_k, image_rotary_emb)

        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)

        attn_mask_tensor = None
        if attention_mask is not None:
            bs, _, l_img, _ = img_q.shape
            l_txt = txt_k.shape[2]

            if attention_mask.dim() != 2:
                raise ValueError(f"Unsupported attention_mask shape: {attention_mask.shape}")
            if attention_mask.shape[-1] != l_txt:
                raise ValueError(f"attention_mask last dim {attention_mask.shape[-1]} must equal text length {l_txt}")

            device = img_q.device
            ones_img = torch.ones((bs, l_img), dtype=torch.bool, device=device)
            attention_mask = attention_mask.to(device=device, dtype=torch.bool)
            joint_mask = torch.cat([attention_mask, ones_img], dim=-1)
            attn_mask_tensor = joint_mask[:, None, None, :]

        query = img_q.transpose(1, 2)
        key = k.transpose(1, 2)
        value = v.transpose(1, 2)

        out = self.taca_attention(query, key, value, L_txt, self.call_arg("taca_gamma"), attn_mask_tensor)
        if out is None:
            out = dispatch_attention_fn(
                query, key, value, attn_mask=attn_mask_tensor,
                backend=self._attention_backend, parallel_config=self._parallel_config,
            )

        batch_size, seq_len, num_heads, head_dim = out.shape
        attn_output = out.reshape(batch_size, seq_len, num_heads * head_dim)

        attn_output = attn.to_out[0](attn_output)
        if len(attn.to_out) > 1:
            attn_output = attn.to_out[1](attn_output)

        return attn_output


@register
class PRXAdapter(Adapter):
    name = "prx"
    label = "PRXTransformer2DModel (PRX)"
    transformer_classes = ("PRXTransformer2DModel",)
    stock_processors = frozenset({"PRXAttnProcessor2_0"})
    timestep = "sigma"
    kwargs_name = None  # the blocks forward no attention kwargs to the processors
    pipeline_t_is_1000_sigma = False  # the PRX pipelines set no _current_timestep
    pipelines = ()  # their prompt encoding (T5Gemma) is not exercised here: taca.enable(pipe) only

    def joint_modules(self) -> Dict[str, torch.nn.Module]:
        return attention_modules(self.transformer)

    def processor(self, name, module):
        return TacaPRXAttnProcessor(name)

    def call_state(self, arg):
        return {}  # the processors read the text length from encoder_hidden_states
