"""GLM-Image (GlmImageTransformer2DModel) with the taca.models.glm_image adapter, on tiny random-weight
models: in the window every joint call is the paper's definition (glyph text first; a 2-D text mask
as the stock processor turns it into an ADDITIVE float 0/1 matrix), outside it and at gamma = 1 the
model is stock bit for bit; sigma is read from the pipeline's scheduler (the transformer gets the
unshifted t minus 1); GlmImagePipeline with CFG (prior tokens dropped in the negative branch) at two
resolutions; the KV-cache (condition image) mode is refused."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import taca
from taca.pipeline import get_handle

from model_checks import (Capture, StockCalls, check_disable_restores,
                          check_spans_against_paper, processors_of, ranges, span_mask, window)

TINY = dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            text_embed_dim=24, time_embed_dim=16, condition_dim=8, prior_vq_quantizer_codebook_size=32)
# zai-org/GLM-Image scheduler/scheduler_config.json taken to be CogView4's (as remembered, not read
# offline here): FlowMatchEulerDiscreteScheduler with dynamic shifting, base_shift 0.25, max_shift
# 0.75, base_image_seq_len 256 and the LINEAR time shift; the pipeline computes its own mu
# (sqrt(image_seq_len / 256) * 0.75 + 0.25) and timesteps linspace(1000, 1, n + 1)[:-1].
SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.25, max_shift=0.75,
                 base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="linear")


def _transformer():
    from diffusers import GlmImageTransformer2DModel

    torch.manual_seed(0)
    return GlmImageTransformer2DModel(**TINY).eval()


def _inputs(B, L, hw, t=999.0, valid=None, seed=1):
    """t: the transformer's timestep (the scheduler's t minus 1)."""
    g = torch.Generator().manual_seed(seed)
    n = hw[0] * hw[1]
    kw = dict(hidden_states=torch.randn(B, 4, 2 * hw[0], 2 * hw[1], generator=g),
              encoder_hidden_states=torch.randn(B, L, 24, generator=g),
              prior_token_id=torch.randint(0, 32, (B, n), generator=g), prior_token_drop=torch.zeros(B, n, dtype=torch.bool),
              timestep=torch.full((B,), t), target_size=torch.tensor([[64.0, 64.0]] * B),
              crop_coords=torch.zeros(B, 2), return_dict=False)
    if valid is not None:
        kw["attention_mask"] = (torch.arange(L)[None, :] >= (L - torch.tensor(valid))[:, None]).long()  # left-padded
    return kw


def _stock_mask(B, L, n, valid):
    if valid is None:
        return None
    m = torch.cat([(torch.arange(L)[None, :] >= (L - torch.tensor(valid))[:, None]).float(), torch.ones(B, n)], 1)
    return ((m[:, :, None] @ m[:, None, :]) > 0).unsqueeze(1).float()


def _glm_pipe(t):
    from diffusers import FlowMatchEulerDiscreteScheduler, GlmImagePipeline

    return GlmImagePipeline(tokenizer=None, processor=None, text_encoder=None, vision_language_encoder=None, vae=None,
                            transformer=t, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER))


def _sched_pipe(t):
    """A GlmImagePipeline around transformer ``t`` whose scheduler holds timesteps 1000, 667, 334, 1
    (the transformer gets 999, 666, 333, 0)."""
    pipe = _glm_pipe(t)
    ts = np.linspace(1000, 1.0, 4).astype(np.int64).astype(np.float32)  # 1000, 667, 334, 1
    pipe.scheduler.set_timesteps(timesteps=ts, sigmas=ts / 1000, mu=3.0)  # linear shift: sigma = 3 / (3 + 1 / s - 1)
    return pipe


def _check_model(monkeypatch, B, L, hw, valid=None):
    t = _transformer()
    pipe = _sched_pipe(t)
    import diffusers.models.transformers.transformer_glm_image as tg

    stock = StockCalls(monkeypatch, tg)
    with torch.no_grad():
        t(**_inputs(B, L, hw, valid=valid))
    monkeypatch.undo()
    cap = Capture(monkeypatch, shadow=True)
    with taca.enabled(pipe, gamma=1.3) as h, torch.no_grad():
        t(**_inputs(B, L, hw, valid=valid))
        assert h.last_gamma is not None
    assert len(cap.calls) == len(stock.calls) == TINY["num_layers"]
    N = L + hw[0] * hw[1]
    mask = _stock_mask(B, L, hw[0] * hw[1], valid)
    for (q, k, v, _, _), (sq, sk, sv, smask) in zip(cap.calls, stock.calls):
        assert torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv) and q.shape[1] == N
        assert (smask is None) == (mask is None)
        if mask is not None:
            assert smask.dtype == torch.float32 and torch.equal(smask, mask)
    text = span_mask(B, N, 0, L)
    check_spans_against_paper(cap.calls, text, ~text, torch.full((B,), 1.3), masks=mask)


@pytest.mark.parametrize("B,L,hw", [(2, 16, (3, 4)), (1, 5, (4, 2))])
def test_joint_calls_are_the_paper_definition(monkeypatch, B, L, hw):
    _check_model(monkeypatch, B, L, hw)


def test_text_mask_stays_additive(monkeypatch):
    """A 2-D text mask (left padding: 16 and 9 valid of 16): the stock processor's float 0/1 matrix is
    added after gamma, as SDPA adds it (it masks nothing)."""
    _check_model(monkeypatch, 2, 16, (3, 4), valid=[16, 9])


@pytest.mark.parametrize("valid", [None, [16, 9]])
@pytest.mark.parametrize("hw", [(3, 4), (2, 5)])
def test_outside_window_and_gamma_one_are_stock(valid, hw):
    """timestep 999 (scheduler t 1000, sigma 1) is in the window, 666 (t 667, sigma 0.667 shifted by
    mu = 3: 0.857) is not."""
    t = _transformer()
    pipe = _sched_pipe(t)
    before = processors_of(t)
    with torch.no_grad():
        ref_in = t(**_inputs(2, 16, hw, 999.0, valid))[0]
        ref_out = t(**_inputs(2, 16, hw, 666.0, valid))[0]
        h = taca.enable(pipe, gamma=1.3)
        assert h.kind == "glm_image" and {type(p).__name__ for p in h.processors.values()} == {
            "TacaGlmImageAttnProcessor"}
        assert torch.equal(t(**_inputs(2, 16, hw, 666.0, valid))[0], ref_out) and h.last_gamma is None
        assert not torch.equal(t(**_inputs(2, 16, hw, 999.0, valid))[0], ref_in)
        assert torch.equal(h.last_gamma, torch.full((2,), 1.3))
        taca.enable(pipe, gamma=1.0, schedule="constant")
        assert torch.equal(t(**_inputs(2, 16, hw, 999.0, valid))[0], ref_in)
        taca.disable(pipe)
    check_disable_restores(t, before)


def test_sigma_comes_from_the_scheduler():
    """The transformer gets the unshifted t minus 1: with mu = 3, timestep 666 (t 667) means sigma
    0.857 (inside a 0.8 threshold that 666 / 1000 would miss); a timestep that is not a scheduler
    t minus 1 (667 itself), or a bare transformer, is refused rather than read as t / 1000."""
    t = _transformer()
    pipe = _sched_pipe(t)
    with taca.enabled(pipe, gamma=1.3, schedule="paper:0.8") as h, torch.no_grad():
        t(**_inputs(1, 3, (2, 2), 666.0))
        assert h.last_gamma is not None
        t(**_inputs(1, 3, (2, 2), 333.0))
        assert h.last_gamma is None
        with pytest.raises(ValueError, match=r"timestep \[667.0\] is not one of the scheduler's timesteps"):
            t(**_inputs(1, 3, (2, 2), 667.0))
    with taca.enabled(t, gamma=1.3), torch.no_grad():
        with pytest.raises(ValueError, match="pass the pipeline to taca.enable"):
            t(**_inputs(1, 3, (2, 2), 999.0))


def test_kv_cache_mode_is_refused():
    """Condition images (GlmImageKVCache in write / read / skip mode) are refused with TACA on; the
    unused cache the text-to-image pipeline passes (mode None) is fine."""
    from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache

    t = _transformer()
    pipe = _sched_pipe(t)
    kv = GlmImageKVCache(num_layers=TINY["num_layers"])
    with taca.enabled(pipe, gamma=1.3) as h, torch.no_grad():
        t(**_inputs(1, 3, (2, 2)), kv_caches=kv)
        assert h.last_gamma is not None
        kv.set_mode("write")
        with pytest.raises(ValueError, match=r"GLM-Image with condition images \(kv_caches in write/read/skip mode\)"):
            t(**_inputs(1, 3, (2, 2)), kv_caches=kv)


def _pipe_sigmas(n_img_tokens, steps):
    """The sigmas GlmImagePipeline gets from its scheduler (its own timesteps, sigmas and mu)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.glm_image.pipeline_glm_image import calculate_shift

    sch = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    ts = np.linspace(1000, 1.0, steps + 1)[:-1].astype(np.int64).astype(np.float32)
    sch.set_timesteps(timesteps=ts, sigmas=ts / 1000, mu=calculate_shift(n_img_tokens, 256, 0.25, 0.75))
    return sch.sigmas[:-1]


@pytest.mark.parametrize("hw", [(32, 48), (64, 32)])
def test_pipeline_cfg_and_window(monkeypatch, hw):
    """GlmImagePipeline with CFG (glyph embeddings of 5 tokens for both branches, as the pipeline
    requires equal shapes; the negative branch drops the prior tokens) and prior token ids given:
    the window is the paper rule's on the scheduler's shifted sigmas (sync path: the pipeline passes
    a fresh t - 1), and every joint call in it is the paper's definition."""
    pipe = _glm_pipe(_transformer())
    steps = 6
    n_img = (hw[0] // 16) * (hw[1] // 16)
    g = torch.Generator().manual_seed(0)
    kw = dict(prompt_embeds=torch.randn(1, 5, 24, generator=g), negative_prompt_embeds=torch.randn(1, 5, 24, generator=g),
              prior_token_ids=torch.randint(0, 32, (1, n_img), generator=g), guidance_scale=4.0, height=hw[0],
              width=hw[1], num_inference_steps=steps, output_type="latent")
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    with taca.enabled(pipe, gamma=1.0, schedule="constant"):
        assert torch.equal(pipe(generator=torch.Generator().manual_seed(1), **kw).images, stock)
    cap = Capture(monkeypatch)
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, k, o: seen.append(
        (get_handle(m).last_gamma, get_handle(m).last_path)), with_kwargs=True)
    with taca.enabled(pipe, gamma=1.3):
        out = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    hook.remove()
    on = window(_pipe_sigmas(n_img, steps))
    assert on and on != list(range(steps)) and len(seen) == 2 * steps
    assert {p for _, p in seen} == {"sync"}
    assert [i for i in range(steps) if seen[2 * i][0] is not None] == on
    assert all((seen[2 * i][0] is None) == (seen[2 * i + 1][0] is None) for i in range(steps))
    n = TINY["num_layers"]
    assert len(cap.calls) == 2 * n * len(on)
    text = span_mask(1, 5 + n_img, 0, 5)
    check_spans_against_paper(cap.calls, text, ~text, torch.full((1,), 1.3))
    assert not torch.equal(out, stock)


def glm_image_windows():
    out = {}
    for n_img in (4096, 1024):  # 2048x2048 and 1024x1024 if 32x32 pixels per token (16x VAE, 2x2 patches: not checked)
        for steps in (30, 50):
            out[(steps, n_img)] = ranges(window(_pipe_sigmas(n_img, steps)))
    return out


def test_window_steps_with_the_real_scheduler():
    assert glm_image_windows() == EXPECTED_WINDOWS


# (steps, image tokens) -> steps with gamma; 50: the pipeline's default
EXPECTED_WINDOWS = {(30, 4096): "0-2", (50, 4096): "0-4", (30, 1024): "0-1", (50, 1024): "0-2"}
