"""Qwen-Image 2.1 (``QwenImage21Transformer2DModel`` in ``QwenImage21Pipeline``), text to image.
diffusers has no LoRA script for it: the conventions are the 0.42.1 pipeline's, and where they are
Qwen-Image's (``QwenImageFamily``, ``train_dreambooth_lora_qwen_image.py``) they are taken from it.

Shared with Qwen-Image (inherited):
- Latents: 5-D (B, C, 1, h, w) from the video VAE (``AutoencoderKLQwenImage21``: 16x spatial
  compression, 64 channels), normalized per channel as ``(z - latents_mean) / latents_std`` -- the
  pipeline's own ``_encode_vae_image`` for condition images, inverted by its decode path
  (``z * std + mean``). The posterior mode is cached (the pipeline encodes with ``argmax`` too).
- Text: the pipeline pads the prompts' embeddings to the batch's longest after their tokens with a
  mask (None when nothing is padded): cached at each caption's length (``split_by_mask``),
  re-padded per batch (``pad_collate``).
- Sigmas: the scheduler's dynamic shifting (the pipeline passes its own ``mu``) leaves training
  sigmas unshifted; a static shift would be taken from the scheduler config.

Different from Qwen-Image:
- The VAE reads RGBA (``in_channels = 4``): the pipeline converts a condition image to RGBA before
  encoding it (``img.convert("RGBA")``, an opaque alpha of 1 in [-1, 1]), and the training images
  (RGB) get the same opaque alpha channel here.
- Text: ``QwenImage21Pipeline.encode_prompt`` (Qwen3-VL through its processor, a raw template, the
  system turn dropped, the last decoder layer's output before the final norm) takes no
  ``max_sequence_length`` and never truncates, so ``--max-sequence-length`` is refused rather than
  ignored. The embeddings' image-slot mask is all False in text to image; it is checked, not cached.
- Padding moves the image: the model's rotary positions advance over every text token, padded
  ones included, and the target image sits at the position after them, so a right-padded caption
  sees its image further away than the same caption alone (the pipeline's batched call of unequal
  prompts gives each a different image than calling it alone). ``predict`` therefore runs the
  transformer once per caption length in the batch, each caption unpadded and with no text mask --
  what the pipeline computes for that caption on its own (its usual one-prompt call); a batch of
  equal lengths is one call. After split calls, the TACA handle's ``last_gamma`` (what taca train
  records per sample) is set to every sample's gamma in the batch's order.
- Forward: no 2x2 patches -- the latents enter as a plain spatial flatten (B, h w, C)
  (``QwenImage21Pipeline._pack_latents``); ``img_shapes = [[(1, h, w)]] * B``; ``img_mask`` is the
  text's (all False) followed by one True slot per 2x2 group of target tokens (so h and w are even,
  as the pipeline makes them); ``timestep = sigma`` (the pipeline passes ``t / 1000``); no KV cache
  (the pipeline's cache only skips recomputing the text's keys between steps; training runs the
  full prefill every step). The model returns the whole joint sequence: the velocity ``noise - x0``
  is its last h w tokens, as the pipeline slices it, unflattened to (B, C, 1, h, w).
- LoRA targets: one single-stream block type whose attention covers text and image tokens, so
  "attn" is ``attn.to_q / to_k / to_v / to_out.0`` of every block (the text keys gamma scales come
  from the same ``to_k``), "attn+ff" adds the SwiGLU ``img_mlp.proj / gate_layer / out`` (the
  blocks' only MLP, applied to text tokens too).

Condition images (the pipeline's ``image=``, spliced into the text at its image slots) are not
trained: captions are encoded without them.
"""
from __future__ import annotations


import torch

from . import _unwrap, one_frame
from .qwenimage import _MASK, QwenImageFamily

_ATTN = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]
_FF = ["img_mlp.proj", "img_mlp.gate_layer", "img_mlp.out"]
_VAE_FACTOR = 16  # QwenImage21Pipeline.vae_scale_factor
_SLOT = 4  # latent tokens per image slot of the text sequence (2x2), transformer_qwenimage21._IMG_TOKENS_PER_SLOT


class QwenImage21Family(QwenImageFamily):
    name = "qwenimage21"
    _text_attrs = ("text_encoder",)
    attn_targets, ff_targets = _ATTN, _FF


    # --- caching ----------------------------------------------------------------------------
    def encode_text(self, captions, device, max_sequence_length):
        if max_sequence_length is not None:
            raise ValueError("taca train: QwenImage21Pipeline encodes prompts whole (it takes no max_sequence_length "
                             "and does not truncate); leave --max-sequence-length out")
        with torch.no_grad():
            pe, mask, image_slots = self.pipe.encode_prompt(prompt=list(captions), device=device)
        if image_slots is not None and bool(image_slots.any()):
            raise ValueError("taca train: a caption encoded to Qwen-Image 2.1 image slots (<|image_pad|> tokens); "
                             "taca train feeds no condition images")
        if mask is None:  # the pipeline drops the mask when no prompt is padded
            mask = torch.ones(pe.shape[:2], dtype=torch.long, device=pe.device)
        return {"prompt_embeds": pe, _MASK: mask}

    def encode_images(self, pixels):
        multiple = 2 * _VAE_FACTOR  # 2x2 latent tokens per image slot
        if pixels.shape[-2] % multiple or pixels.shape[-1] % multiple:
            raise ValueError(f"taca train: Qwen-Image 2.1 images must have height and width divisible by {multiple} "
                             f"(16x VAE, 2x2 image slots), got {pixels.shape[-2]}x{pixels.shape[-1]}: use a "
                             f"--resolution divisible by {multiple}")
        vae = getattr(self.pipe, "vae", None)
        if vae is not None and vae.config.get("in_channels", 3) == 4 and pixels.shape[1] == 3:
            # RGB -> RGBA with an opaque alpha, as the pipeline's img.convert("RGBA") before its VAE
            pixels = torch.cat([pixels, torch.ones_like(pixels[:, :1])], dim=1)
        return super().encode_images(pixels)

    # --- training forward -------------------------------------------------------------------
    def predict(self, transformer, noisy, sigma, cond, guidance):
        x, five = one_frame(noisy, "Qwen-Image 2.1")
        B, C, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"taca train: Qwen-Image 2.1 latents must have even height and width (2x2 image "
                             f"slots), got {h}x{w}")
        pe = cond["prompt_embeds"]
        mask = cond.get(_MASK)
        lengths = None if mask is None else mask.to(torch.bool).sum(1).tolist()
        if lengths is None or len(set(lengths)) == 1:
            n = pe.shape[1] if lengths is None else lengths[0]
            out = self._forward(transformer, x, sigma, pe[:, :n])
        else:
            # one call per caption length, each unpadded: the model's rotary positions count the
            # padded text tokens, so padding a caption would move its image (see the module doc)
            from ...pipeline import get_handle

            handle = get_handle(_unwrap(transformer))
            rows, gammas = [None] * B, [None] * B
            for n in sorted(set(lengths)):
                idx = [j for j, m in enumerate(lengths) if m == n]
                sel = torch.tensor(idx, device=x.device)
                out = self._forward(transformer, x[sel], sigma[sel.to(sigma.device)], pe[sel.to(pe.device), :n])
                g = handle.last_gamma if handle is not None else None
                for k, j in enumerate(idx):
                    rows[j] = out[k]
                    gammas[j] = g[k] if g is not None else None
            out = torch.stack(rows)
            if handle is not None:
                # what taca train reads after the step: each sample's gamma, in the batch's order
                # (1 for a sample whose call was outside the window), not the last call's alone
                ref = next((g for g in gammas if g is not None), None)
                handle.last_gamma = None if ref is None else \
                    torch.stack([g if g is not None else torch.ones_like(ref) for g in gammas])
        return out.unsqueeze(2) if five else out

    @staticmethod
    def _forward(transformer, x, sigma, pe):
        """One transformer call on unpadded captions (no text mask, as the pipeline passes for them)
        -> the target image's velocity (b, C, h, w)."""
        b, C, h, w = x.shape
        n = h * w
        tokens = x.reshape(b, C, n).transpose(1, 2)  # QwenImage21Pipeline._pack_latents
        # the text has no image slot; the target image's 2x2 groups follow it
        img_mask = torch.cat([torch.zeros(b, pe.shape[1], dtype=torch.bool, device=x.device),
                              torch.ones(b, n // _SLOT, dtype=torch.bool, device=x.device)], dim=1)
        out = transformer(hidden_states=tokens, timestep=sigma, encoder_hidden_states=pe,
                          encoder_hidden_states_mask=None, img_shapes=[[(1, h, w)]] * b, img_mask=img_mask,
                          return_dict=False)[0]
        return out[:, -n:].transpose(1, 2).reshape(b, -1, h, w)  # the target image's tokens, unflattened

    def lora_saver(self):
        from diffusers import QwenImage21Pipeline

        return QwenImage21Pipeline
