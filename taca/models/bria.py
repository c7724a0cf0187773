"""Bria 3.x (``BriaTransformer2DModel``) and Bria FIBO / FIBO Edit (``BriaFiboTransformer2DModel``).

Both are FLUX.1 clones: text first ([txt, img]; FIBO Edit appends the reference latents,
[txt, img, ref]: visual tokens, gamma applies to their queries on text keys), layout
(B, N, H, D), double- and single-stream blocks.

- Bria: ``BriaAttention`` with ``BriaAttnProcessor`` everywhere, no attention mask (the pipeline
  pads prompts to ``max_sequence_length`` and batches CFG as [negative, positive], so both have
  one length). The transformer's forward passes its ``attention_kwargs`` to the blocks only on
  the gradient-checkpointing path, so the hook hands the processors their state directly
  (``kwargs_name`` None).
- FIBO: double-stream ``BriaFiboAttention`` with ``BriaFiboAttnProcessor`` (which makes the
  attention output contiguous before the output projections), single-stream legacy ``Attention``
  with ``BriaAttnProcessor``; each module gets the TACA copy of the processor it has. Every block
  swaps half of the text channels for a projection of another text-encoder layer (same length).
  Padded prompts: the pipeline passes a bool key mask (B, 1, 1, L_txt + L_img) through
  ``joint_attention_kwargs["attention_mask"]`` (True = attend); it stays as stock with TACA on.

The transformers take the scheduler's raw t (t = 1000 sigma for the flow-matching schedulers;
BriaPipeline also accepts DDIM / Euler-ancestral schedulers, whose t / 1000 the paper's rule then
reads as sigma, as it reads SD3's t >= 970).
"""
from __future__ import annotations

from . import Adapter, register
from ._fluxlike import TacaFluxLikeProcessor

_BRIA = "diffusers.models.transformers.transformer_bria"
_FIBO = "diffusers.models.transformers.transformer_bria_fibo"


@register
class BriaAdapter(Adapter):
    name = "bria"
    label = "BriaTransformer2DModel (Bria 3.2)"
    transformer_classes = ("BriaTransformer2DModel",)
    stock_processors = frozenset({"BriaAttnProcessor"})
    timestep = "t1000"
    kwargs_name = None
    # BriaPipeline passes t.expand(B) (a view into scheduler.timesteps): the host path reads it
    current_t_pipelines = frozenset()
    pipelines = ("BriaPipeline",)
    negative_prompt = True
    max_sequence_length = 512  # BriaPipeline.check_inputs' limit (its default is 128)

    def processor(self, name, module):
        return TacaFluxLikeProcessor(name, _BRIA, from_state=True)


@register
class BriaFiboAdapter(Adapter):
    name = "bria_fibo"
    label = "BriaFiboTransformer2DModel (Bria FIBO, FIBO Edit)"
    transformer_classes = ("BriaFiboTransformer2DModel",)
    stock_processors = frozenset({"BriaFiboAttnProcessor", "BriaAttnProcessor"})
    timestep = "t1000"
    # BriaFiboPipeline passes t.expand(B).to(latents' device and dtype) (a view when they match)
    current_t_pipelines = frozenset()
    pipelines = ("BriaFiboPipeline",)
    negative_prompt = True
    max_sequence_length = 3000

    def processor(self, name, module):
        if type(module.processor).__name__ == "BriaAttnProcessor":  # the single-stream blocks
            return TacaFluxLikeProcessor(name, _BRIA)
        return TacaFluxLikeProcessor(name, _FIBO, contiguous_out=True)
