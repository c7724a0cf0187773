"""Z-Image (ZImageTransformer2DModel: per-sample [image, caption] blocks padded to multiples of 32,
then batch padding; reversed timestep t = 1 - sigma; refiners stock) with the taca.models.zimage
adapter, on tiny random-weight models: every main-layer attention call inside the window is the
paper's definition on the stock q, k, v with each sample's own text span (the caption block, its
pad tokens included) and the stock key mask, outside it and at gamma = 1 the model is stock bit
for bit; ZImagePipeline with batched CFG (prompts of 7 and 4 tokens) at two resolutions."""
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("diffusers")

import taca
from taca.pipeline import get_handle

from model_checks import (Capture, StockCalls, check_disable_restores,
                          paper_attention, processors_of, ranges, window)
from model_checks import check_checkpointing_keeps_state


N_LAYERS = 2
TINY = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=64, n_layers=N_LAYERS,
            n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=24,
            rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 12, 12], axes_lens=[256, 64, 64])


def _transformer():
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    return ZImageTransformer2DModel(**TINY).eval()


def _inputs(hws, caps, sigma=0.98, seed=1):
    """hws: per-sample latent (H, W); caps: per-sample caption lengths."""
    g = torch.Generator().manual_seed(seed)
    return dict(x=[torch.randn(4, 1, h, w, generator=g) for h, w in hws], t=torch.full((len(hws),), 1 - sigma),
                cap_feats=[torch.randn(n, 24, generator=g) for n in caps], return_dict=False)


def _up(n):
    return n + (-n) % 32


def _spans(hws, caps):
    """(text start, text length) per sample in the unified sequence, and its length."""
    x = [_up((h // 2) * (w // 2)) for h, w in hws]
    c = [_up(n) for n in caps]
    return x, c, max(a + b for a, b in zip(x, c))


def _paper_spans(q, k, v, starts, lens, gamma, mask):
    """The paper's definition with per-sample text spans: sample by sample (text keys and queries
    of sample b are [starts[b], starts[b] + lens[b]); every other query is visual, batch padding
    included: its rows are discarded by the model), with the stock bool key mask."""
    outs = []
    for b in range(q.shape[0]):
        s, n = starts[b], lens[b]
        perm = [i for i in range(q.shape[1]) if not s <= i < s + n] + list(range(s, s + n))  # text last
        inv = torch.argsort(torch.tensor(perm))
        m = None if mask is None else mask[b : b + 1][..., perm]
        o = paper_attention(q[b : b + 1, perm], k[b : b + 1, perm], v[b : b + 1, perm], n, gamma[b : b + 1], m,
                            text_first=False)
        outs.append(o[:, inv])
    return torch.cat(outs)


def _check(monkeypatch, hws, caps):
    import diffusers.models.transformers.transformer_z_image as tz

    t = _transformer()
    stock = StockCalls(monkeypatch, tz)
    with torch.no_grad():
        t(**_inputs(hws, caps))
    monkeypatch.undo()
    cap = Capture(monkeypatch, shadow=True)
    with taca.enabled(t, gamma=1.3) as h, torch.no_grad():
        assert h.kind == "zimage" and sorted(h.processors) == [f"layers.{i}.attention" for i in range(N_LAYERS)]
        t(**_inputs(hws, caps))
    B = len(hws)
    x, c, seq = _spans(hws, caps)
    main = stock.calls[-N_LAYERS:]  # after noise_refiner's and context_refiner's calls
    assert len(cap.calls) == N_LAYERS and len(stock.calls) == 2 * TINY["n_refiner_layers"] + N_LAYERS
    uniform = len(set(x)) == 1 and len(set(c)) == 1
    expect_mask = None if uniform else (torch.arange(seq)[None, :] < torch.tensor([a + b for a, b in zip(x, c)])[:, None])
    gamma = torch.full((B,), 1.3)
    for (q, k, v, kw, out), (sq, sk, sv, smask) in zip(cap.calls, main):
        assert torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv) and q.shape[1] == seq
        assert kw["layout"] == "bnhd" and kw["scale"] == 1 / math.sqrt(q.shape[-1]) and torch.equal(kw["gamma"], gamma)
        if uniform:
            assert smask is None and kw.get("attn_mask") is None and kw.get("text_start") is None
            assert kw["text_first"] is False and kw["text_len"] == c[0]
            expect = paper_attention(q, k, v, c[0], gamma, text_first=False)
        else:
            m = expect_mask[:, None, None, :]
            assert torch.equal(smask, m) and torch.equal(kw["attn_mask"], m)  # the processor makes it (B, 1, 1, L)
            assert kw["text_start"].tolist() == x and kw["text_len"].tolist() == c
            expect = _paper_spans(q, k, v, x, c, gamma, m)
        torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("hws,caps", [
    ([(8, 8), (8, 8)], [5, 20]),  # both captions pad to 32: one span, text last
    ([(16, 12)], [40]),  # 48 image tokens -> 64, caption 40 -> 64
    ([(8, 12), (8, 12)], [33, 64]),
])
def test_joint_calls_are_the_paper_definition(monkeypatch, hws, caps):
    _check(monkeypatch, hws, caps)


@pytest.mark.parametrize("hws,caps", [
    ([(8, 8), (8, 8)], [5, 40]),  # CFG batch [prompt, negative] of unequal padded lengths: 32 vs 64
    ([(8, 8), (16, 12)], [7, 7]),  # images of different sizes: the captions start at 32 and 64
])
def test_per_sample_spans_and_stock_mask(monkeypatch, hws, caps):
    _check(monkeypatch, hws, caps)


def test_omni_mode_is_refused():
    t = _transformer()
    with taca.enabled(t, gamma=1.3), torch.no_grad():
        with pytest.raises(NotImplementedError, match="Z-Image omni mode"):
            t(x=[[torch.randn(4, 1, 8, 8)]], t=torch.full((1,), 0.02), cap_feats=[[torch.randn(5, 24)]],
              siglip_feats=[None], image_noise_mask=[[1]], return_dict=False)


@pytest.mark.parametrize("hws,caps", [([(8, 8), (8, 8)], [5, 20]), ([(16, 12), (16, 12)], [40, 7]),
                                      ([(8, 8), (16, 12)], [5, 40])])
def test_outside_window_and_gamma_one_are_stock(hws, caps):
    t = _transformer()
    before = processors_of(t)
    with torch.no_grad():
        ref_in = t(**_inputs(hws, caps, sigma=0.98))[0]
        ref_out = t(**_inputs(hws, caps, sigma=0.5))[0]
        h = taca.enable(t, gamma=1.3)
        assert {type(p).__name__ for p in h.processors.values()} == {"TacaZSingleStreamAttnProcessor"}
        out = t(**_inputs(hws, caps, sigma=0.5))[0]
        assert all(torch.equal(a, b) for a, b in zip(out, ref_out)) and h.last_gamma is None
        taca.enable(t, gamma=1.0, schedule="constant")
        out = t(**_inputs(hws, caps, sigma=0.98))[0]
        assert all(torch.equal(a, b) for a, b in zip(out, ref_in))
        taca.disable(t)
    check_disable_restores(t, before)


# Tongyi-MAI/Z-Image-Turbo scheduler/scheduler_config.json is taken to be FlowMatchEulerDiscreteScheduler
# with shift 3.0 and no dynamic shifting (as remembered, not read offline here; the pipeline's mu
# is then unused).
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


def _pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=None, text_encoder=None,
                          tokenizer=None, transformer=_transformer())


@pytest.mark.parametrize("hw", [(64, 64), (128, 96)])
def test_pipeline_cfg_unequal_prompts_and_window(monkeypatch, hw):
    """ZImagePipeline batches CFG as [prompt, negative] with their own caption lengths (7 and 4
    tokens: both pad to 32, so one span): gamma from t = 1 - sigma, the window the paper rule's on
    the scheduler, every main-layer call in it the paper's definition, gamma 1 stock."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas

    pipe = _pipeline()
    steps = 6
    g = torch.Generator().manual_seed(0)
    kw = dict(prompt_embeds=[torch.randn(7, 24, generator=g)], negative_prompt_embeds=[torch.randn(4, 24, generator=g)],
              height=hw[0], width=hw[1], num_inference_steps=steps, guidance_scale=4.0, output_type="latent")
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    cap = Capture(monkeypatch)
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, k, o: seen.append(
        ([len(c) for c in a[2]], get_handle(m).last_gamma, get_handle(m).last_path)), with_kwargs=True)
    with taca.enabled(pipe, gamma=1.3):
        out = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    hook.remove()
    sch = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    sch.set_timesteps(sigmas=get_default_z_image_sigmas(steps))
    on = window(sch.timesteps / 1000)
    assert on and [c for c, _, _ in seen] == [[7, 4]] * steps and {p for _, _, p in seen} == {"sync"}
    assert [i for i in range(steps) if seen[i][1] is not None] == on
    n_img = _up((hw[0] // 16) * (hw[1] // 16))
    assert len(cap.calls) == N_LAYERS * len(on)
    for q, k, v, kw_, o in cap.calls:
        assert q.shape[1] == n_img + 32 and kw_["text_len"] == 32 and kw_["text_first"] is False
        torch.testing.assert_close(o.double(), paper_attention(q, k, v, 32, torch.full((2,), 1.3), text_first=False),
                                   rtol=1e-5, atol=2e-6)
    assert not torch.equal(out, stock)
    with taca.enabled(pipe, gamma=1.0, schedule="constant"):
        assert torch.equal(pipe(generator=torch.Generator().manual_seed(1), **kw).images, stock)


def zimage_windows():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas

    out = {}
    for steps in (8, 9, 28, 50):  # Turbo: 8-9 steps; 28 / 50 for the base model's CFG runs
        sch = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
        sch.set_timesteps(sigmas=get_default_z_image_sigmas(steps))
        out[steps] = ranges(window(sch.timesteps / 1000))
    return out


def test_window_steps_with_the_real_scheduler():
    assert zimage_windows() == EXPECTED_WINDOWS


# steps -> steps with gamma
EXPECTED_WINDOWS = {8: "0", 9: "0", 28: "0-2", 50: "0-4"}


@pytest.mark.parametrize("hws,caps", [([(8, 8), (8, 8)], [5, 20]),  # one span, padded captions
                                      ([(8, 8), (16, 12)], [5, 40])])  # per-sample spans, stock key mask
def test_gradient_checkpointing_keeps_the_call_state(hws, caps):
    """The forward carries no attention kwargs: the hook hands each call's state (per-sample spans
    included) to the processors, and to the blocks recomputed in the backward pass through the
    checkpointing function (t = 1 - sigma)."""
    from diffusers import ZImageTransformer2DModel

    class OneTensor(ZImageTransformer2DModel):
        def forward(self, *args, **kwargs):
            return (torch.cat([o.flatten() for o in super().forward(*args, **kwargs)[0]]),)

    def make():
        t = _transformer()
        t.__class__ = OneTensor  # same modules and weights; the check wants one tensor: the samples concatenated
        return t

    check_checkpointing_keeps_state(make, _inputs(hws, caps))
