"""Mochi 1: ``MochiTransformer3DModel``, ``MochiAttention`` modules (``attn1`` of every block) with
``MochiAttnProcessor2_0``.

The stock processor runs ONE SDPA call PER SAMPLE over ``[video, valid text]``: it gathers sample b's
text tokens where ``encoder_attention_mask[b]`` is set (the padding is dropped, not masked), so each
call has B = 1, layout (1, H, N, D) and text LAST with ``text_len = mask[b].sum()``. TACA does the same
per-sample call with that sample's gamma (the batch's (B,) gamma sliced), so CFG's batch [negative,
prompt] with different valid lengths is exact. No mask reaches the attention, and the op needs no
per-sample spans. RoPE is on the video only.

The blocks pass no attention kwargs to the processors: the hook hands them the state
(``kwargs_name = None``). The transformer takes the REVERSED time (1 - sigma) * 1000 (the pipeline's
scheduler has ``invert_sigmas=True``; ``_current_timestep`` is 1000 - t = 1000 sigma).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..processors import TacaProcessor
from . import Adapter, register


class TacaMochiAttnProcessor(TacaProcessor):
    """TACA for Mochi's ``attn1``: same computation as ``MochiAttnProcessor2_0``, one attention call per
    sample; returns ``(video, txt)``."""

    text_first = False
    layout = "bhnd"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        image_rotary_emb: Optional[torch.Tensor] = None,
    ):
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

        if image_rotary_emb is not None:

            def apply_rotary_emb(x, freqs_cos, freqs_sin):
                x_even = x[..., 0::2].float()
                x_odd = x[..., 1::2].float()

                cos = (x_even * freqs_cos - x_odd * freqs_sin).to(x.dtype)
                sin = (x_even * freqs_sin + x_odd * freqs_cos).to(x.dtype)

                return torch.stack([cos, sin], dim=-1).flatten(-2)

            query = apply_rotary_emb(query, *image_rotary_emb)
            key = apply_rotary_emb(key, *image_rotary_emb)

        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        encoder_query, encoder_key, encoder_value = (
            encoder_query.transpose(1, 2),
            encoder_key.transpose(1, 2),
            encoder_value.transpose(1, 2),
        )

        sequence_length = query.size(2)
        encoder_sequence_length = encoder_query.size(2)
        total_length = sequence_length + encoder_sequence_length

        gamma = self.call_arg("taca_gamma")
        batch_size, heads, _, dim = query.shape
        attn_outputs = []
        for idx in range(batch_size):
            mask = attention_mask[idx][None, :]
            valid_prompt_token_indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()

            valid_encoder_query = encoder_query[idx : idx + 1, :, valid_prompt_token_indices, :]
            valid_encoder_key = encoder_key[idx : idx + 1, :, valid_prompt_token_indices, :]
            valid_encoder_value = encoder_value[idx : idx + 1, :, valid_prompt_token_indices, :]

            valid_query = torch.cat([query[idx : idx + 1], valid_encoder_query], dim=2)
            valid_key = torch.cat([key[idx : idx + 1], valid_encoder_key], dim=2)
            valid_value = torch.cat([value[idx : idx + 1], valid_encoder_value], dim=2)

            n_text = valid_prompt_token_indices.numel()
            attn_output = self.taca_attention(valid_query, valid_key, valid_value, n_text if n_text else None,
                                              None if gamma is None else gamma[idx : idx + 1])
            if attn_output is None:
                attn_output = F.scaled_dot_product_attention(
                    valid_query, valid_key, valid_value, dropout_p=0.0, is_causal=False
                )
            valid_sequence_length = attn_output.size(2)
            attn_output = F.pad(attn_output, (0, 0, 0, total_length - valid_sequence_length))
            attn_outputs.append(attn_output)

        hidden_states = torch.cat(attn_outputs, dim=0)
        hidden_states = hidden_states.transpose(1, 2).flatten(2, 3)

        hidden_states, encoder_hidden_states = hidden_states.split_with_sizes(
            (sequence_length, encoder_sequence_length), dim=1
        )

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if hasattr(attn, "to_add_out"):
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        return hidden_states, encoder_hidden_states


@register
class MochiAdapter(Adapter):
    name = "mochi"
    label = "MochiTransformer3DModel (Mochi 1)"
    transformer_classes = ("MochiTransformer3DModel",)
    stock_processors = frozenset({"MochiAttnProcessor2_0"})
    timestep = "1-t1000"
    # _current_timestep is a fresh 1000 - t (not a view the hook can read without a sync); the
    # timestep passed is a view of the scheduler's timesteps, which the hook reads on the host
    pipeline_t_is_1000_sigma = False
    kwargs_name = None  # the blocks forward no attention kwargs to the processors
    # taca generate writes images; the video pipelines are supported through taca.enable(pipe) only
    pipelines = ()
    max_sequence_length = 256

    def joint_modules(self):
        # MochiAttention has a ``processor`` attribute but no ``set_processor`` (taca.pipeline sets the
        # attribute), so the default attention_modules() does not see it
        from diffusers.models.attention_processor import MochiAttention

        return {n: m for n, m in self.transformer.named_modules() if isinstance(m, MochiAttention)}

    def processor(self, name, module):
        return TacaMochiAttnProcessor(name)

    def call_state(self, arg):
        return {}  # the processors count each sample's valid text tokens themselves
