"""The miniature's model: a small FLUX transformer in pixel space and a small T5 text encoder.

- Transformer: diffusers' own ``FluxTransformer2DModel`` (``MINI_TRANSFORMER_CONFIG``: width 128,
  2 heads of 64, 4 double-stream + 4 single-stream blocks), so ``taca.enable`` reaches it through
  the same processors as FLUX.1. No VAE: a 32x32 RGB image in [-1, 1] is the latent
  (B, 3, 32, 32); it is packed 2x2 as FluxPipeline packs latents, 256 image tokens of 12 channels.
- Text: a word-level tokenizer over the grammar's closed vocabulary (a ``tokenizers`` WordLevel
  model in a transformers fast tokenizer, saved with the pipeline) and a small
  ``T5EncoderModel`` (width 128, 2 layers), trained from scratch with the transformer. Captions
  are padded to ``TEXT_LEN`` = 12 tokens; as in FLUX, the transformer sees the pad positions
  (unmasked) as text. Pooled embedding: mean over the caption's real tokens (zeros for "").
- ``MiniPipeline``: a ``DiffusionPipeline`` (``save_pretrained`` / ``from_pretrained`` on a local
  folder) with flow-matching Euler sampling and optional classifier-free guidance (the empty
  caption is the unconditional one; pretraining drops captions at random for it).

The trainer contract (duck-typed, used by ``taca train``): ``encode_text(captions)`` -> dict of
(B, ...) tensors, ``encode_images(pixels)`` -> latents, ``predict(noisy, sigma, cond)`` -> the
flow-matching output (target noise - x0), one transformer call with ``timestep=sigma`` in [0, 1]
as FluxPipeline passes it. ``__call__`` goes through ``predict`` too.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from . import data as D

MINI_TRANSFORMER_CONFIG: Dict[str, Any] = dict(
    patch_size=1, in_channels=12, out_channels=None, num_layers=4, num_single_layers=4,
    attention_head_dim=64, num_attention_heads=2, joint_attention_dim=128, pooled_projection_dim=128,
    guidance_embeds=False, axes_dims_rope=(16, 24, 24),
)
MINI_TEXT_CONFIG: Dict[str, Any] = dict(
    vocab_size=len(D.VOCAB), d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
    relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
    feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    tie_word_embeddings=False,
)
# For tests: the same architecture, much smaller.
TINY_TRANSFORMER_CONFIG: Dict[str, Any] = dict(
    MINI_TRANSFORMER_CONFIG, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
)
TINY_TEXT_CONFIG: Dict[str, Any] = dict(MINI_TEXT_CONFIG, d_model=32, d_kv=8, d_ff=64, num_layers=1)
# FlowMatchEulerDiscreteScheduler: SD3's static shift 3, so the paper's window sigma >= 0.97
# covers the first 3 of 28 steps (as on FLUX.1-dev at 1024^2).
MINI_SCHEDULER_CONFIG: Dict[str, Any] = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


def make_tokenizer():
    """The word-level tokenizer over ``taca.mini.data.VOCAB`` (a transformers fast tokenizer;
    pads to ``TEXT_LEN``; unknown words map to ``<unk>``)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.normalizers import Lowercase
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(WordLevel({w: i for i, w in enumerate(D.VOCAB)}, unk_token=D.UNK))
    tk.normalizer = Lowercase()
    tk.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token=D.PAD, unk_token=D.UNK, model_max_length=D.TEXT_LEN)


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C), FluxPipeline's 2x2 packing (channel-major per patch)."""
    B, C, H, W = x.shape
    if H % 2 or W % 2:
        raise ValueError(f"taca.mini: latents height and width must be even, got {H}x{W}")
    return x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // 2) * (W // 2), C * 4)


def unpack(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H/2 * W/2, 4C) -> (B, C, H, W), the inverse of ``pack``."""
    B, N, C4 = x.shape
    if N != (height // 2) * (width // 2):
        raise ValueError(f"taca.mini: {N} tokens do not make a {height}x{width} image")
    return x.view(B, height // 2, width // 2, C4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C4 // 4, height, width)


def image_ids(height: int, width: int, device=None) -> torch.Tensor:
    """(H/2 * W/2, 3) position ids (0, row, col) of the packed image tokens, as FluxPipeline."""
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(h * w, 3)


def __getattr__(name):
    # MiniPipeline subclasses diffusers' DiffusionPipeline: build the class on first access so
    # importing this module does not import diffusers.
    if name == "MiniPipeline":
        cls = _make_pipeline_class()
        globals()["MiniPipeline"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _make_pipeline_class():
    from diffusers import DiffusionPipeline
    from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
    from diffusers.utils.torch_utils import randn_tensor

    class MiniPipeline(DiffusionPipeline):
        """Text-to-image for the miniature (see the module docstring).

        Components: ``transformer`` (FluxTransformer2DModel), ``text_encoder`` (T5EncoderModel),
        ``tokenizer`` (word-level fast tokenizer), ``scheduler`` (FlowMatchEulerDiscreteScheduler).
        """

        model_cpu_offload_seq = "text_encoder->transformer"

        def __init__(self, transformer, text_encoder, tokenizer, scheduler):
            super().__init__()
            self.register_modules(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer,
                                  scheduler=scheduler)

        @property
        def text_len(self) -> int:
            return int(self.tokenizer.model_max_length)

        def tokenize(self, captions: Sequence[str], device=None) -> Dict[str, torch.Tensor]:
            """captions (B) -> {"input_ids", "attention_mask"}: (B, text_len) long."""
            if isinstance(captions, str):
                captions = [captions]
            out = self.tokenizer(list(captions), padding="max_length", max_length=self.text_len, truncation=True,
                                 return_tensors="pt")
            dev = device if device is not None else self.text_encoder.device
            return {"input_ids": out["input_ids"].to(dev), "attention_mask": out["attention_mask"].to(dev)}

        def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Dict[str, torch.Tensor]:
            """Token ids (B, L) and mask (B, L) -> {"prompt_embeds": (B, L, D), "pooled_prompt_embeds": (B, D)}.
            Differentiable (pretraining trains the text encoder through it)."""
            h = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.to(h.dtype)[..., None]
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)
            return {"prompt_embeds": h, "pooled_prompt_embeds": pooled}

        def encode_text(self, captions: List[str]) -> Dict[str, torch.Tensor]:
            """captions (B) -> {"prompt_embeds": (B, L, D), "pooled_prompt_embeds": (B, D)} on the
            text encoder's device, batch dim first (the trainer caches and stacks them)."""
            if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
                raise TypeError("taca.mini: captions must be a list of str")
            return self.encode_tokens(**self.tokenize(captions))

        def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
            """pixels (B, 3, H, W) float in [-1, 1] -> latents (B, 3, H, W): pixel space, identity."""
            if pixels.dim() != 4 or pixels.shape[1] != 3:
                raise ValueError(f"taca.mini: pixels must be (B, 3, H, W), got {tuple(pixels.shape)}")
            return pixels.to(self.transformer.dtype)

        def predict(self, noisy_latents: torch.Tensor, sigma: torch.Tensor, cond: Dict[str, torch.Tensor]) -> torch.Tensor:
            """One transformer call. noisy_latents (B, 3, H, W) = (1 - sigma) x0 + sigma noise,
            sigma (B,) in [0, 1] (passed as ``timestep``, FLUX's convention), cond from
            ``encode_text``. Returns (B, 3, H, W), the prediction of noise - x0."""
            B, _, H, W = noisy_latents.shape
            pe = cond["prompt_embeds"]
            if pe.shape[0] != B:
                raise ValueError(f"taca.mini: cond has batch {pe.shape[0]}, noisy_latents {B}")
            sigma = torch.as_tensor(sigma, device=noisy_latents.device)
            if sigma.dim() == 0:
                sigma = sigma.expand(B)
            dtype = self.transformer.dtype
            out = self.transformer(
                hidden_states=pack(noisy_latents).to(dtype),
                timestep=sigma.to(dtype),
                encoder_hidden_states=pe.to(dtype),
                pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
                txt_ids=torch.zeros(pe.shape[1], 3, device=pe.device),
                img_ids=image_ids(H, W, noisy_latents.device),
                return_dict=False,
            )[0]
            return unpack(out, H, W)

        def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: Optional[str] = None,
                              **kwargs) -> None:
            """Load a diffusers-format LoRA (keys ``transformer.*``) into the transformer, as
            ``FluxPipeline.load_lora_weights`` does for the transformer part (a text-encoder part,
            if any, is not loaded: the miniature's LoRAs train the transformer only)."""
            self.transformer.load_lora_adapter(pretrained_model_name_or_path_or_dict, prefix="transformer",
                                               adapter_name=adapter_name, **kwargs)

        @torch.no_grad()
        def __call__(
            self,
            prompt: Union[str, List[str]],
            num_inference_steps: int = 28,
            guidance_scale: float = 1.0,
            generator: Union[None, torch.Generator, List[torch.Generator]] = None,
            height: int = D.IMAGE_SIZE,
            width: int = D.IMAGE_SIZE,
            latents: Optional[torch.Tensor] = None,
            output_type: str = "pil",
            return_dict: bool = True,
        ):
            """Generate images. prompt: a caption or B captions. guidance_scale > 1: classifier-free
            guidance against the empty caption (2B rows per transformer call). generator: one, or a
            list of B (per-image seeds). latents: optional initial noise (B, 3, H, W).
            output_type: "pil" (list of PIL images), "pt" ((B, 3, H, W) float in [0, 1], diffusers'
            convention), "np" ((B, H, W, 3) in [0, 1]) or "latent" ((B, 3, H, W) in [-1, 1]).
            Returns ``ImagePipelineOutput(images=...)`` or a tuple (images,)."""
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if not prompts:
                raise ValueError("taca.mini: prompt is empty")
            if num_inference_steps < 1:
                raise ValueError(f"taca.mini: num_inference_steps={num_inference_steps} must be >= 1")
            if output_type not in ("pil", "pt", "np", "latent"):
                raise ValueError(f"taca.mini: output_type={output_type!r} is not one of 'pil', 'pt', 'np', 'latent'")
            if isinstance(generator, list) and len(generator) != len(prompts):
                raise ValueError(f"taca.mini: generator has {len(generator)} entries for {len(prompts)} prompts")
            B = len(prompts)
            dev = self._execution_device
            cfg = guidance_scale > 1.0
            cond = self.encode_text(prompts)
            if cfg:
                unc = self.encode_text([""] * B)
                cond = {k: torch.cat([cond[k], unc[k]]) for k in cond}
            if latents is None:
                latents = randn_tensor((B, 3, height, width), generator=generator, device=dev, dtype=torch.float32)
            latents = latents.to(dev, torch.float32)
            self.scheduler.set_timesteps(num_inference_steps, device=dev)
            sigmas = self.scheduler.sigmas
            for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
                x = torch.cat([latents, latents]) if cfg else latents
                v = self.predict(x, sigmas[i].expand(x.shape[0]).to(torch.float32), cond).float()
                if cfg:
                    vc, vu = v.chunk(2)
                    v = vu + guidance_scale * (vc - vu)
                latents = self.scheduler.step(v, t, latents, return_dict=False)[0]
            images = latents.clamp(-1, 1)
            if output_type == "latent":
                out = images
            else:
                images01 = (images + 1) / 2
                if output_type == "pt":
                    out = images01
                else:
                    arr = images01.permute(0, 2, 3, 1).cpu().numpy()
                    out = arr if output_type == "np" else self.numpy_to_pil(arr)
            self.maybe_free_model_hooks()
            return ImagePipelineOutput(images=out) if return_dict else (out,)

    MiniPipeline.__qualname__ = "MiniPipeline"
    return MiniPipeline


def build_pipeline(seed: int = 0, transformer_config: Optional[Dict[str, Any]] = None,
                   text_config: Optional[Dict[str, Any]] = None, dtype: torch.dtype = torch.float32):
    """A fresh ``MiniPipeline`` with random weights (``MINI_*_CONFIG`` unless configs are given;
    ``TINY_*_CONFIG`` for tests)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**(transformer_config or MINI_TRANSFORMER_CONFIG))
    text_encoder = T5EncoderModel(T5Config(**(text_config or MINI_TEXT_CONFIG)))
    if dtype != torch.float32:
        transformer, text_encoder = transformer.to(dtype), text_encoder.to(dtype)
    pipe = _make_or_get()(transformer=transformer, text_encoder=text_encoder, tokenizer=make_tokenizer(),
                          scheduler=FlowMatchEulerDiscreteScheduler(**MINI_SCHEDULER_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(path: str, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32):
    """``MiniPipeline.from_pretrained`` on a local folder, progress bars off, weights cast to ``dtype``."""
    pipe = _make_or_get().from_pretrained(path, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _make_or_get():
    return __getattr__("MiniPipeline") if "MiniPipeline" not in globals() else globals()["MiniPipeline"]


def count_parameters(pipe) -> Dict[str, int]:
    """Parameter counts {"transformer", "text_encoder", "total"}."""
    t = sum(p.numel() for p in pipe.transformer.parameters())
    e = sum(p.numel() for p in pipe.text_encoder.parameters())
    return {"transformer": t, "text_encoder": e, "total": t + e}
