"""HunyuanImage 2.1 (``HunyuanImageTransformer2DModel``, ``HunyuanImagePipeline``) for ``taca train``.

diffusers has no LoRA script for HunyuanImage; the conventions are the ones ``HunyuanImagePipeline``
(diffusers 0.42.1, ``pipelines/hunyuan_image/pipeline_hunyuanimage.py``; lines below are that file's)
applies at inference, and the transformer's (``models/transformers/transformer_hunyuanimage.py``):

- latents: the denoising space is the VAE's (``AutoencoderKLHunyuanImage``, 32x spatial compression,
  64 channels for the real model) latents times ``scaling_factor``: the decode path is
  ``vae.decode(latents / scaling_factor)`` (l. 858-859), with no shift (the VAE config has no
  ``shift_factor``), so the training latents are ``mode * scaling_factor``, (B, C, H / f, W / f) with
  f = ``vae_scale_factor`` = the VAE's ``spatial_compression_ratio`` (l. 215; ``prepare_latents``
  makes (B, in_channels, H // f, W // f), l. 459-476). Nothing is packed: the transformer patchifies
  itself (``patch_size`` (1, 1) for 2.1: one token per latent pixel) and unpatchifies its output to
  the latents' shape. Images whose sides f x patch does not divide are refused (ValueError naming
  ``--resolution``); the pipeline only warns below multiples of 2 f (l. 406-409). The posterior mode
  is cached (``vae_mode``).
- timestep: the scheduler's ``t = 1000 sigma`` in the latents' (the weights') dtype: the loop passes
  ``t.expand(B).to(latents.dtype)`` (l. 753) with latents in the transformer's dtype, where
  ``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=...)`` makes ``timesteps = sigmas * 1000``
  in float32 from its float32 (shifted) sigmas; ``predict`` computes ``1000 sigma`` in float32 and
  casts it the same way (bf16 training sees the rounded t bf16 inference does). The adapter reads
  this as its "t1000" convention. A scheduler with another ``num_train_timesteps``, ``invert_sigmas``
  or dynamic shifting (the pipeline passes its sigmas without ``mu``, l. 720-721: it cannot generate
  with one) is refused.
- sigmas: shifted by the scheduler's static shift (``static_shift``): the pipeline hands
  ``linspace(1, 0, n + 1)[:-1]`` to ``set_timesteps`` (l. 720), which shifts them by ``shift``.
- output: the velocity ``noise - x0`` as it is: ``FlowMatchEulerDiscreteScheduler.step`` (l. 831)
  adds ``(sigma_next - sigma) * pred``; no negation.
- guidance: HunyuanImage 2.1 (``guidance_embeds`` False) runs a guider (``AdaptiveProjectedMixGuidance``,
  CFG / APG over a [prompt] and a [negative] call, l. 676-704, 764-827): one transformer call per
  condition, the prompt's first; training fits the conditional call, as diffusers' LoRA scripts do.
  A guidance-embedding config (``guidance_embeds`` True) gets the pipeline's
  ``torch.tensor([distilled_guidance_scale] * B, dtype=the weights') * 1000`` (l. 726-736, the product
  taken in the weights' dtype), with ``--guidance`` as ``distilled_guidance_scale`` (the pipeline's
  default is 3.25; taca train's default 3.5 is FLUX.1's); without one, no guidance.
- meanflow: HunyuanImage-2.1-Distilled (``use_meanflow`` True, with a guidance embedding) is called
  with ``timestep_r`` = the NEXT step's t (0 at the last, l. 755-762): it predicts the mean velocity
  over [t_next, t], which the flow-matching loss (one sigma, target noise - x0) does not train; it
  is refused rather than trained at ``timestep_r = t`` (a call the pipeline never makes).
- text: two encoders, as ``encode_prompt`` (l. 296-388) runs them.
  Qwen2.5-VL: each prompt in the chat template, tokenized with ``padding="max_length"`` to
  ``tokenizer_max_length + 34`` (1034; right padding, so a prompt's tokens are the same in any
  batch), the hidden state 3 from the end (``hidden_state_skip_layer`` 2), the template's 34 prefix
  tokens dropped with their mask (l. 223-258): (B, 1000, D) and a (B, 1000) 0/1 mask.
  ByT5 (the glyph encoder): only for prompts with quoted text (``extract_glyph_text``: '...', "...",
  ‘...’, “...” as ``Text "..."``. ), one prompt at a time, padded to ``tokenizer_2_max_length``
  (128) with its mask (l. 260-294); a prompt without quotes gets 128 zero vectors and an all-zero
  mask (l. 352-360). The transformer reorders each sample's text to [valid byT5, valid Qwen,
  padding] and builds a bool key mask from the two masks (transformer l. 804-851); the token
  refiner masks padded keys too and pools the text over the mask (transformer l. 342-411), so
  padding positions never reach the image tokens. A caption's cache entry is therefore its VALID
  tokens of each encoder (``prompt_embeds`` (L, D), ``prompt_embeds_2`` (M, D2); M = 0 without
  quotes), encoded at the pipeline's fixed padding, the same in any batch; ``collate`` re-pads them
  with zeros to the pipeline's fixed 1000 and 128 with the masks, so the transformer gets the
  pipeline's shapes and masks (its padding rows are zeros where the pipeline has the encoders'
  hidden states of pad tokens, which the masks remove: the prediction is the pipeline's bit for
  bit). Every training forward therefore carries the 1128 text tokens generation does (at 2048 x 2048,
  4096 image tokens, that is 28% more tokens than the valid text alone would need); the cache holds
  only the valid ones. The pipeline takes no ``max_sequence_length``: ``--max-sequence-length`` is
  refused. A tokenizer that pads on the left (the mask then not a prefix) is refused by ``split_by_mask``.
- LoRA targets: "attn" is the double-stream blocks' joint-attention projections (image
  ``to_q / to_k / to_v / to_out.0``, text ``add_q_proj / add_k_proj / add_v_proj / to_add_out``) and
  the single-stream blocks' ``to_q / to_k / to_v`` (their output is the fused attention + MLP
  ``proj_out``, left out as for FLUX.1); "attn+ff" adds the double-stream blocks' ``ff`` /
  ``ff_context``. Full module names: the token refiner (``context_embedder``, text-only
  self-attention, stock under TACA) is not hit.
- gradient checkpointing: refused. diffusers 0.42.1's forward calls ``_gradient_checkpointing_func(block,
  hidden_states, encoder_hidden_states, temb, attention_mask=..., image_rotary_emb=...)``, and the
  function ``enable_gradient_checkpointing()`` installs (what ``--gradient-checkpointing`` does) is
  ``(module, *args)``: TypeError at the first forward, TACA or not. ``check_config`` raises a
  ConfigError naming ``--gradient-checkpointing`` (before the weights load for a local folder or a
  known id, else before ``--out`` is touched); ``predict`` refuses a transformer whose checkpointing
  was turned on elsewhere with a function that cannot take those keywords (one that can, as
  tests/test_models_hunyuanimage.py installs, is left alone).
- saving: ``HunyuanImagePipeline`` has no LoRA loader in diffusers 0.42.1: the adapter is written by
  ``FluxPipeline.save_lora_weights`` (``transformer.``-prefixed keys, the PEFT config as metadata),
  which ``pipe.transformer.load_lora_adapter(path, prefix="transformer")`` and
  ``taca.enable(pipe, lora=path)`` read.

Not trained: ``HunyuanImageRefinerPipeline`` (conditions on an image: its noised latents concatenated
on channels, a 5-D refiner VAE, a meanflow transformer of 2 x 64 input channels) and the distilled
meanflow checkpoint; the prompt rewriter of the original repository is not part of the pipeline.
"""
from __future__ import annotations

import inspect
import json
import os

import torch

from . import (_DiffusersFamily, _unwrap, _vae_latents, check_flow_scheduler, check_image_size, check_text_parts,
               check_tokens_and_text, layer_names, pad_collate, saver_or_flux, split_by_mask)

_DOUBLE_ATTN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
_SINGLE_ATTN = ("attn.to_q", "attn.to_k", "attn.to_v")
_DOUBLE_FF = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
_MASK, _MASK_2 = "prompt_embeds_mask", "prompt_embeds_mask_2"
_SEQ, _SEQ_2 = ("prompt_embeds",), ("prompt_embeds_2",)
_T_SCALE = 1000  # the adapter's "t1000" timestep convention
_TEXT_LEN, _TEXT_LEN_2 = 1000, 128  # HunyuanImagePipeline's tokenizer_max_length / tokenizer_2_max_length (l. 217-218)
_T2I = "HunyuanImagePipeline"

CHECKPOINTING_REFUSED = (
    "taca train: argument --gradient-checkpointing: HunyuanImage cannot be trained with gradient checkpointing in "
    "diffusers 0.42.1: HunyuanImageTransformer2DModel.forward passes attention_mask= and image_rotary_emb= by keyword "
    "to the checkpointing function, and the one enable_gradient_checkpointing() installs takes none (TypeError, with "
    "or without TACA); leave --gradient-checkpointing out")


def _kw_checkpointing_ok(model) -> bool:
    """Whether the model's checkpointing is off, or on with a function that takes the call the 0.42.1
    forward makes (a block, three tensors, ``attention_mask=`` and ``image_rotary_emb=``)."""
    m = _unwrap(model)
    if not getattr(m, "gradient_checkpointing", False):
        return True
    func = getattr(m, "_gradient_checkpointing_func", None)
    if func is None:
        return False
    try:
        inspect.signature(func).bind(None, None, None, None, attention_mask=None, image_rotary_emb=None)
    except TypeError:
        return False
    except ValueError:  # no signature to read: let the call tell
        return True
    return True


def _local_transformer_config(model) -> dict:
    """The transformer's config.json of a local pipeline folder (no weights read), or {}."""
    path = os.path.join(os.path.expanduser(str(model)), "transformer", "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


class HunyuanImageFamily(_DiffusersFamily):
    name = "hunyuanimage"
    _text_attrs = ("text_encoder", "text_encoder_2")

    def __init__(self, pipe):
        cls = type(pipe).__name__
        if cls != _T2I and "Refiner" in cls:
            raise ValueError(f"taca train: {cls} conditions on an image (its noised latents concatenated to the "
                             f"latents on channels, a refiner VAE and a meanflow transformer), which taca train does "
                             f"not feed; HunyuanImage trains text to image ({_T2I}); run the refiner through "
                             f"taca.enable")
        t = getattr(pipe, "transformer", None)
        c = _unwrap(t).config if t is not None else None
        if c is not None:
            if type(_unwrap(t)).__name__ != "HunyuanImageTransformer2DModel":
                raise ValueError(f"taca train: the HunyuanImage family trains HunyuanImageTransformer2DModel, got "
                                 f"{type(_unwrap(t)).__name__}")
            if c.get("use_meanflow", False):
                raise ValueError(
                    "taca train: this HunyuanImage transformer has use_meanflow=True (HunyuanImage-2.1-Distilled): "
                    f"{_T2I} calls it with timestep_r = the next step's t, so it predicts the mean velocity to "
                    "the next step, which the flow-matching loss does not train; taca train trains the base "
                    "HunyuanImage 2.1 (use_meanflow False); run the distilled model through taca.enable")
            if c.in_channels != c.out_channels:
                raise ValueError(f"taca train: this HunyuanImage transformer takes {c.in_channels} input channels for "
                                 f"{c.out_channels} output channels (a refiner's image conditioning); {_T2I} denoises "
                                 f"latents of one shape (text to image), which is what taca train trains")
        super().__init__(pipe)
        sch = getattr(pipe, "scheduler", None)
        check_flow_scheduler(sch, "HunyuanImage", _T2I, no_mu=True, not_flow=(
            f"taca train: this {_T2I} has a {type(sch).__name__}; HunyuanImage is trained with the pipeline's "
            f"FlowMatchEulerDiscreteScheduler"))
        self._text_len = int(getattr(pipe, "tokenizer_max_length", _TEXT_LEN))
        self._text_len_2 = int(getattr(pipe, "tokenizer_2_max_length", _TEXT_LEN_2))
        self._patch = tuple(int(p) for p in c.patch_size) if c is not None else (1, 1)
        self._guidance = bool(c.get("guidance_embeds", False)) if c is not None else False
        vae = getattr(pipe, "vae", None)
        if vae is not None and c is not None and int(vae.config.latent_channels) != int(c.in_channels):
            raise ValueError(f"taca train: {_T2I}'s VAE gives {vae.config.latent_channels} latent channels, the "
                             f"transformer takes {c.in_channels}: not a HunyuanImage 2.1 VAE")
        if t is not None:
            self.attn_targets = (layer_names(t, "transformer_blocks", _DOUBLE_ATTN)
                                 + layer_names(t, "single_transformer_blocks", _SINGLE_ATTN))
            self.ff_targets = layer_names(t, "transformer_blocks", _DOUBLE_FF)

    # --- options --------------------------------------------------------------------------------
    @classmethod
    def check_config(cls, cfg, pipeline_class):
        """ConfigError before the weights load: the refiner pipeline (``--model``), a local folder whose
        transformer config is the distilled meanflow one (``--model``), ``--gradient-checkpointing``."""
        from ..config import ConfigError

        if pipeline_class != _T2I and "Refiner" in str(pipeline_class):
            raise ConfigError(f"taca train: argument --model: {cfg.model} is a {pipeline_class}, which conditions "
                              f"on an image taca train does not feed; HunyuanImage trains text to image ({_T2I})")
        config = _local_transformer_config(cfg.model)
        if config.get("use_meanflow", False):
            raise ConfigError(f"taca train: argument --model: {cfg.model}'s transformer has use_meanflow=True "
                              f"(HunyuanImage-2.1-Distilled): {_T2I} calls it with timestep_r = the next step's t (the "
                              f"mean velocity to the next step), which the flow-matching loss does not train; train "
                              f"the base HunyuanImage 2.1")
        if getattr(cfg, "gradient_checkpointing", False):
            raise ConfigError(CHECKPOINTING_REFUSED)

    # --- text --------------------------------------------------------------------------------
    def encode_text(self, captions, device, max_sequence_length):
        if max_sequence_length is not None:
            raise ValueError(f"taca train: argument --max-sequence-length: {_T2I} pads every prompt to its own "
                             f"fixed lengths (Qwen2.5-VL {self._text_len}, ByT5 {self._text_len_2}; its __call__ takes "
                             f"no max_sequence_length); leave it out")
        captions = list(captions)
        if not captions or not all(isinstance(c, str) for c in captions):
            raise ValueError(f"taca train: HunyuanImage captions must be a non-empty list of strings, got {captions!r}")
        pipe = self.pipe
        check_text_parts(pipe, "HunyuanImage", ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
        with torch.no_grad():
            pe, mask, pe2, mask2 = pipe.encode_prompt(prompt=captions, device=device, batch_size=len(captions))
        return {"prompt_embeds": pe, _MASK: mask, "prompt_embeds_2": pe2, _MASK_2: mask2}

    def split_text(self, enc):
        """Each caption's valid Qwen2.5-VL and ByT5 tokens (the masks' counts; the padding dropped)."""
        first = split_by_mask({k: enc[k] for k in ("prompt_embeds", _MASK)}, _MASK, _SEQ)
        second = split_by_mask({k: enc[k] for k in ("prompt_embeds_2", _MASK_2)}, _MASK_2, _SEQ_2)
        return [{**a, **b} for a, b in zip(first, second)]

    def collate(self, entries):
        """The pipeline's fixed padding: zeros after each caption's tokens up to 1000 (Qwen2.5-VL) and
        128 (ByT5), with the 0/1 masks (int64, as the tokenizers give them)."""
        a = pad_collate([{"prompt_embeds": e["prompt_embeds"]} for e in entries], _MASK, _SEQ, self._text_len)
        b = pad_collate([{"prompt_embeds_2": e["prompt_embeds_2"]} for e in entries], _MASK_2, _SEQ_2,
                        self._text_len_2)
        return {"prompt_embeds": a["prompt_embeds"], _MASK: a[_MASK].long(),
                "prompt_embeds_2": b["prompt_embeds_2"], _MASK_2: b[_MASK_2].long()}

    # --- images ------------------------------------------------------------------------------
    def encode_images(self, pixels):
        vae = self.vae()
        factor = int(getattr(self.pipe, "vae_scale_factor", vae.config.spatial_compression_ratio))
        ph, pw = self._patch[-2:]
        H, W = pixels.shape[-2:]
        check_image_size(pixels, (factor * ph, factor * pw), "HunyuanImage",
                         f"the VAE's {factor}x compression and the transformer's {ph}x{pw} patches")
        if vae.config.get("scaling_factor") is None:
            raise ValueError(f"taca train: the HunyuanImage VAE config has no scaling_factor, which {_T2I} divides its "
                             f"latents by before decoding (l. 858)")
        with torch.no_grad():
            lat = _vae_latents(vae, pixels, shift=False)  # mode * scaling_factor: the decode divides it back
        if tuple(lat.shape[-2:]) != (H // factor, W // factor):
            raise ValueError(f"taca train: the HunyuanImage VAE encodes {H}x{W} images to {tuple(lat.shape[-2:])} "
                             f"latents, where the pipeline's vae_scale_factor {factor} makes "
                             f"{H // factor}x{W // factor} (its spatial_compression_ratio is not what its blocks "
                             f"downsample by)")
        return lat

    # --- forward -----------------------------------------------------------------------------
    def predict(self, transformer, noisy, sigma, cond, guidance):
        if not _kw_checkpointing_ok(transformer):
            from ..config import ConfigError

            raise ConfigError(CHECKPOINTING_REFUSED)
        check_tokens_and_text(noisy, cond["prompt_embeds"], "HunyuanImage")
        B, _, h, w = noisy.shape
        ph, pw = self._patch[-2:]
        if h % ph or w % pw:
            raise ValueError(f"taca train: HunyuanImage latents of {h}x{w} do not tile the transformer's {ph}x{pw} "
                             f"patches")
        dev, dt = noisy.device, noisy.dtype
        # the scheduler's t = 1000 sigma (float32), handed over in the weights' dtype as the pipeline does
        t = (sigma.to(device=dev, dtype=torch.float32) * _T_SCALE).to(dt)
        g = torch.tensor([float(guidance)] * B, dtype=dt, device=dev) * 1000.0 if self._guidance else None
        out = transformer(hidden_states=noisy, timestep=t, timestep_r=None, guidance=g,
                          encoder_hidden_states=cond["prompt_embeds"].to(device=dev, dtype=dt),
                          encoder_attention_mask=cond[_MASK].to(dev),
                          encoder_hidden_states_2=cond["prompt_embeds_2"].to(device=dev, dtype=dt),
                          encoder_attention_mask_2=cond[_MASK_2].to(dev), return_dict=False)[0]
        return out  # the velocity noise - x0, as the scheduler steps with it

    def lora_saver(self):
        return saver_or_flux(_T2I)  # FluxPipeline in diffusers 0.42.1: the pipeline has no LoRA loader
