"""Bria 3.x (BriaTransformer2DModel; its forward carries no attention kwargs to the processors)
and Bria FIBO (BriaFiboTransformer2DModel; FIBO double-stream processors, Bria single-stream
ones, a bool key mask through joint_attention_kwargs for padded prompts) with the
taca.models.bria adapters, on tiny random-weight models: every joint attention call inside the
window is the paper's definition (with FIBO Edit's reference latents after the image and FIBO's
padded CFG batch), outside it and at gamma = 1 the model is stock bit for bit; BriaPipeline with
CFG at two resolutions."""
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

TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=[4, 6, 6])
N_CALLS = TINY["num_layers"] + TINY["num_single_layers"]
# briaai/BRIA-3.2's scheduler is taken to be FlowMatchEulerDiscreteScheduler without dynamic
# shifting and shift 1 (then BriaPipeline samples its sigmas from the training grid,
# get_original_sigmas); not read offline here.
BRIA_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
# briaai/FIBO's scheduler config is taken to hold FLUX.1-dev's dynamic-shifting values; not read
# offline here (BriaFiboPipeline reads base/max image_seq_len and shift without fallbacks).
FIBO_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                      max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def _bria():
    from diffusers import BriaTransformer2DModel

    torch.manual_seed(0)
    return BriaTransformer2DModel(**TINY).eval()


def _fibo():
    from diffusers import BriaFiboTransformer2DModel

    torch.manual_seed(0)
    return BriaFiboTransformer2DModel(**TINY, text_encoder_dim=20).eval()


def _inputs(B, L, hw, n_ref=0, sigma=0.98, seed=1, fibo=False, valid=None):
    """valid: per-sample unpadded text lengths (FIBO: the pipeline's bool key mask)."""
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    n = h * w + n_ref
    ids = torch.cartesian_prod(torch.zeros(1), torch.arange(h).float(), torch.arange(w).float())
    if n_ref:
        ids = torch.cat([ids, torch.cartesian_prod(torch.ones(1), torch.arange(n_ref).float(), torch.zeros(1))])
    kw = dict(hidden_states=torch.randn(B, n, 16, generator=g), encoder_hidden_states=torch.randn(B, L, 24, generator=g),
              timestep=torch.full((B,), sigma * 1000), img_ids=ids, txt_ids=torch.zeros(L, 3), return_dict=False)
    if fibo:
        kw["text_encoder_layers"] = [torch.randn(B, L, 20, generator=g) for _ in range(N_CALLS)]
        if valid is not None:
            text = torch.arange(L)[None, :] < torch.tensor(valid)[:, None]
            mask = torch.cat([text, torch.ones(B, n, dtype=torch.bool)], dim=1)[:, None, None, :]
            kw["joint_attention_kwargs"] = {"attention_mask": mask}
    return kw


def _check(monkeypatch, make, module, B, L, hw, n_ref=0, fibo=False, valid=None):
    t = make()
    stock = StockCalls(monkeypatch, module)
    with torch.no_grad():
        t(**_inputs(B, L, hw, n_ref, fibo=fibo, valid=valid))
    monkeypatch.undo()
    cap = Capture(monkeypatch, shadow=True)
    with taca.enabled(t, gamma=1.3) as h, torch.no_grad():
        assert h.kind == ("bria_fibo" if fibo else "bria")
        t(**_inputs(B, L, hw, n_ref, fibo=fibo, valid=valid))
    mask = (_inputs(B, L, hw, n_ref, fibo=fibo, valid=valid).get("joint_attention_kwargs") or {}).get("attention_mask")
    assert len(cap.calls) == len(stock.calls) == N_CALLS
    for (q, k, v, _, _), (sq, sk, sv, smask) in zip(cap.calls, stock.calls):
        assert torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv)
        assert q.shape[1] == L + hw[0] * hw[1] + n_ref
        assert (smask is None) == (mask is None) and (mask is None or torch.equal(smask, mask))
    check_against_paper(cap.calls, L, torch.full((B,), 1.3), None if mask is None else [mask] * N_CALLS)


@pytest.mark.parametrize("B,L,hw", [(2, 7, (4, 5)), (1, 1, (3, 4))])
def test_bria_joint_calls_are_the_paper_definition(monkeypatch, B, L, hw):
    import diffusers.models.transformers.transformer_bria as tm

    _check(monkeypatch, _bria, tm, B, L, hw)


@pytest.mark.parametrize("B,L,hw,n_ref", [(2, 7, (4, 5), 0), (1, 1, (3, 4), 0), (2, 5, (3, 3), 6)])
def test_fibo_joint_calls_are_the_paper_definition(monkeypatch, B, L, hw, n_ref):
    """FIBO's double-stream (BriaFiboAttnProcessor) and single-stream (BriaAttnProcessor) calls;
    FIBO Edit's reference tokens after the image are visual queries."""
    import diffusers.models.transformers.transformer_bria_fibo as tf

    # dispatch_attention_fn of both files: FIBO's single blocks run transformer_bria's processor
    import diffusers.models.transformers.transformer_bria as tb

    t = _fibo()
    stock_f, stock_b = StockCalls(monkeypatch, tf), StockCalls(monkeypatch, tb)
    with torch.no_grad():
        t(**_inputs(B, L, hw, n_ref, fibo=True))
    monkeypatch.undo()
    assert len(stock_f.calls) == TINY["num_layers"] and len(stock_b.calls) == TINY["num_single_layers"]
    cap = Capture(monkeypatch, shadow=True)
    with taca.enabled(t, gamma=1.3), torch.no_grad():
        t(**_inputs(B, L, hw, n_ref, fibo=True))
    assert len(cap.calls) == N_CALLS
    for (q, k, v, _, _), (sq, sk, sv, smask) in zip(cap.calls, stock_f.calls + stock_b.calls):
        assert smask is None and torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv)
        assert q.shape[1] == L + hw[0] * hw[1] + n_ref
    check_against_paper(cap.calls, L, torch.full((B,), 1.3))


@pytest.mark.parametrize("hw,n_ref", [((4, 5), 0), ((3, 3), 6)])
def test_fibo_padded_cfg_batch_keeps_the_stock_mask(monkeypatch, hw, n_ref):
    """BriaFiboPipeline's CFG batch: [negative (4 valid tokens), positive (7)] padded to 7, the
    bool key mask passed through joint_attention_kwargs to every block."""
    import diffusers.models.transformers.transformer_bria_fibo as tf

    t = _fibo()
    stock = StockCalls(monkeypatch, tf)
    with torch.no_grad():
        t(**_inputs(2, 7, hw, n_ref, fibo=True, valid=[4, 7]))
    monkeypatch.undo()
    mask = _inputs(2, 7, hw, n_ref, fibo=True, valid=[4, 7])["joint_attention_kwargs"]["attention_mask"]
    assert len(stock.calls) == TINY["num_layers"] and all(torch.equal(s[3], mask) for s in stock.calls)
    cap = Capture(monkeypatch, shadow=True)
    with taca.enabled(t, gamma=1.3), torch.no_grad():
        t(**_inputs(2, 7, hw, n_ref, fibo=True, valid=[4, 7]))
    assert len(cap.calls) == N_CALLS
    for (q, k, v, _, _), (sq, sk, sv, _) in zip(cap.calls, stock.calls):
        assert torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv)
    check_against_paper(cap.calls, 7, torch.full((2,), 1.3), [mask] * N_CALLS)


@pytest.mark.parametrize("fibo,valid", [(False, None), (True, None), (True, [4, 7])])
@pytest.mark.parametrize("hw", [(4, 5), (6, 3)])
def test_outside_window_and_gamma_one_are_stock(fibo, valid, hw):
    t = _fibo() if fibo else _bria()
    before = processors_of(t)
    inp = lambda sigma: _inputs(2, 7, hw, sigma=sigma, fibo=fibo, valid=valid)  # noqa: E731
    with torch.no_grad():
        ref_in = t(**inp(0.98))[0]
        ref_out = t(**inp(0.5))[0]
        h = taca.enable(t, gamma=1.3)
        assert {type(p).__name__ for p in h.processors.values()} == {"TacaFluxLikeProcessor"}
        assert len(h.processors) == N_CALLS
        assert torch.equal(t(**inp(0.5))[0], ref_out) and h.last_gamma is None
        assert not torch.equal(t(**inp(0.98))[0], ref_in)
        taca.enable(t, gamma=1.0, schedule="constant")
        assert torch.equal(t(**inp(0.98))[0], ref_in)
        taca.disable(t)
    check_disable_restores(t, before)


def _bria_pipeline():
    from diffusers import AutoencoderKL, BriaPipeline, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        shift_factor=0.0, scaling_factor=1.0)
    return BriaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**BRIA_SCHEDULER), vae=vae, text_encoder=None,
                        tokenizer=None, transformer=_bria())


@pytest.mark.parametrize("hw", [(16, 24), (24, 12)])
def test_bria_pipeline_cfg_and_window(monkeypatch, hw):
    """BriaPipeline batches CFG as [negative, positive] (one text length: it pads every prompt to
    max_sequence_length): gamma from the pipeline's raw t (host path), the window the paper rule's
    on the scheduler's sigmas, every joint call in it the paper's definition, gamma 1 stock."""
    from diffusers.pipelines.bria.pipeline_bria import get_original_sigmas

    pipe = _bria_pipeline()
    steps = 6
    g = torch.Generator().manual_seed(0)
    kw = dict(prompt_embeds=torch.randn(1, 7, 24, generator=g), negative_prompt_embeds=torch.randn(1, 7, 24, generator=g),
              height=hw[0], width=hw[1], num_inference_steps=steps, guidance_scale=5.0, output_type="latent")
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    cap = Capture(monkeypatch)
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, k, o: seen.append(
        (k["encoder_hidden_states"].shape, get_handle(m).last_gamma, get_handle(m).last_path)), with_kwargs=True)
    with taca.enabled(pipe, gamma=1.3):
        out = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    hook.remove()
    n_img = (hw[0] // 2) * (hw[1] // 2)  # BriaPipeline: latents 2 (h // vae_scale_factor) with the tiny VAE's factor 2, 2x2 packing
    on = window(get_original_sigmas(1000, steps))
    assert on == [0]
    assert [tuple(s) for s, _, _ in seen] == [(2, 7, 24)] * steps and {p for _, _, p in seen} == {"host"}
    assert [i for i in range(steps) if seen[i][1] is not None] == on
    assert len(cap.calls) == N_CALLS * len(on)
    assert all(cq.shape[1] == 7 + n_img for cq, *_ in cap.calls)
    check_against_paper(cap.calls, 7, torch.full((2,), 1.3))
    assert not torch.equal(out, stock)
    with taca.enabled(pipe, gamma=1.0, schedule="constant"):
        assert torch.equal(pipe(generator=torch.Generator().manual_seed(1), **kw).images, stock)


def bria_windows():
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.bria.pipeline_bria import get_original_sigmas
    from diffusers.pipelines.bria_fibo.pipeline_bria_fibo import calculate_shift

    out = {}
    for steps in (30, 50):  # BriaPipeline's default 30
        sch = FlowMatchEulerDiscreteScheduler(**BRIA_SCHEDULER)
        sch.set_timesteps(sigmas=get_original_sigmas(1000, steps))
        out[("bria", steps)] = ranges(window(sch.timesteps / 1000))
    for n_img in (4096, 1024):
        for steps in (30, 50):  # BriaFiboPipeline's default 50
            sch = FlowMatchEulerDiscreteScheduler(**FIBO_SCHEDULER)
            c = sch.config
            mu = calculate_shift(n_img, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
            sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
            out[("fibo", steps, n_img)] = ranges(window(sch.timesteps / 1000))
    return out


def test_window_steps_with_the_real_scheduler():
    assert bria_windows() == EXPECTED_WINDOWS


# ("bria", steps) or ("fibo", steps, image tokens) -> steps with gamma
EXPECTED_WINDOWS = {("bria", 30): "0", ("bria", 50): "0-1", ("fibo", 30, 4096): "0-2", ("fibo", 50, 4096): "0-4",
                    ("fibo", 30, 1024): "0-1", ("fibo", 50, 1024): "0-2"}


def test_bria_gradient_checkpointing_keeps_the_call_state():
    """Bria 3.2's forward carries no attention kwargs: the hook hands each call's state to the
    processors, and to the blocks recomputed in the backward pass through the checkpointing function
    (t = 1000 sigma; no attention mask)."""
    check_checkpointing_keeps_state(_bria, _inputs(2, 7, (4, 5)))


@pytest.mark.parametrize("valid,n_ref", [(None, 0), ([4, 7], 0), ([4, 7], 6)])
def test_fibo_gradient_checkpointing_keeps_the_call_state(valid, n_ref):
    """FIBO's checkpointed blocks get joint_attention_kwargs (TACA's state and the pipeline's key mask)
    and the per-block text encoder layers like the plain ones, padded prompts and edit references
    included: output and gradients equal the plain forward's."""
    check_checkpointing_keeps_state(_fibo, _inputs(2, 7, (4, 5), n_ref, fibo=True, valid=valid))
