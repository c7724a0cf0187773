"""CogView4: ``CogView4Transformer2DModel``, legacy ``Attention`` modules (``attn1`` of every block)
with ``CogView4AttnProcessor``.

Text first ([txt, img], layout (B, H, N, D)), every block joint. The text block is everything the
pipeline passes: ``CogView4Pipeline`` LEFT-pads the prompt's token ids with the pad token to a multiple
of 16 and passes no mask, so those pad embeddings are attended in stock and are text keys here too
(gamma applies to the whole text block, as for FLUX's T5 padding). A 2-D text mask given to the
transformer becomes, in the stock processor, a FLOAT 0/1 matrix that SDPA ADDS to the logits (it
masks nothing); TACA passes the same float matrix to ``taca.joint_attention`` (added after scale
and gamma), never turns it into a bool mask.

Sigma: the transformer gets the scheduler's UNSHIFTED linear timestep ``t`` (the pipeline hands
explicit ``timesteps`` and shifted ``sigmas`` to ``FlowMatchEulerDiscreteScheduler.set_timesteps``,
which keeps the timesteps unshifted), so ``t / 1000`` is not sigma. The adapter's timestep convention
is "scheduler": the hook reads ``pipe.scheduler.sigmas[i]`` where ``scheduler.timesteps[i] == t``.
``taca.enable`` must get the pipeline (a bare transformer call raises ValueError when the schedule
needs sigma; ``schedule="constant"`` needs none).

``CogView4TrainingAttnProcessor`` (packed multi-resolution training) is not reproduced:
``taca.enable`` refuses it (TypeError).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import ops
from ..processors import TacaProcessor, joint_token_mask
from . import Adapter, register


class TacaCogView4AttnProcessor(TacaProcessor):
    """TACA for CogView4's ``attn1``: same computation as ``CogView4AttnProcessor``; returns
    ``(img, txt)``."""

    text_first = True
    layout = "bhnd"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        image_rotary_emb=None,
        taca_gamma: Optional[torch.Tensor] = None,
        taca_text_len: Optional[int] = None,
    ):
        dtype = encoder_hidden_states.dtype

        batch_size, text_seq_length, embed_dim = encoder_hidden_states.shape
        batch_size, image_seq_length, embed_dim = hidden_states.shape
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        query = query.unflatten(2, (attn.heads, -1)).transpose(1, 2)
        key = key.unflatten(2, (attn.heads, -1)).transpose(1, 2)
        value = value.unflatten(2, (attn.heads, -1)).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query).to(dtype=dtype)
        if attn.norm_k is not None:
            key = attn.norm_k(key).to(dtype=dtype)

        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query[:, :, text_seq_length:, :] = apply_rotary_emb(
                query[:, :, text_seq_length:, :], image_rotary_emb, use_real_unbind_dim=-2
            )
            key[:, :, text_seq_length:, :] = apply_rotary_emb(
                key[:, :, text_seq_length:, :], image_rotary_emb, use_real_unbind_dim=-2
            )

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
            attention_mask = (attn_mask_matrix > 0).unsqueeze(1).to(query.dtype)  # float 0/1: ADDED by SDPA

        out = self.taca_attention(query, key, value, text_seq_length, taca_gamma, attention_mask,
                                  token_mask=token_mask)
        if out is None:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                 is_causal=False)
        hidden_states = out.transpose(1, 2).flatten(2, 3)
        hidden_states = hidden_states.type_as(query)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1
        )
        return hidden_states, encoder_hidden_states


@register
class CogView4Adapter(Adapter):
    name = "cogview4"
    label = "CogView4Transformer2DModel (CogView4)"
    transformer_classes = ("CogView4Transformer2DModel",)
    stock_processors = frozenset({"CogView4AttnProcessor"})
    timestep = "scheduler"  # the unshifted t: sigma = scheduler.sigmas[i] where timesteps[i] == t
    kwargs_name = "attention_kwargs"
    pipeline_t_is_1000_sigma = False  # _current_timestep is the unshifted t
    pipelines = ("CogView4Pipeline",)
    negative_prompt = True
    max_sequence_length = 1024

    def processor(self, name, module):
        return TacaCogView4AttnProcessor(name)
