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

Image-conditioned generation (condition images through ``GlmImageKVCache``):

- "write": one call per condition image, with NO text (an empty glyph block) at timestep 0: the
  condition image's K/V are stored. Nothing to scale: the adapter marks the call textless (no
  gamma, its timestep, outside the pipeline's schedule, is not read) and it runs stock.
- "read" (the conditional branch of every step): queries [txt, img], keys [condition-image cache,
  txt, img] (the cache prepended). TACA: text keys [L_c, L_c + T), text queries the first T;
  image queries get gamma on the text keys only (the cached keys are visual: unscaled), text
  queries gamma_reverse on the cached and image keys. A text ``attention_mask`` in read mode is
  refused (ValueError): the stock processor's (T + I) x (T + I) mask does not cover the cached keys
  (stock fails on it too).
- "skip" (the unconditional branch): plain [txt, img], as text-to-image.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from ..processors import TacaProcessor, joint_token_mask
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

        n_cached = 0
        if kv_cache is not None:
            if kv_cache.mode == "write":
                kv_cache.store(key, value)
            elif kv_cache.mode == "read":
                key, value = kv_cache.get(key, value)
                n_cached = key.shape[1] - query.shape[1]  # condition-image keys prepended
            elif kv_cache.mode == "skip":
                pass

        token_mask = None
        if attention_mask is not None:
            text_attn_mask = attention_mask
            if text_attn_mask.dim() != 2:
                raise ValueError("the shape of text_attn_mask should be (batch_size, text_seq_length)")
            if query.device.type in ops._MASK_ROUTES:  # the matrix below is this token mask's outer product
                token_mask = joint_token_mask(attention_mask, image_seq_length, query.device)
            text_attn_mask = text_attn_mask.float().to(query.device)
            mix_attn_mask = torch.ones((batch_size, text_seq_length + image_seq_length), device=query.device)
            mix_attn_mask[:, :text_seq_length] = text_attn_mask
            mix_attn_mask = mix_attn_mask.unsqueeze(2)
            attn_mask_matrix = mix_attn_mask @ mix_attn_mask.transpose(1, 2)
            attention_mask = (attn_mask_matrix > 0).unsqueeze(1).to(query.dtype)  # float 0/1: ADDED

        text_len = text_seq_length if text_seq_length > 0 else None  # a write call has no text: stock
        if n_cached:
            # read: [txt, img] queries on [cache, txt, img] keys
            out = self.taca_attention(query, key, value, text_len, taca_gamma, attention_mask, text_start=n_cached,
                                      query_text_start=0, query_text_len=text_seq_length)
        else:
            out = self.taca_attention(query, key, value, text_len, taca_gamma, attention_mask, token_mask=token_mask)
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

    def textless(self, arg):
        """A condition-image write call: GlmImageKVCache in "write" mode and an empty glyph block."""
        ehs, kv = arg("encoder_hidden_states"), arg("kv_caches")
        return (ehs is not None and ehs.shape[1] == 0 and kv is not None
                and any(getattr(c, "mode", None) == "write" for c in getattr(kv, "caches", ())))

    def call_state(self, arg):
        kv = arg("kv_caches")
        if arg("attention_mask") is not None and kv is not None and any(
                getattr(c, "mode", None) == "read" and getattr(c, "k_caches", None) for c in getattr(kv, "caches", ())):
            raise ValueError(
                "taca: GLM-Image's KV-cache read mode (condition images) with a text attention_mask is not "
                "supported: the stock processor's (text + image) x (text + image) mask does not cover the cached "
                "condition-image keys (diffusers fails on it too); supported: read mode without attention_mask "
                "(what GlmImagePipeline passes), or a mask without condition images"
            )
        return super().call_state(arg)
