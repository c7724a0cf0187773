"""FLUX.2 (Flux2Transformer2DModel: dev and klein configs) with the taca.models.flux2 adapter, on
tiny random-weight models (the survey's tiny config): every joint attention call inside the
window is the paper's definition, outside it and at gamma = 1 the model is stock bit for bit. Klein-KV's
cache processors: the extract call ([txt, ref, img]; ref queries on ref keys only) and the cached calls
([txt, img] queries on [txt, cached ref, img] keys), transformer and Flux2KleinKVPipeline."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("diffusers")

import taca
from taca.pipeline import get_handle

from model_checks import (Capture, StockCalls, check_against_paper, check_disable_restores,
                          check_spans_against_paper, processors_of, ranges, span_mask, window)
from model_checks import check_checkpointing_keeps_state

TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=32,
            num_attention_heads=2, joint_attention_dim=24, timestep_guidance_channels=32, mlp_ratio=3.0,
            axes_dims_rope=(8, 8, 8, 8), rope_theta=2000, guidance_embeds=False)
# FLUX.2-dev and FLUX.2-klein scheduler/scheduler_config.json. The pipelines pass their own mu
# (compute_empirical_mu of the image token count and the step count), so base/max shift are unused.
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")


def _transformer(**kw):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    return Flux2Transformer2DModel(**{**TINY, **kw}).eval()


def _inputs(B, L, hw, n_ref=0, sigma=0.98, seed=1):
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    ids = torch.cartesian_prod(torch.zeros(1), torch.arange(h).float(), torch.arange(w).float(), torch.zeros(1))
    if n_ref:
        ref = torch.cartesian_prod(torch.full((1,), 10.0), torch.arange(n_ref).float(), torch.zeros(1), torch.zeros(1))
        ids = torch.cat([ids, ref])
    txt_ids = torch.cartesian_prod(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.arange(L).float())
    return dict(hidden_states=torch.randn(B, h * w + n_ref, 16, generator=g),
                encoder_hidden_states=torch.randn(B, L, 24, generator=g),
                timestep=torch.full((B,), sigma), img_ids=ids, txt_ids=txt_ids, return_dict=False)


@pytest.mark.parametrize("L,hw,batch,n_ref", [(7, (4, 5), 2, 0), (1, (3, 4), 1, 0), (12, (6, 4), 2, 6)])
def test_joint_calls_are_the_paper_definition(monkeypatch, L, hw, batch, n_ref):
    """In the window every call (double- and single-stream; edit reference tokens appended after
    the image count as visual) equals the paper's definition on the stock q, k, v."""
    import diffusers.models.transformers.transformer_flux2 as tf2

    t = _transformer()
    stock = StockCalls(monkeypatch, tf2)
    with torch.no_grad():
        t(**_inputs(batch, L, hw, n_ref))
    monkeypatch.undo()
    cap = Capture(monkeypatch, shadow=True)
    with taca.enabled(t, gamma=1.3), torch.no_grad():
        t(**_inputs(batch, L, hw, n_ref))
    assert len(cap.calls) == len(stock.calls) == TINY["num_layers"] + TINY["num_single_layers"]
    for (q, k, v, _, _), (sq, sk, sv, smask) in zip(cap.calls, stock.calls):
        assert smask is None
        assert torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv)
        assert q.shape[1] == L + hw[0] * hw[1] + n_ref
    check_against_paper(cap.calls, L, torch.full((batch,), 1.3))


@pytest.mark.parametrize("hw", [(4, 5), (6, 3)])
def test_outside_window_and_gamma_one_are_stock(hw):
    t = _transformer()
    before = processors_of(t)
    with torch.no_grad():
        ref_in = t(**_inputs(2, 7, hw, sigma=0.98))[0]
        ref_out = t(**_inputs(2, 7, hw, sigma=0.5))[0]
        h = taca.enable(t, gamma=1.3)
        assert {type(p).__name__ for p in h.processors.values()} == {
            "TacaFlux2AttnProcessor", "TacaFlux2ParallelSelfAttnProcessor"}
        assert torch.equal(t(**_inputs(2, 7, hw, sigma=0.5))[0], ref_out) and h.last_gamma is None
        assert not torch.equal(t(**_inputs(2, 7, hw, sigma=0.98))[0], ref_in)
        taca.enable(t, gamma=1.0, schedule="constant")
        assert torch.equal(t(**_inputs(2, 7, hw, sigma=0.98))[0], ref_in)
        taca.disable(t)
    check_disable_restores(t, before)


def _kv_transformer(**kw):
    """A tiny transformer with Klein-KV's processors, as Flux2KleinKVPipeline installs them."""
    from diffusers.models.transformers.transformer_flux2 import Flux2KVAttnProcessor, Flux2KVParallelSelfAttnProcessor

    t = _transformer(**kw)
    for block in t.transformer_blocks:
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in t.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    return t


def _extract(B, L, hw, n_ref, sigma=0.98, seed=1):
    """Klein-KV's step 0: [ref, img] latents (reference first, as the pipeline orders them)."""
    kw = _inputs(B, L, hw, n_ref, sigma, seed)
    n = hw[0] * hw[1]
    kw["hidden_states"] = torch.cat([kw["hidden_states"][:, n:], kw["hidden_states"][:, :n]], dim=1)
    kw["img_ids"] = torch.cat([kw["img_ids"][n:], kw["img_ids"][:n]])
    return dict(kw, kv_cache_mode="extract", num_ref_tokens=n_ref, ref_fixed_timestep=0.0)


def _cached(B, L, hw, cache, sigma=0.98, seed=2):
    """Klein-KV's later steps: image latents only, the reference K/V from the cache."""
    return dict(_inputs(B, L, hw, 0, sigma, seed), kv_cache=cache, kv_cache_mode="cached")


def _same_cache(a, b):
    layers = lambda c: c.double_block_caches + c.single_block_caches  # noqa: E731
    assert a.num_ref_tokens == b.num_ref_tokens
    return all(torch.equal(x.k_ref, y.k_ref) and torch.equal(x.v_ref, y.v_ref) for x, y in zip(layers(a), layers(b)))


@pytest.mark.parametrize("B,L,hw,n_ref", [(2, 7, (4, 5), 6), (1, 3, (3, 4), 9)])
def test_klein_kv_modes_are_the_paper_definition(monkeypatch, B, L, hw, n_ref):
    """Klein-KV's extract call (sequence [txt, ref, img]: [txt, img] queries on all keys, ref queries
    on ref keys only) and cached call ([txt, img] queries on [txt, cached ref, img] keys), double-
    and single-stream: every TACA call has text keys [0, L) and text queries the first L of the
    [txt, img] queries, and equals the paper's definition (img queries x text keys times gamma) on
    the stock q, k, v. With the stock attention handed back in place of each TACA call (shadow),
    both transformer outputs and the cache are stock's bit for bit: the ref queries' self-attention
    and the reassembly [txt, ref, img] are stock's."""
    import diffusers.models.transformers.transformer_flux2 as tf2

    I, n_calls = hw[0] * hw[1], TINY["num_layers"] + TINY["num_single_layers"]
    t = _kv_transformer()
    stock = StockCalls(monkeypatch, tf2)
    with torch.no_grad():
        ext_s, cache_s = t(**_extract(B, L, hw, n_ref))
        n_ext = len(stock.calls)
        cached_s = t(**_cached(B, L, hw, cache_s))[0]
    monkeypatch.undo()
    assert n_ext == 2 * n_calls and len(stock.calls) == 3 * n_calls  # extract: joint + ref self-attention
    joint_s = [c for c in stock.calls if c[0].shape[1] == L + I]
    assert len(joint_s) == 2 * n_calls
    cap = Capture(monkeypatch, shadow=True)
    with taca.enabled(t, gamma=1.3) as h, torch.no_grad():
        assert {type(p).__name__ for p in h.processors.values()} == {
            "TacaFlux2KVAttnProcessor", "TacaFlux2KVParallelSelfAttnProcessor"}
        ext_t, cache_t = t(**_extract(B, L, hw, n_ref))
        assert h.last_gamma is not None and len(cap.calls) == n_calls
        cached_t = t(**_cached(B, L, hw, cache_t))[0]
        assert h.last_gamma is not None
    assert torch.equal(ext_t, ext_s) and torch.equal(cached_t, cached_s) and _same_cache(cache_t, cache_s)
    assert len(cap.calls) == 2 * n_calls
    for (q, k, v, _, _), (sq, sk, sv, smask) in zip(cap.calls, joint_s):
        assert smask is None
        assert torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv)
        assert q.shape[1] == L + I and k.shape[1] == L + n_ref + I
    key_text = span_mask(B, L + n_ref + I, 0, L)
    query_visual = ~span_mask(B, L + I, 0, L)
    check_spans_against_paper(cap.calls, key_text, query_visual, torch.full((B,), 1.3))
    for _, _, _, kw, _ in cap.calls:
        assert kw["query_text_start"] == 0 and kw["query_text_len"] == L


@pytest.mark.parametrize("hw", [(4, 5), (6, 3)])
def test_klein_kv_outside_window_and_gamma_one_are_stock(hw):
    """Extract and cached calls outside the window and at gamma 1 equal Klein-KV's stock
    processors bit for bit (outputs and cache); taca.disable gives the KV processors back."""
    t = _kv_transformer()
    before = processors_of(t)

    def run(sigma):
        out, cache = t(**_extract(2, 7, hw, 5, sigma=sigma))
        return out, cache, t(**_cached(2, 7, hw, cache, sigma=sigma))[0]

    with torch.no_grad():
        ref_in, ref_out = run(0.98), run(0.5)
        h = taca.enable(t, gamma=1.3)
        got = run(0.5)
        assert h.last_gamma is None
        assert torch.equal(got[0], ref_out[0]) and torch.equal(got[2], ref_out[2]) and _same_cache(got[1], ref_out[1])
        got = run(0.98)
        assert not torch.equal(got[0], ref_in[0]) and not torch.equal(got[2], ref_in[2])
        assert _same_cache(got[1], ref_in[1])  # the ref K/V come before any attention of their layer
        taca.enable(t, gamma=1.0, schedule="constant")
        got = run(0.98)
        assert torch.equal(got[0], ref_in[0]) and torch.equal(got[2], ref_in[2]) and _same_cache(got[1], ref_in[1])
        taca.disable(t)
    check_disable_restores(t, before)


def test_klein_kv_telemetry_is_refused():
    """Recording attention (taca.telemetry) in Klein-KV's extract and cached calls is refused with a
    clear error: an event describes one token sequence for queries and keys."""
    from taca import telemetry

    t = _kv_transformer()
    with torch.no_grad():
        _, cache = t(**_extract(1, 3, (2, 3), 4))
    with taca.enabled(t, gamma=1.3), telemetry.recording(lambda e: None), torch.no_grad():
        for kw in (_extract(1, 3, (2, 3), 4), _cached(1, 3, (2, 3), cache)):
            with pytest.raises(NotImplementedError, match=r"attend cached keys as well \(9 queries, 13 keys\)"):
                t(**kw)


def test_klein_kv_processors_without_a_cache_mode(monkeypatch):
    """Klein-KV's processors without kv_cache_mode (the pipeline's call without a reference image)
    are Flux2AttnProcessor's computation: the paper's definition on [txt, img]."""
    t = _kv_transformer()
    cap = Capture(monkeypatch)
    with taca.enabled(t, gamma=1.3), torch.no_grad():
        t(**_inputs(2, 5, (3, 4)))
    assert len(cap.calls) == TINY["num_layers"] + TINY["num_single_layers"]
    check_against_paper(cap.calls, 5, torch.full((2,), 1.3))


def _klein(seed=0, **kw):
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                             down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, text_encoder=None,
                              tokenizer=None, transformer=_transformer(**kw), is_distilled=False)


def _record_calls(t):
    """(text length, gamma or None, hook path) of every transformer call."""
    seen = []
    hook = t.register_forward_hook(lambda m, a, kw, out: seen.append(
        (kw["encoder_hidden_states"].shape[1], get_handle(m).last_gamma, get_handle(m).last_path)), with_kwargs=True)
    return seen, hook


@pytest.mark.parametrize("steps,hw,edit", [(8, (32, 48), False), (6, (48, 32), True)])
def test_klein_pipeline_cfg_unequal_prompts_and_window(monkeypatch, steps, hw, edit):
    """Flux2KleinPipeline with true CFG (prompt 7 tokens, negative 4), optionally an edit reference
    image: each call's gamma comes from the pipeline's sigma (host path, no sync), the steps in
    the window are the paper rule's on the real scheduler, and every joint call in them is the
    paper's definition with that call's own text length."""
    import numpy as np
    import PIL.Image
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    pipe = _klein()
    g = torch.Generator().manual_seed(0)
    pe, ne = torch.randn(1, 7, 24, generator=g), torch.randn(1, 4, 24, generator=g)
    kw = dict(prompt_embeds=pe, negative_prompt_embeds=ne, height=hw[0], width=hw[1], num_inference_steps=steps,
              guidance_scale=4.0, output_type="pt")
    if edit:
        # the smallest reference the pipeline takes (64 px a side): (64 / 2)^2 tokens after the image
        kw["image"] = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    cap = Capture(monkeypatch)
    seen, hook = _record_calls(pipe.transformer)
    with taca.enabled(pipe, gamma=1.3):
        out = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    hook.remove()
    n_img = (hw[0] // 2) * (hw[1] // 2)  # vae_scale_factor 1, 2x2 patches
    sigmas = np.linspace(1.0, 1 / steps, steps)
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    sch.set_timesteps(sigmas=sigmas, mu=compute_empirical_mu(n_img, steps))
    on = window(sch.timesteps / 1000)
    assert on, "the first step must be in the window"
    assert [L for L, _, _ in seen] == [7, 4] * steps
    assert {p for _, _, p in seen} == {"host"}
    assert [i for i in range(steps) if seen[2 * i][1] is not None] == on
    assert all((seen[2 * i][1] is None) == (seen[2 * i + 1][1] is None) for i in range(steps))
    n_calls = TINY["num_layers"] + TINY["num_single_layers"]
    assert len(cap.calls) == 2 * n_calls * len(on)
    for j in range(0, len(cap.calls), n_calls):
        L = 7 if (j // n_calls) % 2 == 0 else 4
        chunk = cap.calls[j : j + n_calls]
        assert all(c[0].shape[1] == L + n_img + (32 * 32 if edit else 0) for c in chunk)
        check_against_paper(chunk, L, torch.full((1,), 1.3))
    assert not torch.equal(out, stock)


@pytest.mark.parametrize("steps,hw", [(4, (64, 96)), (3, (96, 64))])
def test_klein_kv_pipeline_extract_cached_and_window(monkeypatch, steps, hw):
    """Flux2KleinKVPipeline with a reference image (prompt embeddings of 7 tokens): step 0 is the
    extract call, later steps the cached ones (4 steps: Klein's distilled default); gamma comes from the pipeline's sigma (host path),
    the steps in the window are the paper rule's on the real scheduler (a 0.9 threshold here, so
    cached steps are in it too), every TACA call is the paper's definition with [txt, img] queries
    on [txt, ref, img] keys, and gamma 1 is stock bit for bit."""
    import numpy as np
    import PIL.Image
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinKVPipeline
    from diffusers.pipelines.flux2.pipeline_flux2_klein_kv import compute_empirical_mu

    torch.manual_seed(0)
    # two VAE levels (vae_scale_factor 2): the smallest reference the pipeline takes, 64 px a side,
    # is 16 x 16 = 256 tokens
    vae = AutoencoderKLFlux2(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    pipe = Flux2KleinKVPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, text_encoder=None,
                                tokenizer=None, transformer=_transformer())
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    kw = dict(image=image, prompt_embeds=torch.randn(1, 7, 24, generator=torch.Generator().manual_seed(0)),
              height=hw[0], width=hw[1], num_inference_steps=steps, output_type="latent")
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    with taca.enabled(pipe, gamma=1.0, schedule="constant"):
        assert torch.equal(pipe(generator=torch.Generator().manual_seed(1), **kw).images, stock)
    cap = Capture(monkeypatch)
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, k, o: seen.append(
        (k.get("kv_cache_mode"), get_handle(m).last_gamma, get_handle(m).last_path)), with_kwargs=True)
    with taca.enabled(pipe, gamma=1.3, schedule="paper:0.9"):
        out = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    hook.remove()
    n_img, n_ref = (hw[0] // 4) * (hw[1] // 4), 16 * 16  # vae_scale_factor 2, 2x2 patches
    sch = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu(n_img, steps))
    on = window(sch.timesteps / 1000, threshold=0.9)
    assert on[:2] == [0, 1] and len(on) < steps
    assert [m for m, _, _ in seen] == ["extract"] + ["cached"] * (steps - 1)
    assert {p for _, _, p in seen} == {"host"}
    assert [i for i in range(steps) if seen[i][1] is not None] == on
    n_calls = TINY["num_layers"] + TINY["num_single_layers"]
    assert len(cap.calls) == n_calls * len(on)
    assert all(c[0].shape[1] == 7 + n_img and c[1].shape[1] == 7 + n_ref + n_img for c in cap.calls)
    check_spans_against_paper(cap.calls, span_mask(1, 7 + n_ref + n_img, 0, 7), ~span_mask(1, 7 + n_img, 0, 7),
                              torch.full((1,), 1.3))
    assert not torch.equal(out, stock)


def test_dev_pipeline_guidance_embeds(monkeypatch):
    """Flux2Pipeline (FLUX.2-dev: guidance embedding, no true CFG), prompt embeddings given."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                             down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, text_encoder=None,
                         tokenizer=None, transformer=_transformer(guidance_embeds=True))
    kw = dict(prompt_embeds=torch.randn(1, 5, 24, generator=torch.Generator().manual_seed(0)), height=32, width=32,
              num_inference_steps=4, output_type="pt")
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    cap = Capture(monkeypatch)
    with taca.enabled(pipe, gamma=1.3) as h:
        out = pipe(generator=torch.Generator().manual_seed(1), **kw).images
        assert h.last_path == "host"
    with taca.enabled(pipe, gamma=1.0, schedule="constant"):
        assert torch.equal(pipe(generator=torch.Generator().manual_seed(1), **kw).images, stock)
    assert len(cap.calls) == TINY["num_layers"] + TINY["num_single_layers"]  # step 0 of 4 only
    check_against_paper(cap.calls, 5, torch.full((1,), 1.3))
    assert not torch.equal(out, stock)


def flux2_windows():
    """{(steps, image tokens): window} with the real FLUX.2 scheduler config and the pipelines' mu."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    out = {}
    for n_img in (4096, 1024):  # 1024x1024 and 512x512 (16x16 pixels per token)
        for steps in (4, 28, 50):
            sch = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
            sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu(n_img, steps))
            out[(steps, n_img)] = ranges(window(sch.timesteps / 1000))
    return out


def test_window_steps_with_the_real_scheduler():
    """The README's table: FLUX.2 steps in the paper's window (sigma >= 0.97)."""
    assert flux2_windows() == EXPECTED_WINDOWS


# (steps, image tokens) -> steps with gamma; 4 steps: klein (distilled), 28/50: dev, klein base
EXPECTED_WINDOWS = {(4, 4096): "0", (28, 4096): "0-5", (50, 4096): "0-9",
                    (4, 1024): "0", (28, 1024): "0-4", (50, 1024): "0-7"}


@pytest.mark.parametrize("n_ref", [0, 6])
def test_gradient_checkpointing_keeps_the_call_state(n_ref):
    """diffusers' checkpointed FLUX.2 blocks (double- and single-stream) get joint_attention_kwargs
    (TACA's state) like the plain ones, edit reference tokens included: output and gradients equal
    the plain forward's (FLUX.2 has no attention mask)."""
    check_checkpointing_keeps_state(_transformer, _inputs(2, 7, (4, 5), n_ref))
