"""taca train on a tiny Nucleus-Image pipeline (NucleusMoEImagePipeline: tiny AutoencoderKLQwenImage with a
non-trivial per-channel normalization, an 8-layer Qwen3-VL text encoder (the pipeline taps hidden state -8)
behind a Qwen3VLProcessor with a BPE Qwen2Tokenizer and chat template written here, a 3-block
NucleusMoEImageTransformer2DModel with GQA whose blocks 1 and 2 are mixture-of-experts (expert-choice
routing, a shared expert); random weights, CPU, offline): gamma 1.2 in every attention call of every
training forward (also under gradient checkpointing), none in the control run; the LoRA's text K / V
projections train (no cached text K / V); ``predict`` makes the pipeline's own transformer call (latents
packed 2x2, timestep sigma, the padded text and its mask, with and without CFG's negative batch, in float32
and bf16) and returns its negated output, in train mode as in eval mode; the latents are what the pipeline
decodes; sigmas shift as the pipeline's scheduler shifts them; a caption's cache entry and prediction do not
depend on its batch; what cannot be trained faithfully is refused; the adapter loads through the
transformer's loader and taca.enable.

As for Qwen-Image 2.1 (tests/test_train_qwenimage21.py), transformers' Qwen3VLProcessor needs torchvision
for its video processor, which this environment lacks: the processor is built with that class check relaxed,
and training is handed the built pipeline (``train(cfg, pipeline=...)``, cfg.model its saved folder for the
cache key)."""
import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")
pytest.importorskip("tokenizers")

import taca  # noqa: E402
from taca.train import train  # noqa: E402

from test_models_nucleusmoe import TINY as ADAPTER_TINY  # noqa: E402  (the adapter tests' tiny config)
from test_models_nucleusmoe import _scheduler  # noqa: E402  (dynamic shifting, diffusers' default bounds)
from train_checks import (ADAPTER, LONG, SHORT, VISION, GammaCounter, Record,  # noqa: E402,F401
                          cache_dir, cached_text, check_alone_as_in_batch, check_batch_independent, check_control,
                          check_gammas, check_gated_pipeline, check_qwenimage_latents, check_same_adapter,
                          check_taca_run, checked_family, data_fixture, model_fixture, one_torch_thread,
                          qwen3vl_processor, qwenimage_vae, run_fixture, saved_lora_modules,
                          text_cond, train_config, write_captioned_data)

RES = 32  # 32x32 pixels -> 8x8 latents (the tiny VAE's factor 4) -> 4x4 = 16 image tokens (2x2 patches)
N_LAYERS = 3
TEXT_DIM = ADAPTER_TINY["joint_attention_dim"]  # 24
# the adapter tests' dense config, with MoE blocks 1 and 2 (4 experts, capacities 8 and 4 of 16 tokens)
TINY = {**ADAPTER_TINY, "num_layers": N_LAYERS, "moe_enabled": True, "dense_moe_strategy": "leave_first_block_dense",
        "num_experts": 4, "moe_intermediate_dim": 32, "capacity_factors": [0.0, 2.0, 1.0]}
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
        "{% else %}{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ATTN = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj")
DENSE_FF = ("img_mlp.net.0.proj", "img_mlp.net.2")
SHARED_FF = ("img_mlp.shared_expert.net.0.proj", "img_mlp.shared_expert.net.2")
CAPTIONS = [SHORT, LONG, "a blue circle", "a small green square on a red background"]  # write_captioned_data's
EIGHT = "a small blue circle on the background"  # 72 tokens with the template: a batch of it is not padded


def _template():
    from diffusers.pipelines.nucleusmoe_image.pipeline_nucleusmoe_image import DEFAULT_SYSTEM_PROMPT

    return (f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{{}}<|im_end|>\n"
            "<|im_start|>assistant\n")


def _processor():
    """A Qwen3VLProcessor around a tiny BPE tokenizer (right padding, Qwen2Tokenizer's default)."""
    return qwen3vl_processor(_template(), CHAT)


def _text_encoder(tok):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    ids = tok.convert_tokens_to_ids(VISION)
    config = Qwen3VLConfig(  # 8 layers: the pipeline takes hidden state -8 (the first layer's output)
        text_config=dict(vocab_size=len(tok), hidden_size=TEXT_DIM, intermediate_size=32, num_hidden_layers=8,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=12, max_position_embeddings=512,
                         pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                          "mrope_section": [2, 2, 2], "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4,
                           out_hidden_size=TEXT_DIM, num_position_embeddings=16, deepstack_visual_indexes=[0]),
        vision_start_token_id=ids[0], vision_end_token_id=ids[1], image_token_id=ids[2], video_token_id=ids[3])
    return Qwen3VLForConditionalGeneration(config).eval()


def _transformer(**over):
    from diffusers import NucleusMoEImageTransformer2DModel

    torch.manual_seed(0)
    t = NucleusMoEImageTransformer2DModel(**{**TINY, **over}).eval()
    with torch.no_grad():
        for n, p in t.named_parameters():
            if ".experts." in n:  # the routed experts are torch.empty: give them values
                p.normal_(0.0, 0.2)
            elif not p.any():  # zero-initialized layers would make the output ignore attention
                p.normal_(0.0, 0.3)
    return t


def _pipeline(scheduler=None, transformer=None):
    from diffusers import NucleusMoEImagePipeline

    torch.manual_seed(0)
    proc = _processor()
    pipe = NucleusMoEImagePipeline(transformer=transformer or _transformer(), scheduler=scheduler or _scheduler(),
                                   vae=qwenimage_vae(), text_encoder=_text_encoder(proc.tokenizer), processor=proc)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _family(pipe):
    from taca.train.families.nucleusmoe import NucleusMoEImageFamily

    return checked_family(pipe, NucleusMoEImageFamily, "nucleusmoe")


def _train(model, data, out, **kw):
    """taca train with a fresh copy of model's pipeline (the folder's processor needs torchvision to load)."""
    return train(train_config(model, data, out, resolution=RES, max_sequence_length=None, **kw), pipeline=_pipeline(),
                 progress=False)


def _n_tokens(pipe, captions):
    """Each caption's token count in the chat template with the system prompt (what encode_prompt encodes)."""
    return [len(pipe.processor.tokenizer(pipe._format_prompt(c)).input_ids) for c in captions]


def _names(parts, blocks=range(N_LAYERS), where="attn."):
    return [f"transformer_blocks.{i}.{where}{p}" for i in blocks for p in parts]


def _unpack(pipe, tokens, height=RES, width=RES):
    return pipe._unpack_latents(tokens, height, width, TINY["patch_size"], pipe.vae_scale_factor)  # (B, C, 1, h, w)


model_dir = model_fixture(_pipeline, "nucleusmoe")
data = data_fixture(4, write_captioned_data)  # SHORT, LONG and two more captions: four text lengths
taca_run = run_fixture(lambda model_dir, data, cache_dir, out: _train(model_dir, data, out, cache_dir=cache_dir))


# --- the family and its targets --------------------------------------------------------------------
def test_family_and_targets():
    from diffusers import FluxPipeline

    pipe = _pipeline()
    fam = _family(pipe)
    assert fam.shift() == 1.0  # dynamic shifting: the sampled sigmas are not shifted
    assert fam.lora_saver() is FluxPipeline and not hasattr(type(pipe), "load_lora_weights")
    assert fam.text_modules() == [pipe.text_encoder] and fam.image_modules() == [pipe.vae]
    assert fam.max_sequence_length(None) == 1024  # the pipeline's default_max_sequence_length
    attn = fam.target_modules("attn")
    assert sorted(attn) == sorted(_names(ATTN)) and len(attn) == len(set(attn))
    ff = fam.target_modules("attn+ff")[len(attn):]
    assert sorted(ff) == sorted(_names(DENSE_FF, [0], "") + _names(SHARED_FF, [1, 2], ""))  # 0 dense, 1-2 MoE
    linear = {n for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(attn + ff) <= linear
    assert not any(n.endswith(("add_q_proj", "to_add_out")) for n in linear)  # no text queries nor text output
    assert fam.target_modules(["encoder_proj"]) == ["encoder_proj"]


def test_targets_on_the_real_config():
    """Nucleus-Image's transformer config (32 blocks, 16 query / 4 key-value heads of 128, text 4096,
    the first 3 blocks dense, 64 experts of 1344; the hub's transformer/config.json as a duplicate of
    NucleusAI/Nucleus-Image records it), built empty: "attn" is exactly every block's attention
    projections (6 a block: no text queries), "attn+ff" adds exactly the dense MLPs and the shared
    experts (not the router, the routed experts (no Linear), encoder_proj, embedders or output)."""
    from types import SimpleNamespace

    from accelerate import init_empty_weights
    from diffusers import NucleusMoEImageTransformer2DModel

    from taca.train.families.nucleusmoe import NucleusMoEImageFamily

    real = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=32, attention_head_dim=128,
                num_attention_heads=16, num_key_value_heads=4, joint_attention_dim=4096, axes_dims_rope=(16, 56, 56),
                mlp_ratio=4.0, moe_enabled=True, dense_moe_strategy="leave_first_three_blocks_dense", num_experts=64,
                moe_intermediate_dim=1344, capacity_factors=[0.0] * 3 + [4.0] * 2 + [2.0] * 27, use_sigmoid=False,
                route_scale=2.5, use_grouped_mm=True)
    with init_empty_weights():
        t = NucleusMoEImageTransformer2DModel(**real)
    fam = NucleusMoEImageFamily(SimpleNamespace(transformer=t, scheduler=_scheduler()))
    linear = {n for n, m in t.named_modules() if isinstance(m, torch.nn.Linear)}
    attn = set(fam.target_modules("attn"))
    assert attn == {n for n in linear if ".attn." in n} and len(attn) == 32 * 6
    ff = set(fam.target_modules("attn+ff")) - attn
    assert ff == {n for n in linear if ".img_mlp." in n and not n.endswith(".gate")} and len(ff) == 3 * 2 + 29 * 2
    assert sum(n.endswith(".img_mlp.gate") for n in linear) == 29  # the routers exist, not targeted
    assert attn | ff <= linear


# --- training ----------------------------------------------------------------------------------
def test_gamma_in_every_training_forward(taca_run, model_dir):
    """3 steps of batch 2 on captions of four lengths: gamma 1.2 in all three blocks' attention of every
    forward; each caption cached at its own tokens; the adapter on the attention projections, and the
    text key / value ones trained (the text keys come from the prompt, not a cache)."""
    res, gammas = taca_run
    check_taca_run(res, gammas, 3 * N_LAYERS)
    assert saved_lora_modules(res.out) == {f"transformer.{n}" for n in _names(ATTN)}
    entries = cached_text(res)
    assert all(set(e) == {"prompt_embeds"} and e["prompt_embeds"].shape[1] == TEXT_DIM for e in entries)
    pipe = _pipeline()
    assert sorted(e["prompt_embeds"].shape[0] for e in entries) == sorted(_n_tokens(pipe, CAPTIONS))
    from safetensors.torch import load_file

    lora = load_file(os.path.join(res.out, ADAPTER))
    for n in _names(("add_k_proj", "add_v_proj")):
        assert lora[f"transformer.{n}.lora_B.weight"].abs().max() > 0, n  # gradients reached the text K / V


def test_control_run_has_no_taca(model_dir, data, cache_dir, tmp_path, monkeypatch):
    gammas = GammaCounter(monkeypatch).gammas
    res = _train(model_dir, data, tmp_path / "out", cache_dir=cache_dir, taca=False, max_steps=2)
    check_control(res, gammas)
    assert res.steps == 2


def test_gradient_checkpointing_keeps_gamma(model_dir, data, cache_dir, tmp_path, monkeypatch, taca_run):
    """Every block runs again in the backward with its gamma; the same losses and adapter."""
    gammas = GammaCounter(monkeypatch).gammas
    res = _train(model_dir, data, tmp_path / "out", cache_dir=cache_dir, gradient_checkpointing=True)
    check_gammas(gammas, 2 * 3 * N_LAYERS)
    torch.testing.assert_close(torch.tensor(res.losses), torch.tensor(taca_run[0].losses), rtol=1e-5, atol=1e-7)
    check_same_adapter(taca_run[0].out, res.out)


# --- predict is the pipeline's own forward ------------------------------------------------------
@pytest.mark.parametrize("prompts,guidance_scale,size", [
    ([SHORT, LONG], 4.0, (RES, RES)),  # 68 and 78 tokens: padded to 80; the negative "" x 2: 65 -> 72
    ([SHORT], 1.0, (RES, RES + 16)),  # 68 -> 72, 8x12 latents
    ([EIGHT], 1.0, (RES + 16, RES)),  # 72 tokens: nothing padded, no mask
])
def test_predict_is_the_pipelines_forward(prompts, guidance_scale, size):
    """NucleusMoEImagePipeline.__call__ (2 steps) recorded at the transformer, with CFG (its negative ""
    batch a second call) or not, square or not: predict on the same latents (unpacked), the pipeline's
    t / 1000 as sigma (the scheduler's sigma to an ulp) and the captions through the cache's split /
    collate makes the same call (the packed latents, timestep, img_shapes, the text padded to a
    multiple of 8 with the same mask, or none, no cached text K / V) and returns the pipeline's output
    unpacked and negated, bit for bit."""
    H, W = size
    pipe = _pipeline()
    fam = _family(pipe)
    t = pipe.transformer
    n_cond = len(prompts)
    calls_per_step = 2 if guidance_scale > 1 else 1
    rec = Record(t)
    with torch.no_grad():
        pipe(prompt=prompts, height=H, width=W, num_inference_steps=2, guidance_scale=guidance_scale,
             generator=torch.Generator().manual_seed(0), output_type="latent")
        n = len(rec.calls)
        assert n == 2 * calls_per_step
        sigmas = pipe.scheduler.sigmas
        conds = [text_cond(fam, prompts, None), text_cond(fam, [""] * n_cond, None)]
        for j, (kw, out) in enumerate(list(rec.calls)):
            step, which = divmod(j, calls_per_step)
            cond = conds[which]
            lat = _unpack(pipe, kw["hidden_states"], H, W)
            sigma = kw["timestep"].float()  # the pipeline's t / 1000 ...
            torch.testing.assert_close(sigma, sigmas[step].expand(n_cond), rtol=0, atol=1e-7)  # ... = sigma
            pred = fam.predict(t, lat, sigma, cond, guidance=1.0)
            mine, mine_out = rec.calls[n + j]
            assert pred.shape == lat.shape == (n_cond, 4, 1, H // 4, W // 4)
            assert torch.equal(mine_out, out)
            assert torch.equal(pred, -_unpack(pipe, out, H, W))  # the model predicts x0 - noise
            for k in ("hidden_states", "timestep"):
                assert torch.equal(mine[k], kw[k]), k
            assert mine["img_shapes"] == kw["img_shapes"] == [(1, H // 8, W // 8)] * n_cond
            assert kw["attention_kwargs"] == {} and mine.get("attention_kwargs") is None  # no cached text K / V
            pe, mpe = kw["encoder_hidden_states"], mine["encoder_hidden_states"]
            assert mpe.shape == pe.shape and pe.shape[1] % 8 == 0
            mask = kw["encoder_hidden_states_mask"]
            assert (mask is None) == (prompts == [EIGHT] and which == 0)
            if mask is None:
                assert mine["encoder_hidden_states_mask"] is None and torch.equal(mpe, pe)
            else:  # equal where the text is; the padded (masked) tokens are zeros here
                assert torch.equal(mine["encoder_hidden_states_mask"], mask.bool())
                assert not bool(mask.all())
                keep = mask.bool()[..., None]
                assert torch.equal(torch.where(keep, pe, 0.0), mpe)
    rec.h.remove()


def test_predict_in_bf16_is_the_pipelines_call():
    """With the pipeline in bf16 it hands the transformer t / 1000 computed in bf16 (t = 1000 sigma
    rounded to bf16 first); predict given that value as sigma (float32) hands the model the same bf16
    timestep after its own cast, and returns the pipeline's output, negated, bit for bit."""
    pipe = _pipeline()
    pipe.to(torch.bfloat16)
    fam = _family(pipe)
    t = pipe.transformer
    rec = Record(t)
    with torch.no_grad():
        pipe(prompt=[SHORT, LONG], height=RES, width=RES, num_inference_steps=3, guidance_scale=1.0,
             generator=torch.Generator().manual_seed(0), output_type="latent")
        cond = text_cond(fam, [SHORT, LONG], None)
        assert cond["prompt_embeds"].dtype == torch.bfloat16
        for kw, out in list(rec.calls):
            assert kw["timestep"].dtype == torch.bfloat16
            pred = fam.predict(t, _unpack(pipe, kw["hidden_states"]), kw["timestep"].float(), cond, 1.0)
            assert pred.dtype == torch.bfloat16 and torch.equal(pred, -_unpack(pipe, out))
    # the pipeline's bf16 timestep is within one bf16 step of the scheduler's sigma
    ts = torch.stack([kw["timestep"][0].float() for kw, _ in rec.calls[:3]])
    torch.testing.assert_close(ts, pipe.scheduler.sigmas[:3], rtol=0, atol=2 ** -7)
    rec.h.remove()


def test_train_mode_is_the_inference_forward():
    """The MoE has no train-mode behaviour (no capacity change, dropping or auxiliary loss; dropout 0):
    predict in train mode, TACA on, equals eval mode bit for bit, and gradients reach the router's
    input side (the routed experts' weights get a gradient through the routing weights)."""
    pipe = _pipeline()
    fam = _family(pipe)
    t = pipe.transformer
    cond = text_cond(fam, [SHORT, LONG], None)
    x = torch.randn(2, 4, 1, RES // 4, RES // 4, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.99, 0.5])
    with taca.enabled(t, gamma=1.2):
        with torch.no_grad():
            ref = fam.predict(t.eval(), x, sigma, cond, 1.0)
        t.train()
        out = fam.predict(t, x, sigma, cond, 1.0)
        assert torch.equal(out.detach(), ref)
        out.square().mean().backward()
    moe = t.transformer_blocks[1].img_mlp
    assert moe.experts.gate_up_proj.grad.abs().max() > 0 and moe.gate.weight.grad.abs().max() > 0


# --- latents --------------------------------------------------------------------------------
def test_latents_are_what_the_pipeline_decodes():
    """encode_images = (mode - latents_mean) / latents_std per channel, 5-D; put in place of the
    pipeline's last latents (packed as its loop keeps them), its own decode path (unpack, denormalize,
    vae.decode) gives back vae.decode(mode). Sizes the VAE and the patches do not divide are refused."""
    pipe = _pipeline()
    fam = _family(pipe)
    check_qwenimage_latents(
        pipe, fam, RES, lambda callback: pipe(
            prompt_embeds=torch.zeros(2, 8, TEXT_DIM), height=RES, width=RES, num_inference_steps=2,
            guidance_scale=1.0, output_type="pt", callback_on_step_end=callback).images,
        pack=lambda lat: pipe._pack_latents(lat, 2, 4, RES // 4, RES // 4, TINY["patch_size"]))
    with pytest.raises(ValueError, match="--resolution.*divisible by 8"):
        fam.encode_images(torch.zeros(1, 3, 36, 36))


@pytest.mark.parametrize("static", [True, False])
def test_sigmas_shift_as_the_pipelines(static):
    """The pipeline's sigmas (4 steps: linspace(1, 1/4) and mu from the token count) are the training
    shift applied to the unshifted ones when the scheduler shifts statically (shift 3: the pipeline's
    mu is ignored); under dynamic shifting they depend on the resolution and training does not shift."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(shift=3.0) if static else _scheduler()
    pipe = _pipeline(scheduler=sch)
    fam = _family(pipe)
    pipe(prompt_embeds=torch.zeros(1, 8, TEXT_DIM), height=RES, width=RES, num_inference_steps=4, guidance_scale=1.0,
         output_type="latent")
    s = torch.tensor(np.linspace(1.0, 1 / 4, 4), dtype=torch.float32)
    k = fam.shift()
    shifted = k * s / (1 + (k - 1) * s)
    assert k == (3.0 if static else 1.0)
    if static:
        torch.testing.assert_close(pipe.scheduler.sigmas[:4], shifted, rtol=0, atol=1e-6)
    else:
        assert not torch.allclose(pipe.scheduler.sigmas[:4], s, atol=1e-3)  # the resolution's own shift


# --- variable-length prompts ----------------------------------------------------------------
def test_cache_entry_and_prediction_do_not_depend_on_the_batch():
    """encode_prompt pads the batch after each prompt (right padding) to a multiple of 8 with a mask: a
    caption's entry is its own tokens (the system prompt and template included), the same alone or
    next to a longer one; max_sequence_length truncates the formatted prompt (system prompt included);
    collated, the batch is zero-padded to the next multiple of 8 with the mask of its lengths; predict
    on it equals predict on each caption alone (TACA on)."""
    pipe = _pipeline()
    fam = _family(pipe)
    cpu = torch.device("cpu")
    n = _n_tokens(pipe, [SHORT, LONG])
    assert n[0] < n[1] and n[0] % 8 and n[1] % 8  # both padded, alone and together
    m = n[0] // 8 * 8  # a max_sequence_length (a multiple of 8) that cuts both
    with torch.no_grad():
        _, both, long_alone = check_alone_as_in_batch(fam, None, n)
        cut = fam.split_text(fam.encode_text([SHORT, LONG], cpu, m))
        assert [e["prompt_embeds"].shape[0] for e in cut] == [m, m]
        torch.testing.assert_close(cut[1]["prompt_embeds"], long_alone[0]["prompt_embeds"][:m])
    batch = fam.collate(both)
    L = -(-n[1] // 8) * 8
    assert batch["prompt_embeds"].shape == (2, L, TEXT_DIM) and batch["prompt_embeds_mask"].dtype == torch.bool
    assert batch["prompt_embeds_mask"].sum(1).tolist() == n and not batch["prompt_embeds"][0, n[0]:].any()
    x = torch.randn(2, 4, 1, RES // 4, RES // 4, generator=torch.Generator().manual_seed(5))
    check_batch_independent(fam, pipe.transformer, x, torch.tensor([0.99, 0.975]), both, schedule="paper")


# --- what is refused ------------------------------------------------------------------------
def test_what_cannot_be_trained_faithfully_is_refused():
    """Left padding (each caption's text positions would follow its batch's longest prompt), an inverted
    scheduler, a transformer whose channels the pipeline's 2x2 packing does not fit, a diffusers cache
    hook on the transformer, and a non-positive --max-sequence-length: each refused, naming why."""
    from diffusers import FlowMatchEulerDiscreteScheduler, NucleusMoEImagePipeline

    from taca.train.config import ConfigError
    from taca.train.families import family_for

    pipe = _pipeline()
    fam = _family(pipe)
    left = copy.deepcopy(pipe.processor)
    left.tokenizer.padding_side = "left"
    parts = dict(vae=pipe.vae, text_encoder=pipe.text_encoder)
    with pytest.raises(ValueError, match="pads on the 'left'"):
        family_for(NucleusMoEImagePipeline(transformer=pipe.transformer, scheduler=pipe.scheduler, processor=left,
                                           **parts))
    with pytest.raises(ValueError, match="invert_sigmas"):
        family_for(NucleusMoEImagePipeline(transformer=pipe.transformer, processor=pipe.processor, **parts,
                                           scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True)))
    with pytest.raises(ValueError, match="in_channels // 4"):
        family_for(NucleusMoEImagePipeline(transformer=_transformer(in_channels=12, out_channels=4),
                                           scheduler=pipe.scheduler, processor=pipe.processor, **parts))
    for n in (0, 68):  # 68: the tokenizer would refuse it (truncation with pad_to_multiple_of=8)
        with pytest.raises(ConfigError, match="--max-sequence-length"):
            fam.encode_text(["a cat"], torch.device("cpu"), n)
    from diffusers import TextKVCacheConfig

    cond = text_cond(fam, [SHORT], None)
    pipe.transformer.enable_cache(TextKVCacheConfig())  # the text K / V cache the pipeline can run with
    with pytest.raises(ValueError, match="enable_cache"):
        fam.predict(pipe.transformer, torch.zeros(1, 4, 1, 8, 8), torch.tensor([0.99]), cond, 1.0)


# --- the saved adapter ------------------------------------------------------------------------
def test_adapter_loads_in_the_transformer_and_taca(taca_run):
    """taca.enable(pipe, lora=) gates the adapter in (the pipeline has no load_lora_weights: taca loads it
    through the transformer); the transformer's load_lora_adapter(prefix="transformer") loads the same
    layers with the trained scale (alpha 4 / rank 4), and with TACA on both predict the same."""
    out = taca_run[0].out
    call = dict(prompt=SHORT, height=RES, width=RES, num_inference_steps=2, guidance_scale=1.0, output_type="latent")
    check_gated_pipeline(_pipeline(), out, call)
    fresh = _pipeline()
    fam = _family(fresh)
    fresh.transformer.load_lora_adapter(out, prefix="transformer", weight_name=ADAPTER)
    lora = [(n, m) for n, m in fresh.transformer.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)]
    assert {n for n, _ in lora} == set(_names(ATTN))
    assert all(list(m.scaling.values()) == [1.0] for _, m in lora)
    x = torch.randn(1, 4, 1, RES // 4, RES // 4, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.99])
    with torch.no_grad():
        cond = text_cond(fam, [SHORT], None)
        with taca.enabled(fresh.transformer, gamma=1.2):
            loaded = fam.predict(fresh.transformer, x, sigma, cond, 1.0)
        other = _pipeline()
        stock = fam.predict(other.transformer, x, sigma, cond, 1.0)
        with taca.enabled(other, gamma=1.2, lora=out):
            via_taca = fam.predict(other.transformer, x, sigma, cond, 1.0)
    torch.testing.assert_close(via_taca, loaded, rtol=0, atol=1e-6)
    assert not torch.allclose(via_taca, stock, atol=1e-5)
