"""Krea 2 (Krea2Transformer2DModel) with the taca.models.krea2 adapter, on tiny random-weight models:
GQA (4 q / 2 kv heads here, 48 / 12 in the checkpoint) with K/V repeated as stock, the sigmoid output
gate, text-only fusion blocks left stock; in the window every joint call is the paper's definition
(the bool key mask on padded text kept), outside it and at gamma = 1 the model is stock bit for bit;
Krea2Pipeline with CFG (equal padded lengths as the pipeline requires, unequal valid lengths) at two
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

TINY = dict(in_channels=16, num_layers=2, attention_head_dim=32, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, timestep_embed_dim=32, text_hidden_dim=24, num_text_layers=3,
            text_num_attention_heads=2, text_num_key_value_heads=2, text_intermediate_size=32,
            num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(8, 12, 12))
# Krea2Pipeline's docstring (diffusers 0.42.1) gives the Krea 2 scheduler settings: dynamic shifting,
# base_shift 0.5, max_shift 1.15, base_image_seq_len 256, max_image_seq_len 6400 (exponential shift);
# the distilled (turbo) checkpoint uses mu = 1.15 whatever the resolution.
SCHEDULER = dict(num_train_timesteps=1000, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=6400)


def _transformer():
    from diffusers import Krea2Transformer2DModel

    torch.manual_seed(0)
    return Krea2Transformer2DModel(**TINY).eval()


def _position_ids(L, hw):
    from diffusers import Krea2Pipeline

    return Krea2Pipeline.prepare_position_ids(L, hw[0], hw[1], "cpu")


def _inputs(B, L, hw, valid=None, sigma=0.98, seed=1):
    g = torch.Generator().manual_seed(seed)
    kw = dict(hidden_states=torch.randn(B, hw[0] * hw[1], 16, generator=g),
              encoder_hidden_states=torch.randn(B, L, 3, 24, generator=g), timestep=torch.full((B,), sigma),
              position_ids=_position_ids(L, hw), return_dict=False)
    if valid is not None:
        kw["encoder_attention_mask"] = torch.arange(L)[None, :] < torch.tensor(valid)[:, None]
    return kw


def _stock_mask(B, L, n, valid):
    if valid is None:
        return None
    return torch.cat([torch.arange(L)[None, :] < torch.tensor(valid)[:, None], torch.ones(B, n, dtype=torch.bool)],
                     1)[:, None, None, :]


def _check_model(monkeypatch, B, L, hw, valid=None):
    import diffusers.models.transformers.transformer_krea2 as tk

    t = _transformer()
    stock = StockCalls(monkeypatch, tk)
    with torch.no_grad():
        t(**_inputs(B, L, hw, valid))
    monkeypatch.undo()
    cap = Capture(monkeypatch, shadow=True)
    with taca.enabled(t, gamma=1.3), torch.no_grad():
        t(**_inputs(B, L, hw, valid))
    n_fusion = 3  # layerwise (batch B * L) + refiner, then the joint blocks
    assert len(stock.calls) == n_fusion - 1 + TINY["num_layers"] and len(cap.calls) == TINY["num_layers"]
    N = L + hw[0] * hw[1]
    mask = _stock_mask(B, L, hw[0] * hw[1], valid)
    for (q, k, v, _, _), (sq, sk, sv, smask) in zip(cap.calls, stock.calls[-TINY["num_layers"]:]):
        assert torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv)
        assert q.shape[1] == N and q.shape[2] == k.shape[2] == 4  # K, V repeated to the 4 query heads, as stock
        assert (smask is None) == (mask is None) and (mask is None or torch.equal(smask, mask))
    text = span_mask(B, N, 0, L)
    check_spans_against_paper(cap.calls, text, ~text, torch.full((B,), 1.3), masks=mask)


@pytest.mark.parametrize("B,L,hw", [(2, 7, (3, 4)), (1, 1, (2, 5))])
def test_joint_calls_are_the_paper_definition(monkeypatch, B, L, hw):
    _check_model(monkeypatch, B, L, hw)


@pytest.mark.parametrize("hw", [(3, 4), (4, 2)])
def test_padded_prompts_keep_the_stock_mask(monkeypatch, hw):
    _check_model(monkeypatch, 2, 9, hw, valid=[9, 4])


@pytest.mark.parametrize("valid", [None, [9, 4]])
@pytest.mark.parametrize("hw", [(3, 4), (2, 5)])
def test_outside_window_and_gamma_one_are_stock(valid, hw):
    t = _transformer()
    before = processors_of(t)
    with torch.no_grad():
        ref_in = t(**_inputs(2, 9, hw, valid, sigma=0.98))[0]
        ref_out = t(**_inputs(2, 9, hw, valid, sigma=0.5))[0]
        h = taca.enable(t, gamma=1.3)
        assert h.kind == "krea2" and sorted(h.processors) == [f"transformer_blocks.{i}.attn" for i in range(2)]
        assert {type(p).__name__ for p in h.processors.values()} == {"TacaKrea2AttnProcessor"}
        assert all(type(m.processor).__name__ == "Krea2AttnProcessor" for n, m in t.named_modules()
                   if n.startswith("text_fusion.") and hasattr(m, "set_processor"))
        assert torch.equal(t(**_inputs(2, 9, hw, valid, sigma=0.5))[0], ref_out) and h.last_gamma is None
        assert not torch.equal(t(**_inputs(2, 9, hw, valid, sigma=0.98))[0], ref_in)
        taca.enable(t, gamma=1.0, schedule="constant")
        assert torch.equal(t(**_inputs(2, 9, hw, valid, sigma=0.98))[0], ref_in)
        taca.disable(t)
    check_disable_restores(t, before)


def _pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, Krea2Pipeline

    return Krea2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=None, text_encoder=None,
                         tokenizer=None, transformer=_transformer())


def _sigmas(n_img, steps, distilled=False):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.krea2.pipeline_krea2 import calculate_shift

    sch = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    mu = 1.15 if distilled else calculate_shift(n_img, 256, 6400, 0.5, 1.15)
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return sch.timesteps / 1000


def _pipe_kwargs(hw, steps):
    """The pipeline's fixed-length text block: prompt 9 tokens with 6 valid, negative 9 with 2 valid
    (the pipeline always passes its bool masks)."""
    g = torch.Generator().manual_seed(0)
    return dict(prompt_embeds=torch.randn(1, 9, 3, 24, generator=g), prompt_embeds_mask=torch.arange(9)[None] < 6,
                negative_prompt_embeds=torch.randn(1, 9, 3, 24, generator=g),
                negative_prompt_embeds_mask=torch.arange(9)[None] < 2, guidance_scale=3.0, height=hw[0], width=hw[1],
                num_inference_steps=steps, output_type="latent")


def test_pipeline_gamma_one_is_stock():
    pipe = _pipeline()
    kw = _pipe_kwargs((32, 48), 3)
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    with taca.enabled(pipe, gamma=1.0, schedule="constant"):
        assert torch.equal(pipe(generator=torch.Generator().manual_seed(1), **kw).images, stock)


@pytest.mark.parametrize("hw", [(32, 48), (48, 32)])
def test_pipeline_cfg_padded_prompts_and_window(monkeypatch, hw):
    """Krea2Pipeline with CFG (separate forwards, each with its own key mask): the window is the paper
    rule's on the real scheduler (host path: _current_timestep), and every joint call in it is the
    paper's definition with that call's mask."""
    pipe = _pipeline()
    steps = 6
    kw = _pipe_kwargs(hw, steps)
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    cap = Capture(monkeypatch)
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, k, o: seen.append(
        (get_handle(m).last_gamma, get_handle(m).last_path)), with_kwargs=True)
    with taca.enabled(pipe, gamma=1.3):
        out = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    hook.remove()
    n_img = (hw[0] // 16) * (hw[1] // 16)
    on = window(_sigmas(n_img, steps))
    assert on and len(seen) == 2 * steps and {p for _, p in seen} == {"host"}
    assert [i for i in range(steps) if seen[2 * i][0] is not None] == on
    n = TINY["num_layers"]
    assert len(cap.calls) == 2 * n * len(on)
    text = span_mask(1, 9 + n_img, 0, 9)
    for j in range(0, len(cap.calls), n):
        valid = [6] if (j // n) % 2 == 0 else [2]
        check_spans_against_paper(cap.calls[j : j + n], text, ~text, torch.full((1,), 1.3),
                                  masks=_stock_mask(1, 9, n_img, valid))
    assert not torch.equal(out, stock)


def krea2_windows():
    out = {}
    for n_img in (4096, 1024):  # 1024x1024 and 512x512 (16x16 pixels per token)
        for steps in (28, 50):
            out[("base", steps, n_img)] = ranges(window(_sigmas(n_img, steps)))
    for steps in (4, 8):
        out[("turbo", steps)] = ranges(window(_sigmas(4096, steps, distilled=True)))
    return out


def test_window_steps_with_the_real_scheduler():
    assert krea2_windows() == EXPECTED_WINDOWS


EXPECTED_WINDOWS = {("base", 28, 4096): "0-1", ("base", 50, 4096): "0-3", ("base", 28, 1024): "0-1",
                    ("base", 50, 1024): "0-2", ("turbo", 4): "0", ("turbo", 8): "0"}


@pytest.mark.parametrize("valid", [None, [9, 4]])
def test_gradient_checkpointing_keeps_the_call_state(valid):
    """The forward carries no attention kwargs: the hook hands each call's state to the processors,
    and to the blocks recomputed in the backward pass through the checkpointing function, padded
    prompts (the stock key mask) included."""
    check_checkpointing_keeps_state(_transformer, _inputs(2, 9, (3, 4), valid))
