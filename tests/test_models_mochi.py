"""Mochi 1 (MochiTransformer3DModel) with the taca.models.mochi adapter, on tiny random-weight models:
one attention call per sample over [video, that sample's valid text] (text last, padding gathered
away), reversed timestep; in the window every call is the paper's definition with that sample's own
text length and gamma, outside it and at gamma = 1 the model is stock bit for bit; MochiPipeline
with CFG (one batch [negative, prompt] of different valid lengths) at two resolutions."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import taca
from taca.pipeline import get_handle

from model_checks import CaptureSDPA, StockSDPACalls, check_spans_against_paper, ranges, span_mask, window
from model_checks import check_checkpointing_keeps_state

TINY = dict(patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2, pooled_projection_dim=16,
            in_channels=4, text_embed_dim=24, time_embed_dim=16, activation_fn="swiglu", max_sequence_length=16)
# genmo/mochi-1-preview scheduler/scheduler_config.json as remembered (NOT read offline here):
# FlowMatchEulerDiscreteScheduler, 1000 training steps, invert_sigmas true, no shift; the pipeline
# passes its own linear-quadratic sigmas (threshold_noise 0.025).
SCHEDULER = dict(num_train_timesteps=1000, invert_sigmas=True)


def _transformer():
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(0)
    return MochiTransformer3DModel(**TINY).eval()


def _processors(t):
    """MochiAttention has a processor attribute but no set_processor: model_checks.processors_of misses it."""
    from diffusers.models.attention_processor import MochiAttention

    return {n: m.processor for n, m in t.named_modules() if isinstance(m, MochiAttention)}


def _inputs(valid, L, fhw, t=20.0, seed=1):
    """t: the transformer's reversed timestep (1 - sigma) * 1000."""
    g = torch.Generator().manual_seed(seed)
    B = len(valid)
    return dict(hidden_states=torch.randn(B, 4, fhw[0], 2 * fhw[1], 2 * fhw[2], generator=g),
                encoder_hidden_states=torch.randn(B, L, 24, generator=g), timestep=torch.full((B,), t),
                encoder_attention_mask=(torch.arange(L)[None, :] < torch.tensor(valid)[:, None]).long(),
                return_dict=False)


def _check_calls(calls, valid, n_vid, gamma):
    """calls: per layer, one per sample (B = 1 each): [video, valid text of that sample]."""
    B = len(valid)
    assert len(calls) == TINY["num_layers"] * B
    for i, c in enumerate(calls):
        b = i % B
        N = n_vid + valid[b]
        assert c[0].shape[0] == 1 and c[0].shape[2] == N and c[3]["text_len"] == valid[b]
        text = span_mask(1, N, n_vid, valid[b])
        check_spans_against_paper([c], text, ~text, gamma[b : b + 1], layout="bhnd")


@pytest.mark.parametrize("valid,L,fhw", [([7, 4], 7, (2, 2, 3)), ([5], 9, (1, 3, 3)), ([2, 6], 6, (2, 2, 2))])
def test_joint_calls_are_the_paper_definition(monkeypatch, valid, L, fhw):
    t = _transformer()
    stock = StockSDPACalls(monkeypatch)
    with torch.no_grad():
        t(**_inputs(valid, L, fhw))
    monkeypatch.undo()
    cap = CaptureSDPA(monkeypatch, shadow=True)
    with taca.enabled(t, gamma=1.3), torch.no_grad():
        t(**_inputs(valid, L, fhw))
    # the stock run's first SDPA call is the caption attention pooling of the time embedding
    assert len(stock.calls) == 1 + len(cap.calls)
    for (q, k, v, _, _), (sq, sk, sv, smask, sscale) in zip(cap.calls, stock.calls[1:]):
        assert smask is None and sscale is None
        assert torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv)
    _check_calls(cap.calls, valid, fhw[0] * fhw[1] * fhw[2], torch.full((len(valid),), 1.3))


@pytest.mark.parametrize("valid", [[7, 4], [7, 7]])
@pytest.mark.parametrize("fhw", [(2, 2, 3), (1, 3, 2)])
def test_outside_window_and_gamma_one_are_stock(valid, fhw):
    """t = 20 (sigma 0.98) is in the window, t = 500 (sigma 0.5) is not."""
    t = _transformer()
    before = _processors(t)
    assert len(before) == TINY["num_layers"]
    with torch.no_grad():
        ref_in = t(**_inputs(valid, 7, fhw, 20.0))[0]
        ref_out = t(**_inputs(valid, 7, fhw, 500.0))[0]
        h = taca.enable(t, gamma=1.3)
        assert h.kind == "mochi" and {type(p).__name__ for p in h.processors.values()} == {"TacaMochiAttnProcessor"}
        assert _processors(t) == h.processors and len(h.processors) == TINY["num_layers"]
        assert torch.equal(t(**_inputs(valid, 7, fhw, 500.0))[0], ref_out) and h.last_gamma is None
        assert not torch.equal(t(**_inputs(valid, 7, fhw, 20.0))[0], ref_in)
        assert torch.allclose(h.last_gamma, torch.full((2,), 1.3))
        taca.enable(t, gamma=1.0, schedule="constant")
        assert torch.equal(t(**_inputs(valid, 7, fhw, 20.0))[0], ref_in)
        taca.disable(t)
    after = _processors(t)
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert len(t._forward_pre_hooks) == 0 and len(t._forward_hooks) == 0


def _pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, MochiPipeline

    return MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=None, text_encoder=None,
                         tokenizer=None, transformer=_transformer())


def _hook_sigmas(steps):
    """What the hook reads: 1 - t / 1000 with t the pipeline's (inverted) timesteps."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.mochi.pipeline_mochi import linear_quadratic_schedule

    sch = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    sch.set_timesteps(sigmas=np.array(linear_quadratic_schedule(steps, 0.025)))
    return 1.0 - sch.timesteps / 1000


@pytest.mark.parametrize("hw", [(32, 48), (48, 32)])
def test_pipeline_cfg_unequal_prompts_and_window(monkeypatch, hw):
    """MochiPipeline, CFG batch [negative (2 of 7 valid), prompt (5 of 7)]: the window is the paper
    rule's on the pipeline's sigmas, read on the host, and every call in it is the paper's definition
    with that sample's valid text."""
    pipe = _pipeline()
    steps = 8
    g = torch.Generator().manual_seed(0)
    kw = dict(prompt_embeds=torch.randn(1, 7, 24, generator=g), prompt_attention_mask=(torch.arange(7) < 5)[None].long(),
              negative_prompt_embeds=torch.randn(1, 7, 24, generator=g),
              negative_prompt_attention_mask=(torch.arange(7) < 2)[None].long(), guidance_scale=4.5,
              height=hw[0], width=hw[1], num_frames=7, num_inference_steps=steps, output_type="latent")
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).frames
    with taca.enabled(pipe, gamma=1.0, schedule="constant"):
        assert torch.equal(pipe(generator=torch.Generator().manual_seed(1), **kw).frames, stock)
    cap = CaptureSDPA(monkeypatch)
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, k, o: seen.append(
        (get_handle(m).last_gamma, get_handle(m).last_path)), with_kwargs=True)
    with taca.enabled(pipe, gamma=1.3):
        out = pipe(generator=torch.Generator().manual_seed(1), **kw).frames
    hook.remove()
    on = window(_hook_sigmas(steps))
    assert on and on != list(range(steps)) and len(seen) == steps and {p for _, p in seen} == {"host"}
    assert [i for i in range(steps) if seen[i][0] is not None] == on
    n_vid = 2 * (hw[0] // 16) * (hw[1] // 16)  # 7 frames -> 2 latent frames, 8x VAE, 2x2 patches
    per_step = TINY["num_layers"] * 2
    assert len(cap.calls) == per_step * len(on)
    for j in range(0, len(cap.calls), per_step):
        _check_calls(cap.calls[j : j + per_step], [2, 5], n_vid, torch.full((2,), 1.3))
    assert not torch.equal(out, stock)


def mochi_windows():
    return {steps: ranges(window(_hook_sigmas(steps))) for steps in (28, 50, 64)}


def test_window_steps_with_the_real_scheduler():
    assert mochi_windows() == EXPECTED_WINDOWS


EXPECTED_WINDOWS = {28: "0-14", 50: "0-26", 64: "0-33"}  # the linear half of the schedule stays above 0.975


@pytest.mark.parametrize("valid", [[7, 4], [7, 7]])
def test_gradient_checkpointing_keeps_the_call_state(valid):
    """The forward carries no attention kwargs: the hook hands each call's state (per-sample valid
    text) to the processors, and to the blocks recomputed in the backward pass through the
    checkpointing function (t = (1 - sigma) 1000)."""
    check_checkpointing_keeps_state(_transformer, _inputs(valid, 7, (2, 2, 3)))
