"""AuraFlow (``AuraFlowTransformer2DModel``, ``AuraFlowPipeline``) for ``taca train``.

diffusers has no LoRA script for AuraFlow; the conventions are the ones ``AuraFlowPipeline``
(diffusers 0.42.1) applies at inference:

- latents: the pipeline decodes ``vae.decode(latents / scaling_factor)`` with no shift (AuraFlow's
  VAE is SDXL's, ``scaling_factor`` 0.13025, no ``shift_factor``, as remembered from the hub; the
  pipeline ignores one if a config had it), so the training latents are ``mode * scaling_factor``,
  unpacked (B, C, h, w): the transformer patchifies them itself (``AuraFlowPatchEmbed``);
- ``timestep = sigma`` in the latents' dtype: the loop passes ``torch.tensor([t / 1000])`` with
  ``t = 1000 sigma`` (the transformer's ``Timesteps`` multiply by 1000 again);
- the output is the velocity ``noise - x0`` as it is: ``FlowMatchEulerDiscreteScheduler.step``
  adds ``(sigma_next - sigma) * output``, so no negation;
- the scheduler has a static shift (1.73 in fal/AuraFlow's config, no dynamic shifting):
  training sigmas are shifted by it (``static_shift``), as SD3's;
- text: UMT5 through ``encode_prompt``, which pads every prompt to ``max_sequence_length`` (256
  by default), multiplies the padded positions' embeddings by the 0/1 mask (zeros) and passes no
  mask to the transformer (the zero embeddings are attended). Each cache entry is therefore the
  caption's fixed-length (L, D) embedding, independent of its batch (the encoder masks the padding),
  and the default row split / stack is exact; train at the ``max_sequence_length`` you generate with.

The model prepends 8 learned register tokens to the projected caption; ``taca.models.auraflow``
knows the text span ([8, 8 + L)) and hands the checkpointed blocks their ``attention_kwargs``
back (diffusers 0.42.1 drops them under gradient checkpointing) whenever TACA is on.
"""
from __future__ import annotations

import torch

from . import _DiffusersFamily, _vae_latents

# every attention of the model is joint: the MMDiT blocks' (image and context projections) and the
# single-DiT blocks' (over [registers, text, image]); PEFT matches these as ".<name>" suffixes
_ATTN = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
         "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
_FF = [f"{ff}.{lin}" for ff in ("ff", "ff_context") for lin in ("linear_1", "linear_2", "out_projection")]


class AuraFlowFamily(_DiffusersFamily):
    name = "auraflow"
    _text_attrs = ("text_encoder",)
    attn_targets = tuple(_ATTN)
    ff_targets = tuple(_FF)

    def encode_text(self, captions, device, max_sequence_length):
        kw = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        with torch.no_grad():
            pe = self.pipe.encode_prompt(prompt=list(captions), do_classifier_free_guidance=False, device=device,
                                         **kw)[0]
        return {"prompt_embeds": pe}

    def encode_images(self, pixels):
        # the pipeline decodes latents / scaling_factor: no shift, whatever the VAE config says
        with torch.no_grad():
            return _vae_latents(self.vae(), pixels, shift=False)

    def predict(self, transformer, noisy, sigma, cond, guidance):
        timestep = sigma.to(device=noisy.device, dtype=noisy.dtype)
        return transformer(noisy, encoder_hidden_states=cond["prompt_embeds"], timestep=timestep,
                           return_dict=False)[0]

    def lora_saver(self):
        from diffusers import AuraFlowPipeline

        return AuraFlowPipeline
