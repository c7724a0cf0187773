"""HunyuanVideo (T2V, I2V, SkyReels I2V): ``HunyuanVideoTransformer3DModel``, legacy ``Attention``
modules with ``HunyuanVideoAttnProcessor2_0`` in the double-stream (``transformer_blocks``) and
single-stream (``single_transformer_blocks``) blocks, including the I2V token-replace variants.

Video first, text last: ``[video, txt]``, layout (B, N, H, D); both block types hand the text to the
processor separately (the single-stream one concatenates it inside), so the text length is
``encoder_hidden_states.shape[1]``. The ``context_embedder``'s token refiner (text-only attention,
``AttnProcessor2_0``) keeps its stock processor. The model ALWAYS passes a bool key mask
(B, 1, 1, N): True for the video and for the first ``encoder_attention_mask[b].sum()`` text tokens of
sample b (count based); it is kept as is, so padded text keys stay removed for every query and
per-sample valid lengths are exact. In image-to-video the LLaVA text stream also carries the
reference image's tokens: they are keys of the text stream and get gamma like the prompt (as Qwen-Image
Edit's vision tokens do). RoPE is on the video only.

The blocks pass no attention kwargs to the processors: the hook hands them the state
(``kwargs_name = None``). The transformer takes the raw t (sigma = t / 1000).
"""
from __future__ import annotations

from typing import Dict

import torch

from . import Adapter, attention_modules, register
from .hunyuanimage import TacaHunyuanImageAttnProcessor


class TacaHunyuanVideoAttnProcessor(TacaHunyuanImageAttnProcessor):
    """TACA for HunyuanVideo's joint ``attn``: ``HunyuanVideoAttnProcessor2_0`` takes the same steps as
    HunyuanImage's processor (which diffusers copied from it), so this is that TACA processor; returns
    ``(video, txt)``."""


@register
class HunyuanVideoAdapter(Adapter):
    name = "hunyuan_video"
    label = "HunyuanVideoTransformer3DModel (HunyuanVideo)"
    transformer_classes = ("HunyuanVideoTransformer3DModel",)
    stock_processors = frozenset({"HunyuanVideoAttnProcessor2_0"})
    timestep = "t1000"
    kwargs_name = None  # the blocks forward no attention kwargs to the processors
    # taca generate writes images; the video pipelines are supported through taca.enable(pipe) only
    pipelines = ()
    max_sequence_length = 256

    def joint_modules(self) -> Dict[str, torch.nn.Module]:
        return {n: m for n, m in attention_modules(self.transformer).items()
                if n.startswith(("transformer_blocks.", "single_transformer_blocks."))}

    def processor(self, name, module):
        return TacaHunyuanVideoAttnProcessor(name)

    def call_state(self, arg):
        return {}  # the processors read the text length from encoder_hidden_states
