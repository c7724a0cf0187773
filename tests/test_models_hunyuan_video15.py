"""HunyuanVideo 1.5 (HunyuanVideo15Transformer3DModel) with the taca.models.hunyuan_video15 adapter, on
tiny random-weight models: [video, ctx] with ctx per sample = [valid SigLIP image, valid byT5, valid mLLM,
invalid ...] and the processor's outer-AND bool mask (fully masked rows for invalid context tokens); the
whole context block is text (SigLIP tokens included); in the window every joint call is the paper's
definition with that mask, outside it and at gamma = 1 the model is stock bit for bit, text-to-video and
image-to-video, unequal valid lengths in one batch, two resolutions."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("diffusers")

import taca

from model_checks import (Capture, StockCalls, check_disable_restores, check_spans_against_paper,
                          processors_of, ranges, span_mask, window)
from model_checks import check_checkpointing_keeps_state

TINY = dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
            num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=24, text_embed_2_dim=20,
            image_embed_dim=12, rope_axes_dim=(4, 6, 6))
N_JOINT = TINY["num_layers"]
L1, L2, L3 = 7, 3, 5  # mLLM, byT5, SigLIP tokens


def _transformer():
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(0)
    return HunyuanVideo15Transformer3DModel(**TINY).eval()


def _inputs(valid, valid2, thw, i2v, step=980.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    B = len(valid)
    img = torch.randn(B, L3, 12, generator=g) if i2v else torch.zeros(B, L3, 12)
    return dict(hidden_states=torch.randn(B, 9, *thw, generator=g), timestep=torch.full((B,), step),
                encoder_hidden_states=torch.randn(B, L1, 24, generator=g),
                encoder_attention_mask=(torch.arange(L1)[None, :] < torch.tensor(valid)[:, None]).float(),
                encoder_hidden_states_2=torch.randn(B, L2, 20, generator=g),
                encoder_attention_mask_2=(torch.arange(L2)[None, :] < torch.tensor(valid2)[:, None]).float(),
                image_embeds=img, return_dict=False)


def _stock_mask(valid, valid2, n_vid, i2v, L3=L3):
    """The outer-AND mask the stock processor builds: video, then per sample the valid context first."""
    n_ctx_valid = torch.tensor(valid) + torch.tensor(valid2) + (L3 if i2v else 0)
    N = n_vid + L1 + L2 + L3
    keep = torch.arange(N)[None, :] < (n_vid + n_ctx_valid)[:, None]
    return (keep[:, None, :, None] & keep[:, None, None, :])


CASES = [([7, 4], [3, 1], (2, 3, 2), False), ([5, 7], [2, 3], (1, 4, 3), True), ([6], [0], (2, 2, 2), True),
         ([7, 7], [3, 3], (1, 3, 4), False)]


@pytest.mark.parametrize("valid,valid2,thw,i2v", CASES)
def test_joint_calls_are_the_paper_definition(monkeypatch, valid, valid2, thw, i2v):
    import diffusers.models.transformers.transformer_hunyuan_video15 as th

    t = _transformer()
    stock = StockCalls(monkeypatch, th)
    with torch.no_grad():
        t(**_inputs(valid, valid2, thw, i2v))
    monkeypatch.undo()
    cap = Capture(monkeypatch, shadow=True)
    with taca.enabled(t, gamma=1.3), torch.no_grad():
        t(**_inputs(valid, valid2, thw, i2v))
    # (the token refiner's AttnProcessor2_0 calls SDPA from attention_processor.py: not counted here)
    assert len(stock.calls) == len(cap.calls) == N_JOINT
    n_vid = thw[0] * thw[1] * thw[2]
    L = L1 + L2 + L3
    mask = _stock_mask(valid, valid2, n_vid, i2v)
    assert (~mask).any()  # fully masked rows: SigLIP slots in T2V, padding of the prompts
    for (q, k, v, kw, _), (sq, sk, sv, smask) in zip(cap.calls, stock.calls):
        assert torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv) and q.shape[1] == n_vid + L
        assert torch.equal(smask, mask) and kw["text_first"] is False and kw["text_len"] == L
    B = len(valid)
    text = span_mask(B, n_vid + L, n_vid, L)
    check_spans_against_paper(cap.calls, text, ~text, torch.full((B,), 1.3), masks=mask)
    for _, _, _, _, out in cap.calls:  # rows with every key removed are 0, as stock CPU SDPA gives
        dead = ~mask[:, 0].any(-1)
        assert dead.any() and torch.equal(out[dead], torch.zeros_like(out[dead]))


def test_siglip_keys_are_scaled_in_image_to_video(monkeypatch):
    """I2V: the valid SigLIP tokens lead the context and are text keys (gamma on their video-query logits),
    with the prompt padded down to one valid mLLM token and no byT5 token."""
    cap = Capture(monkeypatch)
    t = _transformer()
    with taca.enabled(t, gamma=1.3), torch.no_grad():
        t(**_inputs([1], [0], (1, 2, 2), True))
    q, k, v, kw, out = cap.calls[0]
    n_vid = 4
    assert kw["text_len"] == L1 + L2 + L3 and kw.get("text_start") is None
    text = span_mask(1, q.shape[1], n_vid, L1 + L2 + L3)
    valid_ctx = span_mask(1, q.shape[1], n_vid, L3) | span_mask(1, q.shape[1], n_vid + L3, 1)
    mask = _stock_mask([1], [0], n_vid, True)
    check_spans_against_paper(cap.calls[:1], text, ~text, torch.full((1,), 1.3), masks=mask)
    # the valid keys of this sample are the video, the 5 SigLIP tokens and 1 mLLM token
    assert torch.equal(mask[0, 0, 0], ~text[0] | valid_ctx[0])


@pytest.mark.parametrize("i2v", [False, True])
@pytest.mark.parametrize("thw", [(2, 3, 2), (1, 4, 3)])
def test_outside_window_and_gamma_one_are_stock(thw, i2v):
    valid, valid2 = [7, 4], [3, 1]
    t = _transformer()
    before = processors_of(t)
    with torch.no_grad():
        ref_in = t(**_inputs(valid, valid2, thw, i2v, 980.0))[0]
        ref_out = t(**_inputs(valid, valid2, thw, i2v, 500.0))[0]
        h = taca.enable(t, gamma=1.3)
        assert h.kind == "hunyuan_video15" and len(h.processors) == N_JOINT
        assert all(n.startswith("transformer_blocks.") for n in h.processors)
        assert {type(m.processor).__name__ for n, m in t.named_modules()
                if n.startswith("context_embedder") and hasattr(m, "set_processor")} == {"AttnProcessor2_0"}
        assert torch.equal(t(**_inputs(valid, valid2, thw, i2v, 500.0))[0], ref_out) and h.last_gamma is None
        assert not torch.equal(t(**_inputs(valid, valid2, thw, i2v, 980.0))[0], ref_in)
        taca.enable(t, gamma=1.0, schedule="constant")
        assert torch.equal(t(**_inputs(valid, valid2, thw, i2v, 980.0))[0], ref_in)
        taca.disable(t)
    check_disable_restores(t, before)
    with torch.no_grad():
        assert torch.equal(t(**_inputs(valid, valid2, thw, i2v, 980.0))[0], ref_in)


def _pipeline():
    from diffusers import AutoencoderKLHunyuanVideo15, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline
    from diffusers.guiders import ClassifierFreeGuidance

    torch.manual_seed(0)
    # a tiny VAE only for the pipeline's latent shapes (output_type="latent": never run)
    vae = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1)
    return HunyuanVideo15Pipeline(text_encoder=None, tokenizer=None, transformer=_transformer(), vae=vae,
                                  scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), text_encoder_2=None,
                                  tokenizer_2=None, guider=ClassifierFreeGuidance(guidance_scale=6.0))


# classifier-free guidance through the guider: cond (5 of 7 mLLM, 2 of 3 byT5 valid) and uncond (2 of 7,
# 1 of 3) run as two transformer calls per step; T2V: the pipeline's 729 SigLIP slots are zeros (masked)
COND, UNCOND = ([5], [2]), ([2], [1])
N_SIGLIP = 729


def _pipe_kwargs(hw, steps):
    g = torch.Generator().manual_seed(0)
    m = lambda n, L: (torch.arange(L) < n)[None].float()  # noqa: E731
    return dict(prompt_embeds=torch.randn(1, L1, 24, generator=g), prompt_embeds_mask=m(COND[0][0], L1),
                prompt_embeds_2=torch.randn(1, L2, 20, generator=g), prompt_embeds_mask_2=m(COND[1][0], L2),
                negative_prompt_embeds=torch.randn(1, L1, 24, generator=g),
                negative_prompt_embeds_mask=m(UNCOND[0][0], L1),
                negative_prompt_embeds_2=torch.randn(1, L2, 20, generator=g),
                negative_prompt_embeds_mask_2=m(UNCOND[1][0], L2),
                height=hw[0], width=hw[1], num_frames=5, num_inference_steps=steps, output_type="latent")


def test_pipeline_gamma_one_is_stock():
    pipe = _pipeline()
    kw = _pipe_kwargs((32, 48), 2)
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).frames
    with taca.enabled(pipe, gamma=1.0, schedule="constant"):
        assert torch.equal(pipe(generator=torch.Generator().manual_seed(1), **kw).frames, stock)


@pytest.mark.parametrize("hw", [(32, 48), (48, 32)])
def test_pipeline_cfg_and_window(monkeypatch, hw):
    from taca.pipeline import get_handle

    pipe = _pipeline()
    steps = 3
    kw = _pipe_kwargs(hw, steps)
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).frames
    cap = Capture(monkeypatch)
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, k, o: seen.append(get_handle(m).last_gamma),
                                                  with_kwargs=True)
    with taca.enabled(pipe, gamma=1.3):
        out = pipe(generator=torch.Generator().manual_seed(1), **kw).frames
    hook.remove()
    on = window(_sigmas(steps, 5.0))
    assert on and on != list(range(steps)) and len(seen) == 2 * steps
    assert [i for i in range(steps) if seen[2 * i] is not None] == on
    assert len(cap.calls) == 2 * N_JOINT * len(on)
    n_vid = 2 * (hw[0] // 16) * (hw[1] // 16)  # 5 frames -> 2 latent frames, 16x VAE, patch 1
    L = N_SIGLIP + L2 + L1
    text = span_mask(1, n_vid + L, n_vid, L)
    for j in range(0, len(cap.calls), N_JOINT):
        valid, valid2 = COND if (j // N_JOINT) % 2 == 0 else UNCOND
        mask = _stock_mask(valid, valid2, n_vid, False, L3=N_SIGLIP)
        check_spans_against_paper(cap.calls[j : j + N_JOINT], text, ~text, torch.full((1,), 1.3), masks=mask)
    assert not torch.equal(out, stock)


def _sigmas(steps, shift):
    """The pipeline's sigmas linspace(1, 0) through FlowMatchEulerDiscreteScheduler's static shift; the
    transformer gets scheduler.timesteps (t = 1000 sigma)."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sch.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
    return sch.timesteps / 1000


def hunyuan_video15_windows():
    # HunyuanVideo-1.5 checkpoints' scheduler_config.json: FlowMatchEulerDiscreteScheduler with a static
    # shift, as remembered (NOT read offline here): 5 for 480p, 7 (I2V) / 9 (T2V) for 720p
    return {shift: {steps: ranges(window(_sigmas(steps, shift))) for steps in (30, 50)} for shift in (5.0, 7.0, 9.0)}


def test_window_steps_with_the_real_scheduler():
    assert hunyuan_video15_windows() == EXPECTED_WINDOWS


EXPECTED_WINDOWS = {5.0: {30: "0-4", 50: "0-6"}, 7.0: {30: "0-5", 50: "0-8"}, 9.0: {30: "0-6", 50: "0-10"}}


@pytest.mark.parametrize("valid,valid2,thw,i2v", [CASES[0], CASES[1]])
def test_gradient_checkpointing_keeps_the_call_state(valid, valid2, thw, i2v):
    """The forward carries no attention kwargs: the hook hands each call's state (the padded prompts'
    masks, the image-to-video SigLIP tokens) to the processors, and to the blocks recomputed in the
    backward pass through the checkpointing function (t = 1000 sigma)."""
    check_checkpointing_keeps_state(_transformer, _inputs(valid, valid2, thw, i2v))


@pytest.mark.parametrize("valid,valid2,thw,i2v", CASES[:3])
def test_key_mask_route_equals_the_outer_and_mask(monkeypatch, valid, valid2, thw, i2v):
    """The route CUDA takes (the valid tokens as a (B, 1, 1, N) key mask, the invalid tokens' rows set to 0, no
    (B, 1, N, N) mask built), forced here on the CPU kernel: the model's output and its gradients equal those of
    the outer-AND mask path to float32 rounding, and no joint call gets a per-query mask."""
    from taca.models.hunyuan_video15 import TacaHunyuanVideo15AttnProcessor

    t = _transformer()

    def run(route):
        if route:
            monkeypatch.setattr(TacaHunyuanVideo15AttnProcessor, "_key_mask_route", lambda self, q: True)
        cap = Capture(monkeypatch)
        kw = _inputs(valid, valid2, thw, i2v)
        kw["hidden_states"].requires_grad_()
        with taca.enabled(t, gamma=1.3):
            out = t(**kw)[0]
            (grad,) = torch.autograd.grad(out.square().sum(), kw["hidden_states"])
        monkeypatch.undo()
        return out.detach(), grad, [c[3].get("attn_mask") for c in cap.calls]

    out_r, grad_r, masks_r = run(True)
    out_m, grad_m, masks_m = run(False)
    assert all(m.shape[2] == 1 for m in masks_r) and all(m.shape[2] > 1 for m in masks_m)
    torch.testing.assert_close(out_r, out_m, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_r, grad_m, atol=1e-5, rtol=1e-4)
