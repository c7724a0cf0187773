"""Bria FIBO 2 (``BriaFibo2Transformer2DModel``; ``BriaFibo2Pipeline``).

A Z-Image-style single-stream model. ``BriaFibo2Attention`` with ``BriaFibo2AttnProcessor`` serves

- the main blocks' self-attention (``layers.<i>.attention``): the one joint softmax over text and
  image. Its "text" is the Perceiver's gist tokens (a resampling of the Qwen3-VL prompt states),
  its visual tokens the image being generated and the context images of an edit (clean tokens,
  visual as FLUX Kontext's references). The forward builds ``[gist, img, ctx_img]``, or
  ``[img, ctx_img, gist]`` with a (B, N) bool key mask when the prompts of the batch get different
  gist counts (the shorter ones padded, their pad gist keys masked): image and context queries get
  gamma on the gist keys, the mask stays as stock ((B, 1, 1, N), True = attend);
- the noise refiner (image and context tokens only), the Perceiver (gist queries on the prompt
  states, then gist self-attention) and the injection blocks' gated cross-attention (image queries
  on raw prompt states, a softmax of its own): no image-text joint softmax, they stay stock
  (``joint_modules`` leaves them out).

The forward takes no attention kwargs: the hook hands the processors the number of visual tokens
(image plus context-image tokens, from the latents' shapes: no device sync); the gist count is
the rest of the sequence, and where it sits follows the stock rule (gist first without a mask,
last with one).

Timestep: sigma in [0, 1] (``BriaFibo2Pipeline`` passes ``t / 1000``; the model multiplies by
``t_scale``). The pipeline sets no ``_current_timestep``: sigma is read with one host sync per call.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..processors import TacaProcessor
from . import Adapter, register


class TacaBriaFibo2AttnProcessor(TacaProcessor):
    """TACA for ``BriaFibo2Attention`` in a main block (self-attention over gist and visual tokens).
    ``text_first`` is set per call from the stock layout: gist first without a mask, last with one."""

    layout = "bnhd"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        freqs_cis: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        from diffusers.models.transformers.transformer_bria_fibo2 import dispatch_attention_fn

        self_attention = encoder_hidden_states is None
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        query = query.unflatten(-1, (attn.heads, -1))
        key = key.unflatten(-1, (attn.heads, -1))
        value = value.unflatten(-1, (attn.heads, -1))

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        def apply_rotary_emb(x_in: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
            x = torch.view_as_complex(x_in.float().reshape(*x_in.shape[:-1], -1, 2))
            x_out = torch.view_as_real(x * freqs_cis.unsqueeze(2)).flatten(3)
            return x_out.type_as(x_in)

        if freqs_cis is not None:
            query = apply_rotary_emb(query, freqs_cis)
            key = apply_rotary_emb(key, freqs_cis)

        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]

        text_len = None
        visual = self.call_arg("taca_visual_len")
        if self_attention and visual is not None:
            n = key.shape[1]
            text_len = n - visual
            if not 0 <= text_len <= n:
                raise ValueError(
                    f"taca: {self.name}: {n} tokens in the joint sequence but {visual} image and context tokens; "
                    f"expected [gist, img, ctx_img] or [img, ctx_img, gist] as BriaFibo2Transformer2DModel builds them"
                )
            if text_len == 0:
                text_len = None  # no gist token: nothing to scale, stock attention
            # the stock layout: gist first, or last when the batch pads its gist tokens (then a mask)
            self.text_first = attention_mask is None
        hidden_states = self.taca_attention(query, key, value, text_len, self.call_arg("taca_gamma"), attention_mask)
        if hidden_states is None:
            hidden_states = dispatch_attention_fn(
                query,
                key,
                value,
                attn_mask=attention_mask,
                dropout_p=0.0,
                is_causal=False,
                backend=self._attention_backend,
                parallel_config=self._parallel_config,
            )

        hidden_states = hidden_states.flatten(2, 3)

        return attn.to_out[0](hidden_states)


@register
class BriaFibo2Adapter(Adapter):
    name = "bria_fibo2"
    label = "BriaFibo2Transformer2DModel (Bria FIBO 2)"
    transformer_classes = ("BriaFibo2Transformer2DModel",)
    stock_processors = frozenset({"BriaFibo2AttnProcessor"})
    timestep = "sigma"
    kwargs_name = None
    pipelines = ("BriaFibo2Pipeline",)
    negative_prompt = True
    # BriaFibo2Pipeline's __call__ has no max_sequence_length (it truncates prompts at 4096 tokens
    # itself): `taca generate --max-sequence-length` is refused for it; max_sequence_length keeps the
    # default 512 (a larger value would raise the bound the CLI checks before the family is known)
    takes_max_sequence_length = False

    def joint_modules(self):
        return {f"layers.{i}.attention": block.attention for i, block in enumerate(self.transformer.layers)}

    def processor(self, name, module):
        return TacaBriaFibo2AttnProcessor(name)

    def call_state(self, arg):
        hs = arg("hidden_states")
        if hs is None or arg("encoder_hidden_states") is None:
            raise ValueError("taca: the transformer was called without hidden_states or encoder_hidden_states")
        p = int(self.transformer.config.patch_size)
        visual = (hs.shape[2] // p) * (hs.shape[3] // p)
        for lat in arg("context_latents") or []:
            visual += (lat.shape[2] // p) * (lat.shape[3] // p)
        return {"taca_visual_len": int(visual)}
