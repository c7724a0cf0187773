"""Chroma (``ChromaTransformer2DModel``, ``ChromaPipeline``) for ``taca train``.

diffusers has no LoRA script for Chroma; its conventions are FLUX.1's, as ``ChromaPipeline``
(diffusers 0.42.1) applies them at inference:

- latents: the FLUX VAE's ``(vae(x) - shift_factor) * scaling_factor`` (the pipeline decodes with
  ``latents / scaling_factor + shift_factor``), packed 2x2 into tokens (``_pack_latents``), image
  ids from the latent grid (``_prepare_latent_image_ids``), text ids zeros;
- ``timestep = sigma`` (the pipeline passes ``t / 1000``; the transformer multiplies by 1000);
  no pooled projections and no guidance embedding (Chroma's approximator replaces both);
- the scheduler shifts dynamically (``mu`` from the image's token count), so the sampled training
  sigmas are not shifted (as diffusers' FLUX script);
- text: T5 only, ``_get_t5_prompt_embeds`` pads every prompt to ``max_sequence_length`` (512 by
  default) and returns a FLOAT mask that is 1 on the prompt's tokens and on the first padding
  token, 0 after. ``_prepare_attention_mask`` appends ones for the image tokens and the
  transformer turns it into the outer product ``m m^T``, which SDPA ADDS to the logits.

That last point decides the caching: the padding tokens are NOT masked out (they get +0 where the
prompt's get +1), so the image tokens' outputs depend on how many padding tokens there are and on
their T5 embeddings (which depend on the prompt). Trimming each caption to its tokens and padding
per batch would therefore train on a sequence the pipeline never shows the model. Training keeps
the pipeline's fixed-length padding: each caption's cache entry is its full padded embedding and
its (L,) mask as the pipeline returns it (0/1, exact in any float dtype), the default row split /
stack is exact, and ``predict`` extends the mask with the pipeline's own
``_prepare_attention_mask``, so the model sees exactly what ``ChromaPipeline`` feeds it at
inference with the same ``max_sequence_length`` (train with the length you will generate with).
(diffusers issues #11724 / #12116 / #13619 call the additive mask a bug; should the pipeline
switch to a bool mask, the cached bool mask is passed on as it is and the padding is then masked.)

Gradient checkpointing: ``ChromaTransformer2DModel.forward`` (diffusers 0.42.1 and main) calls
its checkpointed blocks without ``joint_attention_kwargs`` (so without TACA's per-call state:
gamma would silently be off) and its single-stream blocks without ``attention_mask`` (a different
function than the one the pipeline runs). ``taca.enable`` puts both back on the TACA runs
(``taca.models.chroma.full_block_args``); ``predict`` does the same for every run, the control
LoRA's included, for the duration of its call (:func:`_full_checkpoint_args`).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from . import _DiffusersFamily, _unwrap, flux_latents, flux_tokens


class ChromaFamily(_DiffusersFamily):
    name = "chroma"
    _text_attrs = ("text_encoder",)

    def encode_text(self, captions, device, max_sequence_length):
        kw = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        with torch.no_grad():
            pe, _, mask, _, _, _ = self.pipe.encode_prompt(prompt=list(captions), device=device,
                                                           do_classifier_free_guidance=False, **kw)
        return {"prompt_embeds": pe, "attention_mask": mask}

    def predict(self, transformer, noisy, sigma, cond, guidance):
        from diffusers import ChromaPipeline

        B = noisy.shape[0]
        pe = cond["prompt_embeds"]
        packed, img_ids, txt_ids = flux_tokens(noisy, pe.shape[1], "Chroma")
        # at inference the text mask is in the text encoder's dtype, which is the embeddings' dtype
        text_mask = cond["attention_mask"].to(noisy.device)
        if text_mask.is_floating_point():
            text_mask = text_mask.to(pe.dtype)
        # the pipeline's own helper (it reads nothing of the pipeline): ones for the image tokens
        mask = ChromaPipeline._prepare_attention_mask(None, B, packed.shape[1], pe.dtype, text_mask)
        with _full_checkpoint_args(_unwrap(transformer)):
            out = transformer(hidden_states=packed, timestep=sigma, encoder_hidden_states=pe, txt_ids=txt_ids,
                              img_ids=img_ids, attention_mask=mask, return_dict=False)[0]
        return flux_latents(out, noisy.shape)

    def lora_saver(self):
        from diffusers import ChromaPipeline

        return ChromaPipeline


@contextmanager
def _full_checkpoint_args(model):
    """While gradient checkpointing is on and autograd records: the checkpointed blocks get the
    ``attention_mask`` and ``joint_attention_kwargs`` the forward was called with (after
    ``taca.enable``'s pre-hook added TACA's state), as the blocks get them without checkpointing.
    The checkpoint keeps them for the recomputation in the backward pass."""
    func = getattr(model, "_gradient_checkpointing_func", None)
    if not (getattr(model, "gradient_checkpointing", False) and torch.is_grad_enabled() and func is not None):
        yield
        return
    from ...models.chroma import full_block_args

    seen = {}

    def grab(module, args, kwargs):  # registered after taca's pre-hook: sees the kwargs it injected
        seen["mask"] = kwargs.get("attention_mask")
        seen["jak"] = kwargs.get("joint_attention_kwargs")

    def checkpointed(block, *args):
        return func(block, *full_block_args(block, args, seen["mask"], seen["jak"]))

    hook = model.register_forward_pre_hook(grab, with_kwargs=True)
    model._gradient_checkpointing_func = checkpointed
    try:
        yield
    finally:
        hook.remove()
        model._gradient_checkpointing_func = func
