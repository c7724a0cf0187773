"""AuraFlow (AuraFlowTransformer2DModel) with the taca.models.auraflow adapter, on tiny random-weight
models: the joint sequence is [8 registers, txt, img] in the MMDiT and the single-DiT blocks; in the
window every attention call is the paper's definition with gamma on the text keys only (registers are
not text: never scaled), outside it and at gamma = 1 the model is stock bit for bit (plain and fused
projections); the pipeline with CFG (padded prompts of unequal valid lengths, as AuraFlowPipeline
sends them: zeroed, unmasked) at two resolutions."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("diffusers")

import taca
from taca.pipeline import get_handle

from model_checks import (CaptureSDPA, StockSDPACalls, check_disable_restores,
                          check_spans_against_paper, processors_of, ranges, span_mask, window)
from model_checks import check_checkpointing_keeps_state

TINY = dict(sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=2, num_single_dit_layers=2,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32,
            out_channels=4, pos_embed_max_size=64)
N_CALLS = TINY["num_mmdit_layers"] + TINY["num_single_dit_layers"]
R = 8  # register tokens
# fal/AuraFlow(-v0.2, -v0.3) scheduler/scheduler_config.json: FlowMatchEulerDiscreteScheduler,
# num_train_timesteps 1000, shift 1.73 (as remembered from the hub, not read offline here).
SCHEDULER = dict(num_train_timesteps=1000, shift=1.73)


def _transformer():
    from diffusers import AuraFlowTransformer2DModel

    torch.manual_seed(0)
    return AuraFlowTransformer2DModel(**TINY).eval()


def _inputs(B, L, hw, sigma=0.98, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(B, 4, 2 * hw[0], 2 * hw[1], generator=g),
                encoder_hidden_states=torch.randn(B, L, 24, generator=g), timestep=torch.full((B,), sigma),
                return_dict=False)


def _check_model(monkeypatch, B, L, hw, fuse=False):
    t = _transformer()
    if fuse:
        t.fuse_qkv_projections()
    stock = StockSDPACalls(monkeypatch)
    with torch.no_grad():
        t(**_inputs(B, L, hw))
    monkeypatch.undo()
    cap = CaptureSDPA(monkeypatch, shadow=True)
    with taca.enabled(t, gamma=1.3), torch.no_grad():
        t(**_inputs(B, L, hw))
    assert len(cap.calls) == len(stock.calls) == N_CALLS
    N = R + L + hw[0] * hw[1]
    for (q, k, v, _, _), (sq, sk, sv, smask, sscale) in zip(cap.calls, stock.calls):
        assert smask is None and sscale == 16 ** -0.5
        assert torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv) and q.shape[2] == N
    text = span_mask(B, N, R, L)  # keys [8, 8 + L): the prompt, not the registers
    check_spans_against_paper(cap.calls, text, ~text, torch.full((B,), 1.3), scale=16 ** -0.5, layout="bhnd")


@pytest.mark.parametrize("B,L,hw,fuse", [(2, 7, (3, 4), False), (1, 1, (4, 2), False), (2, 5, (2, 3), True)])
def test_joint_calls_are_the_paper_definition(monkeypatch, B, L, hw, fuse):
    """MMDiT and single-DiT calls: text keys are [8, 8 + L) for every query; register keys and
    image keys are never scaled; q, k, v are the stock model's bit for bit."""
    _check_model(monkeypatch, B, L, hw, fuse)


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("hw", [(3, 4), (4, 2)])
def test_outside_window_and_gamma_one_are_stock(hw, fuse):
    t = _transformer()
    if fuse:
        t.fuse_qkv_projections()
    before = processors_of(t)
    with torch.no_grad():
        ref_in = t(**_inputs(2, 7, hw, sigma=0.98))[0]
        ref_out = t(**_inputs(2, 7, hw, sigma=0.5))[0]
        h = taca.enable(t, gamma=1.3)
        assert h.kind == "auraflow" and len(h.processors) == N_CALLS
        assert {type(p).__name__ for p in h.processors.values()} == {"TacaAuraFlowAttnProcessor"}
        assert all(p.fused == fuse and p.n_registers == R for p in h.processors.values())
        assert torch.equal(t(**_inputs(2, 7, hw, sigma=0.5))[0], ref_out) and h.last_gamma is None
        assert not torch.equal(t(**_inputs(2, 7, hw, sigma=0.98))[0], ref_in)
        taca.enable(t, gamma=1.0, schedule="constant")
        assert torch.equal(t(**_inputs(2, 7, hw, sigma=0.98))[0], ref_in)
        taca.disable(t)
    check_disable_restores(t, before)


def _pipeline():
    from diffusers import AuraFlowPipeline, FlowMatchEulerDiscreteScheduler

    return AuraFlowPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=_transformer(),
                            scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER))


def _padded(L, valid, seed):
    """AuraFlowPipeline's prompt: embeddings zeroed past the valid tokens, and the 0/1 mask."""
    m = (torch.arange(L) < valid).long()[None]
    return torch.randn(1, L, 24, generator=torch.Generator().manual_seed(seed)) * m[..., None], m


@pytest.mark.parametrize("hw", [(32, 48), (48, 32)])
def test_pipeline_cfg_padded_prompts_and_window(monkeypatch, hw):
    """AuraFlowPipeline, CFG batch [negative (2 of 9 tokens valid), prompt (5 of 9)]: the steps in
    the window are the paper rule's on the real scheduler, and every call in them is the paper's
    definition (text keys [8, 17) for both samples: the padded, zeroed tokens are attended in stock,
    so they are text keys)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = _pipeline()
    steps = 6
    pe, pm = _padded(9, 5, 0)
    ne, nm = _padded(9, 2, 1)
    kw = dict(prompt_embeds=pe, prompt_attention_mask=pm, negative_prompt_embeds=ne,
              negative_prompt_attention_mask=nm, guidance_scale=3.5, height=hw[0], width=hw[1],
              num_inference_steps=steps, output_type="latent")
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    with taca.enabled(pipe, gamma=1.0, schedule="constant"):
        assert torch.equal(pipe(generator=torch.Generator().manual_seed(1), **kw).images, stock)
    cap = CaptureSDPA(monkeypatch)
    gammas = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, k, o: gammas.append(get_handle(m).last_gamma),
                                                  with_kwargs=True)
    with taca.enabled(pipe, gamma=1.3):
        out = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    hook.remove()
    sch = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    sch.set_timesteps(steps)
    on = window(sch.timesteps / 1000)
    assert on and len(gammas) == steps
    assert [i for i in range(steps) if gammas[i] is not None] == on
    assert len(cap.calls) == N_CALLS * len(on)
    N = R + 9 + (hw[0] // 16) * (hw[1] // 16)
    text = span_mask(2, N, R, 9)
    check_spans_against_paper(cap.calls, text, ~text, torch.full((2,), 1.3), scale=16 ** -0.5, layout="bhnd")
    assert not torch.equal(out, stock)


def auraflow_windows():
    """{steps: window} with the AuraFlow scheduler config (the pipeline passes no sigmas: the
    scheduler's own linear timesteps, shifted by 1.73)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    out = {}
    for steps in (20, 28, 50):
        sch = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
        sch.set_timesteps(steps)
        out[steps] = ranges(window(sch.timesteps / 1000))
    return out


def test_window_steps_with_the_real_scheduler():
    assert auraflow_windows() == EXPECTED_WINDOWS


EXPECTED_WINDOWS = {20: "0", 28: "0-1", 50: "0-2"}


@pytest.mark.parametrize("fuse", [False, True])
def test_gradient_checkpointing_keeps_the_call_state(fuse):
    """diffusers 0.42.1 checkpoints the joint blocks as (hidden_states, encoder_hidden_states, temb)
    and the single-DiT blocks as (hidden_states, temb), without the attention_kwargs the plain
    branch passes (TACA's state): the adapter hands them back, so output and gradients equal the
    plain forward's (no attention mask; fused QKV too)."""

    def make():
        t = _transformer()
        if fuse:
            t.fuse_qkv_projections()
        return t

    check_checkpointing_keeps_state(make, _inputs(2, 7, (3, 4)))
