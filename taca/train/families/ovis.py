"""Ovis-Image (``OvisImageTransformer2DModel``, ``OvisImagePipeline``) for ``taca train``.

diffusers has no LoRA script for Ovis-Image; the conventions are the ones ``OvisImagePipeline``
(diffusers 0.42.1, ``pipelines/ovis_image/pipeline_ovis_image.py``; lines below are that file's)
applies at inference. The model is a FLUX.1 clone, and FLUX.1's helpers are used where the
pipeline does exactly what FLUX.1's does:

- latents: the pipeline decodes ``vae.decode(latents / scaling_factor + shift_factor)`` (l. 701-703,
  a FLUX.1-style ``AutoencoderKL``), so the training latents are ``(mode - shift_factor) *
  scaling_factor`` (``_DiffusersFamily.encode_images``), (B, C, h, w), packed 2x2 into tokens by
  ``_pack_latents`` (l. 379-384) with image ids (0, i, j) from ``_prepare_latent_image_ids``
  (l. 365-376) in the latents' dtype: both the same code as FLUX.1's, so ``flux_tokens`` builds
  them and ``flux_latents`` unpacks the output;
- text ids: NOT FLUX.1's zeros: ``_prepare_prompt_embeds`` (l. 262-266, called at l. 304-306)
  gives text token i the id (0, i, i) (RoPE positions on both spatial axes), in the text encoder's
  dtype (the cached embeddings' dtype); rebuilt in ``predict`` from the text length;
- ``timestep = sigma`` (float32, as diffusers' FLUX script passes it): the pipeline passes
  ``t.expand(B).to(latents.dtype) / 1000`` with ``t = 1000 sigma`` (l. 645-650) and the
  transformer multiplies by 1000 after casting to its dtype (transformer_ovis_image.py, forward).
  In float32 that is sigma to an ulp; in bf16 (fp16) the pipeline rounds 1000 sigma to the dtype
  before dividing, which moves the model's t by one step of the dtype (4 in bf16, 0.5 in fp16) for
  about 10% (24%) of the sigmas in the window. Passing sigma itself keeps TACA's gamma decided on
  the exact sigma, as it is at inference (``taca.enable`` reads the pipeline's exact
  ``_current_timestep`` there, not the rounded tensor);
- no guidance embedding and no pooled projections (the transformer has neither): ``--guidance``
  is not used. The pipeline's guidance is true CFG (``guidance_scale`` 5 against the negative
  prompt "", a second forward, l. 658-669); training fits the conditional prediction, as
  diffusers' LoRA scripts do;
- the output is the velocity ``noise - x0`` as it is: ``FlowMatchEulerDiscreteScheduler.step``
  (l. 673) adds ``(sigma_next - sigma) * noise_pred``, so no negation;
- sigmas: the pipeline passes FLUX.1's ``linspace(1, 1 / n, n)`` sigmas and ``mu`` from the image's
  token count (l. 610-627); AIDC-AI/Ovis-Image-7B's scheduler is taken to shift dynamically with
  FLUX.1-dev's values (as tests/test_models_ovis.py assumes; not checked offline), so the sampled
  training sigmas are not shifted, as in diffusers' FLUX script. ``shift()`` is the scheduler's
  static shift (``static_shift``): 1 under dynamic shifting; a scheduler without it ignores ``mu``
  and shifts by its ``shift``, and training then shifts the same;
- text: ``_get_ovis_prompt_embeds`` (l. 200-238) wraps each caption in the chat template (one user
  turn: the fixed system prompt + the caption, ``add_generation_prompt``, ``enable_thinking=False``),
  tokenizes it without added special tokens, padded (and truncated) to ``max_sequence_length +
  28``, runs the Qwen3 encoder with the padding mask, multiplies ``last_hidden_state`` by the mask
  (padding zeroed) and drops the first ``user_prompt_begin_id`` = 28 tokens (the template's
  prefix): every caption is (``max_sequence_length``, D), with no mask for the transformer (l.
  648-656: the zeroed tokens are attended, and gamma scales them, as FLUX.1's T5 padding). A
  caption's row depends only on its own tokens (fixed padding, the encoder masks the pad
  tokens), so its cache entry is that fixed-length embedding, the same in any batch, and the
  default row split / stack is exact. The number of padding tokens changes the output: train
  at the ``max_sequence_length`` you generate with. None means the pipeline's default (256,
  ``__call__``'s); more than 256 is refused (``check_inputs``, l. 361-362, refuses to generate with
  it), with a ConfigError naming ``--max-sequence-length``.

LoRA targets are FLUX.1's: "attn" is the double-stream blocks' joint-attention projections (image
``to_q/k/v / to_out.0`` and text ``add_q/k/v_proj / to_add_out``) and the single-stream blocks'
``to_q/k/v`` (their output projection is the fused attention + MLP ``proj_out``, left out as for
FLUX.1 and Chroma); "attn+ff" adds the double-stream blocks' ``ff`` / ``ff_context``.

Gradient checkpointing: ``OvisImageTransformer2DModel.forward`` hands its checkpointed blocks
``joint_attention_kwargs`` (TACA's per-call state) as the plain calls get them; nothing to fix.

Saving: ``OvisImagePipeline`` has no LoRA loader mixin in diffusers 0.42.1 (no
``save_lora_weights`` / ``load_lora_weights``). The adapter is written by
``FluxPipeline.save_lora_weights`` (keys ``transformer.<module>.lora_A/B.weight`` and the PEFT
config as metadata), which ``pipe.transformer.load_lora_adapter(path, prefix="transformer")`` and
``taca.enable(pipe, lora=path)`` (which falls back to it for pipelines without
``load_lora_weights``) read; should a later diffusers give the pipeline its own
``save_lora_weights``, that one is used.
"""
from __future__ import annotations

import torch

from . import (_DiffusersFamily, check_text_parts, check_tokens_and_text, fixed_text_length, flux_latents, flux_tokens,
               saver_or_flux)

_MAX_SEQUENCE_LENGTH = 256  # OvisImagePipeline.__call__'s default, and the most its check_inputs allows


def text_ids(n: int, device, dtype) -> torch.Tensor:
    """The (n, 3) ids of n text tokens as ``OvisImagePipeline._prepare_prompt_embeds`` builds them:
    (0, i, i)."""
    ids = torch.zeros(n, 3)
    ids[:, 1] = torch.arange(n)
    ids[:, 2] = torch.arange(n)
    return ids.to(device=device, dtype=dtype)


class OvisImageFamily(_DiffusersFamily):
    name = "ovis"
    _text_attrs = ("text_encoder",)

    def max_sequence_length(self, n) -> int:
        """``--max-sequence-length`` as the pipeline takes it: None -> its default (256); at most 256."""
        return fixed_text_length(n, self.pipe, _MAX_SEQUENCE_LENGTH, _MAX_SEQUENCE_LENGTH, "Ovis-Image")

    # --- caching ----------------------------------------------------------------------------
    def encode_text(self, captions, device, max_sequence_length):
        n = self.max_sequence_length(max_sequence_length)
        pipe = self.pipe
        check_text_parts(pipe, "Ovis-Image")
        with torch.no_grad():
            pe = pipe.encode_prompt(prompt=list(captions), do_classifier_free_guidance=False, device=device,
                                    max_sequence_length=n)[0]
        return {"prompt_embeds": pe}

    # --- training forward -------------------------------------------------------------------
    def predict(self, transformer, noisy, sigma, cond, guidance):
        pe = cond["prompt_embeds"]
        check_tokens_and_text(noisy, pe, "Ovis-Image")
        packed, img_ids, _ = flux_tokens(noisy, pe.shape[1], "Ovis-Image")  # FLUX.1's txt_ids (zeros) not used
        out = transformer(hidden_states=packed, timestep=sigma, encoder_hidden_states=pe,
                          txt_ids=text_ids(pe.shape[1], pe.device, pe.dtype), img_ids=img_ids,
                          return_dict=False)[0]
        return flux_latents(out, noisy.shape)

    def lora_saver(self):
        return saver_or_flux("OvisImagePipeline")  # no LoRA loader in diffusers 0.42.1
