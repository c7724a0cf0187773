"""Z-Image (``ZImageTransformer2DModel``, ``ZImagePipeline``) for ``taca train``.

Conventions, from diffusers' ``train_dreambooth_lora_z_image.py`` and ``ZImagePipeline``:

- latents: ``(vae(x).mode() - shift_factor) * scaling_factor`` (the FLUX VAE, 16 channels), (B, C, h, w);
  the pipeline decodes ``latents / scaling_factor + shift_factor``.
- text: ``encode_prompt`` (the Qwen3 encoder's second-to-last hidden state over the tokenizer's chat
  template, padded to ``max_sequence_length`` with a mask) returns one unpadded (L_i, D) tensor per
  caption. Each caption is cached with its own tokens; a batch is zero-padded to its longest caption
  with a mask, and ``predict`` cuts the per-caption list back out (the transformer pads each caption
  itself, to a multiple of 32, with its learned pad token).
- forward: ``x`` one (C, 1, h, w) latent per sample, ``t = (1000 - 1000 sigma) / 1000 = 1 - sigma``
  (the pipeline's ``(1000 - t) / 1000`` on the scheduler's t = 1000 sigma), ``cap_feats`` the list of
  captions. The model predicts ``x0 - noise`` (the pipeline and the script negate it): ``predict``
  returns its negation, ``noise - x0``.
- sigmas: the scheduler's static shift (Z-Image-Turbo: 3.0, no dynamic shifting), as the script's
  indexing of the shifted ``noise_scheduler.timesteps`` does; 1 under dynamic shifting.
- LoRA targets: the script's default ``to_q, to_k, to_v, to_out.0`` restricted to the main layers'
  attention (``layers.<i>.attention.*``: the joint [image, caption] attention TACA changes; the
  image-only ``noise_refiner`` and text-only ``context_refiner`` stay frozen); ``attn+ff`` adds the
  main layers' SwiGLU ``feed_forward.w1 / w2 / w3``.

Gradient checkpointing: the adapter hands the processors their state per call (``kwargs_name`` None);
``taca.enable``'s hook carries it into the blocks diffusers' ``_gradient_checkpointing_func``
recomputes in the backward (``TacaHandle._keep_state_in_checkpoints``).
"""
from __future__ import annotations


import torch

from . import _DiffusersFamily, _MaskedTextFamily, layer_names

_ATTN = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
_FF = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
_MASK = "prompt_mask"


class ZImageFamily(_MaskedTextFamily, _DiffusersFamily):
    name = "zimage"
    _text_attrs = ("text_encoder",)
    text_mask = _MASK

    def __init__(self, pipe):
        super().__init__(pipe)
        t = pipe.transformer
        self.attn_targets = layer_names(t, "layers", _ATTN)
        self.ff_targets = layer_names(t, "layers", _FF)

    def encode_text(self, captions, device, max_sequence_length):
        kw = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        with torch.no_grad():
            # encode_prompt rewrites the list it is given (the chat template): hand it a copy
            embeds, _ = self.pipe.encode_prompt(prompt=list(captions), device=device,
                                                do_classifier_free_guidance=False, **kw)
        n = [int(e.shape[0]) for e in embeds]
        pe = embeds[0].new_zeros((len(embeds), max(n)) + tuple(embeds[0].shape[1:]))
        for j, e in enumerate(embeds):
            pe[j, :n[j]] = e
        mask = torch.arange(max(n), device=pe.device)[None, :] < torch.tensor(n, device=pe.device)[:, None]
        return {"prompt_embeds": pe, _MASK: mask}

    def encode_images(self, pixels):
        lat = super().encode_images(pixels)
        if lat.shape[-2] % 2 or lat.shape[-1] % 2:
            raise ValueError(f"taca train: Z-Image latents must have even height and width (2x2 patches), "
                             f"got {lat.shape[-2]}x{lat.shape[-1]}")
        return lat

    def predict(self, transformer, noisy, sigma, cond, guidance):
        mask = cond[_MASK].bool()
        caps = [pe[m] for pe, m in zip(cond["prompt_embeds"], mask)]
        x = list(noisy.unsqueeze(2).unbind(0))  # (C, 1, h, w) per sample, as the pipeline hands them
        t = sigma.float() * 1000.0  # the scheduler's timestep
        t = (1000.0 - t) / 1000.0  # the pipeline's timestep: 1 - sigma
        out = transformer(x=x, t=t, cap_feats=caps, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)

    def lora_saver(self):
        from diffusers import ZImagePipeline

        return ZImagePipeline
