"""CogView4 (CogView4Transformer2DModel) with the taca.models.cogview4 adapter, on tiny random-weight
models: in the window every joint call is the paper's definition (text first; a 2-D text mask as
the stock processor turns it into an ADDITIVE float 0/1 matrix), outside it and at gamma = 1 the
model is stock bit for bit; sigma is read from the pipeline's scheduler (the transformer gets the
unshifted t); CogView4Pipeline with CFG and prompts of unequal lengths at two resolutions."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import taca
from taca.pipeline import get_handle

from model_checks import (CaptureSDPA, StockSDPACalls, check_disable_restores,
                          check_spans_against_paper, processors_of, ranges, span_mask, window)
from model_checks import check_checkpointing_keeps_state, check_outer_hint_routes

TINY = dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            text_embed_dim=24, time_embed_dim=16, condition_dim=8, pos_embed_max_size=16, sample_size=16,
            rope_axes_dim=(16, 16))
# THUDM/CogView4-6B scheduler/scheduler_config.json as remembered (not read offline here):
# FlowMatchEulerDiscreteScheduler with dynamic shifting, base_shift 0.25, max_shift 0.75,
# base_image_seq_len 256 and the LINEAR time shift; the pipeline computes its own mu
# (sqrt(image_seq_len / 256) * 0.75 + 0.25).
SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.25, max_shift=0.75,
                 base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="linear")


def _transformer():
    from diffusers import CogView4Transformer2DModel

    torch.manual_seed(0)
    return CogView4Transformer2DModel(**TINY).eval()


def _inputs(B, L, hw, t=1000.0, valid=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    kw = dict(hidden_states=torch.randn(B, 4, 2 * hw[0], 2 * hw[1], generator=g),
              encoder_hidden_states=torch.randn(B, L, 24, generator=g), timestep=torch.full((B,), t),
              original_size=torch.tensor([[64.0, 64.0]] * B), target_size=torch.tensor([[64.0, 64.0]] * B),
              crop_coords=torch.zeros(B, 2), return_dict=False)
    if valid is not None:
        kw["attention_mask"] = (torch.arange(L)[None, :] >= (L - torch.tensor(valid))[:, None]).long()  # left-padded
    return kw


def _stock_mask(B, L, n, valid):
    if valid is None:
        return None
    m = torch.cat([(torch.arange(L)[None, :] >= (L - torch.tensor(valid))[:, None]).float(), torch.ones(B, n)], 1)
    return ((m[:, :, None] @ m[:, None, :]) > 0).unsqueeze(1).float()


def _sched_pipe(t):
    """A CogView4Pipeline around transformer ``t`` whose scheduler holds CogView4's timesteps for 4 steps."""
    from diffusers import CogView4Pipeline, FlowMatchEulerDiscreteScheduler

    pipe = CogView4Pipeline(tokenizer=None, text_encoder=None, vae=None, transformer=t,
                            scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER))
    ts = np.linspace(1000, 1.0, 4).astype(np.int64).astype(np.float32)  # 1000, 667, 334, 1
    pipe.scheduler.set_timesteps(timesteps=ts, sigmas=ts / 1000, mu=3.0)  # linear shift: sigma = 3 / (3 + 1 / s - 1)
    return pipe


def _check_model(monkeypatch, B, L, hw, valid=None):
    t = _transformer()
    pipe = _sched_pipe(t)
    stock = StockSDPACalls(monkeypatch)
    with torch.no_grad():
        t(**_inputs(B, L, hw, valid=valid))
    monkeypatch.undo()
    cap = CaptureSDPA(monkeypatch, shadow=True)
    with taca.enabled(pipe, gamma=1.3) as h, torch.no_grad():
        t(**_inputs(B, L, hw, valid=valid))
        assert h.last_gamma is not None
    assert len(cap.calls) == len(stock.calls) == TINY["num_layers"]
    N = L + hw[0] * hw[1]
    mask = _stock_mask(B, L, hw[0] * hw[1], valid)
    for (q, k, v, _, _), (sq, sk, sv, smask, _) in zip(cap.calls, stock.calls):
        assert torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv) and q.shape[2] == N
        assert (smask is None) == (mask is None)
        if mask is not None:
            assert smask.dtype == torch.float32 and torch.equal(smask, mask)
    text = span_mask(B, N, 0, L)
    check_spans_against_paper(cap.calls, text, ~text, torch.full((B,), 1.3), masks=mask, layout="bhnd")


@pytest.mark.parametrize("B,L,hw", [(2, 16, (3, 4)), (1, 5, (4, 2))])
def test_joint_calls_are_the_paper_definition(monkeypatch, B, L, hw):
    _check_model(monkeypatch, B, L, hw)


def test_text_mask_stays_additive(monkeypatch):
    """A 2-D text mask (left padding: 16 and 9 valid of 16): the stock processor's float 0/1 matrix is
    added after gamma, as SDPA adds it (it masks nothing)."""
    _check_model(monkeypatch, 2, 16, (3, 4), valid=[16, 9])


def test_text_mask_matrices_checked_once(monkeypatch, spy):
    """CogView4's per-block text-mask matrices, named by their token mask (``processors.joint_token_mask``): one read
    over two calls with the mask routes on (``check_outer_hint_routes``)."""
    t = _transformer()
    kw = _inputs(2, 16, (3, 4), valid=[16, 9])
    check_outer_hint_routes(monkeypatch, spy, _sched_pipe(t), lambda: t(**kw)[0], n_calls=TINY["num_layers"], n_kinds=1)


@pytest.mark.parametrize("valid", [None, [16, 9]])
@pytest.mark.parametrize("hw", [(3, 4), (2, 5)])
def test_outside_window_and_gamma_one_are_stock(valid, hw):
    """t = 1000 (sigma 1) is in the window, t = 667 (sigma 0.667 shifted by mu = 3: 0.857) is not."""
    t = _transformer()
    pipe = _sched_pipe(t)
    before = processors_of(t)
    with torch.no_grad():
        ref_in = t(**_inputs(2, 16, hw, 1000.0, valid))[0]
        ref_out = t(**_inputs(2, 16, hw, 667.0, valid))[0]
        h = taca.enable(pipe, gamma=1.3)
        assert h.kind == "cogview4" and {type(p).__name__ for p in h.processors.values()} == {
            "TacaCogView4AttnProcessor"}
        assert torch.equal(t(**_inputs(2, 16, hw, 667.0, valid))[0], ref_out) and h.last_gamma is None
        assert not torch.equal(t(**_inputs(2, 16, hw, 1000.0, valid))[0], ref_in)
        assert torch.equal(h.last_gamma, torch.full((2,), 1.3))
        taca.enable(pipe, gamma=1.0, schedule="constant")
        assert torch.equal(t(**_inputs(2, 16, hw, 1000.0, valid))[0], ref_in)
        taca.disable(pipe)
    check_disable_restores(t, before)


def test_sigma_comes_from_the_scheduler():
    """The transformer's t is unshifted: with mu = 3, t = 667 means sigma 0.857 (inside a 0.8 threshold
    that t / 1000 = 0.667 would miss), and a t the scheduler does not hold, or a bare transformer,
    is refused rather than read as t / 1000."""
    t = _transformer()
    pipe = _sched_pipe(t)
    with taca.enabled(pipe, gamma=1.3, schedule="paper:0.8") as h, torch.no_grad():
        t(**_inputs(1, 3, (2, 2), 667.0))
        assert h.last_gamma is not None  # 0.857 >= 0.8, although 667 / 1000 < 0.8
        t(**_inputs(1, 3, (2, 2), 334.0))
        assert h.last_gamma is None
        with pytest.raises(ValueError, match=r"timestep \[500.0\] is not one of the scheduler's timesteps"):
            t(**_inputs(1, 3, (2, 2), 500.0))
    with taca.enabled(t, gamma=1.3), torch.no_grad():
        with pytest.raises(ValueError, match="pass the pipeline to taca.enable"):
            t(**_inputs(1, 3, (2, 2), 1000.0))
    with taca.enabled(t, gamma=1.0, schedule="constant"), torch.no_grad():
        t(**_inputs(1, 3, (2, 2), 1000.0))  # needs no sigma


def test_training_processor_is_refused():
    from diffusers.models.transformers.transformer_cogview4 import CogView4TrainingAttnProcessor

    t = _transformer()
    p = CogView4TrainingAttnProcessor()
    t.transformer_blocks[1].attn1.set_processor(p)
    with pytest.raises(TypeError, match="transformer_blocks.1.attn1 uses CogView4TrainingAttnProcessor"):
        taca.enable(t)
    assert get_handle(t) is None and t.transformer_blocks[1].attn1.processor is p


def _pipe_sigmas(n_img_tokens, steps):
    """The sigmas CogView4Pipeline gets from its scheduler (its own timesteps, sigmas and mu)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.cogview4.pipeline_cogview4 import calculate_shift

    sch = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    ts = np.linspace(1000, 1.0, steps).astype(np.int64).astype(np.float32)
    sch.set_timesteps(timesteps=ts, sigmas=ts / 1000, mu=calculate_shift(n_img_tokens, 256, 0.25, 0.75))
    return sch.sigmas[:-1]


@pytest.mark.parametrize("hw", [(32, 48), (48, 64)])
def test_pipeline_cfg_unequal_prompts_and_window(monkeypatch, hw):
    """CogView4Pipeline with CFG (prompt 16 tokens, negative 5: separate forwards): the window is
    the paper rule's on the scheduler's shifted sigmas, read on the host (no sync), and every joint
    call in it is the paper's definition with that call's own text length."""
    from diffusers import CogView4Pipeline, FlowMatchEulerDiscreteScheduler

    pipe = CogView4Pipeline(tokenizer=None, text_encoder=None, vae=None, transformer=_transformer(),
                            scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER))
    steps = 6
    g = torch.Generator().manual_seed(0)
    kw = dict(prompt_embeds=torch.randn(1, 16, 24, generator=g), negative_prompt_embeds=torch.randn(1, 5, 24, generator=g),
              guidance_scale=4.0, height=hw[0], width=hw[1], num_inference_steps=steps, output_type="latent")
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    with taca.enabled(pipe, gamma=1.0, schedule="constant"):
        assert torch.equal(pipe(generator=torch.Generator().manual_seed(1), **kw).images, stock)
    cap = CaptureSDPA(monkeypatch)
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, k, o: seen.append(
        (k["encoder_hidden_states"].shape[1], get_handle(m).last_gamma, get_handle(m).last_path)), with_kwargs=True)
    with taca.enabled(pipe, gamma=1.3):
        out = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    hook.remove()
    n_img = (hw[0] // 16) * (hw[1] // 16)
    on = window(_pipe_sigmas(n_img, steps))
    assert on and on != list(range(steps))
    assert [L for L, _, _ in seen] == [16, 5] * steps and {p for _, _, p in seen} == {"host"}
    assert [i for i in range(steps) if seen[2 * i][1] is not None] == on
    assert all((seen[2 * i][1] is None) == (seen[2 * i + 1][1] is None) for i in range(steps))
    n = TINY["num_layers"]
    assert len(cap.calls) == 2 * n * len(on)
    for j in range(0, len(cap.calls), n):
        L = 16 if (j // n) % 2 == 0 else 5
        text = span_mask(1, L + n_img, 0, L)
        check_spans_against_paper(cap.calls[j : j + n], text, ~text, torch.full((1,), 1.3), layout="bhnd")
    assert not torch.equal(out, stock)


def cogview4_windows():
    out = {}
    for n_img in (4096, 1024):  # 1024x1024 and 512x512 (8x VAE, 2x2 patches)
        for steps in (28, 50):
            out[(steps, n_img)] = ranges(window(_pipe_sigmas(n_img, steps)))
    return out


def test_window_steps_with_the_real_scheduler():
    assert cogview4_windows() == EXPECTED_WINDOWS


# (steps, image tokens) -> steps with gamma; 50: the pipeline's default
EXPECTED_WINDOWS = {(28, 4096): "0-2", (50, 4096): "0-4", (28, 1024): "0-1", (50, 1024): "0-2"}


@pytest.mark.parametrize("valid", [None, [16, 9]])
def test_gradient_checkpointing_keeps_the_call_state(monkeypatch, valid):
    """diffusers' checkpointed CogView4 blocks get attention_kwargs (TACA's state) and the text mask
    like the plain ones, left-padded prompts included. sigma comes from the scheduler, so the check's
    taca.enable(transformer) is made taca.enable(pipeline around it) (t = 1000: sigma 1)."""
    enable = taca.enable
    monkeypatch.setattr(taca, "enable", lambda t, **kw: enable(_sched_pipe(t), **kw))
    check_checkpointing_keeps_state(_transformer, _inputs(2, 16, (3, 4), 1000.0, valid))
