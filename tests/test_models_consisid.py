"""ConsisID (ConsisIDTransformer3DModel) with the taca.models.consisid adapter, on tiny random-weight
models: [txt, video] with the in-place video RoPE, CogVideoX's processor without attention kwargs (the
hook hands the processors their state), with and without the face path (perceiver cross-attentions
between blocks, left stock); in the window every joint call is the paper's definition, outside it and
at gamma = 1 the model is stock bit for bit; the DDPM timestep is translated as t >= 970."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("diffusers")

import taca

from model_checks import (CaptureSDPA, StockSDPACalls, check_disable_restores, check_spans_against_paper,
                          processors_of, span_mask)
from model_checks import check_checkpointing_keeps_state

TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
            text_embed_dim=24, num_layers=2, sample_width=8, sample_height=6, sample_frames=5, patch_size=2,
            temporal_compression_ratio=4, max_text_seq_length=7, use_rotary_positional_embeddings=True)
FACE = dict(is_train_face=True, cross_attn_interval=1, cross_attn_dim_head=8, cross_attn_num_heads=2,
            LFE_id_dim=12, LFE_vit_dim=16, LFE_depth=5, LFE_dim_head=8, LFE_num_heads=2, LFE_num_id_token=2,
            LFE_num_querie=4, LFE_output_dim=21, LFE_ff_mult=2, LFE_num_scale=5)  # kv dim: inner 32 * 2 / 3


def _transformer(face):
    from diffusers import ConsisIDTransformer3DModel

    torch.manual_seed(0)
    return ConsisIDTransformer3DModel(**TINY, **(FACE if face else {})).eval()


def _rope(hw, frames):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    grid = (hw[0], hw[1])
    return get_3d_rotary_pos_embed(embed_dim=16, crops_coords=((0, 0), grid), grid_size=grid,
                                   temporal_size=frames, device="cpu")


def _inputs(t, B, L, hw, frames=2, step=980, seed=1):
    """hw: video tokens per frame (latent size / 2)."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(hidden_states=torch.randn(B, frames, 4, 2 * hw[0], 2 * hw[1], generator=g),
              encoder_hidden_states=torch.randn(B, L, 24, generator=g), timestep=torch.full((B,), step),
              image_rotary_emb=_rope(hw, frames), return_dict=False)
    if t.config.is_train_face:
        kw["id_cond"] = torch.randn(B, 12, generator=g)
        kw["id_vit_hidden"] = [torch.randn(B, 6, 16, generator=g) for _ in range(5)]
    return kw


@pytest.mark.parametrize("B,L,hw,face", [(2, 7, (3, 4), True), (1, 5, (2, 3), False)])
def test_joint_calls_are_the_paper_definition(monkeypatch, B, L, hw, face):
    t = _transformer(face)
    stock = StockSDPACalls(monkeypatch)
    with torch.no_grad():
        t(**_inputs(t, B, L, hw))
    monkeypatch.undo()
    cap = CaptureSDPA(monkeypatch, shadow=True)
    with taca.enabled(t, gamma=1.3) as h, torch.no_grad():
        t(**_inputs(t, B, L, hw))
        assert h.kind == "consisid" and len(h.processors) == TINY["num_layers"]
    assert len(cap.calls) == len(stock.calls) == TINY["num_layers"]
    N = L + 2 * hw[0] * hw[1]
    for (q, k, v, _, _), (sq, sk, sv, smask, _) in zip(cap.calls, stock.calls):
        assert smask is None and torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv) and q.shape[2] == N
    text = span_mask(B, N, 0, L)
    check_spans_against_paper(cap.calls, text, ~text, torch.full((B,), 1.3), layout="bhnd")


@pytest.mark.parametrize("face", [True, False])
@pytest.mark.parametrize("hw", [(3, 4), (2, 2)])
def test_outside_window_and_gamma_one_are_stock(hw, face):
    t = _transformer(face)
    before = processors_of(t)
    with torch.no_grad():
        ref_in = t(**_inputs(t, 2, 7, hw, step=980))[0]
        ref_out = t(**_inputs(t, 2, 7, hw, step=960))[0]
        h = taca.enable(t, gamma=1.3)
        assert {type(p).__name__ for p in h.processors.values()} == {"TacaCogVideoXAttnProcessor"}
        assert torch.equal(t(**_inputs(t, 2, 7, hw, step=960))[0], ref_out) and h.last_gamma is None
        assert not torch.equal(t(**_inputs(t, 2, 7, hw, step=980))[0], ref_in)
        taca.enable(t, gamma=1.0, schedule="constant")
        assert torch.equal(t(**_inputs(t, 2, 7, hw, step=980))[0], ref_in)
        taca.disable(t)
    check_disable_restores(t, before)


def test_ddpm_timestep_rule_is_t_at_least_970():
    t = _transformer(False)
    with taca.enabled(t, gamma=1.3) as h, torch.no_grad():
        for step, on in ((999, True), (970, True), (969, False), (500, False)):
            t(**_inputs(t, 1, 7, (2, 2), step=step))
            assert (h.last_gamma is not None) == on, step


@pytest.mark.parametrize("face", [True, False])
def test_gradient_checkpointing_keeps_the_call_state(face):
    """The forward carries no attention kwargs: the hook hands each call's state to the processors,
    and to the blocks recomputed in the backward pass through the checkpointing function, the face
    adapter's local perceiver included (DDPM t = 980; no attention mask)."""
    check_checkpointing_keeps_state(lambda: _transformer(face), _inputs(_transformer(face), 2, 7, (3, 4)))
