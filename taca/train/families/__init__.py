"""What training needs to know about each model family, and nothing else.

A family turns captions into cached conditioning tensors, images into cached latents, and runs
one transformer forward on noisy latents at given sigmas, with the model's own conventions (the
same ones diffusers' ``train_dreambooth_lora_flux.py`` / ``train_dreambooth_lora_sd3.py`` use):

- FLUX.1 (``FluxTransformer2DModel``): latents ``(vae(x) - shift) * scale`` packed 2x2 into
  tokens, ``timestep = sigma`` (in [0, 1]), the guidance embedding at ``--guidance`` for guidance-
  distilled models, ``txt_ids`` zeros, ``img_ids`` from the latent grid. The scheduler uses dynamic
  shifting, so training sigmas are not shifted.
- SD3 / SD3.5 (``SD3Transformer2DModel``): ``timestep = 1000 sigma``; sigmas are shifted with the
  scheduler's static shift (3.0), as diffusers' SD3 script does by indexing the shifted schedule.
- The other families (Qwen-Image, FLUX.2, Chroma, Z-Image, HiDream, Lumina2, ...) live in this package's
  modules, one per family, each following diffusers' own LoRA script for the model where there is
  one (``train_dreambooth_lora_<model>.py``); they are imported when a pipeline of theirs is trained.
- Reference images (edits): a family whose pipelines condition on images appended after the image
  tokens (FLUX.1 Kontext, FLUX.2) says how many per sample its pipeline takes (``references_for``);
  their latents (``encode_images``, cached like the targets') reach ``predict`` as
  ``cond["reference_latents"]`` (B, R, C, h, w), and the loss covers the target's tokens only.
- Any pipeline that implements the three methods ``encode_text(captions) -> dict``,
  ``encode_images(pixels) -> latents`` and ``predict(noisy, sigma, cond) -> output`` (the
  miniature, ``taca.mini``) is trained through them.

Every family's ``predict`` calls the transformer's forward with ``timestep`` and
``encoder_hidden_states``, so ``taca.enable``'s pre-hook sees each sample's sigma and gives it its
own gamma.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

# diffusers' own default target lists (train_dreambooth_lora_flux.py / _sd3.py): the joint
# attention projections, optionally the feed-forwards of the double-stream blocks. The "attn."
# prefix keeps SD3.5-Medium's image-only attn2 out, as diffusers' SD3 script does.
_ATTN = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
         "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
_FF = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
PROTOCOL = ("encode_text", "encode_images", "predict")


class Family:
    name = "base"
    load_hint = None  # how to load the saved adapter, where the usual ways do not work (taca train's last line)

    def __init__(self, pipe):
        self.pipe = pipe
        self.pipeline_class = type(pipe).__name__

    # --- reference images -------------------------------------------------------------------
    @classmethod
    def references_for(cls, pipeline_class: str) -> int:
        """How many reference images per sample a pipeline of this class conditions on in training
        (0: text to image only)."""
        return 0

    @classmethod
    def references_needed(cls, pipeline_class: str) -> int:
        """How many a pipeline of this class needs (an edit pipeline whose prompt template expects an
        image: 1)."""
        return 0

    def max_references(self) -> int:
        return self.references_for(self.pipeline_class)

    @classmethod
    def check_config(cls, cfg, pipeline_class: str) -> None:
        """Raise ConfigError (naming the argument) for a training option a ``pipeline_class`` pipeline
        cannot train with. Called before any weights load where the class is known (a local folder's
        model_index.json, a known hub id), and again before ``--out`` is touched."""

    def reference_resolution(self, resolution: int) -> int:
        """The square side references are loaded at by default: what the pipeline feeds its model at
        inference for a square input (``resolution``: the training images')."""
        return resolution

    def text_references(self) -> bool:
        """True when the text embedding depends on the references (``encode_text`` then takes
        ``references``: per caption, its reference images as RGB PIL images at the reference size)."""
        return False

    # --- what is trained -----------------------------------------------------------------
    # the module names "attn" / "attn+ff" stand for (PEFT matches a name or a dotted suffix);
    # families set their own, as class attributes or per model in __init__
    attn_targets: Sequence[str] = tuple(_ATTN)
    ff_targets: Sequence[str] = tuple(_FF)

    def target_modules(self, spec) -> List[str]:
        """``--lora-targets``: "attn" (the joint-attention projections), "attn+ff" (plus the
        blocks' feed-forwards) or a list of module names, passed through."""
        if spec == "attn":
            return list(self.attn_targets)
        if spec == "attn+ff":
            return list(self.attn_targets) + list(self.ff_targets)
        return list(spec)

    def shift(self) -> float:
        """Static shift applied to sampled sigmas (1: none)."""
        return 1.0

    # --- caching (run once, before training) ----------------------------------------------
    def encode_text(self, captions: List[str], device, max_sequence_length: Optional[int]) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W) in [-1, 1] -> latents (B, C, h, w)."""
        raise NotImplementedError

    def split_text(self, enc: Dict[str, torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
        """A batch from ``encode_text`` -> one dict per caption, as cached. The default takes row j
        of every tensor; families whose encoders pad to the batch's longest prompt trim each caption
        to its own tokens here, so a caption's cache entry never depends on the batch it came in."""
        n = len(next(iter(enc.values())))
        return [{k: v[j] for k, v in enc.items()} for j in range(n)]

    def collate(self, entries: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """Cached per-caption dicts -> the batch ``predict`` takes (the inverse of split_text)."""
        return {k: torch.stack([e[k] for e in entries]) for k in entries[0]}

    def text_modules(self) -> List[torch.nn.Module]:
        return []

    def image_modules(self) -> List[torch.nn.Module]:
        return []

    def release_encoders(self) -> None:
        """Drop the text encoders and the VAE once everything is cached."""

    # --- training forward ---------------------------------------------------------------
    def predict(self, transformer, noisy: torch.Tensor, sigma: torch.Tensor, cond: Dict[str, torch.Tensor],
                guidance: float) -> torch.Tensor:
        """noisy: latents like ``encode_images``' (B, C, h, w); sigma (B,) float32 -> the velocity
        ``noise - x0`` as the model predicts it, shaped like noisy (families whose models predict
        ``x0 - noise``, as Z-Image and Lumina2 do, negate it here)."""
        raise NotImplementedError

    def lora_saver(self):
        """The class whose ``save_lora_weights`` writes the adapter (a diffusers pipeline class)."""
        raise NotImplementedError


def static_shift(scheduler) -> float:
    """The static shift a diffusers scheduler applies to its sigmas: 1 with dynamic (resolution-
    dependent) shifting, where diffusers' scripts do not shift the sampled sigmas; ``flow_shift``
    for UniPC / DPM-Solver with flow sigmas; ``shift`` otherwise (FlowMatchEulerDiscreteScheduler)."""
    cfg = getattr(scheduler, "config", None) or {}
    if cfg.get("use_dynamic_shifting", False):
        return 1.0
    if cfg.get("use_flow_sigmas", False):
        return float(cfg.get("flow_shift", 1.0) or 1.0)
    return float(cfg.get("shift", 1.0) or 1.0)


def layer_names(transformer, block: str, parts: Sequence[str]) -> List[str]:
    """Full module names ``<block>.<i>.<part>`` of the transformer's Linear layers: names PEFT
    matches exactly, so a refiner's ``noise_refiner.0.attention.to_q`` is not among them."""
    import re

    pat = re.compile(rf"{re.escape(block)}\.\d+\.(?:{'|'.join(re.escape(p) for p in parts)})")
    return [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and pat.fullmatch(n)]


def call_default(pipe, name: str, fallback):
    """The default of argument ``name`` of the pipeline's ``__call__`` (what generating uses), or
    ``fallback`` when it has none."""
    import inspect

    p = inspect.signature(type(pipe).__call__).parameters.get(name)
    return p.default if p is not None and p.default is not inspect.Parameter.empty and p.default is not None \
        else fallback


def split_by_mask(enc: Dict[str, torch.Tensor], mask: str, seq: Sequence[str]) -> List[Dict[str, torch.Tensor]]:
    """Per-caption entries of a batch whose prompts were padded after their tokens: the tensors
    named in ``seq`` ((B, L, ...), the sequence on dim 1) cut to each row's number of True / 1
    entries in ``enc[mask]`` ((B, L)); the mask itself is dropped (``pad_collate`` rebuilds it);
    the other tensors taken row by row."""
    m = enc[mask]
    if m.dim() != 2:
        raise ValueError(f"taca train: the text mask {mask!r} must be (B, L), got {tuple(m.shape)}")
    lengths = m.bool().sum(1).tolist()
    for j, n in enumerate(lengths):
        if not bool(m[j, :n].bool().all()):
            raise ValueError(f"taca train: the text mask {mask!r} of caption {j} is not a prefix of valid tokens")
    return [{k: (v[j, :n] if k in seq else v[j]) for k, v in enc.items() if k != mask}
            for j, n in enumerate(lengths)]


def pad_collate(entries: Sequence[Dict[str, torch.Tensor]], mask: str, seq: Sequence[str],
                length: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """The inverse of ``split_by_mask``: the ``seq`` tensors zero-padded after their tokens to the
    batch's longest caption (or to ``length``), with ``mask`` a (B, L) bool tensor (True = a token);
    the other tensors stacked."""
    n = [int(e[seq[0]].shape[0]) for e in entries]
    L = max(n) if length is None else int(length)
    if L < max(n):
        raise ValueError(f"taca train: a cached caption has {max(n)} tokens, more than the {L} padded to")
    out: Dict[str, torch.Tensor] = {}
    for k in entries[0]:
        if k in seq:
            first = entries[0][k]
            pad = first.new_zeros((len(entries), L) + tuple(first.shape[1:]))
            for j, e in enumerate(entries):
                pad[j, :n[j]] = e[k]
            out[k] = pad
        else:
            out[k] = torch.stack([e[k] for e in entries])
    out[mask] = torch.arange(L)[None, :] < torch.tensor(n)[:, None]
    return out


def fixed_text_length(n, pipe, default: int, limit: int, label: str) -> int:
    """``--max-sequence-length`` for a pipeline that pads every prompt to a fixed length: None -> the
    pipeline's ``__call__`` default (else ``default``); a ConfigError naming the argument for a
    non-positive length or one above ``limit`` (what the pipeline's check_inputs refuses)."""
    from ..config import ConfigError

    if n is None:
        n = call_default(pipe, "max_sequence_length", default)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"taca train: argument --max-sequence-length: must be a positive integer, got {n!r}")
    if n > limit:
        raise ConfigError(f"taca train: argument --max-sequence-length: {label} pipelines take at most {limit} text "
                          f"tokens ({type(pipe).__name__}.check_inputs refuses more), got {n}")
    return n


def check_text_parts(pipe, label: str, parts=("text_encoder", "tokenizer")) -> None:
    """ValueError unless the pipeline has the parts that encode the captions."""
    missing = [a for a in parts if getattr(pipe, a, None) is None]
    if missing:
        raise ValueError(f"taca train: the {label} pipeline has no {' / '.join(missing)} to encode the captions with")


def check_image_size(pixels: torch.Tensor, multiple, label: str, why: str) -> None:
    """``--resolution`` refusal (ValueError) of images (..., H, W) whose height or width is not a multiple of
    ``multiple`` (an int, or (for H, for W)); ``why`` says what sets it (the VAE's factor, the patches)."""
    mh, mw = (multiple, multiple) if isinstance(multiple, int) else multiple
    H, W = pixels.shape[-2:]
    if H % mh or W % mw:
        m = mh if mh == mw else f"{mh} x {mw}"
        raise ValueError(f"taca train: argument --resolution: {label} images must have height and width divisible "
                         f"by {m} ({why}), got {H}x{W}")


def check_tokens_and_text(noisy: torch.Tensor, pe: torch.Tensor, label: str) -> None:
    """ValueError unless noisy is (B, C, h, w) and the prompt embeddings (B, L, D) for its batch."""
    if noisy.dim() != 4:
        raise ValueError(f"taca train: {label} latents must be (B, C, h, w), got {tuple(noisy.shape)}")
    if pe.dim() != 3 or pe.shape[0] != noisy.shape[0]:
        raise ValueError(f"taca train: {label} prompt_embeds must be (B, L, D) for the latents' batch of "
                         f"{noisy.shape[0]}, got {tuple(pe.shape)}")


def saver_or_flux(pipeline_name: str):
    """The diffusers pipeline class that writes the adapter: ``pipeline_name``'s where it has
    ``save_lora_weights``, else FluxPipeline (the same "transformer."-prefixed file, which the
    transformer's ``load_lora_adapter(prefix="transformer")`` and ``taca.enable(lora=)`` read)."""
    import diffusers

    cls = getattr(diffusers, pipeline_name)
    return cls if hasattr(cls, "save_lora_weights") else diffusers.FluxPipeline


def check_flow_scheduler(sch, label: str, pipeline: str, not_flow: Optional[str] = None, no_mu: bool = False,
                         t1000: bool = True) -> None:
    """ValueError for a scheduler a family cannot train with (None: nothing to check).

    not_flow: the message when ``sch`` is not a ``FlowMatchEulerDiscreteScheduler`` (None: any class);
    no_mu: the pipeline passes no ``mu`` to ``set_timesteps``, so dynamic shifting cannot generate;
    t1000: the transformer gets the scheduler's ``t = num_train_timesteps sigma``, which TACA reads as
    t / 1000, so another ``num_train_timesteps`` is refused. ``invert_sigmas`` (t = 1000 (1 - sigma))
    is always refused."""
    if sch is None:
        return
    if not_flow is not None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        if not isinstance(sch, FlowMatchEulerDiscreteScheduler):
            raise ValueError(not_flow)
    cfg = dict(getattr(sch, "config", None) or {})
    if no_mu and cfg.get("use_dynamic_shifting", False):
        raise ValueError(f"taca train: the {label} scheduler has use_dynamic_shifting=True, but {pipeline} passes no "
                         f"mu to set_timesteps (it cannot generate with it); use the model's own static-shift "
                         f"scheduler")
    if cfg.get("invert_sigmas", False):
        raise ValueError(f"taca train: the {label} scheduler has invert_sigmas=True (t = 1000 (1 - sigma)); not "
                         f"supported")
    n_train = int(cfg.get("num_train_timesteps", 1000) or 1000)
    if t1000 and n_train != 1000:
        raise ValueError(f"taca train: the {label} scheduler has num_train_timesteps={n_train}: the transformer would "
                         f"get t = {n_train} sigma, and TACA reads sigma as t / 1000; not supported")


def vae_mode(vae, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE posterior's mean for ``pixels`` (its own dtype and device): cached once, so sampling
    it per step would need the variance cached too (for FLUX's and SD3's VAEs the posterior std is
    ~1e-2 of the latents' spread)."""
    return vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()


def qwen_vae_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """``AutoencoderKLQwenImage`` latents as the Qwen-Image-style pipelines' decode path inverts them:
    pixels (B, 3, H, W) as one frame -> the posterior mode (B, C, 1, h, w) normalized per channel,
    ``(z - latents_mean) * (1 / latents_std)``."""
    c = vae.config
    with torch.no_grad():
        z = vae_mode(vae, pixels.unsqueeze(2))
        mean = torch.tensor(c.latents_mean, device=z.device, dtype=z.dtype).view(1, c.z_dim, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(c.latents_std, device=z.device, dtype=z.dtype).view(1, c.z_dim, 1, 1, 1)
        return (z - mean) * inv_std


def _vae_latents(vae, pixels: torch.Tensor, shift: bool = True) -> torch.Tensor:
    """``(mode - shift_factor) * scaling_factor`` (FLUX.1, SD3); ``shift=False``: ``mode * scaling_factor``
    (pipelines that decode ``latents / scaling_factor`` and add no shift back: AuraFlow, CogView4)."""
    lat = vae_mode(vae, pixels)
    sf = (getattr(vae.config, "shift_factor", None) or 0.0) if shift else 0.0
    return (lat - sf) * vae.config.scaling_factor


class _MaskedTextFamily:
    """A mixin for families whose pipeline pads prompts to the batch's longest with a mask: each
    caption cached at its own tokens (``split_by_mask``), re-padded per batch (``pad_collate``)."""

    text_mask: str = "prompt_embeds_mask"
    text_seq: Sequence[str] = ("prompt_embeds",)

    def split_text(self, enc):
        return split_by_mask(enc, self.text_mask, self.text_seq)

    def collate(self, entries):
        return pad_collate(entries, self.text_mask, self.text_seq)


def one_frame(noisy: torch.Tensor, label: str):
    """Image latents of a video VAE, (B, C, 1, h, w) (or already (B, C, h, w)) -> ((B, C, h, w),
    whether the input had the frame axis)."""
    if noisy.dim() == 5:
        if noisy.shape[2] != 1:
            raise ValueError(f"taca train: {label} image latents have one frame, got {tuple(noisy.shape)}")
        return noisy[:, :, 0], True
    if noisy.dim() == 4:
        return noisy, False
    raise ValueError(f"taca train: {label} latents must be (B, C, 1, h, w), got {tuple(noisy.shape)}")


class _DiffusersFamily(Family):
    """A diffusers pipeline's family: training sigmas shifted by the scheduler's static shift."""

    _text_attrs: Sequence[str] = ()

    def __init__(self, pipe):
        super().__init__(pipe)
        self._shift = static_shift(getattr(pipe, "scheduler", None))

    def shift(self):
        return self._shift

    def text_modules(self):
        return [getattr(self.pipe, a) for a in self._text_attrs if getattr(self.pipe, a, None) is not None]

    def image_modules(self):
        return [self.pipe.vae] if getattr(self.pipe, "vae", None) is not None else []

    def vae(self):
        """The pipeline's VAE (ValueError when it has none)."""
        vae = getattr(self.pipe, "vae", None)
        if vae is None:
            raise ValueError("taca train: the pipeline has no VAE to encode the training images")
        return vae

    def encode_images(self, pixels):
        with torch.no_grad():
            return _vae_latents(self.vae(), pixels)

    def release_encoders(self):
        self.pipe = None


def flux_tokens(noisy: torch.Tensor, text_len: int, label: str = "FLUX"):
    """FLUX.1-style inputs (FLUX.1, Chroma): latents (B, C, h, w) -> (tokens (B, h/2 * w/2, 4 C)
    packed 2x2 by the pipeline's ``_pack_latents``, img_ids from the latent grid, txt_ids zeros)."""
    from diffusers import FluxPipeline

    B, C, h, w = noisy.shape
    if h % 2 or w % 2:
        raise ValueError(f"taca train: {label} latents must have even height and width, got {h}x{w}")
    packed = FluxPipeline._pack_latents(noisy, B, C, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(B, h // 2, w // 2, noisy.device, noisy.dtype)
    txt_ids = torch.zeros(text_len, 3, device=noisy.device, dtype=noisy.dtype)
    return packed, img_ids, txt_ids


def flux_latents(out: torch.Tensor, shape) -> torch.Tensor:
    """(B, h/2 * w/2, 4 C) tokens back to latents of ``shape`` (B, C, h, w): the inverse of
    ``_pack_latents``."""
    B, C, h, w = shape
    return out.view(B, h // 2, w // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, h, w)


def flux_reference_tokens(refs: torch.Tensor, label: str = "FLUX Kontext"):
    """A Kontext reference's latents (B, 1, C, h, w) -> (tokens (B, h/2 * w/2, 4 C), ids whose
    first coordinate is 1), as ``FluxKontextPipeline.prepare_latents`` builds them."""
    from diffusers import FluxPipeline

    if refs.dim() != 5 or refs.shape[1] != 1:
        raise ValueError(f"taca train: {label} takes one reference latent per sample, (B, 1, C, h, w); got "
                         f"{tuple(refs.shape)}")
    ref = refs[:, 0]
    B, C, h, w = ref.shape
    if h % 2 or w % 2:
        raise ValueError(f"taca train: {label} reference latents must have even height and width, got {h}x{w}")
    ids = FluxPipeline._prepare_latent_image_ids(B, h // 2, w // 2, ref.device, ref.dtype)
    ids[..., 0] = 1
    return FluxPipeline._pack_latents(ref, B, C, h, w), ids


class FluxFamily(_DiffusersFamily):
    """FLUX.1 and FLUX.1 Kontext. Kontext edits (``FluxKontextPipeline``): the reference image's
    latents, packed like the target's, follow the image tokens with ids (1, i, j), the guidance
    embedding as for FLUX.1-dev, and the output is cut to the target's tokens, as the pipeline does;
    without references a Kontext pipeline trains text to image (which it also generates)."""

    name = "flux"
    _text_attrs = ("text_encoder", "text_encoder_2")

    @classmethod
    def references_for(cls, pipeline_class):
        return 1 if "Kontext" in pipeline_class else 0

    def reference_resolution(self, resolution):
        # FluxKontextPipeline resizes its input to the preferred Kontext resolution of the nearest
        # aspect ratio (_auto_resize): 1024 x 1024 for a square, whatever the output size
        return 1024 if self.max_references() else resolution

    def shift(self):
        return 1.0

    def encode_text(self, captions, device, max_sequence_length):
        kw = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        with torch.no_grad():
            pe, pooled, _ = self.pipe.encode_prompt(prompt=list(captions), prompt_2=None, device=device, **kw)
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}

    def predict(self, transformer, noisy, sigma, cond, guidance):
        B = noisy.shape[0]
        pe = cond["prompt_embeds"]
        packed, img_ids, txt_ids = flux_tokens(noisy, pe.shape[1])
        config = getattr(transformer, "config", None) or _unwrap(transformer).config
        g = torch.full((B,), float(guidance), device=noisy.device, dtype=torch.float32) \
            if config.guidance_embeds else None
        n = packed.shape[1]
        refs = cond.get("reference_latents")
        if refs is not None:
            ref_tokens, ref_ids = flux_reference_tokens(refs.to(packed.dtype))
            packed, img_ids = torch.cat([packed, ref_tokens], 1), torch.cat([img_ids, ref_ids], 0)
        out = transformer(hidden_states=packed, timestep=sigma, guidance=g,
                          pooled_projections=cond["pooled_prompt_embeds"], encoder_hidden_states=pe,
                          txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return flux_latents(out[:, :n], noisy.shape)

    def lora_saver(self):
        from diffusers import FluxPipeline

        return FluxPipeline


class SD3Family(_DiffusersFamily):
    name = "sd3"
    _text_attrs = ("text_encoder", "text_encoder_2", "text_encoder_3")

    def encode_text(self, captions, device, max_sequence_length):
        kw = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        with torch.no_grad():
            pe, _, pooled, _ = self.pipe.encode_prompt(prompt=list(captions), prompt_2=None, prompt_3=None,
                                                       device=device, do_classifier_free_guidance=False, **kw)
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}

    def predict(self, transformer, noisy, sigma, cond, guidance):
        return transformer(hidden_states=noisy, timestep=sigma * 1000.0, encoder_hidden_states=cond["prompt_embeds"],
                           pooled_projections=cond["pooled_prompt_embeds"], return_dict=False)[0]

    def lora_saver(self):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline


class ProtocolFamily(Family):
    """A pipeline that brings its own ``encode_text`` / ``encode_images`` / ``predict``."""

    name = "protocol"

    def target_modules(self, spec):
        own = getattr(self.pipe, "lora_target_modules", None)
        if isinstance(spec, str) and callable(own):
            return list(own(spec))
        return super().target_modules(spec)

    def text_modules(self):
        return [m for m in (getattr(self.pipe, "text_encoder", None),) if isinstance(m, torch.nn.Module)]

    def encode_text(self, captions, device, max_sequence_length):
        with torch.no_grad():
            return dict(self.pipe.encode_text(list(captions)))

    def encode_images(self, pixels):
        with torch.no_grad():
            return self.pipe.encode_images(pixels)

    def predict(self, transformer, noisy, sigma, cond, guidance):
        # the pipeline calls self.transformer: let it call the (possibly DDP-wrapped) one we train
        pipe = self.pipe
        inner = pipe.transformer
        object.__setattr__(pipe, "transformer", transformer)
        try:
            return pipe.predict(noisy, sigma, cond)
        finally:
            object.__setattr__(pipe, "transformer", inner)

    def lora_saver(self):
        saver = getattr(type(self.pipe), "save_lora_weights", None)
        if saver is not None:
            return type(self.pipe)
        from diffusers import FluxPipeline, SD3Transformer2DModel, StableDiffusion3Pipeline

        return StableDiffusion3Pipeline if isinstance(self.pipe.transformer, SD3Transformer2DModel) else FluxPipeline


def _unwrap(m):
    while hasattr(m, "module"):
        m = m.module
    return getattr(m, "_orig_mod", m)


# training families by the name of the model's adapter (taca.models): a class, or the module of
# this package that defines it (imported when needed)
_FAMILIES = {"flux": FluxFamily, "sd3": SD3Family, "qwenimage": "qwenimage:QwenImageFamily",
             "flux2": "flux2:Flux2Family", "chroma": "chroma:ChromaFamily", "zimage": "zimage:ZImageFamily",
             "hidream": "hidream:HiDreamFamily", "lumina2": "lumina2:Lumina2Family", "krea2": "krea2:Krea2Family",
             "ideogram4": "ideogram4:Ideogram4Family", "qwenimage21": "qwenimage21:QwenImage21Family",
             "auraflow": "auraflow:AuraFlowFamily", "cogview4": "cogview4:CogView4Family",
             "longcat": "longcat:LongCatImageFamily",
             "ernie_image": "ernie_image:ErnieImageFamily", "ovis": "ovis:OvisImageFamily",
             "bria": "bria:BriaFamily", "bria_fibo": "bria_fibo:BriaFiboFamily",
             "prx": "prx:PRXFamily",
             "nucleusmoe": "nucleusmoe:NucleusMoEImageFamily",
             "hunyuanimage": "hunyuanimage:HunyuanImageFamily"}


# what the reference-image error lists: the pipelines trained with reference images
REFERENCE_PIPELINES = ("FluxKontextPipeline (1 each), Flux2Pipeline / Flux2KleinPipeline (any number), "
                       "QwenImageEditPipeline (1), QwenImageEditPlusPipeline (any number), "
                       "LongCatImageEditPipeline (1)")


def check_references(family_cls, pipeline_class: str, n: int) -> None:
    """Raise ConfigError naming ``--data`` when the data's ``n`` reference images per sample are
    more than a ``pipeline_class`` pipeline of ``family_cls`` takes."""
    from ..config import ConfigError

    need = family_cls.references_needed(pipeline_class)
    if n < need:
        raise ConfigError(f"taca train: argument --data: {pipeline_class} trains edits: every sample needs "
                          f"{need} reference image{'s' * (need > 1)} or more (\"reference\" / \"references\" in the "
                          f".jsonl), the data gives {n}")
    limit = family_cls.references_for(pipeline_class)
    if n <= limit:
        return
    takes = "no reference images" if limit == 0 else f"at most {limit} reference image{'s' * (limit > 1)}"
    raise ConfigError(f"taca train: argument --data: {pipeline_class} takes {takes}, and the data gives {n} per "
                      f"sample; reference images train these pipelines: {REFERENCE_PIPELINES}")


def family_class(adapter_name: str):
    """The training family class of an adapter name (taca.models), or None."""
    family = _FAMILIES.get(adapter_name)
    if isinstance(family, str):
        import importlib

        mod, cls = family.split(":")
        family = getattr(importlib.import_module(f"{__name__}.{mod}"), cls)
    return family


def supported() -> List[str]:
    """The adapter names (taca.models) of the families taca train knows."""
    return sorted(_FAMILIES)


def family_for(pipe) -> Family:
    """The training family of a loaded pipeline."""
    if all(callable(getattr(pipe, n, None)) for n in PROTOCOL):
        return ProtocolFamily(pipe)
    from ...models import adapter_class

    t = getattr(pipe, "transformer", None)
    adapter = adapter_class(t) if isinstance(t, torch.nn.Module) else None
    family = family_class(adapter.name) if adapter is not None else None
    if family is not None:
        return family(pipe)
    raise TypeError(f"taca train: {type(pipe).__name__} is not supported: the families are {', '.join(supported())} "
                    f"(taca.models' adapter names), or a pipeline with encode_text / encode_images / predict")
