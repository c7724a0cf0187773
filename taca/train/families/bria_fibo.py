"""Bria FIBO (``BriaFiboTransformer2DModel``, ``BriaFiboPipeline``) for ``taca train``.

diffusers has no LoRA script for FIBO; the conventions are the ones ``BriaFiboPipeline`` (diffusers
0.42.1, ``pipelines/bria_fibo/pipeline_bria_fibo.py``; lines below are that file's) applies at
inference. Captions are FIBO's structured JSON prompts, given as the caption string as they are
(the pipeline tokenizes the string it is given; nothing parses the JSON).

- latents: the pipeline decodes ``vae.decode(latents / (1 / latents_std) + latents_mean)`` per
  channel on one frame (l. 722-734; FIBO's VAE is ``AutoencoderKLWan``, the Wan 2.2 one), so the
  training latents are the posterior mode normalized per channel, ``(mode - latents_mean) *
  (1 / latents_std)`` (``qwen_vae_latents``), with the frame axis dropped: (B, C, h, w). The grid is
  ``H // 16`` x ``W // 16``: ``vae_scale_factor`` is hard-coded 16 (l. 110, ``prepare_latents``
  l. 409-410); a VAE with another spatial factor is refused (the pipeline could not decode it);
- packing and ids: without ``do_patching`` (``__call__``'s default, l. 465; FIBO's transformer has
  ``in_channels`` = the VAE's ``z_dim``) every latent pixel is a token (``_pack_latents_no_patch``,
  l. 383-386, row-major) with image ids (0, i, j) over the latent grid
  (``_prepare_latent_image_ids``, l. 355-367, batch dimension dropped at l. 650-651) in the
  embeddings' dtype (``prepare_latents`` gets ``prompt_embeds.dtype``, l. 590-600), and the output
  is unpacked by ``_unpack_latents_no_patch`` (l. 370-380). A transformer with ``in_channels`` =
  4 x the latent channels is the ``do_patching=True`` layout (2x2 FLUX packing and ids over the
  half grid, l. 425-427): that one is trained so; anything else is refused;
- text ids: zeros (L, 3) in the text encoder's dtype (``encode_prompt`` l. 309, first row taken at
  l. 653-654), whatever the model's dtype;
- timestep: the scheduler's ``t`` (``sigmas * 1000`` in float32, ``FlowMatchEulerDiscreteScheduler
  .set_timesteps``) cast to the latents' dtype (``t.expand(B).to(latent dtype)``, l. 666-668);
  ``predict`` computes ``sigma * 1000`` in float32 and casts it to the latents' dtype (in bf16 the
  pipeline's t is rounded too, and TACA's window reads that rounded t: the same in both). The
  transformer embeds it unscaled. Another ``num_train_timesteps`` or ``invert_sigmas`` is refused;
- no guidance embedding: the pipeline passes none (l. 671-680); its guidance is true CFG
  (``guidance_scale`` 5, a [negative, positive] batch, l. 567-572 and 683-685, the negative prompt
  "" by default, l. 251-255); training fits the conditional prediction, as diffusers' LoRA scripts
  do; ``--guidance`` is not used;
- output: the velocity ``noise - x0`` as it is (``scheduler.step`` adds ``(sigma_next - sigma) *
  noise_pred``, l. 689): not negated;
- sigmas / shift: the pipeline always passes ``linspace(1, 1 / n, n)`` and ``mu`` from the image
  token count (l. 620-644). With ``use_dynamic_shifting`` (FIBO's scheduler, FLUX.1-dev's values)
  ``set_timesteps`` shifts them by ``mu``, which training does not do (as diffusers' FLUX script);
  with a static-shift scheduler ``set_timesteps`` shifts them by ``shift`` and training does too
  (``static_shift``). Only ``FlowMatchEulerDiscreteScheduler`` is trained (the pipeline's type hint
  allows Karras schedulers, whose ``set_timesteps`` takes no sigmas / mu, l. 637-644);
- text: ``get_prompt_embeds`` (l. 114-172) tokenizes with ``padding="longest"``, truncation at
  ``max_sequence_length``, special tokens added (an empty prompt is the single token 128000 with
  mask 1, l. 130-154), runs the causal text encoder (SmolLM3) with ``output_hidden_states``:
  ``prompt_embeds = cat(hidden[-1], hidden[-2])`` and EVERY hidden state kept as the per-block
  ``text_encoder_layers``, all cast to the transformer's dtype (l. 248-249); ``__call__`` keeps the
  last (double + single blocks) of them, or repeats the last one when there are fewer (l. 574-582).
  Padded tokens are masked: when anything is padded the pipeline passes a bool key mask (B, 1, 1,
  L_txt + L_img) through ``joint_attention_kwargs["attention_mask"]``, else none (l. 602-616; its
  ``joint_attention_kwargs`` is then ``{}``, l. 610-611); its own CFG padding is zeros in the
  embeddings and layers (``pad_embedding``, l. 174-199, 286-301). Here each caption is encoded
  ALONE (by the pipeline's ``get_prompt_embeds``: no padding, no mask), so its cache entry is its
  own tokens only and cannot depend on its batch (nor on the tokenizer's padding side); the entry
  is ``text_layers`` (L, K, D): the K last hidden states in the transformer's dtype, K =
  max(blocks, 2) or all of them when fewer (what the model reads: ``prompt_embeds`` is rebuilt as
  ``cat(layers[-1], layers[-2])``, bit for bit the pipeline's since casting commutes with
  ``cat``). A batch is zero-padded to its longest caption as ``pad_embedding`` pads, with the
  pipeline's bool key mask when a caption is padded: real tokens see only real keys, as in the
  pipeline, so a prediction does not depend on the batch (to float rounding).
  ``--max-sequence-length``: None is ``__call__``'s default (3000, a truncation limit, not a
  padded length); more than 3000 is refused (``check_inputs``, l. 768-769). The cache is large:
  K hidden states per token (a 1000-token JSON prompt with SmolLM3-3B's 37 x 2048: ~150 MB in bf16).

LoRA targets are FLUX.1's: "attn" is the double-stream blocks' ``BriaFiboAttention`` projections
(``to_q/k/v / to_out.0``, ``add_q/k/v_proj / to_add_out``) and the single-stream blocks'
``to_q/k/v``; "attn+ff" adds the double-stream blocks' ``ff`` / ``ff_context``. The per-block
``caption_projection`` layers are not trained.

Gradient checkpointing: the checkpointed blocks get ``joint_attention_kwargs`` (TACA's state and
the key mask) like the plain ones (``taca.models.bria``); nothing to fix here.

Saving: ``BriaFiboPipeline`` has ``FluxLoraLoaderMixin`` (``save_lora_weights`` /
``load_lora_weights``); the adapter is written by it and loads with ``pipe.load_lora_weights`` or
``taca.enable(pipe, lora=...)``.

``BriaFiboEditPipeline`` is refused: its reference image goes in after a mask is pasted on it in
grey (``paste_mask_on_image``), at the pipeline's own resize, and its prompt must be an edit JSON
(``edit_instruction``): the reference-image API (reference latents of the reference image as it
is) would not train what the pipeline runs.
"""
from __future__ import annotations

import torch

from . import (_DiffusersFamily, _unwrap, check_flow_scheduler, check_text_parts, check_tokens_and_text,
               fixed_text_length, pad_collate, qwen_vae_latents, split_by_mask)

_MAX_SEQUENCE_LENGTH = 3000  # BriaFiboPipeline.check_inputs refuses more (l. 768-769)
_T_SCALE = 1000  # the adapter's "t1000" timestep convention
_VAE_SCALE = 16  # BriaFiboPipeline.vae_scale_factor (l. 110)
_EDIT = "BriaFiboEditPipeline"
_EDIT_WHY = (f"taca train: {_EDIT} is not trained: it pastes the edit mask onto the reference image and "
             f"resizes it itself, and takes edit JSON prompts (edit_instruction), which taca train's reference "
             f"images (latents of the image as it is) do not reproduce; train BriaFiboPipeline (text to image) "
             f"or run the edit pipeline through taca.enable")


def _n_blocks(transformer) -> int:
    t = _unwrap(transformer)
    return len(t.transformer_blocks) + len(t.single_transformer_blocks)


class BriaFiboFamily(_DiffusersFamily):
    name = "bria_fibo"
    _text_attrs = ("text_encoder",)
    text_mask = "prompt_mask"
    text_seq = ("text_layers",)

    @classmethod
    def check_config(cls, cfg, pipeline_class):
        if pipeline_class == _EDIT:
            from ..config import ConfigError

            raise ConfigError(f"taca train: argument --model: {_EDIT_WHY}")

    def __init__(self, pipe):
        if type(pipe).__name__ == _EDIT:
            raise ValueError(_EDIT_WHY)
        t = getattr(pipe, "transformer", None)
        tname = type(_unwrap(t)).__name__ if t is not None else None
        if tname is not None and tname != "BriaFiboTransformer2DModel":
            raise ValueError(f"taca train: the Bria FIBO family trains BriaFiboPipeline's BriaFiboTransformer2DModel, "
                             f"got {tname}")
        super().__init__(pipe)
        sch = getattr(pipe, "scheduler", None)
        check_flow_scheduler(sch, "Bria FIBO", "BriaFiboPipeline", not_flow=(
            f"taca train: this BriaFiboPipeline has a {type(sch).__name__}: taca train trains the flow-matching "
            f"velocity with FlowMatchEulerDiscreteScheduler (the pipeline passes sigmas and mu to set_timesteps, "
            f"which only flow-matching schedulers take)"))
        te = getattr(pipe, "text_encoder", None)
        # encode_prompt's text ids are in the text encoder's dtype (l. 309); None: the embeddings'
        self._txt_dtype = te.dtype if te is not None else None
        self._t_scale = float(_T_SCALE)

    def max_sequence_length(self, n) -> int:
        """``--max-sequence-length``: None -> the pipeline's default (3000, a truncation limit); at most 3000."""
        return fixed_text_length(n, self.pipe, _MAX_SEQUENCE_LENGTH, _MAX_SEQUENCE_LENGTH, "Bria FIBO")

    # --- caching ----------------------------------------------------------------------------
    def encode_images(self, pixels):
        vae = self.vae()
        if not hasattr(vae.config, "latents_mean") or not hasattr(vae.config, "z_dim"):
            raise ValueError(f"taca train: BriaFiboPipeline decodes with an AutoencoderKLWan (latents_mean / "
                             f"latents_std / z_dim), got {type(vae).__name__}")
        lat = qwen_vae_latents(vae, pixels)[:, :, 0]
        H, W = pixels.shape[-2:]
        if tuple(lat.shape[-2:]) != (H // _VAE_SCALE, W // _VAE_SCALE):
            raise ValueError(f"taca train: BriaFiboPipeline takes its latent grid as H // {_VAE_SCALE} x W // "
                             f"{_VAE_SCALE} (vae_scale_factor 16), but the VAE gives {tuple(lat.shape[-2:])} for "
                             f"{H}x{W} images")
        return lat

    def encode_text(self, captions, device, max_sequence_length):
        n = self.max_sequence_length(max_sequence_length)
        pipe = self.pipe
        check_text_parts(pipe, "Bria FIBO", ("text_encoder", "tokenizer", "transformer"))
        n_blocks = _n_blocks(pipe.transformer)
        dtype = pipe.transformer.dtype
        rows = []
        with torch.no_grad():
            for c in captions:  # each alone: no padding, its entry independent of the batch
                _, hidden, mask = pipe.get_prompt_embeds(prompt=[c], max_sequence_length=n, device=device)
                if not bool(mask.bool().all()):
                    raise ValueError("taca train: a caption encoded alone came back padded")
                k = min(len(hidden), max(n_blocks, 2))
                rows.append(torch.stack([h[0].to(dtype=dtype) for h in hidden[len(hidden) - k:]], dim=1))  # (L, K, D)
        return pad_collate([{"text_layers": r} for r in rows], self.text_mask, self.text_seq)

    def split_text(self, enc):
        return split_by_mask(enc, self.text_mask, self.text_seq)

    def collate(self, entries):
        return pad_collate(entries, self.text_mask, self.text_seq)

    # --- training forward -------------------------------------------------------------------
    def predict(self, transformer, noisy, sigma, cond, guidance):
        layers = cond["text_layers"]  # (B, L, K, D)
        if layers.dim() != 4:
            raise ValueError(f"taca train: Bria FIBO text_layers must be (B, L, K, D), got {tuple(layers.shape)}")
        pe = torch.cat([layers[:, :, -1], layers[:, :, -2]], dim=-1)  # get_prompt_embeds (l. 163)
        check_tokens_and_text(noisy, pe, "Bria FIBO")
        B, C, h, w = noisy.shape
        L, K = layers.shape[1], layers.shape[2]
        n_blocks = _n_blocks(transformer)
        # __call__ l. 574-582: the last n_blocks hidden states, or the last one repeated
        idx = list(range(K - n_blocks, K)) if K >= n_blocks else list(range(K)) + [K - 1] * (n_blocks - K)
        text_layers = [layers[:, :, i].contiguous() for i in idx]
        in_ch = _unwrap(transformer).config.in_channels
        from diffusers import BriaFiboPipeline

        if in_ch == C:  # do_patching=False
            tokens = BriaFiboPipeline._pack_latents_no_patch(noisy, B, C, h, w)
            img_ids = BriaFiboPipeline._prepare_latent_image_ids(B, h, w, noisy.device, pe.dtype)
        elif in_ch == 4 * C:  # do_patching=True
            if h % 2 or w % 2:
                raise ValueError(f"taca train: Bria FIBO latents must have even height and width, got {h}x{w}")
            tokens = BriaFiboPipeline._pack_latents(noisy, B, C, h, w)
            img_ids = BriaFiboPipeline._prepare_latent_image_ids(B, h // 2, w // 2, noisy.device, pe.dtype)
        else:
            raise ValueError(f"taca train: the Bria FIBO transformer takes {in_ch} channels, and the latents have {C} "
                             f"(neither the pipeline's unpatched nor its 2x2-patched layout)")
        txt_ids = torch.zeros(L, 3, device=noisy.device, dtype=self._txt_dtype or pe.dtype)
        kwargs = {}
        mask = cond.get(self.text_mask)
        if mask is not None and not bool(mask.all()):  # l. 602-616: a bool key mask only when something is padded
            full = torch.cat([mask.to(noisy.device).bool(),
                              torch.ones(B, tokens.shape[1], dtype=torch.bool, device=noisy.device)], dim=1)
            kwargs["attention_mask"] = full[:, None, None, :]
        timestep = (sigma.to(device=noisy.device, dtype=torch.float32) * self._t_scale).to(noisy.dtype)
        out = transformer(hidden_states=tokens, timestep=timestep, encoder_hidden_states=pe,
                          text_encoder_layers=text_layers, joint_attention_kwargs=kwargs, return_dict=False,
                          txt_ids=txt_ids, img_ids=img_ids)[0]
        if in_ch == C:
            return out.view(B, h, w, C).permute(0, 3, 1, 2)
        return out.view(B, h // 2, w // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, h, w)

    def lora_saver(self):
        from diffusers import BriaFiboPipeline

        return BriaFiboPipeline  # FluxLoraLoaderMixin's save_lora_weights
