"""Chroma: ``ChromaTransformer2DModel``, ``FluxAttention`` modules with ``FluxAttnProcessor``.

As FLUX.1 (text first, layout (B, N, H, D), the transformer takes sigma), plus an attention mask:
the pipeline's 0/1 text mask becomes a FLOAT (B, 1, N, N) outer product that SDPA ADDS to the
logits (+1 where both tokens are valid, 0 elsewhere: nothing is masked out). TACA reproduces that
exactly: the same float mask is added after scale and gamma (``taca.joint_attention(attn_mask=)``).
"""
from __future__ import annotations

from . import Adapter, register
from .flux import TacaFluxAttnProcessor


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
