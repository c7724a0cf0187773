"""Chroma (ChromaTransformer2DModel, FluxAttention with FluxAttnProcessor) with the
taca.models.chroma adapter, on tiny random-weight models. Chroma's pipelines always pass a FLOAT
0/1 outer-product mask that SDPA ADDS to the logits: with TACA on, the same mask is added after
scale and gamma (the stock numerics), never turned into a bool mask and never dropped."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("diffusers")

import taca
from taca.pipeline import get_handle

from model_checks import (check_checkpointing_keeps_state, Capture, StockCalls, check_against_paper,
                          check_disable_restores, check_outer_hint_routes, processors_of, ranges, window)

TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6), approximator_num_channels=16,
            approximator_hidden_dim=32, approximator_layers=1)
# lodestones/Chroma1-HD scheduler/scheduler_config.json: the FLUX.1 values (from the model card's
# config as remembered, not read offline here); the pipeline computes mu from them like FluxPipeline.
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096)


def _transformer():
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(0)
    return ChromaTransformer2DModel(**TINY).eval()


def _text_mask(B, L, valid):
    """ChromaPipeline's prompt mask: float, 1 up to and including the first padding token."""
    return (torch.arange(L)[None, :] <= torch.tensor(valid)[:, None]).float()


def _inputs(B, L, hw, valid=None, sigma=0.98, seed=1):
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    n = h * w
    img_ids = torch.cartesian_prod(torch.zeros(1), torch.arange(h).float(), torch.arange(w).float())
    kw = dict(hidden_states=torch.randn(B, n, 16, generator=g), encoder_hidden_states=torch.randn(B, L, 24, generator=g),
              timestep=torch.full((B,), sigma), img_ids=img_ids, txt_ids=torch.zeros(L, 3), return_dict=False)
    if valid is not None:  # as ChromaPipeline._prepare_attention_mask: float text part, bool image part
        kw["attention_mask"] = torch.cat([_text_mask(B, L, valid), torch.ones(B, n, dtype=torch.bool)], dim=1)
    return kw


def _stock_mask(kw):
    m = kw.get("attention_mask")
    return None if m is None else m[:, None, None, :] * m[:, None, :, None]


def _check_model(monkeypatch, B, L, hw, valid=None):
    import diffusers.models.transformers.transformer_flux as tf

    t = _transformer()
    stock = StockCalls(monkeypatch, tf)
    with torch.no_grad():
        t(**_inputs(B, L, hw, valid))
    monkeypatch.undo()
    cap = Capture(monkeypatch, shadow=True)
    with taca.enabled(t, gamma=1.3), torch.no_grad():
        t(**_inputs(B, L, hw, valid))
    n_calls = TINY["num_layers"] + TINY["num_single_layers"]
    assert len(cap.calls) == len(stock.calls) == n_calls
    mask = _stock_mask(_inputs(B, L, hw, valid))
    for (q, k, v, _, _), (sq, sk, sv, smask) in zip(cap.calls, stock.calls):
        assert torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv) and q.shape[1] == L + hw[0] * hw[1]
        assert (smask is None) == (mask is None)
        if mask is not None:
            assert smask.dtype == torch.float32 and torch.equal(smask, mask)
    check_against_paper(cap.calls, L, torch.full((B,), 1.3), None if mask is None else [mask] * n_calls)


@pytest.mark.parametrize("B,L,hw", [(2, 7, (3, 4)), (1, 12, (4, 5))])
def test_joint_calls_are_the_paper_definition_without_mask(monkeypatch, B, L, hw):
    _check_model(monkeypatch, B, L, hw)


@pytest.mark.parametrize("B,L,hw,valid", [(2, 9, (3, 4), [4, 8]), (1, 6, (4, 5), [2])])
def test_additive_mask_is_added_after_gamma(monkeypatch, B, L, hw, valid):
    _check_model(monkeypatch, B, L, hw, valid)


@pytest.mark.parametrize("valid", [None, [3, 6]])
@pytest.mark.parametrize("hw", [(3, 4), (5, 2)])
def test_outside_window_and_gamma_one_are_stock(valid, hw):
    t = _transformer()
    before = processors_of(t)
    with torch.no_grad():
        ref_in = t(**_inputs(2, 7, hw, valid, sigma=0.98))[0]
        ref_out = t(**_inputs(2, 7, hw, valid, sigma=0.5))[0]
        h = taca.enable(t, gamma=1.3)
        assert h.kind == "chroma" and {type(p).__name__ for p in h.processors.values()} == {"TacaFluxAttnProcessor"}
        assert torch.equal(t(**_inputs(2, 7, hw, valid, sigma=0.5))[0], ref_out) and h.last_gamma is None
        taca.enable(t, gamma=1.0, schedule="constant")
        assert torch.equal(t(**_inputs(2, 7, hw, valid, sigma=0.98))[0], ref_in)
        taca.disable(t)
    check_disable_restores(t, before)


def _pipeline():
    from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler

    return ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=None, text_encoder=None,
                          tokenizer=None, transformer=_transformer())


def _pipe_kwargs(hw, steps):
    g = torch.Generator().manual_seed(0)
    return dict(prompt_embeds=torch.randn(1, 9, 24, generator=g), prompt_attention_mask=_text_mask(1, 9, [5]),
                negative_prompt_embeds=torch.randn(1, 4, 24, generator=g),
                negative_prompt_attention_mask=_text_mask(1, 4, [1]), guidance_scale=4.0,
                height=hw[0], width=hw[1], num_inference_steps=steps, output_type="latent")


def test_pipeline_gamma_one_is_stock():
    pipe = _pipeline()
    kw = _pipe_kwargs((64, 48), 3)
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    with taca.enabled(pipe, gamma=1.0, schedule="constant"):
        assert torch.equal(pipe(generator=torch.Generator().manual_seed(1), **kw).images, stock)


@pytest.mark.parametrize("hw", [(64, 48), (48, 96)])
def test_pipeline_cfg_unequal_prompts_and_window(monkeypatch, hw):
    """ChromaPipeline with CFG (9-token prompt with 5 valid, 4-token negative with 1 valid): the
    window on the real scheduler, the host path, and every joint call in the window is the paper's
    definition with the pipeline's additive mask."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.chroma.pipeline_chroma import calculate_shift

    pipe = _pipeline()
    steps = 8
    kw = _pipe_kwargs(hw, steps)
    cap = Capture(monkeypatch)
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, k, o: seen.append(
        (k["encoder_hidden_states"].shape[1], get_handle(m).last_gamma, get_handle(m).last_path)), with_kwargs=True)
    with taca.enabled(pipe, gamma=1.3):
        pipe(generator=torch.Generator().manual_seed(1), **kw)
    hook.remove()
    n_img = (hw[0] // 16) * (hw[1] // 16)
    sch = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    c = sch.config
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps),
                      mu=calculate_shift(n_img, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift))
    on = window(sch.timesteps / 1000)
    assert on and [L for L, _, _ in seen] == [9, 4] * steps and {p for _, _, p in seen} == {"host"}
    assert [i for i in range(steps) if seen[2 * i][1] is not None] == on
    n_calls = TINY["num_layers"] + TINY["num_single_layers"]
    assert len(cap.calls) == 2 * n_calls * len(on)
    for j in range(0, len(cap.calls), n_calls):
        cond = (j // n_calls) % 2 == 0
        L, valid = (9, [5]) if cond else (4, [1])
        m = torch.cat([_text_mask(1, L, valid), torch.ones(1, n_img)], dim=1)
        check_against_paper(cap.calls[j : j + n_calls], L, torch.full((1,), 1.3),
                            [m[:, None, None, :] * m[:, None, :, None]] * n_calls)


def chroma_windows():
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.chroma.pipeline_chroma import calculate_shift

    out = {}
    for n_img in (4096, 1024):
        for steps in (26, 40, 50):
            sch = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
            c = sch.config
            mu = calculate_shift(n_img, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
            sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
            out[(steps, n_img)] = ranges(window(sch.timesteps / 1000))
    return out


def test_window_steps_with_the_real_scheduler():
    assert chroma_windows() == EXPECTED_WINDOWS


# (steps, image tokens) -> steps with gamma; 26: Chroma1-HD's suggested steps, 40/50: others
EXPECTED_WINDOWS = {(26, 4096): "0-2", (40, 4096): "0-3", (50, 4096): "0-4",
                    (26, 1024): "0-1", (40, 1024): "0-2", (50, 1024): "0-2"}


@pytest.mark.parametrize("valid", [None, [7, 4]])
def test_gradient_checkpointing_keeps_gamma_and_the_mask(valid):
    """diffusers 0.42.1's checkpointed blocks get no attention kwargs (no gamma) and the single
    blocks no mask: taca.enable hands both back, so output and gradients equal the plain forward's."""
    check_checkpointing_keeps_state(_transformer, _inputs(2, 9, (4, 4), valid=valid))


@pytest.mark.parametrize("B,L,hw,valid", [(2, 9, (3, 4), [4, 8]), (1, 6, (4, 5), [2])])
def test_token_mask_reaches_every_block_and_makes_its_mask(monkeypatch, B, L, hw, valid):
    """The adapter hands every joint call the transformer's (B, N) mask m (``token_mask``), and in every block, double-
    and single-stream, diffusers' mask is exactly m_i * m_j: what ``ops._outer_hint`` takes on trust after the
    first mask of each block kind (checked here for the installed diffusers, with gradient checkpointing's
    recomputation too)."""
    from taca.processors import TacaProcessor

    seen = []
    orig = TacaProcessor.taca_attention

    def spy(self, q, k, v, text_len, gamma, attn_mask=None, **kw):
        seen.append((self.name, attn_mask, kw.get("token_mask")))
        return orig(self, q, k, v, text_len, gamma, attn_mask, **kw)

    monkeypatch.setattr(TacaProcessor, "taca_attention", spy)
    t = _transformer()
    kw = _inputs(B, L, hw, valid)
    with taca.enabled(t, gamma=1.3), torch.no_grad():
        t(**kw)
    assert len(seen) == TINY["num_layers"] + TINY["num_single_layers"]
    assert {name.split(".")[0] for name, _, _ in seen} == {"transformer_blocks", "single_transformer_blocks"}
    for name, mask, tok in seen:
        assert tok is kw["attention_mask"], name
        assert torch.equal(mask, tok[:, None, None, :] * tok[:, None, :, None]), name
    # training: the checkpointed blocks get the token mask too (the adapter puts the dropped kwargs back)
    seen.clear()
    t.train()
    t.enable_gradient_checkpointing()
    kw = _inputs(B, L, hw, valid)
    kw["hidden_states"].requires_grad_()
    with taca.enabled(t, gamma=1.3):
        t(**kw)[0].sum().backward()
    assert len(seen) == 2 * (TINY["num_layers"] + TINY["num_single_layers"])  # forward and recomputation
    assert all(tok is kw["attention_mask"] for _, _, tok in seen)


def test_blocks_masks_checked_once_per_kind(monkeypatch, spy):
    """With the mask routes on (CUDA's; here the CPU's): every block's mask takes the outer-product route, one mask
    per block kind is read over two calls with the same mask, the output unchanged."""
    t = _transformer()
    kw = _inputs(2, 9, (4, 4), [4, 8])
    check_outer_hint_routes(monkeypatch, spy, t, lambda: t(**kw)[0], n_calls=TINY["num_layers"] + TINY["num_single_layers"],
                            n_kinds=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_blocks_masks_checked_once_per_kind(spy):
    """On CUDA (bf16, a padded CFG-like batch): the blocks' outer-product masks run on the key-mask kernel, the
    check reading one mask per block kind and call; the transformer's output by the tolerance rule's spirit against
    the same model with TACA as split SDPA (backend="sdpa"), gradients finite."""
    from taca import ops

    if not ops.HAVE_CUDA_KERNEL:
        pytest.skip("taca._C built without CUDA kernels")
    checks = spy(ops, "_outer_mask_result")  # reached once a mask was read whole (not by lookups of entered masks)
    t = _transformer().cuda().to(torch.bfloat16)
    kw = _inputs(2, 40, (12, 12), [9, 30])
    kw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    for k in ("hidden_states", "encoder_hidden_states"):
        kw[k] = kw[k].to(torch.bfloat16)
    with taca.enabled(t, gamma=1.3), torch.no_grad():
        out = t(**kw)[0]
    assert len(checks) == 2  # double- and single-stream blocks: one check each, the other masks taken
    with taca.enabled(t, gamma=1.3, backend="sdpa"), torch.no_grad():
        ref = t(**kw)[0]
    err = (out.float() - ref.float()).norm() / ref.float().norm()
    assert err < 2e-2, err
