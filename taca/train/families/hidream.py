"""HiDream-I1 (``HiDreamImageTransformer2DModel``, ``HiDreamImagePipeline``) for ``taca train``.

Conventions of diffusers' ``examples/dreambooth/train_dreambooth_lora_hidream.py`` and of
``HiDreamImagePipeline`` (diffusers 0.42.1):

- latents: the FLUX VAE's ``(vae(x) - shift_factor) * scaling_factor`` (the script; the pipeline
  decodes ``latents / scaling_factor + shift_factor``), handed to the transformer as (B, C, H, W):
  it patchifies them itself (square latents: no padding, no mask);
- ``timesteps = 1000 sigma`` (the script passes the scheduler's timesteps, the pipeline its raw
  ``t``), no guidance embedding;
- the output's sign: the model predicts ``x0 - noise`` (the script's ``model_pred * -1``, the
  pipeline's ``noise_pred = -noise_pred``), so ``predict`` negates it;
- text: ``encode_prompt`` pads T5 and Llama to ``max_sequence_length`` (128 by default) and passes
  no mask: CLIP-L and CLIP-G pooled projections concatenated (B, D), T5 (B, L, D) and the Llama
  hidden states of every layer stacked as (layers, B, L, D) -- the batch on dim 1, which
  ``split_text`` / ``collate`` respect. Fixed-length padding without a mask: a caption's entry
  does not depend on its batch;
- the static shift of the model's scheduler (I1-Full: UniPC with flow sigmas, ``flow_shift`` 3.0;
  FlowMatchEuler ``shift`` otherwise; 1 with dynamic shifting). The script instead always builds
  FlowMatchEuler with ``shift=3.0`` (the same for I1-Full and I1-Fast);
- "attn": every joint-attention projection, the image stream's and single blocks' ``to_q / to_k /
  to_v / to_out`` and the text stream's ``to_q_t / to_k_t / to_v_t / to_out_t`` (gamma scales the
  text keys); the script's default is the first four only (``--lora-targets to_k,to_q,to_v,to_out``
  reproduces it). "attn+ff" adds the SwiGLU feed-forwards (``w1, w2, w3``: the MoE's shared and
  routed experts, ``ff_t``).

Train mode: the script loads the transformer with ``force_inference_output=True``, which makes the
MoE run its ``@torch.no_grad`` inference routing (no gradient flows through the routed experts to
earlier blocks) so that the output comes back as (B, C, H, W). ``predict`` keeps the model as
loaded: in train mode the MoE runs its differentiable training routing and the transformer returns
(B, C, H/p * W/p, p * p), which ``predict`` folds back to (B, C, H, W).

Gradient checkpointing: the transformer's forward carries no attention kwargs to the processors
(the adapter's ``kwargs_name`` is None); ``taca.enable`` hands the blocks recomputed in the backward
pass the state of their call through the model's checkpointing function, so diffusers' own
checkpointing is used as it is.
"""
from __future__ import annotations

import torch

from . import _DiffusersFamily, _unwrap

_ATTN = ["to_q", "to_k", "to_v", "to_out", "to_q_t", "to_k_t", "to_v_t", "to_out_t"]
_FF = ["w1", "w2", "w3"]


class HiDreamFamily(_DiffusersFamily):
    name = "hidream"
    _text_attrs = ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4")
    attn_targets, ff_targets = _ATTN, _FF


    def encode_text(self, captions, device, max_sequence_length):
        kw = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        with torch.no_grad():
            t5, _, llama, _, pooled, _ = self.pipe.encode_prompt(prompt=list(captions), device=device,
                                                                do_classifier_free_guidance=False, **kw)
        return {"prompt_embeds_t5": t5, "prompt_embeds_llama3": llama, "pooled_prompt_embeds": pooled}

    def split_text(self, enc):
        n = enc["prompt_embeds_t5"].shape[0]
        return [{"prompt_embeds_t5": enc["prompt_embeds_t5"][j],
                 "prompt_embeds_llama3": enc["prompt_embeds_llama3"][:, j],  # (layers, L, D)
                 "pooled_prompt_embeds": enc["pooled_prompt_embeds"][j]} for j in range(n)]

    def collate(self, entries):
        return {"prompt_embeds_t5": torch.stack([e["prompt_embeds_t5"] for e in entries]),
                "prompt_embeds_llama3": torch.stack([e["prompt_embeds_llama3"] for e in entries], dim=1),
                "pooled_prompt_embeds": torch.stack([e["pooled_prompt_embeds"] for e in entries])}

    def predict(self, transformer, noisy, sigma, cond, guidance):
        inner = _unwrap(transformer)
        B, C, h, w = noisy.shape
        p = inner.config.patch_size
        if h % p or w % p:
            raise ValueError(f"taca train: HiDream latents must be multiples of the patch size {p}, got {h}x{w}")
        out = transformer(hidden_states=noisy, timesteps=sigma * 1000.0,
                          encoder_hidden_states_t5=cond["prompt_embeds_t5"],
                          encoder_hidden_states_llama3=cond["prompt_embeds_llama3"],
                          pooled_embeds=cond["pooled_prompt_embeds"], return_dict=False)[0]
        if inner.training and not inner.config.force_inference_output:
            # the training layout of unpatchify: (B, C, patches, p * p), patches row-major (padded
            # to max_seq for non-square latents) -> (B, C, h, w)
            ph, pw = h // p, w // p
            out = out[:, :, :ph * pw].reshape(B, C, ph, pw, p, p).permute(0, 1, 2, 4, 3, 5).reshape(B, C, h, w)
        return -out  # the model predicts x0 - noise

    def lora_saver(self):
        from diffusers import HiDreamImagePipeline

        return HiDreamImagePipeline

