"""CogView3-Plus (CogView3PlusTransformer2DModel) with the taca.models.cogview3plus adapter, on tiny
random-weight models: [txt, img], CogVideoX's processor without attention kwargs (the hook hands the
processors their state); in the window every joint call is the paper's definition, outside it and at
gamma = 1 the model is stock bit for bit, at two resolutions; the DDPM timestep is translated as
t >= 970 on the 1000-step grid; CogView3PlusPipeline with CFG (one batch [negative, prompt], padded
and unmasked as the pipeline sends them) at two resolutions."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("diffusers")

import taca
from taca.pipeline import get_handle

from model_checks import (CaptureSDPA, StockSDPACalls, check_disable_restores, check_spans_against_paper,
                          processors_of, span_mask, window)
from model_checks import check_checkpointing_keeps_state

TINY = dict(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            out_channels=4, text_embed_dim=24, time_embed_dim=16, condition_dim=8, pos_embed_max_size=16,
            sample_size=16)
# THUDM/CogView3-Plus-3B scheduler/scheduler_config.json as remembered (NOT read offline here):
# CogVideoXDDIMScheduler, 1000 training steps, scaled_linear betas 0.00085-0.012, v-prediction, zero
# terminal SNR, timestep_spacing "trailing". Only the spacing and the step count matter for the
# window (t >= 970).
SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                 prediction_type="v_prediction", rescale_betas_zero_snr=True, snr_shift_scale=4.0,
                 timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True, steps_offset=0)


def _transformer():
    from diffusers import CogView3PlusTransformer2DModel

    torch.manual_seed(0)
    return CogView3PlusTransformer2DModel(**TINY).eval()


def _inputs(B, L, hw, step=980, seed=1):
    """hw: latent size (patches: hw / 2)."""
    g = torch.Generator().manual_seed(seed)
    size = torch.tensor([[8.0 * hw[0], 8.0 * hw[1]]] * B)
    return dict(hidden_states=torch.randn(B, 4, hw[0], hw[1], generator=g),
                encoder_hidden_states=torch.randn(B, L, 24, generator=g), timestep=torch.full((B,), step),
                original_size=size, target_size=size, crop_coords=torch.zeros(B, 2), return_dict=False)


@pytest.mark.parametrize("B,L,hw", [(2, 7, (6, 8)), (1, 5, (4, 4))])
def test_joint_calls_are_the_paper_definition(monkeypatch, B, L, hw):
    t = _transformer()
    stock = StockSDPACalls(monkeypatch)
    with torch.no_grad():
        t(**_inputs(B, L, hw))
    monkeypatch.undo()
    cap = CaptureSDPA(monkeypatch, shadow=True)
    with taca.enabled(t, gamma=1.3) as h, torch.no_grad():
        t(**_inputs(B, L, hw))
        assert h.kind == "cogview3plus"
    assert len(cap.calls) == len(stock.calls) == TINY["num_layers"]
    N = L + (hw[0] // 2) * (hw[1] // 2)
    for (q, k, v, _, _), (sq, sk, sv, smask, _) in zip(cap.calls, stock.calls):
        assert smask is None and torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv) and q.shape[2] == N
    text = span_mask(B, N, 0, L)
    check_spans_against_paper(cap.calls, text, ~text, torch.full((B,), 1.3), layout="bhnd")


@pytest.mark.parametrize("hw", [(6, 8), (4, 4)])
def test_outside_window_and_gamma_one_are_stock(hw):
    t = _transformer()
    before = processors_of(t)
    with torch.no_grad():
        ref_in = t(**_inputs(2, 7, hw, step=980))[0]
        ref_out = t(**_inputs(2, 7, hw, step=960))[0]
        h = taca.enable(t, gamma=1.3)
        assert {type(p).__name__ for p in h.processors.values()} == {"TacaCogVideoXAttnProcessor"}
        assert torch.equal(t(**_inputs(2, 7, hw, step=960))[0], ref_out) and h.last_gamma is None
        assert not torch.equal(t(**_inputs(2, 7, hw, step=980))[0], ref_in)
        taca.enable(t, gamma=1.0, schedule="constant")
        assert torch.equal(t(**_inputs(2, 7, hw, step=980))[0], ref_in)
        taca.disable(t)
    check_disable_restores(t, before)
    with torch.no_grad():  # the processors' per-call state is cleared after each call
        assert torch.equal(t(**_inputs(2, 7, hw, step=980))[0], ref_in)


def test_ddpm_timestep_rule_is_t_at_least_970():
    t = _transformer()
    with taca.enabled(t, gamma=1.3) as h, torch.no_grad():
        for step, on in ((999, True), (970, True), (969, False), (500, False)):
            t(**_inputs(1, 7, (4, 4), step=step))
            assert (h.last_gamma is not None) == on, step


def _scheduler():
    from diffusers import CogVideoXDDIMScheduler

    return CogVideoXDDIMScheduler(**SCHEDULER)


@pytest.mark.parametrize("hw", [(48, 64), (32, 32)])
def test_pipeline_cfg_and_window(monkeypatch, hw):
    """CogView3PlusPipeline, CFG batch [negative, prompt] of 7 tokens each (padded, unmasked: all 7
    are text): the window is t >= 970 on the scheduler's trailing timesteps, every joint call in it
    is the paper's definition, gamma = 1 is stock bit for bit."""
    from diffusers import CogView3PlusPipeline

    t = _transformer()
    pipe = CogView3PlusPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=t, scheduler=_scheduler())
    steps = 20
    g = torch.Generator().manual_seed(0)
    pe = torch.randn(1, 7, 24, generator=g) * (torch.arange(7) < 5)[None, :, None]  # zero "padding" after 5
    ne = torch.zeros(1, 7, 24)  # what the pipeline makes of an absent negative prompt
    kw = dict(prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=5.0, height=hw[0], width=hw[1],
              num_inference_steps=steps, output_type="latent")
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    with taca.enabled(pipe, gamma=1.0, schedule="constant"):
        assert torch.equal(pipe(generator=torch.Generator().manual_seed(1), **kw).images, stock)
    cap = CaptureSDPA(monkeypatch)
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, k, o: seen.append(get_handle(m).last_gamma),
                                                  with_kwargs=True)
    with taca.enabled(pipe, gamma=1.3):
        out = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    hook.remove()
    sch = _scheduler()
    sch.set_timesteps(steps)
    on = window(sch.timesteps.float() / 1000)
    assert on == [0] and len(seen) == steps
    assert [i for i in range(steps) if seen[i] is not None] == on
    n_tok = (hw[0] // 16) * (hw[1] // 16)
    assert len(cap.calls) == TINY["num_layers"] * len(on)
    text = span_mask(2, 7 + n_tok, 0, 7)
    check_spans_against_paper(cap.calls, text, ~text, torch.full((2,), 1.3), layout="bhnd")
    assert not torch.equal(out, stock)


def test_gradient_checkpointing_keeps_the_call_state():
    """The forward carries no attention kwargs: the hook hands each call's state to the processors,
    and to the blocks recomputed in the backward pass through the checkpointing function (DDPM
    t = 980; no attention mask)."""
    check_checkpointing_keeps_state(_transformer, _inputs(2, 7, (6, 8)))
