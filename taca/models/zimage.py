"""Z-Image (Turbo, Base): ``ZImageTransformer2DModel``, legacy ``Attention`` modules with
``ZSingleStreamAttnProcessor``.

Single-stream main layers (``layers.*``) over a per-sample sequence [img, caption]: sample i holds
``x_len[i]`` image tokens (its patches, padded to a multiple of 32) then ``cap_len[i]`` caption
tokens (its caption, padded to a multiple of 32 with the model's ``cap_pad_token``, attended, not
masked), then batch padding up to the longest sample, masked as keys by a bool (B, L) mask
(only when the samples' lengths differ). The refiners (``noise_refiner`` image-only,
``context_refiner`` text-only, ``siglip_refiner``) share the processor class and stay stock.

Per-sample spans: the transformer's forward computes them inside (``_build_unified_sequence``),
so the adapter recomputes them in the hook from the forward's own inputs (``x``: one (C, F, H, W)
latent per sample, ``cap_feats``: one (L_i, D) caption per sample, ``patch_size``,
``f_patch_size``) with the model's rule (tokens = F/pF * H/p * W/p, lengths rounded up to
``SEQ_MULTI_OF``); each processor checks that its sequence is as long as those spans say before
applying gamma. Text keys of sample i: [x_len[i], x_len[i] + cap_len[i]). When every sample has
the same spans there is no batch padding: the text is the last ``cap_len`` tokens (one int);
otherwise the spans are (B,) tensors (``taca.joint_attention(text_start=)``) and the stock
padding mask is applied. The forward's ``joint_attention_kwargs`` carry only the LoRA scale, so
the hook hands the processors their state directly. Omni mode (condition images, SigLIP tokens,
[cap, img, siglip]) is refused.

Timestep: the transformer takes ``t`` = 1 - sigma (the pipelines pass ``(1000 - t) / 1000``).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..processors import TacaProcessor
from . import Adapter, attention_modules, register

_MODULE = "diffusers.models.transformers.transformer_z_image"


def _round_up(n: int, m: int) -> int:
    return n + (-n) % m


class TacaZSingleStreamAttnProcessor(TacaProcessor):
    """TACA for Z-Image's main layers: ``ZSingleStreamAttnProcessor`` op for op (QK RMSNorm,
    complex RoPE, the (B, L) key mask made (B, 1, 1, L)); spans from :attr:`taca_call`."""

    text_first = False
    layout = "bnhd"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        freqs_cis: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        query = query.unflatten(-1, (attn.heads, -1))
        key = key.unflatten(-1, (attn.heads, -1))
        value = value.unflatten(-1, (attn.heads, -1))

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        def apply_rotary_emb(x_in: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
            with torch.amp.autocast("cuda", enabled=False):
                x = torch.view_as_complex(x_in.float().reshape(*x_in.shape[:-1], -1, 2))
                freqs_cis = freqs_cis.unsqueeze(2)
                x_out = torch.view_as_real(x * freqs_cis).flatten(3)
                return x_out.type_as(x_in)

        if freqs_cis is not None:
            query = apply_rotary_emb(query, freqs_cis)
            key = apply_rotary_emb(key, freqs_cis)

        dtype = query.dtype
        query, key = query.to(dtype), key.to(dtype)

        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]

        state = self.taca_call or {}
        if "taca_seq_len" in state and query.shape[1] != state["taca_seq_len"]:
            raise RuntimeError(
                f"taca: {self.name}: the joint sequence has {query.shape[1]} tokens where the inputs' image and "
                f"caption lengths give {state['taca_seq_len']}; the text positions would be wrong"
            )
        out = self.taca_attention(query, key, value, state.get("taca_text_len"), state.get("taca_gamma"),
                                  attention_mask, text_start=state.get("taca_text_start"))
        if out is None:
            out = dispatch_attention_fn(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend, parallel_config=self._parallel_config,
            )
        hidden_states = out.flatten(2, 3)
        hidden_states = hidden_states.to(dtype)

        output = attn.to_out[0](hidden_states)
        if len(attn.to_out) > 1:
            output = attn.to_out[1](output)
        return output


@register
class ZImageAdapter(Adapter):
    name = "zimage"
    label = "ZImageTransformer2DModel (Z-Image)"
    transformer_classes = ("ZImageTransformer2DModel",)
    stock_processors = frozenset({"ZSingleStreamAttnProcessor"})
    timestep = "1-sigma"
    timestep_arg = "t"
    kwargs_name = None
    # ZImagePipeline sets no _current_timestep and passes a fresh (1000 - t) / 1000: sync path
    current_t_pipelines = frozenset()
    pipelines = ("ZImagePipeline",)
    negative_prompt = True
    max_sequence_length = 512

    def joint_modules(self):
        # the refiners (noise_refiner: image only, context_refiner: text only, siglip_refiner) stay stock
        return {n: m for n, m in attention_modules(self.transformer).items() if n.startswith("layers.")}

    def processor(self, name, module):
        return TacaZSingleStreamAttnProcessor(name)

    def batch(self, arg):
        x = arg("x")
        if x is None:
            return None
        if isinstance(x[0], (list, tuple)):
            raise NotImplementedError(
                "taca: Z-Image omni mode (condition images and SigLIP tokens, sequence [caption, image, siglip]) is "
                "not supported with TACA on"
            )
        return len(x), x[0].device

    def call_state(self, arg):
        from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF

        x, caps = arg("x"), arg("cap_feats")
        p = arg("patch_size") or 2
        pf = arg("f_patch_size") or 1
        if caps is None or len(caps) != len(x):
            raise ValueError("taca: Z-Image was called without one caption (cap_feats) per latent")
        x_lens, cap_lens = [], []
        for img, cap in zip(x, caps):
            _, F, H, W = img.shape
            x_lens.append(_round_up((F // pf) * (H // p) * (W // p), SEQ_MULTI_OF))
            cap_lens.append(_round_up(len(cap), SEQ_MULTI_OF))
        seq = max(a + b for a, b in zip(x_lens, cap_lens))
        if all(a == x_lens[0] for a in x_lens) and all(c == cap_lens[0] for c in cap_lens):
            # no batch padding: the caption is the last cap_len tokens of every sample
            return {"taca_text_len": cap_lens[0], "taca_text_start": None, "taca_seq_len": seq}
        dev = x[0].device
        return {"taca_text_len": torch.tensor(cap_lens, device=dev), "taca_text_start": torch.tensor(x_lens, device=dev),
                "taca_seq_len": seq}
