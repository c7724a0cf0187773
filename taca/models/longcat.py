"""LongCat-Image and LongCat-Image-Edit: ``LongCatImageTransformer2DModel``, ``LongCatImageAttention``
modules with ``LongCatImageAttnProcessor`` (a FLUX.1 clone).

Text first ([txt, img]; LongCat-Image-Edit appends the reference image's latents after the image,
[txt, img, ref]: visual tokens, gamma applies to their queries on text keys), layout (B, N, H, D),
19 double- and 38 single-stream blocks, no attention mask. The text block is what the pipeline
passes (the Qwen2.5-VL hidden states without the chat template's prefix and suffix, padded to
512 tokens); those keys are all scaled, as FLUX's T5 padding is. The transformer's forward takes
no attention kwargs, so the hook hands the processors their state directly (``kwargs_name``
None). It takes sigma in [0, 1] (the pipelines pass ``t / 1000`` in the latents' dtype).
"""
from __future__ import annotations

from . import Adapter, register
from ._fluxlike import TacaFluxLikeProcessor

_MODULE = "diffusers.models.transformers.transformer_longcat_image"


@register
class LongCatImageAdapter(Adapter):
    name = "longcat"
    label = "LongCatImageTransformer2DModel (LongCat-Image, LongCat-Image-Edit)"
    transformer_classes = ("LongCatImageTransformer2DModel",)
    stock_processors = frozenset({"LongCatImageAttnProcessor"})
    timestep = "sigma"
    kwargs_name = None
    # diffusers 0.42.1: _current_timestep = t, then timestep = t.expand(B).to(latents.dtype), passed / 1000
    current_t_pipelines = frozenset({"LongCatImagePipeline", "LongCatImageEditPipeline"})
    pipelines = ("LongCatImagePipeline",)
    takes_max_sequence_length = False  # its __call__ has no max_sequence_length
    negative_prompt = True
    max_sequence_length = 512

    def processor(self, name, module):
        return TacaFluxLikeProcessor(name, _MODULE, from_state=True)
