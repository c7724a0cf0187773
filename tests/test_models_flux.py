"""FLUX.1 (FluxTransformer2DModel) with the taca.models.flux adapter: gradient checkpointing keeps
TACA's state (the tiny model of taca.tiny; the rest of FLUX.1's coverage is in test_pipeline.py
and test_processors.py)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("diffusers")

from taca import tiny

from model_checks import check_checkpointing_keeps_state


def _inputs(B, L, n, sigma=0.98, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(B, n, 4, generator=g), encoder_hidden_states=torch.randn(B, L, 32, generator=g),
                pooled_projections=torch.randn(B, 32, generator=g), timestep=torch.full((B,), sigma),
                img_ids=torch.rand(n, 3, generator=g), txt_ids=torch.zeros(L, 3), return_dict=False)


def test_gradient_checkpointing_keeps_the_call_state():
    """diffusers' checkpointed FLUX blocks get joint_attention_kwargs (TACA's state) like the plain
    ones: output and gradients equal the plain forward's (FLUX.1 has no attention mask)."""
    check_checkpointing_keeps_state(tiny.flux_transformer, _inputs(2, 5, 16))
