"""JoyImage Edit (JoyImageEditTransformer3DModel: [img items (target first, then references), txt], no
mask) and JoyImage Edit Plus (JoyImageEditPlusTransformer3DModel: [target + reference patches padded to
max_patches, txt], bool key mask on padded slots and text) with the taca.models.joyimage adapters, on
tiny random-weight models: every joint attention call inside the window is the paper's definition on
the stock q, k, v (reference queries visual, text the last encoder_hidden_states.shape[1] tokens, the
stock mask), outside the window and at gamma = 1 the models are stock bit for bit (2 resolutions);
JoyImageEditPipeline (text to image and editing with a tiny Wan VAE) and JoyImageEditPlusPipeline with
CFG and prompts of different lengths."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import taca
from taca.pipeline import get_handle

from model_checks import (Capture, StockCalls, check_disable_restores, check_spans_against_paper, processors_of,
                          ranges, span_mask, window)
from model_checks import check_checkpointing_keeps_state

N_LAYERS = 2
TINY = dict(patch_size=[1, 2, 2], in_channels=4, hidden_size=32, num_attention_heads=2, text_dim=24,
            num_layers=N_LAYERS, rope_dim_list=[4, 6, 6])


def _edit(seed=0, **over):
    from diffusers import JoyImageEditTransformer3DModel

    torch.manual_seed(seed)
    t = JoyImageEditTransformer3DModel(**{**TINY, **over}).eval()
    _randomize_modulation(t)
    return t


def _plus(seed=0):
    from diffusers import JoyImageEditPlusTransformer3DModel

    torch.manual_seed(seed)
    t = JoyImageEditPlusTransformer3DModel(**TINY).eval()
    _randomize_modulation(t)
    return t


def _randomize_modulation(t):
    # the learnable modulation tables are zero-initialized; random ones keep every block's gates open
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in t.named_parameters():
            if n.endswith("modulate_table"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _text_last(B, N, L):
    text = span_mask(B, N, N - L, L)
    return text, ~text


# --- JoyImage Edit ---------------------------------------------------------------------------


def _edit_inputs(items, hw, L, t=980.0, seed=1, B=2):
    """items 0: one 5-D latent (text to image); n >= 1: (B, n, C, 1, H, W), the target last (the
    pipeline's order: references, then the target)."""
    g = torch.Generator().manual_seed(seed)
    shape = (B, 4, 1, *hw) if items == 0 else (B, items, 4, 1, *hw)
    return dict(hidden_states=torch.randn(*shape, generator=g), timestep=torch.full((B,), t),
                encoder_hidden_states=torch.randn(B, L, 24, generator=g), return_dict=False)


@pytest.mark.parametrize("items,hw,L,rope_type", [
    (0, (6, 8), 7, "rope"), (1, (4, 10), 5, "rope"), (2, (6, 8), 7, "rope"), (3, (4, 10), 5, "rope"),
    (0, (4, 10), 5, "mrope"), (2, (6, 8), 7, "mrope"),
])
def test_edit_joint_calls_are_the_paper_definition(monkeypatch, items, hw, L, rope_type):
    """Every block: queries of the target AND the reference items get gamma on the L text keys (the
    last L tokens); no mask, as stock; q, k, v are the stock ones bit for bit."""
    import diffusers.models.transformers.transformer_joyimage as tj

    t = _edit(rope_type=rope_type)
    stock = StockCalls(monkeypatch, tj)
    with torch.no_grad():
        t(**_edit_inputs(items, hw, L))
    monkeypatch.undo()
    cap = Capture(monkeypatch, shadow=True)
    with taca.enabled(t, gamma=1.3), torch.no_grad():
        t(**_edit_inputs(items, hw, L))
    assert len(stock.calls) == len(cap.calls) == N_LAYERS
    n_img = max(items, 1) * (hw[0] // 2) * (hw[1] // 2)
    N = n_img + L
    for (q, k, v, kw, _), (sq, sk, sv, smask) in zip(cap.calls, stock.calls):
        assert torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv) and smask is None
        assert q.shape == (2, N, 2, 16) and kw["text_len"] == L and kw["text_first"] is False
    text, visual = _text_last(2, N, L)
    check_spans_against_paper(cap.calls, text, visual, torch.full((2,), 1.3))


@pytest.mark.parametrize("items", [0, 2])
@pytest.mark.parametrize("hw", [(6, 8), (4, 10)])
def test_edit_outside_window_and_gamma_one_are_stock(items, hw):
    t = _edit()
    before = processors_of(t)
    with torch.no_grad():
        ref_in = t(**_edit_inputs(items, hw, 7, t=980.0))[0]
        ref_out = t(**_edit_inputs(items, hw, 7, t=500.0))[0]
        h = taca.enable(t, gamma=1.3)
        assert h.kind == "joyimage" and sorted(h.processors) == [f"double_blocks.{i}.attn" for i in range(N_LAYERS)]
        assert torch.equal(t(**_edit_inputs(items, hw, 7, t=500.0))[0], ref_out) and h.last_gamma is None
        assert not torch.equal(t(**_edit_inputs(items, hw, 7, t=980.0))[0], ref_in)
        assert torch.allclose(h.last_gamma, torch.full((2,), 1.3))
        taca.enable(t, gamma=1.0, schedule="constant")
        assert torch.equal(t(**_edit_inputs(items, hw, 7, t=980.0))[0], ref_in)
        taca.disable(t)
    check_disable_restores(t, before)
    assert all(type(p).__name__ == "JoyImageAttnProcessor" for p in processors_of(t).values())


def test_edit_sigma_rule_on_t1000():
    """t = 1000 sigma: t 970 is in the window, 969 is not."""
    t = _edit()
    with taca.enabled(t, gamma=1.3) as h, torch.no_grad():
        t(**_edit_inputs(0, (4, 4), 3, t=970.0))
        assert h.last_gamma is not None
        t(**_edit_inputs(0, (4, 4), 3, t=969.0))
        assert h.last_gamma is None


# --- JoyImage Edit Plus ----------------------------------------------------------------------


def _plus_inputs(shape_lists, L, valid=None, t=980.0, seed=1):
    """shape_lists: per sample [(t, h, w) of the target, then of each reference] in patches; the
    patch sequence is padded to the longest sample. valid: per-sample valid text lengths (a mask),
    or None (no mask)."""
    g = torch.Generator().manual_seed(seed)
    B = len(shape_lists)
    n = [sum(a * b * c for a, b, c in s) for s in shape_lists]
    P = max(n)
    hs = torch.zeros(B, P, 4, 1, 2, 2)
    for i in range(B):
        hs[i, : n[i]] = torch.randn(n[i], 4, 1, 2, 2, generator=g)
    kw = dict(hidden_states=hs, timestep=torch.full((B,), t), encoder_hidden_states=torch.randn(B, L, 24, generator=g),
              shape_list=shape_lists, return_dict=False)
    if valid is not None:
        kw["encoder_hidden_states_mask"] = (torch.arange(L)[None, :] < torch.tensor(valid)[:, None]).long()
    return kw, n, P


PLUS_CASES = [
    ([[(1, 3, 4), (1, 2, 2)], [(1, 3, 4)]], 7, [7, 4]),  # a reference in one sample only: padded slots
    ([[(1, 2, 5), (1, 3, 3)], [(1, 2, 5), (1, 2, 2)]], 6, [3, 6]),
    ([[(1, 3, 4)], [(1, 3, 4)]], 5, None),  # no mask
    ([[(1, 3, 4), (1, 2, 2)], [(1, 3, 4)]], 7, None),  # padded slots, no mask: attended as stock
]


@pytest.mark.parametrize("shapes,L,valid", PLUS_CASES)
def test_edit_plus_joint_calls_are_the_paper_definition(monkeypatch, shapes, L, valid):
    """Target and reference patches (and the padded slots: image-stream queries) get gamma on the L
    text keys; the stock bool key mask removes padded slots and padded text."""
    import diffusers.models.transformers.transformer_joyimage_edit_plus as tp_

    t = _plus()
    kw, n, P = _plus_inputs(shapes, L, valid)
    stock = StockCalls(monkeypatch, tp_)
    with torch.no_grad():
        t(**kw)
    monkeypatch.undo()
    cap = Capture(monkeypatch, shadow=True)
    with taca.enabled(t, gamma=1.3), torch.no_grad():
        t(**_plus_inputs(shapes, L, valid)[0])
    assert len(stock.calls) == len(cap.calls) == N_LAYERS
    B, N = len(shapes), P + L
    mask = None
    if valid is not None:
        keep = torch.cat([torch.arange(P)[None, :] < torch.tensor(n)[:, None],
                          torch.arange(L)[None, :] < torch.tensor(valid)[:, None]], dim=1)
        mask = keep[:, None, None, :]
    for (q, k, v, kw_, _), (sq, sk, sv, smask) in zip(cap.calls, stock.calls):
        assert torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv)
        assert (smask is None) == (mask is None) and (mask is None or torch.equal(smask, mask))
        assert kw_["text_len"] == L and kw_["text_first"] is False
    text, visual = _text_last(B, N, L)
    check_spans_against_paper(cap.calls, text, visual, torch.full((B,), 1.3), masks=mask)


@pytest.mark.parametrize("shapes,L,valid", PLUS_CASES[:2])
def test_edit_plus_outside_window_and_gamma_one_are_stock(shapes, L, valid):
    t = _plus()
    before = processors_of(t)
    run = lambda tt: t(**_plus_inputs(shapes, L, valid, t=tt)[0])[0]  # noqa: E731
    with torch.no_grad():
        ref_in, ref_out = run(980.0), run(500.0)
        h = taca.enable(t, gamma=1.3)
        assert h.kind == "joyimage_edit_plus"
        assert sorted(h.processors) == [f"double_blocks.{i}.attn" for i in range(N_LAYERS)]
        assert torch.equal(run(500.0), ref_out) and h.last_gamma is None
        assert not torch.equal(run(980.0), ref_in)
        taca.enable(t, gamma=1.0, schedule="constant")
        assert torch.equal(run(980.0), ref_in)
        taca.disable(t)
    check_disable_restores(t, before)
    assert all(type(p).__name__ == "JoyImageEditPlusAttnProcessor" for p in processors_of(t).values())


# --- pipelines -------------------------------------------------------------------------------

# patch 16 x 16 on the latent: the pipelines snap sizes to 1024-pixel buckets (128 x 128 latents), so
# the tiny pipeline models keep the token count small with big patches
PIPE_TINY = dict(TINY, patch_size=[1, 16, 16])


def _tiny_vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                            latents_std=[1.5, 0.5, 1.0, 2.0]).eval()


def _edit_pipeline(vae=None):
    from diffusers import FlowMatchEulerDiscreteScheduler, JoyImageEditPipeline, JoyImageEditTransformer3DModel

    torch.manual_seed(0)
    t = JoyImageEditTransformer3DModel(**PIPE_TINY).eval()
    _randomize_modulation(t)
    return JoyImageEditPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=None,
                                tokenizer=None, transformer=t, processor=None)


def _embeds(B, L, valid, seed):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(L)[None, :] < torch.tensor(valid)[:, None]).long()
    return torch.randn(B, L, 24, generator=g) * mask[..., None], mask


def _run_windowed(monkeypatch, pipe, kw, steps):
    """(gamma per transformer call, captured calls, window steps); checks gamma 1 = stock and that
    TACA changed the output. The global seed is reset per call: the edit pipeline's VAE samples its
    reference latents without the generator."""
    torch.manual_seed(0)
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    with taca.enabled(pipe, gamma=1.0, schedule="constant"):
        torch.manual_seed(0)
        assert torch.equal(pipe(generator=torch.Generator().manual_seed(1), **kw).images, stock)
    cap = Capture(monkeypatch)
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, k, o: seen.append(get_handle(m).last_gamma),
                                                  with_kwargs=True)
    with taca.enabled(pipe, gamma=1.3) as h:
        torch.manual_seed(0)
        out = pipe(generator=torch.Generator().manual_seed(1), **kw).images
        assert h.last_path == "sync"  # the pipelines pass a fresh t.repeat(B)
    hook.remove()
    sch = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sch.set_timesteps(steps)
    on = window(sch.timesteps / 1000)
    assert on and on != list(range(steps))
    assert not torch.equal(out, stock)
    return seen, cap, on


@pytest.mark.parametrize("size,tokens", [((1024, 1024), 64), ((768, 1280), 60)])
def test_edit_pipeline_text_to_image_cfg(monkeypatch, size, tokens):
    """JoyImageEditPipeline without an image (one item): CFG runs the prompt (7 of 9 tokens valid) and
    the negative prompt (4 of 6) as separate forwards; each is the paper's definition with its own
    whole text block (no mask reaches attention), inside the paper rule's window only."""
    pipe = _edit_pipeline()
    steps = 4
    pe, pm = _embeds(1, 9, [7], 2)
    ne, nm = _embeds(1, 6, [4], 3)
    kw = dict(prompt_embeds=pe, prompt_embeds_mask=pm, negative_prompt_embeds=ne, negative_prompt_embeds_mask=nm,
              height=size[0], width=size[1], num_inference_steps=steps, guidance_scale=4.0, output_type="latent")
    seen, cap, on = _run_windowed(monkeypatch, pipe, kw, steps)
    assert len(seen) == 2 * steps and [i for i in range(steps) if seen[2 * i] is not None] == on
    assert len(cap.calls) == 2 * N_LAYERS * len(on)
    for j in range(0, len(cap.calls), N_LAYERS):
        L = 9 if (j // N_LAYERS) % 2 == 0 else 6
        text, visual = _text_last(1, tokens + L, L)
        check_spans_against_paper(cap.calls[j : j + N_LAYERS], text, visual, torch.full((1,), 1.3))


def test_edit_pipeline_with_a_reference_image(monkeypatch):
    """JoyImageEditPipeline editing (a tiny Wan VAE encodes the reference): two items, reference and
    target queries both visual, CFG with prompts of 9 and 6 tokens."""
    from PIL import Image

    pipe = _edit_pipeline(_tiny_vae())
    # the pipeline snaps sizes to 1024-pixel buckets; 256 x 256 here keeps the tiny VAE fast on the CPU
    # (resolution choice only: 2 x 2 tokens per item with the 16 x 16 patches)
    pipe.vae_image_processor.get_default_height_width = lambda image, height=None, width=None: (256, 256)
    steps = 4
    img = Image.fromarray((np.random.default_rng(0).random((300, 200, 3)) * 255).astype(np.uint8))
    pe, pm = _embeds(1, 9, [9], 2)
    ne, nm = _embeds(1, 6, [6], 3)
    kw = dict(image=img, prompt_embeds=pe, prompt_embeds_mask=pm, negative_prompt_embeds=ne,
              negative_prompt_embeds_mask=nm, num_inference_steps=steps, guidance_scale=4.0, output_type="latent")
    seen, cap, on = _run_windowed(monkeypatch, pipe, kw, steps)
    assert len(cap.calls) == 2 * N_LAYERS * len(on)
    for j in range(0, len(cap.calls), N_LAYERS):
        L = 9 if (j // N_LAYERS) % 2 == 0 else 6
        text, visual = _text_last(1, 2 * 4 + L, L)  # two items (reference, target) of 2 x 2 tokens
        check_spans_against_paper(cap.calls[j : j + N_LAYERS], text, visual, torch.full((1,), 1.3))


def _plus_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, JoyImageEditPlusPipeline, JoyImageEditPlusTransformer3DModel

    torch.manual_seed(0)
    t = JoyImageEditPlusTransformer3DModel(**TINY).eval()
    _randomize_modulation(t)
    return JoyImageEditPlusPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
                                    text_encoder=None, tokenizer=None, transformer=t, processor=None)


@pytest.mark.parametrize("size", [(48, 64), (64, 32)])
def test_edit_plus_pipeline_cfg_batch_with_masks(monkeypatch, size):
    """JoyImageEditPlusPipeline (no reference image) with two prompts (7 and 3 of 8 tokens valid) and
    their default negatives (2 and 5 of 5): one CFG batch [negatives, prompts] padded to 8 tokens, the
    model's key mask per row; every call in the window is the paper's definition with that mask. The
    Qwen3-VL encoding is stubbed (no text encoder built; the pipeline's prompt_embeds path cannot run
    without a prompt in diffusers 0.42.1: it formats ``prompt`` even when it is None)."""
    pipe = _plus_pipeline()
    steps = 4
    pe, pm = _embeds(2, 8, [7, 3], 2)
    ne, nm = _embeds(2, 5, [2, 5], 3)
    asked = []

    def encode(prompt, images=None, device=None, max_sequence_length=None, **_):
        asked.append(list(prompt))
        negative = all(p.endswith("user\n <|im_end|>\n") for p in prompt)  # the pipeline's default negatives
        return (ne, nm) if negative else (pe, pm)

    pipe.encode_prompt_multiple_images = encode
    kw = dict(prompt=["a red cube", "a cat"], height=size[0], width=size[1], num_inference_steps=steps,
              guidance_scale=4.0, output_type="latent")
    seen, cap, on = _run_windowed(monkeypatch, pipe, kw, steps)
    assert asked[:2] == [["<|im_start|>user\na red cube<|im_end|>\n", "<|im_start|>user\na cat<|im_end|>\n"],
                         ["<|im_start|>user\n <|im_end|>\n"] * 2]
    assert len(seen) == steps and [i for i in range(steps) if seen[i] is not None] == on
    assert len(cap.calls) == N_LAYERS * len(on)
    P = (size[0] // 16) * (size[1] // 16)
    keep = torch.cat([torch.ones(4, P, dtype=torch.bool),
                      torch.arange(8)[None, :] < torch.tensor([2, 5, 7, 3])[:, None]], dim=1)
    text, visual = _text_last(4, P + 8, 8)
    check_spans_against_paper(cap.calls, text, visual, torch.full((4,), 1.3), masks=keep[:, None, None, :])


def joyimage_windows():
    """Windows of the paper's rule on the pipelines' default schedule (set_timesteps(steps), no mu:
    the checkpoints' FlowMatchEulerDiscreteScheduler config is NOT known here, so shift 1 and 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    out = {}
    for shift in (1.0, 3.0):
        for steps in (28, 40, 50):
            sch = FlowMatchEulerDiscreteScheduler(shift=shift)
            sch.set_timesteps(steps)
            out[(shift, steps)] = ranges(window(sch.timesteps / 1000))
    return out


def test_window_steps_with_the_real_scheduler():
    assert joyimage_windows() == EXPECTED_WINDOWS


EXPECTED_WINDOWS = {(1.0, 28): "0", (1.0, 40): "0-1", (1.0, 50): "0-1",
                    (3.0, 28): "0-2", (3.0, 40): "0-3", (3.0, 50): "0-4"}


@pytest.mark.parametrize("items", [0, 2])
def test_edit_gradient_checkpointing_keeps_the_call_state(items):
    """The forward carries no attention kwargs: the hook hands each call's state to the processors,
    and to the blocks recomputed in the backward pass through the checkpointing function, reference
    images included (t = 1000 sigma)."""
    check_checkpointing_keeps_state(_edit, _edit_inputs(items, (4, 4), 5))


@pytest.mark.parametrize("shapes,L,valid", [PLUS_CASES[0], PLUS_CASES[3]])
def test_edit_plus_gradient_checkpointing_keeps_the_call_state(shapes, L, valid):
    """Edit Plus: the same, with per-sample references (padded slots) and the padded prompts' mask."""
    check_checkpointing_keeps_state(_plus, _plus_inputs(shapes, L, valid)[0])
