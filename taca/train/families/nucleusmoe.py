"""Nucleus-Image (``NucleusMoEImageTransformer2DModel`` in ``NucleusMoEImagePipeline``) for ``taca train``.

diffusers has no LoRA script for Nucleus-Image; the conventions are the ones ``NucleusMoEImagePipeline``
(diffusers 0.42.1, ``pipelines/nucleusmoe_image/pipeline_nucleusmoe_image.py``; "l." below is that
file's, "model l." ``models/transformers/transformer_nucleusmoe_image.py``'s) applies at inference:

- latents: the VAE is Qwen-Image's ``AutoencoderKLQwenImage`` (a video VAE): images enter as
  (B, 3, 1, H, W), the latents are 5-D (B, C, 1, h, w). The decode path (l. 627-638) unpacks the
  tokens to (B, C, 1, h, w) and computes ``latents / (1 / latents_std) + latents_mean`` per channel
  before ``vae.decode``; the training latents are its inverse, ``(mode - latents_mean) * (1 /
  latents_std)`` (the posterior mode, cached once). Images must be a multiple of the pipeline's
  ``vae_scale_factor * patch_size`` (16 for the real VAE and patches, l. 171 / 265; the pipeline
  itself floors other sizes, l. 346-347): other sizes are refused, naming ``--resolution``.
- packing: ``_pack_latents`` (l. 303-311): p x p patches (the transformer's ``patch_size``, 2)
  row-major into tokens of ``C p p`` channels; ``img_shapes = [(1, h / p, w / p)] * B`` (l. 537-539);
  the output unpacked by the inverse of ``_pack_latents`` (``_unpack_latents``, l. 314-331). The
  pipeline takes ``in_channels // 4`` latent channels (l. 522), i.e. it assumes 2x2 patches: a
  transformer whose channels do not fit that, or a VAE of another ``z_dim``, is refused.
- timestep: the pipeline passes ``t.expand(B).to(latents.dtype) / num_train_timesteps`` (l. 571-575)
  with ``t = num_train_timesteps * sigma`` (the scheduler's float32 timesteps), i.e. sigma; the
  transformer casts it to its dtype first thing (model l. 878) and embeds it with ``scale=1000``
  (model l. 120). ``predict`` passes sigma in float32, as the FLUX-style families do: in float32 the
  pipeline's value is sigma to an ulp (and bit for bit when training is handed the pipeline's own
  timestep, as the tests do); in bf16 the pipeline rounds ``1000 sigma`` to bf16 before dividing,
  which can move the model's timestep by one bf16 step (~0.004) against ``bf16(sigma)``. Passing the
  exact sigma keeps TACA's gamma decided on the exact sigma, as it is at inference (``taca.enable``
  reads the pipeline's exact ``_current_timestep`` there: the adapter's ``current_t_pipelines``),
  where the rounded value would drop gamma for sigmas just above 0.97 that round below it. The
  value ``num_train_timesteps`` cancels, so any is fine; ``invert_sigmas`` (t = 1000 (1 - sigma)) is
  refused.
- output: the model predicts ``x0 - noise``: the pipeline negates it before the Euler step
  (``noise_pred = -noise_pred``, l. 599; ``scheduler.step`` adds ``(sigma_next - sigma) * pred``,
  l. 602), so ``predict`` returns ``-output``, the velocity ``noise - x0``. The pipeline's guidance
  is true CFG with a norm rescale (l. 583-597, ``guidance_scale`` 4 against the negative prompt "");
  training fits the conditional prediction, as diffusers' LoRA scripts do: ``--guidance`` is not used.
- sigmas: the pipeline passes ``linspace(1, 1 / n, n)`` and ``mu`` from the image's token count
  (l. 541-556), so under dynamic shifting the sampled training sigmas are not shifted, as in
  diffusers' FLUX script; a scheduler without dynamic shifting ignores ``mu`` and shifts by its
  ``shift``, and training shifts the same (``static_shift``). The checkpoint's scheduler config is
  not known offline here.
- text: ``encode_prompt`` (l. 187-249) wraps each caption in the chat template with the pipeline's
  fixed system prompt (``DEFAULT_SYSTEM_PROMPT``, ``_format_prompt``, l. 178-185), tokenizes the
  batch with ``padding="longest", pad_to_multiple_of=8, max_length=max_sequence_length,
  truncation=True`` (l. 221-229: the system prompt and template count in ``max_sequence_length``),
  and takes the Qwen3-VL hidden state ``return_index`` = -8 (l. 176 / 234) of every token, padding
  included, with the tokenizer's attention mask (None when nothing is padded, l. 246-247). The
  transformer turns the mask into a bool key mask [image, text] (model l. 88-112 / 890-895) and
  gives text token i the rotary position i (model l. 229), padding included, so right padding
  (the Qwen tokenizer's default) leaves each caption's tokens, positions and output as they are
  alone: each caption is cached at its own tokens (``split_by_mask``) and a batch is zero-padded
  after them to the next multiple of 8 of its longest caption with the mask (``collate``): the
  pipeline's own layout for that batch of prompts (the padded keys are masked, so their values do
  not matter). A tokenizer that pads on the LEFT moves every caption's text positions with the
  batch's longest prompt: refused (ValueError) rather than trained on positions its generation
  does not use. ``max_sequence_length`` None means the pipeline's default (1024,
  ``default_max_sequence_length``; l. 464); the pipeline sets no upper bound, but transformers'
  tokenizer refuses a truncation length that is not a multiple of the padding multiple 8, so
  another is refused here with a ConfigError naming ``--max-sequence-length``.
- train mode and the MoE: ``NucleusMoELayer`` routes by expert choice (each expert takes its top
  ``ceil(capacity_factor * S / num_experts)`` image tokens of each sample, model l. 548-604) with
  a shared expert; nothing in the model reads ``self.training`` (no capacity change, no token
  dropping, no auxiliary loss, dropout 0), so ``transformer.train()`` runs the pipeline's forward
  exactly, with gradients through the routing weights (the top-k selection itself is discrete, as
  at inference). The routing is per sample, so a sample's prediction does not depend on its batch;
  it does depend on the sample's image token count (train at the resolution you generate at).
- text K / V cache: the attention can take precomputed text keys / values (``cached_txt_key`` /
  ``cached_txt_value`` in the attention kwargs, which also skip the block's ``encoder_proj``, model
  l. 695). The pipeline passes none itself (``attention_kwargs`` is the caller's, l. 481 / 579); they
  come from diffusers' ``TextKVCacheConfig`` (``transformer.enable_cache``, ``hooks/text_kv_cache.py``),
  which computes each block's text K / V once per prompt, keyed by the prompt tensor's
  ``data_ptr()``, and replays them (the pipeline resets it per call, l. 562-563). ``predict`` passes
  no attention kwargs, so every block computes the text keys from the prompt through
  ``encoder_proj`` and ``attn.add_k_proj`` / ``add_v_proj`` in every forward, with gradients into
  the LoRA that trains them and the keys gamma scales. A transformer with any diffusers cache on
  (``is_cache_enabled``: the text K / V cache would replay another batch's keys, without their
  LoRA's current weights or a graph; FasterCache & co. other steps' activations) is refused.
  At inference the same cache keeps the text K / V of a call's first step for all its steps, so
  with ``taca.enable(pipe, lora=...)`` (the adapter gated on in the window only) it carries the
  adapter's ``add_k_proj`` / ``add_v_proj`` of step 0 into the steps outside the window: generate
  with a gated adapter without ``TextKVCacheConfig``.
- LoRA targets (full module names of the transformer's Linear layers): "attn" is every block's
  attention ``to_q / to_k / to_v / to_out.0`` (image stream) and ``add_k_proj / add_v_proj`` (the
  text keys and values; the text has no queries nor output projection here); "attn+ff" adds the
  dense blocks' SwiGLU ``img_mlp.net.0.proj / net.2`` and the MoE blocks' shared expert
  (``img_mlp.shared_expert.net.0.proj / net.2``). The routed experts are packed parameters, not
  Linear layers, so PEFT cannot put a LoRA on them; the router (``img_mlp.gate``) and the per-block
  text projection ``encoder_proj`` are left out (name them in ``--lora-targets`` to train them).
- gradient checkpointing: the transformer hands its checkpointed blocks the same attention kwargs
  (TACA's state, the mask) as its plain calls (model l. 897-914).

Saving: ``NucleusMoEImagePipeline`` has no LoRA loader mixin in diffusers 0.42.1 (no
``save_lora_weights`` / ``load_lora_weights``). The adapter is written by
``FluxPipeline.save_lora_weights`` (keys ``transformer.<module>.lora_A/B.weight``, the PEFT config
as metadata), which ``pipe.transformer.load_lora_adapter(path, prefix="transformer")`` and
``taca.enable(pipe, lora=path)`` (which falls back to it for pipelines without
``load_lora_weights``) read; should a later diffusers give the pipeline its own
``save_lora_weights``, that one is used.
"""
from __future__ import annotations

import torch

from . import (_DiffusersFamily, _MaskedTextFamily, _unwrap, call_default, check_flow_scheduler, check_image_size,
               check_text_parts, layer_names, one_frame, pad_collate, qwen_vae_latents, saver_or_flux)

_ATTN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_v_proj")
_FF = ("img_mlp.net.0.proj", "img_mlp.net.2", "img_mlp.shared_expert.net.0.proj", "img_mlp.shared_expert.net.2")
_MASK = "prompt_embeds_mask"
_PAD_MULTIPLE = 8  # encode_prompt's pad_to_multiple_of
_DEFAULT_MAX_SEQUENCE_LENGTH = 1024  # NucleusMoEImagePipeline.default_max_sequence_length
_TRANSFORMER = "NucleusMoEImageTransformer2DModel"


class NucleusMoEImageFamily(_MaskedTextFamily, _DiffusersFamily):
    name = "nucleusmoe"
    _text_attrs = ("text_encoder",)
    text_mask = _MASK
    text_seq = ("prompt_embeds",)

    def __init__(self, pipe):
        t = getattr(pipe, "transformer", None)
        inner = _unwrap(t) if t is not None else None
        if inner is None or type(inner).__name__ != _TRANSFORMER:
            raise ValueError(f"taca train: the Nucleus-Image family trains NucleusMoEImagePipeline's {_TRANSFORMER}, "
                             f"got {type(inner).__name__}")
        super().__init__(pipe)
        c = inner.config
        p = int(c.patch_size)
        n_lat = int(c.in_channels) // 4  # NucleusMoEImagePipeline.__call__'s num_channels_latents
        out = int(c.out_channels or c.in_channels)
        if n_lat * p * p != int(c.in_channels) or out != n_lat:
            raise ValueError(f"taca train: this {_TRANSFORMER} takes {c.in_channels} input channels in "
                             f"{p}x{p} patches for {out} output channels; NucleusMoEImagePipeline packs "
                             f"in_channels // 4 latent channels in those patches and denoises latents of one shape, "
                             f"which this transformer does not fit")
        vae = getattr(pipe, "vae", None)
        if vae is not None and int(vae.config.z_dim) != n_lat:
            raise ValueError(f"taca train: the pipeline's VAE has {vae.config.z_dim} latent channels, the transformer "
                             f"takes {n_lat} (in_channels // 4)")
        # the pipeline divides the scheduler's t by num_train_timesteps: any value is read back as sigma
        check_flow_scheduler(getattr(pipe, "scheduler", None), "Nucleus-Image", "NucleusMoEImagePipeline", t1000=False)
        self._patch = p
        self._vae_factor = int(getattr(pipe, "vae_scale_factor", 8))
        self._check_padding_side()
        self.attn_targets = layer_names(inner, "transformer_blocks", _ATTN)
        self.ff_targets = layer_names(inner, "transformer_blocks", _FF)

    def _check_padding_side(self):
        tok = getattr(getattr(self.pipe, "processor", None), "tokenizer", None)
        if tok is not None and getattr(tok, "padding_side", "right") != "right":
            raise ValueError(
                f"taca train: the Nucleus-Image processor's tokenizer pads on the {tok.padding_side!r}: the "
                f"transformer gives text token i the rotary position i, padding included, so every caption's text "
                f"would sit at positions set by the longest prompt of its batch, and its prediction depend on the "
                f"batch; train (and generate) with right padding (pipe.processor.tokenizer.padding_side = 'right')")

    def max_sequence_length(self, n) -> int:
        """``--max-sequence-length`` as the pipeline takes it: None -> its default (1024); a positive
        multiple of 8 (the tokenizer refuses to truncate at another length while padding to a multiple
        of 8)."""
        from ..config import ConfigError

        if n is None:
            n = call_default(self.pipe, "max_sequence_length", None) or getattr(
                self.pipe, "default_max_sequence_length", _DEFAULT_MAX_SEQUENCE_LENGTH)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"taca train: argument --max-sequence-length: must be a positive integer, got {n!r}")
        if n % _PAD_MULTIPLE:
            raise ConfigError(f"taca train: argument --max-sequence-length: Nucleus-Image pipelines take a multiple "
                              f"of {_PAD_MULTIPLE} (encode_prompt pads to a multiple of {_PAD_MULTIPLE} and truncates "
                              f"at max_sequence_length, which the tokenizer refuses otherwise), got {n}")
        return n

    # --- caching ----------------------------------------------------------------------------
    def encode_text(self, captions, device, max_sequence_length):
        n = self.max_sequence_length(max_sequence_length)
        pipe = self.pipe
        check_text_parts(pipe, "Nucleus-Image", ("text_encoder", "processor"))
        captions = list(captions)
        if not captions or not all(isinstance(c, str) for c in captions):
            raise ValueError(f"taca train: Nucleus-Image captions must be a non-empty list of strings, "
                             f"got {captions!r}")
        self._check_padding_side()
        with torch.no_grad():
            pe, mask = pipe.encode_prompt(prompt=captions, device=device, max_sequence_length=n)
        if mask is None:  # the pipeline drops the mask when nothing is padded
            mask = torch.ones(pe.shape[:2], dtype=torch.long, device=pe.device)
        return {"prompt_embeds": pe, _MASK: mask}

    def collate(self, entries):
        """The cached captions zero-padded after their tokens to the next multiple of 8 of the longest
        (``encode_prompt``'s ``padding="longest", pad_to_multiple_of=8``), with the bool mask."""
        n = max(int(e["prompt_embeds"].shape[0]) for e in entries)
        return pad_collate(entries, _MASK, self.text_seq, length=-(-n // _PAD_MULTIPLE) * _PAD_MULTIPLE)

    def encode_images(self, pixels):
        vae = self.vae()
        check_image_size(pixels, self._vae_factor * self._patch, "Nucleus-Image",
                         f"the VAE's {self._vae_factor} times the transformer's {self._patch}x{self._patch} patches")
        return qwen_vae_latents(vae, pixels)

    # --- training forward -------------------------------------------------------------------
    def predict(self, transformer, noisy, sigma, cond, guidance):
        from diffusers import NucleusMoEImagePipeline

        inner = _unwrap(transformer)
        if getattr(inner, "is_cache_enabled", False):
            raise ValueError("taca train: the Nucleus-Image transformer has a diffusers cache enabled "
                             "(transformer.enable_cache): it would replay activations of other calls; disable it "
                             "(transformer.disable_cache()) to train")
        x, five = one_frame(noisy, "Nucleus-Image")
        B, C, h, w = x.shape
        p = self._patch
        if h % p or w % p:
            raise ValueError(f"taca train: Nucleus-Image latents of {h}x{w} do not tile the transformer's {p}x{p} "
                             f"patches")
        pe = cond["prompt_embeds"]
        if pe.dim() != 3 or pe.shape[0] != B:
            raise ValueError(f"taca train: Nucleus-Image prompt_embeds must be (B, L, D) for the latents' batch of "
                             f"{B}, got {tuple(pe.shape)}")
        packed = NucleusMoEImagePipeline._pack_latents(x, B, C, h, w, p)
        mask = cond.get(_MASK)
        if mask is not None:
            mask = mask.to(device=noisy.device, dtype=torch.bool)
            if bool(mask.all()):
                mask = None  # as the pipeline: no mask when no caption of the batch is padded
        out = transformer(hidden_states=packed, timestep=sigma.to(device=noisy.device, dtype=torch.float32),
                          encoder_hidden_states=pe, encoder_hidden_states_mask=mask,
                          img_shapes=[(1, h // p, w // p)] * B, return_dict=False)[0]
        # (B, h/p * w/p, C p p) tokens back to latents: the inverse of _pack_latents
        out = out.reshape(B, h // p, w // p, -1, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, -1, h, w)
        out = -out  # the model predicts x0 - noise (the pipeline's noise_pred = -noise_pred)
        return out.unsqueeze(2) if five else out

    def lora_saver(self):
        return saver_or_flux("NucleusMoEImagePipeline")  # no LoRA loader in diffusers 0.42.1
