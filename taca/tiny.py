"""Tiny, offline FLUX and SD3/SD3.5 pipelines with random weights (tests, demos, benchmarks).

Nothing here touches the network: models are built from configs, prompts are replaced by
random prompt embeddings (the pipelines accept ``prompt_embeds`` directly), and the VAE is
optional (without one, call the pipeline with ``output_type="latent"``).

Token counts: FLUX packs 2x2 latent patches and the pipeline uses a VAE scale of 8 without a
VAE (2**(len(block_out_channels)-1) with the tiny VAE here, i.e. 1), so image tokens are
``(H // 16) * (W // 16)`` without a VAE; SD3 has ``(H // 8) * (W // 8)`` tokens without a VAE
(patch size 1 here). Text tokens are whatever ``text_len`` you pass to the ``*_inputs`` helpers.

The scheduler builders return schedulers with the real FLUX.1-dev and SD3/SD3.5 configs, so
sigma schedules computed from them match the real models.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

# FLUX.1-dev scheduler/scheduler_config.json and SD3/SD3.5 scheduler_config.json.
FLUX_DEV_SCHEDULER_CONFIG: Dict[str, Any] = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
    base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
)
SD3_SCHEDULER_CONFIG: Dict[str, Any] = dict(num_train_timesteps=1000, shift=3.0)

# Tiny model configs (same shapes as diffusers' own pipeline tests, a few more heads/layers).
TINY_FLUX_CONFIG: Dict[str, Any] = dict(
    patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
)
TINY_SD3_CONFIG: Dict[str, Any] = dict(
    sample_size=32, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
    num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
    pooled_projection_dim=64, out_channels=4,
)
# SD3.5-Medium style (MMDiT-X): dual attention in the first layers, QK RMSNorm.
TINY_SD35M_CONFIG: Dict[str, Any] = dict(TINY_SD3_CONFIG, num_layers=3, dual_attention_layers=(0, 1), qk_norm="rms_norm")
# SD3.5-Large style: QK RMSNorm, no dual attention.
TINY_SD35L_CONFIG: Dict[str, Any] = dict(TINY_SD3_CONFIG, qk_norm="rms_norm")

_SD3_VARIANTS = {"sd3": TINY_SD3_CONFIG, "sd35m": TINY_SD35M_CONFIG, "sd35l": TINY_SD35L_CONFIG}


def flux_scheduler():
    """FlowMatchEulerDiscreteScheduler with FLUX.1-dev's config (dynamic shifting)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER_CONFIG)


def sd3_scheduler():
    """FlowMatchEulerDiscreteScheduler with SD3/SD3.5's config (static shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG)


def flux_transformer(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A tiny ``FluxTransformer2DModel`` with random weights (``TINY_FLUX_CONFIG`` + overrides)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return _cast(FluxTransformer2DModel(**{**TINY_FLUX_CONFIG, **overrides}), dtype).eval()


def sd3_transformer(variant: str = "sd3", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A tiny ``SD3Transformer2DModel``; variant "sd3", "sd35m" (dual attention + QK norm) or "sd35l"."""
    from diffusers import SD3Transformer2DModel

    if variant not in _SD3_VARIANTS:
        raise ValueError(f"taca: variant={variant!r} is not one of {tuple(_SD3_VARIANTS)}")
    torch.manual_seed(seed)
    return _cast(SD3Transformer2DModel(**{**_SD3_VARIANTS[variant], **overrides}), dtype).eval()


def _cast(model, dtype: torch.dtype):
    # Models are built in float32; .to() of a float32 model to float32 would only log a warning.
    return model if dtype == torch.float32 else model.to(dtype)


def _tiny_vae(latent_channels: int, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    ).eval()


def flux_pipeline(seed: int = 0, vae: bool = False, dtype: torch.dtype = torch.float32, **transformer_overrides):
    """A tiny ``FluxPipeline`` (no text encoders; pass ``flux_inputs(...)``).

    With ``vae=True`` a one-level tiny VAE decodes to RGB (then image tokens are (H//2)*(W//2),
    so keep H, W small, e.g. 16..32); otherwise use ``output_type="latent"``.
    """
    from diffusers import FluxPipeline

    t = flux_transformer(seed, dtype, **transformer_overrides)
    v = _cast(_tiny_vae(t.config.in_channels // 4, seed + 1), dtype) if vae else None
    pipe = FluxPipeline(
        scheduler=flux_scheduler(), vae=v, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, transformer=t,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_pipeline(variant: str = "sd3", seed: int = 0, vae: bool = False, dtype: torch.dtype = torch.float32,
                 **transformer_overrides):
    """A tiny ``StableDiffusion3Pipeline`` (no text encoders; pass ``sd3_inputs(...)``).

    variant: "sd3", "sd35m" (SD3.5-Medium style) or "sd35l". With ``vae=True`` a tiny VAE
    decodes to RGB (image tokens H*W then; keep H, W small); otherwise ``output_type="latent"``.
    """
    from diffusers import StableDiffusion3Pipeline

    t = sd3_transformer(variant, seed, dtype, **transformer_overrides)
    v = _cast(_tiny_vae(t.config.in_channels, seed + 1), dtype) if vae else None
    pipe = StableDiffusion3Pipeline(
        transformer=t, scheduler=sd3_scheduler(), vae=v, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_inputs(pipe, batch: int = 1, text_len: int = 12, height: int = 64, width: int = 64,
                num_inference_steps: int = 4, seed: int = 0, output_type: Optional[str] = None) -> Dict[str, Any]:
    """Keyword arguments for a tiny ``FluxPipeline`` call: random prompt embeddings
    (B, text_len, joint_attention_dim) and pooled (B, pooled_projection_dim), fixed generator."""
    cfg = pipe.transformer.config
    g = torch.Generator().manual_seed(seed)
    dtype = pipe.transformer.dtype
    return dict(
        prompt_embeds=torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g).to(dtype),
        pooled_prompt_embeds=torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(dtype),
        height=height, width=width, num_inference_steps=num_inference_steps,
        generator=torch.Generator().manual_seed(seed + 1),
        output_type=output_type or ("latent" if pipe.vae is None else "pt"),
    )


def sd3_inputs(pipe, batch: int = 1, text_len: int = 12, height: int = 32, width: int = 32,
               num_inference_steps: int = 4, guidance_scale: float = 5.0, seed: int = 0,
               output_type: Optional[str] = None) -> Dict[str, Any]:
    """Keyword arguments for a tiny ``StableDiffusion3Pipeline`` call, with negative embeddings
    so classifier-free guidance (batch 2B) works without text encoders."""
    cfg = pipe.transformer.config
    g = torch.Generator().manual_seed(seed)
    dtype = pipe.transformer.dtype

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    return dict(
        prompt_embeds=r(batch, text_len, cfg.joint_attention_dim),
        pooled_prompt_embeds=r(batch, cfg.pooled_projection_dim),
        negative_prompt_embeds=r(batch, text_len, cfg.joint_attention_dim),
        negative_pooled_prompt_embeds=r(batch, cfg.pooled_projection_dim),
        height=height, width=width, num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed + 1),
        output_type=output_type or ("latent" if pipe.vae is None else "pt"),
    )
