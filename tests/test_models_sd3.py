"""SD3 / SD3.5 (SD3Transformer2DModel) with the taca.models.sd3 adapter: gradient checkpointing
keeps TACA's state (the tiny models of taca.tiny; the rest of SD3's coverage is in
test_pipeline.py and test_processors.py)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("diffusers")

from taca import tiny

from model_checks import check_checkpointing_keeps_state


def _inputs(B, L, hw, t=980.0, seed=1):
    """The transformer takes t = 1000 sigma."""
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(B, 4, *hw, generator=g), encoder_hidden_states=torch.randn(B, L, 32, generator=g),
                pooled_projections=torch.randn(B, 64, generator=g), timestep=torch.full((B,), t), return_dict=False)


@pytest.mark.parametrize("variant", ["sd3", "sd35m", "sd35l"])
def test_gradient_checkpointing_keeps_the_call_state(variant):
    """diffusers' checkpointed SD3 blocks get joint_attention_kwargs (TACA's state) like the plain
    ones, dual-attention (SD3.5-Medium) blocks included: output and gradients equal the plain
    forward's (SD3 has no attention mask)."""
    check_checkpointing_keeps_state(lambda: tiny.sd3_transformer(variant), _inputs(2, 7, (4, 4)))
