"""ERNIE-Image (ErnieImageTransformer2DModel) with the taca.models.ernie_image adapter, on tiny
random-weight models: [img, txt(Tmax)] with the model's bool key mask on padded text (always passed);
in the window every call is the paper's definition with that mask (per-sample valid text lengths in
one batch, as the pipeline's CFG batch has them), outside it and at gamma = 1 the model is stock bit
for bit; the state reaches the processors without attention kwargs and is cleared after the call."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("diffusers")

import taca
from taca.pipeline import get_handle

from model_checks import (check_checkpointing_keeps_state, Capture, StockCalls, check_disable_restores,
                          check_spans_against_paper, processors_of, ranges, span_mask, window)

TINY = dict(hidden_size=64, num_attention_heads=2, num_layers=2, ffn_hidden_size=64, in_channels=4, out_channels=4,
            patch_size=1, text_in_dim=24, rope_axes_dim=(8, 12, 12))


def _transformer():
    from diffusers import ErnieImageTransformer2DModel

    torch.manual_seed(0)
    t = ErnieImageTransformer2DModel(**TINY).eval()
    with torch.no_grad():  # zero-initialized in diffusers: the output would not depend on attention at all
        for p in (t.adaLN_modulation[-1].weight, t.adaLN_modulation[-1].bias, t.final_linear.weight, t.final_linear.bias):
            p.normal_(0.0, 0.2)
    return t


def _inputs(lens, hw, t=980.0, Tmax=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    B = len(lens)
    Tmax = max(lens) if Tmax is None else Tmax
    text = torch.randn(B, Tmax, 24, generator=g) * (torch.arange(Tmax)[None, :, None] < torch.tensor(lens)[:, None, None])
    return dict(hidden_states=torch.randn(B, 4, hw[0], hw[1], generator=g), timestep=torch.full((B,), t),
                text_bth=text, text_lens=torch.tensor(lens), return_dict=False)


def _stock_mask(lens, n_img, Tmax=None):
    Tmax = max(lens) if Tmax is None else Tmax
    valid = torch.arange(Tmax)[None, :] < torch.tensor(lens)[:, None]
    return torch.cat([torch.ones(len(lens), n_img, dtype=torch.bool), valid], 1)[:, None, None, :]


@pytest.mark.parametrize("lens,hw", [([7, 4], (3, 4)), ([5], (2, 5)), ([1, 6], (4, 2))])
def test_joint_calls_are_the_paper_definition(monkeypatch, lens, hw):
    """Text keys are the last Tmax of [img, txt]; padded ones stay removed by the stock mask."""
    import diffusers.models.transformers.transformer_ernie_image as te

    t = _transformer()
    stock = StockCalls(monkeypatch, te)
    with torch.no_grad():
        t(**_inputs(lens, hw))
    monkeypatch.undo()
    cap = Capture(monkeypatch, shadow=True)
    with taca.enabled(t, gamma=1.3) as h, torch.no_grad():
        t(**_inputs(lens, hw))
        assert all(p.taca_call is None for p in h.processors.values())  # cleared after the call
    assert len(cap.calls) == len(stock.calls) == TINY["num_layers"]
    n_img, Tmax = hw[0] * hw[1], max(lens)
    mask = _stock_mask(lens, n_img)
    for (q, k, v, kw, _), (sq, sk, sv, smask) in zip(cap.calls, stock.calls):
        assert torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv) and q.shape[1] == n_img + Tmax
        assert torch.equal(smask, mask) and kw["text_first"] is False and kw["text_len"] == Tmax
    B = len(lens)
    text = span_mask(B, n_img + Tmax, n_img, Tmax)
    check_spans_against_paper(cap.calls, text, ~text, torch.full((B,), 1.3), masks=mask)


@pytest.mark.parametrize("lens", [[7, 4], [6, 6]])
@pytest.mark.parametrize("hw", [(3, 4), (2, 5)])
def test_outside_window_and_gamma_one_are_stock(lens, hw):
    t = _transformer()
    before = processors_of(t)
    with torch.no_grad():
        ref_in = t(**_inputs(lens, hw, 980.0))[0]
        ref_out = t(**_inputs(lens, hw, 500.0))[0]
        h = taca.enable(t, gamma=1.3)
        assert h.kind == "ernie_image" and len(h.processors) == TINY["num_layers"]
        assert {type(p).__name__ for p in h.processors.values()} == {"TacaErnieImageAttnProcessor"}
        assert torch.equal(t(**_inputs(lens, hw, 500.0))[0], ref_out) and h.last_gamma is None
        assert not torch.equal(t(**_inputs(lens, hw, 980.0))[0], ref_in)
        assert torch.equal(h.last_gamma, torch.full((2,), 1.3))
        taca.enable(t, gamma=1.0, schedule="constant")
        assert torch.equal(t(**_inputs(lens, hw, 980.0))[0], ref_in)
        taca.disable(t)
    check_disable_restores(t, before)
    assert all(p.taca_call is None for p in h.processors.values())


def _pipeline(shift):
    from diffusers import ErnieImagePipeline, FlowMatchEulerDiscreteScheduler

    return ErnieImagePipeline(transformer=_transformer(), vae=None, text_encoder=None, tokenizer=None,
                              scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift))


@pytest.mark.parametrize("hw", [(48, 64), (64, 32)])
def test_pipeline_cfg_unequal_prompts_and_window(monkeypatch, hw):
    """ErnieImagePipeline with CFG: one batch [negative (3 tokens), prompt (8 tokens)] padded to 8 with
    the bool mask on the negative's padding; the window is the paper rule's on the scheduler, and
    every call in it is the paper's definition with that mask."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = _pipeline(3.0)
    steps = 6
    g = torch.Generator().manual_seed(0)
    kw = dict(prompt_embeds=[torch.randn(8, 24, generator=g)], negative_prompt_embeds=[torch.randn(3, 24, generator=g)],
              guidance_scale=4.0, height=hw[0], width=hw[1], num_inference_steps=steps, output_type="latent")
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    with taca.enabled(pipe, gamma=1.0, schedule="constant"):
        assert torch.equal(pipe(generator=torch.Generator().manual_seed(1), **kw).images, stock)
    cap = Capture(monkeypatch)
    gammas = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, k, o: gammas.append(get_handle(m).last_gamma),
                                                  with_kwargs=True)
    with taca.enabled(pipe, gamma=1.3):
        out = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    hook.remove()
    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sch.set_timesteps(sigmas=torch.linspace(1.0, 0.0, steps + 1)[:-1].numpy())
    on = window(sch.timesteps / 1000)
    assert on and on != list(range(steps)) and len(gammas) == steps
    assert [i for i in range(steps) if gammas[i] is not None] == on
    assert len(cap.calls) == TINY["num_layers"] * len(on)
    n_img = (hw[0] // 16) * (hw[1] // 16)
    text = span_mask(2, n_img + 8, n_img, 8)
    check_spans_against_paper(cap.calls, text, ~text, torch.full((2,), 1.3), masks=_stock_mask([3, 8], n_img))
    assert not torch.equal(out, stock)


def ernie_windows():
    """{(shift, steps): window}: the pipeline's sigmas linspace(1, 0, n + 1)[:-1] through the scheduler's
    static shift (the checkpoint's shift is not known here: 1 and 3 shown)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    out = {}
    for shift in (1.0, 3.0):
        for steps in (8, 28, 50):
            sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
            sch.set_timesteps(sigmas=torch.linspace(1.0, 0.0, steps + 1)[:-1].numpy())
            out[(shift, steps)] = ranges(window(sch.timesteps / 1000))
    return out


def test_window_steps_with_the_scheduler():
    assert ernie_windows() == EXPECTED_WINDOWS


EXPECTED_WINDOWS = {(1.0, 8): "0", (1.0, 28): "0", (1.0, 50): "0-1", (3.0, 8): "0", (3.0, 28): "0-2", (3.0, 50): "0-4"}


def test_gradient_checkpointing_keeps_the_call_state():
    """Blocks recomputed by gradient checkpointing see the call's state too (the model passes no
    attention kwargs): the gradients are TACA's, equal to those without checkpointing."""
    if not getattr(_transformer(), "_supports_gradient_checkpointing", False):
        pytest.skip("this diffusers' ErnieImageTransformer2DModel has no gradient checkpointing")
    check_checkpointing_keeps_state(_transformer, _inputs([5, 3], (4, 4)))