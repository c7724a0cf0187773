"""GLM-Image: ``GlmImageTransformer2DModel``, legacy ``Attention`` modules (``attn1`` of every block)
with ``GlmImageAttnProcessor``.

Text first ([glyph txt, img], layout (B, N, H, D)), every block joint. The "text" of this DiT is
the glyph embedding (ByT5 of the prompt's quoted text); the prompt's meaning reaches the DiT through
the autoregressive prior's image tokens, which are ADDED into the image tokens (so they are image
queries and keys here, never scaled as text). TACA scales image queries' logits on the glyph keys,
the only text keys of the joint softmax. A 2-D text mask becomes, in the stock processor, a FLOAT
0/1 matrix that is ADDED to the logits (it masks nothing); TACA passes the same float matrix on.

Sigma: the transformer gets ``t - 1`` with ``t`` the scheduler's UNSHIFTED linear timestep (the
pipeline's sigmas are shifted), so the adapter reads sigma from the pipeline's scheduler
(``scheduler.sigmas[i]`` where ``scheduler.timesteps[i] - 1 == timestep``; needs
``taca.enable(pipe)``). The pipeline passes a fresh ``t.expand(B) - 1``: the hook takes its sync path.

Image-conditioned generation (condition images through the KV cache: a "write" call per condition
image with no text at timestep 0, then "read" calls whose keys are [condition-image cache, txt, img]
while the queries are [txt, img]) is refused: the hook raises ValueError when ``kv_caches`` is in
use. Text-to-image passes an unused cache (mode None) and is supported.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..processors import TacaProcessor
from . import Adapter, register


class TacaGlmImageAttnProcessor(TacaProcessor):
    """TACA for GLM-Image's ``attn1``: same computation as ``GlmImageAttnProcessor`` (the KV cache
    modes included, for the stock path); returns ``(img, txt)``."""

    text_first = True
    layout = "bnhd"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        image_rotary_emb=None,
        kv_cache=None,
        taca_gamma: Optional[torch.Tensor] = None,
        taca_text_len: Optional[int] = None,
    ):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        dtype = encoder_hidden_states.dtype

        batch_size, text_seq_length, embed_dim = encoder_hidden_states.shape
        batch_size, image_seq_length, embed_dim = hidden_states.shape
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        if attn.norm_q is not None:
            query = attn.norm_q(query).to(dtype=dtype)
        if attn.norm_k is not None:
            key = attn.norm_k(key).to(dtype=dtype)

        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query[:, text_seq_length:, :, :] = apply_rotary_emb(
                query[:, text_seq_length:, :, :], image_rotary_emb, sequence_dim=1, use_real_unbind_dim=-2
            )
            key[:, text_seq_length:, :, :] = apply_rotary_emb(
                key[:, text_seq_length:, :, :], image_rotary_emb, sequence_dim=1, use_real_unbind_dim=-2
            )

        cached = False
        if kv_cache is not None:
            if kv_cache.mode == "write":
                kv_cache.store(key, value)
            elif kv_cache.mode == "read":
                key, value = kv_cache.get(key, value)
                cached = key.shape[1] != query.shape[1]
            elif kv_cache.mode == "skip":
                pass

        if attention_mask is not None:
            text_attn_mask = attention_mask
            if text_attn_mask.dim() != 2:
                raise ValueError("the shape of text_attn_mask should be (batch_size, text_seq_length)")
            text_attn_mask = text_attn_mask.float().to(query.device)
            mix_attn_mask = torch.ones((batch_size, text_seq_length + image_seq_length), device=query.device)
            mix_attn_mask[:, :text_seq_length] = text_attn_mask
            mix_attn_mask = mix_attn_mask.unsqueeze(2)
            attn_mask_matrix = mix_attn_mask @ mix_attn_mask.transpose(1, 2)
            attention_mask = (attn_mask_matrix > 0).unsqueeze(1).to(query.dtype)  # float 0/1: ADDED

        out = None
        if taca_gamma is not None and cached:
            raise NotImplementedError(f"taca: {self.name}: GLM-Image's KV-cache read mode is not supported")
        if not cached:
            out = self.taca_attention(query, key, value, text_seq_length, taca_gamma, attention_mask)
        if out is None:
            out = dispatch_attention_fn(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend, parallel_config=self._parallel_config,
            )
        hidden_states = out.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1
        )
        return hidden_states, encoder_hidden_states


@register
class GlmImageAdapter(Adapter):
    name = "glm_image"
    label = "GlmImageTransformer2DModel (GLM-Image)"
    transformer_classes = ("GlmImageTransformer2DModel",)
    stock_processors = frozenset({"GlmImageAttnProcessor"})
    timestep = "scheduler"  # t - 1 with t unshifted: sigma = scheduler.sigmas[i] where timesteps[i] - 1 == t
    scheduler_t_offset = -1.0
    kwargs_name = "attention_kwargs"
    pipeline_t_is_1000_sigma = False
    pipelines = ("GlmImagePipeline",)
    negative_prompt = False  # the pipeline's negative branch drops the prior tokens; it takes no negative prompt
    max_sequence_length = 2048

    def processor(self, name, module):
        return TacaGlmImageAttnProcessor(name)

    def call_state(self, arg):
        kv = arg("kv_caches")
        if kv is not None and any(getattr(c, "mode", None) is not None for c in getattr(kv, "caches", ())):
            raise ValueError(
                "taca: GLM-Image with condition images (kv_caches in write/read/skip mode) is not supported with "
                "TACA on: its cached keys [condition images, txt, img] need separate query and key text spans; "
                "generate without condition images, or disable TACA"
            )
        return super().call_state(arg)
