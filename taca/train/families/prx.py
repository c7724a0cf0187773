"""PRX (``PRXTransformer2DModel``, ``PRXPipeline``) for ``taca train``.

diffusers has no LoRA script for PRX; the conventions are the ones ``PRXPipeline`` (diffusers
0.42.1, ``pipelines/prx/pipeline_prx.py``; lines below are that file's) applies at inference:

- latents: the pipeline decodes ``vae.decode(latents / scaling_factor + shift_factor)`` with
  ``scaling_factor = getattr(vae.config, "scaling_factor", 0.18215)`` and ``shift_factor =
  getattr(vae.config, "shift_factor", 0.0)`` (l. 816-821), so the training latents are
  ``(z - shift_factor) * scaling_factor`` with the same lookups: a FLUX VAE (``AutoencoderKL``:
  shift 0.1159, scale 0.3611) or a DC-AE (``AutoencoderDC``: no ``shift_factor`` in its config,
  0; deterministic, its ``.latent``); for an ``AutoencoderKL`` the posterior mode is cached
  (``vae_mode``). A VAE whose config holds ``shift_factor: None`` (SD-style) is refused: the
  pipeline's decode would add None. The latents are (B, C, h, w) at the VAE's grid, unpatched:
  ``prepare_latents`` draws them (B, C, H / f, W / f) with f the pipeline's ``vae_scale_factor``
  (l. 322-329, 352-374) and the transformer patchifies them itself (``img2seq``, its own image
  ids, no ids from the pipeline). Image sizes must be multiples of ``f * patch_size`` (the
  pipeline's ``check_inputs``, l. 531-537); others are refused naming ``--resolution``.
- timestep: ``t.float() / num_train_timesteps`` (``t_cont``, l. 776-783), where the scheduler's
  ``timesteps`` are its float32 sigmas times ``num_train_timesteps`` (``set_timesteps``): sigma,
  rounded through N sigma (at most an ulp from it). ``predict`` passes ``(sigma * N) / N`` in
  float32, one per sample (the pipeline's shape-(1,) tensor broadcasts over its batch, its CFG
  batch repeats it), whatever the weights' dtype: at a scheduler sigma, the pipeline's own
  timestep bit for bit. The transformer multiplies by its ``time_factor`` (1000) inside
  (transformer_prx.py, ``_compute_timestep_embedding``); TACA's adapter reads the timestep as
  sigma (its "sigma" convention), as at inference.
- output: the velocity ``noise - x0`` as it is: ``FlowMatchEulerDiscreteScheduler.step`` (l. 800)
  adds ``(sigma_next - sigma) * noise_pred``, so no negation.
- sigmas: the pipeline calls ``set_timesteps(num_inference_steps)`` with no ``mu`` (l. 726-733),
  so the scheduler's static ``shift`` is applied to its sigmas, and training sigmas are shifted
  the same (``static_shift``). A scheduler with ``use_dynamic_shifting`` is refused (the pipeline
  cannot generate with it: ``set_timesteps`` needs ``mu``), as are ``invert_sigmas`` and schedulers
  other than ``FlowMatchEulerDiscreteScheduler`` (the class the pipeline is written for).
- text: ``_tokenize_prompts`` (l. 437-456) cleans every prompt (``__call__``'s default
  ``skip_text_cleaning=False``: DeepFloyd's ``clean_text``, which lower-cases and strips URLs,
  punctuation runs, ...; both cleanings need ``ftfy``), then pads (and truncates) it to the FIXED
  length ``tokenizer_max_length or tokenizer.model_max_length`` (``padding="max_length"``) with
  the tokenizer's 0/1 mask; ``_encode_prompt_standard`` (l. 458-498) takes the T5Gemma encoder's
  ``last_hidden_state`` under that mask, and the transformer gets the embeddings AND the bool mask
  (``attention_mask``, l. 786-792; the processors drop the masked text keys). Every caption is
  padded to the same length whatever its batch, so its cache entry is the pipeline's own
  (L, D) embedding with its (L,) bool mask (``prompt_attention_mask``), each row depending on
  its own tokens only, and the default row split / stack is exact; the padded rows are kept as the
  pipeline computes them (they are masked out of every softmax), whatever side the tokenizer
  pads (each entry holds L x D values, D = 2304 for T5Gemma-2B, whatever the caption's length).
  ``--max-sequence-length`` is the pipeline's ``tokenizer_max_length`` (its ``__call__`` has
  no ``max_sequence_length``); None means its default, the tokenizer's ``model_max_length``
  (refused, naming the argument, where the tokenizer has none). Past the caption's tokens the
  length changes only the cache's size (the padding is masked; the prediction is the same to
  rounding); shorter, it truncates the caption, as the pipeline does.
- guidance: true CFG at inference (``guidance_scale`` 4, the batch [negative "", prompt],
  l. 761-768 and 795-797); training fits the conditional prediction, as diffusers' LoRA scripts
  do; ``--guidance`` is not used (the model has no guidance embedding). (diffusers 0.42.1's CFG
  batch of 2B samples gets ``t_cont.repeat(2)``, two timesteps, l. 779: with CFG the pipeline
  fails for more than one prompt or ``num_images_per_prompt`` > 1.)
- resolution: ``use_resolution_binning`` (on by default) generates at the aspect-ratio bin of the
  pipeline's ``default_sample_size`` (l. 666-677), e.g. 512 x 512 for any square request of a
  512 model, then resizes: train at ``--resolution`` = ``default_sample_size``.

LoRA targets: a PRX block's attention takes queries from the image tokens only and keys / values
from [text, image]; "attn" is every block's ``attention.img_qkv_proj`` (the fused image q / k /
v), ``attention.txt_kv_proj`` (the text k / v: gamma scales the text keys, so the text side is
trained too) and ``attention.to_out.0``; "attn+ff" adds the block's gated MLP ``gate_proj`` /
``up_proj`` / ``down_proj``. Full module names (``blocks.<i>.…``), so nothing outside the blocks
is hit.

Gradient checkpointing: ``PRXTransformer2DModel`` supports it and forwards no attention kwargs
to its processors; ``taca.models.prx`` hands them each call's state (also in the blocks the
backward recomputes): nothing to fix here.

LoRA support: ``PRXTransformer2DModel`` has no ``PeftAdapterMixin`` in diffusers 0.42.1 (no
``add_adapter``, which the training loop calls, nor ``load_lora_adapter``), unlike every other
diffusers transformer taca train trains. The family gives the pipeline's transformer diffusers'
own mixin (:func:`lora_support`: the instance's class becomes a subclass of its class and
``PeftAdapterMixin``, of the same name, so ``taca.enable`` still picks the PRX adapter; nothing
else changes, and a transformer that already has the mixin is left alone; a pipeline handed to
``train`` keeps it). Call it on a pipeline or transformer before loading the adapter back.

Saving: ``PRXPipeline`` inherits diffusers' deprecated ``LoraLoaderMixin`` (l. 257-262), i.e.
``StableDiffusionLoraLoaderMixin``, whose ``save_lora_weights`` / ``load_lora_weights`` handle a
``unet`` and a text encoder, not a transformer (``load_lora_weights`` fails on a PRXPipeline, which
has no ``unet``). The adapter is written by ``FluxPipeline.save_lora_weights`` (keys
``transformer.<module>.lora_A/B.weight``, the PEFT config as metadata), which
``lora_support(pipe); pipe.transformer.load_lora_adapter(path, prefix="transformer")`` and
``lora_support(pipe); taca.enable(pipe.transformer, lora=path)`` read (``taca.enable(pipe,
lora=path)`` goes through the pipeline's ``load_lora_weights`` and fails); should a later
diffusers give the pipeline a ``save_lora_weights`` that takes ``transformer_lora_layers``, that
one is used.

Not trained: ``PRXPixelPipeline`` (``pipeline_prx_pixel.py``, the same ``PRXTransformer2DModel``
in pixel space, no VAE) is refused. Its transformer predicts the clean image x0, which the
pipeline turns into a velocity ``(x_t - x0) / max(t, 0.05)`` (l. 631-633), and its pixels are
noised from ``randn * noise_scale`` (2.0, ``prepare_latents``, l. 401): what it denoises is the image
with noise of scale 2, where taca train fits the velocity ``noise - x0`` with unit noise on what
the pipeline decodes. Pixels as latents would train it at half its noise (another schedule than it
samples), and pixels / 2 are not what it denoises; neither is faithful. Run it with ``taca.enable``.
"""
from __future__ import annotations

import torch

from . import _DiffusersFamily, _unwrap, call_default, check_flow_scheduler, check_image_size, layer_names

_ATTN = ("attention.img_qkv_proj", "attention.txt_kv_proj", "attention.to_out.0")
_FF = ("gate_proj", "up_proj", "down_proj")
_MASK = "prompt_attention_mask"
_SCALE_DEFAULT = 0.18215  # PRXPipeline's decode: getattr(vae.config, "scaling_factor", 0.18215) (l. 817)
_NO_LENGTH = 10**6  # a tokenizer model_max_length above this is transformers' "none set" (VERY_LARGE_INTEGER)
_ABSENT = object()


def _refuse_pixel(pipe) -> None:
    try:
        from diffusers import PRXPixelPipeline
    except ImportError:  # an older diffusers
        PRXPixelPipeline = ()
    if type(pipe).__name__ == "PRXPixelPipeline" or (PRXPixelPipeline and isinstance(pipe, PRXPixelPipeline)):
        raise ValueError(
            "taca train: PRXPixelPipeline is not trained: its transformer predicts the clean image x0 (the pipeline "
            "turns it into a velocity (x_t - x0) / max(t, 0.05)) and it denoises pixels noised from randn * "
            "noise_scale (2.0), while taca train fits the velocity noise - x0 with unit noise on what the pipeline "
            "decodes, so neither pixels nor pixels / noise_scale would train it as it samples; run it through "
            "taca.enable. taca train trains PRXPipeline (latent PRX, with its VAE)")


_PEFT_CLASSES: dict = {}


def lora_support(model):
    """Give a PRX transformer (or a pipeline's ``transformer``) diffusers' LoRA API, which
    ``PRXTransformer2DModel`` lacks in diffusers 0.42.1: its class becomes a subclass of its own
    class and diffusers' ``PeftAdapterMixin`` (same name; ``add_adapter``, ``load_lora_adapter``,
    ``delete_adapters``, ...). A transformer that has ``add_adapter`` already is left as it is.
    Returns the transformer."""
    t = getattr(model, "transformer", model)
    inner = _unwrap(t)
    if hasattr(inner, "add_adapter") and hasattr(inner, "load_lora_adapter"):
        return t
    from diffusers.loaders.peft import PeftAdapterMixin

    cls = type(inner)
    if cls not in _PEFT_CLASSES:
        _PEFT_CLASSES[cls] = type(cls.__name__, (cls, PeftAdapterMixin),
                                  {"__doc__": f"{cls.__name__} with diffusers' PeftAdapterMixin (taca train)"})
    inner.__class__ = _PEFT_CLASSES[cls]
    return t


class PRXFamily(_DiffusersFamily):
    name = "prx"
    _text_attrs = ("text_encoder",)
    load_hint = ("taca.train.families.prx.lora_support(pipe), then taca.enable(pipe, lora=...) or "
                 "pipe.transformer.load_lora_adapter(..., prefix='transformer'): PRXTransformer2DModel has no LoRA API "
                 "in this diffusers")

    @classmethod
    def check_config(cls, cfg, pipeline_class):
        """PRXPipeline cleans every prompt with ftfy: without it the captions cannot be encoded as the
        pipeline encodes them (refused before --out is touched, not at caching)."""
        from diffusers.pipelines.prx import pipeline_prx

        if pipeline_class == "PRXPipeline" and getattr(pipeline_prx, "ftfy", None) is None:
            from ..config import ConfigError

            raise ConfigError("taca train: argument --model: PRXPipeline cleans every prompt with ftfy, which is not "
                              "installed (pip install ftfy)")

    def __init__(self, pipe):
        _refuse_pixel(pipe)
        t = getattr(pipe, "transformer", None)
        tname = type(_unwrap(t)).__name__ if t is not None else None
        if tname is not None and tname != "PRXTransformer2DModel":
            raise ValueError(f"taca train: the PRX family trains PRXPipeline's PRXTransformer2DModel, got {tname}")
        super().__init__(pipe)
        self._n_train = 1000.0  # FlowMatchEulerDiscreteScheduler's default num_train_timesteps
        sch = getattr(pipe, "scheduler", None)
        # the pipeline divides the scheduler's t by num_train_timesteps: any value is read back as sigma
        check_flow_scheduler(sch, "PRX", "PRXPipeline", no_mu=True, t1000=False, not_flow=(
            f"taca train: this PRXPipeline has a {type(sch).__name__}; PRX is trained with the "
            f"FlowMatchEulerDiscreteScheduler its pipeline steps with (a flow-matching velocity)"))
        if sch is not None:
            self._n_train = float(sch.config.get("num_train_timesteps", 1000) or 1000)
        vae = getattr(pipe, "vae", _ABSENT)
        if vae is None:
            raise ValueError("taca train: this PRXPipeline has no VAE: it then denoises latents it cannot decode "
                             "(output_type='latent' only), and there is nothing to encode the training images with; "
                             "load the model's VAE (a pixel-space PRX is PRXPixelPipeline, which taca train does not "
                             "train)")
        self._patch = 1
        if t is not None:
            c = _unwrap(t).config
            self._patch = int(c.patch_size)
            if vae is not None and vae is not _ABSENT:
                n = getattr(vae.config, "latent_channels", None)
                if n is not None and int(n) != int(c.in_channels):
                    raise ValueError(f"taca train: the PRX VAE gives {n} latent channels, the transformer takes "
                                     f"{c.in_channels}")
            lora_support(t)  # the training loop adds the adapter with diffusers' add_adapter
            self.attn_targets = layer_names(_unwrap(t), "blocks", _ATTN)
            self.ff_targets = layer_names(_unwrap(t), "blocks", _FF)

    # --- text --------------------------------------------------------------------------------
    def max_sequence_length(self, n) -> int:
        """``--max-sequence-length`` as the pipeline's ``tokenizer_max_length``: None -> its default,
        the tokenizer's ``model_max_length``; a positive integer."""
        from ..config import ConfigError

        if n is None:
            n = call_default(self.pipe, "tokenizer_max_length", None)
        if n is None:
            tok = getattr(self.pipe, "tokenizer", None)
            n = getattr(tok, "model_max_length", None)
            if not isinstance(n, int) or n >= _NO_LENGTH:
                raise ConfigError(f"taca train: argument --max-sequence-length: the PRX tokenizer sets no "
                                  f"model_max_length (got {n!r}), which PRXPipeline pads every prompt to; give the "
                                  f"length you generate with (the pipeline's tokenizer_max_length)")
            return n
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"taca train: argument --max-sequence-length: must be a positive integer, got {n!r}")
        return n

    def encode_text(self, captions, device, max_sequence_length):
        pipe = self.pipe
        missing = [a for a in ("text_encoder", "tokenizer") if getattr(pipe, a, None) is None]
        if missing:
            raise ValueError(f"taca train: the PRX pipeline has no {' / '.join(missing)} to encode the captions with")
        n = self.max_sequence_length(max_sequence_length)
        captions = list(captions)
        if not captions or not all(isinstance(c, str) for c in captions):
            raise ValueError(f"taca train: PRX captions must be a non-empty list of strings, got {captions!r}")
        skip = call_default(pipe, "skip_text_cleaning", False)
        try:
            with torch.no_grad():
                pe, mask, _, _ = pipe.encode_prompt(captions, device=device, do_classifier_free_guidance=False,
                                                    tokenizer_max_length=n, skip_text_cleaning=skip)
        except NameError as e:  # pipeline_prx.py imports ftfy only if it is installed, and cleans with it
            if "ftfy" in str(e):
                raise ImportError("taca train: PRXPipeline cleans every prompt with ftfy, which is not installed "
                                  "(pip install ftfy)") from e
            raise
        want = int(_unwrap(pipe.transformer).config.context_in_dim)
        if pe.shape[-1] != want:
            raise ValueError(f"taca train: the PRX text encoder gives {pe.shape[-1]} features, the transformer's "
                             f"context_in_dim is {want}")
        return {"prompt_embeds": pe, _MASK: mask.bool()}

    # --- images ------------------------------------------------------------------------------
    def _vae_factors(self, vae):
        scale = getattr(vae.config, "scaling_factor", _SCALE_DEFAULT)
        shift = getattr(vae.config, "shift_factor", 0.0)
        if scale is None or shift is None:
            raise ValueError(f"taca train: the PRX VAE's config has scaling_factor={scale!r}, shift_factor={shift!r}: "
                             f"PRXPipeline decodes latents / scaling_factor + shift_factor, which fails with None")
        return float(scale), float(shift)

    def vae_scale_factor(self) -> int:
        f = getattr(self.pipe, "vae_scale_factor", None)
        if isinstance(f, int):
            return f
        vae = self.vae()  # PRXPipeline.vae_scale_factor's rule
        if hasattr(vae, "spatial_compression_ratio"):
            return int(vae.spatial_compression_ratio)
        return 2 ** (len(vae.config.block_out_channels) - 1)

    def encode_images(self, pixels):
        vae = self.vae()
        scale, shift = self._vae_factors(vae)
        factor = self.vae_scale_factor()
        check_image_size(pixels, factor * self._patch, "PRX", f"the VAE's {factor} x the transformer's "
                         f"{self._patch}x{self._patch} patches, as PRXPipeline.check_inputs requires")
        with torch.no_grad():
            enc = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype))
            lat = enc.latent_dist.mode() if hasattr(enc, "latent_dist") else enc.latent  # AutoencoderKL / DC
            return (lat - shift) * scale

    # --- forward -----------------------------------------------------------------------------
    def predict(self, transformer, noisy, sigma, cond, guidance):
        if noisy.dim() != 4:
            raise ValueError(f"taca train: PRX latents must be (B, C, h, w), got {tuple(noisy.shape)}")
        B, _, h, w = noisy.shape
        if h % self._patch or w % self._patch:
            raise ValueError(f"taca train: PRX latents of {h}x{w} do not tile the transformer's "
                             f"{self._patch}x{self._patch} patches")
        pe, mask = cond["prompt_embeds"], cond[_MASK]
        if pe.dim() != 3 or pe.shape[0] != B or tuple(mask.shape) != tuple(pe.shape[:2]):
            raise ValueError(f"taca train: PRX prompt_embeds (B, L, D) and {_MASK} (B, L) for the latents' batch of "
                             f"{B}, got {tuple(pe.shape)} and {tuple(mask.shape)}")
        # the pipeline's t_cont: the scheduler's t = sigma * N (float32), divided by N on the latents' device
        n = self._n_train
        t = (sigma.to(device=noisy.device, dtype=torch.float32) * n) / n
        return transformer(hidden_states=noisy, timestep=t, encoder_hidden_states=pe,
                           attention_mask=mask.to(device=noisy.device, dtype=torch.bool), return_dict=False)[0]

    def lora_saver(self):
        import inspect

        from diffusers import PRXPipeline

        own = getattr(PRXPipeline, "save_lora_weights", None)
        if own is not None and "transformer_lora_layers" in inspect.signature(own).parameters:
            return PRXPipeline
        from diffusers import FluxPipeline  # the "transformer."-prefixed file load_lora_adapter reads

        return FluxPipeline
