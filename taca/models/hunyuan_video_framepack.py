"""HunyuanVideo Framepack (FramePack I2V, FramePack F1): ``HunyuanVideoFramepackTransformer3DModel``,
HunyuanVideo's double- and single-stream blocks with ``HunyuanVideoAttnProcessor2_0``.

Joint sequence ``[history_4x, history_2x, clean, noisy video, SigLIP image_embeds, txt]``, layout
(B, N, H, D). The model concatenates the projected SigLIP image tokens IN FRONT of the refined text
(``encoder_hidden_states = [image_embeds, txt]``) and hands that block to every processor as its
``encoder_hidden_states``; the image tokens are visual tokens (as FLUX Kontext's and Qwen-Image-Edit's
references are here), so the text keys are the LAST ``encoder_hidden_states.shape[1] -
image_embeds.shape[1]`` tokens and the image-embed queries get gamma on them like the video and
history queries. The hook passes ``image_embeds.shape[1]`` (a shape: no host sync) and the processor
subtracts it.

The model's key mask is count based: batch 1 truncates ``encoder_hidden_states`` to ``n_img +
encoder_attention_mask.sum()`` tokens and passes no mask (so the text block is the valid prompt);
batches > 1 pass a bool (B, 1, 1, N) mask, True for the first ``N_vis + n_img + sum(mask[b])``
tokens. Both are kept exactly as stock (padded text keys stay removed). The token refiner
(``context_embedder``, ``AttnProcessor2_0``) stays stock. The blocks pass no attention kwargs, so the
hook hands the processors the state (``kwargs_name = None``). The pipeline passes the scheduler's raw
t (sigma = t / 1000).
"""
from __future__ import annotations

from typing import Dict

import torch

from . import Adapter, attention_modules, register
from .hunyuan_video import TacaHunyuanVideoAttnProcessor


class TacaFramepackAttnProcessor(TacaHunyuanVideoAttnProcessor):
    """HunyuanVideo's TACA processor (``HunyuanVideoAttnProcessor2_0`` op for op) whose text keys
    are the context block less its leading SigLIP image tokens (``taca_image_tokens`` from the hook)."""

    def taca_attention(self, q, k, v, text_len, gamma, attn_mask=None, **kw):
        n_img = self.call_arg("taca_image_tokens")
        if text_len is not None and gamma is not None and n_img is None:
            raise RuntimeError(f"taca: {self.name}: called with gamma but without the hook's image-token count")
        if text_len is not None and n_img is not None:
            if not 0 <= n_img <= text_len:
                raise ValueError(
                    f"taca: {self.name}: {n_img} image-embed tokens do not fit the {text_len}-token context block"
                )
            text_len = text_len - n_img
        return super().taca_attention(q, k, v, text_len, gamma, attn_mask, **kw)


@register
class HunyuanVideoFramepackAdapter(Adapter):
    name = "hunyuan_video_framepack"
    label = "HunyuanVideoFramepackTransformer3DModel (HunyuanVideo Framepack)"
    transformer_classes = ("HunyuanVideoFramepackTransformer3DModel",)
    stock_processors = frozenset({"HunyuanVideoAttnProcessor2_0"})
    timestep = "t1000"
    kwargs_name = None  # the blocks forward no attention kwargs to the processors
    # image-to-video only (an image is required): supported through taca.enable(pipe), not taca generate
    pipelines = ()
    max_sequence_length = 256

    def joint_modules(self) -> Dict[str, torch.nn.Module]:
        # the token refiner (context_embedder.*) is text-only self-attention: stock
        return {n: m for n, m in attention_modules(self.transformer).items()
                if n.startswith(("transformer_blocks.", "single_transformer_blocks."))}

    def processor(self, name, module):
        return TacaFramepackAttnProcessor(name)

    def call_state(self, arg):
        img = arg("image_embeds")
        if img is None:
            raise ValueError(
                "taca: HunyuanVideoFramepackTransformer3DModel was called without image_embeds; the model needs "
                "them (its SigLIP tokens precede the text in every joint attention call)"
            )
        return {"taca_image_tokens": int(img.shape[1])}
