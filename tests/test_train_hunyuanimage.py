"""taca train on a tiny HunyuanImagePipeline (a 3-layer Qwen2.5-VL text encoder with the BPE Qwen2Tokenizer of
train_checks, whose template prefix is the pipeline's 34 dropped tokens; a 2-layer T5 glyph encoder with the byte-
level ByT5Tokenizer; a 2-level AutoencoderKLHunyuanImage of factor 4 with scaling factor 0.75; the adapter tests'
2 + 2-block HunyuanImageTransformer2DModel with its token refiner and the ByT5 projection; the pipeline's
AdaptiveProjectedMixGuidance guider and a static-shift-5 scheduler), saved with save_pretrained, random weights,
CPU: gamma in every joint attention call of every training forward, the control run stock, gradient checkpointing
refused naming the argument (diffusers 0.42.1's checkpointing fails); the family's predict is the pipeline's own
conditional transformer call (timestep 1000 sigma in the weights' dtype, the text padded to the pipeline's fixed
1000 / 128 tokens with its masks, the glyph text of quoted captions, a guidance embedding as the pipeline makes it,
the output as it is) bit for bit, and Euler steps with it land on the pipeline's latents; the latents are what the
pipeline decodes; a caption's entry (its valid tokens of both encoders) and prediction do not depend on its batch;
meanflow, the refiner and bad input refused; the adapter loads through diffusers' load_lora_adapter and taca."""
import os
from functools import partial
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import taca  # noqa: E402
from taca.train import train  # noqa: E402
from taca.train.config import ConfigError  # noqa: E402

from test_models_hunyuanimage import TINY  # noqa: E402  (the adapter tests' tiny transformer)
from train_checks import (ADAPTER, cache_dir, cached_text, check_batch_independent,  # noqa: E402,F401
                          check_gated_pipeline, check_loaded_predict, check_taca_run, checked_family, control_run,
                          data_fixture, flux_attn_names, flux_ff_names, load, LONG, model_fixture, one_torch_thread,
                          peft_hits, qwen2_bpe_tokenizer, record_calls, RUN_FILES, run_fixture, saved_lora_modules,
                          SHORT, text_cond, train_config, write_captioned_data)

RES = 32  # 32x32 pixels -> 8x8 latents (the tiny VAE's factor 4), patch 1 -> 64 image tokens
N_DOUBLE, N_SINGLE = TINY["num_layers"], TINY["num_single_layers"]
N_JOINT = N_DOUBLE + N_SINGLE
TEXT_DIM, GLYPH_DIM = TINY["text_embed_dim"], 20
LAT = (4, RES // 4, RES // 4)
SCALE = 0.75  # the VAE's scaling_factor (non-trivial: the real one is not 1 either)
SHIFT = 5.0  # tests/test_models_hunyuanimage.py's static shift for the 2.1 scheduler (not read from the hub here)
GLYPH = 'a sign that says "hello"'  # quoted text: the pipeline encodes 'Text "hello". ' with ByT5
CAPTIONS = [SHORT, LONG, GLYPH, "a small green square on a red background"]


def _text_encoder(vocab_size):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    n = vocab_size
    config = Qwen2_5_VLConfig(  # 3 layers: the pipeline's hidden state 3 from the end is layer 1's output
        text_config=dict(vocab_size=n + 4, hidden_size=TEXT_DIM, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=TEXT_DIM,
                           fullatt_block_indexes=[0]),
        vision_start_token_id=n, vision_end_token_id=n + 1, image_token_id=n + 2, video_token_id=n + 3)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _glyph_encoder():
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    tok = ByT5Tokenizer()
    te = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=GLYPH_DIM, d_kv=8, d_ff=40, num_layers=2, num_heads=2,
                                 relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1))
    return tok, te.eval()


def _transformer(**kw):
    from diffusers import HunyuanImageTransformer2DModel

    return HunyuanImageTransformer2DModel(**{**TINY, "text_embed_2_dim": GLYPH_DIM, **kw}).eval()


def _vae():
    from diffusers import AutoencoderKLHunyuanImage

    return AutoencoderKLHunyuanImage(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 32),
                                     layers_per_block=1, spatial_compression_ratio=4, sample_size=RES,
                                     scaling_factor=SCALE).eval()


def build_pipeline(guider=True, **transformer):
    from diffusers import AdaptiveProjectedMixGuidance, FlowMatchEulerDiscreteScheduler, HunyuanImagePipeline

    torch.manual_seed(0)
    tok2, te2 = _glyph_encoder()
    pipe = HunyuanImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT),
                                vae=_vae(), text_encoder=None, tokenizer=None, text_encoder_2=te2, tokenizer_2=tok2,
                                transformer=_transformer(**transformer),
                                guider=AdaptiveProjectedMixGuidance() if guider else None)
    tok = qwen2_bpe_tokenizer(pipe.prompt_template_encode)  # the same 34-token prefix as Qwen-Image's template
    pipe.register_modules(tokenizer=tok, text_encoder=_text_encoder(len(tok)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _write_data(folder, n=4):
    """write_captioned_data's images, captioned CAPTIONS in turn (one with quoted text: ByT5 tokens)."""
    write_captioned_data(folder, n=n)
    for i in range(n):
        with open(os.path.join(folder, f"img{i:02d}.txt"), "w") as f:
            f.write(CAPTIONS[i % len(CAPTIONS)])
    return str(folder)


def _family(pipe):
    from taca.train.families.hunyuanimage import HunyuanImageFamily

    return checked_family(pipe, HunyuanImageFamily, "hunyuanimage")








def _valid(pipe, captions):
    """Each caption's valid Qwen2.5-VL and ByT5 tokens as the pipeline counts them (its masks)."""
    with torch.no_grad():
        _, m, _, m2 = pipe.encode_prompt(captions, torch.device("cpu"), batch_size=len(captions))
    return m.sum(1).tolist(), m2.sum(1).tolist()


_cfg = partial(train_config, resolution=RES, max_sequence_length=None)  # the pipeline takes no max_sequence_length
model = model_fixture(build_pipeline, "hunyuanimage")
data = data_fixture(4, _write_data)
trained = run_fixture(lambda model, data, cache_dir, out: train(_cfg(model, data, out, cache_dir=cache_dir),
                                                                progress=False), where=("runs", "taca"))


# --- the family and its targets ------------------------------------------------------------------
def test_family_and_targets(model):
    from diffusers import FluxPipeline, HunyuanImagePipeline

    from taca.models import adapter_class

    pipe = load(model)
    assert adapter_class(pipe.transformer).name == "hunyuanimage"
    fam = _family(pipe)
    assert fam.shift() == SHIFT  # the scheduler's static shift, which set_timesteps applies to the pipeline's sigmas
    # no LoRA loader on the pipeline in diffusers 0.42.1: FLUX.1's "transformer."-prefixed format
    assert not hasattr(HunyuanImagePipeline, "load_lora_weights") and fam.lora_saver() is FluxPipeline
    assert fam.text_modules() == [pipe.text_encoder, pipe.text_encoder_2] and fam.image_modules() == [pipe.vae]
    attn = fam.target_modules("attn")
    assert sorted(attn) == sorted(flux_attn_names(N_DOUBLE, N_SINGLE)) and len(set(attn)) == len(attn)
    assert fam.target_modules("attn+ff") == attn + fam.ff_targets
    assert sorted(fam.ff_targets) == sorted(flux_ff_names(N_DOUBLE))
    linear = {n for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    hit = peft_hits(linear, fam.target_modules("attn+ff"))
    assert hit == set(fam.target_modules("attn+ff"))  # real Linear layers, the token refiner's not among them
    assert any(n.startswith("context_embedder.") and n.endswith(".attn.to_q") for n in linear)
    assert fam.target_modules(["to_q"]) == ["to_q"]


def test_targets_on_the_real_config():
    """HunyuanImage 2.1's transformer (the class's defaults are its config: 20 double- and 40 single-stream
    blocks, 28 heads of 128, 64 latent channels, patch 1, Qwen2.5-VL's 3584 text features; plus the 1472 of
    the byT5-small glyph encoder), built empty: "attn" hits exactly the joint attention projections of the 60
    blocks, "attn+ff" adds the double blocks' feed-forwards; the token refiner is not hit."""
    from accelerate import init_empty_weights
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanImageTransformer2DModel

    from taca.train.families.hunyuanimage import HunyuanImageFamily

    with init_empty_weights():
        t = HunyuanImageTransformer2DModel(text_embed_2_dim=1472)
    c = t.config
    assert (c.num_layers, c.num_single_layers, c.num_attention_heads * c.attention_head_dim, c.in_channels) == \
        (20, 40, 3584, 64)
    fam = HunyuanImageFamily(SimpleNamespace(scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT), transformer=t))
    linear = {n for n, m in t.named_modules() if isinstance(m, torch.nn.Linear)}
    attn = peft_hits(linear, fam.target_modules("attn"))
    assert attn == set(flux_attn_names(20, 40)) and len(attn) == 20 * 8 + 40 * 3
    assert peft_hits(linear, fam.target_modules("attn+ff")) - attn == set(flux_ff_names(20))
    assert all(peft_hits(linear, [k]) for k in fam.target_modules("attn+ff"))  # no dead name
    assert not any(n.startswith("context_embedder") for n in peft_hits(linear, fam.target_modules("attn+ff")))


# --- training ----------------------------------------------------------------------------------
def test_gamma_on_in_every_training_forward(trained, model):
    """3 steps of batch 2: gamma 1.2 in every joint attention of every forward (2 double + 2 single blocks);
    each caption cached as its valid tokens of both encoders (the glyph caption's ByT5 tokens, none for the
    others), the masks dropped; the adapter on the attention projections."""
    res, calls = trained
    check_taca_run(res, calls, 3 * N_JOINT, files=RUN_FILES[:3])
    assert saved_lora_modules(res.out) == {f"transformer.{n}" for n in flux_attn_names(N_DOUBLE, N_SINGLE)}
    entries = cached_text(res)
    assert len(entries) == 4 and all(set(e) == {"prompt_embeds", "prompt_embeds_2"} for e in entries)
    n, n2 = _valid(load(model), CAPTIONS)
    assert sorted((e["prompt_embeds"].shape[0], e["prompt_embeds_2"].shape[0]) for e in entries) == sorted(zip(n, n2))
    assert sorted(n2)[:3] == [0, 0, 0] and max(n2) > 0 and len(set(n)) == 4


def test_gradient_checkpointing_is_refused(model, data, cache_dir, tmp_path, monkeypatch):
    """--gradient-checkpointing: a ConfigError naming it from check_config, before any weights load (a folder:
    its model_index.json names the pipeline) and, for a pipeline handed to train(), before --out is touched
    or the adapter added. The reason: diffusers 0.42.1's forward passes keywords the default checkpointing
    function does not take (TypeError, with stock attention too); predict refuses such a transformer, and
    leaves alone one whose checkpointing function takes them."""
    import torch.utils.checkpoint

    import taca.train.loop as loop
    from taca.train.families.hunyuanimage import HunyuanImageFamily

    cfg = _cfg(model, data, tmp_path / "out", cache_dir=cache_dir, gradient_checkpointing=True)
    with pytest.raises(ConfigError, match="argument --gradient-checkpointing: HunyuanImage cannot be trained"):
        HunyuanImageFamily.check_config(cfg, "HunyuanImagePipeline")
    HunyuanImageFamily.check_config(_cfg(model, data, tmp_path / "out"), "HunyuanImagePipeline")
    loaded = []
    with monkeypatch.context() as mp:
        mp.setattr(loop, "_load_pipeline", lambda *a: loaded.append(a) or load(model))
        with pytest.raises(ConfigError, match="--gradient-checkpointing"):
            train(cfg, progress=False)
    assert loaded == [] and not os.path.exists(cfg.out)  # before the weights load
    pipe = load(model)
    with pytest.raises(ConfigError, match="--gradient-checkpointing"):
        train(cfg, pipeline=pipe, progress=False)
    t = pipe.transformer
    assert not os.path.exists(cfg.out) and not t.gradient_checkpointing and not hasattr(t, "peft_config")
    fam = _family(pipe)
    x = torch.randn(1, *LAT, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = text_cond(fam, [SHORT], None)
    t.enable_gradient_checkpointing()  # the default function, turned on outside taca train
    with pytest.raises(ConfigError, match="--gradient-checkpointing"):
        fam.predict(t, x, torch.ones(1), cond, 1.0)
    # what the refusal stands for: the stock model with the default function fails in diffusers itself
    with pytest.raises(TypeError, match="attention_mask"):
        t(hidden_states=x, timestep=torch.full((1,), 990.0), encoder_hidden_states=cond["prompt_embeds"],
          encoder_attention_mask=cond["prompt_embeds_mask"], encoder_hidden_states_2=cond["prompt_embeds_2"],
          encoder_attention_mask_2=cond["prompt_embeds_mask_2"], return_dict=False)
    t.enable_gradient_checkpointing(gradient_checkpointing_func=lambda block, *a, **k:
                                    torch.utils.checkpoint.checkpoint(block, *a, use_reentrant=False, **k))
    assert torch.isfinite(fam.predict(t, x, torch.ones(1), cond, 1.0)).all()


def test_control_runs_stock_attention(model, data, cache_dir, tmp_path, monkeypatch):
    res = control_run(partial(_cfg, model, data, cache_dir=cache_dir), tmp_path / "out", monkeypatch, max_steps=2)
    assert len(res.losses) == 2


# --- the pipeline's conventions ------------------------------------------------------------------
def _check_call(kw, mine, n, n2):
    """predict's transformer call (mine) is the pipeline's (kw): every tensor equal in value and dtype, the
    text rows beyond each caption's valid tokens (n, n2) zeros in predict's where the pipeline's hold the
    encoders' hidden states of pad tokens (the masks, equal, remove them)."""
    assert set(kw) == set(mine) | {"attention_kwargs"} and not kw["attention_kwargs"]
    for k in ("hidden_states", "timestep", "encoder_attention_mask", "encoder_attention_mask_2"):
        assert mine[k].dtype == kw[k].dtype and torch.equal(mine[k], kw[k]), k
    assert kw["encoder_hidden_states"].shape[1] == 1000 and kw["encoder_hidden_states_2"].shape[1] == 128
    assert kw["encoder_attention_mask"].sum(1).tolist() == n and kw["encoder_attention_mask_2"].sum(1).tolist() == n2
    for k, lengths in (("encoder_hidden_states", n), ("encoder_hidden_states_2", n2)):
        a, b = kw[k], mine[k]
        assert a.shape == b.shape and a.dtype == b.dtype
        for j, L in enumerate(lengths):
            assert torch.equal(a[j, :L], b[j, :L]) and not b[j, L:].any(), k
    assert kw["encoder_hidden_states"][0, n[0]:].abs().sum() > 0  # the pipeline's padding rows are not zeros
    for k in ("timestep_r", "guidance"):
        assert (kw[k] is None) == (mine[k] is None) and (kw[k] is None or (
            kw[k].dtype == mine[k].dtype and torch.equal(kw[k], mine[k]))), k
    assert kw["timestep_r"] is None




@pytest.mark.parametrize("guider", [False, True])
def test_predict_is_the_pipelines_denoising_step(model, guider):
    """HunyuanImagePipeline's own loop (2 steps, a batch of a plain and a quoted prompt, TACA on), with the
    guider (a conditional and an unconditional call per step, the prompt's first) or without (one call): the
    transformer call predict makes on the pipeline's latents at the scheduler's (shifted) sigma and the
    captions as cached and collated is the pipeline's conditional call (timestep 1000 sigma, the text padded
    to 1000 / 128 with the pipeline's masks, the glyph text, no timestep_r or guidance), its output the
    pipeline's bit for bit (not negated), the gammas the pipeline's; without the guider, Euler steps with it
    land on the pipeline's latents."""
    import numpy as np

    pipe = load(model)
    if not guider:
        pipe.guider = None  # the pipeline then uses a disabled guider: one call per step
    fam = _family(pipe)
    t = pipe.transformer
    prompts = [SHORT, GLYPH]
    n, n2 = _valid(pipe, prompts)
    assert n2[0] == 0 < n2[1]
    x = torch.randn(2, *LAT, generator=torch.Generator().manual_seed(3))
    calls, hook = record_calls(t)
    per_step = 2 if guider else 1
    with taca.enabled(pipe, gamma=1.2), torch.no_grad():
        out = pipe(prompt=prompts, latents=x.clone(), height=RES, width=RES, num_inference_steps=2,
                   output_type="latent").images
        seen = list(calls)
        assert len(seen) == 2 * per_step
        sigmas, timesteps = pipe.scheduler.sigmas, pipe.scheduler.timesteps
        s0 = np.linspace(1.0, 0.0, 3)[:-1]
        torch.testing.assert_close(sigmas[:-1], torch.tensor(SHIFT * s0 / (1 + (SHIFT - 1) * s0), dtype=torch.float32))
        cond = text_cond(fam, prompts, None)
        for i in range(2):
            pkw, pipe_out, pg = seen[per_step * i]
            v = fam.predict(t, pkw["hidden_states"], sigmas[i].expand(2), cond, 3.5)  # no guidance embedding
            kw, model_out, g = calls[-1]
            _check_call(pkw, kw, n, n2)
            assert torch.equal(kw["timestep"], timesteps[i].expand(2)) and kw["timestep"].dtype == torch.float32
            assert torch.equal(model_out, pipe_out) and torch.equal(v, pipe_out)  # the velocity as it is
            if i == 0:  # sigma 1 is in the window, sigma 0.83 (shift 5) is not: both paths
                assert torch.allclose(g, torch.full((2,), 1.2)) and torch.allclose(pg, torch.full((2,), 1.2))
            else:
                assert g is None and pg is None
            if not guider:
                torch.testing.assert_close(pkw["hidden_states"], x, rtol=0, atol=1e-6)
                x = x + (sigmas[i + 1] - sigmas[i]) * v  # the scheduler's Euler step
    hook.remove()
    if not guider:
        torch.testing.assert_close(x, out, rtol=0, atol=1e-6)


def test_predict_in_bf16_with_a_guidance_embedding():
    """A guidance-embedding config (no meanflow) in bf16 weights, 3 steps, distilled_guidance_scale 3.1: the
    pipeline hands the transformer t = 1000 sigma (float32) rounded to bf16 (not bf16(sigma) * 1000) and the
    guidance bf16(3.1) * 1000 taken in bf16 (3088, where bf16(3100) is 3104); predict on the
    bf16 latents of each step with --guidance 3.1 makes the same calls and returns their outputs."""
    pipe = build_pipeline(guider=False, guidance_embeds=True)
    pipe.transformer.to(torch.bfloat16)
    fam = _family(pipe)
    prompts = [GLYPH, LONG]
    n, n2 = _valid(pipe, prompts)
    lat = torch.randn(2, *LAT, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    calls, hook = record_calls(pipe.transformer)
    with taca.enabled(pipe, gamma=1.2), torch.no_grad():
        pipe(prompt=prompts, latents=lat.clone(), height=RES, width=RES, num_inference_steps=3,
             distilled_guidance_scale=3.1, output_type="latent")
        seen = list(calls)
        cond = text_cond(fam, prompts, None)
        sigmas = pipe.scheduler.sigmas
        outs = [fam.predict(pipe.transformer, kw["hidden_states"], sigmas[i].expand(2), cond, 3.1)
                for i, (kw, _, _) in enumerate(seen)]
    hook.remove()
    assert len(seen) == 3 and len(calls) == 6
    assert torch.equal(seen[0][0]["guidance"], torch.full((2,), 3088.0, dtype=torch.bfloat16))
    assert [float(kw["timestep"][0]) for kw, _, _ in seen] == \
        [float((s * 1000).to(torch.bfloat16)) for s in sigmas[:3]]
    assert float((sigmas[1] * 1000).to(torch.bfloat16)) != float(sigmas[1].to(torch.bfloat16) * 1000)
    for (kw, out, _), (mine, mine_out, _), v in zip(seen, calls[3:], outs):
        _check_call(kw, mine, n, n2)
        assert kw["timestep"].dtype == kw["encoder_hidden_states"].dtype == torch.bfloat16
        assert torch.equal(v, out) and torch.equal(mine_out, out) and v.dtype == torch.bfloat16


def test_latents_are_what_the_pipeline_decodes(model):
    """encode_images = the posterior mode times scaling_factor (0.75), (B, 4, H/4, W/4) on a non-square
    image; put in place of the pipeline's last latents they decode, through its own path
    (/ scaling_factor, vae.decode), to the VAE's reconstruction of the mode. Sides the factor does not
    divide are refused naming --resolution."""
    pipe = load(model)
    pipe.guider = None
    fam = _family(pipe)
    vae = pipe.vae
    assert vae.config.scaling_factor == SCALE and pipe.vae_scale_factor == 4
    px = torch.rand(2, 3, RES, RES + 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    lat = fam.encode_images(px)
    assert lat.shape == (2, 4, RES // 4, (RES + 16) // 4)
    with torch.no_grad():
        mode = vae.encode(px).latent_dist.mode()
        torch.testing.assert_close(lat, mode * SCALE, rtol=0, atol=0)
        want = pipe.image_processor.postprocess(vae.decode(mode).sample, output_type="pt")
        got = pipe(prompt=[SHORT, GLYPH], height=RES, width=RES + 16, num_inference_steps=1, output_type="pt",
                   callback_on_step_end=lambda p, i, t, kw: {"latents": lat.clone()}).images
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="--resolution.*divisible by 4"):
        fam.encode_images(torch.zeros(1, 3, 34, 32))
    # a VAE whose blocks downsample by 2 where its config says 4 (the pipeline would decode other latents)
    from diffusers import AutoencoderKLHunyuanImage

    from taca.train.families.hunyuanimage import HunyuanImageFamily

    odd = AutoencoderKLHunyuanImage(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
                                    layers_per_block=1, spatial_compression_ratio=4, sample_size=RES,
                                    scaling_factor=SCALE).eval()
    odd_fam = HunyuanImageFamily(SimpleNamespace(vae=odd, vae_scale_factor=4, scheduler=pipe.scheduler,
                                                 transformer=pipe.transformer))
    with pytest.raises(ValueError, match=r"encodes 32x32 images to \(16, 16\) latents.*makes 8x8"):
        odd_fam.encode_images(torch.zeros(1, 3, RES, RES))


def test_captions_cached_alone_and_batch_independent(model):
    """encode_prompt pads every prompt to the fixed 1034 / 128 tokens: a caption's entry, its valid tokens of
    each encoder (none of ByT5 without quotes), is the pipeline's, the same alone as next to others;
    collated, the batch is zero-padded to 1000 / 128 with the masks of its lengths; predict on it equals
    predict on each caption alone (TACA on), and does not change when the padding rows hold anything else."""
    pipe = load(model)
    fam = _family(pipe)
    cpu = torch.device("cpu")
    n, n2 = _valid(pipe, [SHORT, LONG, GLYPH])
    together = fam.split_text(fam.encode_text([SHORT, LONG, GLYPH], cpu, None))
    with torch.no_grad():
        for j, c in enumerate((SHORT, LONG, GLYPH)):
            alone = fam.split_text(fam.encode_text([c], cpu, None))[0]
            pe, _, pe2, _ = pipe.encode_prompt(c, cpu)
            e = together[j]
            assert set(e) == {"prompt_embeds", "prompt_embeds_2"}
            assert e["prompt_embeds"].shape == (n[j], TEXT_DIM) and e["prompt_embeds_2"].shape == (n2[j], GLYPH_DIM)
            assert torch.equal(alone["prompt_embeds"], pe[0, :n[j]])
            assert torch.equal(alone["prompt_embeds_2"], pe2[0, :n2[j]])
            for k in e:
                torch.testing.assert_close(e[k], alone[k], rtol=1e-5, atol=1e-6)
    cond = fam.collate(together)
    assert cond["prompt_embeds"].shape == (3, 1000, TEXT_DIM) and cond["prompt_embeds_2"].shape == (3, 128, GLYPH_DIM)
    assert cond["prompt_embeds_mask"].dtype == torch.int64 and cond["prompt_embeds_mask"].sum(1).tolist() == n
    assert cond["prompt_embeds_mask_2"].sum(1).tolist() == n2 and not cond["prompt_embeds_2"][0].any()
    x = torch.randn(3, *LAT, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.99, 0.975, 0.98])
    check_batch_independent(fam, pipe.transformer, x, sigma, together)
    noisy = dict(cond)
    g = torch.Generator().manual_seed(2)
    noisy["prompt_embeds"] = torch.where(cond["prompt_embeds_mask"].bool()[..., None], cond["prompt_embeds"],
                                         torch.randn(cond["prompt_embeds"].shape, generator=g))
    noisy["prompt_embeds_2"] = torch.where(cond["prompt_embeds_mask_2"].bool()[..., None], cond["prompt_embeds_2"],
                                           torch.randn(cond["prompt_embeds_2"].shape, generator=g))
    with taca.enabled(pipe.transformer, gamma=1.2), torch.no_grad():
        assert torch.equal(fam.predict(pipe.transformer, x, sigma, cond, 1.0),
                           fam.predict(pipe.transformer, x, sigma, noisy, 1.0))


# --- refused ----------------------------------------------------------------------------------------
def test_bad_input_is_refused(model, data, tmp_path):
    """--max-sequence-length (the pipeline takes none); the distilled meanflow transformer, the refiner
    pipeline and a transformer of other in / out channels (image conditioning); a scheduler the pipeline
    cannot run (dynamic shifting), whose t is not 1000 sigma, or not flow matching; a VAE of other channels;
    latents not 4-D: each a clear error naming it."""
    from diffusers import (DDIMScheduler, FlowMatchEulerDiscreteScheduler, HunyuanImagePipeline,
                           HunyuanImageRefinerPipeline)

    from taca.train.families import family_for

    pipe = load(model)
    fam = _family(pipe)
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="--max-sequence-length"):
        fam.encode_text([SHORT], cpu, 16)
    with pytest.raises(ConfigError, match="--max-sequence-length"):
        train(train_config(model, data, tmp_path / "out", resolution=RES, max_sequence_length=16), progress=False)
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        fam.predict(pipe.transformer, torch.zeros(1, 4, 1, 8, 8), torch.ones(1), text_cond(fam, [SHORT], None), 1.0)
    parts = dict(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                 text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="use_meanflow=True.*mean velocity"):
        family_for(HunyuanImagePipeline(transformer=_transformer(use_meanflow=True, guidance_embeds=True),
                                        scheduler=pipe.scheduler, **parts))
    with pytest.raises(ValueError, match="8 input channels for 4 output channels"):
        family_for(HunyuanImagePipeline(transformer=_transformer(in_channels=8, out_channels=4),
                                        scheduler=pipe.scheduler, **parts))
    refiner = HunyuanImageRefinerPipeline(scheduler=pipe.scheduler, vae=None, text_encoder=pipe.text_encoder,
                                          tokenizer=pipe.tokenizer,
                                          transformer=_transformer(in_channels=8, out_channels=4))
    with pytest.raises(ValueError, match="HunyuanImageRefinerPipeline conditions on an image"):
        family_for(refiner)
    for sch, msg in ((FlowMatchEulerDiscreteScheduler(shift=SHIFT, use_dynamic_shifting=True), "use_dynamic_shifting"),
                     (FlowMatchEulerDiscreteScheduler(num_train_timesteps=500), "num_train_timesteps=500"),
                     (FlowMatchEulerDiscreteScheduler(invert_sigmas=True), "invert_sigmas"),
                     (DDIMScheduler(), "DDIMScheduler")):
        with pytest.raises(ValueError, match=msg):
            family_for(HunyuanImagePipeline(transformer=pipe.transformer, scheduler=sch, **parts))
    from taca.train.families.hunyuanimage import HunyuanImageFamily

    with pytest.raises(ConfigError, match="argument --model: .* is a HunyuanImageRefinerPipeline"):
        HunyuanImageFamily.check_config(_cfg(model, data, tmp_path / "o"), "HunyuanImageRefinerPipeline")
    distilled = tmp_path / "distilled"
    (distilled / "transformer").mkdir(parents=True)
    (distilled / "transformer" / "config.json").write_text('{"_class_name": "HunyuanImageTransformer2DModel", '
                                                           '"use_meanflow": true, "guidance_embeds": true}')
    with pytest.raises(ConfigError, match="argument --model: .*use_meanflow=True"):
        HunyuanImageFamily.check_config(_cfg(str(distilled), data, tmp_path / "o"), "HunyuanImagePipeline")
    with pytest.raises(ValueError, match="not a HunyuanImage 2.1 VAE"):
        family_for(HunyuanImagePipeline(transformer=_transformer(in_channels=8, out_channels=8),
                                        scheduler=pipe.scheduler, **parts))


# --- the adapter ---------------------------------------------------------------------------------
def test_adapter_loads_in_diffusers_and_taca(trained, model):
    """taca.enable(pipe, lora=) gates the adapter in (the pipeline has no load_lora_weights: taca loads it
    through the transformer); diffusers' transformer.load_lora_adapter(prefix="transformer") loads the same
    layers, and with TACA on both predict the same, not the stock model's."""
    out = trained[0].out
    call = dict(prompt=GLYPH, height=RES, width=RES, num_inference_steps=2, output_type="latent")
    check_gated_pipeline(load(model), out, call)
    fresh = load(model)
    fam = _family(fresh)
    fresh.transformer.load_lora_adapter(out, prefix="transformer", weight_name=ADAPTER)
    lora = {n for n, m in fresh.transformer.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    assert lora == set(flux_attn_names(N_DOUBLE, N_SINGLE))
    x = torch.randn(1, *LAT, generator=torch.Generator().manual_seed(2))
    check_loaded_predict(fam, fresh, load(model), out, x, GLYPH, None)
