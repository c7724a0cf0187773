"""Motif-Video (MotifVideoTransformer3DModel) with the taca.models.motif_video adapter, on tiny
random-weight models: [video, image_embeds, txt] in dual- and single-stream blocks; the SigLIP
image-embed tokens are visual (their queries get gamma on the text keys, they are not text keys);
the model's per-token bool key mask is kept; the "decoder" single layers (video context, no mask) and
the optional text cross-attention (its own softmax over text keys only) stay stock. In the window
every joint call is the paper's definition, outside it and at gamma = 1 the model is stock bit for
bit; MotifVideoPipeline (CFG through the guider, padded prompts of different valid lengths) and
MotifVideoImage2VideoPipeline (with SigLIP image embeddings) at two resolutions."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import taca
from taca.pipeline import get_handle

from model_checks import (Capture, StockCalls, check_disable_restores, check_spans_against_paper,
                          processors_of, ranges, span_mask, window)
from model_checks import check_checkpointing_keeps_state

BASE = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
            num_single_layers=2, patch_size=1, patch_size_t=1, text_embed_dim=24, image_embed_dim=12,
            rope_axes_dim=(4, 6, 6))
# the decoder variant: one encoder and one decoder single layer, text cross-attention in every block
# that has text; call order per forward: dual (joint, cross) x 2, single encoder (joint, cross), decoder
DECODER = dict(BASE, num_single_layers=2, num_decoder_layers=1, enable_text_cross_attention_dual=True,
               enable_text_cross_attention_single=True)
N_IMG = 3


def _transformer(cfg=BASE):
    from diffusers import MotifVideoTransformer3DModel

    torch.manual_seed(0)
    return MotifVideoTransformer3DModel(**cfg).eval()


def _inputs(valid, L, fhw, step=980.0, image=True, mask=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    B = len(valid)
    kw = dict(hidden_states=torch.randn(B, 4, *fhw, generator=g), timestep=torch.full((B,), step),
              encoder_hidden_states=torch.randn(B, L, 24, generator=g), return_dict=False)
    if mask:
        kw["encoder_attention_mask"] = (torch.arange(L)[None, :] < torch.tensor(valid)[:, None]).float()
    if image:
        kw["image_embeds"] = torch.randn(B, N_IMG, 12, generator=g)
    return kw


def _stock_mask(valid, L, n_vis, n_img):
    """The model's mask: True on video and image keys and on each sample's valid text tokens."""
    N = n_vis + n_img + L
    j = torch.arange(N)[None, :]
    return ((j < n_vis + n_img) | (j < (n_vis + n_img + torch.tensor(valid))[:, None]))[:, None, None, :]


CASES = [  # valid lengths, L, (F, H, W), image_embeds, encoder_attention_mask
    ([7, 4], 7, (2, 3, 2), True, True),
    ([5], 5, (1, 4, 4), True, False),
    ([2, 6], 6, (2, 2, 3), False, True),
]


@pytest.mark.parametrize("valid,L,fhw,image,mask", CASES)
def test_joint_calls_are_the_paper_definition(monkeypatch, valid, L, fhw, image, mask):
    import diffusers.models.transformers.transformer_motif_video as tm

    t = _transformer()
    stock = StockCalls(monkeypatch, tm)
    with torch.no_grad():
        t(**_inputs(valid, L, fhw, image=image, mask=mask))
    monkeypatch.undo()
    cap = Capture(monkeypatch, shadow=True)
    with taca.enabled(t, gamma=1.3), torch.no_grad():
        t(**_inputs(valid, L, fhw, image=image, mask=mask))
    n_joint = BASE["num_layers"] + BASE["num_single_layers"]
    assert len(stock.calls) == len(cap.calls) == n_joint
    n_vis, n_img, B = fhw[0] * fhw[1] * fhw[2], (N_IMG if image else 0), len(valid)
    m = _stock_mask(valid, L, n_vis, n_img) if mask else None
    for (q, k, v, kw, _), (sq, sk, sv, smask) in zip(cap.calls, stock.calls):
        assert torch.equal(q, sq) and torch.equal(k, sk) and torch.equal(v, sv) and q.shape[1] == n_vis + n_img + L
        assert (smask is None and m is None) or torch.equal(smask, m)
        assert kw["text_first"] is False and kw["text_len"] == L
    text = span_mask(B, n_vis + n_img + L, n_vis + n_img, L)
    # the image-embed queries are visual (gamma on their text logits); they are not text keys
    assert (~text[:, : n_vis + n_img]).all()
    check_spans_against_paper(cap.calls, text, ~text, torch.full((B,), 1.3), masks=m)


def test_decoder_layers_and_cross_attention_stay_stock(monkeypatch):
    import diffusers.models.transformers.transformer_motif_video as tm

    valid, L, fhw = [7, 4], 7, (2, 3, 2)
    t = _transformer(DECODER)
    stock = StockCalls(monkeypatch, tm)
    with torch.no_grad():
        ref = t(**_inputs(valid, L, fhw))[0]
    monkeypatch.undo()
    assert len(stock.calls) == 7  # J C J C J C D
    joint, kept = [0, 2, 4], [1, 3, 5, 6]
    h = taca.enable(t, gamma=1.3)
    assert sorted(h.processors) == ["single_transformer_blocks.0.attn", "transformer_blocks.0.attn",
                                    "transformer_blocks.1.attn"]
    types = {n: type(m.processor).__name__ for n, m in t.named_modules() if hasattr(m, "set_processor")}
    assert types["single_transformer_blocks.1.attn"] == "MotifVideoAttnProcessor2_0"  # the decoder layer
    assert {types[n] for n in types if n.endswith("cross_attn")} == {"MotifVideoCrossAttnProcessor2_0"}
    cap = Capture(monkeypatch, shadow=True)
    rest = StockCalls(monkeypatch, tm)  # the stock processors still call the model file's dispatch
    with torch.no_grad():
        shadowed = t(**_inputs(valid, L, fhw))[0]
    taca.disable(t)
    assert len(cap.calls) == 3 and len(rest.calls) == 4
    for (q, k, v, _, _), i in zip(cap.calls, joint):
        assert torch.equal(q, stock.calls[i][0]) and torch.equal(k, stock.calls[i][1])
    for got, i in zip(rest.calls, kept):  # cross-attention and the decoder layer: the stock calls
        want = stock.calls[i]
        assert all(torch.equal(a, b) for a, b in zip(got[:3], want[:3]))
        assert (got[3] is None and want[3] is None) or torch.equal(got[3], want[3])
    assert rest.calls[-1][3] is None and rest.calls[-1][1].shape[1] == 2 * 12  # decoder: video x video
    assert torch.equal(shadowed, ref)
    n_vis = 12
    text = span_mask(2, n_vis + N_IMG + L, n_vis + N_IMG, L)
    check_spans_against_paper(cap.calls, text, ~text, torch.full((2,), 1.3),
                              masks=_stock_mask(valid, L, n_vis, N_IMG))


@pytest.mark.parametrize("cfg", [BASE, DECODER], ids=["base", "decoder"])
@pytest.mark.parametrize("valid,fhw", [([7, 4], (2, 3, 2)), ([6], (1, 4, 3))])
def test_outside_window_and_gamma_one_are_stock(cfg, valid, fhw):
    t = _transformer(cfg)
    before = processors_of(t)
    with torch.no_grad():
        ref_in = t(**_inputs(valid, 7, fhw, 980.0))[0]
        ref_out = t(**_inputs(valid, 7, fhw, 500.0))[0]
        h = taca.enable(t, gamma=1.3)
        assert h.kind == "motif_video"
        assert torch.equal(t(**_inputs(valid, 7, fhw, 500.0))[0], ref_out) and h.last_gamma is None
        assert not torch.equal(t(**_inputs(valid, 7, fhw, 980.0))[0], ref_in)
        taca.enable(t, gamma=1.0, schedule="constant")
        assert torch.equal(t(**_inputs(valid, 7, fhw, 980.0))[0], ref_in)
        taca.disable(t)
    check_disable_restores(t, before)


# --- pipelines: tiny Wan VAE, CFG through the guider, prompt embeddings given -------------------------

Z = 4
PIPE_CFG = dict(BASE, in_channels=2 * Z + 1, out_channels=Z, patch_size=2)
N_PIPE_JOINT = PIPE_CFG["num_layers"] + PIPE_CFG["num_single_layers"]
N_SIGLIP = 4  # 16x16 image, patch 8
# Motif-Technologies/Motif-Video-2B's scheduler config is NOT checked offline here. The pipelines pass
# sigmas linspace(1, 1/N, N) and mu; these windows are for FlowMatchEulerDiscreteScheduler with static
# shift (use_dynamic_shifting off): shift 1.0 (diffusers' default, which a third-party repo reports the
# shipped config amounts to) and shift 15.0 (the flow_shift that repo reports the model was trained at).
SHIFTS = (1.0, 15.0)


class _VisionOnlyEncoder(torch.nn.Module):
    """The I2V pipeline reads SigLIP from ``text_encoder.vision_tower``; prompts arrive as embeddings."""

    def __init__(self):
        super().__init__()
        from transformers import SiglipVisionConfig, SiglipVisionModel

        self.vision_tower = SiglipVisionModel(SiglipVisionConfig(
            hidden_size=12, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=16,
            patch_size=8)).eval()

    @property
    def device(self):  # what DiffusionPipeline.device reads from every component
        return next(self.parameters()).device

    @property
    def dtype(self):
        return next(self.parameters()).dtype


def _pipeline(i2v=False, shift=1.0):
    from diffusers import (AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, MotifVideoImage2VideoPipeline,
                           MotifVideoPipeline)
    from diffusers.guiders import ClassifierFreeGuidance

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=Z, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           latents_mean=[0.0] * Z, latents_std=[1.0] * Z).eval()
    common = dict(scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=vae, tokenizer=None,
                  transformer=_transformer(PIPE_CFG), guider=ClassifierFreeGuidance(guidance_scale=5.0))
    if not i2v:
        return MotifVideoPipeline(text_encoder=None, **common)
    from transformers import SiglipImageProcessor

    return MotifVideoImage2VideoPipeline(text_encoder=_VisionOnlyEncoder(),
                                         feature_extractor=SiglipImageProcessor(size={"height": 16, "width": 16}),
                                         **common)


def _pipe_kwargs(hw, steps, i2v=False):
    """CFG: prompt 7 tokens (5 valid), negative 7 tokens (2 valid); 5 frames -> 2 latent frames."""
    g = torch.Generator().manual_seed(0)
    kw = dict(prompt_embeds=torch.randn(1, 7, 24, generator=g), prompt_attention_mask=(torch.arange(7) < 5)[None].long(),
              negative_prompt_embeds=torch.randn(1, 7, 24, generator=g),
              negative_prompt_attention_mask=(torch.arange(7) < 2)[None].long(),
              height=hw[0], width=hw[1], num_frames=5, num_inference_steps=steps, output_type="latent")
    if i2v:
        kw.update(image=torch.rand(1, 3, *hw, generator=g), prompt=None)
    return kw


def _sigmas(steps, shift=1.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(shift=shift)
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))
    return sch.timesteps / 1000


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
def test_pipeline_gamma_one_is_stock(i2v):
    pipe = _pipeline(i2v)
    kw = _pipe_kwargs((32, 48), 3, i2v)
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).frames
    with taca.enabled(pipe, gamma=1.0, schedule="constant"):
        assert torch.equal(pipe(generator=torch.Generator().manual_seed(1), **kw).frames, stock)


@pytest.mark.parametrize("hw", [(32, 48), (48, 32)])
@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
def test_pipeline_cfg_and_window(monkeypatch, i2v, hw):
    shift = 15.0
    pipe = _pipeline(i2v, shift)
    steps = 4  # shift 15: sigma 1, 0.75 in the window; 0.5, 0.25 out
    kw = _pipe_kwargs(hw, steps, i2v)
    stock = pipe(generator=torch.Generator().manual_seed(1), **kw).frames
    cap = Capture(monkeypatch)
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, k, o: seen.append(
        (get_handle(m).last_gamma, get_handle(m).last_path, (k.get("image_embeds") is not None))), with_kwargs=True)
    with taca.enabled(pipe, gamma=1.3):
        out = pipe(generator=torch.Generator().manual_seed(1), **kw).frames
    hook.remove()
    on = window(_sigmas(steps, shift))
    assert on and on != list(range(steps)) and len(seen) == 2 * steps and {p for _, p, _ in seen} == {"host"}
    assert {e for *_, e in seen} == {i2v}
    assert [i for i in range(steps) if seen[2 * i][0] is not None] == on
    assert len(cap.calls) == 2 * N_PIPE_JOINT * len(on)
    n_vis = 2 * (hw[0] // 16) * (hw[1] // 16)  # 2 latent frames, 8x VAE, patch 2
    n_img = N_SIGLIP if i2v else 0
    N = n_vis + n_img + 7
    text = span_mask(1, N, n_vis + n_img, 7)
    for j in range(0, len(cap.calls), N_PIPE_JOINT):
        valid = [5] if (j // N_PIPE_JOINT) % 2 == 0 else [2]  # the guider's cond, then uncond call
        check_spans_against_paper(cap.calls[j : j + N_PIPE_JOINT], text, ~text, torch.full((1,), 1.3),
                                  masks=_stock_mask(valid, 7, n_vis, n_img))
    assert not torch.equal(out, stock)


def motif_video_windows():
    return {(shift, steps): ranges(window(_sigmas(steps, shift))) for shift in SHIFTS for steps in (30, 50)}


def test_window_steps_with_the_real_scheduler():
    assert motif_video_windows() == EXPECTED_WINDOWS


EXPECTED_WINDOWS = {(1.0, 30): "0", (1.0, 50): "0-1", (15.0, 30): "0-9", (15.0, 50): "0-15"}


@pytest.mark.parametrize("cfg", [BASE, DECODER], ids=["base", "decoder"])
@pytest.mark.parametrize("valid,image,mask", [([7, 4], True, True), ([7, 7], False, False)])
def test_gradient_checkpointing_keeps_the_call_state(cfg, valid, image, mask):
    """The forward carries no attention kwargs: the hook hands each call's state (the padded prompts'
    mask, the image tokens) to the processors, and to the blocks recomputed in the backward pass
    through the checkpointing function, decoder layers included (t = 1000 sigma)."""
    check_checkpointing_keeps_state(lambda: _transformer(cfg), _inputs(valid, 7, (2, 3, 2), image=image, mask=mask))
