"""Motif-Video (T2V, I2V): ``MotifVideoTransformer3DModel``, ``MotifVideoAttention`` modules with
``MotifVideoAttnProcessor2_0`` in the dual-stream (``transformer_blocks``) and single-stream
(``single_transformer_blocks``) blocks.

Video first: ``[video, image_embeds, txt]``, layout (B, N, H, D). Both block types hand the context
block (``encoder_hidden_states = [image_embeds, txt]``; I2V only puts the SigLIP ``image_embeds`` in
front) to the processor separately, RoPE on the video only. The image-embed tokens are visual tokens
(as FLUX Kontext's and Qwen-Image-Edit's references are here): their queries get gamma on the text
keys, and they are not text keys. So the text keys are the LAST ``encoder_hidden_states.shape[1] -
image_embeds.shape[1]`` tokens; the hook passes ``image_embeds.shape[1]`` (0 without them).

The model's key mask (bool (B, 1, 1, N): True for video and image keys and where
``encoder_attention_mask`` is set, per token) is kept as stock, so padded text stays removed.

Left stock (no TACA):
- the "decoder" single-stream layers (the last ``num_decoder_layers``): their context is the video
  itself, not text, and they get no mask; their modules keep ``MotifVideoAttnProcessor2_0``;
- the optional text cross-attention (``cross_attn``, ``MotifVideoCrossAttnProcessor2_0``,
  ``enable_text_cross_attention_*``): video queries against text keys ONLY, a softmax of its own. TACA
  rescales visual-to-text logits against visual-to-visual ones inside one joint softmax; with text the
  only keys, gamma would be a plain softmax temperature, which is not the paper's method.

The blocks pass no attention kwargs to the processors (the forward keeps ``attention_kwargs`` for the
LoRA scale): the hook hands them the state (``kwargs_name = None``). The pipelines pass the
scheduler's raw t (sigma = t / 1000).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..processors import TacaProcessor
from . import Adapter, attention_modules, register
from .hunyuanimage import joint_qkv, split_project


class TacaMotifVideoAttnProcessor(TacaProcessor):
    """TACA for Motif-Video's joint ``attn``: ``MotifVideoAttnProcessor2_0`` op for op; returns
    ``(video, context)`` (or the projected video without context); gamma and the image-token count
    from :meth:`call_arg`."""

    text_first = False
    layout = "bnhd"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        image_rotary_emb: Optional[torch.Tensor] = None,
    ):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        # MotifVideoAttnProcessor2_0 prepares q, k, v exactly as HunyuanImage's processor
        query, key, value = joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)

        out = None
        if encoder_hidden_states is not None:
            out = self.taca_attention(query, key, value, self._text_len(encoder_hidden_states.shape[1]),
                                      self.call_arg("taca_gamma"), attention_mask)
        if out is None:
            out = dispatch_attention_fn(
                query, key, value, attn_mask=attention_mask,
                backend=self._attention_backend, parallel_config=self._parallel_config,
            )
        hidden_states = out.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            return split_project(attn, hidden_states, encoder_hidden_states.shape[1])

        if attn.to_out is not None:
            hidden_states = attn.to_out[0](hidden_states)
            hidden_states = attn.to_out[1](hidden_states)
        return hidden_states

    def _text_len(self, n_ctx: int) -> int:
        """The text tokens of the context block: all but its leading image-embed tokens."""
        n_img = self.call_arg("taca_image_tokens", 0)
        if not 0 <= n_img <= n_ctx:
            raise ValueError(f"taca: {self.name}: {n_img} image-embed tokens do not fit the {n_ctx}-token context")
        return n_ctx - n_img


@register
class MotifVideoAdapter(Adapter):
    name = "motif_video"
    label = "MotifVideoTransformer3DModel (Motif-Video)"
    transformer_classes = ("MotifVideoTransformer3DModel",)
    stock_processors = frozenset({"MotifVideoAttnProcessor2_0"})
    timestep = "t1000"
    kwargs_name = None  # the blocks forward no attention kwargs to the processors
    # taca generate writes images; the video pipelines are supported through taca.enable(pipe) only
    pipelines = ()
    max_sequence_length = 512

    def joint_modules(self) -> Dict[str, torch.nn.Module]:
        t = self.transformer
        n_single = len(t.single_transformer_blocks)
        n_dec = int(getattr(t, "num_decoder_layers", 0) or 0)
        names = {f"transformer_blocks.{i}.attn" for i in range(len(t.transformer_blocks))}
        # the decoder layers (the last n_dec) attend video to video: stock; cross_attn: stock (see above)
        names |= {f"single_transformer_blocks.{i}.attn" for i in range(n_single - n_dec)}
        return {n: m for n, m in attention_modules(t).items() if n in names}

    def processor(self, name, module):
        return TacaMotifVideoAttnProcessor(name)

    def call_state(self, arg):
        img = arg("image_embeds")
        return {"taca_image_tokens": 0 if img is None else int(img.shape[1])}
