"""FLUX.3 (Flux3Transformer2DModel, modular pipelines only) with the taca.models.flux3 adapter, on
tiny random-weight models: every joint attention call ([txt, img, cond_img] in the single blocks)
inside the window is the paper's definition, the per-mode blocks (text only, image only, reference
images only) stay stock, outside the window and at gamma = 1 the model is stock bit for bit; the
modular Flux3AutoBlocks (CFG through the guider, prompts of 7 and 4 tokens) and
Flux3DistilledAutoBlocks (flow map: target_timestep) pipelines with taca.enable(pipe)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("diffusers")

import taca
from taca.pipeline import get_handle

from model_checks import (check_checkpointing_keeps_state, Capture, StockCalls, check_against_paper, check_disable_restores, processors_of,
                          ranges, window)

TINY = dict(in_channels=16, cond_in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=32,
            num_attention_heads=2, joint_attention_dim=24, timestep_channels=32, axes_dims_rope=(8, 8, 8, 8))
N_SINGLE = TINY["num_single_layers"]
# per-mode calls of one forward: text, image (and reference images when given)
N_MODE = TINY["num_layers"]
# Flux3SetTimestepsStep's scheduler (diffusers' own ComponentSpec: FlowMatchEulerDiscreteScheduler's
# defaults with a constant shift of 6.93, no dynamic shifting); sigmas linspace(1, 1 / steps).
SHIFT = 6.93


def _transformer(**kw):
    from diffusers import Flux3Transformer2DModel

    torch.manual_seed(0)
    return Flux3Transformer2DModel(**{**TINY, **kw}).eval()


def _ids(h, w, l=0.0):
    return torch.cartesian_prod(torch.zeros(1), torch.arange(h).float(), torch.arange(w).float(), torch.full((1,), l))


def _inputs(B, L, hw, cond_hw=None, sigma=0.98, seed=1, target=None):
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    kw = dict(hidden_states=torch.randn(B, h * w, 16, generator=g), encoder_hidden_states=torch.randn(B, L, 24, generator=g),
              timestep=torch.full((B,), sigma), img_ids=_ids(h, w),
              txt_ids=torch.cartesian_prod(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.arange(L).float()),
              return_dict=False)
    if cond_hw is not None:
        ch, cw = cond_hw
        kw["image_cond_hidden_states"] = torch.randn(B, ch * cw, 16, generator=g)
        kw["image_cond_ids"] = _ids(ch, cw, -1.0)
    if target is not None:
        kw["target_timestep"] = torch.full((B,), target)
    return kw


def _n_cond(cond_hw):
    return 0 if cond_hw is None else cond_hw[0] * cond_hw[1]


@pytest.mark.parametrize("B,L,hw,cond_hw", [(2, 7, (4, 5), None), (1, 1, (3, 4), None), (2, 5, (3, 3), (2, 4))])
def test_joint_calls_are_the_paper_definition(monkeypatch, B, L, hw, cond_hw):
    """In the window every joint call equals the paper's definition on the stock q, k, v; reference
    image tokens after the image are visual queries; the per-mode calls stay stock."""
    import diffusers.models.transformers.transformer_flux3 as tf3

    t = _transformer()
    stock = StockCalls(monkeypatch, tf3)
    with torch.no_grad():
        ref = t(**_inputs(B, L, hw, cond_hw))[0]
    monkeypatch.undo()
    n_mode = N_MODE * (3 if cond_hw else 2)
    assert len(stock.calls) == n_mode + N_SINGLE
    cap = Capture(monkeypatch, shadow=True)
    mode_calls = StockCalls(monkeypatch, tf3)
    with taca.enabled(t, gamma=1.3) as h, torch.no_grad():
        assert h.kind == "flux3" and sorted(h.processors) == [f"single_transformer_blocks.{i}.attn" for i in range(N_SINGLE)]
        out = t(**_inputs(B, L, hw, cond_hw))[0]
    # the shadow run hands back stock attention, so the whole forward is stock's
    assert torch.equal(out, ref)
    # the per-mode blocks ran their stock processors (dispatch_attention_fn of the model file)
    assert len(mode_calls.calls) == n_mode
    for (q, k, v, m), (sq, sk, sv, _) in zip(mode_calls.calls, stock.calls[:n_mode]):
        assert m is None and torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv)
    assert len(cap.calls) == N_SINGLE
    for (q, k, v, _, _), (sq, sk, sv, smask) in zip(cap.calls, stock.calls[n_mode:]):
        assert smask is None
        assert torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv)
        assert q.shape[1] == L + hw[0] * hw[1] + _n_cond(cond_hw)
    check_against_paper(cap.calls, L, torch.full((B,), 1.3))


def test_flow_map_checkpoint_gamma_follows_timestep(monkeypatch):
    """A flow-map (step-distilled) transformer takes target_timestep too: the window is decided on
    timestep (the current noise level), whatever the target."""
    t = _transformer(flow_map=True)
    cap = Capture(monkeypatch)
    with taca.enabled(t, gamma=1.3) as h, torch.no_grad():
        t(**_inputs(2, 6, (3, 4), (2, 2), sigma=0.98, target=0.5))
        assert h.last_gamma is not None and len(cap.calls) == N_SINGLE
        check_against_paper(cap.calls, 6, torch.full((2,), 1.3))
        t(**_inputs(2, 6, (3, 4), (2, 2), sigma=0.9, target=0.99))
        assert h.last_gamma is None and len(cap.calls) == N_SINGLE


@pytest.mark.parametrize("hw,cond_hw", [((4, 5), None), ((6, 3), (2, 2))])
def test_outside_window_and_gamma_one_are_stock(hw, cond_hw):
    t = _transformer()
    before = processors_of(t)
    inp = lambda sigma: _inputs(2, 7, hw, cond_hw, sigma=sigma)  # noqa: E731
    with torch.no_grad():
        ref_in = t(**inp(0.98))[0]
        ref_out = t(**inp(0.5))[0]
        h = taca.enable(t, gamma=1.3)
        assert {type(p).__name__ for p in h.processors.values()} == {"TacaFlux3AttnProcessor"}
        # the per-mode blocks keep their stock processor objects
        for name, p in processors_of(t).items():
            assert (p is before[name]) == (not name.startswith("single_transformer_blocks.")), name
        assert torch.equal(t(**inp(0.5))[0], ref_out) and h.last_gamma is None
        assert not torch.equal(t(**inp(0.98))[0], ref_in)
        taca.enable(t, gamma=1.0, schedule="constant")
        assert torch.equal(t(**inp(0.98))[0], ref_in)
        taca.disable(t)
    check_disable_restores(t, before)
    with torch.no_grad():
        assert torch.equal(t(**inp(0.98))[0], ref_in)


def test_gradient_checkpointing_keeps_the_call_state():
    """The forward carries no attention kwargs: the hook hands each call's state to the processors,
    and to the blocks recomputed in the backward pass through the checkpointing function."""
    check_checkpointing_keeps_state(_transformer, _inputs(1, 3, (2, 2)))


def _modular(distilled=False):
    from diffusers.modular_pipelines import Flux3AutoBlocks, Flux3DistilledAutoBlocks

    blocks = Flux3DistilledAutoBlocks() if distilled else Flux3AutoBlocks()
    for name in ("prompt_upsampler", "text_encoder", "vae_encoder", "decode"):  # no Qwen3-VL / VAE built
        blocks.sub_blocks.pop(name)
    pipe = blocks.init_pipeline()
    return pipe


def _record_calls(t):
    """(text length, gamma or None) of every transformer call."""
    seen = []
    hook = t.register_forward_hook(lambda m, a, kw, out: seen.append(
        (kw["encoder_hidden_states"].shape[1], get_handle(m).last_gamma)), with_kwargs=True)
    return seen, hook


def _sched_window(steps):
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))
    return window(sch.timesteps / 1000)


def test_modular_pipeline_without_transformer_is_refused():
    pipe = _modular()
    with pytest.raises(TypeError, match="Flux3ModularPipeline has no .transformer"):
        taca.enable(pipe)


@pytest.mark.parametrize("hw,ref", [((64, 96), False), ((96, 64), True)])
def test_modular_pipeline_cfg_and_window(monkeypatch, hw, ref):
    """Flux3AutoBlocks' pipeline (the text encoder, upsampler, VAE steps popped; prompt embeddings
    given) with the guider's CFG (prompt 7 tokens, negative 4: separate transformer calls), with and
    without a reference image's latents: taca.enable(pipe) finds .transformer and .scheduler, the
    steps in the window are the paper rule's on Flux3SetTimestepsStep's scheduler, every joint call
    in them is the paper's definition with that call's text length, and gamma 1 is stock."""
    pipe = _modular()
    pipe.update_components(transformer=_transformer())
    steps = 6
    g = torch.Generator().manual_seed(0)
    kw = dict(prompt_embeds=torch.randn(1, 7, 24, generator=g), negative_prompt_embeds=torch.randn(1, 4, 24, generator=g),
              height=hw[0], width=hw[1], num_inference_steps=steps, output="latents")
    n_img = (hw[0] // 16) * (hw[1] // 16)
    n_cond = 0
    if ref:
        kw["image_cond_latents"] = [torch.randn(1, 16, 2, 3, generator=g)]  # one reference, 2 x 3 tokens
        n_cond = 6
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw)
    cap = Capture(monkeypatch)
    seen, hook = _record_calls(pipe.transformer)
    with taca.enabled(pipe, gamma=1.3) as h:
        assert h.pipe is pipe
        out = pipe(generator=torch.Generator().manual_seed(1), **kw)
    hook.remove()
    on = _sched_window(steps)
    assert on == [0, 1]
    assert [L for L, _ in seen] == [7, 4] * steps
    assert [i for i in range(steps) if seen[2 * i][1] is not None] == on
    assert all((seen[2 * i][1] is None) == (seen[2 * i + 1][1] is None) for i in range(steps))
    assert len(cap.calls) == 2 * N_SINGLE * len(on)
    for j in range(0, len(cap.calls), N_SINGLE):
        L = 7 if (j // N_SINGLE) % 2 == 0 else 4
        chunk = cap.calls[j : j + N_SINGLE]
        assert all(c[0].shape[1] == L + n_img + n_cond for c in chunk)
        check_against_paper(chunk, L, torch.full((1,), 1.3))
    assert not torch.equal(out, stock)
    with taca.enabled(pipe, gamma=1.0, schedule="constant"):
        assert torch.equal(pipe(generator=torch.Generator().manual_seed(1), **kw), stock)
    assert get_handle(pipe) is None


def test_distilled_modular_pipeline(monkeypatch):
    """Flux3DistilledAutoBlocks (flow map, no CFG): 4 steps, gamma in step 0 only, the joint calls
    the paper's definition; steps:2 counts the pipeline's steps through its scheduler."""
    pipe = _modular(distilled=True)
    pipe.update_components(transformer=_transformer(flow_map=True))
    kw = dict(prompt_embeds=torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(0)), height=48, width=64,
              num_inference_steps=4, output="latents")
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw)
    cap = Capture(monkeypatch)
    seen, hook = _record_calls(pipe.transformer)
    with taca.enabled(pipe, gamma=1.3):
        out = pipe(generator=torch.Generator().manual_seed(1), **kw)
    assert [i for i, (_, gm) in enumerate(seen) if gm is not None] == _sched_window(4) == [0]
    assert len(cap.calls) == N_SINGLE
    check_against_paper(cap.calls, 5, torch.full((2,), 1.3))
    assert not torch.equal(out, stock)
    seen.clear()
    with taca.enabled(pipe, gamma=1.3, schedule="steps:2"):
        pipe(generator=torch.Generator().manual_seed(1), **kw)
        pipe(generator=torch.Generator().manual_seed(1), **kw)
    hook.remove()
    assert [gm is not None for _, gm in seen] == [True, True, False, False] * 2


def flux3_windows():
    return {steps: ranges(_sched_window(steps)) for steps in (4, 16, 28, 50)}


def test_window_steps_with_the_real_scheduler():
    """The README's table: FLUX.3 steps in the paper's window (sigma >= 0.97) on
    Flux3SetTimestepsStep's scheduler (constant shift 6.93; 50 steps, 16 for the distilled)."""
    assert flux3_windows() == EXPECTED_WINDOWS


EXPECTED_WINDOWS = {4: "0", 16: "0-2", 28: "0-4", 50: "0-8"}
