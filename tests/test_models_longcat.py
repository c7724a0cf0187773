"""LongCat-Image (LongCatImageTransformer2DModel, a FLUX.1 clone whose forward takes no attention
kwargs) with the taca.models.longcat adapter, on tiny random-weight models: every joint attention
call inside the window is the paper's definition (with the Edit layout's reference latents after
the image), outside it and at gamma = 1 the model is stock bit for bit, and LongCatImagePipeline
with CFG and unequal prompt lengths at two resolutions."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("diffusers")

import taca
from taca.pipeline import get_handle

from model_checks import (Capture, StockCalls, check_against_paper, check_disable_restores, processors_of,
                          ranges, window)
from model_checks import check_checkpointing_keeps_state

TINY = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=24, axes_dims_rope=[4, 6, 6])
# meituan-longcat/LongCat-Image scheduler/scheduler_config.json is taken to hold FLUX.1-dev's values
# (the ones LongCatImagePipeline falls back to when a key is missing); not read offline here.
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096)
N_CALLS = TINY["num_layers"] + TINY["num_single_layers"]


def _transformer():
    from diffusers import LongCatImageTransformer2DModel

    torch.manual_seed(0)
    return LongCatImageTransformer2DModel(**TINY).eval()


def _inputs(B, L, hw, n_ref=0, sigma=0.98, seed=1):
    """[txt, img, ref] as the pipelines build it (position ids: modality 0 text, 1 image, 2 reference)."""
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    ids = torch.cartesian_prod(torch.ones(1), torch.arange(h).float() + 512, torch.arange(w).float() + 512)
    if n_ref:
        ids = torch.cat([ids, torch.cartesian_prod(torch.full((1,), 2.0), torch.arange(n_ref).float() + 512,
                                                   torch.full((1,), 512.0))])
    txt_ids = torch.stack([torch.zeros(L), torch.arange(L).float(), torch.arange(L).float()], dim=1)
    return dict(hidden_states=torch.randn(B, h * w + n_ref, 64, generator=g),
                encoder_hidden_states=torch.randn(B, L, 24, generator=g),
                timestep=torch.full((B,), sigma), img_ids=ids, txt_ids=txt_ids, return_dict=False)


@pytest.mark.parametrize("B,L,hw,n_ref", [(2, 7, (4, 5), 0), (1, 1, (3, 4), 0), (2, 9, (3, 6), 8)])
def test_joint_calls_are_the_paper_definition(monkeypatch, B, L, hw, n_ref):
    """Double- and single-stream calls (the hook gives the single ones the text length through
    the processors' call state); Edit's reference tokens after the image are visual queries."""
    import diffusers.models.transformers.transformer_longcat_image as tm

    t = _transformer()
    stock = StockCalls(monkeypatch, tm)
    with torch.no_grad():
        t(**_inputs(B, L, hw, n_ref))
    monkeypatch.undo()
    cap = Capture(monkeypatch, shadow=True)
    with taca.enabled(t, gamma=1.3) as h, torch.no_grad():
        assert h.kind == "longcat"
        t(**_inputs(B, L, hw, n_ref))
    assert len(cap.calls) == len(stock.calls) == N_CALLS
    for (q, k, v, _, _), (sq, sk, sv, smask) in zip(cap.calls, stock.calls):
        assert smask is None
        assert torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv)
        assert q.shape[1] == L + hw[0] * hw[1] + n_ref
    check_against_paper(cap.calls, L, torch.full((B,), 1.3))


@pytest.mark.parametrize("hw", [(4, 5), (6, 3)])
def test_outside_window_and_gamma_one_are_stock(hw):
    t = _transformer()
    before = processors_of(t)
    with torch.no_grad():
        ref_in = t(**_inputs(2, 7, hw, sigma=0.98))[0]
        ref_out = t(**_inputs(2, 7, hw, sigma=0.5))[0]
        h = taca.enable(t, gamma=1.3)
        assert {type(p).__name__ for p in h.processors.values()} == {"TacaFluxLikeProcessor"}
        assert len(h.processors) == N_CALLS
        assert torch.equal(t(**_inputs(2, 7, hw, sigma=0.5))[0], ref_out) and h.last_gamma is None
        assert not torch.equal(t(**_inputs(2, 7, hw, sigma=0.98))[0], ref_in)
        taca.enable(t, gamma=1.0, schedule="constant")
        assert torch.equal(t(**_inputs(2, 7, hw, sigma=0.98))[0], ref_in)
        taca.disable(t)
    check_disable_restores(t, before)
    with torch.no_grad():
        assert torch.equal(t(**_inputs(2, 7, hw, sigma=0.98))[0], ref_in)


def _pipeline(embeds):
    """LongCatImagePipeline without VAE or text encoder: its ``_encode_prompt`` (the Qwen2.5-VL
    call) is replaced by a lookup of fixed embeddings per prompt. (diffusers 0.42.1's pipeline
    cannot take ``prompt_embeds`` without a prompt: encode_prompt takes len(None).)"""
    from diffusers import FlowMatchEulerDiscreteScheduler, LongCatImagePipeline

    pipe = LongCatImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=None, text_encoder=None,
                                tokenizer=None, text_processor=None, transformer=_transformer())
    pipe._encode_prompt = lambda prompt: torch.cat([embeds[p] for p in prompt])
    return pipe


@pytest.mark.parametrize("hw", [(64, 96), (96, 48)])
def test_pipeline_cfg_unequal_prompts_and_window(monkeypatch, hw):
    """LongCatImagePipeline with CFG (prompt 7 tokens, negative prompt 4): each call's gamma comes
    from the pipeline's sigma (host path), the steps in the window are the paper rule's on the
    scheduler, every joint call in them is the paper's definition with that call's own text
    length, and gamma = 1 is stock bit for bit."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.longcat_image.pipeline_longcat_image import calculate_shift

    g = torch.Generator().manual_seed(0)
    pipe = _pipeline({"a cat": torch.randn(1, 7, 24, generator=g), "": torch.randn(1, 4, 24, generator=g)})
    steps = 8
    kw = dict(prompt="a cat", height=hw[0], width=hw[1], num_inference_steps=steps, guidance_scale=4.5,
              enable_prompt_rewrite=False, output_type="latent")
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    cap = Capture(monkeypatch)
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, k, o: seen.append(
        (k["encoder_hidden_states"].shape[1], get_handle(m).last_gamma, get_handle(m).last_path)), with_kwargs=True)
    with taca.enabled(pipe, gamma=1.3):
        out = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    hook.remove()
    n_img = (hw[0] // 16) * (hw[1] // 16)
    sch = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    c = sch.config
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps),
                      mu=calculate_shift(n_img, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift))
    on = window(sch.timesteps / 1000)
    assert on and [L for L, _, _ in seen] == [7, 4] * steps and {p for _, _, p in seen} == {"host"}
    assert [i for i in range(steps) if seen[2 * i][1] is not None] == on
    assert len(cap.calls) == 2 * N_CALLS * len(on)
    for j in range(0, len(cap.calls), N_CALLS):
        L = 7 if (j // N_CALLS) % 2 == 0 else 4
        chunk = cap.calls[j : j + N_CALLS]
        assert all(cq.shape[1] == L + n_img for cq, *_ in chunk)
        check_against_paper(chunk, L, torch.full((1,), 1.3))
    assert not torch.equal(out, stock)
    with taca.enabled(pipe, gamma=1.0, schedule="constant"):
        assert torch.equal(pipe(generator=torch.Generator().manual_seed(1), **kw).images, stock)


def longcat_windows():
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.longcat_image.pipeline_longcat_image import calculate_shift

    out = {}
    for n_img in (4096, 1024):  # 1024x1024 (the default size), 512x512
        for steps in (28, 50):
            sch = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
            c = sch.config
            mu = calculate_shift(n_img, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
            sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
            out[(steps, n_img)] = ranges(window(sch.timesteps / 1000))
    return out


def test_window_steps_with_the_real_scheduler():
    assert longcat_windows() == EXPECTED_WINDOWS


# (steps, image tokens) -> steps with gamma; 50 is the pipeline's default
EXPECTED_WINDOWS = {(28, 4096): "0-2", (50, 4096): "0-4", (28, 1024): "0-1", (50, 1024): "0-2"}


@pytest.mark.parametrize("n_ref", [0, 8])
def test_gradient_checkpointing_keeps_the_call_state(n_ref):
    """The forward carries no attention kwargs: the hook hands each call's state to the processors,
    and to the (double- and single-stream) blocks recomputed in the backward pass through the
    checkpointing function, edit reference tokens included (LongCat-Image has no attention mask)."""
    check_checkpointing_keeps_state(_transformer, _inputs(2, 7, (3, 6), n_ref))
