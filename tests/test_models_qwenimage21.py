"""Qwen-Image 2.1 (QwenImage21Transformer2DModel) with the taca.models.qwenimage21 adapter, on tiny
random-weight models. The stock processor makes one SDPA call per prefix segment (text causal,
condition images bidirectional) and one for the target image; the cached decode one for the target.
Inside the window every call whose queries are visual (condition images, target) is the paper's
definition on the stock q, k, v and the stock key mask, with text keys at the non-image positions
(not contiguous with condition images), and every text call is the stock call; outside the window,
at gamma = 1 and after taca.disable the model is stock bit for bit (default and flex processors,
prefill and KV-cache decode); condition images with the KV cache and gamma_reverse != 1 with
condition images are refused; QwenImage21Pipeline with true CFG, unequal prompts and its KV cache."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("diffusers")

import taca
import taca.processors as tp
from taca.pipeline import get_handle

from model_checks import check_disable_restores, paper_attention_masks, processors_of, ranges, window
from model_checks import check_checkpointing_keeps_state

TINY = dict(patch_size=1, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            context_in_dim=24, axes_dims_rope=(4, 6, 6))
GAMMA = 1.3

# the VLM sequence: ("t", n) n text tokens, ("i", (f, h, w)) a condition image (h * w / 4 slots); then the target
LAYOUTS = {
    "t2i": ([("t", 9)], (1, 4, 4)),
    "t2i_wide": ([("t", 5)], (1, 2, 6)),
    "one_cond": ([("t", 3), ("i", (1, 2, 4)), ("t", 3)], (1, 4, 4)),
    "two_conds": ([("t", 2), ("i", (1, 2, 2)), ("t", 2), ("i", (1, 2, 4)), ("t", 3)], (1, 4, 4)),
    "adjacent_conds": ([("t", 2), ("i", (1, 2, 2)), ("i", (1, 2, 2)), ("t", 2)], (1, 2, 4)),
}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _transformer():
    from diffusers import QwenImage21Transformer2DModel

    torch.manual_seed(0)
    return QwenImage21Transformer2DModel(**TINY).eval()


def _flex(t):
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21FlexAttnProcessor

    t.set_attn_processor(QwenImage21FlexAttnProcessor())
    return t


def _layout(name):
    """(img_mask row, ehs length, img_shapes row, text positions of the joint sequence, joint length,
    text slot indices of the VLM sequence)."""
    parts, target = LAYOUTS[name]
    slots, shapes, text, text_slots, pos = [], [], [], [], 0
    for kind, x in parts:
        if kind == "t":
            text_slots.extend(range(len(slots), len(slots) + x))
            slots += [False] * x
            text.extend(range(pos, pos + x))
            pos += x
        else:
            n = x[1] * x[2]
            slots += [True] * (n // 4)
            shapes.append(x)
            pos += n
    L = len(slots)
    n_t = target[1] * target[2]
    slots += [True] * (n_t // 4)
    return slots, L, shapes + [target], text, pos + n_t, text_slots


def _inputs(name, B=2, sigma=0.98, pad=None, seed=1, **extra):
    """pad: per-sample number of right-padded text tokens (masked) at the end of the prompt."""
    slots, L, shapes, _, _, text_slots = _layout(name)
    g = torch.Generator().manual_seed(seed)
    n_img = sum(f * h * w for f, h, w in shapes)
    kw = dict(hidden_states=torch.randn(B, n_img, 16, generator=g), encoder_hidden_states=torch.randn(B, L, 24, generator=g),
              timestep=torch.full((B,), sigma), img_shapes=[list(shapes)] * B,
              img_mask=torch.tensor([slots] * B, dtype=torch.bool), return_dict=False, **extra)
    if pad is not None:
        m = torch.ones(B, L, dtype=torch.bool)
        for b, p in enumerate(pad):
            if p:
                m[b, text_slots[-p:]] = False
        kw["encoder_hidden_states_mask"] = m
    return kw


def _key_valid(name, B, pad):
    """The joint key mask the model builds: False on padded text positions."""
    _, _, _, text, N, _ = _layout(name)
    kv = torch.ones(B, N, dtype=torch.bool)
    for b, p in enumerate(pad or [0] * B):
        if p:
            kv[b, text[-p:]] = False
    return kv


class _Calls:
    """Every attention call of the model in order: stock dispatch_attention_fn calls ("sdpa") and,
    under TACA, taca.joint_attention calls ("op"). With ``shadow`` (the stock run's calls), each op
    call returns the stock call's output, so the rest of the forward is the stock model's."""

    def __init__(self, monkeypatch, shadow=None):
        import diffusers.models.transformers.transformer_qwenimage21 as tq

        self.calls = []
        orig_d, orig_j = tq.dispatch_attention_fn, tp.joint_attention

        def d(q, k, v, attn_mask=None, **kw):
            out = orig_d(q, k, v, attn_mask=attn_mask, **kw)
            self.calls.append(("sdpa", q.clone(), k.clone(), v.clone(), attn_mask, None, out.clone()))
            return out

        def j(q, k, v, **kw):
            out = orig_j(q, k, v, **kw)
            i = len(self.calls)
            self.calls.append(("op", q.clone(), k.clone(), v.clone(), kw.get("attn_mask"), dict(kw), out.clone()))
            return shadow[i][6] if shadow is not None else out

        monkeypatch.setattr(tq, "dispatch_attention_fn", d)
        monkeypatch.setattr(tp, "joint_attention", j)


def _check_against_stock(stock, taca_calls, text, B, n_visual_expected, key_valid=None):
    """taca_calls against the stock run's calls: text calls identical, visual calls = the paper's
    definition on the stock q, k, v and mask, with text keys at ``text`` (stock order)."""
    assert len(taca_calls) == len(stock)
    n_op = 0
    gamma = torch.full((B,), GAMMA)
    for i, ((kind, q, k, v, mask, kw, out), (skind, sq, sk, sv, smask, _, sout)) in enumerate(zip(taca_calls, stock)):
        assert skind == "sdpa"
        assert torch.equal(q, sq), i
        if kind == "sdpa":  # a text segment: the stock call, as is
            assert torch.equal(k, sk) and torch.equal(v, sv) and torch.equal(mask, smask) and torch.equal(out, sout)
            continue
        n_op += 1
        Nq, Nk = q.shape[1], k.shape[1]
        assert Nq != Nk  # visual queries only
        tk = [p for p in text if p < Nk]
        key_text = torch.zeros(B, Nk, dtype=torch.bool)
        key_text[:, tk] = True
        contiguous = tk == list(range(tk[0], tk[0] + len(tk))) if tk else True
        perm = torch.arange(Nk) if contiguous else torch.cat([key_text[0].nonzero()[:, 0], (~key_text[0]).nonzero()[:, 0]])
        assert torch.equal(k, sk[:, perm]) and torch.equal(v, sv[:, perm])
        assert kw["text_len"] == len(tk) and kw["layout"] == "bnhd" and kw["text_first"] is True
        # the first len(tk) keys (moved first when not contiguous), else the contiguous span's start
        assert kw.get("text_start") == (tk[0] if contiguous and tk and tk[0] else None)
        assert kw.get("query_text_len") is None and kw.get("query_text_start") is None
        assert kw["scale"] == 1 / 4.0 and torch.equal(kw["gamma"], gamma)
        if key_valid is None:
            assert smask is None and mask is None
        else:
            assert torch.equal(smask, key_valid[:, None, None, :Nk])  # the stock key mask, as the test expects it
            assert torch.equal(mask, smask[..., perm])
        expect = paper_attention_masks(sq, sk, sv, key_text, torch.ones(B, Nq, dtype=torch.bool), gamma, smask)
        torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=2e-6)
    assert n_op == n_visual_expected


def _n_visual(name):
    """Visual calls per layer in a prefill: one per condition image, one for the target."""
    return len(_layout(name)[2])


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("pad", [None, [0, 2]])
def test_prefill_calls_are_the_paper_definition(monkeypatch, name, pad):
    t = _transformer()
    _, _, _, text, _, _ = _layout(name)
    stock = _Calls(monkeypatch)
    with torch.no_grad():
        t(**_inputs(name, pad=pad))
    monkeypatch.undo()
    cap = _Calls(monkeypatch, shadow=stock.calls)
    with taca.enabled(t, gamma=GAMMA), torch.no_grad():
        t(**_inputs(name, pad=pad))
    kv = None if pad is None else _key_valid(name, 2, pad)
    _check_against_stock(stock.calls, cap.calls, text, 2, TINY["num_layers"] * _n_visual(name), kv)


@pytest.mark.parametrize("name", ["t2i", "t2i_wide"])
@pytest.mark.parametrize("pad", [None, [2, 0]])
def test_kv_cache_extract_then_decode_are_the_paper_definition(monkeypatch, name, pad):
    """The pipeline's cache: step 0 prefills ("extract"), later steps decode the target against
    [cached text, target] keys. Text keys and values are never touched by gamma, so the cache is exact."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    t = _transformer()
    _, _, _, text, _, _ = _layout(name)
    stock = _Calls(monkeypatch)
    with torch.no_grad():
        cache = QwenImage21KVCache(TINY["num_layers"])
        t(**_inputs(name, pad=pad, kv_cache=cache, kv_cache_mode="extract"))
        t(**_inputs(name, pad=pad, seed=2, kv_cache=cache, kv_cache_mode="cached"))
    monkeypatch.undo()
    cap = _Calls(monkeypatch, shadow=stock.calls)
    with taca.enabled(t, gamma=GAMMA), torch.no_grad():
        cache = QwenImage21KVCache(TINY["num_layers"])
        t(**_inputs(name, pad=pad, kv_cache=cache, kv_cache_mode="extract"))
        t(**_inputs(name, pad=pad, seed=2, kv_cache=cache, kv_cache_mode="cached"))
    kv = None if pad is None else _key_valid(name, 2, pad)
    # extract: a text call and a target call per layer; decode: a target call per layer
    assert [c[0] for c in cap.calls] == ["sdpa", "op"] * TINY["num_layers"] + ["op"] * TINY["num_layers"]
    _check_against_stock(stock.calls, cap.calls, text, 2, 2 * TINY["num_layers"], kv)


def _run_steps(t, name, pad, sigmas, cache):
    """One call per sigma (the pipeline's loop: extract, then cached decodes when ``cache``)."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    kvc = QwenImage21KVCache(TINY["num_layers"]) if cache else None
    outs = []
    for i, s in enumerate(sigmas):
        mode = None if not cache else ("extract" if i == 0 else "cached")
        outs.append(t(**_inputs(name, sigma=s, pad=pad, seed=1 + i, kv_cache=kvc, kv_cache_mode=mode))[0])
    return outs


@pytest.mark.parametrize("flex", [False, True])
@pytest.mark.parametrize("name,pad,cache", [("t2i", [0, 3], True), ("t2i_wide", None, False),
                                            ("two_conds", [0, 2], False), ("adjacent_conds", None, False)])
def test_outside_window_and_gamma_one_are_stock(flex, name, pad, cache):
    t = _transformer()
    if flex:
        _flex(t)
    before = processors_of(t)
    stock_names = {type(p).__name__ for n, p in before.items()}
    with torch.no_grad():
        ref_out = _run_steps(t, name, pad, [0.5, 0.4], cache)
        ref_in = _run_steps(t, name, pad, [0.98, 0.97], cache)
        h = taca.enable(t, gamma=GAMMA)
        want = "TacaQwenImage21FlexAttnProcessor" if flex else "TacaQwenImage21AttnProcessor"
        assert {type(p).__name__ for p in h.processors.values()} == {want}
        assert all(isinstance(p, type(before[n])) for n, p in h.processors.items())  # the model keeps its path
        assert all(torch.equal(a, b) for a, b in zip(_run_steps(t, name, pad, [0.5, 0.4], cache), ref_out))
        assert h.last_gamma is None
        taca.enable(t, gamma=1.0, schedule="constant")
        assert all(torch.equal(a, b) for a, b in zip(_run_steps(t, name, pad, [0.98, 0.97], cache), ref_in))
        taca.enable(t, gamma=GAMMA)
        on = _run_steps(t, name, pad, [0.98, 0.97], cache)
        assert not any(torch.equal(a, b) for a, b in zip(on, ref_in))
        taca.disable(t)
        assert all(torch.equal(a, b) for a, b in zip(_run_steps(t, name, pad, [0.98, 0.97], cache), ref_in))
    check_disable_restores(t, before)
    assert {type(p).__name__ for p in processors_of(t).values()} == stock_names


@pytest.mark.parametrize("name,pad,cache", [("t2i", [0, 3], True), ("two_conds", [0, 2], False)])
def test_flex_processor_in_the_window_is_the_same_decomposition(name, pad, cache):
    """In the window the flex processor runs the default processor's exact decomposition (segments
    from the layout, as the model derives them), so both give the same output bit for bit."""
    with torch.no_grad():
        t = _transformer()
        with taca.enabled(t, gamma=GAMMA):
            plain = _run_steps(t, name, pad, [0.98, 0.975], cache)
        t = _flex(_transformer())
        with taca.enabled(t, gamma=GAMMA):
            flex = _run_steps(t, name, pad, [0.98, 0.975], cache)
    assert all(torch.equal(a, b) for a, b in zip(plain, flex))


def test_condition_images_with_the_kv_cache_are_refused():
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    t = _transformer()
    cache = QwenImage21KVCache(TINY["num_layers"])
    with taca.enabled(t, gamma=GAMMA), torch.no_grad():
        t(**_inputs("one_cond", sigma=0.5, kv_cache=None))  # fine without the cache
        with pytest.raises(ValueError, match=r"condition images and the prefix KV cache is not supported.*"
                                             r"use_kv_cache=False"):
            t(**_inputs("one_cond", kv_cache=cache, kv_cache_mode="extract"))
        assert all(c.k is None for c in cache.layer_caches)  # refused before any block ran
        t(**_inputs("one_cond"))  # without the cache: fine
        t(**_inputs("t2i", kv_cache=QwenImage21KVCache(TINY["num_layers"]), kv_cache_mode="extract"))


def test_gamma_reverse_with_condition_images_is_refused_and_moot_without():
    t = _transformer()
    with torch.no_grad():
        with taca.enabled(t, gamma=GAMMA, gamma_reverse=1.5):
            with pytest.raises(NotImplementedError, match="gamma_reverse=1.5 with condition images"):
                t(**_inputs("one_cond"))
            rev = t(**_inputs("t2i", pad=[0, 2]))[0]  # text-to-image: no text query meets a visual key
        with taca.enabled(t, gamma=GAMMA):
            assert torch.equal(t(**_inputs("t2i", pad=[0, 2]))[0], rev)


class _Tok:
    def encode(self, s):
        return [7]


class _Processor:
    """The two things QwenImage21Pipeline.__init__ asks of its Qwen3-VL processor (no prompt is
    encoded here: the test passes prompt embeddings)."""

    tokenizer = _Tok()

    def apply_chat_template(self, *a, **k):
        return [[1, 2, 3]]


def _pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline

    return QwenImage21Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=None, text_encoder=None,
                               processor=_Processor(), transformer=_transformer())


# Qwen-Image 2.1's scheduler_config.json is not in diffusers and was not checked offline: Qwen/Qwen-Image's
# (as remembered, not checked offline) stands in, with the pipeline's default sigmas (sample_sigmas None).
SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                 base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")


def _pipe_window(steps, n_img):
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_shift

    sch = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    c = sch.config
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps),
                      mu=calculate_shift(n_img, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift))
    return window(sch.timesteps / 1000)


@pytest.mark.parametrize("hw", [(64, 96), (96, 64)])
def test_pipeline_true_cfg_kv_cache_unequal_prompts_and_window(monkeypatch, hw):
    """QwenImage21Pipeline (output_type="latent": no VAE), true CFG with a 7-token prompt and a
    4-token negative prompt, its KV cache on (step 0 prefills, later steps decode): the hook reads
    sigma on the host, the window is the paper rule's on the scheduler, every op call in it is the
    paper's definition, and gamma 1 is stock bit for bit."""
    pipe = _pipeline()
    steps = 8
    g = torch.Generator().manual_seed(0)
    kw = dict(prompt_embeds=torch.randn(1, 7, 24, generator=g), negative_prompt_embeds=torch.randn(1, 4, 24, generator=g),
              true_cfg_scale=4.0, height=hw[0], width=hw[1], num_inference_steps=steps, output_type="latent")
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    with taca.enabled(pipe, gamma=1.0, schedule="constant"):
        assert torch.equal(pipe(generator=torch.Generator().manual_seed(1), **kw).images, stock)
    cap = _Calls(monkeypatch)
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, k, o: seen.append(
        (k["encoder_hidden_states"].shape[1], k["kv_cache_mode"], get_handle(m).last_gamma, get_handle(m).last_path)),
        with_kwargs=True)
    with taca.enabled(pipe, gamma=GAMMA):
        out = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    hook.remove()
    n_img = (hw[0] // 16) * (hw[1] // 16)
    on = _pipe_window(steps, n_img)
    assert on and len(on) < steps
    assert [L for L, *_ in seen] == [7, 4] * steps and {p for *_, p in seen} == {"host"}
    assert [m for _, m, _, _ in seen] == ["extract"] * 2 + ["cached"] * (2 * steps - 2)
    assert [i for i in range(steps) if seen[2 * i][2] is not None] == on
    ops = [c for c in cap.calls if c[0] == "op"]
    assert len(ops) == 2 * TINY["num_layers"] * len(on)
    for j, (_, q, k, v, mask, okw, o) in enumerate(ops):
        L = 7 if (j // TINY["num_layers"]) % 2 == 0 else 4
        assert q.shape[1] == n_img and k.shape[1] == L + n_img and okw["text_len"] == L and mask is None
        key_text = torch.zeros(1, L + n_img, dtype=torch.bool)
        key_text[:, :L] = True
        expect = paper_attention_masks(q, k, v, key_text, torch.ones(1, n_img, dtype=torch.bool),
                                       torch.full((1,), GAMMA))
        torch.testing.assert_close(o.double(), expect, rtol=1e-5, atol=2e-6)
    assert not torch.equal(out, stock)


def qwenimage21_windows():
    """{(steps, image tokens): window} with the stand-in scheduler config and the pipeline's mu."""
    return {(steps, n): ranges(_pipe_window(steps, n)) for n in (4096, 6400) for steps in (20, 30, 40, 50)}


def test_window_steps_with_the_scheduler():
    assert qwenimage21_windows() == EXPECTED_WINDOWS


# (steps, image tokens: 1024x1024 and 1280x1280 at 16x16 pixels per token) -> steps with gamma
EXPECTED_WINDOWS = {(20, 4096): "0-1", (30, 4096): "0-1", (40, 4096): "0-2", (50, 4096): "0-2",
                    (20, 6400): "0-1", (30, 6400): "0-1", (40, 6400): "0-2", (50, 6400): "0-3"}


@pytest.mark.parametrize("name,pad", [("t2i", [0, 3]), ("two_conds", [0, 2])])
def test_gradient_checkpointing_keeps_the_call_state(name, pad):
    """The forward carries no attention kwargs: the hook hands each call's state (text segments,
    padded prompts' key mask) to the processors, and to the blocks recomputed in the backward pass
    through the checkpointing function."""
    check_checkpointing_keeps_state(_transformer, _inputs(name, pad=pad))
