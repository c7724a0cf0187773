"""ERNIE-Image: ``ErnieImageTransformer2DModel``, ``ErnieImageAttention`` modules (``self_attention``
of every layer) with ``ErnieImageSingleStreamAttnProcessor``.

Single stream, image first: ``[img (N_img), txt (Tmax)]`` per sample, layout (B, N, H, D). The text
block is the batch's padded text ``text_bth`` (Tmax = its length); sample b's valid text is its first
``text_lens[b]`` tokens, and the model ALWAYS passes a bool key mask (B, 1, 1, N_img + Tmax) that
removes the padded ones (True = attend). TACA scales image queries on the last Tmax keys and keeps
that mask as is, so a padded key stays removed and a valid one gets gamma: per-sample valid lengths
(CFG's negative and positive prompts in one batch) come out exactly (``taca.joint_attention(attn_mask=)``).

The model takes no attention kwargs: the hook hands each call's state to the processors
(``kwargs_name = None``). The transformer takes the raw scheduler t (sigma = t / 1000; the pipeline
passes a fresh ``torch.full(..., t.item())``: the hook takes its sync path).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..processors import TacaProcessor
from . import Adapter, register


class TacaErnieImageAttnProcessor(TacaProcessor):
    """TACA for ERNIE-Image's ``self_attention``: same computation as ``ErnieImageSingleStreamAttnProcessor``."""

    text_first = False
    layout = "bnhd"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        freqs_cis: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        query = query.unflatten(-1, (attn.heads, -1))
        key = key.unflatten(-1, (attn.heads, -1))
        value = value.unflatten(-1, (attn.heads, -1))

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        def apply_rotary_emb(x_in: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
            rot_dim = freqs_cis.shape[-1]
            x, x_pass = x_in[..., :rot_dim], x_in[..., rot_dim:]
            cos_ = torch.cos(freqs_cis).to(x.dtype)
            sin_ = torch.sin(freqs_cis).to(x.dtype)
            x1, x2 = x.chunk(2, dim=-1)
            x_rotated = torch.cat((-x2, x1), dim=-1)
            return torch.cat((x * cos_ + x_rotated * sin_, x_pass), dim=-1)

        if freqs_cis is not None:
            query = apply_rotary_emb(query, freqs_cis)
            key = apply_rotary_emb(key, freqs_cis)

        dtype = query.dtype
        query, key = query.to(dtype), key.to(dtype)

        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]

        hidden_states = self.taca_attention(query, key, value, self.call_arg("taca_text_len"),
                                            self.call_arg("taca_gamma"), attention_mask)
        if hidden_states is None:
            hidden_states = dispatch_attention_fn(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend, parallel_config=self._parallel_config,
            )

        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(dtype)
        return attn.to_out[0](hidden_states)


@register
class ErnieImageAdapter(Adapter):
    name = "ernie_image"
    label = "ErnieImageTransformer2DModel (ERNIE-Image)"
    transformer_classes = ("ErnieImageTransformer2DModel",)
    stock_processors = frozenset({"ErnieImageSingleStreamAttnProcessor"})
    timestep = "t1000"
    kwargs_name = None  # the model forwards no attention kwargs
    pipelines = ("ErnieImagePipeline",)
    takes_max_sequence_length = False  # its __call__ has no max_sequence_length
    negative_prompt = True

    def processor(self, name, module):
        return TacaErnieImageAttnProcessor(name)

    def call_state(self, arg):
        text = arg("text_bth")
        if text is None:
            raise ValueError("taca: ErnieImageTransformer2DModel was called without text_bth")
        return {"taca_text_len": int(text.shape[1])}
