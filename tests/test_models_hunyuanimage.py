"""HunyuanImage 2.1 (HunyuanImageTransformer2DModel: [img, txt], a bool key mask always passed,
the token refiner text-only) with the taca.models.hunyuanimage adapter, on tiny random-weight
models: every joint attention call inside the window is the paper's definition on the stock
q, k, v with the stock mask (padded prompts, the byT5 glyph text reordered per sample), outside
it and at gamma = 1 the model is stock bit for bit."""
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

N_DOUBLE, N_SINGLE = 2, 2
TINY = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=N_DOUBLE,
            num_single_layers=N_SINGLE, num_refiner_layers=1, patch_size=(1, 1), text_embed_dim=24, rope_axes_dim=(8, 8))


def _transformer(**kw):
    from diffusers import HunyuanImageTransformer2DModel

    torch.manual_seed(0)
    return HunyuanImageTransformer2DModel(**{**TINY, **kw}).eval()


def _mask(L, valid):
    return torch.arange(L)[None, :] < torch.tensor(valid)[:, None]


def _inputs(B, L, hw, valid, t=980.0, seed=1, glyph=None):
    """valid: per-sample valid MLLM tokens; glyph: (L2, valid2) byT5 tokens and per-sample valid ones."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(hidden_states=torch.randn(B, 4, *hw, generator=g), timestep=torch.full((B,), t),
              encoder_hidden_states=torch.randn(B, L, 24, generator=g), encoder_attention_mask=_mask(L, valid).long(),
              return_dict=False)
    if glyph is not None:
        L2, valid2 = glyph
        kw["encoder_hidden_states_2"] = torch.randn(B, L2, 20, generator=g)
        kw["encoder_attention_mask_2"] = _mask(L2, valid2).long()
    return kw


def _stock_mask(B, L, hw, valid, glyph=None):
    """The model's key mask: image keys, then the text's valid tokens (byT5 + MLLM, moved first)."""
    n_valid = torch.tensor(valid) + (torch.tensor(glyph[1]) if glyph else 0)
    L_txt = L + (glyph[0] if glyph else 0)
    text = torch.arange(L_txt)[None, :] < n_valid[:, None]
    return torch.cat([torch.ones(B, hw[0] * hw[1], dtype=torch.bool), text], dim=1)[:, None, None, :]


@pytest.mark.parametrize("B,L,hw,valid,glyph", [
    (2, 7, (3, 4), [7, 4], None),  # a padded prompt next to a full one
    (1, 5, (4, 5), [5], None),
    (2, 6, (2, 6), [6, 3], (4, [4, 1])),  # with byT5 glyph tokens (per sample [valid byT5, valid MLLM, invalid ...])
])
def test_joint_calls_are_the_paper_definition(monkeypatch, B, L, hw, valid, glyph):
    import diffusers.models.transformers.transformer_hunyuanimage as th

    kw_model = {"text_embed_2_dim": 20} if glyph else {}
    t = _transformer(**kw_model)
    stock = StockCalls(monkeypatch, th)
    with torch.no_grad():
        t(**_inputs(B, L, hw, valid, glyph=glyph))
    monkeypatch.undo()
    cap = Capture(monkeypatch, shadow=True)
    with taca.enabled(t, gamma=1.3) as h, torch.no_grad():
        assert h.kind == "hunyuanimage"
        t(**_inputs(B, L, hw, valid, glyph=glyph))
    mask = _stock_mask(B, L, hw, valid, glyph)
    L_txt = L + (glyph[0] if glyph else 0)
    joint = stock.calls[-(N_DOUBLE + N_SINGLE):]  # after the token refiner's (text-only, its own processor)
    assert len(cap.calls) == N_DOUBLE + N_SINGLE
    gamma = torch.full((B,), 1.3)
    for (q, k, v, kw, out), (sq, sk, sv, smask) in zip(cap.calls, joint):
        assert torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv) and q.shape[1] == hw[0] * hw[1] + L_txt
        assert torch.equal(smask, mask) and torch.equal(kw["attn_mask"], mask)
        assert kw["layout"] == "bnhd" and kw["text_first"] is False and kw["text_len"] == L_txt
        assert torch.equal(kw["gamma"], gamma)
        torch.testing.assert_close(out.double(), paper_attention(q, k, v, L_txt, gamma, mask, text_first=False),
                                   rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("valid,glyph", [([7, 4], None), ([7, 7], None), ([6, 3], (4, [4, 1]))])
@pytest.mark.parametrize("hw", [(3, 4), (5, 2)])
def test_outside_window_and_gamma_one_are_stock(valid, glyph, hw):
    t = _transformer(**({"text_embed_2_dim": 20} if glyph else {}))
    L = 7 if glyph is None else 6
    before = processors_of(t)
    with torch.no_grad():
        ref_in = t(**_inputs(2, L, hw, valid, t=980.0, glyph=glyph))[0]
        ref_out = t(**_inputs(2, L, hw, valid, t=500.0, glyph=glyph))[0]
        h = taca.enable(t, gamma=1.3)
        assert {type(p).__name__ for p in h.processors.values()} == {"TacaHunyuanImageAttnProcessor"}
        assert sorted(h.processors) == sorted([f"transformer_blocks.{i}.attn" for i in range(N_DOUBLE)] +
                                              [f"single_transformer_blocks.{i}.attn" for i in range(N_SINGLE)])
        assert torch.equal(t(**_inputs(2, L, hw, valid, t=500.0, glyph=glyph))[0], ref_out) and h.last_gamma is None
        assert not torch.equal(t(**_inputs(2, L, hw, valid, t=980.0, glyph=glyph))[0], ref_in)
        taca.enable(t, gamma=1.0, schedule="constant")
        assert torch.equal(t(**_inputs(2, L, hw, valid, t=980.0, glyph=glyph))[0], ref_in)
        taca.disable(t)
    check_disable_restores(t, before)


# hunyuanvideo-community/HunyuanImage-2.1-Diffusers scheduler/scheduler_config.json is taken to be
# FlowMatchEulerDiscreteScheduler with shift 5.0 (as remembered, not read offline here); the
# pipeline passes its sigmas linspace(1, 0, steps + 1)[:-1], no mu.
SCHEDULER = dict(num_train_timesteps=1000, shift=5.0)


def _pipeline():
    from diffusers import AutoencoderKLHunyuanImage, ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, HunyuanImagePipeline

    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanImage(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
                                    layers_per_block=1, spatial_compression_ratio=4, sample_size=32, scaling_factor=1.0)
    return HunyuanImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, text_encoder=None,
                                tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                transformer=_transformer(text_embed_2_dim=20),
                                guider=ClassifierFreeGuidance(guidance_scale=3.5))


def _pipe_kwargs(hw, steps):
    """Prompt: 7 MLLM tokens (5 valid) and 3 byT5 (2 valid); negative: 4 MLLM (all valid), 3 byT5 (none)."""
    g = torch.Generator().manual_seed(0)
    return dict(prompt_embeds=torch.randn(1, 7, 24, generator=g), prompt_embeds_mask=_mask(7, [5]).long(),
                negative_prompt_embeds=torch.randn(1, 4, 24, generator=g), negative_prompt_embeds_mask=_mask(4, [4]).long(),
                prompt_embeds_2=torch.randn(1, 3, 20, generator=g), prompt_embeds_mask_2=_mask(3, [2]).long(),
                negative_prompt_embeds_2=torch.randn(1, 3, 20, generator=g),
                negative_prompt_embeds_mask_2=_mask(3, [0]).long(),
                height=hw[0], width=hw[1], num_inference_steps=steps, output_type="latent")


def test_pipeline_gamma_one_is_stock():
    pipe = _pipeline()
    kw = _pipe_kwargs((32, 48), 3)
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    with taca.enabled(pipe, gamma=1.0, schedule="constant"):
        assert torch.equal(pipe(generator=torch.Generator().manual_seed(1), **kw).images, stock)


@pytest.mark.parametrize("hw", [(32, 48), (48, 24)])
def test_pipeline_cfg_unequal_prompts_and_window(monkeypatch, hw):
    """HunyuanImagePipeline with classifier-free guidance (cond and uncond forwards, text of 10 and
    7 tokens with 7 and 4 valid): gamma from the pipeline's t (host path), the window the paper
    rule's on the scheduler, every joint call in it the paper's definition with that call's mask."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = _pipeline()
    steps = 6
    kw = _pipe_kwargs(hw, steps)
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    cap = Capture(monkeypatch)
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, k, o: seen.append(
        (k["encoder_hidden_states"].shape[1], get_handle(m).last_gamma, get_handle(m).last_path)), with_kwargs=True)
    with taca.enabled(pipe, gamma=1.3):
        out = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    hook.remove()
    sch = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    sch.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
    on = window(sch.timesteps / 1000)
    assert on and [L for L, _, _ in seen] == [7, 4] * steps and {p for _, _, p in seen} == {"host"}
    assert [i for i in range(steps) if seen[2 * i][1] is not None] == on
    n_img = (hw[0] // 4) * (hw[1] // 4)
    n_calls = N_DOUBLE + N_SINGLE
    assert len(cap.calls) == 2 * n_calls * len(on)
    for j, (q, k, v, kw_, o) in enumerate(cap.calls):
        cond = (j // n_calls) % 2 == 0
        L_txt, valid = (10, [7]) if cond else (7, [4])
        mask = torch.cat([torch.ones(1, n_img, dtype=torch.bool), _mask(L_txt, valid)], dim=1)[:, None, None, :]
        assert q.shape[1] == n_img + L_txt and kw_["text_len"] == L_txt and torch.equal(kw_["attn_mask"], mask)
        torch.testing.assert_close(o.double(), paper_attention(q, k, v, L_txt, torch.full((1,), 1.3), mask, text_first=False),
                                   rtol=1e-5, atol=2e-6)
    assert not torch.equal(out, stock)


def hunyuanimage_windows():
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    out = {}
    for steps in (8, 30, 50):  # 50: the pipeline's default; 8: the distilled checkpoint
        sch = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
        sch.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
        out[steps] = ranges(window(sch.timesteps / 1000))
    return out


def test_window_steps_with_the_real_scheduler():
    assert hunyuanimage_windows() == EXPECTED_WINDOWS


# steps -> steps with gamma
EXPECTED_WINDOWS = {8: "0-1", 30: "0-4", 50: "0-6"}



def _kwargs_checkpointing(t):
    """``t`` whose enable_gradient_checkpointing() installs a checkpointing function that takes
    keyword arguments: diffusers 0.42.1's HunyuanImage forward passes attention_mask= and
    image_rotary_emb= to ``_gradient_checkpointing_func`` by keyword, which the default function
    (``_gradient_checkpointing_func(module, *args)``) refuses with TypeError, TACA or not."""
    import torch.utils.checkpoint

    enable = t.enable_gradient_checkpointing
    func = lambda block, *a, **k: torch.utils.checkpoint.checkpoint(block, *a, use_reentrant=False, **k)  # noqa: E731
    t.enable_gradient_checkpointing = lambda: enable(gradient_checkpointing_func=func)
    return t


@pytest.mark.parametrize("valid,glyph", [([7, 4], None), ([6, 3], (4, [4, 1]))])
def test_gradient_checkpointing_keeps_the_call_state(valid, glyph):
    """The forward carries no attention kwargs: the hook hands each call's state (per-sample valid
    text, the stock key mask) to the processors, and to the blocks recomputed in the backward pass
    through the checkpointing function, byT5 glyph tokens included (t = 1000 sigma). The
    checkpointing function is one that takes the keyword arguments this model passes it."""
    check_checkpointing_keeps_state(lambda: _kwargs_checkpointing(_transformer()),
                                    _inputs(2, 7, (3, 4), valid, glyph=glyph))


@pytest.mark.xfail(strict=True, raises=TypeError, reason=(
    "diffusers 0.42.1 bug, not TACA's: HunyuanImageTransformer2DModel.forward's checkpointing branch calls "
    "self._gradient_checkpointing_func(block, hidden_states, encoder_hidden_states, temb, "
    "attention_mask=..., image_rotary_emb=...), and the default function from enable_gradient_checkpointing() "
    "is _gradient_checkpointing_func(module, *args): TypeError, unexpected keyword argument 'attention_mask', "
    "with stock attention too"))
def test_gradient_checkpointing_with_the_default_function():
    check_checkpointing_keeps_state(_transformer, _inputs(2, 7, (3, 4), [7, 4]))
