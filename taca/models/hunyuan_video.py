"""HunyuanVideo (T2V, I2V, SkyReels I2V): ``HunyuanVideoTransformer3DModel``, legacy ``Attention``
modules with ``HunyuanVideoAttnProcessor2_0`` in the double-stream (``transformer_blocks``) and
single-stream (``single_transformer_blocks``) blocks, including the I2V token-replace variants.

Video first, text last: ``[video, txt]``, layout (B, N, H, D); both block types hand the text to the
processor separately (the single-stream one concatenates it inside), so the text length is
``encoder_hidden_states.shape[1]``. The ``context_embedder``'s token refiner (text-only attention,
``AttnProcessor2_0``) keeps its stock processor. The model ALWAYS passes a bool key mask
(B, 1, 1, N): True for the video and for the first ``encoder_attention_mask[b].sum()`` text tokens of
sample b (count based); it is kept as is, so padded text keys stay removed for every query and
per-sample valid lengths are exact. In image-to-video the LLaVA text stream also carries the
reference image's tokens: they are keys of the text stream and get gamma like the prompt (as Qwen-Image
Edit's vision tokens do). Gamma on therefore needs ``taca.joint_attention(attn_mask=)``
(the processor raises until then). RoPE is on the video only.

The blocks pass no attention kwargs to the processors: the hook hands them the state
(``kwargs_name = None``). The transformer takes the raw t (sigma = t / 1000).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..processors import TacaProcessor
from . import Adapter, attention_modules, register


class TacaHunyuanVideoAttnProcessor(TacaProcessor):
    """TACA for HunyuanVideo's joint ``attn``: same computation as ``HunyuanVideoAttnProcessor2_0``;
    returns ``(video, txt)``."""

    text_first = False
    layout = "bnhd"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        image_rotary_emb: Optional[torch.Tensor] = None,
    ):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        if attn.add_q_proj is None and encoder_hidden_states is not None:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if image_rotary_emb is not None:
            if attn.add_q_proj is None and encoder_hidden_states is not None:
                query = torch.cat(
                    [
                        apply_rotary_emb(query[:, : -encoder_hidden_states.shape[1]], image_rotary_emb, sequence_dim=1),
                        query[:, -encoder_hidden_states.shape[1]:],
                    ],
                    dim=1,
                )
                key = torch.cat(
                    [
                        apply_rotary_emb(key[:, : -encoder_hidden_states.shape[1]], image_rotary_emb, sequence_dim=1),
                        key[:, -encoder_hidden_states.shape[1]:],
                    ],
                    dim=1,
                )
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            encoder_query = attn.add_q_proj(encoder_hidden_states)
            encoder_key = attn.add_k_proj(encoder_hidden_states)
            encoder_value = attn.add_v_proj(encoder_hidden_states)

            encoder_query = encoder_query.unflatten(2, (attn.heads, -1))
            encoder_key = encoder_key.unflatten(2, (attn.heads, -1))
            encoder_value = encoder_value.unflatten(2, (attn.heads, -1))

            if attn.norm_added_q is not None:
                encoder_query = attn.norm_added_q(encoder_query)
            if attn.norm_added_k is not None:
                encoder_key = attn.norm_added_k(encoder_key)

            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

        text_len = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else None
        hidden_states = self.taca_attention(query, key, value, text_len, self.call_arg("taca_gamma"), attention_mask)
        if hidden_states is None:
            hidden_states = dispatch_attention_fn(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend, parallel_config=self._parallel_config,
            )
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : -encoder_hidden_states.shape[1]],
                hidden_states[:, -encoder_hidden_states.shape[1]:],
            )

            if getattr(attn, "to_out", None) is not None:
                hidden_states = attn.to_out[0](hidden_states)
                hidden_states = attn.to_out[1](hidden_states)

            if getattr(attn, "to_add_out", None) is not None:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        return hidden_states, encoder_hidden_states


@register
class HunyuanVideoAdapter(Adapter):
    name = "hunyuan_video"
    label = "HunyuanVideoTransformer3DModel (HunyuanVideo)"
    transformer_classes = ("HunyuanVideoTransformer3DModel",)
    stock_processors = frozenset({"HunyuanVideoAttnProcessor2_0"})
    timestep = "t1000"
    kwargs_name = None  # the blocks forward no attention kwargs to the processors
    # taca generate writes images; the video pipelines are supported through taca.enable(pipe) only
    pipelines = ()
    max_sequence_length = 256

    def joint_modules(self) -> Dict[str, torch.nn.Module]:
        return {n: m for n, m in attention_modules(self.transformer).items()
                if n.startswith(("transformer_blocks.", "single_transformer_blocks."))}

    def processor(self, name, module):
        return TacaHunyuanVideoAttnProcessor(name)

    def call_state(self, arg):
        return {}  # the processors read the text length from encoder_hidden_states
