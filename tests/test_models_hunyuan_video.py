"""HunyuanVideo (HunyuanVideoTransformer3DModel) with the taca.models.hunyuan_video adapter, on tiny
random-weight models: [video, txt] in double- and single-stream blocks, the token refiner left
stock, the model's count-based bool key mask kept (per-sample valid lengths); in the window every
joint call is the paper's definition with that mask, outside it and at gamma = 1 the model is stock
bit for bit; HunyuanVideoPipeline with true CFG and prompts of different valid lengths at two
resolutions."""
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
from model_checks import check_checkpointing_keeps_state

TINY = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2,
            num_single_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
            pooled_projection_dim=8, rope_axes_dim=(2, 4, 4))
N_JOINT = TINY["num_layers"] + TINY["num_single_layers"]
# hunyuanvideo-community/HunyuanVideo scheduler/scheduler_config.json as remembered (NOT read offline
# here): FlowMatchEulerDiscreteScheduler, static shift 7.0; the pipeline passes sigmas linspace(1, 0).
SCHEDULER = dict(num_train_timesteps=1000, shift=7.0)


def _transformer():
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(**TINY).eval()


def _inputs(valid, L, thw, step=980.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    B = len(valid)
    return dict(hidden_states=torch.randn(B, 4, *thw, generator=g), timestep=torch.full((B,), step),
                encoder_hidden_states=torch.randn(B, L, 16, generator=g),
                encoder_attention_mask=(torch.arange(L)[None, :] < torch.tensor(valid)[:, None]).float(),
                pooled_projections=torch.randn(B, 8, generator=g), guidance=torch.full((B,), 6000.0),
                return_dict=False)


def _stock_mask(valid, L, n_vid):
    N = n_vid + L
    return (torch.arange(N)[None, :] < (n_vid + torch.tensor(valid))[:, None])[:, None, None, :]


@pytest.mark.parametrize("valid,L,thw", [([7, 4], 7, (2, 3, 2)), ([5], 5, (1, 4, 4)), ([2, 6], 6, (2, 2, 3))])
def test_joint_calls_are_the_paper_definition(monkeypatch, valid, L, thw):
    import diffusers.models.transformers.transformer_hunyuan_video as th

    t = _transformer()
    stock = StockCalls(monkeypatch, th)
    with torch.no_grad():
        t(**_inputs(valid, L, thw))
    monkeypatch.undo()
    cap = Capture(monkeypatch, shadow=True)
    with taca.enabled(t, gamma=1.3), torch.no_grad():
        t(**_inputs(valid, L, thw))
    # (the token refiner's AttnProcessor2_0 calls SDPA from attention_processor.py: not counted here)
    assert len(stock.calls) == len(cap.calls) == N_JOINT
    n_vid = thw[0] * thw[1] * thw[2]
    mask = _stock_mask(valid, L, n_vid)
    for (q, k, v, kw, _), (sq, sk, sv, smask) in zip(cap.calls, stock.calls):
        assert torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv) and q.shape[1] == n_vid + L
        assert torch.equal(smask, mask) and kw["text_first"] is False and kw["text_len"] == L
    B = len(valid)
    text = span_mask(B, n_vid + L, n_vid, L)
    check_spans_against_paper(cap.calls, text, ~text, torch.full((B,), 1.3), masks=mask)


@pytest.mark.parametrize("valid", [[7, 4], [7, 7]])
@pytest.mark.parametrize("thw", [(2, 3, 2), (1, 4, 3)])
def test_outside_window_and_gamma_one_are_stock(valid, thw):
    t = _transformer()
    before = processors_of(t)
    with torch.no_grad():
        ref_in = t(**_inputs(valid, 7, thw, 980.0))[0]
        ref_out = t(**_inputs(valid, 7, thw, 500.0))[0]
        h = taca.enable(t, gamma=1.3)
        assert h.kind == "hunyuan_video" and len(h.processors) == N_JOINT
        assert not any(n.startswith("context_embedder") for n in h.processors)
        assert {type(m.processor).__name__ for n, m in t.named_modules()
                if n.startswith("context_embedder") and hasattr(m, "set_processor")} == {"AttnProcessor2_0"}
        assert torch.equal(t(**_inputs(valid, 7, thw, 500.0))[0], ref_out) and h.last_gamma is None
        assert not torch.equal(t(**_inputs(valid, 7, thw, 980.0))[0], ref_in)
        taca.enable(t, gamma=1.0, schedule="constant")
        assert torch.equal(t(**_inputs(valid, 7, thw, 980.0))[0], ref_in)
        taca.disable(t)
    check_disable_restores(t, before)


def _pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

    return HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=_transformer(), vae=None,
                                scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), text_encoder_2=None,
                                tokenizer_2=None)


def _pipe_kwargs(hw, steps):
    """True CFG: prompt 7 tokens (5 valid), negative 7 tokens (2 valid)."""
    g = torch.Generator().manual_seed(0)
    return dict(prompt_embeds=torch.randn(1, 7, 16, generator=g), pooled_prompt_embeds=torch.randn(1, 8, generator=g),
                prompt_attention_mask=(torch.arange(7) < 5)[None].float(),
                negative_prompt_embeds=torch.randn(1, 7, 16, generator=g),
                negative_pooled_prompt_embeds=torch.randn(1, 8, generator=g),
                negative_prompt_attention_mask=(torch.arange(7) < 2)[None].float(), true_cfg_scale=4.0,
                height=hw[0], width=hw[1], num_frames=5, num_inference_steps=steps, output_type="latent")


def test_pipeline_gamma_one_is_stock():
    pipe = _pipeline()
    kw = _pipe_kwargs((32, 48), 3)
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).frames
    with taca.enabled(pipe, gamma=1.0, schedule="constant"):
        assert torch.equal(pipe(generator=torch.Generator().manual_seed(1), **kw).frames, stock)


def _sigmas(steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    sch.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
    return sch.timesteps / 1000


@pytest.mark.parametrize("hw", [(32, 48), (48, 32)])
def test_pipeline_true_cfg_and_window(monkeypatch, hw):
    pipe = _pipeline()
    steps = 6
    kw = _pipe_kwargs(hw, steps)
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).frames
    cap = Capture(monkeypatch)
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, k, o: seen.append(
        (get_handle(m).last_gamma, get_handle(m).last_path)), with_kwargs=True)
    with taca.enabled(pipe, gamma=1.3):
        out = pipe(generator=torch.Generator().manual_seed(1), **kw).frames
    hook.remove()
    on = window(_sigmas(steps))
    assert on and on != list(range(steps)) and len(seen) == 2 * steps and {p for _, p in seen} == {"host"}
    assert [i for i in range(steps) if seen[2 * i][0] is not None] == on
    assert len(cap.calls) == 2 * N_JOINT * len(on)
    n_vid = 2 * (hw[0] // 8) * (hw[1] // 8)  # 5 frames -> 2 latent frames, 8x VAE, patch 1
    text = span_mask(1, n_vid + 7, n_vid, 7)
    for j in range(0, len(cap.calls), N_JOINT):
        valid = [5] if (j // N_JOINT) % 2 == 0 else [2]
        check_spans_against_paper(cap.calls[j : j + N_JOINT], text, ~text, torch.full((1,), 1.3),
                                  masks=_stock_mask(valid, 7, n_vid))
    assert not torch.equal(out, stock)


def hunyuan_video_windows():
    return {steps: ranges(window(_sigmas(steps))) for steps in (30, 50)}


def test_window_steps_with_the_real_scheduler():
    assert hunyuan_video_windows() == EXPECTED_WINDOWS


EXPECTED_WINDOWS = {30: "0-5", 50: "0-8"}


@pytest.mark.parametrize("valid", [[7, 4], [7, 7]])
def test_gradient_checkpointing_keeps_the_call_state(valid):
    """The forward carries no attention kwargs: the hook hands each call's state (the padded prompts'
    key mask included) to the processors, and to the (double- and single-stream) blocks recomputed in
    the backward pass through the checkpointing function (t = 1000 sigma)."""
    check_checkpointing_keeps_state(_transformer, _inputs(valid, 7, (2, 3, 2)))
