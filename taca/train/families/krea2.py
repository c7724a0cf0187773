"""Krea 2 (``Krea2Transformer2DModel`` in ``Krea2Pipeline``): the conventions of diffusers'
``train_dreambooth_lora_krea2.py`` and of the 0.42.1 pipeline it trains for.

- Latents: Krea 2 decodes with Qwen-Image's ``AutoencoderKLQwenImage``, normalized as for
  Qwen-Image: 5-D (B, C, 1, h, w), ``(z - latents_mean) * (1 / latents_std)`` per channel (the
  script; the pipeline's decode path inverts it as ``z / (1 / std) + mean``). The posterior mode is
  cached (the script samples).
- Text: ``Krea2Pipeline.encode_prompt`` (Qwen3-VL, a stack of ``num_text_layers`` tapped hidden
  states per token, (B, L, K, D)) always returns a fixed-length block of ``max_sequence_length``
  tokens laid out ``[caption | padding | 5 suffix tokens]`` with a bool mask that the pipeline
  always passes (the padding sits in the middle, so the mask is not a prefix). The transformer
  removes padded tokens as attention keys everywhere (text fusion and joint blocks) and never reads
  their lanes back, so each caption is cached as its valid tokens only (``prompt_embeds`` (n, K,
  D)), their places in the block (``text_positions``) and the block's length (``text_len``);
  ``collate`` rebuilds the pipeline's fixed-length block (zeros where the encoder had padding) and
  its mask. That keeps a 512-token cache entry (~30 MB in bf16 with the real encoder) to the
  caption's own tokens and leaves the prediction unchanged bit for bit. ``max_sequence_length``
  None means the pipeline's default (512, as ``__call__`` and the script use).
- Forward: the latents packed into ``patch_size`` (2) square patches as ``Krea2Pipeline._pack_latents``
  does (the script inlines the same reshape), ``position_ids`` from
  ``Krea2Pipeline.prepare_position_ids(L, h/2, w/2)`` (text at the origin, image tokens on the
  grid), ``encoder_attention_mask`` the block's mask, ``timestep = sigma`` in [0, 1] (the script
  passes ``timesteps / 1000`` in float32; the pipeline ``t / 1000`` in the latents' dtype). No
  guidance embedding (``guidance_scale`` is classifier-free guidance). The output is the velocity
  ``noise - x0`` (the script's target), unpacked back to (B, C, 1, h, w).
- Sigmas: the scheduler uses resolution-aware dynamic shifting (as ``Krea2Pipeline``'s docstring
  requires of Krea 2's scheduler config), so training sigmas are not shifted, as in the script.
- LoRA targets: "attn" is every projection of the 28 single-stream blocks' joint attention,
  ``transformer_blocks.N.attn.to_q / to_k / to_v / to_gate / to_out.0`` (one set of projections
  for text and image tokens: the text keys gamma scales come from the same ``to_k``); the
  ``text_fusion`` blocks, whose attention has the same module names but sees text only, are left
  out, so the names are listed per block. "attn+ff" adds the joint blocks' SwiGLU ``ff.gate /
  ff.up / ff.down``. diffusers' script trains by default ``img_in, final_layer.linear, to_q,
  to_k, to_v, to_out.0, to_gate, ff.up, ff.down, text_fusion.projector, txt_in.linear_1,
  txt_in.linear_2, time_embed.linear_1, time_embed.linear_2, time_mod_proj`` (bare names, so its
  attention and ff entries also hit the text-fusion blocks); passing that list as
  ``--lora-targets`` reproduces it, and ``to_q,to_k,to_v,to_out.0,to_gate`` is the authors'
  attention-only variant.
"""
from __future__ import annotations


import torch

from . import _DiffusersFamily, call_default, one_frame
from .qwenimage import QwenImageFamily

_ATTN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_gate", "attn.to_out.0")
_FF = ("ff.gate", "ff.up", "ff.down")
_DEFAULT_MAX_SEQUENCE_LENGTH = 512  # Krea2Pipeline.__call__'s and the script's default
_MASK = "prompt_embeds_mask"


class Krea2Family(_DiffusersFamily):
    name = "krea2"
    _text_attrs = ("text_encoder",)

    def __init__(self, pipe):
        super().__init__(pipe)
        self._patch = int(getattr(pipe, "patch_size", None) or pipe.config.get("patch_size", 2))
        n_blocks = int(pipe.transformer.config.num_layers)
        self.attn_targets = [f"transformer_blocks.{i}.{n}" for i in range(n_blocks) for n in _ATTN]
        self.ff_targets = [f"transformer_blocks.{i}.{n}" for i in range(n_blocks) for n in _FF]

    # --- caching ----------------------------------------------------------------------------
    def encode_text(self, captions, device, max_sequence_length):
        if max_sequence_length is None:
            max_sequence_length = call_default(self.pipe, "max_sequence_length", _DEFAULT_MAX_SEQUENCE_LENGTH)
        with torch.no_grad():
            pe, mask = self.pipe.encode_prompt(prompt=list(captions), device=device,
                                               max_sequence_length=int(max_sequence_length))
        return {"prompt_embeds": pe, _MASK: mask.bool()}

    def split_text(self, enc):
        pe, mask = enc["prompt_embeds"], enc[_MASK]
        L = torch.tensor(pe.shape[1], dtype=torch.long)
        out = []
        for j in range(pe.shape[0]):
            pos = mask[j].nonzero().flatten().cpu()
            out.append({"prompt_embeds": pe[j, pos.to(pe.device)], "text_positions": pos, "text_len": L.clone()})
        return out

    def collate(self, entries):
        lengths = {int(e["text_len"]) for e in entries}
        if len(lengths) != 1:
            raise ValueError(f"taca train: Krea 2 text entries of different block lengths {sorted(lengths)} "
                             f"in one batch")
        L = lengths.pop()
        first = entries[0]["prompt_embeds"]
        pe = first.new_zeros((len(entries), L) + tuple(first.shape[1:]))
        mask = torch.zeros(len(entries), L, dtype=torch.bool)
        for j, e in enumerate(entries):
            pos = e["text_positions"].long()
            pe[j, pos.to(pe.device)] = e["prompt_embeds"]
            mask[j, pos] = True
        return {"prompt_embeds": pe, _MASK: mask}

    # the Qwen-Image VAE, normalized per channel with its latents_mean / latents_std (5-D latents)
    encode_images = QwenImageFamily.encode_images

    # --- training forward -------------------------------------------------------------------
    def predict(self, transformer, noisy, sigma, cond, guidance):
        from diffusers import Krea2Pipeline

        x, five = one_frame(noisy, "Krea 2")
        B, C, h, w = x.shape
        p = self._patch
        if h % p or w % p:
            raise ValueError(f"taca train: Krea 2 latents must have height and width divisible by {p}, got {h}x{w}")
        # (B, C, h, w) -> (B, h/p * w/p, C p p): Krea2Pipeline._pack_latents
        packed = x.reshape(B, C, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        packed = packed.reshape(B, (h // p) * (w // p), C * p * p)
        pe = cond["prompt_embeds"]
        mask = cond[_MASK].to(device=noisy.device, dtype=torch.bool)
        position_ids = Krea2Pipeline.prepare_position_ids(pe.shape[1], h // p, w // p, noisy.device)
        out = transformer(hidden_states=packed, encoder_hidden_states=pe, timestep=sigma, position_ids=position_ids,
                          encoder_attention_mask=mask, return_dict=False)[0]
        # (B, h/p * w/p, C p p) tokens back to latents: Krea2Pipeline._unpack_latents
        out = out.reshape(B, h // p, w // p, -1, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, -1, h, w)
        return out.unsqueeze(2) if five else out

    def lora_saver(self):
        from diffusers import Krea2Pipeline

        return Krea2Pipeline
