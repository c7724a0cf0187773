"""HiDream-I1 (Full, Dev, Fast): ``HiDreamImageTransformer2DModel``, ``HiDreamAttention`` modules
with ``HiDreamAttnProcessor``.

Image first, text last ([img, txt], layout (B, N, H, D)). The text block of every block is
[T5, last Llama layer, this block's Llama layer] (``L_t5 + 2 L_llama`` tokens; the pipeline pads
T5 and Llama to ``max_sequence_length``, 128, without a mask, so every text key is scaled, padding
included). The per-block Llama tokens change in every block but not the length, so one text
length per transformer call serves every block. Double-stream blocks know it
(``encoder_hidden_states``); single-stream blocks see only [img, txt] and get it from the hook.
Non-square images are padded to ``max_seq`` image tokens and the stock processor multiplies the
padded image KEYS by 0 (logit 0, not masked): reproduced as is (those keys are image keys, never
scaled). HiDreamAttention calls its processor with fixed arguments and the transformer's
``attention_kwargs`` never reach it, so the hook hands the processors their state directly. The
transformer takes ``timesteps`` = the scheduler's raw t in [0, 1000] (sigma = t / 1000).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..processors import TacaProcessor
from . import Adapter, register


class TacaHiDreamAttnProcessor(TacaProcessor):
    """TACA for ``HiDreamAttention``: ``HiDreamAttnProcessor`` op for op (QK RMSNorm over the whole
    inner dim, the padded-key multiply, HiDream's RoPE), gamma on (image query, text key) logits;
    ``taca_gamma`` / ``taca_text_len`` from :meth:`call_arg`."""

    text_first = False
    layout = "bnhd"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        hidden_states_masks: Optional[torch.Tensor] = None,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        image_rotary_emb: torch.Tensor = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        from diffusers.models.transformers.transformer_hidream_image import apply_rope

        dtype = hidden_states.dtype
        batch_size = hidden_states.shape[0]

        query_i = attn.q_rms_norm(attn.to_q(hidden_states)).to(dtype=dtype)
        key_i = attn.k_rms_norm(attn.to_k(hidden_states)).to(dtype=dtype)
        value_i = attn.to_v(hidden_states)

        inner_dim = key_i.shape[-1]
        head_dim = inner_dim // attn.heads

        query_i = query_i.view(batch_size, -1, attn.heads, head_dim)
        key_i = key_i.view(batch_size, -1, attn.heads, head_dim)
        value_i = value_i.view(batch_size, -1, attn.heads, head_dim)
        if hidden_states_masks is not None:
            key_i = key_i * hidden_states_masks.view(batch_size, -1, 1, 1)

        if not attn.single:
            query_t = attn.q_rms_norm_t(attn.to_q_t(encoder_hidden_states)).to(dtype=dtype)
            key_t = attn.k_rms_norm_t(attn.to_k_t(encoder_hidden_states)).to(dtype=dtype)
            value_t = attn.to_v_t(encoder_hidden_states)

            query_t = query_t.view(batch_size, -1, attn.heads, head_dim)
            key_t = key_t.view(batch_size, -1, attn.heads, head_dim)
            value_t = value_t.view(batch_size, -1, attn.heads, head_dim)

            num_image_tokens = query_i.shape[1]
            num_text_tokens = query_t.shape[1]
            query = torch.cat([query_i, query_t], dim=1)
            key = torch.cat([key_i, key_t], dim=1)
            value = torch.cat([value_i, value_t], dim=1)
        else:
            query = query_i
            key = key_i
            value = value_i

        if query.shape[-1] == image_rotary_emb.shape[-3] * 2:
            query, key = apply_rope(query, key, image_rotary_emb)
        else:
            query_1, query_2 = query.chunk(2, dim=-1)
            key_1, key_2 = key.chunk(2, dim=-1)
            query_1, key_1 = apply_rope(query_1, key_1, image_rotary_emb)
            query = torch.cat([query_1, query_2], dim=-1)
            key = torch.cat([key_1, key_2], dim=-1)

        text_len = num_text_tokens if not attn.single else self.call_arg("taca_text_len")
        out = self.taca_attention(query, key, value, text_len, self.call_arg("taca_gamma"))
        if out is None:
            hidden_states = F.scaled_dot_product_attention(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), dropout_p=0.0, is_causal=False
            )
            hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        else:
            hidden_states = out.reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if not attn.single:
            hidden_states_i, hidden_states_t = torch.split(hidden_states, [num_image_tokens, num_text_tokens], dim=1)
            hidden_states_i = attn.to_out(hidden_states_i)
            hidden_states_t = attn.to_out_t(hidden_states_t)
            return hidden_states_i, hidden_states_t
        hidden_states = attn.to_out(hidden_states)
        return hidden_states


@register
class HiDreamImageAdapter(Adapter):
    name = "hidream"
    label = "HiDreamImageTransformer2DModel (HiDream-I1)"
    transformer_classes = ("HiDreamImageTransformer2DModel",)
    stock_processors = frozenset({"HiDreamAttnProcessor"})
    timestep = "t1000"
    timestep_arg = "timesteps"
    kwargs_name = None
    # HiDreamImagePipeline passes t.expand(B) (a view into scheduler.timesteps): the host path reads it
    current_t_pipelines = frozenset()
    pipelines = ("HiDreamImagePipeline",)
    negative_prompt = True
    max_sequence_length = 128

    def processor(self, name, module):
        return TacaHiDreamAttnProcessor(name)

    def call_state(self, arg):
        t5, llama = arg("encoder_hidden_states_t5"), arg("encoder_hidden_states_llama3")
        if t5 is None or llama is None:
            raise ValueError("taca: HiDream was called without encoder_hidden_states_t5 / encoder_hidden_states_llama3")
        # llama: (layers, B, L, D) stacked, or a list of (B, L, D); every layer has one length
        n_llama = llama[0].shape[-2]
        return {"taca_text_len": int(t5.shape[1]) + 2 * int(n_llama)}
