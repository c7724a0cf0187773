"""Ideogram 4 (``Ideogram4Transformer2DModel`` in ``Ideogram4Pipeline``): the conventions of
diffusers' ``train_dreambooth_lora_ideogram4.py`` and of the 0.42.1 pipeline it trains for.

- Latents: the VAE's (``AutoencoderKLFlux2``) posterior mode, cut into 2x2 patches whose channels
  are ordered (patch row, patch column, VAE channel) -- the VAE channel fastest, the inverse of the
  pipeline's decode ``view(B, h, w, 2, 2, C).permute(0, 5, 1, 3, 2, 4)`` (the script's
  ``patchify_latents``) -- then normalized per packed channel with the VAE's batch-norm running
  statistics, ``(x - bn.running_mean) / sqrt(bn.running_var + batch_norm_eps)``. ``encode_images``
  returns them as a grid (B, 4C, H/2, W/2); ``predict`` flattens it to the pipeline's tokens
  (B, H/2 * W/2, 4C) and back.
- Text: ``Ideogram4Pipeline.encode_prompt`` (the Qwen3-VL chat template, 13 tapped decoder layers
  concatenated per token, padding zeroed) left-pads every prompt to ``max_sequence_length``, so a
  row is ``[padding, caption's n tokens]``; the encoder sees each caption at positions 0..n-1 under
  a causal mask, so its features do not depend on the padding. Each caption is cached as its own n
  tokens (with the real encoder a token is 53,248 features: ~0.2 MB in bf16, ~220 MB for the
  pipeline's 2048-token block) and ``collate`` left-pads a batch to its longest caption. The
  pipeline raises on a prompt longer than ``max_sequence_length`` (it does not truncate);
  ``max_sequence_length`` None means its default (2048, as ``__call__`` and the script use).
- Forward: the pipeline's packed sequence ``[left padding, text, image]`` per row, built by its own
  ``Ideogram4Pipeline._prepare_ids`` (position ids, segment ids, indicator) from each caption's
  length, the image grid and the batch's padded text length ``L``; ``hidden_states`` zeros over the
  text block then the image tokens, ``encoder_hidden_states`` the text features then zeros over
  the image. The padding is its own attention segment and the positions count from each caption's
  first token, so the image tokens' prediction does not depend on ``L``: padding to the batch's
  longest caption instead of the pipeline's ``max_sequence_length`` changes nothing but the cost.
  ``timestep`` is model time ``1 - sigma`` (0 = noise) in the transformer's dtype, as the pipeline
  passes it. The model predicts ``x0 - noise`` (the script's target; the pipeline steps the
  scheduler with ``-v``): ``predict`` returns the image positions' output negated, ``noise - x0``.
- Sigmas: the script draws sigma directly from its logit-normal law and does not shift it (it does
  not index the scheduler's grid); ``shift()`` is 1. The pipeline sets its own logit-normal sigmas.
- Two transformers: LoRA goes on the conditional ``transformer`` only, as in the script; the
  image-only ``unconditional_transformer`` (asymmetric CFG) stays frozen and is not used here.
- LoRA targets: every block is joint (one self-attention over text and image tokens), so "attn" is
  every block's ``attention.to_q / to_k / to_v / to_out.0``; "attn+ff" adds the SwiGLU
  ``feed_forward.w1 / w2 / w3`` and is diffusers' script's default list
  (``to_q,to_k,to_v,to_out.0,w1,w2,w3``).

Prompt upsampling (``prompt_upsampling`` / the script's ``--upsample_prompt``) is not applied:
captions are encoded as written (Ideogram 4 is trained on JSON captions; write them in its schema).
"""
from __future__ import annotations

import inspect

import torch

from . import _DiffusersFamily, vae_mode

_ATTN = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0"]
_FF = ["feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
_TEXT = 3  # LLM_TOKEN_INDICATOR in diffusers' transformer_ideogram4
_DEFAULT_MAX_SEQUENCE_LENGTH = 2048  # Ideogram4Pipeline.__call__'s and the script's default
_PATCH = 2  # Ideogram4Pipeline.patch_size


class Ideogram4Family(_DiffusersFamily):
    name = "ideogram4"
    _text_attrs = ("text_encoder",)
    attn_targets, ff_targets = _ATTN, _FF


    def shift(self):
        return 1.0

    # --- caching ----------------------------------------------------------------------------
    def encode_text(self, captions, device, max_sequence_length):
        if max_sequence_length is None:
            p = inspect.signature(type(self.pipe).__call__).parameters.get("max_sequence_length")
            max_sequence_length = p.default if p is not None and isinstance(p.default, int) \
                else _DEFAULT_MAX_SEQUENCE_LENGTH
        L = int(max_sequence_length)
        with torch.no_grad():
            # the text block does not depend on the image grid: a 1x1 grid, its one image token dropped
            pe, _, _, indicator = self.pipe.encode_prompt(prompt=list(captions), grid_h=1, grid_w=1,
                                                          max_sequence_length=L, device=device)
        return {"prompt_embeds": pe[:, :L], "text_mask": indicator[:, :L] == _TEXT}

    def split_text(self, enc):
        out = []
        for pe, m in zip(enc["prompt_embeds"], enc["text_mask"]):
            n = int(m.sum())
            if not bool(m[m.shape[0] - n:].all()):
                raise ValueError("taca train: Ideogram 4's text block is not left-padded")
            out.append({"prompt_embeds": pe[pe.shape[0] - n:]})
        return out

    def collate(self, entries):
        n = [int(e["prompt_embeds"].shape[0]) for e in entries]
        L = max(n)
        first = entries[0]["prompt_embeds"]
        pe = first.new_zeros((len(entries), L) + tuple(first.shape[1:]))
        for j, e in enumerate(entries):
            pe[j, L - n[j]:] = e["prompt_embeds"]  # left-padded, as the pipeline lays the text out
        return {"prompt_embeds": pe, "text_lengths": torch.tensor(n, dtype=torch.long)}

    def encode_images(self, pixels):
        vae = self.vae()
        with torch.no_grad():
            z = vae_mode(vae, pixels)  # (B, C, H, W)
            B, C, H, W = z.shape
            p = _PATCH
            if H % p or W % p:
                factor = p * 2 ** (len(vae.config.block_out_channels) - 1)
                raise ValueError(f"taca train: Ideogram 4 latents must have even height and width (2x2 patches), "
                                 f"got {H}x{W}: use a --resolution divisible by {factor}")
            # (B, C, H, W) -> (B, p, p, C, H/p, W/p) -> (B, p p C, H/p, W/p): channels (row, column, C)
            x = z.reshape(B, C, H // p, p, W // p, p).permute(0, 3, 5, 1, 2, 4)
            x = x.reshape(B, p * p * C, H // p, W // p)
            mean = vae.bn.running_mean.view(1, -1, 1, 1).to(x.device, x.dtype)
            std = torch.sqrt(vae.bn.running_var + vae.config.batch_norm_eps).view(1, -1, 1, 1).to(x.device, x.dtype)
            return (x - mean) / std

    # --- training forward -------------------------------------------------------------------
    def predict(self, transformer, noisy, sigma, cond, guidance):
        from diffusers import Ideogram4Pipeline

        if noisy.dim() != 4:
            raise ValueError(f"taca train: Ideogram 4 latents must be (B, 4C, h, w), got {tuple(noisy.shape)}")
        B, D, h, w = noisy.shape
        dev, dt = noisy.device, noisy.dtype
        tokens = noisy.permute(0, 2, 3, 1).reshape(B, h * w, D)  # the pipeline's (B, h w, 4C) image tokens
        pe = cond["prompt_embeds"]
        L = pe.shape[1]
        lengths = [int(n) for n in cond["text_lengths"].tolist()]
        position_ids, segment_ids, indicator = Ideogram4Pipeline._prepare_ids(lengths, h, w, L, dev)
        hidden = torch.cat([tokens.new_zeros(B, L, D), tokens], dim=1)
        text = torch.cat([pe, pe.new_zeros(B, h * w, pe.shape[-1])], dim=1)
        out = transformer(hidden_states=hidden, timestep=(1.0 - sigma).to(dt), encoder_hidden_states=text,
                          position_ids=position_ids, segment_ids=segment_ids, indicator=indicator,
                          return_dict=False)[0]
        # the image positions' x0 - noise, negated, back on the latent grid
        return -out[:, L:].reshape(B, h, w, D).permute(0, 3, 1, 2)

    def lora_saver(self):
        from diffusers import Ideogram4Pipeline

        return Ideogram4Pipeline
