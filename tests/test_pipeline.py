"""taca.enable / disable / enabled on tiny pipelines: round trips, idempotence, exception safety,
unsupported models, QKV fusion, attention backends, torch.compile, and the hook's host path (sigma
read without a device sync) against its sync path."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("diffusers")

import taca
from taca import tiny
from taca.pipeline import get_handle


def _procs(t):
    return {n: m.processor for n, m in t.named_modules() if hasattr(m, "set_processor") and hasattr(m, "processor")}


def _flux():
    pipe = tiny.flux_pipeline()
    return pipe, (lambda: tiny.flux_inputs(pipe, batch=2, text_len=7, num_inference_steps=3))


def _sd3(variant="sd35m"):
    pipe = tiny.sd3_pipeline(variant)
    return pipe, (lambda: tiny.sd3_inputs(pipe, batch=1, text_len=7, num_inference_steps=3))


@pytest.mark.parametrize("make", [_flux, _sd3])
def test_round_trip_restores_everything(make):
    pipe, inputs = make()
    t = pipe.transformer
    before = _procs(t)
    hooks_before = len(t._forward_pre_hooks)
    ref = pipe(**inputs()).images
    taca.enable(pipe, gamma=1.3, schedule="constant")
    assert len(t._forward_pre_hooks) == hooks_before + 1
    on = pipe(**inputs()).images
    assert not torch.allclose(on, ref)
    taca.disable(pipe)
    after = _procs(t)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert len(t._forward_pre_hooks) == hooks_before
    assert get_handle(pipe) is None
    assert torch.equal(pipe(**inputs()).images, ref)
    taca.disable(pipe)  # disabling twice is a no-op


def test_enable_twice_is_harmless_and_updates_settings():
    pipe, inputs = _flux()
    t = pipe.transformer
    h1 = taca.enable(pipe, gamma=1.3, schedule="constant")
    procs = _procs(t)
    a = pipe(**inputs()).images
    h2 = taca.enable(pipe, gamma=1.3, schedule="constant")
    assert h2 is h1 and len(t._forward_pre_hooks) == 1
    assert all(_procs(t)[k] is procs[k] for k in procs)
    assert torch.equal(pipe(**inputs()).images, a)
    taca.enable(t, gamma=1.1, schedule="constant", gamma_reverse=1.05)  # the bare transformer works too
    b = pipe(**inputs()).images
    assert not torch.allclose(a, b) and all(p.gamma_reverse == 1.05 for p in procs.values())
    taca.disable(pipe)
    assert len(t._forward_pre_hooks) == 0


def test_deterministic_reaches_every_processor_and_the_op(monkeypatch):
    """enable(deterministic=False) sets it on every TACA processor and hands it to
    taca.joint_attention (the CPU kernel is deterministic either way: the images are equal);
    enabled() restores the previous value; a non-bool is refused before anything changes."""
    pipe, inputs = _flux()
    taca.enable(pipe, gamma=1.3, schedule="constant")
    ref = pipe(**inputs()).images
    from taca import processors as P
    seen = []
    real = P.joint_attention
    monkeypatch.setattr(P, "joint_attention", lambda *a, **kw: seen.append(kw["deterministic"]) or real(*a, **kw))
    h = taca.enable(pipe, gamma=1.3, schedule="constant", deterministic=False)
    assert all(p.deterministic is False for p in h.processors.values())
    assert torch.equal(pipe(**inputs()).images, ref)
    assert seen and set(seen) == {False}
    with taca.enabled(pipe, gamma=1.3, schedule="constant"):
        assert all(p.deterministic is True for p in h.processors.values())
    assert all(p.deterministic is False for p in h.processors.values())
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        taca.enable(pipe, deterministic="no")
    assert h.deterministic is False
    taca.disable(pipe)


def test_context_manager_and_exceptions():
    pipe, inputs = _sd3("sd3")
    t = pipe.transformer
    before = _procs(t)
    ref = pipe(**inputs()).images
    with taca.enabled(pipe, gamma=1.3, schedule="constant") as h:
        assert get_handle(pipe) is h
        on = pipe(**inputs()).images
    assert get_handle(pipe) is None and torch.equal(pipe(**inputs()).images, ref)
    with pytest.raises(KeyboardInterrupt):
        with taca.enabled(pipe, gamma=1.3, schedule="constant"):
            raise KeyboardInterrupt
    assert get_handle(pipe) is None and all(_procs(t)[k] is before[k] for k in before)
    # nested: the outer settings come back
    with taca.enabled(pipe, gamma=1.3, schedule="constant"):
        with taca.enabled(pipe, gamma=1.1, schedule="constant"):
            pass
        assert torch.equal(pipe(**inputs()).images, on)
    # a failing enable leaves nothing behind
    with pytest.raises(ValueError, match="lora='no-such-adapter'"):
        taca.enable(pipe, lora="no-such-adapter")
    assert get_handle(pipe) is None and len(t._forward_pre_hooks) == 0
    assert all(_procs(t)[k] is before[k] for k in before)
    with pytest.raises(ValueError, match="schedule='later'"):
        taca.enable(pipe, schedule="later")
    with pytest.raises(ValueError, match="gamma_reverse=0"):
        taca.enable(pipe, gamma_reverse=0)
    assert get_handle(pipe) is None


def test_unsupported_models():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=4, attention_head_dim=2,
    )
    with pytest.raises(TypeError, match="UNet2DConditionModel is not supported; supported: FluxTransformer2DModel"):
        taca.enable(unet)

    class FakeUNetPipeline:
        def __init__(self, unet):
            self.unet = unet
            self.components = {"unet": unet, "scheduler": None}

    with pytest.raises(TypeError, match=r"FakeUNetPipeline has no \.transformer \(its models: \['unet'\]\)"):
        taca.enable(FakeUNetPipeline(unet))
    with pytest.raises(TypeError, match="Linear is not supported"):
        taca.enable(torch.nn.Linear(2, 2))


def test_foreign_processors_are_refused():
    """A processor TACA cannot reproduce (IP-Adapter, custom) is not silently dropped."""
    t = tiny.flux_transformer(num_layers=1, num_single_layers=1)

    class MyProcessor:
        def __call__(self, attn, hidden_states, *a, **k):
            raise AssertionError("not called")

    t.transformer_blocks[0].attn.set_processor(MyProcessor())
    with pytest.raises(TypeError, match="transformer_blocks.0.attn uses MyProcessor; taca.enable replaces only"):
        taca.enable(t)
    assert get_handle(t) is None and len(t._forward_pre_hooks) == 0


def test_sd3_fuse_qkv_projections_interplay():
    """SD3's fuse_qkv_projections() replaces every processor: after taca.enable the next call
    raises; taca.enable again reinstalls TACA on the fused projections."""
    pipe, inputs = _sd3("sd3")
    t = pipe.transformer
    with taca.enabled(pipe, gamma=1.3, schedule="constant"):
        unfused = pipe(**inputs()).images
        t.fuse_qkv_projections()
        with pytest.raises(RuntimeError, match="transformer_blocks.0.attn was replaced.*FusedJointAttnProcessor2_0"):
            pipe(**inputs())
        taca.enable(pipe, gamma=1.3, schedule="constant")
        fused = pipe(**inputs()).images
    torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-5)
    # disable gave back the processors from before the first enable (stock, unfused weights kept)
    assert {type(p).__name__ for p in _procs(t).values()} == {"JointAttnProcessor2_0"}
    # fusing first, then enabling: TACA on fused projections; gamma=1 matches diffusers' fused SD3
    stock_fused = pipe(**inputs()).images  # the restored stock processor, unfused weights
    t.set_attn_processor(__import__("diffusers").models.attention_processor.FusedJointAttnProcessor2_0())
    diff_fused = pipe(**inputs()).images
    with taca.enabled(pipe, gamma=1.0, schedule="constant"):
        ours = pipe(**inputs()).images
    torch.testing.assert_close(ours, diff_fused, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours, stock_fused, rtol=1e-4, atol=1e-5)


def test_flux_fuse_qkv_projections_keeps_taca():
    pipe, inputs = _flux()
    with taca.enabled(pipe, gamma=1.3, schedule="constant"):
        unfused = pipe(**inputs()).images
        pipe.transformer.fuse_qkv_projections()
        fused = pipe(**inputs()).images
    torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-5)


def test_flux_attention_backend_api_keeps_working():
    pipe, inputs = _flux()
    ref = pipe(**inputs()).images
    with taca.enabled(pipe, gamma=1.0, schedule="constant"):
        pipe.transformer.set_attention_backend("native")
        assert all(p._attention_backend == "native" for p in _procs(pipe.transformer).values())
        out = pipe(**inputs()).images
        pipe.transformer.reset_attention_backend()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def _flux_kw(seed: int, batch: int = 1, n: int = 16, L: int = 5) -> dict:
    """Keyword arguments of one tiny-FLUX transformer call (n image, L text tokens; timestep left
    out), drawn from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, n, 4, generator=g),
                encoder_hidden_states=torch.randn(batch, L, 32, generator=g),
                pooled_projections=torch.randn(batch, 32, generator=g), img_ids=torch.rand(n, 3, generator=g),
                txt_ids=torch.zeros(L, 3), return_dict=False)


def test_text_length_and_kontext_style_extra_tokens():
    """text_len comes from encoder_hidden_states, whatever the image token count (extra
    conditioning tokens after the image, as FLUX Kontext appends them)."""
    t = tiny.flux_transformer(num_layers=1, num_single_layers=1)
    n, L = 24, 11  # 16 image + 8 "conditioning" tokens
    seen = []
    kw = dict(_flux_kw(1, n=n, L=L), timestep=torch.tensor([1.0]))
    import taca.processors as tp

    orig = tp.joint_attention

    def spy(q, k, v, **kw2):
        seen.append((q.shape[1], kw2["text_len"]))
        return orig(q, k, v, **kw2)

    tp.joint_attention = spy
    try:
        with taca.enabled(t, gamma=1.2):
            t(**kw)
    finally:
        tp.joint_attention = orig
    assert seen == [(n + L, L), (n + L, L)]


def _compile_setup():
    """A tiny FLUX transformer with TACA on a schedule whose gamma varies with sigma (gamma 1 below
    sigma 0.5), fresh dynamo state, and the keyword arguments of one call (timestep left out)."""
    import torch._dynamo

    torch._dynamo.reset()
    t = tiny.flux_transformer(num_layers=1, num_single_layers=1)
    base = _flux_kw(2)
    taca.enable(t, gamma=1.2, schedule=lambda s: torch.where(s > 0.5, 1.0 + s * 0.3, torch.ones_like(s)))
    return t, base


def test_compiled_flux_no_recompile_across_schedule():
    """torch.compile: after warming up a gamma-on and a gamma-off call, a schedule with changing
    gamma values runs with no recompilation (gamma is a tensor)."""
    t, base = _compile_setup()
    compiled = torch.compile(t, backend="eager")
    try:
        outs = {}
        for s in (1.0, 0.2):  # warm-up: gamma on, gamma off
            outs[s] = compiled(**base, timestep=torch.tensor([s]))[0]
        with torch._dynamo.config.patch(error_on_recompile=True):
            for s in (0.95, 0.9, 0.7, 0.4, 0.3, 0.1):
                out = compiled(**base, timestep=torch.tensor([s]))[0]
                eager = t(**base, timestep=torch.tensor([s]))[0]
                torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    finally:
        taca.disable(t)
        torch._dynamo.reset()


def test_compile_repeated_blocks_fullgraph():
    """Regional compilation (diffusers' compile_repeated_blocks) with fullgraph=True: the blocks,
    processors and taca.joint_attention trace without graph breaks; the hook stays outside."""
    t, base = _compile_setup()
    try:
        eager = {s: t(**base, timestep=torch.tensor([s]))[0] for s in (1.0, 0.2, 0.95, 0.3)}
        t.compile_repeated_blocks(fullgraph=True, backend="eager")
        for s in (1.0, 0.2):
            t(**base, timestep=torch.tensor([s]))
        with torch._dynamo.config.patch(error_on_recompile=True):
            for s in (0.95, 0.3):
                torch.testing.assert_close(t(**base, timestep=torch.tensor([s]))[0], eager[s], rtol=1e-5, atol=1e-6)
    finally:
        taca.disable(t)
        torch._dynamo.reset()


# Host path: the hook reads sigma on the host instead of syncing with the device ---------------

def _record(h, t):
    """Per transformer call: (path taken, gamma values or None)."""
    log = []
    hook = t.register_forward_hook(
        lambda m, a, o: log.append((h.last_path, None if h.last_gamma is None else h.last_gamma.tolist())))
    return log, hook


def _run(pipe, inputs, host: bool, schedule, **kw):
    """One pipeline call with TACA on; host=False forces today's sync path. Returns (images, log, handle)."""
    h = taca.enable(pipe, gamma=1.3, schedule=schedule)
    h.host_sigma = host
    log, hook = _record(h, pipe.transformer)
    try:
        out = pipe(**inputs(), **kw).images
    finally:
        hook.remove()
        taca.disable(pipe)
    return out, log, h


def _no_sync_path(monkeypatch):
    def refuse(self, *a, **k):
        raise AssertionError("taca: the sync path ran")

    monkeypatch.setattr(taca.pipeline.TacaHandle, "_sync_decide", refuse)


_HOST_CASES = {
    "flux": lambda: (tiny.flux_pipeline(), tiny.flux_inputs, {}),
    "flux-bf16": lambda: (tiny.flux_pipeline(dtype=torch.bfloat16), tiny.flux_inputs, {}),
    "flux-true-cfg": lambda: (tiny.flux_pipeline(), tiny.flux_inputs, dict(true_cfg_scale=2.0)),
    "sd35m-cfg": lambda: (tiny.sd3_pipeline("sd35m"), tiny.sd3_inputs, {}),
    "sd35m-skip-layers": lambda: (tiny.sd3_pipeline("sd35m"), tiny.sd3_inputs,
                                  dict(skip_guidance_layers=[1], skip_layer_guidance_start=0.0)),
}


@pytest.mark.parametrize("case,schedule", [
    (c, s) for c in ("flux", "sd35m-cfg") for s in ("paper", "constant", "steps:3")
] + [(c, "paper") for c in ("flux-bf16", "flux-true-cfg", "sd35m-skip-layers")])
def test_host_path_matches_sync_path(case, schedule, monkeypatch):
    """Full 28-step pipeline calls: the host path makes the same gamma decisions and gives
    bit-identical images as the sync path, never runs the sync path, and copies the scheduler's
    timesteps to the host once per pipeline call."""
    pipe, make_inputs, extra = _HOST_CASES[case]()
    if case == "flux-true-cfg":  # a negative prompt: two transformer calls per step
        def inputs():
            kw = make_inputs(pipe, batch=2, text_len=7, num_inference_steps=28)
            g = torch.Generator().manual_seed(5)
            kw["negative_prompt_embeds"] = torch.randn(kw["prompt_embeds"].shape, generator=g)
            kw["negative_pooled_prompt_embeds"] = torch.randn(kw["pooled_prompt_embeds"].shape, generator=g)
            return kw
    else:
        def inputs():
            return make_inputs(pipe, batch=2, text_len=7, num_inference_steps=28)
    ref, ref_log, _ = _run(pipe, inputs, False, schedule, **extra)
    with monkeypatch.context() as m:
        _no_sync_path(m)
        out, log, h = _run(pipe, inputs, True, schedule, **extra)
    calls_per_step = 2 if case == "flux-true-cfg" else 1
    skip_layer_calls = 5 if case == "sd35m-skip-layers" else 0  # steps 1-5 of 28 (start 0, stop 0.2)
    assert len(log) == 28 * calls_per_step + skip_layer_calls == len(ref_log)
    assert {p for p, _ in ref_log} == {"sync"} and {p for p, _ in log} == {"host"}
    assert [g for _, g in log] == [g for _, g in ref_log]
    assert torch.equal(out, ref)
    assert h.host_copies == (0 if schedule == "constant" else 1)
    on = [g is not None for _, g in log]
    assert any(on) and (schedule == "constant" or not all(on))
    if schedule == "steps:3":
        assert on[: 3 * calls_per_step] == [True] * 3 * calls_per_step and not any(on[3 * calls_per_step:])


def test_host_path_kontext_and_img2img():
    """FLUX Kontext (sets _current_timestep) and SD3 img2img (strength: the loop starts inside
    the scheduler's timesteps) take the host path; FLUX img2img (no _current_timestep, fresh
    timestep tensors) falls back to the sync path. Same images either way."""
    from diffusers import FluxImg2ImgPipeline, FluxKontextPipeline, StableDiffusion3Img2ImgPipeline

    flux = tiny.flux_pipeline(vae=True)
    parts = {k: v for k, v in flux.components.items() if k in (
        "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")}
    img = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    sd3 = tiny.sd3_pipeline("sd3", vae=True)
    cases = []
    for cls, base, path in ((FluxKontextPipeline, parts, "host"), (FluxImg2ImgPipeline, parts, "sync"),
                            (StableDiffusion3Img2ImgPipeline, sd3.components, "host")):
        pipe = cls(**base)
        pipe.set_progress_bar_config(disable=True)
        if cls is StableDiffusion3Img2ImgPipeline:
            def inputs(pipe=pipe):
                kw = tiny.sd3_inputs(pipe, text_len=7, num_inference_steps=10)
                del kw["height"], kw["width"]
                return dict(kw, image=img, strength=0.6)
        elif cls is FluxKontextPipeline:
            def inputs(pipe=pipe):
                return dict(tiny.flux_inputs(pipe, text_len=7, num_inference_steps=10, height=16, width=16),
                            image=None, max_area=16 * 16)
        else:
            def inputs(pipe=pipe):
                return dict(tiny.flux_inputs(pipe, text_len=7, num_inference_steps=10, height=16, width=16),
                            image=img, strength=0.6)
        cases.append((cls.__name__, pipe, inputs, path))
    for name, pipe, inputs, path in cases:
        # img2img at strength 0.6 starts below the paper's window: a threshold inside the run
        ref, ref_log, _ = _run(pipe, inputs, False, "paper:0.5")
        out, log, h = _run(pipe, inputs, True, "paper:0.5")
        assert {p for p, _ in log} == {path}, name
        assert [g for _, g in log] == [g for _, g in ref_log], name
        assert any(g is not None for _, g in log) and any(g is None for _, g in log), name
        assert torch.equal(out, ref), name
    assert sd3.scheduler.begin_index == 4  # img2img with strength 0.6 started at step 4 of 10


def test_direct_calls_with_a_pipeline_handle():
    """Transformer calls that do not come from the pipeline's own loop never trust the pipeline's
    _current_timestep on the host: after an interrupted call (stale _current_timestep), from a
    step callback, from another pipeline sharing the transformer. A timestep that is a view is
    read on the host whoever calls (and re-read when changed in place)."""
    pipe, inputs = _flux()
    t = pipe.transformer
    h = taca.enable(pipe, gamma=1.3)
    kw = _flux_kw(4)
    seen = []

    def callback(p, i, ts, kwargs):
        t(**kw, timestep=torch.tensor([0.3]))  # sigma 0.3 while the pipeline is at ~1.0
        seen.append((h.last_path, h.last_gamma))
        raise KeyboardInterrupt  # leaves pipe._current_timestep set

    with pytest.raises(KeyboardInterrupt):
        pipe(**inputs(), callback_on_step_end=callback)
    assert seen == [("sync", None)]
    stale = pipe._current_timestep
    assert isinstance(stale, torch.Tensor) and float(stale) / 1000 > 0.97

    t(**kw, timestep=torch.tensor([0.5]))
    assert h.last_path == "sync" and h.last_gamma is None  # not the stale t of ~1.0
    t(**kw, timestep=torch.tensor([0.995]))
    assert h.last_path == "sync" and h.last_gamma is not None

    sigmas = torch.tensor([0.99, 0.5])
    t(**kw, timestep=sigmas[1:])
    assert h.last_path == "host" and h.last_gamma is None
    t(**kw, timestep=sigmas[:1])
    assert h.last_path == "host" and h.last_gamma.tolist() == [pytest.approx(1.3)]
    copies = h.host_copies
    sigmas[0] = 0.2  # in place: the host copy is stale
    t(**kw, timestep=sigmas[:1])
    assert h.last_path == "host" and h.last_gamma is None and h.host_copies == copies + 1

    # another pipeline sharing the transformer (and the scheduler), while pipe's
    # _current_timestep is still stale: its calls do not use pipe's value on the host
    from diffusers import FluxPipeline

    other = FluxPipeline(**pipe.components)
    other.set_progress_bar_config(disable=True)
    log, hook = _record(h, t)
    try:
        out = other(**inputs()).images
    finally:
        hook.remove()
    assert {p for p, _ in log} == {"sync"}
    taca.disable(pipe)
    pipe._current_timestep = None
    ref, ref_log, _ = _run(other, inputs, False, "paper")
    assert [g for _, g in log] == [g for _, g in ref_log] and torch.equal(out, ref)


def test_inference_mode_and_env_switch_use_the_sync_path(monkeypatch):
    """Inference-mode tensors track neither views nor versions: the sync path, same result."""
    for make in (_flux, _sd3):
        pipe, inputs = make()
        ref, ref_log, _ = _run(pipe, inputs, True, "paper")
        assert {p for p, _ in ref_log} == {"host"}
        with torch.inference_mode():
            out, log, _ = _run(pipe, inputs, True, "paper")
        assert {p for p, _ in log} == {"sync"}
        assert [g for _, g in log] == [g for _, g in ref_log] and torch.equal(out, ref)
    monkeypatch.setenv("TACA_HOST_SIGMA", "0")
    pipe, inputs = _sd3()
    h = taca.enable(pipe)
    assert h.host_sigma is False
    pipe(**inputs())
    assert h.last_path == "sync"
    taca.disable(pipe)


def test_callable_schedule_and_training_batches_use_the_sync_path():
    """Per-sample timesteps (training) and callable schedules keep the device math."""
    t = tiny.flux_transformer(num_layers=1, num_single_layers=1)
    kw = _flux_kw(6, batch=2)
    with taca.enabled(t, gamma=1.3) as h:
        t(**kw, timestep=torch.tensor([0.99, 0.2]))
        assert h.last_path == "sync" and h.last_gamma.tolist() == [pytest.approx(1.3), 1.0]
        sig = torch.tensor([0.99, 0.2, 0.5])
        t(**kw, timestep=sig[:2])  # a view, but of two different elements
        assert h.last_path == "sync" and h.last_gamma.tolist() == [pytest.approx(1.3), 1.0]
    with taca.enabled(t, schedule=lambda s: torch.full_like(s, 1.1)) as h:
        t(**kw, timestep=sig[:1].expand(2))
        assert h.last_path == "sync" and h.last_gamma.tolist() == [pytest.approx(1.1)] * 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts device syncs: needs CUDA")
@pytest.mark.parametrize("model", ["flux", "sd35m"])
def test_hook_syncs_on_cuda(model, monkeypatch):
    """On CUDA the host path syncs once per pipeline call (copying the scheduler's timesteps), the
    sync path once per transformer call; same gamma decisions and images. Also: the host copy of
    sigma rounds t / 1000 as CUDA does."""
    import sys
    import traceback
    import warnings

    from taca.pipeline import TacaHandle, _div1000

    x = torch.cat([torch.arange(0, 1001, dtype=torch.float32), torch.rand(4096) * 1000])
    assert torch.equal(_div1000(x, "cuda"), (x.cuda() / 1000.0).cpu())

    counts, where = [], []
    orig = TacaHandle._pre_hook

    def counted(self, module, args, kwargs):
        syncs = []

        def record(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):  # keep the Python stack of each sync, for failures
                syncs.append(f"{message}\n" + "".join(traceback.format_stack(limit=12)[:-1]))

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            # record from here: on the H100 the first switch to "warn" in a FLUX run raised a sync
            # warning inside torch.cuda.set_sync_debug_mode itself, before any hook code ran
            warnings.showwarning = record
            try:
                return orig(self, module, args, kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                counts.append(len(syncs))
                where.append(syncs)

    monkeypatch.setattr(TacaHandle, "_pre_hook", counted)  # before enable: the hook is a bound method
    # the FLUX host path checks that the hook was called from the pipeline's loop: let its frame
    # walk step over this wrapper's frame too
    monkeypatch.setattr(taca.pipeline, "_HOOK_FRAME_FILES", taca.pipeline._HOOK_FRAME_FILES | {__file__})
    if model == "flux":
        pipe = tiny.flux_pipeline().to("cuda")
        make = lambda: tiny.flux_inputs(pipe, batch=2, text_len=7, num_inference_steps=28)  # noqa: E731
    else:
        pipe = tiny.sd3_pipeline(model).to("cuda")
        make = lambda: tiny.sd3_inputs(pipe, batch=2, text_len=7, num_inference_steps=28)  # noqa: E731

    def inputs():
        return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in make().items()}

    pipe(**inputs())  # warm-up
    runs = {}
    for host in (True, False):
        counts.clear()
        where.clear()
        out, log, _ = _run(pipe, inputs, host, "paper")
        runs[host] = (out, log, list(counts), list(where))
    (out_h, log_h, syncs_h, where_h), (out_s, log_s, syncs_s, _) = runs[True], runs[False]
    assert {p for p, _ in log_h} == {"host"} and {p for p, _ in log_s} == {"sync"}
    if not (sum(syncs_h) == 1 and syncs_h[0] == 1):
        print("syncs of the first host-path call:\n" + "\n---\n".join(where_h[0]), file=sys.stderr)
    assert sum(syncs_h) == 1 and syncs_h[0] == 1, syncs_h
    assert all(c >= 1 for c in syncs_s), syncs_s
    assert [g for _, g in log_h] == [g for _, g in log_s]
    assert any(g is not None for _, g in log_h)
    assert torch.equal(out_h, out_s)


def test_fp8_reaches_every_processor_and_every_call(monkeypatch):
    """enable(fp8=True) sets it on every TACA processor, and every call with text (gamma on and, unlike the
    default, gamma off) goes through taca.joint_attention(fp8=True), which refuses this tiny float32 CPU model
    with a message naming fp8; enabled() restores the previous value; a non-bool is refused."""
    pipe, inputs = _flux()
    from taca import processors as P
    seen = []
    real = P.joint_attention
    monkeypatch.setattr(P, "joint_attention", lambda *a, **kw: seen.append(kw.get("fp8", False)) or real(*a, **kw))
    h = taca.enable(pipe, gamma=1.3, schedule="steps:1", fp8=True)
    assert all(p.fp8 is True for p in h.processors.values())
    with pytest.raises(TypeError, match="fp8=True takes float16 or bfloat16"):
        pipe(**inputs())
    assert seen and set(seen) == {True}
    with taca.enabled(pipe, gamma=1.3, schedule="constant"):
        assert all(p.fp8 is False for p in h.processors.values())
    assert all(p.fp8 is True for p in h.processors.values())
    with pytest.raises(TypeError, match="fp8 must be a bool"):
        taca.enable(pipe, fp8=1)
    taca.disable(pipe)


def test_timestep_out_of_range_is_refused():
    """A bare FLUX transformer (its pipeline passes sigma = t / 1000) called with t in [0, 1000], or NaN: the
    schedule would read sigma 970 as early in every call. Refused on the host path and the sync path (per-sample
    timesteps), naming the convention; in-range and edge values (0, 1, t / 1000 in bfloat16) pass."""
    t = tiny.flux_transformer(num_layers=1, num_single_layers=1)
    kw = _flux_kw(6, batch=2)
    with taca.enabled(t, gamma=1.3) as h:
        for bad in (torch.tensor([970.0, 970.0]), torch.tensor([0.99, 970.0]), torch.tensor([float("nan")] * 2),
                    torch.tensor([-0.5, 0.2]), 970.0):
            with pytest.raises(ValueError, match=r"timestep .* out of range.*sigma in \[0, 1\].*'sigma' convention"):
                t(**kw, timestep=bad)
        for good in (torch.tensor([1.0, 0.0]), torch.tensor([1000.0]).to(torch.bfloat16) / 1000,
                     torch.tensor([0.97])):
            t(**kw, timestep=good)
        assert h.last_gamma is not None  # 0.97 is early: gamma on
    with taca.enabled(t, schedule="paper", gamma=1.3) as h:  # a paper rule on the host path (one timestep)
        with pytest.raises(ValueError, match="out of range"):
            t(**kw, timestep=torch.tensor([970.0]))
        t(**kw, timestep=torch.tensor([0.98]))
        assert h.last_gamma is not None
    # schedule="constant" reads no sigma (the host path never computes it): not refused on either path
    with taca.enabled(t, schedule="constant", gamma=1.3) as h:
        t(**kw, timestep=torch.tensor([970.0, 970.0]))
        assert h.last_path == "host" and h.last_gamma is not None
        h.host_sigma = False  # the sync path
        t(**kw, timestep=torch.tensor([970.0, 970.0]))
        assert h.last_path == "sync" and h.last_gamma is not None
    sd3 = tiny.sd3_transformer()  # SD3 takes t in [0, 1000]: 1970 is refused with that unit named
    with taca.enabled(sd3, gamma=1.3):
        x = torch.randn(1, sd3.config.in_channels, 8, 8)
        with pytest.raises(ValueError, match=r"t = 1000 \* sigma in \[0, 1000\]"):
            sd3(hidden_states=x, encoder_hidden_states=torch.randn(1, 5, sd3.config.joint_attention_dim),
                pooled_projections=torch.randn(1, sd3.config.pooled_projection_dim), timestep=torch.tensor([1970.0]))
