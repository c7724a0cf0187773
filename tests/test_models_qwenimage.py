"""Qwen-Image (QwenImageTransformer2DModel) with the taca.models.qwenimage adapter, on tiny
random-weight models: every joint attention call inside the window is the paper's definition (the
stock bool key mask applied where prompts are padded), outside it and at gamma = 1 the model is
stock bit for bit; Edit layouts (reference latents after the image) and the pipeline with true
CFG and unequal prompt lengths."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("diffusers")

import taca
from taca.pipeline import get_handle

from model_checks import (Capture, StockCalls, check_against_paper,
                          check_disable_restores, processors_of, ranges, window)
from model_checks import check_checkpointing_keeps_state

TINY = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6))
# Qwen/Qwen-Image scheduler/scheduler_config.json (Qwen-Image-Edit ships the same).
SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                 base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")


def _transformer(**kw):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return QwenImageTransformer2DModel(**{**TINY, **kw}).eval()


def _inputs(B, L, shapes, valid=None, sigma=0.98, seed=1):
    """shapes: [(frames, h, w), ...] per sample (image first, then edit references); valid: per-sample
    number of unpadded text tokens (None: no mask)."""
    g = torch.Generator().manual_seed(seed)
    n = sum(f * h * w for f, h, w in shapes)
    kw = dict(hidden_states=torch.randn(B, n, 16, generator=g), encoder_hidden_states=torch.randn(B, L, 24, generator=g),
              timestep=torch.full((B,), sigma), img_shapes=[list(shapes)] * B, return_dict=False)
    if valid is not None:
        kw["encoder_hidden_states_mask"] = torch.arange(L)[None, :] < torch.tensor(valid)[:, None]
    return kw


def _stock_mask(kw):
    m = kw.get("encoder_hidden_states_mask")
    if m is None:
        return None
    B, n = kw["hidden_states"].shape[:2]
    return torch.cat([m, torch.ones(B, n, dtype=torch.bool)], dim=1)[:, None, None, :]


def _check_model(monkeypatch, B, L, shapes, valid=None):
    import diffusers.models.transformers.transformer_qwenimage as tq

    t = _transformer()
    stock = StockCalls(monkeypatch, tq)
    with torch.no_grad():
        t(**_inputs(B, L, shapes, valid))
    monkeypatch.undo()
    cap = Capture(monkeypatch, shadow=True)
    with taca.enabled(t, gamma=1.3), torch.no_grad():
        t(**_inputs(B, L, shapes, valid))
    assert len(cap.calls) == len(stock.calls) == TINY["num_layers"]
    n = sum(f * h * w for f, h, w in shapes)
    expect_mask = _stock_mask(_inputs(B, L, shapes, valid))
    for (q, k, v, kw, _), (sq, sk, sv, smask) in zip(cap.calls, stock.calls):
        assert torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv) and q.shape[1] == L + n
        assert (smask is None) == (expect_mask is None)
        if smask is not None:
            assert torch.equal(smask, expect_mask)
    check_against_paper(cap.calls, L, torch.full((B,), 1.3), None if expect_mask is None else [expect_mask] * len(cap.calls))


@pytest.mark.parametrize("B,L,shapes", [
    (2, 9, [(1, 4, 5)]),
    (1, 1, [(1, 3, 6)]),
    (2, 6, [(1, 4, 5), (1, 3, 4)]),  # Edit / EditPlus: a reference image after the target
])
def test_joint_calls_are_the_paper_definition(monkeypatch, B, L, shapes):
    _check_model(monkeypatch, B, L, shapes)


@pytest.mark.parametrize("shapes", [[(1, 4, 5)], [(1, 4, 5), (1, 2, 3)]])
def test_padded_prompts_keep_the_stock_mask(monkeypatch, shapes):
    """Padded text keys stay masked for every query; gamma scales the unpadded ones."""
    _check_model(monkeypatch, 2, 9, shapes, valid=[9, 6])


@pytest.mark.parametrize("valid", [None, [9, 6]])
@pytest.mark.parametrize("shapes", [[(1, 4, 5)], [(1, 6, 2)]])
def test_outside_window_and_gamma_one_are_stock(valid, shapes):
    t = _transformer()
    before = processors_of(t)
    with torch.no_grad():
        ref_in = t(**_inputs(2, 9, shapes, valid, sigma=0.98))[0]
        ref_out = t(**_inputs(2, 9, shapes, valid, sigma=0.5))[0]
        h = taca.enable(t, gamma=1.3)
        assert {type(p).__name__ for p in h.processors.values()} == {"TacaQwenDoubleStreamAttnProcessor"}
        assert torch.equal(t(**_inputs(2, 9, shapes, valid, sigma=0.5))[0], ref_out) and h.last_gamma is None
        taca.enable(t, gamma=1.0, schedule="constant")
        assert torch.equal(t(**_inputs(2, 9, shapes, valid, sigma=0.98))[0], ref_in)
        taca.disable(t)
    check_disable_restores(t, before)


def _pipeline():
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, text_encoder=None,
                             tokenizer=None, transformer=_transformer())


@pytest.mark.parametrize("hw", [(32, 48), (48, 32)])
def test_pipeline_true_cfg_unequal_prompts_and_window(monkeypatch, hw):
    """QwenImagePipeline, true CFG with a 7-token prompt and a 4-token negative prompt (unpadded:
    the pipeline passes no mask): the hook reads sigma on the host, the window is the paper rule's
    on the real scheduler, and every joint call in it is the paper's definition."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    pipe = _pipeline()
    steps = 10
    g = torch.Generator().manual_seed(0)
    kw = dict(prompt_embeds=torch.randn(1, 7, 24, generator=g), prompt_embeds_mask=torch.ones(1, 7, dtype=torch.long),
              negative_prompt_embeds=torch.randn(1, 4, 24, generator=g),
              negative_prompt_embeds_mask=torch.ones(1, 4, dtype=torch.long), true_cfg_scale=4.0,
              height=hw[0], width=hw[1], num_inference_steps=steps, output_type="pt")
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    cap = Capture(monkeypatch)
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, k, o: seen.append(
        (k["encoder_hidden_states"].shape[1], get_handle(m).last_gamma, get_handle(m).last_path)), with_kwargs=True)
    with taca.enabled(pipe, gamma=1.3):
        out = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    hook.remove()
    f = 2 * pipe.vae_scale_factor  # latents of height / vae_scale_factor, packed 2x2 into tokens
    n_img = (hw[0] // f) * (hw[1] // f)
    sch = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    c = sch.config
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps),
                      mu=calculate_shift(n_img, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift))
    on = window(sch.timesteps / 1000)
    assert on
    assert [L for L, _, _ in seen] == [7, 4] * steps and {p for _, _, p in seen} == {"host"}
    assert [i for i in range(steps) if seen[2 * i][1] is not None] == on
    assert len(cap.calls) == 2 * TINY["num_layers"] * len(on)
    for j in range(0, len(cap.calls), TINY["num_layers"]):
        L = 7 if (j // TINY["num_layers"]) % 2 == 0 else 4
        chunk = cap.calls[j : j + TINY["num_layers"]]
        assert all(cq.shape[1] == L + n_img for cq, *_ in chunk)
        check_against_paper(chunk, L, torch.full((1,), 1.3))
    assert not torch.equal(out, stock)


def qwenimage_windows():
    """{(steps, image tokens): window} with the real Qwen-Image scheduler config and the pipeline's mu."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    out = {}
    for n_img in (4096, 6889):  # 1024x1024 and the pipeline's default 1328x1328 (16x16 pixels per token)
        for steps in (20, 30, 50):
            sch = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
            c = sch.config
            mu = calculate_shift(n_img, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
            sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
            out[(steps, n_img)] = ranges(window(sch.timesteps / 1000))
    return out


def test_window_steps_with_the_real_scheduler():
    assert qwenimage_windows() == EXPECTED_WINDOWS


# (steps, image tokens) -> steps with gamma
EXPECTED_WINDOWS = {(20, 4096): "0-1", (30, 4096): "0-1", (50, 4096): "0-2",
                    (20, 6889): "0-1", (30, 6889): "0-1", (50, 6889): "0-3"}


@pytest.mark.parametrize("valid", [None, [9, 6]])
def test_gradient_checkpointing_keeps_the_call_state(valid):
    """diffusers' checkpointed Qwen-Image blocks get attention_kwargs (TACA's state) and the text
    mask like the plain ones, padded prompts included: output and gradients equal the plain forward's."""
    check_checkpointing_keeps_state(_transformer, _inputs(2, 9, [(1, 4, 5)], valid))
