"""Lumina-Image 2.0 (Lumina2Transformer2DModel) with the taca.models.lumina2 adapter, on tiny
random-weight models: per sample [valid caption, img] right-padded to the batch's longest (bool key
mask when lengths differ), GQA K/V repeated as stock, refiners left stock, reversed time; in the
window every joint call is the paper's definition with each sample's own text span, outside it and
at gamma = 1 the model is stock bit for bit; Lumina2Pipeline with CFG at two resolutions."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import taca
from taca.pipeline import get_handle

from model_checks import (CaptureSDPA, StockSDPACalls,
                          check_disable_restores, check_spans_against_paper, processors_of, ranges, span_mask, window)
from model_checks import check_checkpointing_keeps_state

TINY = dict(sample_size=16, patch_size=2, in_channels=4, hidden_size=48, num_layers=2, num_refiner_layers=1,
            num_attention_heads=4, num_kv_heads=2, axes_dim_rope=(4, 4, 4), axes_lens=(64, 32, 32), cap_feat_dim=24)
# Alpha-VLLM/Lumina-Image-2.0 scheduler/scheduler_config.json as remembered (NOT read offline here):
# FlowMatchEulerDiscreteScheduler, num_train_timesteps 1000, static shift 6.0 (no dynamic shifting, so
# the mu the pipeline computes is ignored).
SCHEDULER = dict(num_train_timesteps=1000, shift=6.0)
SCALE = 12 ** -0.5  # attn.scale (head dim 12)


def _transformer():
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(0)
    return Lumina2Transformer2DModel(**TINY).eval()


def _inputs(valid, L, hw, sigma=0.98, seed=1):
    """valid: per-sample caption lengths (of L tokens); timestep = 1 - sigma."""
    g = torch.Generator().manual_seed(seed)
    B = len(valid)
    return dict(hidden_states=torch.randn(B, 4, 2 * hw[0], 2 * hw[1], generator=g), timestep=torch.full((B,), 1 - sigma),
                encoder_hidden_states=torch.randn(B, L, 24, generator=g),
                encoder_attention_mask=torch.arange(L)[None, :] < torch.tensor(valid)[:, None], return_dict=False)


def _check_model(monkeypatch, valid, L, hw):
    t = _transformer()
    stock = StockSDPACalls(monkeypatch)
    with torch.no_grad():
        t(**_inputs(valid, L, hw))
    monkeypatch.undo()
    cap = CaptureSDPA(monkeypatch, shadow=True)
    with taca.enabled(t, gamma=1.3), torch.no_grad():
        t(**_inputs(valid, L, hw))
    n = TINY["num_layers"]
    assert len(stock.calls) == 2 + n and len(cap.calls) == n  # context and noise refiners stay stock
    B, n_img = len(valid), hw[0] * hw[1]
    N = max(valid) + n_img
    mask = None
    if len(set(valid)) > 1:
        mask = (torch.arange(N)[None, :] < (torch.tensor(valid) + n_img)[:, None])[:, None, None, :]
    for (q, k, v, kw, _), (sq, sk, sv, smask, sscale) in zip(cap.calls, stock.calls[2:]):
        assert torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv) and sscale == SCALE
        assert q.shape[2] == N and q.shape[1] == k.shape[1] == 4  # K, V repeated to the 4 query heads, as stock
        assert (smask is None) == (mask is None) and (mask is None or torch.equal(smask, mask))
        if mask is None:
            assert kw["text_len"] == valid[0] and kw.get("text_start") is None
    text = span_mask(B, N, 0, torch.tensor(valid))
    check_spans_against_paper(cap.calls, text, ~text, torch.full((B,), 1.3), masks=mask, scale=SCALE, layout="bhnd")


@pytest.mark.parametrize("valid,L,hw", [([9, 9], 9, (3, 4)), ([5], 9, (2, 5)), ([6, 6], 8, (4, 2))])
def test_joint_calls_are_the_paper_definition_one_length(monkeypatch, valid, L, hw):
    """One caption length for the batch (padded caption tokens are dropped by the model): text keys
    [0, cap_len), no mask."""
    _check_model(monkeypatch, valid, L, hw)


@pytest.mark.parametrize("valid,hw", [([9, 5], (3, 4)), ([2, 7], (4, 2))])
def test_joint_calls_are_the_paper_definition_per_sample(monkeypatch, valid, hw):
    """Different caption lengths in one batch: sample b's text keys are [0, valid[b]), its image
    follows at once, the batch padding is masked."""
    _check_model(monkeypatch, valid, 9, hw)


@pytest.mark.parametrize("valid", [[9, 9], [9, 5]])
@pytest.mark.parametrize("hw", [(3, 4), (2, 5)])
def test_outside_window_and_gamma_one_are_stock(valid, hw):
    t = _transformer()
    before = processors_of(t)
    with torch.no_grad():
        ref_in = t(**_inputs(valid, 9, hw, sigma=0.98))[0]
        ref_out = t(**_inputs(valid, 9, hw, sigma=0.5))[0]
        h = taca.enable(t, gamma=1.3)
        assert h.kind == "lumina2" and sorted(h.processors) == [f"layers.{i}.attn" for i in range(2)]
        assert all(type(m.processor).__name__ == "Lumina2AttnProcessor2_0" for n, m in t.named_modules()
                   if n.split(".")[0] in ("context_refiner", "noise_refiner") and hasattr(m, "set_processor"))
        assert torch.equal(t(**_inputs(valid, 9, hw, sigma=0.5))[0], ref_out) and h.last_gamma is None
        assert not torch.equal(t(**_inputs(valid, 9, hw, sigma=0.98))[0], ref_in)
        assert torch.allclose(h.last_gamma, torch.full((2,), 1.3))
        taca.enable(t, gamma=1.0, schedule="constant")
        assert torch.equal(t(**_inputs(valid, 9, hw, sigma=0.98))[0], ref_in)
        taca.disable(t)
    check_disable_restores(t, before)


def _pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline

    return Lumina2Pipeline(transformer=_transformer(), scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=None,
                           text_encoder=None, tokenizer=None)


def _hook_sigmas(steps):
    """The sigma the hook reads at each step: 1 - (1 - t / 1000), in float32 as the pipeline computes it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))
    return 1.0 - (1 - sch.timesteps / 1000)


def _pipe_kwargs(hw, steps, valid):
    g = torch.Generator().manual_seed(0)
    B = len(valid)
    return dict(prompt_embeds=torch.randn(B, 9, 24, generator=g),
                prompt_attention_mask=torch.arange(9)[None, :] < torch.tensor(valid)[:, None],
                negative_prompt_embeds=torch.randn(B, 9, 24, generator=g),
                negative_prompt_attention_mask=(torch.arange(9) < 4)[None].expand(B, 9), guidance_scale=4.0,
                height=hw[0], width=hw[1], num_inference_steps=steps, output_type="latent")


@pytest.mark.parametrize("hw", [(32, 48), (48, 32)])
def test_pipeline_cfg_unequal_prompts_and_window(monkeypatch, hw):
    """Lumina2Pipeline with CFG (prompt 7 of 9 tokens valid, negative 4 of 9: separate forwards, one
    caption length each, the padding dropped by the model): the window is the paper rule's on the scheduler (sync path: the pipeline passes a
    fresh 1 - t / 1000), every joint call in it is the paper's definition with its own text length."""
    pipe = _pipeline()
    steps = 6
    kw = _pipe_kwargs(hw, steps, [7])
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    with taca.enabled(pipe, gamma=1.0, schedule="constant"):
        assert torch.equal(pipe(generator=torch.Generator().manual_seed(1), **kw).images, stock)
    cap = CaptureSDPA(monkeypatch)
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, k, o: seen.append(get_handle(m).last_gamma),
                                                  with_kwargs=True)
    with taca.enabled(pipe, gamma=1.3):
        out = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    hook.remove()
    on = window(_hook_sigmas(steps))
    assert on and on != list(range(steps)) and len(seen) == 2 * steps
    assert [i for i in range(steps) if seen[2 * i] is not None] == on
    n, n_img = TINY["num_layers"], (hw[0] // 16) * (hw[1] // 16)
    assert len(cap.calls) == 2 * n * len(on)
    for j in range(0, len(cap.calls), n):
        L = 7 if (j // n) % 2 == 0 else 4
        text = span_mask(1, L + n_img, 0, L)
        check_spans_against_paper(cap.calls[j : j + n], text, ~text, torch.full((1,), 1.3), scale=SCALE,
                                  layout="bhnd")
    assert not torch.equal(out, stock)


def test_pipeline_two_prompts_of_different_lengths(monkeypatch):
    """Two prompts in one batch (9 and 5 valid tokens): per-sample text spans with the model's key mask."""
    pipe = _pipeline()
    kw = _pipe_kwargs((32, 32), 4, [9, 5])
    cap = CaptureSDPA(monkeypatch)
    with taca.enabled(pipe, gamma=1.3):
        pipe(generator=torch.Generator().manual_seed(1), **kw)
    n = TINY["num_layers"]
    assert len(cap.calls) == 2 * n  # step 0 of 4: the prompts' call, then the negatives' (4 of 9 valid each)
    N = 9 + 4
    mask = (torch.arange(N)[None, :] < (torch.tensor([9, 5]) + 4)[:, None])[:, None, None, :]
    text = span_mask(2, N, 0, torch.tensor([9, 5]))
    check_spans_against_paper(cap.calls[:n], text, ~text, torch.full((2,), 1.3), masks=mask, scale=SCALE,
                              layout="bhnd")
    text = span_mask(2, 8, 0, 4)
    check_spans_against_paper(cap.calls[n:], text, ~text, torch.full((2,), 1.3), scale=SCALE, layout="bhnd")


def lumina2_windows():
    return {steps: ranges(window(_hook_sigmas(steps))) for steps in (30, 50)}


def test_window_steps_with_the_real_scheduler():
    assert lumina2_windows() == EXPECTED_WINDOWS


EXPECTED_WINDOWS = {30: "0-4", 50: "0-7"}


@pytest.mark.parametrize("valid", [[9, 9], [9, 5]])
def test_gradient_checkpointing_keeps_the_call_state(valid):
    """The forward carries no attention kwargs: the hook hands each call's state (per-sample caption
    lengths and the stock mask included) to the processors, and to the blocks recomputed in the
    backward pass through the checkpointing function (timestep = 1 - sigma)."""
    check_checkpointing_keeps_state(_transformer, _inputs(valid, 9, (3, 4)))
