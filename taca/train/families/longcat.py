"""LongCat-Image (``LongCatImageTransformer2DModel``): text to image (``LongCatImagePipeline``) and
edits with one reference image (``LongCatImageEditPipeline``), for ``taca train``.

diffusers has no LoRA script for LongCat-Image; the conventions are the ones the 0.42.1 pipelines
(``pipelines/longcat_image/pipeline_longcat_image.py`` and ``pipeline_longcat_image_edit.py``)
apply at inference. The model is a FLUX.1 clone:

- latents: a FLUX.1-style ``AutoencoderKL``; both pipelines decode ``vae.decode(latents /
  scaling_factor + shift_factor)`` and the edit pipeline encodes its reference as ``(mode -
  shift_factor) * scaling_factor`` (``_encode_vae_image``, ``sample_mode="argmax"``), so the
  training latents are ``(mode - shift_factor) * scaling_factor`` (B, 16, h, w)
  (``_DiffusersFamily.encode_images``), packed 2x2 into tokens by the pipeline's own
  ``_pack_latents`` (FLUX.1's), the output unpacked by its inverse (``flux_latents``);
- position ids: NOT FLUX.1's. The pipelines build them with their ``prepare_pos_ids``, float32
  (never in the latents' dtype: bf16 cannot hold 512 + i exactly): text token i is (0, i, i); image
  token (r, c) of the latent grid / 2 is (1, S + r, S + c) where S is ``tokenizer_max_length`` (512)
  for text to image and the prompt embedding's length for edits (the vision tokens + 512); the
  edit's reference token (r, c) is (2, S + r, S + c) on the reference's own grid (the pipeline's
  reference is as large as its output), the reference ids in float64 as the pipeline builds them
  (the position embedding casts to float32 either way);
- ``timestep = sigma`` (float32): the pipelines pass ``t.expand(B).to(latents.dtype) / 1000`` with
  ``t = 1000 sigma``, the transformer casts to its dtype and multiplies by 1000. No guidance
  embedding (the transformer ignores ``guidance``; the pipelines pass None) and no pooled
  projection: ``--guidance`` is not used. The pipelines' guidance is true CFG (4.5 against the
  negative prompt, with optional CFG renorm); training fits the conditional prediction;
- the output is the velocity ``noise - x0`` as it is (``FlowMatchEulerDiscreteScheduler.step`` adds
  ``(sigma_next - sigma) * noise_pred``); for edits it is cut to the target's tokens, as the
  pipeline cuts ``noise_pred[:, :image_seq_len]``;
- sigmas: the pipelines pass ``linspace(1, 1 / n, n)`` and ``mu`` from the image's token count, so
  under dynamic shifting (LongCat-Image's scheduler, FLUX.1-dev's values) the sampled training
  sigmas are not shifted, as diffusers' FLUX script; ``shift()`` is the scheduler's static shift
  (``static_shift``): a scheduler without dynamic shifting ignores ``mu`` and shifts by ``shift``;
- text, text to image: the pipeline's own ``encode_prompt`` (Qwen2.5-VL: the caption's tokens
  (quoted text tokenized character by character) padded to a FIXED 512 tokens
  (``tokenizer_max_length``) between the chat template's prefix and suffix, the encoder run with
  that padding masked; the last hidden states without prefix and suffix: (512, D) per caption). The
  transformer takes no mask: the padding tokens' states are attended (and gamma scales them, as
  FLUX.1's T5 padding). A caption's row depends only on its own tokens (every row has the same
  length), so the cache holds that fixed-length embedding, split / stacked row by row. The
  pipelines take no ``max_sequence_length``; anything but None (or 512) is refused. The pipeline's
  prompt rewriting (``enable_prompt_rewrite=True`` by default: the VL model first rewrites the
  prompt) is not applied to the captions: generate with ``enable_prompt_rewrite=False`` to
  condition on the caption as trained;
- text, edits: ``LongCatImageEditPipeline.encode_prompt`` with the reference shown to Qwen2.5-VL, one
  caption at a time (the pipeline takes one prompt): the reference resized as ``__call__`` resizes
  it, to ``calculate_dimensions(1024 * 1024, aspect)`` then to half that (512 x 512 for a square),
  its image placeholders in the template; the embedding keeps the vision tokens
  (``<|vision_start|>`` ... ``<|vision_end|>``) before the caption's 512 padded tokens. The entry
  depends on the reference: the cache keys it by the reference too (``text_references``);
- references: one per sample, its latents (``encode_images`` at 1024 x 1024 by default: what the
  edit pipeline feeds its VAE for a square input, the size it also generates at; train at
  ``--resolution 1024`` to match its output) packed and appended after the target's tokens. The
  edit pipeline needs the reference (its template has an image placeholder).

LoRA targets are FLUX.1's: "attn" is the double-stream blocks' joint-attention projections (image
``to_q/k/v / to_out.0``, text ``add_q/k/v_proj / to_add_out``) and the single-stream blocks'
``to_q/k/v`` (their output is the fused ``proj_out``, left out as for FLUX.1); "attn+ff" adds the
double-stream blocks' ``ff`` / ``ff_context``.

Gradient checkpointing: the forward takes no attention kwargs; ``taca.enable``'s hook hands the
processors their state (``taca.models.longcat``), checkpointed blocks included.

Saving: the LongCat pipelines have no LoRA loader mixin in diffusers 0.42.1 (no
``save_lora_weights`` / ``load_lora_weights``). The adapter is written by
``FluxPipeline.save_lora_weights`` (keys ``transformer.<module>.lora_A/B.weight``, the PEFT config
as metadata), which ``pipe.transformer.load_lora_adapter(path, prefix="transformer")`` and
``taca.enable(pipe, lora=path)`` read; should diffusers give the pipeline its own
``save_lora_weights``, that one is used.
"""
from __future__ import annotations

import torch

from . import _DiffusersFamily, flux_latents, saver_or_flux

_T2I, _EDIT = "LongCatImagePipeline", "LongCatImageEditPipeline"
_TOKENIZER_MAX_LENGTH = 512  # the pipelines' tokenizer_max_length: every caption padded to it
_EDIT_AREA = 1024 * 1024  # LongCatImageEditPipeline.__call__: calculate_dimensions(1024 * 1024, aspect)


def _pos_ids(modality, kind, start, **kw):
    """The pipelines' own ``prepare_pos_ids`` (float32)."""
    from diffusers.pipelines.longcat_image.pipeline_longcat_image import prepare_pos_ids

    return prepare_pos_ids(modality_id=modality, type=kind, start=(start, start), **kw)


def _edit_size(width: int, height: int):
    """(width, height) the edit pipeline resizes an input of this size to (its ``calculate_dimensions``)."""
    from diffusers.pipelines.longcat_image import pipeline_longcat_image_edit as edit

    return edit.calculate_dimensions(_EDIT_AREA, width * 1.0 / height)


def _pack(x: torch.Tensor, label: str) -> torch.Tensor:
    from diffusers import LongCatImagePipeline

    B, C, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"taca train: LongCat-Image {label} must have even height and width, got {h}x{w}")
    return LongCatImagePipeline._pack_latents(x, B, C, h, w)


class LongCatImageFamily(_DiffusersFamily):
    name = "longcat"
    _text_attrs = ("text_encoder",)

    def __init__(self, pipe):
        cls = type(pipe).__name__
        if cls not in (_T2I, _EDIT):
            raise ValueError(f"taca train: {cls} is not a pipeline taca train knows the conditioning of; LongCat-Image "
                             f"trains text to image ({_T2I}) or edits ({_EDIT})")
        super().__init__(pipe)
        self._edit = cls == _EDIT
        # the image ids' offset of text to image (the pipeline's prepare_latents), kept for predict,
        # which runs after release_encoders
        self._text_len = int(getattr(pipe, "tokenizer_max_length", _TOKENIZER_MAX_LENGTH))

    # --- reference images -------------------------------------------------------------------
    @classmethod
    def references_for(cls, pipeline_class):
        return 1 if pipeline_class == _EDIT else 0

    @classmethod
    def references_needed(cls, pipeline_class):
        return 1 if pipeline_class == _EDIT else 0

    def reference_resolution(self, resolution):
        return _edit_size(1, 1)[0] if self._edit else resolution

    def text_references(self):
        return self._edit

    # --- caching ----------------------------------------------------------------------------
    def _check_length(self, max_sequence_length):
        from ..config import ConfigError

        if max_sequence_length is not None and max_sequence_length != self._text_len:
            raise ConfigError(f"taca train: argument --max-sequence-length: LongCat-Image pipelines pad every prompt "
                              f"to {self._text_len} tokens themselves and take no max_sequence_length; leave it out")

    def encode_text(self, captions, device, max_sequence_length, references=None):
        self._check_length(max_sequence_length)
        pipe = self.pipe
        missing = [a for a in ("text_encoder", "tokenizer") if getattr(pipe, a, None) is None]
        if missing:
            raise ValueError(f"taca train: the LongCat-Image pipeline has no {' / '.join(missing)} to encode the "
                             f"captions with")
        if self._edit:
            return self._encode_edit(captions, device, references)
        with torch.no_grad():
            pe, _ = pipe.encode_prompt(prompt=list(captions))
        return {"prompt_embeds": pe.to(device)}

    def _encode_edit(self, captions, device, references):
        """Each caption with its reference shown to Qwen2.5-VL as ``LongCatImageEditPipeline.__call__``
        shows it: resized to the pipeline's size for its aspect ratio, then to half that."""
        if references is None or len(references) != len(captions) or any(len(r) != 1 for r in references):
            raise ValueError(f"taca train: {_EDIT} encodes each caption with its one reference image")
        pipe = self.pipe
        embeds = []
        with torch.no_grad():
            for caption, (im,) in zip(captions, references):
                w, h = _edit_size(*im.size)
                im = pipe.image_processor.resize(im, h, w)
                shown = pipe.image_processor.resize(im, h // 2, w // 2)
                pe, _ = pipe.encode_prompt(prompt=[caption], image=shown)
                embeds.append(pe[0].to(device))
        return {"prompt_embeds": self._stack(embeds)}

    @staticmethod
    def _stack(embeds):
        n = {int(e.shape[0]) for e in embeds}
        if len(n) > 1:
            # no mask reaches the transformer and the ids follow the text: one length per batch
            raise ValueError(f"taca train: LongCat-Image-Edit prompt embeddings of one batch must have one length (the "
                             f"references' vision tokens differ: {sorted(n)}); give all references one size")
        return torch.stack(list(embeds))

    def collate(self, entries):
        out = {k: torch.stack([e[k] for e in entries]) for k in entries[0] if k != "prompt_embeds"}
        out["prompt_embeds"] = self._stack([e["prompt_embeds"] for e in entries])
        return out

    # --- training forward -------------------------------------------------------------------
    def predict(self, transformer, noisy, sigma, cond, guidance):
        pe = cond["prompt_embeds"]
        if noisy.dim() != 4:
            raise ValueError(f"taca train: LongCat-Image latents must be (B, C, h, w), got {tuple(noisy.shape)}")
        B, _, h, w = noisy.shape
        if pe.dim() != 3 or pe.shape[0] != B:
            raise ValueError(f"taca train: LongCat-Image prompt_embeds must be (B, L, D) for the latents' batch of "
                             f"{B}, got {tuple(pe.shape)}")
        dev, L = noisy.device, int(pe.shape[1])
        packed = _pack(noisy, "latents")
        n = packed.shape[1]
        # text to image: the image ids start at tokenizer_max_length (prepare_latents); edits: at the
        # prompt embedding's length (vision tokens + 512)
        start = L if self._edit else self._text_len
        txt_ids = _pos_ids(0, "text", 0, num_token=L).to(dev)
        img_ids = _pos_ids(1, "image", start, height=h // 2, width=w // 2).to(dev)
        refs = cond.get("reference_latents")
        if self._edit:
            if refs is None or refs.dim() != 5 or refs.shape[:2] != (B, 1):
                raise ValueError(f"taca train: {_EDIT} takes one reference latent per sample, (B, 1, C, h, w); got "
                                 f"{None if refs is None else tuple(refs.shape)}")
            ref = refs[:, 0].to(packed.dtype)
            hr, wr = ref.shape[-2:]
            packed = torch.cat([packed, _pack(ref, "reference latents")], 1)
            ref_ids = _pos_ids(2, "image", L, height=hr // 2, width=wr // 2).to(dev, dtype=torch.float64)
            img_ids = torch.cat([img_ids, ref_ids], 0)  # float64, as the pipeline's
        elif refs is not None:
            raise ValueError(f"taca train: {_T2I} takes no reference images")
        out = transformer(hidden_states=packed, timestep=sigma, guidance=None, encoder_hidden_states=pe,
                          txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return flux_latents(out[:, :n], noisy.shape)

    def lora_saver(self):
        return saver_or_flux("LongCatImagePipeline")  # no LoRA loader in diffusers 0.42.1
