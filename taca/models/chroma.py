"""Chroma: ``ChromaTransformer2DModel``, ``FluxAttention`` modules with ``FluxAttnProcessor``.

As FLUX.1 (text first, layout (B, N, H, D), the transformer takes sigma), plus an attention mask:
the pipeline's 0/1 text mask becomes a FLOAT (B, 1, N, N) outer product that SDPA ADDS to the
logits (+1 where both tokens are valid, 0 elsewhere: nothing is masked out). TACA reproduces that
exactly: the same float mask is added after scale and gamma (``taca.joint_attention(attn_mask=)``).
On CUDA that product runs as a key mask (``taca.ops``: the m_i = 0 rows apart); the adapter hands the
processors the transformer's (B, N) mask, so the blocks' masks are checked once per block kind and call.

Gradient checkpointing: diffusers 0.42.1's forward calls its checkpointed blocks without
``joint_attention_kwargs`` (so without TACA's gamma) and its single-stream blocks also without
``attention_mask``; the adapter hands them both back (:func:`full_block_args`), so a checkpointed
forward and its recomputation compute what the plain forward does.
"""
from __future__ import annotations

import torch

from . import Adapter, register
from .flux import TacaFluxAttnProcessor


def full_block_args(block, args: tuple, attention_mask, joint_attention_kwargs) -> tuple:
    """A Chroma block's positional arguments with those the checkpointing branch drops put back:
    double-stream blocks take (hidden_states, encoder_hidden_states, temb, image_rotary_emb,
    attention_mask, joint_attention_kwargs) and get the first 5, single-stream blocks take
    (hidden_states, temb, image_rotary_emb, attention_mask, joint_attention_kwargs) and get the
    first 3 (a diffusers that passes them all is left as it is)."""
    from diffusers.models.transformers.transformer_chroma import ChromaTransformerBlock

    full = 6 if isinstance(block, ChromaTransformerBlock) else 5
    if len(args) >= full:
        return args
    return args + (attention_mask, joint_attention_kwargs)[len(args) - full:]


@register
class ChromaAdapter(Adapter):
    name = "chroma"
    label = "ChromaTransformer2DModel (Chroma)"
    transformer_classes = ("ChromaTransformer2DModel",)
    stock_processors = frozenset({"FluxAttnProcessor", "FluxAttnProcessor2_0", "FusedFluxAttnProcessor2_0"})
    timestep = "sigma"
    # diffusers 0.42.1: _current_timestep = t, then timestep = t.expand(B).to(latents.dtype) / 1000
    # (ChromaImg2ImgPipeline builds its timestep differently: it takes the sync path)
    current_t_pipelines = frozenset({"ChromaPipeline", "ChromaInpaintPipeline"})
    pipelines = ("ChromaPipeline",)
    negative_prompt = True

    def processor(self, name, module):
        return TacaFluxAttnProcessor(name)

    def call_state(self, arg):
        # every block builds its (B, 1, N, N) mask as m[:, None, None, :] * m[:, None, :, None] from the
        # transformer's (B, N) attention_mask m: naming m lets the op check the first mask of each block kind and
        # take the others as that product (a key-mask kernel call, not a read of every block's N x N mask)
        state = super().call_state(arg)
        m = arg("attention_mask")
        if isinstance(m, torch.Tensor) and m.dim() == 2:
            state["taca_token_mask"] = m
        return state

    def checkpointed_args(self, block, args, arg):
        return full_block_args(block, args, arg("attention_mask"), arg("joint_attention_kwargs"))
