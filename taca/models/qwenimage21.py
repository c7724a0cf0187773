"""Qwen-Image 2.1: ``QwenImage21Transformer2DModel``, ``QwenImage21Attention`` modules with
``QwenImage21AttnProcessor`` (the default) or ``QwenImage21FlexAttnProcessor``.

One single-stream sequence: the VLM's text with the condition images' latent tokens spliced in at its
image slots (1 slot = 4 latent tokens), then the target image (transformer_qwenimage21.py L927-939).
Block-causal attention: text is causal, every image block is bidirectional, target queries see
everything. Text queries never meet a visual key in text-to-image, so TACA touches only the calls
whose queries are visual:

- prefill (``kv_cache_mode`` None or "extract"): the stock default processor runs one SDPA call
  per prefix segment, then the target's queries against every key. Text segments stay stock (their
  queries are text: no gamma; their causal bool mask as stock). A condition image's queries (visual)
  attend to the keys before it and its own block; the target's queries to all keys: both go through
  ``taca.joint_attention`` as image-only queries (N_q != N_k) with the stock bool key mask
  (``key_valid``: padded prompt tokens removed).
- decode (``kv_cache_mode`` "cached"): the target's queries against [cached prefix, target] keys with
  the stock key mask: ``taca.joint_attention`` as above.

Text keys are the non-image positions of the joint sequence. Text-to-image: the first L_txt keys.
With condition images they are not contiguous (``[text, cond 1, text, ..., target]``); the op takes
one text span per sample, so the keys (with their values and mask columns) of such a call are
reordered text-first before the op: attention is a sum over keys, so the order of keys is immaterial
(exact; the float64 definition on the stock order is what the tests check).

Refused (ValueError from the hook, before the forward): condition images together with the prefix
KV cache. The cache keeps step 0's condition-image keys / values for every later step; with TACA
those depend on gamma (condition-image queries are visual), so later steps would silently reuse
step 0's gamma. Text-to-image with the cache is exact (text keys / values never see gamma). Pass
``use_kv_cache=False`` to the pipeline for condition images. Also refused: ``gamma_reverse != 1``
with condition images (text queries after a condition image meet visual keys in the stock per-
segment calls, which the image-only op calls do not cover).

The flex processor keeps its stock ``flex_attention`` call (BlockMask) outside the window; inside it
the same decomposition as the default processor is used (exact, not flex's kernel). The forward
passes no attention kwargs to the processors (``attention_kwargs`` only carries the LoRA scale), so
the hook hands them the call's state (``kwargs_name = None``). The pipeline passes
``t.expand(B).to(latents.dtype) / 1000`` = sigma with ``_current_timestep = t``.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Optional, Tuple

import torch

from .. import telemetry
from ..processors import TacaProcessor
from . import Adapter, attention_modules, register


class _Layout:
    """The joint sequence's layout for one transformer call, computed on first use (one host sync)
    and shared by every processor of the call."""

    def __init__(self, img_mask: torch.Tensor, img_shapes):
        self.img_mask = img_mask
        self.img_shapes = img_shapes
        self._segments = None
        self._text = None

    def segments(self) -> List[Tuple[int, int, bool]]:
        """The prefix's (start, end, is_text) runs, as the model derives them for the default processor."""
        if self._segments is None:
            from diffusers.models.transformers.transformer_qwenimage21 import (
                _IMG_TOKENS_PER_SLOT, QwenImage21Transformer2DModel, _qwenimage21_prefix_segments)

            img_mask = self.img_mask
            repeats = torch.where(img_mask, _IMG_TOKENS_PER_SLOT, 1)[0]
            image_pad_mask = torch.repeat_interleave(img_mask[0], repeats)
            image_ids, target = QwenImage21Transformer2DModel.build_token_metadata(image_pad_mask, self.img_shapes[0])
            self._segments = _qwenimage21_prefix_segments(image_ids, int((~target).sum()))
        return self._segments


def _text_positions(segments, end: int) -> List[int]:
    """Text key positions in [0, end): the text segments' tokens."""
    out = []
    for s, e, is_text in segments:
        if is_text and s < end:
            out.extend(range(s, min(e, end)))
    return out


class _TacaQwenImage21Mixin(TacaProcessor):
    """The TACA half shared by both Qwen-Image 2.1 processors (see the module docstring)."""

    text_first = True
    layout = "bnhd"

    def _off(self) -> bool:
        return self.call_arg("taca_gamma") is None and not telemetry.active()

    def _taca_call(self, attn, hidden_states, attention_mask, rotary_emb, layer_cache, kv_cache_mode,
                   cache_write_slice, segments, key_valid):
        from diffusers.models.transformers.transformer_qwenimage21 import _qwenimage21_prepare_qkv

        query, key, value, seq_len_q = _qwenimage21_prepare_qkv(
            attn, hidden_states, rotary_emb, layer_cache, kv_cache_mode, cache_write_slice
        )
        gamma = self.call_arg("taca_gamma")
        layout: Optional[_Layout] = self.call_arg("taca_layout")
        decode = kv_cache_mode == "cached"
        if not decode and segments is None:  # the flex processor: the model built a BlockMask only
            segments = layout.segments()
        if decode:
            prefix = layout.segments()
            prefix_len = prefix[-1][1] if prefix else 0
            if key.shape[1] - query.shape[1] != prefix_len:
                raise ValueError(
                    f"taca: {self.name}: cached decode with {key.shape[1]} keys for {query.shape[1]} queries, but the "
                    f"layout has a prefix of {prefix_len} tokens"
                )
            hidden_states = self._visual(query, key, value, _text_positions(prefix, key.shape[1]),
                                         attention_mask, gamma)
        else:
            prefix_len = segments[-1][1] if segments else 0
            outputs = []
            for start, end, is_text in segments:
                if is_text:
                    outputs.append(self._text_segment(query, key, value, start, end, key_valid, segments))
                else:
                    mask = None if key_valid is None else key_valid[:, None, None, :end]
                    outputs.append(self._visual(query[:, start:end], key[:, :end], value[:, :end],
                                                _text_positions(segments, start), mask, gamma))
            mask = None if key_valid is None else key_valid[:, None, None, :]
            outputs.append(self._visual(query[:, prefix_len:], key, value, _text_positions(segments, prefix_len),
                                        mask, gamma))
            hidden_states = torch.cat(outputs, dim=1)
        hidden_states = hidden_states[:, :seq_len_q]
        hidden_states = hidden_states.flatten(2, 3).type_as(query)

        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)

    def _text_segment(self, query, key, value, start, end, key_valid, segments):
        """A text segment's causal call, as the stock default processor makes it (text queries: no gamma)."""
        from diffusers.models.transformers import transformer_qwenimage21 as tq

        if self.gamma_reverse != 1.0 and len(_text_positions(segments, end)) != end:
            raise NotImplementedError(
                f"taca: {self.name}: gamma_reverse={self.gamma_reverse} with condition images: text queries after a "
                f"condition image meet its (visual) keys in Qwen-Image 2.1's per-segment text calls, which TACA "
                f"leaves stock; only gamma_reverse=1 is supported with condition images"
            )
        seg_len = end - start
        seg_mask = torch.cat(
            [
                torch.ones(seg_len, start, dtype=torch.bool, device=query.device),
                torch.tril(torch.ones(seg_len, seg_len, dtype=torch.bool, device=query.device)),
            ],
            dim=1,
        )[None, None]
        if key_valid is not None:
            seg_mask = seg_mask & key_valid[:, None, None, :end]
        return tq.dispatch_attention_fn(
            query[:, start:end], key[:, :end], value[:, :end], attn_mask=seg_mask, dropout_p=0.0, backend=None,
            parallel_config=self._parallel_config,
        )

    def _visual(self, q, k, v, text: List[int], mask, gamma):
        """Visual queries q against keys k (text keys at the positions ``text``), through the op;
        non-contiguous text keys are moved first (keys, values and mask columns alike)."""
        n_k = k.shape[1]
        text_start = None
        if text and text != list(range(text[0], text[0] + len(text))):
            is_text = torch.zeros(n_k, dtype=torch.bool)
            is_text[text] = True
            perm = torch.cat([is_text.nonzero()[:, 0], (~is_text).nonzero()[:, 0]]).to(k.device)
            k, v = k.index_select(1, perm), v.index_select(1, perm)
            if mask is not None:
                mask = mask.index_select(-1, perm)
        elif text and text[0] != 0:
            text_start = text[0]
        out = self.taca_attention(q, k, v, len(text), gamma, mask, text_start=text_start)
        if out is None:
            raise RuntimeError(f"taca: {self.name}: the TACA path ran with gamma off")  # not reached: see _off
        return out


@functools.lru_cache(maxsize=None)
def _make_processors():
    """The two TACA processor classes (built once: they subclass diffusers' stock processors)."""
    from diffusers.models.transformers.transformer_qwenimage21 import (
        _FLEX_AVAILABLE, QwenImage21AttnProcessor, QwenImage21FlexAttnProcessor)

    class TacaQwenImage21AttnProcessor(_TacaQwenImage21Mixin, QwenImage21AttnProcessor):
        """TACA for ``QwenImage21AttnProcessor``: the stock ``__call__`` outside the window."""

        def __call__(self, attn, hidden_states, attention_mask=None, rotary_emb=None, layer_cache=None,
                     kv_cache_mode=None, cache_write_slice=None, segments=None, key_valid=None):
            if self._off():
                return QwenImage21AttnProcessor.__call__(
                    self, attn, hidden_states, attention_mask, rotary_emb, layer_cache, kv_cache_mode,
                    cache_write_slice, segments, key_valid)
            return self._taca_call(attn, hidden_states, attention_mask, rotary_emb, layer_cache, kv_cache_mode,
                                   cache_write_slice, segments, key_valid)

    class TacaQwenImage21FlexAttnProcessor(_TacaQwenImage21Mixin, QwenImage21FlexAttnProcessor):
        """TACA for ``QwenImage21FlexAttnProcessor`` (a subclass, so the model still builds its
        BlockMask): the stock flex ``__call__`` outside the window."""

        def __call__(self, attn, hidden_states, attention_mask=None, rotary_emb=None, layer_cache=None,
                     kv_cache_mode=None, cache_write_slice=None, segments=None, key_valid=None):
            if self._off():
                return QwenImage21FlexAttnProcessor.__call__(
                    self, attn, hidden_states, attention_mask, rotary_emb, layer_cache, kv_cache_mode,
                    cache_write_slice, segments, key_valid)
            return self._taca_call(attn, hidden_states, attention_mask, rotary_emb, layer_cache, kv_cache_mode,
                                   cache_write_slice, segments, key_valid)

    return TacaQwenImage21AttnProcessor, (TacaQwenImage21FlexAttnProcessor if _FLEX_AVAILABLE else None)


@register
class QwenImage21Adapter(Adapter):
    name = "qwenimage21"
    label = "QwenImage21Transformer2DModel (Qwen-Image 2.1)"
    transformer_classes = ("QwenImage21Transformer2DModel",)
    stock_processors = frozenset({"QwenImage21AttnProcessor", "QwenImage21FlexAttnProcessor"})
    timestep = "sigma"
    kwargs_name = None  # attention_kwargs carries only the LoRA scale; the blocks forward none
    # diffusers 0.42.1: _current_timestep = t, then timestep = t.expand(B).to(latents.dtype) / 1000
    current_t_pipelines = frozenset({"QwenImage21Pipeline"})
    pipelines = ("QwenImage21Pipeline",)
    negative_prompt = True
    guidance_arg = "true_cfg_scale"
    takes_max_sequence_length = False  # its __call__ has no max_sequence_length

    def joint_modules(self) -> Dict[str, torch.nn.Module]:
        return {n: m for n, m in attention_modules(self.transformer).items() if n.endswith(".attn")}

    def processor(self, name, module):
        plain, flex = _make_processors()
        if type(module.processor).__name__ == "QwenImage21FlexAttnProcessor":
            return flex(name)
        return plain(name)

    def call_state(self, arg):
        img_mask, img_shapes = arg("img_mask"), arg("img_shapes")
        if img_mask is None or img_shapes is None:
            raise ValueError("taca: QwenImage21Transformer2DModel was called without img_mask or img_shapes")
        if arg("kv_cache") is not None and len(img_shapes[0]) > 1:
            raise ValueError(
                "taca: Qwen-Image 2.1 with condition images and the prefix KV cache is not supported: the cache keeps "
                "step 0's condition-image keys and values for every later step, and with TACA they depend on that "
                "step's gamma (condition-image queries are visual), so later steps would reuse it. Supported: "
                "text-to-image with or without the cache, condition images without it (QwenImage21Pipeline(..., "
                "use_kv_cache=False), or kv_cache=None on the transformer)"
            )
        return {"taca_layout": _Layout(img_mask, img_shapes)}
