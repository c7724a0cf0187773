"""Nucleus-Image (NucleusMoEImageTransformer2DModel) with the taca.models.nucleusmoe adapter, on tiny
random-weight models: image queries only, K / V = [img, txt] (text LAST among the keys), GQA K / V
repeated as stock, the model's 2-D bool key mask handed to the op as the native backend reshapes it,
text K / V from the prompt or from the caller's cache; in the window every attention call is the paper's
definition on the stock q, k, v, outside it and at gamma = 1 the model is stock bit for bit (two
resolutions, with and without a prompt mask; dense blocks: the attention is the same in MoE ones); NucleusMoEImagePipeline with CFG."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("diffusers")

import taca

from model_checks import (Capture, StockCalls, check_disable_restores, check_spans_against_paper,
                          processors_of, ranges, span_mask, window)
from model_checks import check_checkpointing_keeps_state

TINY = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=4,
            num_key_value_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6), moe_enabled=False)
N_BLOCKS = TINY["num_layers"]
KV_HEADS, HEAD_DIM = 2, 16


def _transformer(**over):
    from diffusers import NucleusMoEImageTransformer2DModel

    torch.manual_seed(0)
    t = NucleusMoEImageTransformer2DModel(**{**TINY, **over}).eval()
    with torch.no_grad():  # zero-initialized layers would make the output ignore attention
        for p in t.parameters():
            if not p.any():
                p.normal_(0.0, 0.3)
    return t


def _inputs(valid, L, hw, step=0.98, seed=1, mask=True, cached=False):
    g = torch.Generator().manual_seed(seed)
    B = len(valid)
    d = dict(hidden_states=torch.randn(B, hw[0] * hw[1], 16, generator=g), img_shapes=[(1, *hw)] * B,
             encoder_hidden_states=torch.randn(B, L, 24, generator=g), timestep=torch.full((B,), step),
             return_dict=False)
    if mask:
        d["encoder_hidden_states_mask"] = torch.arange(L)[None, :] < torch.tensor(valid)[:, None]
    if cached:
        d["attention_kwargs"] = {"cached_txt_key": torch.randn(B, L, KV_HEADS, HEAD_DIM, generator=g),
                                 "cached_txt_value": torch.randn(B, L, KV_HEADS, HEAD_DIM, generator=g)}
    return d


def _key_mask(valid, L, n_img):
    """The model's 2-D key mask [img, txt] reshaped to (B, 1, 1, N_k) as the native backend does."""
    keep = torch.cat([torch.ones(len(valid), n_img, dtype=torch.bool),
                      torch.arange(L)[None, :] < torch.tensor(valid)[:, None]], dim=1)
    return keep[:, None, None, :]


CASES = [([7, 4], 7, (3, 4), True, False), ([5], 5, (4, 4), False, False), ([15, 9], 15, (2, 3), True, False),
         ([7, 3], 7, (3, 2), True, True), ([6, 6], 6, (2, 4), False, True)]


@pytest.mark.parametrize("valid,L,hw,mask,cached", CASES)
def test_attention_calls_are_the_paper_definition(monkeypatch, valid, L, hw, mask, cached):
    import diffusers.models.transformers.transformer_nucleusmoe_image as tm

    t = _transformer()
    stock = StockCalls(monkeypatch, tm)
    with torch.no_grad():
        t(**_inputs(valid, L, hw, mask=mask, cached=cached))
    monkeypatch.undo()
    cap = Capture(monkeypatch, shadow=True)
    with taca.enabled(t, gamma=1.3), torch.no_grad():
        t(**_inputs(valid, L, hw, mask=mask, cached=cached))
    assert len(stock.calls) == len(cap.calls) == N_BLOCKS
    n_img = hw[0] * hw[1]
    B = len(valid)
    m = _key_mask(valid, L, n_img) if mask else None
    for (q, k, v, kw, _), (sq, sk, sv, smask) in zip(cap.calls, stock.calls):
        assert torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv)
        assert q.shape[1] == n_img and k.shape[1] == n_img + L and k.shape[2] == q.shape[2] == 4  # GQA repeated
        assert kw["text_first"] is False and kw["text_len"] == L
        if m is None:
            assert smask is None
        else:  # stock hands dispatch the 2-D mask; the op gets it reshaped as the native backend does
            assert smask.shape == (B, n_img + L) and torch.equal(smask[:, None, None, :], m)
    key_text = span_mask(B, n_img + L, n_img, L)
    check_spans_against_paper(cap.calls, key_text, torch.ones(B, n_img, dtype=torch.bool), torch.full((B,), 1.3),
                              masks=m)


@pytest.mark.parametrize("mask", [True, False])
@pytest.mark.parametrize("hw", [(3, 4), (4, 2)])
def test_outside_window_and_gamma_one_are_stock(hw, mask):
    valid, L = [7, 4], 7
    t = _transformer()
    before = processors_of(t)
    with torch.no_grad():
        ref_in = t(**_inputs(valid, L, hw, 0.98, mask=mask))[0]
        ref_out = t(**_inputs(valid, L, hw, 0.5, mask=mask))[0]
        h = taca.enable(t, gamma=1.3)
        assert h.kind == "nucleusmoe" and len(h.processors) == N_BLOCKS
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
            t(**_inputs([7, 4], 7, (3, 4)))


def _scheduler():
    # the Nucleus-Image checkpoint's scheduler_config.json is NOT known here: FlowMatchEulerDiscreteScheduler
    # with dynamic shifting (the pipeline always passes mu) and diffusers' default bounds (shift 0.5 at 256
    # tokens, 1.15 at 4096) are assumed
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)


def _pipeline():
    from diffusers import NucleusMoEImagePipeline

    return NucleusMoEImagePipeline(transformer=_transformer(), scheduler=_scheduler(), vae=None, text_encoder=None,
                                   processor=None)


def _pipe_kwargs(hw, steps):
    """CFG (two transformer calls per step): prompt 9 tokens (6 valid), negative 9 tokens (2 valid)."""
    g = torch.Generator().manual_seed(0)
    return dict(prompt_embeds=torch.randn(1, 9, 24, generator=g), prompt_embeds_mask=(torch.arange(9) < 6)[None],
                negative_prompt_embeds=torch.randn(1, 9, 24, generator=g),
                negative_prompt_embeds_mask=(torch.arange(9) < 2)[None], guidance_scale=4.0,
                height=hw[0], width=hw[1], num_inference_steps=steps, output_type="latent")


def test_pipeline_gamma_one_is_stock():
    pipe = _pipeline()
    kw = _pipe_kwargs((48, 64), 2)
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
    n_img = (hw[0] // 16) * (hw[1] // 16)  # 8x latent (no VAE), patch 2
    on = window(_sigmas(steps, n_img))
    assert on and on != list(range(steps)) and len(seen) == 2 * steps
    assert [i for i in range(steps) if seen[2 * i] is not None] == on
    assert len(cap.calls) == 2 * N_BLOCKS * len(on)
    key_text = span_mask(1, n_img + 9, n_img, 9)
    for j in range(0, len(cap.calls), N_BLOCKS):
        valid = [6] if (j // N_BLOCKS) % 2 == 0 else [2]
        check_spans_against_paper(cap.calls[j : j + N_BLOCKS], key_text, torch.ones(1, n_img, dtype=torch.bool),
                                  torch.full((1,), 1.3), masks=_key_mask(valid, 9, n_img))
    assert not torch.equal(out, stock)


def _sigmas(steps, n_img):
    """NucleusMoEImagePipeline: sigmas linspace(1, 1 / steps) with mu from the image token count."""
    import numpy as np
    from diffusers.pipelines.nucleusmoe_image.pipeline_nucleusmoe_image import calculate_shift

    sch = _scheduler()
    c = sch.config
    mu = calculate_shift(n_img, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return sch.timesteps / c.num_train_timesteps


def nucleusmoe_windows():
    return {tokens: {steps: ranges(window(_sigmas(steps, tokens))) for steps in (28, 50)} for tokens in (4096, 1024)}


def test_window_steps_with_the_real_scheduler():
    assert nucleusmoe_windows() == EXPECTED_WINDOWS


EXPECTED_WINDOWS = {4096: {28: "0-2", 50: "0-4"}, 1024: {28: "0-1", 50: "0-2"}}


@pytest.mark.parametrize("valid,mask", [([7, 4], True), ([7, 7], False)])
def test_gradient_checkpointing_keeps_the_call_state(valid, mask):
    """diffusers' checkpointed NucleusMoE blocks get their attention_kwargs (TACA's state, the text
    mask) like the plain ones, padded prompts included: output and gradients equal the plain forward's."""
    check_checkpointing_keeps_state(_transformer, _inputs(valid, 7, (3, 4), mask=mask))
