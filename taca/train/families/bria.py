"""Bria 3.x (``BriaTransformer2DModel``, ``BriaPipeline``) for ``taca train``.

diffusers has no LoRA script for Bria; the conventions are the ones ``BriaPipeline`` (diffusers
0.42.1, ``pipelines/bria/pipeline_bria.py``; lines below are that file's) applies at inference. The
model is a FLUX.1 clone ("Based on FluxPipeline with several changes: no pooled embeddings, zero
padding for prompts, no guidance embedding", l. 90-94), and FLUX.1's helpers are used where the
pipeline does exactly what FLUX.1's does:

- latents: the pipeline decodes ``vae.decode(latents / scaling_factor + shift_factor)`` (l. 735-737)
  and, for a VAE config without ``shift_factor``, sets it to 0 (l. 142-144), so the training latents
  are ``(mode - shift_factor) * scaling_factor`` with None read as 0 (``_DiffusersFamily.encode_images``),
  (B, C, h, w) at the VAE's own downsampling. ``vae_scale_factor`` is ``2 ** len(block_out_channels)``
  (l. 136-138, twice FLUX.1's), but ``prepare_latents`` takes ``2 * (H // vae_scale_factor)`` (l. 389-390)
  and ``_unpack_latents`` doubles back (l. 420-431): the latent grid is the VAE's, as FLUX.1's. They are
  packed 2x2 into tokens (``_pack_latents``, l. 412-417) with image ids (0, i, j) in the latents' dtype
  (``_prepare_latent_image_ids``, l. 434-447, the batch dimension dropped at l. 662-663): the same code
  as FLUX.1's, so ``flux_tokens`` builds them and ``flux_latents`` unpacks the output;
- text ids: zeros, as FLUX.1's, but in float32 whatever the model's dtype (``encode_prompt``'s
  ``torch.zeros(...)``, l. 238, moved to the device only); ``predict`` builds them the same;
- ``timestep = 1000 sigma`` in float32: the pipeline passes the scheduler's own ``t.expand(B)``
  (l. 679-690), and ``FlowMatchEulerDiscreteScheduler.set_timesteps`` makes ``timesteps = sigmas *
  num_train_timesteps`` in float32 from the (shifted) sigmas it steps with; the transformer casts it
  to its dtype and embeds it unscaled (``BriaTimesteps``, scale 1). ``1000 * sigma`` of the
  scheduler's float32 sigma is its timestep bit for bit. A scheduler with another
  ``num_train_timesteps`` or ``invert_sigmas`` (t = 1000 (1 - sigma)) is refused: TACA reads
  sigma as t / 1000;
- no guidance embedding and no pooled projections: the pipeline passes neither (``guidance_embeds``
  exists in the config, but the model cannot even be built with it in diffusers 0.42.1). The
  pipeline's guidance is true CFG (``guidance_scale`` 5, a [negative, positive] batch, l. 603-604
  and 693-696, the negative embeddings zeros when no negative prompt is given, l. 230-231);
  training fits the conditional prediction, as diffusers' LoRA scripts do; ``--guidance`` is not
  used;
- the output is the velocity ``noise - x0`` as it is: ``FlowMatchEulerDiscreteScheduler.step``
  (l. 707) adds ``(sigma_next - sigma) * noise_pred``, so no negation;
- sigmas: with a static-shift scheduler (``use_dynamic_shifting`` False; BRIA-3.2's is taken to be
  shift 1, as tests/test_models_bria.py takes it) the pipeline steps through the training grid
  (``get_original_sigmas``, l. 80-86 and 650-657), which ``set_timesteps`` shifts by ``shift``:
  training sigmas are shifted the same (``static_shift``); with dynamic shifting the pipeline
  passes FLUX.1's ``linspace(1, 1 / n, n)`` and ``mu`` from the token count (l. 619-640), and the
  sampled sigmas are not shifted, as diffusers' FLUX script;
- schedulers: ``BriaPipeline`` also runs ``DDIMScheduler`` / ``EulerAncestralDiscreteScheduler``
  (l. 644-649: "predicts 'v' from flow-matching or eps from diffusion", l. 681), whose models
  predict the scheduler's ``prediction_type``, not a flow-matching velocity: taca train trains
  flow matching only and refuses any scheduler other than ``FlowMatchEulerDiscreteScheduler``;
- text: ``_get_t5_prompt_embeds`` (l. 321-374) encodes EACH prompt alone (its tokens, truncated to
  ``max_sequence_length``, no padding, no mask: l. 336-356), appends zero vectors up to
  ``max_sequence_length`` (l. 358-364) and passes no mask to the transformer (l. 682-690: the zeros,
  after the context embedder's bias, are attended; gamma scales them as FLUX.1's T5 padding). A
  caption's row therefore depends only on its own tokens: its cache entry is its fixed-length
  (``max_sequence_length``, D) embedding, the same in any batch, and the default row split / stack
  is exact. The number of padding tokens changes the output: train at the ``max_sequence_length``
  you generate with. None means the pipeline's default (128, ``__call__``'s); more than 512 is
  refused (``check_inputs``, l. 318-319, refuses to generate with it), with a ConfigError naming
  ``--max-sequence-length``.

LoRA targets are FLUX.1's: "attn" is the double-stream blocks' joint-attention projections (image
``to_q/k/v / to_out.0`` and text ``add_q/k/v_proj / to_add_out``) and the single-stream blocks'
``to_q/k/v`` (their output projection is the fused attention + MLP ``proj_out``, left out as for
FLUX.1); "attn+ff" adds the double-stream blocks' ``ff`` / ``ff_context``.

Gradient checkpointing: ``BriaTransformer2DModel.forward`` passes no attention kwargs to its plain
blocks and ``attention_kwargs`` to the checkpointed ones; ``taca.models.bria`` hands the processors
each call's state directly (and to the blocks the backward recomputes): nothing to fix here.

Saving: ``BriaPipeline`` has no LoRA loader mixin in diffusers 0.42.1 (no ``save_lora_weights`` /
``load_lora_weights``). The adapter is written by ``FluxPipeline.save_lora_weights`` (keys
``transformer.<module>.lora_A/B.weight`` and the PEFT config as metadata), which
``pipe.transformer.load_lora_adapter(path, prefix="transformer")`` and ``taca.enable(pipe, lora=path)``
(which falls back to it for pipelines without ``load_lora_weights``) read; should a later diffusers
give the pipeline its own ``save_lora_weights``, that one is used.

Bria FIBO (``BriaFiboTransformer2DModel``, ``BriaFiboPipeline``: structured JSON prompts, per-block
text-encoder layers) has its own adapter and training family (``bria_fibo``); a FIBO transformer
handed to this family is refused, naming the pipeline.
"""
from __future__ import annotations

import torch

from . import (_DiffusersFamily, _unwrap, check_flow_scheduler, check_text_parts, check_tokens_and_text,
               fixed_text_length, flux_latents, flux_tokens, saver_or_flux)

_MAX_SEQUENCE_LENGTH = 512  # BriaPipeline.check_inputs refuses more (l. 318-319)
_DEFAULT_SEQUENCE_LENGTH = 128  # BriaPipeline.__call__'s default (l. 469)
_T_SCALE = 1000  # the adapter's "t1000" timestep convention


class BriaFamily(_DiffusersFamily):
    name = "bria"
    _text_attrs = ("text_encoder",)

    def __init__(self, pipe):
        t = getattr(pipe, "transformer", None)
        tname = type(_unwrap(t)).__name__ if t is not None else None
        if tname is not None and tname != "BriaTransformer2DModel":
            what = type(pipe).__name__
            if tname.startswith("BriaFibo"):
                raise ValueError(f"taca train: {what} runs {tname} (Bria FIBO: structured JSON prompts, per-block "
                                 f"text-encoder layers); this family trains Bria 3.x (BriaPipeline, "
                                 f"BriaTransformer2DModel): FIBO trains through taca.train.families.bria_fibo")
            raise ValueError(f"taca train: the Bria family trains BriaPipeline's BriaTransformer2DModel, got {tname}")
        super().__init__(pipe)
        sch = getattr(pipe, "scheduler", None)
        pred = getattr(getattr(sch, "config", None), "prediction_type", None)
        what = f"{type(sch).__name__}{f' (prediction_type {pred!r})' if pred else ''}"
        check_flow_scheduler(sch, "Bria", "BriaPipeline", not_flow=(
            f"taca train: this BriaPipeline has a {what}: its model is a diffusion model of that scheduler, not the "
            f"flow-matching velocity taca train trains; Bria is trained with its FlowMatchEulerDiscreteScheduler"))
        self._t_scale = float(_T_SCALE)

    def max_sequence_length(self, n) -> int:
        """``--max-sequence-length`` as the pipeline takes it: None -> its default (128); at most 512."""
        return fixed_text_length(n, self.pipe, _DEFAULT_SEQUENCE_LENGTH, _MAX_SEQUENCE_LENGTH, "Bria")

    # --- caching ----------------------------------------------------------------------------
    def encode_text(self, captions, device, max_sequence_length):
        n = self.max_sequence_length(max_sequence_length)
        pipe = self.pipe
        check_text_parts(pipe, "Bria")
        with torch.no_grad():
            pe = pipe.encode_prompt(prompt=list(captions), device=device, do_classifier_free_guidance=False,
                                    max_sequence_length=n)[0]
        return {"prompt_embeds": pe}

    # --- training forward -------------------------------------------------------------------
    def predict(self, transformer, noisy, sigma, cond, guidance):
        pe = cond["prompt_embeds"]
        check_tokens_and_text(noisy, pe, "Bria")
        packed, img_ids, _ = flux_tokens(noisy, pe.shape[1], "Bria")
        # encode_prompt's text ids: float32 zeros (l. 238), whatever the latents' dtype
        txt_ids = torch.zeros(pe.shape[1], 3, device=noisy.device)
        timestep = sigma.to(device=noisy.device, dtype=torch.float32) * self._t_scale  # the scheduler's t
        out = transformer(hidden_states=packed, timestep=timestep, encoder_hidden_states=pe, txt_ids=txt_ids,
                          img_ids=img_ids, return_dict=False)[0]
        return flux_latents(out, noisy.shape)

    def lora_saver(self):
        return saver_or_flux("BriaPipeline")  # no LoRA loader in diffusers 0.42.1
