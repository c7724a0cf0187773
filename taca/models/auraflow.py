"""AuraFlow: ``AuraFlowTransformer2DModel``, legacy ``Attention`` modules with
``AuraFlowAttnProcessor2_0`` (``FusedAuraFlowAttnProcessor2_0`` after ``fuse_qkv_projections``).

Joint sequence: ``[8 register tokens, txt, img]`` in every block. The model prepends its learned
register tokens to the projected caption (``register_tokens``, L364 / L442 in diffusers 0.42.1),
so the MMDiT blocks' ``encoder_hidden_states`` holds [registers, txt] and the single-DiT blocks
see the concatenated [registers, txt, img] only.

Registers are NOT text. The paper scales the logits of image queries on TEXT keys (the prompt);
the registers carry no prompt content (the same learned vectors for every prompt), so their keys
are never scaled. TACA's two-way split puts every token that is not text on the visual side: a
register query is treated like an image query (gamma on its logits against text keys), and
``gamma_reverse`` acts on text queries against register and image keys. Text keys are therefore
``[R, R + L_txt)`` with R = ``register_tokens.shape[1]`` (8): a span that does not start at 0, which
needs a ``taca.joint_attention`` with ``text_start``; without one the processors raise
NotImplementedError when gamma is on (rather than scale the registers or the wrong tokens).

L_txt is what the pipeline passes: ``AuraFlowPipeline`` pads every prompt to
``max_sequence_length`` (256) and zeroes the padded embeddings (no attention mask: they stay in the
stock softmax, so they are text keys and get gamma like the rest of the text block). The MMDiT
blocks read it from ``encoder_hidden_states``; the single blocks get it from the hook
(``taca_text_len``). Layout (B, H, N, D), scale ``attn.scale``, no mask, no RoPE. The transformer
takes sigma in [0, 1] (the pipeline passes ``t / 1000``, a fresh tensor: the hook takes its sync
path).

Gradient checkpointing: diffusers 0.42.1's forward calls its checkpointed joint blocks as
(hidden_states, encoder_hidden_states, temb) and its single-DiT blocks as (hidden_states, temb),
without the ``attention_kwargs`` its plain branch passes (so without TACA's gamma and text length);
the adapter hands them back (:meth:`AuraFlowAdapter.checkpointed_args`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..processors import TacaProcessor
from . import Adapter, register


class TacaAuraFlowAttnProcessor(TacaProcessor):
    """TACA for AuraFlow's ``Attention`` modules (MMDiT: returns ``(img, txt)``; single DiT: the
    joint sequence). Same computation as ``AuraFlowAttnProcessor2_0`` or, for a module that had
    ``FusedAuraFlowAttnProcessor2_0`` when TACA was enabled, as that one."""

    text_first = True
    layout = "bhnd"

    def __init__(self, name: str, n_registers: int, fused: bool = False, **kw):
        super().__init__(name, **kw)
        self.n_registers = int(n_registers)
        self.fused = bool(fused)  # reproduce FusedAuraFlowAttnProcessor2_0 (to_qkv, to_added_qkv)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,  # ignored, as stock (the model never passes one)
        taca_gamma: Optional[torch.Tensor] = None,
        taca_text_len: Optional[int] = None,
    ):
        batch_size = hidden_states.shape[0]
        fused = self.fused

        if fused:
            qkv = attn.to_qkv(hidden_states)
            split_size = qkv.shape[-1] // 3
            query, key, value = torch.split(qkv, split_size, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            key = attn.to_k(hidden_states)
            value = attn.to_v(hidden_states)

        if encoder_hidden_states is not None:
            if fused:
                encoder_qkv = attn.to_added_qkv(encoder_hidden_states)
                split_size = encoder_qkv.shape[-1] // 3
                e_q, e_k, e_v = torch.split(encoder_qkv, split_size, dim=-1)
            else:
                e_q = attn.add_q_proj(encoder_hidden_states)
                e_k = attn.add_k_proj(encoder_hidden_states)
                e_v = attn.add_v_proj(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim)
        key = key.view(batch_size, -1, attn.heads, head_dim)
        value = value.view(batch_size, -1, attn.heads, head_dim)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if encoder_hidden_states is not None:
            e_q = e_q.view(batch_size, -1, attn.heads, head_dim)
            e_k = e_k.view(batch_size, -1, attn.heads, head_dim)
            e_v = e_v.view(batch_size, -1, attn.heads, head_dim)
            if attn.norm_added_q is not None:
                e_q = attn.norm_added_q(e_q)
            if attn.norm_added_k is not None:
                e_k = attn.norm_added_k(e_k)
            query = torch.cat([e_q, query], dim=1)
            key = torch.cat([e_k, key], dim=1)
            value = torch.cat([e_v, value], dim=1)

        query = query.transpose(1, 2)
        key = key.transpose(1, 2)
        value = value.transpose(1, 2)

        if encoder_hidden_states is not None:
            text_len = encoder_hidden_states.shape[1] - self.n_registers
        else:
            text_len = taca_text_len
        out = self.taca_attention(query, key, value, text_len, taca_gamma, text_start=self.n_registers,
                                  scale=attn.scale)
        if out is None:
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, scale=attn.scale, is_causal=False)
        hidden_states = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, encoder_hidden_states.shape[1]:],
                hidden_states[:, : encoder_hidden_states.shape[1]],
            )

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
            return hidden_states, encoder_hidden_states
        return hidden_states


@register
class AuraFlowAdapter(Adapter):
    name = "auraflow"
    label = "AuraFlowTransformer2DModel (AuraFlow)"
    transformer_classes = ("AuraFlowTransformer2DModel",)
    stock_processors = frozenset({"AuraFlowAttnProcessor2_0", "FusedAuraFlowAttnProcessor2_0"})
    timestep = "sigma"
    kwargs_name = "attention_kwargs"
    # AuraFlowPipeline passes torch.tensor([t / 1000]).expand(B) and sets no _current_timestep
    current_t_pipelines = frozenset()
    pipelines = ("AuraFlowPipeline",)
    negative_prompt = True
    max_sequence_length = 256

    def processor(self, name, module):
        fused = type(module.processor).__name__ == "FusedAuraFlowAttnProcessor2_0"
        return TacaAuraFlowAttnProcessor(name, self.transformer.register_tokens.shape[1], fused=fused)

    def checkpointed_args(self, block, args, arg):
        """Joint blocks take (hidden_states, encoder_hidden_states, temb, attention_kwargs), single-DiT
        blocks (hidden_states, temb, attention_kwargs); the checkpointing branch passes all but the last
        (a diffusers that passes them all is left as it is)."""
        from diffusers.models.transformers.auraflow_transformer_2d import AuraFlowJointTransformerBlock

        full = 4 if isinstance(block, AuraFlowJointTransformerBlock) else 3
        if len(args) >= full:
            return args
        return args + (arg("attention_kwargs"),)
