"""Qwen-Image (``QwenImageTransformer2DModel`` in ``QwenImagePipeline``): the conventions of
diffusers' ``train_dreambooth_lora_qwen_image.py`` and of the 0.42.1 pipeline it trains for.

- Latents: ``AutoencoderKLQwenImage`` is a video VAE: images enter as (B, 3, 1, H, W) and the
  latents are 5-D (B, C, 1, h, w), normalized per channel with the VAE config's ``latents_mean`` /
  ``latents_std`` as ``(z - mean) * (1 / std)`` (the script; the pipeline's decode path inverts
  it as ``z / (1 / std) + mean``). The posterior mode is cached (the script samples).
- Text: ``QwenImagePipeline.encode_prompt`` (Qwen2.5-VL, the chat template whose 34 prefix tokens
  are dropped) pads to the batch's longest prompt and returns a per-token mask (None when nothing is
  padded): each caption is cached at its own length (``split_by_mask``) and re-padded per batch
  (``pad_collate``). ``max_sequence_length`` None means the pipeline's default (512, as
  ``__call__`` and the script use).
- Forward: the latents permuted to (B, 1, C, h, w) and packed 2x2 into tokens by
  ``QwenImagePipeline._pack_latents``, ``img_shapes = [[(1, h/2, w/2)]] * B``,
  ``encoder_hidden_states_mask`` the batch's text mask (None when no caption is padded, as the
  pipeline passes it; diffusers 0.42.1 derives the text length from it, there is no
  ``txt_seq_lens``), ``timestep = sigma`` in [0, 1] (the pipeline passes ``t / 1000``; the model casts
  it to its dtype itself), a guidance embedding only for guidance-distilled configs. The output is
  the velocity ``noise - x0`` (the script's target), unpacked back to (B, C, 1, h, w).
- Sigmas: the scheduler uses dynamic shifting (Qwen/Qwen-Image's scheduler config), so training
  sigmas are not shifted (the script's ``shift=3.0`` override is inert under dynamic shifting).
- LoRA targets: "attn" is every projection of the blocks' joint attention, the image stream's
  ``to_q / to_k / to_v / to_out.0`` and the text stream's ``add_q/k/v_proj / to_add_out``, as for
  FLUX.1 (the text keys are the ones gamma scales); diffusers' script trains only the image
  stream's four by default (``--lora-targets to_q,to_k,to_v,to_out.0`` reproduces it). "attn+ff"
  adds the image and text MLPs.

Edits (``QwenImageEditPipeline``: one reference; ``QwenImageEditPlusPipeline``: any number), as the
0.42.1 pipelines condition on references (diffusers has no Qwen-Image-Edit LoRA script):

- the prompt: the pipeline's own ``encode_prompt`` with the references shown to Qwen2.5-VL (its edit
  template and image placeholders, one caption at a time: the pipelines share one set of references
  across a batch of prompts). Edit shows the reference at its VAE size (1024 x 1024 for a square);
  Edit Plus resizes each to 384 x 384 area first (``CONDITION_IMAGE_SIZE``), as ``__call__`` does.
  A caption's entry therefore depends on its references: the cache keys it by their content and
  size too. ``max_sequence_length`` does not reach the edit pipelines' encoder (they encode the
  whole prompt), nor taca train's.
- the references' latents: ``encode_images`` of the reference at 1024 x 1024 (``VAE_IMAGE_SIZE``,
  the pipelines' size for a square input, whatever the output's; ``--reference-resolution``
  overrides), packed 2x2 and appended after the image tokens in order, with ``img_shapes`` listing
  the target's then each reference's (1, h/2, w/2); the output is cut to the target's tokens.
- the edit pipelines need references (their template expects an image); the Edit Inpaint and
  Layered pipelines (a mask, RGBA layers) are refused rather than trained without their conditioning.
"""
from __future__ import annotations


import torch

from . import _DiffusersFamily, _MaskedTextFamily, _unwrap, call_default, one_frame, qwen_vae_latents

# both streams' projections of the joint attention (diffusers' train_dreambooth_lora_qwen_image.py
# trains only the image stream's to_q / to_k / to_v / to_out.0 by default)
_ATTN = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
         "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
_FF = ["img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]
_MASK = "prompt_embeds_mask"
_DEFAULT_MAX_SEQUENCE_LENGTH = 512  # QwenImagePipeline.__call__'s and the script's default
# the edit pipelines trained with references, and how many each takes
_EDIT = {"QwenImageEditPipeline": 1, "QwenImageEditPlusPipeline": 1 << 16}
_VAE_IMAGE_SIDE = 1024  # the edit pipelines' VAE size for a square input (calculate_dimensions(1024 ** 2, 1))


class QwenImageFamily(_MaskedTextFamily, _DiffusersFamily):
    name = "qwenimage"
    _text_attrs = ("text_encoder",)
    text_mask = _MASK
    attn_targets, ff_targets = _ATTN, _FF

    def __init__(self, pipe):
        cls = type(pipe).__name__
        if ("Edit" in cls or "Layered" in cls) and cls not in _EDIT:
            raise ValueError(
                f"taca train: {cls} conditions on what taca train does not feed (a mask or layers); Qwen-Image "
                f"trains text to image (QwenImagePipeline) or edits (QwenImageEditPipeline, QwenImageEditPlusPipeline)")
        super().__init__(pipe)
        self._edit = cls in _EDIT
        self._plus = cls == "QwenImageEditPlusPipeline"

    # --- reference images -------------------------------------------------------------------
    @classmethod
    def references_for(cls, pipeline_class):
        return _EDIT.get(pipeline_class, 0)

    @classmethod
    def references_needed(cls, pipeline_class):
        return 1 if pipeline_class in _EDIT else 0

    def reference_resolution(self, resolution):
        return _VAE_IMAGE_SIDE if self._edit else resolution

    def text_references(self):
        return self._edit

    # --- caching ----------------------------------------------------------------------------
    def encode_text(self, captions, device, max_sequence_length, references=None):
        if self._edit:
            return self._encode_edit(captions, device, references)
        if max_sequence_length is None:
            max_sequence_length = call_default(self.pipe, "max_sequence_length", _DEFAULT_MAX_SEQUENCE_LENGTH)
        with torch.no_grad():
            pe, mask = self.pipe.encode_prompt(prompt=list(captions), device=device,
                                               max_sequence_length=int(max_sequence_length))
        if mask is None:  # the pipeline drops the mask when no prompt is padded
            mask = torch.ones(pe.shape[:2], dtype=torch.long, device=pe.device)
        return {"prompt_embeds": pe, _MASK: mask}

    def _encode_edit(self, captions, device, references):
        """Each caption with its own references shown to the vision-language encoder, as the edit
        pipelines' ``__call__`` shows them; the entries padded to the longest with the mask."""
        if references is None or len(references) != len(captions) or not all(references):
            raise ValueError(f"taca train: {type(self.pipe).__name__} encodes each caption with its reference images")
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (CONDITION_IMAGE_SIZE,
                                                                                 calculate_dimensions)

        embeds = []
        with torch.no_grad():
            for caption, refs in zip(captions, references):
                if self._plus:
                    shown = []
                    for im in refs:
                        w, h = calculate_dimensions(CONDITION_IMAGE_SIZE, im.size[0] / im.size[1])[:2]
                        shown.append(self.pipe.image_processor.resize(im, h, w))
                else:
                    shown = refs[0]
                pe, _ = self.pipe.encode_prompt(prompt=[caption], image=shown, device=device)
                embeds.append(pe[0])
        n = max(e.shape[0] for e in embeds)
        pe = torch.stack([torch.cat([e, e.new_zeros(n - e.shape[0], e.shape[1])]) for e in embeds])
        lengths = torch.tensor([e.shape[0] for e in embeds], device=pe.device)
        mask = torch.arange(n, device=pe.device)[None] < lengths[:, None]
        return {"prompt_embeds": pe, _MASK: mask.long()}

    def encode_images(self, pixels):
        vae = self.vae()
        return qwen_vae_latents(vae, pixels)

    # --- training forward -------------------------------------------------------------------
    def predict(self, transformer, noisy, sigma, cond, guidance):
        from diffusers import QwenImagePipeline

        x, five = one_frame(noisy, "Qwen-Image")
        B, C, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"taca train: Qwen-Image latents must have even height and width, got {h}x{w}")
        packed = QwenImagePipeline._pack_latents(x, B, C, h, w)
        n, shapes = packed.shape[1], [(1, h // 2, w // 2)]
        refs = cond.get("reference_latents")
        if refs is not None:  # (B, R, C, 1, h', w'): packed in order after the image tokens
            tokens = [packed]
            for r in range(refs.shape[1]):
                ref, _ = one_frame(refs[:, r].to(packed.dtype), "Qwen-Image-Edit reference")
                hr, wr = ref.shape[-2:]
                if hr % 2 or wr % 2:
                    raise ValueError(f"taca train: Qwen-Image-Edit reference latents must have even height and width, "
                                     f"got {hr}x{wr}")
                tokens.append(QwenImagePipeline._pack_latents(ref, B, C, hr, wr))
                shapes.append((1, hr // 2, wr // 2))
            packed = torch.cat(tokens, 1)
        mask = cond.get(_MASK)
        if mask is not None:
            mask = mask.to(device=noisy.device, dtype=torch.bool)
            if bool(mask.all()):
                mask = None  # as the pipeline: no mask when no caption of the batch is padded
        config = getattr(transformer, "config", None) or _unwrap(transformer).config
        g = torch.full((B,), float(guidance), device=noisy.device, dtype=torch.float32) \
            if config.get("guidance_embeds", False) else None
        out = transformer(hidden_states=packed, timestep=sigma, guidance=g,
                          encoder_hidden_states=cond["prompt_embeds"], encoder_hidden_states_mask=mask,
                          img_shapes=[shapes] * B, return_dict=False)[0]
        # (B, h/2 * w/2, 4 C) tokens back to latents: the inverse of _pack_latents
        out = out[:, :n].reshape(B, h // 2, w // 2, -1, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, -1, h, w)
        return out.unsqueeze(2) if five else out

    def lora_saver(self):
        from diffusers import QwenImagePipeline

        return QwenImagePipeline
