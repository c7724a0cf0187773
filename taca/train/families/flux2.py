"""FLUX.2 (``Flux2Transformer2DModel``): ``Flux2Pipeline`` (dev: Mistral3 text encoder, guidance-
distilled) and ``Flux2KleinPipeline`` (klein: Qwen3 text encoder, no guidance embedding), trained
as diffusers' ``train_dreambooth_lora_flux2.py`` / ``train_dreambooth_lora_flux2_klein.py`` do:

- latents: the VAE's (``AutoencoderKLFlux2``) posterior mode, patchified 2x2 (``_patchify_latents``:
  (B, C, H, W) -> (B, 4C, H/2, W/2)) and normalized with the VAE's batch-norm running statistics,
  ``(x - bn.running_mean) / sqrt(bn.running_var + batch_norm_eps)`` -- the inverse of the
  pipelines' decode path. ``encode_images`` returns these patchified latents; noise, targets and
  ``predict``'s output live in the same (B, 4C, H/2, W/2) space, as in the scripts.
- text: the pipeline's own ``encode_prompt`` (stacked hidden states of layers (10, 20, 30) of
  Mistral3, or (9, 18, 27) of Qwen3), always padded to ``max_sequence_length`` (default 512) with
  no mask handed to the transformer, so one caption's entry never depends on its batch and the
  default row split is right. Only ``prompt_embeds`` is cached: the text ids are rebuilt from its
  length by the pipeline's ``_prepare_text_ids``.
- predict: tokens ``_pack_latents`` ((B, 4C, h, w) -> (B, h w, 4C)), 4-D ids (t, h, w, l) from
  ``_prepare_latent_ids`` / ``_prepare_text_ids``, ``timestep = t / 1000 = sigma`` (the
  transformer multiplies it by 1000 itself), the guidance embedding at ``--guidance`` where the
  transformer has one (dev; the Klein pipelines pass ``guidance=None``), output = noise - x0.
- the scheduler uses dynamic shifting (the pipelines pass their own mu), and the scripts do not
  shift the sampled sigmas: ``shift()`` is 1 (a static shift would be taken from the scheduler).

- reference images (edits; ``Flux2Pipeline`` / ``Flux2KleinPipeline``'s ``image``): each one's
  latents as ``encode_images`` makes them (the pipelines' ``_encode_vae_image``), packed and
  appended after the image tokens in order, with ids from ``_prepare_image_ids`` (t = 10, 20, ...
  for the first, second, ...); the output is cut to the target's tokens, as the pipelines do.

The Klein-KV pipeline's reference K/V cache is not trained here (a Klein-KV pipeline trains as
plain text to image, without references: its processors without a cache mode are the stock
computation).
"""
from __future__ import annotations


import torch

from . import _DiffusersFamily, _unwrap, vae_mode

# "attn": every projection of the joint attention: to_q/k/v/to_out.0 of the double-stream blocks
# and their text stream's add_q/k/v_proj / to_add_out (gamma scales the text keys), and in the
# single-stream blocks the fused QKV+MLP input projection and the fused attention+MLP output
# (attn.to_out, named per block: in the double-stream blocks attn.to_out is a ModuleList).
# diffusers' FLUX.2 scripts' default --lora_layers is the same without the text stream's four.
_ATTN_DOUBLE = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
_ATTN_SINGLE = ["attn.to_qkv_mlp_proj"]
_FF = ["ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out"]


class Flux2Family(_DiffusersFamily):
    name = "flux2"
    _text_attrs = ("text_encoder",)

    def __init__(self, pipe):
        super().__init__(pipe)
        n_single = int(pipe.transformer.config.num_single_layers)
        self.attn_targets = _ATTN_DOUBLE + _ATTN_SINGLE + [
            f"single_transformer_blocks.{i}.attn.to_out" for i in range(n_single)]
        self.ff_targets = _FF
        # the Klein pipelines call the transformer with guidance=None; Flux2Pipeline passes its
        # guidance_scale (used only where the transformer has a guidance embedding: dev)
        self._klein = type(pipe).__name__.startswith("Flux2Klein")
        from diffusers import Flux2Pipeline

        self._saver = type(pipe) if callable(getattr(type(pipe), "save_lora_weights", None)) else Flux2Pipeline

    @classmethod
    def references_for(cls, pipeline_class):
        # the pipelines take a list of any length; the Klein-KV pipeline's references go through its cache
        return 1 << 16 if pipeline_class in ("Flux2Pipeline", "Flux2KleinPipeline") else 0

    # --- caching ----------------------------------------------------------------------------
    def encode_text(self, captions, device, max_sequence_length):
        kw = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        with torch.no_grad():
            pe, _ = self.pipe.encode_prompt(prompt=list(captions), device=device, **kw)
        return {"prompt_embeds": pe}

    def encode_images(self, pixels):
        vae = self.vae()
        from diffusers import Flux2Pipeline

        with torch.no_grad():
            lat = vae_mode(vae, pixels)
            if lat.shape[-2] % 2 or lat.shape[-1] % 2:
                raise ValueError(f"taca train: FLUX.2 latents must have even height and width (2x2 patches), got "
                                 f"{lat.shape[-2]}x{lat.shape[-1]}: use a --resolution divisible by "
                                 f"{2 * 2 ** (len(vae.config.block_out_channels) - 1)}")
            lat = Flux2Pipeline._patchify_latents(lat)  # (B, 4C, H/2, W/2)
            mean = vae.bn.running_mean.view(1, -1, 1, 1).to(lat.device, lat.dtype)
            std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(lat.device, lat.dtype)
            return (lat - mean) / std

    # --- training forward -------------------------------------------------------------------
    def predict(self, transformer, noisy, sigma, cond, guidance):
        from diffusers import Flux2Pipeline

        B, C, h, w = noisy.shape
        tokens = Flux2Pipeline._pack_latents(noisy)  # (B, h w, C)
        img_ids = Flux2Pipeline._prepare_latent_ids(noisy).to(noisy.device)  # (B, h w, 4): (0, i, j, 0)
        pe = cond["prompt_embeds"]
        txt_ids = Flux2Pipeline._prepare_text_ids(pe).to(noisy.device)  # (B, L, 4): (0, 0, 0, l)
        config = getattr(transformer, "config", None) or _unwrap(transformer).config
        g = torch.full((B,), float(guidance), device=noisy.device, dtype=torch.float32) \
            if config.guidance_embeds and not self._klein else None
        refs = cond.get("reference_latents")
        if refs is not None:  # (B, R, C, h', w'): packed in order after the image tokens
            lats = [refs[:, r].to(tokens.dtype) for r in range(refs.shape[1])]
            ref_ids = Flux2Pipeline._prepare_image_ids([x[:1] for x in lats]).to(noisy.device)  # (1, N, 4)
            tokens = torch.cat([tokens] + [Flux2Pipeline._pack_latents(x) for x in lats], 1)
            img_ids = torch.cat([img_ids, ref_ids.expand(B, -1, -1).to(img_ids.dtype)], 1)
        # the pipelines pass t / 1000 (= sigma); the transformer multiplies by 1000 itself
        out = transformer(hidden_states=tokens, timestep=sigma, guidance=g, encoder_hidden_states=pe,
                          txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        # (B, h w, C) tokens back to (B, C, h, w): the inverse of _pack_latents
        return out[:, :h * w].permute(0, 2, 1).reshape(B, C, h, w)

    def lora_saver(self):
        return self._saver
