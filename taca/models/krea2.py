"""Krea 2: ``Krea2Transformer2DModel``, ``Krea2Attention`` modules with ``Krea2AttnProcessor``.

Single stream, text first: ``[txt, img]``, layout (B, N, H, D), in every ``transformer_blocks.*.attn``
(joint). The ``text_fusion`` blocks use the same processor class but attend over text only
(``layerwise_blocks`` across the text-encoder-layer axis, ``refiner_blocks`` across the tokens): they
keep their stock processors. Grouped-query attention (48 q / 12 kv heads in the checkpoint): the
stock processor repeats K and V to the query heads before the attention call, and so does TACA (the
same ``repeat_interleave``: exact, no grouped-head support needed from the op); the sigmoid output
gate and output projection follow as stock. When prompts are padded the model passes a bool key mask
(B, 1, 1, L_txt + L_img) (True = attend): kept as is, so padded text keys stay removed (gamma on then
needs ``taca.joint_attention(attn_mask=)``).

The blocks pass no attention kwargs to the processors (``attention_kwargs`` only carries the LoRA
scale): the hook hands each call's state to the processors (``kwargs_name = None``). The
transformer takes sigma in [0, 1] (``Krea2Pipeline`` passes ``(t / 1000).expand(B).to(dtype)`` and
sets ``_current_timestep = t`` just before).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..processors import TacaProcessor
from . import Adapter, attention_modules, register


class TacaKrea2AttnProcessor(TacaProcessor):
    """TACA for Krea 2's joint ``attn``: same computation as ``Krea2AttnProcessor``."""

    text_first = True
    layout = "bnhd"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        image_rotary_emb=None,
    ) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_krea2 import apply_rotary_emb

        query = attn.to_q(hidden_states).unflatten(-1, (attn.num_heads, attn.head_dim))
        key = attn.to_k(hidden_states).unflatten(-1, (attn.num_kv_heads, attn.head_dim))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.num_kv_heads, attn.head_dim))
        gate = attn.to_gate(hidden_states)

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        num_key_value_groups = attn.num_heads // attn.num_kv_heads
        if num_key_value_groups > 1:
            key = key.repeat_interleave(num_key_value_groups, dim=2)
            value = value.repeat_interleave(num_key_value_groups, dim=2)

        hidden_states = self.taca_attention(query, key, value, self.call_arg("taca_text_len"),
                                            self.call_arg("taca_gamma"), attention_mask)
        if hidden_states is None:
            hidden_states = dispatch_attention_fn(
                query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                parallel_config=self._parallel_config,
            )
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states * torch.sigmoid(gate)
        return attn.to_out[0](hidden_states)


@register
class Krea2Adapter(Adapter):
    name = "krea2"
    label = "Krea2Transformer2DModel (Krea 2)"
    transformer_classes = ("Krea2Transformer2DModel",)
    stock_processors = frozenset({"Krea2AttnProcessor"})
    timestep = "sigma"
    kwargs_name = None  # the blocks forward no attention kwargs to the processors
    # diffusers 0.42.1: _current_timestep = t, then timestep = (t / 1000).expand(B).to(latents.dtype)
    current_t_pipelines = frozenset({"Krea2Pipeline"})
    pipelines = ("Krea2Pipeline",)
    negative_prompt = True

    def joint_modules(self) -> Dict[str, torch.nn.Module]:
        return {n: m for n, m in attention_modules(self.transformer).items() if n.startswith("transformer_blocks.")}

    def processor(self, name, module):
        return TacaKrea2AttnProcessor(name)
