"""HunyuanVideo 1.5 (T2V, I2V): ``HunyuanVideo15Transformer3DModel``, legacy ``Attention`` modules with
``HunyuanVideo15AttnProcessor2_0`` in the double-stream ``transformer_blocks`` (the only joint blocks).

Video first, context last: ``[video, ctx]``, layout (B, N, H, D). Before the blocks the model reorders
the context of every sample to ``[valid SigLIP image, valid byT5, valid mLLM, invalid image, invalid
byT5 (zeroed), invalid mLLM (zeroed)]`` and passes the matching bool ``encoder_attention_mask`` (B, L_ctx).
The stock processor pads it with True for the video and builds the OUTER-AND bool mask (B, 1, N, N):
an invalid context token is removed as a key for every query, and its own query row is fully masked
(stock SDPA gives 0 there; so does ``taca.joint_attention``). TACA keeps that mask's meaning; on CUDA it
runs it as the (B, 1, 1, N) key mask of the valid tokens with the invalid tokens' rows set to 0, and never
builds the (B, 1, N, N) mask (N^2 bytes a sample).

What counts as text: the whole context block ``[N_vid, N)``, i.e. the byT5 glyph text, the mLLM prompt
AND, in image-to-video, the SigLIP tokens of the reference image. The paper scales the keys of the
conditioning stream that the image queries read; the SigLIP tokens are keys of that stream (they
enter through ``encoder_hidden_states``, share its projections, and are never queries of the noisy
video), exactly like the Qwen2.5-VL vision tokens of Qwen-Image-Edit's text stream and the LLaVA image
tokens of HunyuanVideo I2V, which taca also treats as text keys. In text-to-video the SigLIP slots are
all invalid (masked), so only the prompt's valid byT5 / mLLM keys carry gamma. Scaling the invalid
slots changes nothing (they are removed keys). Context queries are text queries: not scaled.

The blocks pass no attention kwargs to the processors (the transformer's ``attention_kwargs`` carry the
LoRA scale only): the hook hands them the state (``kwargs_name = None``). The text length is
``encoder_hidden_states.shape[1]``. The token refiner (``context_embedder``, text-only
``AttnProcessor2_0``) stays stock. The transformer takes the raw t (pipeline L739:
``t.expand(B)``, t = 1000 sigma); the super-resolution meanflow ``timestep_r`` is left as it is.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .. import telemetry
from ..processors import TacaProcessor
from . import Adapter, attention_modules, register
from .hunyuanimage import joint_qkv, split_project


class TacaHunyuanVideo15AttnProcessor(TacaProcessor):
    """TACA for HunyuanVideo 1.5's joint ``attn``: ``HunyuanVideo15AttnProcessor2_0`` op for op (the
    outer-AND mask included); returns ``(video, ctx)``; gamma from :meth:`call_arg`."""

    text_first = False
    layout = "bnhd"

    def _key_mask_route(self, query: torch.Tensor) -> bool:
        """Whether a TACA call runs the outer-AND mask as a key mask plus zeroed rows (on CUDA, no telemetry
        recording, not FP8) instead of building the (B, 1, N, N) mask."""
        return query.is_cuda and not telemetry.active() and not self.fp8

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        image_rotary_emb: Optional[torch.Tensor] = None,
    ):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        # HunyuanVideo15AttnProcessor2_0 prepares q, k, v exactly as HunyuanImage's processor
        query, key, value = joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)

        batch_size, seq_len, heads, dim = query.shape
        attention_mask = F.pad(attention_mask, (seq_len - attention_mask.shape[1], 0), value=True)
        attention_mask = attention_mask.bool()
        tokens = attention_mask
        text_len = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else None
        gamma = self.call_arg("taca_gamma")
        out = None
        if self._key_mask_route(query):  # (taca_attention gives None with TACA off: the stock path below)
            # the stock mask is tokens_i & tokens_j: a key mask for the rows of valid tokens, every key masked for
            # the rows of invalid ones (0, as the op and stock SDPA give such a row, with no gradient). On CUDA the
            # key mask runs on the kernels' per-tile path and the (B, 1, N, N) mask (N^2 bytes a sample: 1.6 GB at
            # 40k video tokens) is never built; elsewhere (the CPU kernel reads masks element by element anyway,
            # telemetry records the mask) the stock mask as built below.
            out = self.taca_attention(query, key, value, text_len, gamma, tokens[:, None, None, :])
            if out is not None:
                out = out.masked_fill(~tokens[:, :, None, None], 0)
        if out is None:
            self_attn_mask_1 = attention_mask.view(batch_size, 1, 1, seq_len).repeat(1, 1, seq_len, 1)
            self_attn_mask_2 = self_attn_mask_1.transpose(2, 3)
            attention_mask = (self_attn_mask_1 & self_attn_mask_2).bool()
            out = self.taca_attention(query, key, value, text_len, gamma, attention_mask)
        if out is None:
            out = dispatch_attention_fn(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend, parallel_config=self._parallel_config,
            )

        hidden_states = out.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = split_project(attn, hidden_states, encoder_hidden_states.shape[1])
        return hidden_states, encoder_hidden_states


@register
class HunyuanVideo15Adapter(Adapter):
    name = "hunyuan_video15"
    label = "HunyuanVideo15Transformer3DModel (HunyuanVideo 1.5)"
    transformer_classes = ("HunyuanVideo15Transformer3DModel",)
    stock_processors = frozenset({"HunyuanVideo15AttnProcessor2_0"})
    timestep = "t1000"
    kwargs_name = None  # the blocks forward no attention kwargs to the processors
    # taca generate writes images; the video pipelines are supported through taca.enable(pipe) only
    pipelines = ()
    max_sequence_length = 1000

    def joint_modules(self) -> Dict[str, torch.nn.Module]:
        return {n: m for n, m in attention_modules(self.transformer).items() if n.startswith("transformer_blocks.")}

    def processor(self, name, module):
        return TacaHunyuanVideo15AttnProcessor(name)

    def call_state(self, arg):
        return {}  # the processors read the context length from encoder_hidden_states
