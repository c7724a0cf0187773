"""GLM-Image (GlmImageTransformer2DModel) with the taca.models.glm_image adapter, on tiny random-weight
models: in the window every joint call is the paper's definition (glyph text first; a 2-D text mask
as the stock processor turns it into an ADDITIVE float 0/1 matrix), outside it and at gamma = 1 the
model is stock bit for bit; sigma is read from the pipeline's scheduler (the transformer gets the
unshifted t minus 1); GlmImagePipeline with CFG (prior tokens dropped in the negative branch) at two
resolutions; condition images through the KV cache (write: textless, stock; read: [txt, img]
queries on [cache, txt, img] keys; skip: plain), transformer and pipeline; a text mask in read mode
(which stock fails on too) is refused."""
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
from model_checks import check_checkpointing_keeps_state, check_outer_hint_routes

TINY = dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            text_embed_dim=24, time_embed_dim=16, condition_dim=8, prior_vq_quantizer_codebook_size=32)
# zai-org/GLM-Image scheduler/scheduler_config.json taken to be CogView4's (as remembered, not read
# offline here): FlowMatchEulerDiscreteScheduler with dynamic shifting, base_shift 0.25, max_shift
# 0.75, base_image_seq_len 256 and the LINEAR time shift; the pipeline computes its own mu
# (sqrt(image_seq_len / 256) * 0.75 + 0.25) and timesteps linspace(1000, 1, n + 1)[:-1].
SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.25, max_shift=0.75,
                 base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="linear")


def _transformer():
    from diffusers import GlmImageTransformer2DModel

    torch.manual_seed(0)
    return GlmImageTransformer2DModel(**TINY).eval()


def _inputs(B, L, hw, t=999.0, valid=None, seed=1):
    """t: the transformer's timestep (the scheduler's t minus 1)."""
    g = torch.Generator().manual_seed(seed)
    n = hw[0] * hw[1]
    kw = dict(hidden_states=torch.randn(B, 4, 2 * hw[0], 2 * hw[1], generator=g),
              encoder_hidden_states=torch.randn(B, L, 24, generator=g),
              prior_token_id=torch.randint(0, 32, (B, n), generator=g), prior_token_drop=torch.zeros(B, n, dtype=torch.bool),
              timestep=torch.full((B,), t), target_size=torch.tensor([[64.0, 64.0]] * B),
              crop_coords=torch.zeros(B, 2), return_dict=False)
    if valid is not None:
        kw["attention_mask"] = (torch.arange(L)[None, :] >= (L - torch.tensor(valid))[:, None]).long()  # left-padded
    return kw


def _stock_mask(B, L, n, valid):
    if valid is None:
        return None
    m = torch.cat([(torch.arange(L)[None, :] >= (L - torch.tensor(valid))[:, None]).float(), torch.ones(B, n)], 1)
    return ((m[:, :, None] @ m[:, None, :]) > 0).unsqueeze(1).float()


def _glm_pipe(t):
    from diffusers import FlowMatchEulerDiscreteScheduler, GlmImagePipeline

    return GlmImagePipeline(tokenizer=None, processor=None, text_encoder=None, vision_language_encoder=None, vae=None,
                            transformer=t, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER))


def _sched_pipe(t):
    """A GlmImagePipeline around transformer ``t`` whose scheduler holds timesteps 1000, 667, 334, 1
    (the transformer gets 999, 666, 333, 0)."""
    pipe = _glm_pipe(t)
    ts = np.linspace(1000, 1.0, 4).astype(np.int64).astype(np.float32)  # 1000, 667, 334, 1
    pipe.scheduler.set_timesteps(timesteps=ts, sigmas=ts / 1000, mu=3.0)  # linear shift: sigma = 3 / (3 + 1 / s - 1)
    return pipe


def _check_model(monkeypatch, B, L, hw, valid=None):
    t = _transformer()
    pipe = _sched_pipe(t)
    import diffusers.models.transformers.transformer_glm_image as tg

    stock = StockCalls(monkeypatch, tg)
    with torch.no_grad():
        t(**_inputs(B, L, hw, valid=valid))
    monkeypatch.undo()
    cap = Capture(monkeypatch, shadow=True)
    with taca.enabled(pipe, gamma=1.3) as h, torch.no_grad():
        t(**_inputs(B, L, hw, valid=valid))
        assert h.last_gamma is not None
    assert len(cap.calls) == len(stock.calls) == TINY["num_layers"]
    N = L + hw[0] * hw[1]
    mask = _stock_mask(B, L, hw[0] * hw[1], valid)
    for (q, k, v, _, _), (sq, sk, sv, smask) in zip(cap.calls, stock.calls):
        assert torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv) and q.shape[1] == N
        assert (smask is None) == (mask is None)
        if mask is not None:
            assert smask.dtype == torch.float32 and torch.equal(smask, mask)
    text = span_mask(B, N, 0, L)
    check_spans_against_paper(cap.calls, text, ~text, torch.full((B,), 1.3), masks=mask)


@pytest.mark.parametrize("B,L,hw", [(2, 16, (3, 4)), (1, 5, (4, 2))])
def test_joint_calls_are_the_paper_definition(monkeypatch, B, L, hw):
    _check_model(monkeypatch, B, L, hw)


def test_text_mask_stays_additive(monkeypatch):
    """A 2-D text mask (left padding: 16 and 9 valid of 16): the stock processor's float 0/1 matrix is
    added after gamma, as SDPA adds it (it masks nothing)."""
    _check_model(monkeypatch, 2, 16, (3, 4), valid=[16, 9])


def test_text_mask_matrices_checked_once(monkeypatch, spy):
    """GLM-Image's per-block text-mask matrices, named by their token mask (``processors.joint_token_mask``): one read
    over two calls with the mask routes on (``check_outer_hint_routes``)."""
    t = _transformer()
    kw = _inputs(2, 16, (3, 4), valid=[16, 9])
    check_outer_hint_routes(monkeypatch, spy, _sched_pipe(t), lambda: t(**kw)[0], n_calls=TINY["num_layers"], n_kinds=1)


@pytest.mark.parametrize("valid", [None, [16, 9]])
@pytest.mark.parametrize("hw", [(3, 4), (2, 5)])
def test_outside_window_and_gamma_one_are_stock(valid, hw):
    """timestep 999 (scheduler t 1000, sigma 1) is in the window, 666 (t 667, sigma 0.667 shifted by
    mu = 3: 0.857) is not."""
    t = _transformer()
    pipe = _sched_pipe(t)
    before = processors_of(t)
    with torch.no_grad():
        ref_in = t(**_inputs(2, 16, hw, 999.0, valid))[0]
        ref_out = t(**_inputs(2, 16, hw, 666.0, valid))[0]
        h = taca.enable(pipe, gamma=1.3)
        assert h.kind == "glm_image" and {type(p).__name__ for p in h.processors.values()} == {
            "TacaGlmImageAttnProcessor"}
        assert torch.equal(t(**_inputs(2, 16, hw, 666.0, valid))[0], ref_out) and h.last_gamma is None
        assert not torch.equal(t(**_inputs(2, 16, hw, 999.0, valid))[0], ref_in)
        assert torch.equal(h.last_gamma, torch.full((2,), 1.3))
        taca.enable(pipe, gamma=1.0, schedule="constant")
        assert torch.equal(t(**_inputs(2, 16, hw, 999.0, valid))[0], ref_in)
        taca.disable(pipe)
    check_disable_restores(t, before)


def test_sigma_comes_from_the_scheduler():
    """The transformer gets the unshifted t minus 1: with mu = 3, timestep 666 (t 667) means sigma
    0.857 (inside a 0.8 threshold that 666 / 1000 would miss); a timestep that is not a scheduler
    t minus 1 (667 itself), or a bare transformer, is refused rather than read as t / 1000."""
    t = _transformer()
    pipe = _sched_pipe(t)
    with taca.enabled(pipe, gamma=1.3, schedule="paper:0.8") as h, torch.no_grad():
        t(**_inputs(1, 3, (2, 2), 666.0))
        assert h.last_gamma is not None
        t(**_inputs(1, 3, (2, 2), 333.0))
        assert h.last_gamma is None
        with pytest.raises(ValueError, match=r"timestep \[667.0\] is not one of the scheduler's timesteps"):
            t(**_inputs(1, 3, (2, 2), 667.0))
    with taca.enabled(t, gamma=1.3), torch.no_grad():
        with pytest.raises(ValueError, match="pass the pipeline to taca.enable"):
            t(**_inputs(1, 3, (2, 2), 999.0))


def _write(hw, seed):
    """GlmImagePipeline's write call for one condition image of hw tokens: no text, timestep 0."""
    g = torch.Generator().manual_seed(seed)
    n = hw[0] * hw[1]
    return dict(hidden_states=torch.randn(1, 4, 2 * hw[0], 2 * hw[1], generator=g),
                encoder_hidden_states=torch.zeros(1, 0, 24), prior_token_id=torch.randint(0, 32, (1, n), generator=g),
                prior_token_drop=torch.zeros(1, n, dtype=torch.bool), timestep=torch.zeros(1),
                target_size=torch.tensor([[16.0 * hw[0], 16.0 * hw[1]]]), crop_coords=torch.zeros(1, 2))


def _conditioned(t, B, L, hw, conds, t_read=999.0, paths=None, valid=None):
    """Write the condition images (``conds``: one list of token grids per cached sample), then the
    read (conditional) and skip (unconditional) calls, as GlmImagePipeline does. Returns the read
    and skip outputs and the cache."""
    from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache

    kv = GlmImageKVCache(num_layers=TINY["num_layers"])
    kv.set_mode("write")
    for i, sample in enumerate(conds):
        for j, grid in enumerate(sample):
            t(**_write(grid, 10 * i + j), kv_caches=kv)
            if paths is not None:
                h = get_handle(t)
                paths.append((h.last_path, h.last_gamma))
        kv.next_sample()
    kv.set_mode("read")
    read = t(**_inputs(B, L, hw, t_read, valid=valid), kv_caches=kv)[0]
    kv.set_mode("skip")
    skip = t(**_inputs(B, L, hw, t_read, seed=2), kv_caches=kv)[0]
    return read, skip, kv


def _same_cache(a, b):
    return all(len(x.k_caches) == len(y.k_caches) and all(torch.equal(p, q) for p, q in zip(x.k_caches, y.k_caches))
               and all(torch.equal(p, q) for p, q in zip(x.v_caches, y.v_caches)) for x, y in zip(a.caches, b.caches))


def _sched_pipe_no_t1(t):
    """A pipeline whose scheduler holds timesteps 1000, 750, 500, 250: the write calls' timestep 0
    (a scheduler t of 1) is not in it, as after any GlmImagePipeline call."""
    pipe = _glm_pipe(t)
    ts = np.array([1000.0, 750.0, 500.0, 250.0], dtype=np.float32)
    pipe.scheduler.set_timesteps(timesteps=ts, sigmas=ts / 1000, mu=3.0)
    return pipe


# (batch, text tokens, image tokens, condition images: token grids per cached sample)
KV_CASES = [
    (2, 16, (3, 4), [[(2, 3)], [(1, 2), (2, 2)]]),  # per-sample caches, 6 tokens each (one and two images)
    (2, 5, (4, 2), [[(2, 2), (1, 3)]]),  # one cache (two images, 7 tokens) shared by the batch
    (1, 3, (2, 3), [[(3, 3)]]),
]


@pytest.mark.parametrize("B,L,hw,conds", KV_CASES)
def test_kv_cache_modes_are_the_paper_definition(monkeypatch, B, L, hw, conds):
    """Condition images through the KV cache: the write calls (no text, timestep 0) run stock with
    no gamma and their timestep unread; in the read call (queries [txt, img], keys [cache, txt,
    img]) every TACA call has text keys [L_c, L_c + L) and text queries the first L, and equals the
    paper's definition (image queries x glyph keys times gamma; the cached condition-image keys
    unscaled) on the stock q, k, v; the skip call is plain [txt, img]. With stock attention handed
    back (shadow), outputs and cache are stock's bit for bit."""
    import diffusers.models.transformers.transformer_glm_image as tg

    n_layers, I = TINY["num_layers"], hw[0] * hw[1]
    Lc = sum(h * w for h, w in conds[0])
    t = _transformer()
    stock = StockCalls(monkeypatch, tg)
    with torch.no_grad():
        read_s, skip_s, kv_s = _conditioned(t, B, L, hw, conds)
    monkeypatch.undo()
    n_writes = sum(len(c) for c in conds)
    assert len(stock.calls) == (n_writes + 2) * n_layers
    pipe = _sched_pipe_no_t1(t)
    cap = Capture(monkeypatch, shadow=True)
    paths = []
    with taca.enabled(pipe, gamma=1.3), torch.no_grad():
        read_t, skip_t, kv_t = _conditioned(t, B, L, hw, conds, paths=paths)
    assert paths == [("textless", None)] * n_writes
    assert torch.equal(read_t, read_s) and torch.equal(skip_t, skip_s) and _same_cache(kv_t, kv_s)
    assert len(cap.calls) == 2 * n_layers  # the writes ran stock
    for (q, k, v, _, _), (sq, sk, sv, smask) in zip(cap.calls, stock.calls[n_writes * n_layers:]):
        assert smask is None and torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv)
    read, skip = cap.calls[:n_layers], cap.calls[n_layers:]
    assert all(c[0].shape[1] == L + I and c[1].shape[1] == Lc + L + I for c in read)
    assert all(c[3]["text_start"] == Lc and c[3]["query_text_start"] == 0 and c[3]["query_text_len"] == L
               for c in read)
    g = torch.full((B,), 1.3)
    check_spans_against_paper(read, span_mask(B, Lc + L + I, Lc, L), ~span_mask(B, L + I, 0, L), g)
    text = span_mask(B, L + I, 0, L)
    check_spans_against_paper(skip, text, ~text, g)


@pytest.mark.parametrize("hw", [(3, 4), (2, 5)])
def test_kv_cache_modes_outside_window_and_gamma_one_are_stock(hw):
    """Write, read and skip calls outside the window (timestep 749) and at gamma 1 are stock bit for
    bit (outputs and cache)."""
    conds = [[(2, 3)], [(1, 2), (2, 2)]]
    t = _transformer()
    pipe = _sched_pipe_no_t1(t)
    before = processors_of(t)
    with torch.no_grad():
        ref_in, ref_out = _conditioned(t, 2, 16, hw, conds, 999.0), _conditioned(t, 2, 16, hw, conds, 749.0)
        h = taca.enable(pipe, gamma=1.3)
        got = _conditioned(t, 2, 16, hw, conds, 749.0)
        assert h.last_gamma is None
        assert torch.equal(got[0], ref_out[0]) and torch.equal(got[1], ref_out[1]) and _same_cache(got[2], ref_out[2])
        got = _conditioned(t, 2, 16, hw, conds, 999.0)
        assert h.last_gamma is not None
        assert not torch.equal(got[0], ref_in[0]) and not torch.equal(got[1], ref_in[1])
        taca.enable(pipe, gamma=1.0, schedule="constant")
        got = _conditioned(t, 2, 16, hw, conds, 999.0)
        assert torch.equal(got[0], ref_in[0]) and torch.equal(got[1], ref_in[1]) and _same_cache(got[2], ref_in[2])
        taca.disable(pipe)
    check_disable_restores(t, before)


def test_kv_read_mode_telemetry_is_refused():
    """Recording attention (taca.telemetry) in a read call is refused with a clear error (an event
    describes one token sequence for queries and keys); the write calls, textless, record nothing."""
    from taca import telemetry

    t = _transformer()
    pipe = _sched_pipe(t)
    with taca.enabled(pipe, gamma=1.3), telemetry.recording(lambda e: None), torch.no_grad():
        with pytest.raises(NotImplementedError, match=r"attend cached keys as well \(11 queries, 15 keys\)"):
            _conditioned(t, 1, 5, (2, 3), [[(2, 2)]])


def test_kv_read_mode_with_a_text_mask_is_refused(monkeypatch):
    """A text attention_mask in read mode: the stock processor's (T + I) x (T + I) mask does not
    cover the cached keys (diffusers raises from SDPA); with TACA on, a ValueError naming the mode
    comes before any attention. A text mask without condition images stays supported."""
    conds = [[(2, 2)]]
    t = _transformer()
    with torch.no_grad(), pytest.raises(RuntimeError):
        _conditioned(t, 1, 5, (2, 3), conds, valid=[3])
    pipe = _sched_pipe(t)
    cap = Capture(monkeypatch)
    with taca.enabled(pipe, gamma=1.3), torch.no_grad():
        with pytest.raises(ValueError, match="KV-cache read mode .* with a text attention_mask is not supported"):
            _conditioned(t, 1, 5, (2, 3), conds, valid=[3])
        assert not cap.calls
        t(**_inputs(1, 5, (2, 3), valid=[3]))
        assert len(cap.calls) == TINY["num_layers"]


def _pipe_sigmas(n_img_tokens, steps):
    """The sigmas GlmImagePipeline gets from its scheduler (its own timesteps, sigmas and mu)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.glm_image.pipeline_glm_image import calculate_shift

    sch = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    ts = np.linspace(1000, 1.0, steps + 1)[:-1].astype(np.int64).astype(np.float32)
    sch.set_timesteps(timesteps=ts, sigmas=ts / 1000, mu=calculate_shift(n_img_tokens, 256, 0.25, 0.75))
    return sch.sigmas[:-1]


@pytest.mark.parametrize("hw", [(32, 48), (64, 32)])
def test_pipeline_cfg_and_window(monkeypatch, hw):
    """GlmImagePipeline with CFG (glyph embeddings of 5 tokens for both branches, as the pipeline
    requires equal shapes; the negative branch drops the prior tokens) and prior token ids given:
    the window is the paper rule's on the scheduler's shifted sigmas (sync path: the pipeline passes
    a fresh t - 1), and every joint call in it is the paper's definition."""
    pipe = _glm_pipe(_transformer())
    steps = 6
    n_img = (hw[0] // 16) * (hw[1] // 16)
    g = torch.Generator().manual_seed(0)
    kw = dict(prompt_embeds=torch.randn(1, 5, 24, generator=g), negative_prompt_embeds=torch.randn(1, 5, 24, generator=g),
              prior_token_ids=torch.randint(0, 32, (1, n_img), generator=g), guidance_scale=4.0, height=hw[0],
              width=hw[1], num_inference_steps=steps, output_type="latent")
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    with taca.enabled(pipe, gamma=1.0, schedule="constant"):
        assert torch.equal(pipe(generator=torch.Generator().manual_seed(1), **kw).images, stock)
    cap = Capture(monkeypatch)
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, k, o: seen.append(
        (get_handle(m).last_gamma, get_handle(m).last_path)), with_kwargs=True)
    with taca.enabled(pipe, gamma=1.3):
        out = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    hook.remove()
    on = window(_pipe_sigmas(n_img, steps))
    assert on and on != list(range(steps)) and len(seen) == 2 * steps
    assert {p for _, p in seen} == {"sync"}
    assert [i for i in range(steps) if seen[2 * i][0] is not None] == on
    assert all((seen[2 * i][0] is None) == (seen[2 * i + 1][0] is None) for i in range(steps))
    n = TINY["num_layers"]
    assert len(cap.calls) == 2 * n * len(on)
    text = span_mask(1, 5 + n_img, 0, 5)
    check_spans_against_paper(cap.calls, text, ~text, torch.full((1,), 1.3))
    assert not torch.equal(out, stock)


@pytest.mark.parametrize("hw", [(32, 48), (64, 32)])
def test_pipeline_condition_images(monkeypatch, hw):
    """GlmImagePipeline with two condition images (a tiny 8x VAE encodes them; prior token ids
    given, grids of 6 and 4 tokens) and CFG: the two write calls are textless (no gamma, timestep 0
    not read: the scheduler still holds the previous call's schedule), every step's read call has
    [txt, img] queries on [10 cached, txt, img] keys and its skip call is plain; the window is the
    paper rule's, each TACA call the paper's definition; gamma 1 is stock bit for bit."""
    import PIL.Image
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,) * 4,
                        layers_per_block=1, norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)
    from diffusers import FlowMatchEulerDiscreteScheduler, GlmImagePipeline

    pipe = GlmImagePipeline(tokenizer=None, processor=None, text_encoder=None, vision_language_encoder=None, vae=vae,
                            transformer=_transformer(), scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER))
    steps, n_img, n_cond = 6, (hw[0] // 16) * (hw[1] // 16), 6 + 4
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)),  # 2 x 3 tokens
              PIL.Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))]  # 2 x 2 tokens
    g = torch.Generator().manual_seed(0)
    kw = dict(image=images, prompt_embeds=torch.randn(1, 5, 24, generator=g),
              negative_prompt_embeds=torch.randn(1, 5, 24, generator=g),
              prior_token_ids=torch.randint(0, 32, (1, n_img), generator=g),
              prior_token_image_ids=[torch.randint(0, 32, (n_cond,), generator=g)],
              source_image_grid_thw=[torch.tensor([[1, 2, 3], [1, 2, 2]])], guidance_scale=4.0, height=hw[0],
              width=hw[1], num_inference_steps=steps, output_type="latent")
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    with taca.enabled(pipe, gamma=1.0, schedule="constant"):
        assert torch.equal(pipe(generator=torch.Generator().manual_seed(1), **kw).images, stock)
    cap = Capture(monkeypatch)
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, k, o: seen.append(
        (k["kv_caches"].caches[0].mode, get_handle(m).last_gamma, get_handle(m).last_path)), with_kwargs=True)
    with taca.enabled(pipe, gamma=1.3):
        out = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    hook.remove()
    assert [m for m, _, _ in seen] == ["write"] * 2 + ["read", "skip"] * steps
    assert [p for _, _, p in seen] == ["textless"] * 2 + ["sync"] * 2 * steps
    on = window(_pipe_sigmas(n_img, steps))
    assert on and on != list(range(steps))
    assert [i for i in range(steps) if seen[2 + 2 * i][1] is not None] == on
    assert all((seen[2 + 2 * i][1] is None) == (seen[3 + 2 * i][1] is None) for i in range(steps))
    n = TINY["num_layers"]
    assert len(cap.calls) == 2 * n * len(on)
    read = [c for j, c in enumerate(cap.calls) if (j // n) % 2 == 0]
    skip = [c for j, c in enumerate(cap.calls) if (j // n) % 2 == 1]
    g = torch.full((1,), 1.3)
    check_spans_against_paper(read, span_mask(1, n_cond + 5 + n_img, n_cond, 5), ~span_mask(1, 5 + n_img, 0, 5), g)
    text = span_mask(1, 5 + n_img, 0, 5)
    check_spans_against_paper(skip, text, ~text, g)
    assert not torch.equal(out, stock)


def glm_image_windows():
    out = {}
    for n_img in (4096, 1024):  # 2048x2048 and 1024x1024 if 32x32 pixels per token (16x VAE, 2x2 patches: not checked)
        for steps in (30, 50):
            out[(steps, n_img)] = ranges(window(_pipe_sigmas(n_img, steps)))
    return out


def test_window_steps_with_the_real_scheduler():
    assert glm_image_windows() == EXPECTED_WINDOWS


# (steps, image tokens) -> steps with gamma; 50: the pipeline's default
EXPECTED_WINDOWS = {(30, 4096): "0-2", (50, 4096): "0-4", (30, 1024): "0-1", (50, 1024): "0-2"}


@pytest.mark.parametrize("valid", [None, [16, 9]])
def test_gradient_checkpointing_keeps_the_call_state(monkeypatch, valid):
    """diffusers' checkpointed GLM-Image blocks get attention_kwargs (TACA's state) and the text mask
    like the plain ones, left-padded prompts included. sigma comes from the scheduler, so the check's
    taca.enable(transformer) is made taca.enable(pipeline around it) (t = 999: sigma 1)."""
    enable = taca.enable
    monkeypatch.setattr(taca, "enable", lambda t, **kw: enable(_sched_pipe(t), **kw))
    check_checkpointing_keeps_state(_transformer, _inputs(2, 16, (3, 4), 999.0, valid))
