"""CogView3-Plus: ``CogView3PlusTransformer2DModel``, legacy ``Attention`` modules (``attn1`` of every
block) with ``CogVideoXAttnProcessor2_0``, as CogVideoX.

Text first: ``[txt (the pipeline's 224 T5 tokens), img]``, layout (B, H, N, D), every block joint, no
RoPE (learned positions added in the patch embedding), LayerNorm QK-norm. ``CogView3PlusPipeline`` pads
every prompt to ``max_sequence_length`` and passes no mask (an absent negative prompt becomes zeros),
so all text keys are text.

The blocks call ``attn1`` without attention kwargs and the transformer's ``forward`` takes none:
``kwargs_name = None``, the hook hands the processors their state (:meth:`TacaProcessor.call_arg`).

The timestep: the pipeline's schedulers are CogVideoX's DDPM-style ``CogVideoXDDIMScheduler`` /
``CogVideoXDPMScheduler`` (discrete t in [0, 999]); taca applies the paper's rule on the 1000-step
training grid, t >= 970 (``timestep = "t1000"``), as for CogVideoX (see ``taca.models.cogvideox``).
"""
from __future__ import annotations

from . import Adapter, register
from .cogvideox import TacaCogVideoXAttnProcessor


@register
class CogView3PlusAdapter(Adapter):
    name = "cogview3plus"
    label = "CogView3PlusTransformer2DModel (CogView3-Plus)"
    transformer_classes = ("CogView3PlusTransformer2DModel",)
    stock_processors = frozenset({"CogVideoXAttnProcessor2_0"})
    timestep = "t1000"  # DDPM t in [0, 999]: the paper's rule on the 1000-step grid, t >= 970
    kwargs_name = None
    pipelines = ("CogView3PlusPipeline",)
    negative_prompt = True
    max_sequence_length = 224

    def processor(self, name, module):
        return TacaCogVideoXAttnProcessor(name)
