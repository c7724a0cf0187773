"""Bria FIBO 2 (BriaFibo2Transformer2DModel; BriaFibo2Pipeline) with the taca.models.bria_fibo2
adapter, on tiny random-weight models: in the main blocks' joint attention, image and context-image
queries get gamma on the Perceiver's gist keys (the text), in both of the model's layouts ([gist,
img, ctx] when the batch's gist counts agree; [img, ctx, gist] with the stock key mask when they
differ); the noise refiner, the Perceiver and the injection cross-attention stay stock; outside
the window and at gamma = 1 the model is stock bit for bit; BriaFibo2Pipeline with CFG (two passes)
on a padded batch, and an edit."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("diffusers")

import taca
from taca.pipeline import get_handle

from model_checks import (check_checkpointing_keeps_state, Capture, StockCalls, check_against_paper, check_disable_restores,
                          check_spans_against_paper, processors_of, ranges, span_mask, window)

# gist counts: prompts of 2 tokens get 4 gist tokens, longer ones 8
TINY = dict(in_channels=4, patch_size=2, dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, cap_feat_dim=24,
            injection_layer_ids=(1,), perceiver_num_layers=1, min_num_gist_tokens=4, max_num_gist_tokens=8,
            gist_step=4, gist_min_text_len=2, gist_max_text_len=16, axes_dims=(8, 12, 12), axes_lens=(64, 32, 32))
N_MAIN = TINY["n_layers"]
# briaai/Fibo-2.0's scheduler config is taken to hold FLUX.1-dev's dynamic-shifting values (the
# pipeline passes mu = calculate_shift(image tokens, ...) from them); NOT read offline here.
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096)


def _transformer():
    from diffusers import BriaFibo2Transformer2DModel

    torch.manual_seed(0)
    t = BriaFibo2Transformer2DModel(**TINY).eval()
    with torch.no_grad():  # the injection gate starts at 0 (tanh(0) = 0): open it so the cross-attention counts
        for block in t.layers:
            if block.cross_attention is not None:
                block.cross_attn_gate.fill_(0.7)
    return t


def _inputs(B, L, hw, valid=None, ctx=(), sigma=0.98, seed=1):
    """hw: latent size; valid: per-sample text lengths (a bool mask); ctx: context latent sizes."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(hidden_states=torch.randn(B, 4, *hw, generator=g), timestep=torch.full((B,), sigma),
              encoder_hidden_states=torch.randn(B, 2, L, 24, generator=g), return_dict=False)
    if valid is not None:
        kw["encoder_attention_mask"] = torch.arange(L)[None, :] < torch.tensor(valid)[:, None]
    if ctx:
        kw["context_latents"] = [torch.randn(B, 4, *s, generator=g) for s in ctx]
    return kw


def _n_visual(hw, ctx=()):
    return sum((h // 2) * (w // 2) for h, w in [hw, *ctx])


def _gists(L, valid):
    """The model's gist counts of prompts of L tokens (valid: the unpadded lengths)."""
    from diffusers.models.transformers.transformer_bria_fibo2 import compute_gist_count

    c = TINY
    return compute_gist_count(valid if valid is not None else [L], c["min_num_gist_tokens"], c["max_num_gist_tokens"],
                              c["gist_step"], c["gist_min_text_len"], c["gist_max_text_len"])


def _run(monkeypatch, B, L, hw, valid=None, ctx=()):
    """Stock and shadowed TACA runs: (captured TACA calls, stock main-block calls, stock output, TACA output)."""
    import diffusers.models.transformers.transformer_bria_fibo2 as tf

    t = _transformer()
    n = _n_visual(hw, ctx) + max(_gists(L, valid))
    stock = StockCalls(monkeypatch, tf)
    with torch.no_grad():
        ref = t(**_inputs(B, L, hw, valid, ctx))[0]
    monkeypatch.undo()
    # refiner, Perceiver cross + self, every main block, the injection block's cross-attention
    assert len(stock.calls) == 1 + 2 + N_MAIN + 1
    main = [c for c in stock.calls if c[0].shape[1] == c[1].shape[1] == n]
    assert len(main) == N_MAIN
    cap = Capture(monkeypatch, shadow=True)
    others = StockCalls(monkeypatch, tf)
    with taca.enabled(t, gamma=1.3) as h, torch.no_grad():
        assert h.kind == "bria_fibo2" and sorted(h.processors) == [f"layers.{i}.attention" for i in range(N_MAIN)]
        out = t(**_inputs(B, L, hw, valid, ctx))[0]
    # the refiner, the Perceiver and the injection cross-attention ran stock, on stock inputs
    assert len(others.calls) == 4
    rest = [c for c in stock.calls if not any(c is m for m in main)]
    for (q, k, v, m), (sq, sk, sv, sm) in zip(others.calls, rest):
        assert torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv)
        assert (m is None) == (sm is None) and (m is None or torch.equal(m, sm))
    assert len(cap.calls) == N_MAIN
    for (q, k, v, _, _), (sq, sk, sv, _) in zip(cap.calls, main):
        assert torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv)
    assert torch.equal(out, ref)  # shadowed: the rest of the forward is stock's
    return cap.calls, main


@pytest.mark.parametrize("B,L,hw,valid,ctx", [
    (2, 10, (6, 8), None, ()),          # one gist count (8), no mask
    (1, 2, (4, 6), None, ()),           # 4 gist tokens
    (2, 10, (4, 4), [10, 7], ()),       # a padded batch whose gist counts agree: no main-block mask
    (2, 6, (4, 6), None, ((4, 4), (2, 6))),  # an edit with two context images: [gist, img, ctx1, ctx2]
])
def test_gist_first_calls_are_the_paper_definition(monkeypatch, B, L, hw, valid, ctx):
    calls, main = _run(monkeypatch, B, L, hw, valid, ctx)
    G = max(_gists(L, valid))
    assert all(m[3] is None for m in main)
    assert all(c[0].shape[1] == G + _n_visual(hw, ctx) for c in calls)
    check_against_paper(calls, G, torch.full((B,), 1.3))


@pytest.mark.parametrize("hw,ctx", [((4, 6), ()), ((6, 4), ((4, 4),))])
def test_unequal_gist_counts_gist_last_with_the_stock_mask(monkeypatch, hw, ctx):
    """Prompts of 9 and 2 valid tokens: 8 and 4 gist tokens, so the model puts the gist last and
    masks the second prompt's 4 pad gist keys; the mask stays, image and context queries get
    gamma on the (real) gist keys."""
    valid = [9, 2]
    assert _gists(10, valid) == [8, 4]
    calls, main = _run(monkeypatch, 2, 10, hw, valid, ctx)
    nv = _n_visual(hw, ctx)
    n = nv + 8
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, nv + 4:] = False
    mask = mask[:, None, None, :]
    assert all(torch.equal(m[3], mask) for m in main)
    assert all(c[3]["text_first"] is False and c[3]["text_len"] == 8 for c in calls)
    key_text = span_mask(2, n, nv, 8)
    check_spans_against_paper(calls, key_text, ~key_text, torch.full((2,), 1.3), masks=mask)


@pytest.mark.parametrize("hw,valid,ctx", [((4, 6), None, ()), ((6, 2), [9, 2], ()), ((4, 6), [9, 2], ((4, 4),)),
                                           ((6, 2), None, ((2, 2),))])
def test_outside_window_and_gamma_one_are_stock(hw, valid, ctx):
    """Both layouts (gist first; gist last with the mask), with and without context images, at two
    resolutions."""
    t = _transformer()
    before = processors_of(t)
    inp = lambda sigma: _inputs(2, 10, hw, valid, ctx, sigma=sigma)  # noqa: E731
    with torch.no_grad():
        ref_in = t(**inp(0.98))[0]
        ref_out = t(**inp(0.5))[0]
        h = taca.enable(t, gamma=1.3)
        assert {type(p).__name__ for p in h.processors.values()} == {"TacaBriaFibo2AttnProcessor"}
        for name, p in processors_of(t).items():  # refiner, Perceiver, injection: the stock objects
            assert (p is before[name]) == (not (name.startswith("layers.") and name.endswith(".attention"))), name
        assert torch.equal(t(**inp(0.5))[0], ref_out) and h.last_gamma is None
        assert not torch.equal(t(**inp(0.98))[0], ref_in)
        taca.enable(t, gamma=1.0, schedule="constant")
        assert torch.equal(t(**inp(0.98))[0], ref_in)
        taca.disable(t)
    check_disable_restores(t, before)
    with torch.no_grad():
        assert torch.equal(t(**inp(0.98))[0], ref_in)


def test_gradient_checkpointing_keeps_the_call_state():
    check_checkpointing_keeps_state(_transformer, _inputs(1, 4, (4, 4)))


def test_a_sequence_the_adapter_does_not_know_is_refused():
    """The gist count is the joint sequence minus the image and context tokens the hook counted; a
    call whose sequence holds fewer tokens than that raises, naming the layouts supported."""
    t = _transformer()
    with taca.enabled(t, gamma=1.3) as h, torch.no_grad():
        p = h.processors["layers.0.attention"]
        p.taca_call = {"taca_gamma": torch.full((1,), 1.3), "taca_visual_len": 1000}
        attn = t.layers[0].attention
        with pytest.raises(ValueError, match=r"expected \[gist, img, ctx_img\] or \[img, ctx_img, gist\]"):
            p(attn, torch.randn(1, 20, 64))
        p.taca_call = None


def _pipeline():
    from diffusers import AutoencoderKLFlux2, BriaFibo2Pipeline, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                             down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    pipe = BriaFibo2Pipeline(transformer=_transformer(), scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
                             vae=vae, text_encoder=None, processor=None)
    pipe.default_sample_size = 16  # an edit's default size: about 16 x 16 pixels (the tiny VAE's factor is 1)
    return pipe


def _sched_window(n_img, steps):
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.bria_fibo2.pipeline_bria_fibo2 import calculate_shift

    sch = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    c = sch.config
    mu = calculate_shift(n_img, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return window(sch.timesteps / 1000)


@pytest.mark.parametrize("hw", [(8, 12), (12, 8)])
def test_pipeline_cfg_padded_batch_and_window(monkeypatch, hw):
    """BriaFibo2Pipeline: two prompts padded to 10 tokens (9 and 2 valid: 8 and 4 gist tokens, gist
    last with the mask), the negative prompts unpadded (6 tokens: 8 gist tokens, gist first) in a
    second pass: gamma from the pipeline's t / 1000 (one sync per call), the window the paper rule's
    on the scheduler's sigmas, every main-block call in it the paper's definition, gamma 1 stock."""
    pipe = _pipeline()
    steps = 4
    g = torch.Generator().manual_seed(0)
    mask = torch.arange(10)[None, :] < torch.tensor([9, 2])[:, None]
    kw = dict(prompt_embeds=torch.randn(2, 2, 10, 24, generator=g), prompt_embeds_mask=mask,
              negative_prompt_embeds=torch.randn(2, 2, 6, 24, generator=g), height=hw[0], width=hw[1],
              num_inference_steps=steps, guidance_scale=4.0, output_type="latent")
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    cap = Capture(monkeypatch)
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, k, o: seen.append(
        (k["encoder_hidden_states"].shape[2], get_handle(m).last_gamma, get_handle(m).last_path)), with_kwargs=True)
    with taca.enabled(pipe, gamma=1.3):
        out = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    hook.remove()
    nv = (hw[0] // 2) * (hw[1] // 2)
    on = _sched_window(nv, steps)
    assert on == [0]  # few image tokens: a small shift
    assert [L for L, _, _ in seen] == [10, 6] * steps and {p for _, _, p in seen} == {"sync"}
    assert [i for i in range(steps) if seen[2 * i][1] is not None] == on
    assert all((seen[2 * i][1] is None) == (seen[2 * i + 1][1] is None) for i in range(steps))
    assert len(cap.calls) == 2 * N_MAIN * len(on)
    n = nv + 8
    pad = torch.ones(2, n, dtype=torch.bool)
    pad[1, nv + 4:] = False
    key_last = span_mask(2, n, nv, 8)
    for j in range(0, len(cap.calls), N_MAIN):
        chunk = cap.calls[j : j + N_MAIN]
        if (j // N_MAIN) % 2 == 0:  # the prompts: gist last, masked
            check_spans_against_paper(chunk, key_last, ~key_last, torch.full((2,), 1.3), masks=pad[:, None, None, :])
        else:  # the negative prompts: gist first, no mask
            check_against_paper(chunk, 8, torch.full((2,), 1.3))
    assert not torch.equal(out, stock)
    with taca.enabled(pipe, gamma=1.0, schedule="constant"):
        assert torch.equal(pipe(generator=torch.Generator().manual_seed(1), **kw).images, stock)


def test_pipeline_edit(monkeypatch):
    """BriaFibo2Pipeline editing one image (its VAE latents become context tokens after the image,
    visual queries too); prompt embeddings given, guidance off."""
    import numpy as np
    import PIL.Image

    pipe = _pipeline()
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 12, 3), dtype=np.uint8))
    kw = dict(image=image, prompt_embeds=torch.randn(1, 2, 5, 24, generator=torch.Generator().manual_seed(0)),
              height=8, width=8, num_inference_steps=3, guidance_scale=1.0, output_type="latent")
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    cap = Capture(monkeypatch)
    ctx = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, k: ctx.append(
        [tuple(c.shape) for c in k["context_latents"]]), with_kwargs=True)
    with taca.enabled(pipe, gamma=1.3):
        out = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    hook.remove()
    assert _sched_window(16, 3) == [0] and len(cap.calls) == N_MAIN
    (c,) = ctx[0]
    n_ctx = (c[2] // 2) * (c[3] // 2)
    assert n_ctx > 0 and all(q.shape[1] == 8 + 16 + n_ctx for q, *_ in cap.calls)
    check_against_paper(cap.calls, 8, torch.full((1,), 1.3))
    assert not torch.equal(out, stock)


def fibo2_windows():
    return {(steps, n_img): ranges(_sched_window(n_img, steps)) for n_img in (4096, 1024) for steps in (30, 50)}


def test_window_steps_with_the_real_scheduler():
    """The README's table (the scheduler config as assumed above)."""
    assert fibo2_windows() == EXPECTED_WINDOWS


# (steps, image tokens) -> steps with gamma; 4096 tokens = 1024 x 1024 (VAE x8, 2 x 2 patches)
EXPECTED_WINDOWS = {(30, 4096): "0-2", (50, 4096): "0-4", (30, 1024): "0-1", (50, 1024): "0-2"}
