"""CogVideoX (CogVideoXTransformer3DModel) with the taca.models.cogvideox adapter, on tiny random-weight
models: [txt, video] with the in-place video RoPE (5B / 1.5) or without (2B), plain and fused
projections; in the window every joint call is the paper's definition, outside it and at gamma = 1
the model is stock bit for bit; the DDPM timestep is translated as t >= 970 on the 1000-step grid;
CogVideoXPipeline with CFG (one batch [negative, prompt], padded and unmasked as the pipeline sends
them) at two resolutions."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("diffusers")

import taca
from taca.pipeline import get_handle

from model_checks import (CaptureSDPA, StockSDPACalls, check_disable_restores, check_spans_against_paper,
                          processors_of, ranges, span_mask, window)
from model_checks import check_checkpointing_keeps_state

TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
            text_embed_dim=24, num_layers=2, sample_width=8, sample_height=6, sample_frames=5, patch_size=2,
            temporal_compression_ratio=4, max_text_seq_length=7)
# THUDM/CogVideoX-2b / -5b scheduler/scheduler_config.json as remembered (NOT read offline here):
# CogVideoXDDIMScheduler, 1000 training steps, scaled_linear betas 0.00085-0.012, v-prediction, zero
# terminal SNR, snr_shift_scale 3.0 (2b; 5b 1.0), timestep_spacing "trailing". Only the spacing and
# the step count matter for the window (t >= 970).
SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                 prediction_type="v_prediction", rescale_betas_zero_snr=True, snr_shift_scale=3.0,
                 timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True, steps_offset=0)


def _transformer(rope=True):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(**TINY, use_rotary_positional_embeddings=rope).eval()


def _rope(t, hw, frames):
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=t, scheduler=None)
    return pipe._prepare_rotary_positional_embeddings(8 * 2 * hw[0], 8 * 2 * hw[1], frames, "cpu")


def _inputs(t, B, L, hw, frames=2, step=980, seed=1):
    """hw: video tokens per frame (latent size / 2)."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(hidden_states=torch.randn(B, frames, 4, 2 * hw[0], 2 * hw[1], generator=g),
              encoder_hidden_states=torch.randn(B, L, 24, generator=g), timestep=torch.full((B,), step),
              return_dict=False)
    if t.config.use_rotary_positional_embeddings:
        kw["image_rotary_emb"] = _rope(t, hw, frames)
    return kw


def _check_model(monkeypatch, B, L, hw, rope, fuse):
    t = _transformer(rope)
    if fuse:
        t.fuse_qkv_projections()
    stock = StockSDPACalls(monkeypatch)
    with torch.no_grad():
        t(**_inputs(t, B, L, hw))
    monkeypatch.undo()
    cap = CaptureSDPA(monkeypatch, shadow=True)
    with taca.enabled(t, gamma=1.3), torch.no_grad():
        t(**_inputs(t, B, L, hw))
    assert len(cap.calls) == len(stock.calls) == TINY["num_layers"]
    N = L + 2 * hw[0] * hw[1]
    for (q, k, v, _, _), (sq, sk, sv, smask, _) in zip(cap.calls, stock.calls):
        assert smask is None and torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv) and q.shape[2] == N
    text = span_mask(B, N, 0, L)
    check_spans_against_paper(cap.calls, text, ~text, torch.full((B,), 1.3), layout="bhnd")


@pytest.mark.parametrize("B,L,hw,rope,fuse", [(2, 7, (3, 4), True, False), (1, 7, (2, 3), False, False),
                                              (2, 7, (3, 4), True, True)])
def test_joint_calls_are_the_paper_definition(monkeypatch, B, L, hw, rope, fuse):
    _check_model(monkeypatch, B, L, hw, rope, fuse)


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("hw", [(3, 4), (2, 2)])
def test_outside_window_and_gamma_one_are_stock(hw, fuse):
    t = _transformer()
    if fuse:
        t.fuse_qkv_projections()
    before = processors_of(t)
    with torch.no_grad():
        ref_in = t(**_inputs(t, 2, 7, hw, step=980))[0]
        ref_out = t(**_inputs(t, 2, 7, hw, step=960))[0]
        h = taca.enable(t, gamma=1.3)
        assert h.kind == "cogvideox" and all(p.fused == fuse for p in h.processors.values())
        assert {type(p).__name__ for p in h.processors.values()} == {"TacaCogVideoXAttnProcessor"}
        assert torch.equal(t(**_inputs(t, 2, 7, hw, step=960))[0], ref_out) and h.last_gamma is None
        assert not torch.equal(t(**_inputs(t, 2, 7, hw, step=980))[0], ref_in)
        taca.enable(t, gamma=1.0, schedule="constant")
        assert torch.equal(t(**_inputs(t, 2, 7, hw, step=980))[0], ref_in)
        taca.disable(t)
    check_disable_restores(t, before)


def test_ddpm_timestep_rule_is_t_at_least_970():
    """The integer DDPM timestep: gamma on for t >= 970 (of 0..999), off below."""
    t = _transformer(rope=False)
    with taca.enabled(t, gamma=1.3) as h, torch.no_grad():
        for step, on in ((999, True), (970, True), (969, False), (500, False)):
            t(**_inputs(t, 1, 7, (2, 2), step=step))  # no RoPE: learned positions need 7 tokens
            assert (h.last_gamma is not None) == on, step


def _scheduler():
    from diffusers import CogVideoXDDIMScheduler

    return CogVideoXDDIMScheduler(**SCHEDULER)


@pytest.mark.parametrize("hw,frames", [((48, 64), 5), ((32, 32), 9)])
def test_pipeline_cfg_and_window(monkeypatch, hw, frames):
    """CogVideoXPipeline, CFG batch [negative, prompt] of 7 tokens each (the pipeline's padded T5
    prompts: unmasked, so all 7 are text): the hook reads t on the host, the window is t >= 970 on
    the scheduler's trailing timesteps, every joint call in it is the paper's definition."""
    from diffusers import CogVideoXPipeline

    t = _transformer()
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=t, scheduler=_scheduler())
    steps = 20
    g = torch.Generator().manual_seed(0)
    pe = torch.randn(1, 7, 24, generator=g) * (torch.arange(7) < 5)[None, :, None]  # zero "padding" after 5
    ne = torch.randn(1, 7, 24, generator=g) * (torch.arange(7) < 2)[None, :, None]
    kw = dict(prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=6.0, height=hw[0], width=hw[1],
              num_frames=frames, num_inference_steps=steps, output_type="latent")
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
    sch = _scheduler()
    sch.set_timesteps(steps)
    on = window(sch.timesteps.float() / 1000)
    assert on == [0] and len(seen) == steps and {p for _, p in seen} == {"host"}  # 999 only (then 949)
    assert [i for i in range(steps) if seen[i][0] is not None] == on
    n_tok = ((frames - 1) // 4 + 1) * (hw[0] // 16) * (hw[1] // 16)
    assert len(cap.calls) == TINY["num_layers"] * len(on)
    text = span_mask(2, 7 + n_tok, 0, 7)
    check_spans_against_paper(cap.calls, text, ~text, torch.full((2,), 1.3), layout="bhnd")
    assert not torch.equal(out, stock)


def cogvideox_windows():
    out = {}
    for steps in (20, 50, 100):
        sch = _scheduler()
        sch.set_timesteps(steps)
        out[steps] = ranges(window(sch.timesteps.float() / 1000))
    return out


def test_window_steps_with_the_real_scheduler():
    assert cogvideox_windows() == EXPECTED_WINDOWS


EXPECTED_WINDOWS = {20: "0", 50: "0-1", 100: "0-2"}  # trailing: 999, 979, 959, ... (50 steps)


@pytest.mark.parametrize("rope", [True, False])
def test_gradient_checkpointing_keeps_the_call_state(rope):
    """diffusers' checkpointed CogVideoX blocks get attention_kwargs (TACA's state) like the plain
    ones: output and gradients equal the plain forward's (DDPM t = 980; no attention mask)."""
    check_checkpointing_keeps_state(lambda: _transformer(rope), _inputs(_transformer(rope), 2, 7, (3, 4)))
