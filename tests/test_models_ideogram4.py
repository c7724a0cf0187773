"""Ideogram 4 (Ideogram4Transformer2DModel: one packed sequence per row, [left pad, text, image] with
roles from ``indicator`` and a block-diagonal bool mask from ``segment_ids``; reversed time 1 - sigma)
with the taca.models.ideogram4 adapter, on tiny random-weight models: every attention call inside the
window is the paper's definition on the stock q, k, v with each row's own text span and the stock
mask; outside the window and at gamma = 1 the model is stock bit for bit; image-only calls (the
pipeline's unconditional transformer) and rows without text stay stock; layouts TACA cannot scale
exactly are refused; Ideogram4Pipeline (conditional + unconditional transformer, two prompts of
different lengths in one batch) at two resolutions."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("diffusers")

import taca
from taca.pipeline import get_handle

from model_checks import (Capture, StockCalls, check_disable_restores, check_spans_against_paper, processors_of,
                          ranges, span_mask, window)
from model_checks import check_checkpointing_keeps_state

N_LAYERS = 2
TINY = dict(in_channels=16, num_layers=N_LAYERS, attention_head_dim=32, num_attention_heads=2, intermediate_size=64,
            adaln_dim=16, llm_features_dim=24, mrope_section=(6, 5, 5))


def _transformer(seed=0):
    from diffusers import Ideogram4Transformer2DModel

    torch.manual_seed(seed)
    return Ideogram4Transformer2DModel(**TINY).eval()


def _ids(text_lengths, grid, max_text):
    from diffusers import Ideogram4Pipeline

    return Ideogram4Pipeline._prepare_ids(list(text_lengths), grid[0], grid[1], max_text, torch.device("cpu"))


def _inputs(text_lengths, grid, max_text, sigma=0.98, seed=1):
    """The pipeline's packed layout ([left pad, text, image] per row, its position / segment ids and
    indicator); model time 1 - sigma."""
    g = torch.Generator().manual_seed(seed)
    B, N = len(text_lengths), max_text + grid[0] * grid[1]
    pos, seg, ind = _ids(text_lengths, grid, max_text)
    return dict(hidden_states=torch.randn(B, N, 16, generator=g), timestep=torch.full((B,), 1 - sigma),
                encoder_hidden_states=torch.randn(B, N, 24, generator=g), position_ids=pos, segment_ids=seg,
                indicator=ind, return_dict=False)


def _stock_mask(seg):
    return (seg.unsqueeze(2) == seg.unsqueeze(1)).unsqueeze(1)


def _check(monkeypatch, text_lengths, grid, max_text):
    import diffusers.models.transformers.transformer_ideogram4 as ti

    t = _transformer()
    stock = StockCalls(monkeypatch, ti)
    with torch.no_grad():
        t(**_inputs(text_lengths, grid, max_text))
    monkeypatch.undo()
    cap = Capture(monkeypatch, shadow=True)
    with taca.enabled(t, gamma=1.3), torch.no_grad():
        t(**_inputs(text_lengths, grid, max_text))
    assert len(stock.calls) == len(cap.calls) == N_LAYERS
    B, N = len(text_lengths), max_text + grid[0] * grid[1]
    _, seg, _ = _ids(text_lengths, grid, max_text)
    mask = _stock_mask(seg)
    for (q, k, v, kw, _), (sq, sk, sv, smask) in zip(cap.calls, stock.calls):
        assert torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv)
        assert q.shape == (B, N, 2, 32) and torch.equal(smask, mask)
    starts = torch.tensor([max_text - n if n else 0 for n in text_lengths])
    lens = torch.tensor(text_lengths)
    text = span_mask(B, N, starts, lens)
    check_spans_against_paper(cap.calls, text, ~text, torch.full((B,), 1.3), masks=mask)
    return cap


@pytest.mark.parametrize("text_lengths,grid,max_text", [([6, 4], (3, 4), 6), ([2, 7], (2, 5), 8), ([3], (4, 2), 5)])
def test_joint_calls_are_the_paper_definition_per_sample(monkeypatch, text_lengths, grid, max_text):
    """Rows with their own left padding: text keys of row b are [max_text - n_b, max_text), the
    padding (its own segment) and the stock block-diagonal mask as the model builds it."""
    cap = _check(monkeypatch, text_lengths, grid, max_text)
    kw = cap.calls[0][3]
    if len(text_lengths) > 1:  # different spans per row: (B,) tensors
        assert torch.equal(kw["text_len"], torch.tensor(text_lengths))
        assert torch.equal(kw["text_start"], torch.tensor([max_text - n for n in text_lengths]))
    else:
        assert kw["text_len"] == text_lengths[0] and kw["text_start"] == max_text - text_lengths[0]


@pytest.mark.parametrize("grid", [(3, 4), (2, 5)])
def test_same_span_in_every_row_is_one_int_span(monkeypatch, grid):
    cap = _check(monkeypatch, [5, 5], grid, 7)
    assert all(kw["text_len"] == 5 and kw["text_start"] == 2 for *_, kw, _ in cap.calls)


def test_row_without_text_has_text_len_zero(monkeypatch):
    """A row whose prompt is empty (no indicator == 3 token) next to one with text: that row has
    text_len 0 (nothing scaled), the other its own span."""
    cap = _check(monkeypatch, [4, 0], (3, 3), 5)
    assert torch.equal(cap.calls[0][3]["text_len"], torch.tensor([4, 0]))


def _image_only(grid, B=2, sigma=0.98):
    """The pipeline's unconditional call: the image region of the layout, zeroed text features."""
    full = _inputs([3] * B, grid, 4, sigma=sigma)
    return dict(hidden_states=full["hidden_states"][:, 4:], timestep=full["timestep"],
                encoder_hidden_states=torch.zeros(B, grid[0] * grid[1], 24), position_ids=full["position_ids"][:, 4:],
                segment_ids=full["segment_ids"][:, 4:], indicator=full["indicator"][:, 4:], return_dict=False)


@pytest.mark.parametrize("grid", [(3, 4), (2, 5)])
def test_image_only_calls_stay_stock(monkeypatch, grid):
    """The unconditional (image-only) branch has no text: gamma has nothing to scale, the stock
    attention runs, bit for bit, even inside the window."""
    t = _transformer(seed=3)
    with torch.no_grad():
        ref = t(**_image_only(grid))[0]
    cap = Capture(monkeypatch)
    with taca.enabled(t, gamma=1.3) as h, torch.no_grad():
        out = t(**_image_only(grid))[0]
        assert h.last_gamma is not None  # in the window, yet no text
    assert not cap.calls and torch.equal(out, ref)


@pytest.mark.parametrize("text_lengths,max_text", [([6, 4], 6), ([5, 5], 5)])
@pytest.mark.parametrize("grid", [(3, 4), (2, 5)])
def test_outside_window_and_gamma_one_are_stock(text_lengths, max_text, grid):
    t = _transformer()
    before = processors_of(t)
    with torch.no_grad():
        ref_in = t(**_inputs(text_lengths, grid, max_text, sigma=0.98))[0]
        ref_out = t(**_inputs(text_lengths, grid, max_text, sigma=0.5))[0]
        h = taca.enable(t, gamma=1.3)
        assert h.kind == "ideogram4" and sorted(h.processors) == [f"layers.{i}.attention" for i in range(N_LAYERS)]
        assert torch.equal(t(**_inputs(text_lengths, grid, max_text, sigma=0.5))[0], ref_out) and h.last_gamma is None
        assert not torch.equal(t(**_inputs(text_lengths, grid, max_text, sigma=0.98))[0], ref_in)
        assert torch.allclose(h.last_gamma, torch.full((2,), 1.3))
        taca.enable(t, gamma=1.0, schedule="constant")
        assert torch.equal(t(**_inputs(text_lengths, grid, max_text, sigma=0.98))[0], ref_in)
        taca.disable(t)
    check_disable_restores(t, before)
    assert all(type(p).__name__ == "Ideogram4AttnProcessor" for p in processors_of(t).values())


def _packed_two_prompts():
    """One row packing two samples ([txt 3, img 4] twice, segments 1 and 2): two text spans."""
    ind = torch.tensor([[3, 3, 3, 2, 2, 2, 2, 3, 3, 3, 2, 2, 2, 2]])
    seg = torch.tensor([[1] * 7 + [2] * 7])
    return ind, seg


@pytest.mark.parametrize("case", ["two_spans", "text_in_two_segments", "pad_sees_text", "per_token_timestep"])
def test_layouts_tacas_cannot_scale_exactly_are_refused(monkeypatch, case):
    t = _transformer()
    kw = _inputs([4, 3], (2, 2), 5)
    if case == "two_spans":
        ind, seg = _packed_two_prompts()
        N = ind.shape[1]
        kw.update(indicator=ind, segment_ids=seg, hidden_states=torch.randn(1, N, 16), timestep=torch.tensor([0.02]),
                  encoder_hidden_states=torch.randn(1, N, 24), position_ids=torch.zeros(1, N, 3, dtype=torch.long))
        match = "row 0 has 6 text tokens .* spread over 10 positions"
    elif case == "text_in_two_segments":
        kw["segment_ids"] = kw["segment_ids"].clone()
        kw["segment_ids"][1, 2] = 5  # row 1's first text token (left pad 2) in another segment
        match = "row 1's text tokens lie in more than one segment"
    elif case == "pad_sees_text":
        kw["segment_ids"] = kw["segment_ids"].clone()
        kw["segment_ids"][1, 0] = 1  # a padding token in the text's segment
        match = "in row 1, tokens that are neither text nor image"
    else:
        kw["timestep"] = torch.full((2, kw["hidden_states"].shape[1]), 0.02)
        match = "per-token timestep"
    cap = Capture(monkeypatch)
    with taca.enabled(t, gamma=1.3), torch.no_grad():
        with pytest.raises((ValueError, NotImplementedError), match=match):
            t(**kw)
    assert not cap.calls


# --- the pipeline ---------------------------------------------------------------------------


def _pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, Ideogram4Pipeline

    pipe = Ideogram4Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                             transformer=_transformer(0), unconditional_transformer=_transformer(1))
    lengths = {"a red cube": 5, "a photo of a cat holding a sign": 8, "x": 2}

    def encode_prompt(prompt, grid_h, grid_w, max_sequence_length, device):
        # the stock method with the Qwen3-VL features replaced by random ones (no text encoder built)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        n = [lengths[p] for p in prompts]
        g = torch.Generator().manual_seed(7)
        feats = torch.randn(len(prompts), max_sequence_length, 24, generator=g)
        feats = feats * (torch.arange(max_sequence_length)[None, :] >= max_sequence_length - torch.tensor(n)[:, None])[..., None]
        pos, seg, ind = pipe._prepare_ids(n, grid_h, grid_w, max_sequence_length, device)
        embeds = torch.cat([feats, torch.zeros(len(prompts), grid_h * grid_w, 24)], dim=1)
        return embeds, pos, seg, ind

    pipe.encode_prompt = encode_prompt
    return pipe, lengths


def _hook_sigmas(steps, hw, base_mu=0.0, dtype=torch.float32):
    """The sigma the hook reads at each step: 1 - (1 - t / 1000), in float32 as the pipeline computes
    it, on the pipeline's logit-normal sigmas through the scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.ideogram4.pipeline_ideogram4 import _logit_normal_sigmas, _resolution_aware_mu

    sch = FlowMatchEulerDiscreteScheduler()
    sch.set_timesteps(sigmas=_logit_normal_sigmas(steps, _resolution_aware_mu(*hw, base_mu=base_mu), std=1.5).tolist())
    return 1.0 - (1.0 - sch.timesteps.float() / 1000).to(dtype).float()


@pytest.mark.parametrize("hw", [(64, 96), (96, 64)])
def test_pipeline_two_prompts_and_window(monkeypatch, hw):
    """Ideogram4Pipeline with two prompts of 5 and 8 tokens in one batch (left-padded to 9) and its
    image-only unconditional transformer: at gamma 1 the images are stock; with TACA on, the gamma
    window is the paper rule's on the pipeline's sigmas (sync path), every call of the conditional
    transformer in it is the paper's definition with each row's span and the stock mask, and the
    unconditional transformer keeps its stock processors."""
    pipe, _ = _pipeline()
    steps = 4
    prompts = ["a red cube", "a photo of a cat holding a sign"]
    kw = dict(prompt=prompts, height=hw[0], width=hw[1], num_inference_steps=steps, guidance_scale=4.0,
              guidance_schedule=None, max_sequence_length=9, output_type="latent", mu=2.0)
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    with taca.enabled(pipe, gamma=1.0, schedule="constant"):
        assert torch.equal(pipe(generator=torch.Generator().manual_seed(1), **kw).images, stock)
    uncond = processors_of(pipe.unconditional_transformer)
    cap = Capture(monkeypatch)
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, k, o: seen.append(get_handle(m).last_gamma),
                                                  with_kwargs=True)
    with taca.enabled(pipe, gamma=1.3) as h:
        assert processors_of(pipe.unconditional_transformer) == uncond
        out = pipe(generator=torch.Generator().manual_seed(1), **kw).images
        assert h.last_path == "sync"
    hook.remove()
    on = window(_hook_sigmas(steps, hw, base_mu=2.0))
    assert on and on != list(range(steps)) and len(seen) == steps
    assert [i for i in range(steps) if seen[i] is not None] == on
    assert len(cap.calls) == N_LAYERS * len(on)  # the conditional transformer's calls only
    n_img = (hw[0] // 16) * (hw[1] // 16)
    N = 9 + n_img
    _, seg, _ = _ids([5, 8], (hw[0] // 16, hw[1] // 16), 9)
    text = span_mask(2, N, torch.tensor([4, 1]), torch.tensor([5, 8]))
    check_spans_against_paper(cap.calls, text, ~text, torch.full((2,), 1.3), masks=_stock_mask(seg))
    assert not torch.equal(out, stock)


def ideogram4_windows(dtype=torch.float32):
    """Windows of the paper's rule on Ideogram4Pipeline's default schedule (logit-normal, mu 0
    shifted by the resolution, std 1.5) through FlowMatchEulerDiscreteScheduler with shift 1 and no
    dynamic shifting (the checkpoint's scheduler config is NOT read here: dynamic shifting would need
    a mu the pipeline does not pass, and any shift other than 1 would distort its own schedule)."""
    return {(hw, steps): ranges(window(_hook_sigmas(steps, hw, dtype=dtype)))
            for hw in ((2048, 2048), (1024, 1024)) for steps in (30, 48, 50)}


def test_window_steps_with_the_real_scheduler():
    assert ideogram4_windows() == EXPECTED_WINDOWS
    assert ideogram4_windows(torch.bfloat16) == EXPECTED_WINDOWS  # the model time a bf16 transformer gets


EXPECTED_WINDOWS = {((2048, 2048), 30): "0-2", ((2048, 2048), 48): "0-3", ((2048, 2048), 50): "0-4",
                    ((1024, 1024), 30): "0", ((1024, 1024), 48): "0-1", ((1024, 1024), 50): "0-1"}


@pytest.mark.parametrize("given,expect", [
    ({}, {}),
    ({"guidance_scale": 5.0}, {"guidance_scale": 5.0, "guidance_schedule": None}),
    ({"guidance_scale": 5.0, "num_inference_steps": 8}, {"guidance_scale": 5.0, "num_inference_steps": 8,
                                                          "guidance_schedule": None}),
    ({"num_inference_steps": 8}, {"num_inference_steps": 8, "guidance_schedule": (7.0,) * 5 + (3.0,) * 3}),
    ({"num_inference_steps": 2}, {"num_inference_steps": 2, "guidance_schedule": (7.0, 7.0)}),
])
def test_generate_call_fits_the_pipelines_guidance_rules(given, expect):
    """taca generate's --guidance / --steps become arguments Ideogram4Pipeline accepts (its check_inputs
    refuses a guidance scale next to its default schedule, and a schedule of another length)."""
    import inspect

    from diffusers import Ideogram4Pipeline

    from taca import models

    call = models.by_name("ideogram4").generate_call(dict(prompt="a red cube", **given))
    assert call == dict(prompt="a red cube", **expect)
    pipe, _ = _pipeline()
    defaults = {k: p.default for k, p in inspect.signature(Ideogram4Pipeline.__call__).parameters.items()}
    args = {k: call.get(k, defaults[k]) for k in ("prompt", "num_inference_steps", "guidance_scale", "guidance_schedule")}
    pipe.check_inputs(height=64, width=64, **args)  # raises on what the pipeline refuses
    with pytest.raises(ValueError, match="Only one of"):  # what the CLI passed before generate_call
        pipe.check_inputs(prompt="a", height=64, width=64, num_inference_steps=48, guidance_scale=5.0,
                          guidance_schedule=defaults["guidance_schedule"])


@pytest.mark.parametrize("text_lengths,max_text", [([6, 4], 6), ([5, 5], 5)])
def test_gradient_checkpointing_keeps_the_call_state(text_lengths, max_text):
    """The forward carries no attention kwargs: the hook hands each call's state (per-row text spans
    of the left-padded layout, the segment mask) to the processors, and to the blocks recomputed in
    the backward pass through the checkpointing function (timestep = 1 - sigma)."""
    check_checkpointing_keeps_state(_transformer, _inputs(text_lengths, (3, 4), max_text))


@pytest.mark.parametrize("text_lengths,grid,max_text", [([6, 4], (3, 4), 6), ([2, 7], (2, 5), 8)])
def test_segment_mask_runs_as_a_key_mask_with_the_padding_apart(monkeypatch, text_lengths, grid, max_text):
    """On CUDA, backend="auto" takes Ideogram 4's segment mask as the last row's key mask on the key-mask kernel,
    with the left padding's rows (the batch's longest padding) on split SDPA (ops._row_range_mask /
    _row_range_attention). That route forced on the CPU kernel here: every layer takes it with the padding rows
    apart, and the model's output equals the element-wise mask path's."""
    from taca import ops

    t = _transformer()
    with taca.enabled(t, gamma=1.3), torch.no_grad():
        want = t(**_inputs(text_lengths, grid, max_text))[0]
    routed = []
    orig = ops._row_range_attention

    def attn(*a, **k):
        routed.append(tuple(a[3][1:]))
        return orig(*a, **k)

    monkeypatch.setattr(ops, "_MASK_ROUTES", ("cuda", "cpu"))
    monkeypatch.setattr(ops, "_row_range_attention", attn)
    with taca.enabled(t, gamma=1.3), torch.no_grad():
        got = t(**_inputs(text_lengths, grid, max_text))[0]
    assert routed == [(0, max_text - min(text_lengths))] * N_LAYERS
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
