"""HunyuanImage 2.1 (and its distilled / refiner checkpoints): ``HunyuanImageTransformer2DModel``,
legacy ``Attention`` modules with ``HunyuanImageAttnProcessor``.

Image first, text last ([img, txt], layout (B, N, H, D)) in the double-stream blocks (separate
text projections) and the single-stream ones (one projection over [img, txt], RoPE on the image
part only); both pass the text separately, so every processor knows the text length
(``encoder_hidden_states.shape[1]``). The text block is the token-refined Qwen2.5-VL text (and,
with the glyph encoder, per sample [valid byT5, valid MLLM, invalid byT5, invalid MLLM]); the
model ALWAYS passes a bool key mask (B, 1, 1, N_img + L_txt), True for image keys and valid text
keys: it stays as stock with TACA on (``taca.joint_attention(attn_mask=)``).
The token refiner (``context_embedder``: text-only self-attention, ``AttnProcessor2_0``) stays
stock. The transformer's ``attention_kwargs`` carry only the LoRA scale, so the hook hands the
processors gamma directly. It takes the scheduler's raw t in [0, 1000] (sigma = t / 1000); the
meanflow ``timestep_r`` and the guidance embedding are left as they are.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..processors import TacaProcessor
from . import Adapter, attention_modules, register


def joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb):
    """``HunyuanImageAttnProcessor``'s q, k, v (B, N, H, D) as [img, txt], op for op: RoPE on the image
    tokens only; shared by HunyuanVideo (its processor is the same), HunyuanVideo 1.5 and Motif-Video."""
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
                    query[:, -encoder_hidden_states.shape[1] :],
                ],
                dim=1,
            )
            key = torch.cat(
                [
                    apply_rotary_emb(key[:, : -encoder_hidden_states.shape[1]], image_rotary_emb, sequence_dim=1),
                    key[:, -encoder_hidden_states.shape[1] :],
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
    return query, key, value


def split_project(attn, hidden_states, n_txt):
    """An [img, txt] attention output (B, N, C) split at its last ``n_txt`` tokens and projected,
    ``to_out`` on the image part and ``to_add_out`` on the text part where the module has them:
    ``HunyuanImageAttnProcessor``'s tail op for op; shared by HunyuanVideo 1.5 and Motif-Video."""
    hidden_states, encoder_hidden_states = hidden_states[:, :-n_txt], hidden_states[:, -n_txt:]
    if getattr(attn, "to_out", None) is not None:
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
    if getattr(attn, "to_add_out", None) is not None:
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
    return hidden_states, encoder_hidden_states


class TacaHunyuanImageAttnProcessor(TacaProcessor):
    """TACA for HunyuanImage's joint attention: ``HunyuanImageAttnProcessor`` op for op; returns
    ``(img, txt)``; gamma from :meth:`call_arg`."""

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

        query, key, value = joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)

        text_len = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else None
        out = self.taca_attention(query, key, value, text_len, self.call_arg("taca_gamma"), attention_mask)
        if out is None:
            out = dispatch_attention_fn(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend, parallel_config=self._parallel_config,
            )
        hidden_states = out.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = split_project(attn, hidden_states, encoder_hidden_states.shape[1])
        return hidden_states, encoder_hidden_states


@register
class HunyuanImageAdapter(Adapter):
    name = "hunyuanimage"
    label = "HunyuanImageTransformer2DModel (HunyuanImage 2.1)"
    transformer_classes = ("HunyuanImageTransformer2DModel",)
    stock_processors = frozenset({"HunyuanImageAttnProcessor"})
    timestep = "t1000"
    kwargs_name = None
    # diffusers 0.42.1: _current_timestep = t, then timestep = t.expand(B).to(latents.dtype) (raw t,
    # so sigma = t / 1000 as for the FLUX-style pipelines)
    current_t_pipelines = frozenset({"HunyuanImagePipeline", "HunyuanImageRefinerPipeline"})
    pipelines = ("HunyuanImagePipeline",)
    takes_max_sequence_length = False  # its __call__ has no max_sequence_length
    negative_prompt = True
    # the CFG scale lives in the pipeline's guider; the call takes only the distilled checkpoints' guidance
    guidance_arg = "distilled_guidance_scale"
    max_sequence_length = 1000

    def joint_modules(self):
        # the token refiner (context_embedder.*) is text-only self-attention: stock
        return {n: m for n, m in attention_modules(self.transformer).items()
                if n.startswith(("transformer_blocks.", "single_transformer_blocks."))}

    def processor(self, name, module):
        return TacaHunyuanImageAttnProcessor(name)

    def call_state(self, arg):
        return {}  # every processor gets the text separately: its length is encoder_hidden_states.shape[1]
