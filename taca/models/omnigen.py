"""OmniGen: ``OmniGenTransformer2DModel``, a Phi-3-style LLM whose legacy ``Attention`` modules run
``OmniGenAttnProcessor2_0`` (F.scaled_dot_product_attention with the model's mask).

Sequence ``[condition tokens (L = input_ids.shape[1]), time token, noisy image]`` (layout (B, H, N, D)).
The condition tokens are the prompt's token embeddings, left-padded to the batch's longest prompt
(OmniGenCollator); the model's 3-D 0/1 mask becomes an additive float mask (B, 1, N, N),
``(1 - m) * finfo.min``: text is causal, the time token is the last causal row, the image is
bidirectional and sees every unpadded token; padded tokens are removed as keys for every other
query. Text keys: the first L keys (the left padding included: every non-padding query has those
keys masked, so gamma never reaches them). TACA scales the noisy image's queries on the text keys;
the time token is neither text nor image (not scaled as a key, and its query is not visual). So the
first L + 1 rows (text and time queries) are computed by the stock SDPA call on their rows of the
mask, and the image rows by ``taca.joint_attention`` (image-only queries, N_q != N_k) with their
rows of the stock additive mask. Outside the window the processor makes the stock call, op for op.
(The left-padding queries see every key in stock, images included; their outputs reach no other
token, as every other row masks them, so ``gamma_reverse`` has nothing to act on.)

Refused (ValueError from the hook, before the forward): input images (``input_img_latents`` /
``input_image_sizes``). Their latents are spliced into the text at per-sample positions (and the
image-guidance batch row has them, the negative row not), so the text keys are not one span per
sample and the visual queries are not one block of rows; that mode is not covered.

Timestep: the pipeline passes ``scheduler.timesteps`` unchanged (``sigmas=linspace(1, 0)``). The
OmniGen checkpoint's scheduler is ``FlowMatchEulerDiscreteScheduler(invert_sigmas=True,
num_train_timesteps=1)`` (diffusers' scripts/convert_omnigen_to_diffusers.py and its OmniGen tests;
the hub's Shitao/OmniGen-v1-diffusers scheduler_config.json as remembered, not checked offline), so
the transformer gets t = 1 - sigma: 0 at the pure-noise step (OmniGen's own time, 0 = noise). The
adapter's convention is "1-sigma"; a pipeline built with another scheduler config would give the
transformer another quantity (and the model a timestep it was not trained on).
The blocks forward no attention kwargs: the hook hands the processors their state.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from .. import telemetry
from ..processors import TacaProcessor
from . import Adapter, attention_modules, register


def _rows(mask: Optional[torch.Tensor], start: int, end: Optional[int] = None) -> Optional[torch.Tensor]:
    """Query rows [start, end) of an SDPA mask broadcastable to (B, H, N_q, N_k)."""
    if mask is None or mask.dim() < 2 or mask.shape[-2] == 1:
        return mask
    return mask[..., start:end, :]


class TacaOmniGenAttnProcessor(TacaProcessor):
    """TACA for OmniGen's attention: ``OmniGenAttnProcessor2_0`` op for op; gamma and the condition
    length from :meth:`call_arg`."""

    text_first = True
    layout = "bhnd"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        image_rotary_emb: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        import torch.nn.functional as F

        batch_size, sequence_length, _ = hidden_states.shape

        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        bsz, q_len, query_dim = query.size()
        inner_dim = key.shape[-1]
        head_dim = query_dim // attn.heads

        kv_heads = inner_dim // head_dim

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, kv_heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, kv_heads, head_dim).transpose(1, 2)

        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query = apply_rotary_emb(query, image_rotary_emb, use_real_unbind_dim=-2)
            key = apply_rotary_emb(key, image_rotary_emb, use_real_unbind_dim=-2)

        gamma = self.call_arg("taca_gamma")
        text_len = self.call_arg("taca_text_len")
        if (gamma is None and not telemetry.active()) or not text_len:
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        else:
            n_head = text_len + 1  # condition tokens and the time token: stock rows
            if query.shape[2] <= n_head:
                raise ValueError(
                    f"taca: {self.name}: {query.shape[2]} tokens for {text_len} condition tokens, a time token and "
                    f"an image"
                )
            head = F.scaled_dot_product_attention(query[:, :, :n_head], key, value,
                                                  attn_mask=_rows(attention_mask, 0, n_head))
            img = self.taca_attention(query[:, :, n_head:], key, value, text_len, gamma,
                                      _rows(attention_mask, n_head))
            hidden_states = torch.cat([head, img], dim=2)
        hidden_states = hidden_states.transpose(1, 2).type_as(query)
        hidden_states = hidden_states.reshape(bsz, q_len, attn.out_dim)
        hidden_states = attn.to_out[0](hidden_states)
        return hidden_states


@register
class OmniGenAdapter(Adapter):
    name = "omnigen"
    label = "OmniGenTransformer2DModel (OmniGen)"
    transformer_classes = ("OmniGenTransformer2DModel",)
    stock_processors = frozenset({"OmniGenAttnProcessor2_0"})
    timestep = "1-sigma"  # t = 1 - sigma with the checkpoint's invert_sigmas scheduler (module docstring)
    kwargs_name = None  # the blocks forward no attention kwargs to the processors
    pipeline_t_is_1000_sigma = False  # OmniGenPipeline sets no _current_timestep
    pipelines = ("OmniGenPipeline",)
    negative_prompt = False  # OmniGenPipeline's negative prompt is its processor's fixed default
    guidance_arg = "guidance_scale"
    takes_max_sequence_length = False

    def joint_modules(self) -> Dict[str, torch.nn.Module]:
        return attention_modules(self.transformer)

    def processor(self, name, module):
        return TacaOmniGenAttnProcessor(name)

    def call_state(self, arg):
        sizes = arg("input_image_sizes") or {}
        latents = arg("input_img_latents") or []
        if any(len(v) for v in sizes.values()) or len(latents):
            raise ValueError(
                "taca: OmniGen with input images is not supported: their latents are spliced into the text at "
                "per-sample positions, so the text keys are not one span per sample; supported: text-to-image "
                "(no input_images), or taca.disable for this call"
            )
        ids = arg("input_ids")
        return {"taca_text_len": None if ids is None else int(ids.shape[1])}
