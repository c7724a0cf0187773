"""PRX (PRXTransformer2DModel) with the taca.models.prx adapter, on tiny random-weight models: image
queries only, K / V = [txt, img] (N_q != N_k, text first among the keys), the stock bool key mask on
padded text kept; in the window every attention call is the paper's definition on the stock q, k, v,
outside it and at gamma = 1 the model is stock bit for bit (two resolutions, with and without a prompt
mask, text longer than the image); PRXPipeline with batched CFG and padded prompts."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("diffusers")

import taca

from model_checks import (Capture, StockCalls, check_disable_restores, check_spans_against_paper,
                          processors_of, ranges, span_mask, window)
from model_checks import check_checkpointing_keeps_state

TINY = dict(in_channels=4, patch_size=2, context_in_dim=24, hidden_size=32, num_heads=2, depth=2, axes_dim=[8, 8])
N_BLOCKS = TINY["depth"]


def _transformer():
    from diffusers import PRXTransformer2DModel

    torch.manual_seed(0)
    t = PRXTransformer2DModel(**TINY).eval()
    with torch.no_grad():  # PRX zero-initializes its modulation and output layers: the output would ignore attention
        for p in t.parameters():
            if not p.any():
                p.normal_(0.0, 0.3)
    return t


def _inputs(valid, L, hw, step=0.98, seed=1, mask=True):
    g = torch.Generator().manual_seed(seed)
    B = len(valid)
    d = dict(hidden_states=torch.randn(B, 4, *hw, generator=g), timestep=torch.full((B,), step),
             encoder_hidden_states=torch.randn(B, L, 24, generator=g), return_dict=False)
    if mask:
        d["attention_mask"] = torch.arange(L)[None, :] < torch.tensor(valid)[:, None]
    return d


def _stock_mask(valid, L, n_img):
    keep = torch.cat([torch.arange(L)[None, :] < torch.tensor(valid)[:, None],
                      torch.ones(len(valid), n_img, dtype=torch.bool)], dim=1)
    return keep[:, None, None, :]


# (valid, L, latent hw, mask): padded prompts, one with more text (20) than image tokens (6)
CASES = [([7, 4], 7, (6, 8), True), ([5], 5, (8, 8), False), ([20, 13], 20, (4, 6), True), ([7, 7], 7, (6, 4), False)]


@pytest.mark.parametrize("valid,L,hw,mask", CASES)
def test_attention_calls_are_the_paper_definition(monkeypatch, valid, L, hw, mask):
    import diffusers.models.transformers.transformer_prx as tm

    t = _transformer()
    stock = StockCalls(monkeypatch, tm)
    with torch.no_grad():
        t(**_inputs(valid, L, hw, mask=mask))
    monkeypatch.undo()
    cap = Capture(monkeypatch, shadow=True)
    with taca.enabled(t, gamma=1.3), torch.no_grad():
        t(**_inputs(valid, L, hw, mask=mask))
    assert len(stock.calls) == len(cap.calls) == N_BLOCKS
    n_img = (hw[0] // 2) * (hw[1] // 2)
    B = len(valid)
    m = _stock_mask(valid, L, n_img) if mask else None
    for (q, k, v, kw, _), (sq, sk, sv, smask) in zip(cap.calls, stock.calls):
        assert torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv)
        assert q.shape[1] == n_img and k.shape[1] == L + n_img  # image queries only
        assert kw["text_first"] is True and kw["text_len"] == L
        assert (smask is None) if m is None else torch.equal(smask, m)
    key_text = span_mask(B, L + n_img, 0, L)
    every_query_visual = torch.ones(B, n_img, dtype=torch.bool)
    check_spans_against_paper(cap.calls, key_text, every_query_visual, torch.full((B,), 1.3), masks=m)


@pytest.mark.parametrize("mask", [True, False])
@pytest.mark.parametrize("hw", [(6, 8), (8, 4)])
def test_outside_window_and_gamma_one_are_stock(hw, mask):
    valid, L = [7, 4], 7
    t = _transformer()
    before = processors_of(t)
    with torch.no_grad():
        ref_in = t(**_inputs(valid, L, hw, 0.98, mask=mask))[0]
        ref_out = t(**_inputs(valid, L, hw, 0.5, mask=mask))[0]
        h = taca.enable(t, gamma=1.3)
        assert h.kind == "prx" and len(h.processors) == N_BLOCKS
        assert torch.equal(t(**_inputs(valid, L, hw, 0.5, mask=mask))[0], ref_out) and h.last_gamma is None
        assert not torch.equal(t(**_inputs(valid, L, hw, 0.98, mask=mask))[0], ref_in)
        taca.enable(t, gamma=1.0, schedule="constant")
        assert torch.equal(t(**_inputs(valid, L, hw, 0.98, mask=mask))[0], ref_in)
        taca.disable(t)
    check_disable_restores(t, before)
    with torch.no_grad():
        assert torch.equal(t(**_inputs(valid, L, hw, 0.98, mask=mask))[0], ref_in)


def test_telemetry_refuses_image_only_queries():
    from taca import telemetry

    t = _transformer()
    with taca.enabled(t, gamma=1.3), telemetry.recording(lambda e: None), torch.no_grad():
        with pytest.raises(NotImplementedError, match="image tokens only"):
            t(**_inputs([7, 4], 7, (6, 8)))


SHIFT = 3.0


def _pipeline(shift=SHIFT):
    from diffusers import FlowMatchEulerDiscreteScheduler, PRXPipeline

    return PRXPipeline(transformer=_transformer(), scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
                       text_encoder=None, tokenizer=None, vae=None)


def _pipe_kwargs(hw, steps):
    """Batched CFG: prompt 9 tokens (6 valid), negative 9 tokens (2 valid)."""
    g = torch.Generator().manual_seed(0)
    return dict(prompt_embeds=torch.randn(1, 9, 24, generator=g), prompt_attention_mask=(torch.arange(9) < 6)[None],
                negative_prompt_embeds=torch.randn(1, 9, 24, generator=g),
                negative_prompt_attention_mask=(torch.arange(9) < 2)[None], guidance_scale=4.0,
                height=hw[0], width=hw[1], num_inference_steps=steps, output_type="latent",
                use_resolution_binning=False)


def test_pipeline_gamma_one_is_stock():
    pipe = _pipeline()
    kw = _pipe_kwargs((48, 64), 3)
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    with taca.enabled(pipe, gamma=1.0, schedule="constant"):
        assert torch.equal(pipe(generator=torch.Generator().manual_seed(1), **kw).images, stock)


@pytest.mark.parametrize("hw", [(48, 64), (64, 32)])
def test_pipeline_cfg_and_window(monkeypatch, hw):
    from taca.pipeline import get_handle

    pipe = _pipeline()
    steps = 6
    kw = _pipe_kwargs(hw, steps)
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    cap = Capture(monkeypatch)
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, k, o: seen.append(get_handle(m).last_gamma),
                                                  with_kwargs=True)
    with taca.enabled(pipe, gamma=1.3):
        out = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    hook.remove()
    on = window(_sigmas(steps))
    assert on and on != list(range(steps)) and len(seen) == steps
    assert [i for i in range(steps) if seen[i] is not None] == on
    assert len(cap.calls) == N_BLOCKS * len(on)
    n_img = (hw[0] // 8 // 2) * (hw[1] // 8 // 2)  # 8x latent (no VAE), patch 2
    key_text = span_mask(2, 9 + n_img, 0, 9)
    mask = _stock_mask([2, 6], 9, n_img)  # the pipeline batches [uncond, cond]
    check_spans_against_paper(cap.calls, key_text, torch.ones(2, n_img, dtype=torch.bool),
                              torch.full((2,), 1.3), masks=mask)
    assert not torch.equal(out, stock)


def _sigmas(steps, shift=SHIFT):
    """PRXPipeline: scheduler.set_timesteps(steps) (no mu: a static shift), the transformer gets t / 1000."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sch.set_timesteps(steps)
    return sch.timesteps / 1000


def prx_windows():
    # the PRX checkpoints' scheduler_config.json is NOT known here: FlowMatchEulerDiscreteScheduler without
    # dynamic shifting (the pipeline passes no mu), shift 1 and 3 shown
    return {shift: {steps: ranges(window(_sigmas(steps, shift))) for steps in (28, 50)} for shift in (1.0, 3.0)}


def test_window_steps_with_the_real_scheduler():
    assert prx_windows() == EXPECTED_WINDOWS


EXPECTED_WINDOWS = {1.0: {28: "0", 50: "0-1"}, 3.0: {28: "0-2", 50: "0-4"}}


@pytest.mark.parametrize("valid,mask", [([7, 4], True), ([7, 7], False)])
def test_gradient_checkpointing_keeps_the_call_state(valid, mask):
    """The forward carries no attention kwargs: the hook hands each call's state (the padded prompts'
    key mask included) to the processors, and to the blocks recomputed in the backward pass through
    the checkpointing function."""
    check_checkpointing_keeps_state(_transformer, _inputs(valid, 7, (6, 8), mask=mask))
