"""FLUX.3 (``Flux3Transformer2DModel``; modular pipelines only: ``Flux3AutoBlocks``,
``Flux3DistilledAutoBlocks``).

Every attention module is a ``Flux3Attention`` with ``Flux3AttnProcessor``, in two kinds of blocks:

- the per-mode blocks (``txt_mode_blocks``: text only; ``mode_blocks["image"]`` and
  ``mode_blocks["image_cond"]``: image only, reference images only) attend within one token mode:
  no text-image pair, they keep their stock processors (``joint_modules`` leaves them out);
- the joint ``single_transformer_blocks`` attend over ``[txt, img, cond_img]`` (text first, layout
  (B, N, H, D), no mask): image queries and reference-image queries (visual tokens, as FLUX
  Kontext's) get gamma on the text keys.

``Flux3Attention.forward`` calls its processor with positional arguments and the transformer's
``attention_kwargs`` carry only the LoRA scale, so the hook hands the processors their state
(``kwargs_name`` None; the text length is ``encoder_hidden_states.shape[1]``). The processor runs
the stock QK-norm and RoPE in float32 and casts q and k back to v's dtype before attention, as
stock.

Timestep: sigma in [0, 1] (the modular denoise step passes ``t / 1000`` in the latents' dtype; the
model multiplies by 1000). Flow-map (step-distilled) checkpoints also take ``target_timestep``, the
sigma the step jumps to; the window is decided on ``timestep``, the current noise level. The
modular pipelines set no ``_current_timestep``, so the hook reads sigma with one host sync per call.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..processors import TacaProcessor
from . import Adapter, register


class TacaFlux3AttnProcessor(TacaProcessor):
    """TACA for ``Flux3Attention`` in a joint ``Flux3SingleTransformerBlock``: the sequence is
    ``[txt, img, cond_img]``; the text length comes from the hook (``taca_text_len``)."""

    text_first = True
    layout = "bnhd"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        image_rotary_emb=None,
    ) -> torch.Tensor:
        from diffusers.models.transformers.transformer_flux3 import (_get_qkv_projections, apply_rotary_emb,
                                                                     dispatch_attention_fn)

        query, key, value = _get_qkv_projections(attn, hidden_states)

        query = query.unflatten(-1, (attn.heads, -1))
        key = key.unflatten(-1, (attn.heads, -1))
        value = value.unflatten(-1, (attn.heads, -1))

        query = attn.norm_q(query.float())
        key = attn.norm_k(key.float())

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        query, key = query.to(value.dtype), key.to(value.dtype)

        hidden_states = self.taca_attention(query, key, value, self.call_arg("taca_text_len"),
                                            self.call_arg("taca_gamma"), attention_mask)
        if hidden_states is None:
            hidden_states = dispatch_attention_fn(
                query,
                key,
                value,
                attn_mask=attention_mask,
                backend=self._attention_backend,
                parallel_config=self._parallel_config,
            )
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        return hidden_states


@register
class Flux3Adapter(Adapter):
    name = "flux3"
    label = "Flux3Transformer2DModel (FLUX.3; modular pipelines)"
    transformer_classes = ("Flux3Transformer2DModel",)
    stock_processors = frozenset({"Flux3AttnProcessor"})
    timestep = "sigma"
    kwargs_name = None
    # modular pipelines only (Flux3AutoBlocks, Flux3DistilledAutoBlocks): no DiffusionPipeline class
    # that `taca generate` could load; taca.enable(modular_pipe) works (it has .transformer and .scheduler)
    pipelines = ()

    def joint_modules(self):
        return {f"single_transformer_blocks.{i}.attn": block.attn
                for i, block in enumerate(self.transformer.single_transformer_blocks)}

    def processor(self, name, module):
        return TacaFlux3AttnProcessor(name)
