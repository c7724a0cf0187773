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

Text-to-image only: the Edit / EditPlus / Layered pipelines share the transformer but condition on
reference images (extra latent tokens after the image, an image-aware prompt template); that
conditioning is out of scope, and those pipelines are refused rather than trained without it.
"""
from __future__ import annotations


import torch

from . import _DiffusersFamily, _MaskedTextFamily, _unwrap, call_default, one_frame, vae_mode

# both streams' projections of the joint attention (diffusers' train_dreambooth_lora_qwen_image.py
# trains only the image stream's to_q / to_k / to_v / to_out.0 by default)
_ATTN = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
         "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
_FF = ["img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]
_MASK = "prompt_embeds_mask"
_DEFAULT_MAX_SEQUENCE_LENGTH = 512  # QwenImagePipeline.__call__'s and the script's default


class QwenImageFamily(_MaskedTextFamily, _DiffusersFamily):
    name = "qwenimage"
    _text_attrs = ("text_encoder",)
    text_mask = _MASK
    attn_targets, ff_targets = _ATTN, _FF

    def __init__(self, pipe):
        cls = type(pipe).__name__
        if "Edit" in cls or "Layered" in cls:
            raise ValueError(
                f"taca train: {cls} conditions on reference images, which taca train does not feed; "
                f"Qwen-Image training is text-to-image (load the model as a QwenImagePipeline)")
        super().__init__(pipe)

    # --- caching ----------------------------------------------------------------------------
    def encode_text(self, captions, device, max_sequence_length):
        if max_sequence_length is None:
            max_sequence_length = call_default(self.pipe, "max_sequence_length", _DEFAULT_MAX_SEQUENCE_LENGTH)
        with torch.no_grad():
            pe, mask = self.pipe.encode_prompt(prompt=list(captions), device=device,
                                               max_sequence_length=int(max_sequence_length))
        if mask is None:  # the pipeline drops the mask when no prompt is padded
            mask = torch.ones(pe.shape[:2], dtype=torch.long, device=pe.device)
        return {"prompt_embeds": pe, _MASK: mask}

    def encode_images(self, pixels):
        vae = self.vae()
        c = vae.config
        with torch.no_grad():
            z = vae_mode(vae, pixels.unsqueeze(2))  # (B, 3, 1, H, W): one frame -> (B, C, 1, h, w)
            mean = torch.tensor(c.latents_mean, device=z.device, dtype=z.dtype).view(1, c.z_dim, 1, 1, 1)
            inv_std = 1.0 / torch.tensor(c.latents_std, device=z.device, dtype=z.dtype).view(1, c.z_dim, 1, 1, 1)
            return (z - mean) * inv_std

    # --- training forward -------------------------------------------------------------------
    def predict(self, transformer, noisy, sigma, cond, guidance):
        from diffusers import QwenImagePipeline

        x, five = one_frame(noisy, "Qwen-Image")
        B, C, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"taca train: Qwen-Image latents must have even height and width, got {h}x{w}")
        packed = QwenImagePipeline._pack_latents(x, B, C, h, w)
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
                          img_shapes=[[(1, h // 2, w // 2)]] * B, return_dict=False)[0]
        # (B, h/2 * w/2, 4 C) tokens back to latents: the inverse of _pack_latents
        out = out.reshape(B, h // 2, w // 2, -1, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, -1, h, w)
        return out.unsqueeze(2) if five else out

    def lora_saver(self):
        from diffusers import QwenImagePipeline

        return QwenImagePipeline
