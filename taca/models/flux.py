"""FLUX.1 and FLUX.1 Kontext: ``FluxTransformer2DModel``, ``FluxAttention`` modules.

Text first ([txt, img], Kontext's conditioning tokens after the image are visual tokens), layout
(B, N, H, D). Double-stream blocks know the text length from ``encoder_hidden_states``; single-
stream blocks see the joint sequence and get ``taca_text_len`` from the hook. The transformer
takes sigma in [0, 1] (the pipelines pass ``t / 1000`` in the latents' dtype).
"""
from __future__ import annotations

from . import Adapter, register
from ._fluxlike import TacaFluxLikeProcessor


class TacaFluxAttnProcessor(TacaFluxLikeProcessor):
    """TACA for ``FluxAttention`` (FLUX.1, FLUX Kontext, Chroma): text first, layout (B, N, H, D).

    Double-stream blocks (``encoder_hidden_states`` given) return ``(img, txt)``; single-stream
    blocks get the joint sequence and return it. QKV projections go through diffusers' own
    ``_get_qkv_projections`` (so ``fuse_qkv_projections`` works); QK RMSNorm and RoPE as stock.
    An attention mask (Chroma's additive one) is passed on as the stock processor passes it.
    ``FluxAttnProcessor`` is the processor the FLUX.1 clones copied: the same steps, with
    transformer_flux's own functions and the attention output made contiguous before ``to_out``.
    """

    def __init__(self, name: str, **kw):
        super().__init__(name, "diffusers.models.transformers.transformer_flux", contiguous_out=True, **kw)


@register
class FluxAdapter(Adapter):
    name = "flux"
    label = "FluxTransformer2DModel (FLUX.1, FLUX Kontext)"
    transformer_classes = ("FluxTransformer2DModel",)
    stock_processors = frozenset({"FluxAttnProcessor", "FluxAttnProcessor2_0", "FusedFluxAttnProcessor2_0"})
    timestep = "sigma"
    # diffusers 0.42.1: these set self._current_timestep = t, then call the transformer with
    # timestep = t.expand(B).to(latents.dtype) / 1000
    current_t_pipelines = frozenset({"FluxPipeline", "FluxKontextPipeline", "FluxKontextInpaintPipeline"})
    pipelines = ("FluxPipeline", "FluxKontextPipeline")

    @classmethod
    def serves_pipeline(cls, name):
        return name.startswith("Flux") and not name.startswith("Flux2")  # FluxImg2Img, Fill, Control, ...

    def processor(self, name, module):
        return TacaFluxAttnProcessor(name)
