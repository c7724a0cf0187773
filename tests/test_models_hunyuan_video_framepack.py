"""HunyuanVideo Framepack (HunyuanVideoFramepackTransformer3DModel) with the
taca.models.hunyuan_video_framepack adapter, on tiny random-weight models: the joint sequence
[history_4x, history_2x, clean, noisy video, SigLIP image_embeds, txt] in double- and single-stream
blocks; the image-embed tokens are visual (their queries get gamma on the text keys, they are not
text keys); the token refiner stays stock; the count-based stock key mask (batches > 1) and batch 1's
truncation to the valid prompt are kept. In the window every joint call is the paper's definition,
outside it and at gamma = 1 the model is stock bit for bit; HunyuanVideoFramepackPipeline (tiny VAE
and SigLIP built here) with true CFG and prompts of different valid lengths at two resolutions."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import taca
from taca.pipeline import get_handle

from model_checks import (Capture, StockCalls, check_disable_restores, check_spans_against_paper,
                          processors_of, ranges, span_mask, window)
from model_checks import check_checkpointing_keeps_state

N_IMG = 3  # SigLIP tokens in the transformer tests
TINY = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2,
            num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
            pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), has_image_proj=True, image_proj_dim=12,
            has_clean_x_embedder=True)
N_JOINT = TINY["num_layers"] + TINY["num_single_layers"]
# the docs' example builds the pipeline from hunyuanvideo-community/HunyuanVideo, whose
# scheduler/scheduler_config.json is, as remembered (NOT read offline here), FlowMatchEulerDiscreteScheduler
# with static shift 7.0 (use_dynamic_shifting off, so the pipeline's mu is ignored); sigmas linspace(1, 0).
SCHEDULER = dict(num_train_timesteps=1000, shift=7.0)


def _transformer():
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    torch.manual_seed(0)
    return HunyuanVideoFramepackTransformer3DModel(**TINY).eval()


def _n_visual(f, h, w):
    """history_4x + history_2x + clean + noisy tokens for _inputs (patch 2; 4 / 2 / 2 history frames)."""
    c = lambda n, k: -(-n // k)  # noqa: E731
    return 1 * c(h, 8) * c(w, 8) + 1 * c(h, 4) * c(w, 4) + 2 * (h // 2) * (w // 2) + f * (h // 2) * (w // 2)


def _inputs(valid, L, fhw, step=980.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    B, (f, h, w) = len(valid), fhw
    return dict(hidden_states=torch.randn(B, 4, f, h, w, generator=g), timestep=torch.full((B,), step),
                encoder_hidden_states=torch.randn(B, L, 16, generator=g),
                encoder_attention_mask=(torch.arange(L)[None, :] < torch.tensor(valid)[:, None]).float(),
                pooled_projections=torch.randn(B, 8, generator=g), image_embeds=torch.randn(B, N_IMG, 12, generator=g),
                indices_latents=torch.arange(3, 3 + f), guidance=torch.full((B,), 6000.0),
                latents_clean=torch.randn(B, 4, 2, h, w, generator=g), indices_latents_clean=torch.tensor([0, 2]),
                latents_history_2x=torch.randn(B, 4, 2, h, w, generator=g),
                indices_latents_history_2x=torch.tensor([3 + f, 4 + f]),
                latents_history_4x=torch.randn(B, 4, 4, h, w, generator=g),
                indices_latents_history_4x=torch.arange(5 + f, 9 + f), return_dict=False)


def _expected(valid, L, n_vis):
    """(text length, key-text mask, visual-query mask, stock mask) of one joint call."""
    B = len(valid)
    if B == 1:  # the model truncates the context to the image tokens and the valid prompt, no mask
        L = valid[0]
        mask = None
    else:
        N = n_vis + N_IMG + L
        mask = (torch.arange(N)[None, :] < (n_vis + N_IMG + torch.tensor(valid))[:, None])[:, None, None, :]
    N = n_vis + N_IMG + L
    text = span_mask(B, N, n_vis + N_IMG, L)
    return L, text, ~text, mask


@pytest.mark.parametrize("valid,L,fhw", [([7, 4], 7, (2, 4, 6)), ([5], 7, (3, 6, 4)), ([2, 6], 6, (1, 8, 4))])
def test_joint_calls_are_the_paper_definition(monkeypatch, valid, L, fhw):
    import diffusers.models.transformers.transformer_hunyuan_video as th

    t = _transformer()
    stock = StockCalls(monkeypatch, th)
    with torch.no_grad():
        t(**_inputs(valid, L, fhw))
    monkeypatch.undo()
    cap = Capture(monkeypatch, shadow=True)
    with taca.enabled(t, gamma=1.3), torch.no_grad():
        t(**_inputs(valid, L, fhw))
    # (the token refiner's AttnProcessor2_0 calls SDPA from attention_processor.py: not counted here)
    assert len(stock.calls) == len(cap.calls) == N_JOINT
    n_vis = _n_visual(*fhw)
    L_txt, text, visual, mask = _expected(valid, L, n_vis)
    for (q, k, v, kw, _), (sq, sk, sv, smask) in zip(cap.calls, stock.calls):
        assert torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv)
        assert q.shape[1] == n_vis + N_IMG + L_txt
        assert (smask is None and mask is None) or torch.equal(smask, mask)
        assert kw["text_first"] is False and kw["text_len"] == L_txt
    # the SigLIP image-embed queries are visual: gamma on their text logits, and they are not text keys
    assert visual[:, n_vis : n_vis + N_IMG].all() and not text[:, : n_vis + N_IMG].any()
    check_spans_against_paper(cap.calls, text, visual, torch.full((len(valid),), 1.3), masks=mask)


@pytest.mark.parametrize("valid", [[7, 4], [5]])
@pytest.mark.parametrize("fhw", [(2, 4, 6), (1, 6, 4)])
def test_outside_window_and_gamma_one_are_stock(valid, fhw):
    t = _transformer()
    before = processors_of(t)
    with torch.no_grad():
        ref_in = t(**_inputs(valid, 7, fhw, 980.0))[0]
        ref_out = t(**_inputs(valid, 7, fhw, 500.0))[0]
        h = taca.enable(t, gamma=1.3)
        assert h.kind == "hunyuan_video_framepack" and len(h.processors) == N_JOINT
        assert not any(n.startswith("context_embedder") for n in h.processors)
        assert {type(m.processor).__name__ for n, m in t.named_modules()
                if n.startswith("context_embedder") and hasattr(m, "set_processor")} == {"AttnProcessor2_0"}
        assert torch.equal(t(**_inputs(valid, 7, fhw, 500.0))[0], ref_out) and h.last_gamma is None
        assert not torch.equal(t(**_inputs(valid, 7, fhw, 980.0))[0], ref_in)
        taca.enable(t, gamma=1.0, schedule="constant")
        assert torch.equal(t(**_inputs(valid, 7, fhw, 980.0))[0], ref_in)
        taca.disable(t)
    check_disable_restores(t, before)


def test_missing_image_embeds_is_refused_before_the_forward():
    t = _transformer()
    kw = _inputs([7, 4], 7, (2, 4, 6))
    kw["image_embeds"] = None
    with taca.enabled(t, gamma=1.3), torch.no_grad(), pytest.raises(ValueError, match="without image_embeds"):
        t(**kw)


# --- the pipeline: tiny VAE, SigLIP vision tower and image processor, prompt embeddings given --------

N_SIGLIP = 4  # 16x16 image, patch 8


def _pipeline():
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoFramepackPipeline
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                    norm_num_groups=4, mid_block_add_attention=False).eval()
    siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=12, intermediate_size=16, num_hidden_layers=1,
                                                  num_attention_heads=2, image_size=16, patch_size=8)).eval()
    fe = SiglipImageProcessor(size={"height": 16, "width": 16})
    return HunyuanVideoFramepackPipeline(text_encoder=None, tokenizer=None, transformer=_transformer(), vae=vae,
                                         scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), text_encoder_2=None,
                                         tokenizer_2=None, image_encoder=siglip, feature_extractor=fe)


def _pipe_kwargs(hw, steps):
    """True CFG: prompt 7 tokens (5 valid), negative 7 tokens (2 valid); one section of 2 latent frames."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, *hw, generator=g)
    return dict(image=image, prompt_embeds=torch.randn(1, 7, 16, generator=g),
                pooled_prompt_embeds=torch.randn(1, 8, generator=g),
                prompt_attention_mask=(torch.arange(7) < 5)[None].float(),
                negative_prompt_embeds=torch.randn(1, 7, 16, generator=g),
                negative_pooled_prompt_embeds=torch.randn(1, 8, generator=g),
                negative_prompt_attention_mask=(torch.arange(7) < 2)[None].float(), true_cfg_scale=4.0,
                height=hw[0], width=hw[1], num_frames=5, latent_window_size=2, num_inference_steps=steps,
                output_type="latent")


def test_pipeline_gamma_one_is_stock():
    pipe = _pipeline()
    kw = _pipe_kwargs((32, 48), 3)
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).frames[0]
    with taca.enabled(pipe, gamma=1.0, schedule="constant"):
        assert torch.equal(pipe(generator=torch.Generator().manual_seed(1), **kw).frames[0], stock)


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
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).frames[0]
    cap = Capture(monkeypatch)
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, k, o: seen.append(
        (get_handle(m).last_gamma, get_handle(m).last_path)), with_kwargs=True)
    with taca.enabled(pipe, gamma=1.3):
        out = pipe(generator=torch.Generator().manual_seed(1), **kw).frames[0]
    hook.remove()
    on = window(_sigmas(steps))
    assert on and on != list(range(steps)) and len(seen) == 2 * steps and {p for _, p in seen} == {"host"}
    assert [i for i in range(steps) if seen[2 * i][0] is not None] == on
    assert len(cap.calls) == 2 * N_JOINT * len(on)
    # inverted anti-drifting, one section: history 16 / 2 / 1 frames (+ the start image as clean), 2 noisy
    h, w = hw[0] // 8, hw[1] // 8
    n_vis = _n_visual(2, h, w) + 3 * -(-h // 8) * -(-w // 8)  # 16 history_4x frames -> 4 tokens per 8x8 tile
    for j in range(0, len(cap.calls), N_JOINT):
        valid = 5 if (j // N_JOINT) % 2 == 0 else 2  # cond, then uncond; batch 1: truncated to the valid prompt
        N = n_vis + N_SIGLIP + valid
        text = span_mask(1, N, n_vis + N_SIGLIP, valid)
        for q, *_ in cap.calls[j : j + N_JOINT]:
            assert q.shape[1] == N
        check_spans_against_paper(cap.calls[j : j + N_JOINT], text, ~text, torch.full((1,), 1.3), masks=None)
    assert not torch.equal(out, stock)


def framepack_windows():
    return {steps: ranges(window(_sigmas(steps))) for steps in (25, 30, 50)}


def test_window_steps_with_the_real_scheduler():
    assert framepack_windows() == EXPECTED_WINDOWS


EXPECTED_WINDOWS = {25: "0-4", 30: "0-5", 50: "0-8"}


@pytest.mark.parametrize("valid", [[7, 4], [5]])
def test_gradient_checkpointing_keeps_the_call_state(valid):
    """The forward carries no attention kwargs: the hook hands each call's state (the padded CFG
    batch's mask; one sample: the context truncated to its valid prompt) to the processors, and to
    the blocks recomputed in the backward pass through the checkpointing function (t = 1000 sigma)."""
    check_checkpointing_keeps_state(_transformer, _inputs(valid, 7, (2, 4, 6)))
