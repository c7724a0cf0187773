"""ConsisID: ``ConsisIDTransformer3DModel``, CogVideoX's blocks (legacy ``Attention`` ``attn1`` with
``CogVideoXAttnProcessor2_0``) plus, with ``is_train_face``, perceiver cross-attentions that add the
face embedding into the video tokens between blocks.

Text first: ``[txt (226 T5 tokens), video]``, layout (B, H, N, D), every block joint; the face
perceivers (``PerceiverCrossAttention``, ``LocalFacialExtractor``) are plain modules without a
processor, attend from video to face tokens only, and stay stock. The pipeline pads prompts to 226
tokens without a mask, so all 226 keys are text. The blocks call ``attn1`` without attention kwargs
(the transformer's ``attention_kwargs`` only scale LoRA): ``kwargs_name = None``, the hook hands the
processors their state.

The timestep: ConsisID samples with CogVideoX's DDPM-style ``CogVideoXDPMScheduler`` (discrete t in
[0, 999]); taca applies the paper's rule on the 1000-step training grid, t >= 970, as for CogVideoX.
"""
from __future__ import annotations

from . import Adapter, register
from .cogvideox import TacaCogVideoXAttnProcessor


@register
class ConsisIDAdapter(Adapter):
    name = "consisid"
    label = "ConsisIDTransformer3DModel (ConsisID)"
    transformer_classes = ("ConsisIDTransformer3DModel",)
    stock_processors = frozenset({"CogVideoXAttnProcessor2_0"})
    timestep = "t1000"  # DDPM t in [0, 999]: the paper's rule on the 1000-step grid, t >= 970
    kwargs_name = None
    # video: ConsisIDPipeline is supported through taca.enable(pipe) only (taca generate writes images)
    pipelines = ()
    max_sequence_length = 226

    def processor(self, name, module):
        return TacaCogVideoXAttnProcessor(name)
