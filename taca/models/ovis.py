"""Ovis-Image: ``OvisImageTransformer2DModel``, ``OvisImageAttention`` modules with
``OvisImageAttnProcessor`` (a FLUX.1 clone).

Text first ([txt, img]), layout (B, N, H, D), 6 double- and 27 single-stream blocks, no
attention mask: the pipeline zeroes the embeddings of padded prompt tokens (up to
``max_sequence_length``, 256 by default) but keeps them as keys, so gamma scales them too (as
FLUX's T5 padding). Attention kwargs reach every block through ``joint_attention_kwargs``. The
transformer takes sigma in [0, 1] (the pipeline passes ``t / 1000`` in the latents' dtype).
"""
from __future__ import annotations

from . import Adapter, register
from ._fluxlike import TacaFluxLikeProcessor

_MODULE = "diffusers.models.transformers.transformer_ovis_image"


@register
class OvisImageAdapter(Adapter):
    name = "ovis"
    label = "OvisImageTransformer2DModel (Ovis-Image)"
    transformer_classes = ("OvisImageTransformer2DModel",)
    stock_processors = frozenset({"OvisImageAttnProcessor"})
    timestep = "sigma"
    # diffusers 0.42.1: _current_timestep = t, then timestep = t.expand(B).to(latents.dtype), passed / 1000
    current_t_pipelines = frozenset({"OvisImagePipeline"})
    pipelines = ("OvisImagePipeline",)
    negative_prompt = True
    max_sequence_length = 256

    def processor(self, name, module):
        return TacaFluxLikeProcessor(name, _MODULE)
