"""OmniGen (OmniGenTransformer2DModel) with the taca.models.omnigen adapter, on tiny random-weight
models with the pipeline's own collator (left-padded prompts, the causal / bidirectional 0/1 mask,
position ids). Inside the window the noisy image's queries go through taca.joint_attention and equal
the paper's definition on the stock q, k, v with the stock additive mask (text keys: the condition
tokens; the time token is neither text nor visual), the condition and time rows are the stock SDPA
rows; outside the window, at gamma = 1 and after taca.disable the model is stock bit for bit; input
images are refused; the timestep is 1 - sigma on the checkpoint's invert_sigmas scheduler;
OmniGenPipeline (its CFG batch pads the shorter prompt) end to end."""
import math
import os
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("diffusers")

import taca
import taca.processors as tp
from taca.pipeline import get_handle

from model_checks import check_disable_restores, paper_attention_masks, processors_of, ranges, window
from model_checks import check_checkpointing_keeps_state

VOCAB = 64
TINY = dict(in_channels=4, patch_size=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
            intermediate_size=48, num_layers=2, vocab_size=VOCAB, pad_token_id=2, pos_embed_max_size=16, time_step_dim=8,
            rope_scaling={"long_factor": [1.0] * 8, "short_factor": [1.0 + i / 8 for i in range(8)]})
GAMMA = 1.3
# the checkpoint's scheduler: diffusers' scripts/convert_omnigen_to_diffusers.py and its OmniGen tests build
# FlowMatchEulerDiscreteScheduler(invert_sigmas=True, num_train_timesteps=1) (the hub's
# Shitao/OmniGen-v1-diffusers scheduler_config.json: as remembered, not checked offline)
SCHEDULER = dict(invert_sigmas=True, num_train_timesteps=1)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _transformer():
    from diffusers import OmniGenTransformer2DModel

    torch.manual_seed(0)
    return OmniGenTransformer2DModel(**TINY).eval()


def _inputs(lengths, hw, sigma=0.98, seed=1):
    """A batch of prompts of the given token counts through the pipeline's collator; hw: latent (h, w)."""
    from diffusers.pipelines.omnigen.processor_omnigen import OmniGenCollator

    g = torch.Generator().manual_seed(seed)
    ids = [[1] + torch.randint(3, VOCAB, (n - 1,), generator=g).tolist() for n in lengths]
    n_img = (hw[0] // 2) * (hw[1] // 2)
    pixels = [hw[0] * 8, hw[1] * 8]  # the collator counts output tokens as height * width // 16 // 16
    mllm = [{"input_ids": x, "pixel_values": None, "image_sizes": None} for x in ids]
    input_ids, position_ids, mask, _, _, sizes = OmniGenCollator().process_mllm_input(mllm, [pixels] * len(ids))
    assert mask.shape[-1] == input_ids.shape[1] + 1 + n_img
    B = len(lengths)
    return dict(hidden_states=torch.randn(B, 4, *hw, generator=g), timestep=torch.full((B,), 1.0 - sigma),
                input_ids=input_ids, input_img_latents=[], input_image_sizes=sizes, attention_mask=mask,
                position_ids=position_ids, return_dict=False)


def _stock_mask(kw):
    m = kw["attention_mask"]
    return ((1 - m) * torch.finfo(torch.float32).min).unsqueeze(1).float()


class _Calls:
    """Every F.scaled_dot_product_attention call ("sdpa") and, under TACA, taca.joint_attention call
    ("op") in order. ``shadow``: the stock run's calls; the TACA run's calls then return the stock
    call's rows, so the rest of the forward is the stock model's bit for bit."""

    def __init__(self, monkeypatch, shadow=None):
        import torch.nn.functional as F

        self.calls = []
        sdpa, orig_j = F.scaled_dot_product_attention, tp.joint_attention

        def stock_rows(q):
            layer = sum(c[0] == "sdpa" for c in self.calls) - 1  # a layer's rows: sdpa (head) first, then op
            out = shadow[layer][6]
            return out[:, :, : q.shape[2]] if self.calls[-1][0] == "sdpa" else out[:, :, out.shape[2] - q.shape[2]:]

        def s(q, k, v, attn_mask=None, **kw):
            out = sdpa(q, k, v, attn_mask=attn_mask, **kw)
            self.calls.append(("sdpa", q.clone(), k.clone(), v.clone(), attn_mask, None, out.clone()))
            return stock_rows(q) if shadow is not None else out

        def j(q, k, v, **kw):
            out = orig_j(q, k, v, **kw)
            self.calls.append(("op", q.clone(), k.clone(), v.clone(), kw.get("attn_mask"), dict(kw), out.clone()))
            return stock_rows(q) if shadow is not None else out

        monkeypatch.setattr(F, "scaled_dot_product_attention", s)
        monkeypatch.setattr(tp, "joint_attention", j)


def _check_model(monkeypatch, lengths, hw):
    t = _transformer()
    kw = _inputs(lengths, hw)
    B, T = len(lengths), kw["input_ids"].shape[1]
    stock = _Calls(monkeypatch)
    with torch.no_grad():
        t(**kw)
    monkeypatch.undo()
    cap = _Calls(monkeypatch, shadow=stock.calls)
    with taca.enabled(t, gamma=GAMMA), torch.no_grad():
        t(**_inputs(lengths, hw))
    assert len(stock.calls) == TINY["num_layers"] and [c[0] for c in cap.calls] == ["sdpa", "op"] * TINY["num_layers"]
    mask = _stock_mask(kw)
    gamma = torch.full((B,), GAMMA)
    for layer, (_, sq, sk, sv, smask, _, sout) in enumerate(stock.calls):
        assert torch.equal(smask, mask)  # the stock mask, as the test builds it from the collator's
        (_, hq, hk, hv, hmask, _, hout), (_, q, k, v, m, okw, out) = cap.calls[2 * layer: 2 * layer + 2]
        # condition + time rows: the stock SDPA on their rows of the mask (no gamma)
        assert torch.equal(hq, sq[:, :, : T + 1]) and torch.equal(hk, sk) and torch.equal(hv, sv)
        assert torch.equal(hmask, smask[:, :, : T + 1])
        torch.testing.assert_close(hout, sout[:, :, : T + 1], rtol=1e-5, atol=1e-6)
        # image rows: the op, text keys the first T, every query visual, the stock rows of the mask
        assert torch.equal(q, sq[:, :, T + 1:]) and torch.equal(k, sk) and torch.equal(v, sv)
        assert q.shape[2] == (hw[0] // 2) * (hw[1] // 2) and k.shape[2] == T + 1 + q.shape[2]
        assert torch.equal(m, smask[:, :, T + 1:])
        assert okw["text_len"] == T and okw["layout"] == "bhnd" and okw.get("text_start") is None
        assert okw["scale"] == 1 / math.sqrt(q.shape[-1]) and torch.equal(okw["gamma"], gamma)
        key_text = torch.zeros(B, k.shape[2], dtype=torch.bool)
        key_text[:, :T] = True
        expect = paper_attention_masks(q, k, v, key_text, torch.ones(B, q.shape[2], dtype=torch.bool), gamma, m,
                                       layout="bhnd")
        torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=2e-6)
        # the padded condition keys are removed for every image query: gamma never reaches them
        for b, n in enumerate(lengths):
            assert bool((m[b, :, :, : T - n] < -1e38).all()) and bool((m[b, :, :, T - n:] == 0).all())


@pytest.mark.parametrize("lengths,hw", [([9, 9], (4, 6)), ([9, 5], (4, 6)), ([4, 11, 7], (6, 4)), ([1], (2, 2))])
def test_joint_calls_are_the_paper_definition(monkeypatch, lengths, hw):
    _check_model(monkeypatch, lengths, hw)


@pytest.mark.parametrize("lengths,hw", [([9, 5], (4, 6)), ([6, 6], (6, 4))])
def test_outside_window_and_gamma_one_are_stock(lengths, hw):
    t = _transformer()
    before = processors_of(t)
    with torch.no_grad():
        ref_in = t(**_inputs(lengths, hw, sigma=0.98))[0]
        ref_out = t(**_inputs(lengths, hw, sigma=0.5))[0]
        h = taca.enable(t, gamma=GAMMA)
        assert {type(p).__name__ for p in h.processors.values()} == {"TacaOmniGenAttnProcessor"}
        assert len(h.processors) == TINY["num_layers"]
        assert torch.equal(t(**_inputs(lengths, hw, sigma=0.5))[0], ref_out) and h.last_gamma is None
        assert not torch.equal(t(**_inputs(lengths, hw, sigma=0.98))[0], ref_in)
        taca.enable(t, gamma=1.0, schedule="constant")
        assert torch.equal(t(**_inputs(lengths, hw, sigma=0.98))[0], ref_in)
        taca.disable(t)
        assert torch.equal(t(**_inputs(lengths, hw, sigma=0.98))[0], ref_in)
    check_disable_restores(t, before)


def test_timestep_is_one_minus_sigma():
    """t = 0 is pure noise (OmniGen's time): the hook's sigma is 1 - t."""
    t = _transformer()
    with taca.enabled(t, gamma=GAMMA) as h, torch.no_grad():
        for ts, on in ((0.0, True), (0.02, True), (0.05, False), (0.98, False)):
            kw = _inputs([5, 3], (2, 2))
            kw["timestep"] = torch.full((2,), ts)
            t(**kw)
            assert (h.last_gamma is not None) == on, ts


def test_input_images_are_refused():
    t = _transformer()
    kw = _inputs([9, 9], (4, 6))
    kw["input_img_latents"] = [torch.randn(1, 4, 2, 2)]
    kw["input_image_sizes"] = {0: [[2, 3]]}
    calls = []
    t.layers[0].self_attn.register_forward_pre_hook(lambda *a: calls.append(1))
    with taca.enabled(t, gamma=GAMMA), torch.no_grad():
        with pytest.raises(ValueError, match="OmniGen with input images is not supported.*text-to-image"):
            t(**kw)
    assert not calls  # refused before any block ran


def _omnigen_steps(steps):
    """Steps with gamma under the paper rule on the checkpoint's scheduler and the pipeline's sigmas."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    sch.set_timesteps(sigmas=np.linspace(1, 0, steps + 1)[:steps])
    return window(1.0 - sch.timesteps)  # sigma = 1 - t, as the adapter reads it


def test_window_steps_with_the_real_scheduler():
    assert {s: ranges(_omnigen_steps(s)) for s in (30, 50, 100)} == EXPECTED_WINDOWS


# steps -> steps with gamma (t = i / steps: sigma = 1 - t >= 0.97)
EXPECTED_WINDOWS = {30: "0", 50: "0-1", 100: "0-3"}


def _fake_torchvision(monkeypatch):
    """torchvision is not installed here: pipeline_omnigen then imports no OmniGenMultiModalProcessor,
    which builds its input-image transforms from torchvision in __init__ and uses them only on input
    images (refused by the adapter). Diffusers' own processor class is put back in place, with a
    namespace of the four transform names standing in for torchvision's."""
    import diffusers.pipelines.omnigen.pipeline_omnigen as pm
    import diffusers.pipelines.omnigen.processor_omnigen as po

    if getattr(pm, "OmniGenMultiModalProcessor", None) is None:
        monkeypatch.setattr(pm, "OmniGenMultiModalProcessor", po.OmniGenMultiModalProcessor, raising=False)
    if getattr(po, "transforms", None) is None:
        stub = types.SimpleNamespace(Compose=lambda fs: None, Lambda=lambda f: None, ToTensor=lambda: None,
                                     Normalize=lambda **k: None)
        monkeypatch.setattr(po, "transforms", stub, raising=False)


def _pipeline(monkeypatch):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, OmniGenPipeline

    from taca.demo import _word_tokenizer

    _fake_torchvision(monkeypatch)
    tok, vocab = _word_tokenizer(["<unk>", "<s>", "</s>"], "<s> $A", pad="</s>", unk="<unk>", eos="</s>", bos="<s>",
                                 max_length=512)
    torch.manual_seed(0)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 4, 4, 4),
                        layers_per_block=1, latent_channels=4, norm_num_groups=1,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    from diffusers import OmniGenTransformer2DModel

    torch.manual_seed(0)
    transformer = OmniGenTransformer2DModel(**{**TINY, "vocab_size": max(VOCAB, len(vocab))}).eval()
    return OmniGenPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae,
                           tokenizer=tok)


@pytest.mark.parametrize("hw", [(32, 48), (48, 32)])
def test_pipeline_cfg_padded_prompts_and_window(monkeypatch, hw):
    """OmniGenPipeline with CFG (the prompt and the processor's long negative prompt in one batch: the
    prompt's row is left-padded and masked): sigma from 1 - t on the host, the window of the paper rule
    on the checkpoint's scheduler, every op call the paper's definition with the stock mask, gamma 1 =
    stock bit for bit."""
    pipe = _pipeline(monkeypatch)
    steps = 40
    kw = dict(prompt="a red cube left of a blue ball", height=hw[0], width=hw[1], num_inference_steps=steps,
              guidance_scale=3.0, output_type="pt")
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    with taca.enabled(pipe, gamma=1.0, schedule="constant"):
        assert torch.equal(pipe(generator=torch.Generator().manual_seed(1), **kw).images, stock)
    cap = _Calls(monkeypatch)
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, k, o: seen.append(
        (k["input_ids"].clone(), k["attention_mask"].clone(), get_handle(m).last_gamma, get_handle(m).last_path)),
        with_kwargs=True)
    with taca.enabled(pipe, gamma=GAMMA):
        out = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    hook.remove()
    on = _omnigen_steps(steps)
    assert on and len(on) < steps
    assert len(seen) == steps and {p for *_, p in seen} == {"host"}
    assert [i for i in range(steps) if seen[i][2] is not None] == on
    ids, mask3 = seen[0][0], seen[0][1]
    T = ids.shape[1]
    assert ids.shape[0] == 2 and bool((ids[0, 0] == 2)) and bool((ids[1, 0] != 2))  # the prompt's row is padded
    ops = [c for c in cap.calls if c[0] == "op"]
    assert len(ops) == TINY["num_layers"] * len(on)
    mask = ((1 - mask3) * torch.finfo(torch.float32).min).unsqueeze(1).float()
    n_img = (hw[0] // 16) * (hw[1] // 16)
    for _, q, k, v, m, okw, o in ops:
        assert q.shape[2] == n_img and k.shape[2] == T + 1 + n_img and okw["text_len"] == T
        assert torch.equal(m, mask[:, :, T + 1:])
        key_text = torch.zeros(2, k.shape[2], dtype=torch.bool)
        key_text[:, :T] = True
        expect = paper_attention_masks(q, k, v, key_text, torch.ones(2, n_img, dtype=torch.bool),
                                       torch.full((2,), GAMMA), m, layout="bhnd")
        torch.testing.assert_close(o.double(), expect, rtol=1e-5, atol=2e-6)
    assert not torch.equal(out, stock)


@pytest.mark.parametrize("lengths", [[9, 9], [9, 5]])
def test_gradient_checkpointing_keeps_the_call_state(lengths):
    """The forward carries no attention kwargs: the hook hands each call's state (per-sample text
    spans of the collator's left-padded layout, its mask) to the processors, and to the blocks
    recomputed in the backward pass through the checkpointing function (timestep = 1 - sigma)."""
    check_checkpointing_keeps_state(_transformer, _inputs(lengths, (4, 6)))


@pytest.mark.parametrize("lengths,hw", [([9, 5], (4, 6)), ([4, 11, 7], (6, 4))])
def test_image_rows_run_as_a_key_mask(monkeypatch, lengths, hw):
    """On CUDA, backend="auto" takes the image rows of OmniGen's mask as a key mask (every image row sees every
    unpadded key: ops._row_range_mask finds no row apart) on the key-mask kernel. That route forced on the CPU
    kernel here: in every layer, no row apart, the mask checked once per transformer call (the processor's image-row
    view is known by its base tensor); the model's output equals the element-wise mask path's."""
    from taca import ops

    t = _transformer()
    with taca.enabled(t, gamma=GAMMA), torch.no_grad():
        want = t(**_inputs(lengths, hw))[0]
    routed, checks = [], []
    orig_attn, orig_put = ops._row_range_attention, ops._cache_put

    def attn(*a, **k):
        routed.append(tuple(a[3][1:]))
        return orig_attn(*a, **k)

    def put(cache, *a, **k):
        if cache is ops._ROW_MASKS:
            checks.append(1)
        return orig_put(cache, *a, **k)

    monkeypatch.setattr(ops, "_MASK_ROUTES", ("cuda", "cpu"))
    monkeypatch.setattr(ops, "_row_range_attention", attn)
    monkeypatch.setattr(ops, "_cache_put", put)
    with taca.enabled(t, gamma=GAMMA), torch.no_grad():
        got = t(**_inputs(lengths, hw))[0]
    assert routed == [(0, 0)] * TINY["num_layers"] and len(checks) == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
