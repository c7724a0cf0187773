"""Lumina-Image 2.0 (``Lumina2Transformer2DModel``, ``Lumina2Pipeline``) for ``taca train``.

Conventions, from ``Lumina2Pipeline`` (the inference path TACA's schedule is read on) and diffusers'
``train_dreambooth_lora_lumina2.py``:

- latents: ``(vae(x).mode() - shift_factor) * scaling_factor`` (the FLUX VAE), (B, C, h, w), as the
  script; the pipeline decodes ``latents / scaling_factor + shift_factor``.
- text: ``encode_prompt`` with the pipeline's system prompt (``system_prompt + " <Prompt Start> " +
  caption``, the script's default ``--system_prompt None`` = the pipeline's own), Gemma2's
  second-to-last hidden state, padded on the right to ``max_sequence_length`` (default 256) with an
  attention mask the transformer takes as ``encoder_attention_mask``. The model keeps only each
  caption's valid tokens (it copies the first ``mask.sum()`` into the joint sequence; the padding is
  masked in the text refiner), so each caption is cached with its own tokens and a batch is padded
  to its longest caption with a mask: the same output as the pipeline's fixed-length padding.
- forward: ``timestep = 1 - (1000 sigma) / 1000`` (the pipeline's ``1 - t / num_train_timesteps``);
  the model predicts ``x0 - noise`` (the pipeline negates it before the scheduler step; the script's
  target is ``x0 - noise`` on its reversed lerp ``(1 - s) noise + s x0`` with timestep ``s``, the
  same thing with s = 1 - sigma): ``predict`` returns its negation, ``noise - x0``.
- sigmas: the scheduler's static shift (Lumina-Image-2.0: 6.0), 1 under dynamic shifting. (The
  script draws its ``s`` from the shifted schedule, which puts its weight near clean images; here
  sigma is the pipeline's noise level, shifted as the pipeline's schedule is.)
- LoRA targets: the script's default ``to_q, to_k, to_v, to_out.0`` restricted to the joint
  attention ``layers.<i>.attn`` (the text-only ``context_refiner`` and image-only ``noise_refiner``
  stay frozen); ``attn+ff`` adds the joint layers' ``feed_forward.linear_1 / 2 / 3``.

Gradient checkpointing: as Z-Image, the processors get their state per call, which ``taca.enable``'s
hook carries into the checkpointed blocks.
"""
from __future__ import annotations

import torch

from . import _DiffusersFamily, _MaskedTextFamily, layer_names

_ATTN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
_FF = ("feed_forward.linear_1", "feed_forward.linear_2", "feed_forward.linear_3")
_MASK = "prompt_attention_mask"


class Lumina2Family(_MaskedTextFamily, _DiffusersFamily):
    name = "lumina2"
    _text_attrs = ("text_encoder",)
    text_mask = _MASK

    def __init__(self, pipe):
        super().__init__(pipe)
        self._n_train = int(pipe.scheduler.config.get("num_train_timesteps", 1000))
        t = pipe.transformer
        self.attn_targets = layer_names(t, "layers", _ATTN)
        self.ff_targets = layer_names(t, "layers", _FF)

    def encode_text(self, captions, device, max_sequence_length):
        kw = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        with torch.no_grad():
            pe, mask, _, _ = self.pipe.encode_prompt(prompt=list(captions), do_classifier_free_guidance=False,
                                                     device=device, **kw)
        return {"prompt_embeds": pe, _MASK: mask}

    def predict(self, transformer, noisy, sigma, cond, guidance):
        t = sigma.float() * self._n_train  # the scheduler's timestep
        t = 1 - t / self._n_train  # the pipeline's: 1 - sigma
        # the mask as the tokenizer gives it to the pipeline (int64; the model sums it and casts it to bool)
        out = transformer(hidden_states=noisy, timestep=t, encoder_hidden_states=cond["prompt_embeds"],
                          encoder_attention_mask=cond[_MASK].long(), return_dict=False)[0]
        return -out

    def lora_saver(self):
        from diffusers import Lumina2Pipeline

        return Lumina2Pipeline
