"""ERNIE-Image (``ErnieImageTransformer2DModel``, ``ErnieImagePipeline``) for ``taca train``.

diffusers has no LoRA script for ERNIE-Image; the conventions are the ones ``ErnieImagePipeline``
(diffusers 0.42.1, ``pipelines/ernie_image/pipeline_ernie_image.py``) applies at inference:

- latents: the pipeline's denoising space is the VAE's (``AutoencoderKLFlux2``) latents patchified
  2x2 and batch-norm normalized: its decode path (``__call__``, after the loop) computes
  ``latents * sqrt(bn.running_var + 1e-5) + bn.running_mean``, then ``_unpatchify_latents``
  ((B, 4C, h, w) -> (B, C, 2h, 2w)), then ``vae.decode``. The training latents are the inverse,
  ``(_patchify_latents(mode) - running_mean) / sqrt(running_var + 1e-5)``, (B, 4C, h, w) with
  4C = the transformer's ``in_channels`` (128), which patchifies nothing more itself at its
  ``patch_size`` 1. The eps is the pipeline's hard-coded 1e-5, NOT ``vae.config.batch_norm_eps``
  (1e-4 by default; the pipeline's TODO says the hub config does not hold the trained value), since
  training must produce what the pipeline decodes. The posterior mode is cached (``vae_mode``).
- image size: the pipeline needs height and width divisible by its ``vae_scale_factor``
  (``2 ** len(vae.config.block_out_channels)``: the VAE's downsampling times the 2x2 patches, 16);
  images are refused (ValueError naming ``--resolution``) otherwise, or where the latents do not
  tile the transformer's patches.
- timestep: the scheduler's ``t = sigma * num_train_timesteps`` as it is (``set_timesteps`` with
  explicit sigmas sets ``timesteps = sigmas * 1000``; the loop passes ``torch.full(..., t.item(),
  dtype=transformer.dtype)``; the transformer's sinusoidal ``Timesteps`` take t in [0, 1000]):
  ``predict`` passes ``1000 sigma`` computed in float32 as the scheduler does, then cast to the
  latents' (the weights') dtype as the pipeline casts it -- so bf16 training sees the same rounded
  timestep bf16 inference does. TACA's adapter reads this as its "t1000" convention. A scheduler
  whose ``num_train_timesteps`` is not 1000 is refused (the transformer would then get another
  scale than TACA reads), as are ``invert_sigmas`` (t = 1000 (1 - sigma)) and dynamic shifting
  (the pipeline passes no ``mu``: such a scheduler cannot generate).
- sigmas: shifted by the scheduler's static shift (``static_shift``; the pipeline hands
  ``linspace(1, 0)`` sigmas to ``set_timesteps``, which shifts them by ``shift``).
- output: the velocity ``noise - x0`` as it is: ``FlowMatchEulerDiscreteScheduler.step`` adds
  ``(sigma_next - sigma) * pred`` (no negation).
- text: ``encode_prompt`` tokenizes and encodes EACH prompt alone (no padding, ``truncation=True``
  at the tokenizer's ``model_max_length``, a BOS / id 0 for an empty prompt) and takes the text
  encoder's second-to-last hidden state; ``_pad_text`` then zero-pads the batch to its longest
  prompt and passes ``text_lens``, from which the transformer builds a bool key mask (padded text
  removed) and the image tokens' RoPE ids (their first axis is the sample's own text length; the
  text ids are ``arange``). So a caption's entry is its own (L_i, D) embedding, encoded alone
  whatever its batch (``split_by_mask``), re-padded per batch with a mask (``pad_collate``), and
  ``predict`` passes ``text_lens`` = the mask's counts: a sample's output does not depend on the
  other captions of its batch. The pipeline takes no ``max_sequence_length``: a
  ``--max-sequence-length`` is refused (ValueError here; ``taca train`` stops earlier with a
  ConfigError naming it) rather than truncating differently from generation.
- LoRA targets: every layer is one shared-AdaLN single-stream block whose ``self_attention``
  covers [image, text]; "attn" is ``layers.<i>.self_attention.to_q / to_k / to_v / to_out.0``
  (the names diffusers' ``ErnieImageLoraLoaderMixin`` loads, and AI-Toolkit's ERNIE LoRAs use), and
  "attn+ff" adds the block's SwiGLU MLP ``layers.<i>.mlp.gate_proj / up_proj / linear_fc2`` (the
  only MLP; it runs on text tokens too). Full module names, so nothing outside ``layers`` is hit.
- gradient checkpointing: the transformer supports it; the adapter hands the call's TACA state to
  the recomputed blocks (the model forwards no attention kwargs).

Not trained here: the optional prompt enhancer (``pe`` / ``pe_tokenizer``, ``use_pe=True`` by
default) rewrites a prompt by sampling an LLM before it is encoded; captions are encoded as they
are written (what the pipeline does with ``use_pe=False`` or without a ``pe``). CFG's negative
prompt is an inference-time batch; training conditions on the captions only, as every family does.
"""
from __future__ import annotations

import torch

from . import (_DiffusersFamily, _MaskedTextFamily, check_flow_scheduler, check_image_size, layer_names, pad_collate,
               vae_mode)

_ATTN = ("self_attention.to_q", "self_attention.to_k", "self_attention.to_v", "self_attention.to_out.0")
_FF = ("mlp.gate_proj", "mlp.up_proj", "mlp.linear_fc2")
_MASK = "prompt_embeds_mask"
_BN_EPS = 1e-5  # ErnieImagePipeline.__call__'s decode: sqrt(bn.running_var + 1e-5), not the config's eps
_T_SCALE = 1000  # the adapter's "t1000" timestep convention


class ErnieImageFamily(_MaskedTextFamily, _DiffusersFamily):
    name = "ernie_image"
    _text_attrs = ("text_encoder",)
    text_mask = _MASK
    text_seq = ("prompt_embeds",)

    def __init__(self, pipe):
        super().__init__(pipe)
        t = pipe.transformer
        c = t.config
        if c.in_channels != c.out_channels:
            raise ValueError(f"taca train: this ERNIE-Image transformer takes {c.in_channels} input channels for "
                             f"{c.out_channels} output channels; ErnieImagePipeline denoises latents of one shape "
                             f"(text to image), which is what taca train trains")
        check_flow_scheduler(getattr(pipe, "scheduler", None), "ERNIE-Image", "ErnieImagePipeline", no_mu=True)
        self._t_scale = float(_T_SCALE)
        self._patch = int(c.patch_size)
        vae = getattr(pipe, "vae", None)
        if vae is not None:
            n = 4 * int(vae.config.latent_channels)  # the pipeline's 2x2 patchify
            if n != c.in_channels or getattr(vae, "bn", None) is None or vae.bn.num_features != n:
                raise ValueError(f"taca train: ErnieImagePipeline's VAE gives {n} channels after its 2x2 patches "
                                 f"(batch-norm stats for {getattr(getattr(vae, 'bn', None), 'num_features', None)}), "
                                 f"the transformer takes {c.in_channels}: not an ERNIE-Image VAE")
        self.attn_targets = layer_names(t, "layers", _ATTN)
        self.ff_targets = layer_names(t, "layers", _FF)

    # --- text --------------------------------------------------------------------------------
    def encode_text(self, captions, device, max_sequence_length):
        if max_sequence_length is not None:
            raise ValueError("taca train: argument --max-sequence-length: ErnieImagePipeline encodes each prompt "
                             "whole (its __call__ takes no max_sequence_length; only the tokenizer's "
                             "model_max_length truncates); leave it out")
        captions = list(captions)
        if not captions or not all(isinstance(c, str) for c in captions):
            raise ValueError(f"taca train: ERNIE-Image captions must be a non-empty list of strings, got {captions!r}")
        with torch.no_grad():
            hidden = self.pipe.encode_prompt(captions, device)  # one (L_i, D) per caption, each encoded alone
        want = int(self.pipe.transformer.config.text_in_dim)
        if hidden[0].shape[-1] != want:
            raise ValueError(f"taca train: the ERNIE-Image text encoder gives {hidden[0].shape[-1]} features, the "
                             f"transformer's text_in_dim is {want}")
        # the pipeline's _pad_text: zeros after each prompt's tokens up to the batch's longest, + lengths
        return pad_collate([{"prompt_embeds": h} for h in hidden], _MASK, self.text_seq)

    # --- images ------------------------------------------------------------------------------
    def encode_images(self, pixels):
        from diffusers import ErnieImagePipeline

        vae = self.vae()
        factor = int(getattr(self.pipe, "vae_scale_factor", 2 ** len(vae.config.block_out_channels)))
        check_image_size(pixels, factor * self._patch, "ERNIE-Image",
                         f"the VAE and its 2x2 patches: {factor}; the transformer's patches: {self._patch}")
        with torch.no_grad():
            lat = ErnieImagePipeline._patchify_latents(vae_mode(vae, pixels))  # (B, 4C, H/f, W/f)
            mean = vae.bn.running_mean.view(1, -1, 1, 1).to(lat.device, lat.dtype)
            std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + _BN_EPS).to(lat.device, lat.dtype)
            return (lat - mean) / std

    # --- forward -----------------------------------------------------------------------------
    def predict(self, transformer, noisy, sigma, cond, guidance):
        if noisy.dim() != 4:
            raise ValueError(f"taca train: ERNIE-Image latents must be (B, C, h, w), got {tuple(noisy.shape)}")
        B, _, h, w = noisy.shape
        if h % self._patch or w % self._patch:
            raise ValueError(f"taca train: ERNIE-Image latents of {h}x{w} do not tile the transformer's "
                             f"{self._patch}x{self._patch} patches")
        pe = cond["prompt_embeds"].to(device=noisy.device, dtype=noisy.dtype)
        lens = cond[_MASK].to(device=noisy.device).bool().sum(1).to(torch.long)
        # the scheduler's t = sigma * 1000 (float32), handed over in the weights' dtype as the pipeline does
        t = (sigma.to(device=noisy.device, dtype=torch.float32) * self._t_scale).to(noisy.dtype)
        return transformer(hidden_states=noisy, timestep=t, text_bth=pe, text_lens=lens, return_dict=False)[0]

    def lora_saver(self):
        from diffusers import ErnieImagePipeline

        return ErnieImagePipeline
