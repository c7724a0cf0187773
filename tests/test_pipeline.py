"""taca.enable / disable / enabled on tiny pipelines: round trips, idempotence, exception safety,
unsupported models, QKV fusion, attention backends, torch.compile."""
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


def test_text_length_and_kontext_style_extra_tokens():
    """text_len comes from encoder_hidden_states, whatever the image token count (extra
    conditioning tokens after the image, as FLUX Kontext appends them)."""
    t = tiny.flux_transformer(num_layers=1, num_single_layers=1)
    g = torch.Generator().manual_seed(1)
    n, L = 24, 11  # 16 image + 8 "conditioning" tokens
    seen = []
    kw = dict(hidden_states=torch.randn(1, n, 4, generator=g), encoder_hidden_states=torch.randn(1, L, 32, generator=g),
              pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([1.0]),
              img_ids=torch.rand(n, 3, generator=g), txt_ids=torch.zeros(L, 3))
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
    g = torch.Generator().manual_seed(2)
    n, L = 16, 5
    base = dict(hidden_states=torch.randn(1, n, 4, generator=g), encoder_hidden_states=torch.randn(1, L, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), img_ids=torch.rand(n, 3, generator=g),
                txt_ids=torch.zeros(L, 3), return_dict=False)
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
