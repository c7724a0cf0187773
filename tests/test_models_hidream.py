"""HiDream-I1 (HiDreamImageTransformer2DModel: [img, txt], the text's last third replaced in every
block, single-stream blocks told the text length by the hook, padded image keys of non-square
images multiplied by 0 as stock) with the taca.models.hidream adapter, on tiny random-weight
models: every joint attention call inside the window is the paper's definition on the stock
q, k, v, outside it and at gamma = 1 the model is stock bit for bit, square and non-square."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("diffusers")

import taca
from taca.pipeline import get_handle

from model_checks import Capture, check_disable_restores, paper_attention, processors_of, ranges, window
from model_checks import check_checkpointing_keeps_state

N_DOUBLE, N_SINGLE = 2, 2
TINY = dict(patch_size=2, in_channels=4, out_channels=4, num_layers=N_DOUBLE, num_single_layers=N_SINGLE,
            attention_head_dim=32, num_attention_heads=2, caption_channels=[24, 20], text_emb_dim=16,
            num_routed_experts=2, num_activated_experts=1, axes_dims_rope=(16, 8, 8), max_resolution=(16, 16),
            llama_layers=[0, 1, 2, 3])


def _transformer():
    from diffusers import HiDreamImageTransformer2DModel

    torch.manual_seed(0)
    return HiDreamImageTransformer2DModel(**TINY).eval()


def _inputs(B, L5, Ll, hw, t=980.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(B, 4, *hw, generator=g), timesteps=torch.full((B,), t),
                encoder_hidden_states_t5=torch.randn(B, L5, 24, generator=g),
                encoder_hidden_states_llama3=torch.randn(4, B, Ll, 20, generator=g),
                pooled_embeds=torch.randn(B, 16, generator=g), return_dict=False)


class _StockSDPA:
    """q, k, v (as (B, N, H, D)) of every F.scaled_dot_product_attention call from HiDream's file."""

    def __init__(self, monkeypatch):
        import torch.nn.functional as F
        import diffusers.models.transformers.transformer_hidream_image as th

        self.calls = []

        def sdpa(q, k, v, *a, **kw):
            self.calls.append(tuple(x.transpose(1, 2).clone() for x in (q, k, v)))
            return F.scaled_dot_product_attention(q, k, v, *a, **kw)

        class _F:  # torch.nn.functional as HiDream's file sees it, with its SDPA recorded
            scaled_dot_product_attention = staticmethod(sdpa)

            def __getattr__(self, name):
                return getattr(F, name)

        monkeypatch.setattr(th, "F", _F())


@pytest.mark.parametrize("B,L5,Ll,hw", [(2, 6, 5, (8, 8)), (1, 1, 1, (8, 8)), (2, 4, 3, (8, 12)), (1, 5, 2, (12, 4))])
def test_joint_calls_are_the_paper_definition(monkeypatch, B, L5, Ll, hw):
    """Every call (double and single stream) on the stock q, k, v: text = the last L5 + 2 Ll keys;
    non-square: the padded image keys are zero in k (as stock) and are image keys."""
    t = _transformer()
    stock = _StockSDPA(monkeypatch)
    with torch.no_grad():
        t(**_inputs(B, L5, Ll, hw))
    monkeypatch.undo()
    cap = Capture(monkeypatch, shadow=True)
    with taca.enabled(t, gamma=1.3) as h, torch.no_grad():
        assert h.kind == "hidream"
        t(**_inputs(B, L5, Ll, hw))
    n_img = hw[0] * hw[1] // 4 if hw[0] == hw[1] else t.max_seq
    L = L5 + 2 * Ll
    assert len(cap.calls) == len(stock.calls) == N_DOUBLE + N_SINGLE
    for (q, k, v, kw, out), (sq, sk, sv) in zip(cap.calls, stock.calls):
        assert torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv)
        assert q.shape[1] == n_img + L and kw["layout"] == "bnhd" and kw["text_first"] is False
        assert kw["text_len"] == L and kw["scale"] == 1 / 32 ** 0.5 and torch.equal(kw["gamma"], torch.full((B,), 1.3))
        assert kw.get("attn_mask") is None
        if hw[0] != hw[1]:  # stock's padded image keys: multiplied by 0, still attended
            pad = hw[0] * hw[1] // 4
            assert k[:, pad:n_img].abs().sum() == 0 and k[:, :pad].abs().sum() > 0
        expect = paper_attention(q, k, v, L, torch.full((B,), 1.3), text_first=False)
        torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("hw", [(8, 8), (8, 12)])
def test_outside_window_and_gamma_one_are_stock(hw):
    t = _transformer()
    before = processors_of(t)
    with torch.no_grad():
        ref_in = t(**_inputs(2, 6, 5, hw, t=980.0))[0]
        ref_out = t(**_inputs(2, 6, 5, hw, t=500.0))[0]
        h = taca.enable(t, gamma=1.3)
        assert {type(p).__name__ for p in h.processors.values()} == {"TacaHiDreamAttnProcessor"}
        assert len(h.processors) == N_DOUBLE + N_SINGLE
        assert torch.equal(t(**_inputs(2, 6, 5, hw, t=500.0))[0], ref_out) and h.last_gamma is None
        assert not torch.equal(t(**_inputs(2, 6, 5, hw, t=980.0))[0], ref_in)
        taca.enable(t, gamma=1.0, schedule="constant")
        assert torch.equal(t(**_inputs(2, 6, 5, hw, t=980.0))[0], ref_in)
        taca.disable(t)
    check_disable_restores(t, before)


# HiDream-ai/HiDream-I1-Full scheduler/scheduler_config.json is taken to be UniPCMultistepScheduler with
# flow sigmas, flow_shift 3.0 and flow prediction (as remembered, not read offline here); the
# pipeline calls its set_timesteps(steps) without mu.
SCHEDULER = dict(num_train_timesteps=1000, use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")


def _pipeline():
    from diffusers import HiDreamImagePipeline, UniPCMultistepScheduler

    none = {f"{k}{s}": None for k in ("text_encoder", "tokenizer") for s in ("", "_2", "_3", "_4")}
    pipe = HiDreamImagePipeline(scheduler=UniPCMultistepScheduler(**SCHEDULER), vae=None,
                                transformer=_transformer(), **none)
    # the pipeline rescales every request to the area of default_sample_size latents a side (128:
    # 1024x1024 pixels); 8 keeps it at 64x64 pixels (4x4 patches) for the tiny model
    pipe.default_sample_size = 8
    return pipe


@pytest.mark.parametrize("hw", [(64, 64), (64, 96)])
def test_pipeline_cfg_and_window(monkeypatch, hw):
    """HiDreamImagePipeline batches CFG as [negative, positive] (T5 and Llama of one length each:
    the pipeline pads both): gamma from the pipeline's raw t (host path), the window the paper
    rule's on the scheduler, every joint call in it the paper's definition, gamma 1 stock."""
    from diffusers import UniPCMultistepScheduler

    pipe = _pipeline()
    steps = 6
    g = torch.Generator().manual_seed(0)
    kw = dict(prompt_embeds_t5=torch.randn(1, 6, 24, generator=g), prompt_embeds_llama3=torch.randn(4, 1, 5, 20, generator=g),
              pooled_prompt_embeds=torch.randn(1, 16, generator=g),
              negative_prompt_embeds_t5=torch.randn(1, 6, 24, generator=g),
              negative_prompt_embeds_llama3=torch.randn(4, 1, 5, 20, generator=g),
              negative_pooled_prompt_embeds=torch.randn(1, 16, generator=g),
              height=hw[0], width=hw[1], num_inference_steps=steps, guidance_scale=5.0, output_type="latent")
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    cap = Capture(monkeypatch)
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, k, o: seen.append(
        (k["timesteps"].shape[0], get_handle(m).last_gamma, get_handle(m).last_path)), with_kwargs=True)
    with taca.enabled(pipe, gamma=1.3):
        out = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    hook.remove()
    sch = UniPCMultistepScheduler(**SCHEDULER)
    sch.set_timesteps(steps)
    on = window(sch.timesteps / 1000)
    assert on and [b for b, _, _ in seen] == [2] * steps and {p for _, _, p in seen} == {"host"}
    assert [i for i in range(steps) if seen[i][1] is not None] == on
    n_calls = N_DOUBLE + N_SINGLE
    # 64x64 -> 4x4 patches; 64x96 is rescaled to 48x64 (3x4 patches), padded to max_seq image slots
    n_img = 16 if hw[0] == hw[1] else pipe.transformer.max_seq
    assert len(cap.calls) == n_calls * len(on)
    for q, k, v, kw_, o in cap.calls:
        assert q.shape[1] == n_img + 16 and kw_["text_len"] == 16 and kw_["text_first"] is False
        torch.testing.assert_close(o.double(), paper_attention(q, k, v, 16, torch.full((2,), 1.3), text_first=False),
                                   rtol=1e-5, atol=2e-6)
    assert not torch.equal(out, stock)
    with taca.enabled(pipe, gamma=1.0, schedule="constant"):
        assert torch.equal(pipe(generator=torch.Generator().manual_seed(1), **kw).images, stock)


def hidream_windows():
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    out = {}
    for steps in (30, 50):  # I1-Full: 50 steps
        sch = UniPCMultistepScheduler(**SCHEDULER)
        sch.set_timesteps(steps)
        out[("full", steps)] = ranges(window(sch.timesteps / 1000))
    # I1-Dev (28 steps) / I1-Fast (16 steps): FlowMatchEulerDiscreteScheduler, shift 6.0 / 3.0 (as
    # remembered, not read offline); the pipeline's mu is ignored without dynamic shifting
    for name, shift, steps in (("dev", 6.0, 28), ("fast", 3.0, 16)):
        sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        sch.set_timesteps(steps)
        out[(name, steps)] = ranges(window(sch.timesteps / 1000))
    return out


def test_window_steps_with_the_real_scheduler():
    assert hidream_windows() == EXPECTED_WINDOWS


# (checkpoint, steps) -> steps with gamma
EXPECTED_WINDOWS = {("full", 30): "0-2", ("full", 50): "0-4", ("dev", 28): "0-4", ("fast", 16): "0-1"}


def test_gradient_checkpointing_keeps_the_call_state():
    """The forward carries no attention kwargs: the hook hands each call's state to the processors,
    and to the (double- and single-stream) blocks recomputed in the backward pass through the
    checkpointing function (HiDream has no attention mask; t = 1000 sigma)."""
    check_checkpointing_keeps_state(_transformer, _inputs(2, 6, 5, (8, 8)))
