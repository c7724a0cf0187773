"""EasyAnimate (EasyAnimateTransformer3DModel) with the taca.models.easyanimate adapter, on tiny
random-weight models: [txt, video] (the prompt embedding, then the T5 one where the model has it),
MMDiT blocks with their own text projections and shared-projection blocks, video-only RoPE, no
attention kwargs (the hook hands the processors their state); in the window every joint call is the
paper's definition, outside it and at gamma = 1 the model is stock bit for bit at two resolutions;
the timestep is the flow scheduler's t = 1000 sigma."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("diffusers")

import taca

from model_checks import (CaptureSDPA, StockSDPACalls, check_disable_restores, check_spans_against_paper,
                          processors_of, span_mask)
from model_checks import check_checkpointing_keeps_state

TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, patch_size=2,
            sample_width=8, sample_height=8, num_layers=3, mmdit_layers=2, time_embed_dim=16, text_embed_dim=24)


def _transformer(t5):
    from diffusers import EasyAnimateTransformer3DModel

    torch.manual_seed(0)
    return EasyAnimateTransformer3DModel(**TINY, **(dict(text_embed_dim_t5=20) if t5 else {})).eval()


def _inputs(t, B, L, hw, frames=2, step=980, seed=1, L5=4):
    g = torch.Generator().manual_seed(seed)
    kw = dict(hidden_states=torch.randn(B, 4, frames, 2 * hw[0], 2 * hw[1], generator=g),
              timestep=torch.full((B,), float(step)), encoder_hidden_states=torch.randn(B, L, 24, generator=g),
              return_dict=False)
    if t.config.text_embed_dim_t5:
        kw["encoder_hidden_states_t5"] = torch.randn(B, L5, 20, generator=g)
    return kw


@pytest.mark.parametrize("B,L,hw,t5", [(2, 7, (3, 4), False), (1, 5, (2, 3), True)])
def test_joint_calls_are_the_paper_definition(monkeypatch, B, L, hw, t5):
    t = _transformer(t5)
    stock = StockSDPACalls(monkeypatch)
    with torch.no_grad():
        t(**_inputs(t, B, L, hw))
    monkeypatch.undo()
    cap = CaptureSDPA(monkeypatch, shadow=True)
    with taca.enabled(t, gamma=1.3) as h, torch.no_grad():
        t(**_inputs(t, B, L, hw))
        assert h.kind == "easyanimate" and len(h.processors) == TINY["num_layers"]
    assert len(cap.calls) == len(stock.calls) == TINY["num_layers"]
    text_len = L + (4 if t5 else 0)
    N = text_len + 2 * hw[0] * hw[1]
    for (q, k, v, _, _), (sq, sk, sv, smask, _) in zip(cap.calls, stock.calls):
        assert smask is None and torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv) and q.shape[2] == N
    text = span_mask(B, N, 0, text_len)
    check_spans_against_paper(cap.calls, text, ~text, torch.full((B,), 1.3), layout="bhnd")


@pytest.mark.parametrize("t5", [False, True])
@pytest.mark.parametrize("hw", [(3, 4), (2, 2)])
def test_outside_window_and_gamma_one_are_stock(hw, t5):
    t = _transformer(t5)
    before = processors_of(t)
    with torch.no_grad():
        ref_in = t(**_inputs(t, 2, 7, hw, step=980))[0]
        ref_out = t(**_inputs(t, 2, 7, hw, step=960))[0]
        h = taca.enable(t, gamma=1.3)
        assert {type(p).__name__ for p in h.processors.values()} == {"TacaEasyAnimateAttnProcessor"}
        assert torch.equal(t(**_inputs(t, 2, 7, hw, step=960))[0], ref_out) and h.last_gamma is None
        assert not torch.equal(t(**_inputs(t, 2, 7, hw, step=980))[0], ref_in)
        taca.enable(t, gamma=1.0, schedule="constant")
        assert torch.equal(t(**_inputs(t, 2, 7, hw, step=980))[0], ref_in)
        taca.disable(t)
    check_disable_restores(t, before)


def test_timestep_rule_is_t_over_1000():
    t = _transformer(False)
    with taca.enabled(t, gamma=1.3) as h, torch.no_grad():
        for step, on in ((1000.0, True), (970.0, True), (969.0, False), (500.0, False)):
            t(**_inputs(t, 1, 7, (2, 2), step=step))
            assert (h.last_gamma is not None) == on, step


@pytest.mark.parametrize("t5", [False, True])
def test_gradient_checkpointing_keeps_the_call_state(t5):
    """The forward carries no attention kwargs: the hook hands each call's state to the processors,
    and to the blocks recomputed in the backward pass through the checkpointing function, the T5
    text included (t = 1000 sigma; no attention mask)."""
    check_checkpointing_keeps_state(lambda: _transformer(t5), _inputs(_transformer(t5), 2, 7, (3, 4)))
