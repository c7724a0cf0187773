"""taca train on a tiny ErnieImagePipeline (a 3-layer Mistral3Model text encoder with a word-level
tokenizer that prepends <s> as Mistral's does, a 2-level AutoencoderKLFlux2 with non-trivial batch-
norm statistics and its default batch_norm_eps 1e-4 where the pipeline decodes with 1e-5, a 2-layer
ErnieImageTransformer2DModel whose zero-initialized AdaLN and output layers are randomized so that
attention matters), saved with save_pretrained, random weights, CPU: gamma in every joint attention
call of every training forward, with and without gradient checkpointing, the control run stock; the
family's predict is the pipeline's own denoising step (timestep 1000 sigma, the output as it is, the
padded text with its lengths, with and without CFG's batch) and its latents the ones the pipeline
decodes (2x2 patches, batch-norm stats with eps 1e-5); captions cached at their own lengths as the
pipeline encodes each one, independent of their batch; bad input refused; the adapter loads through
diffusers and taca."""
from functools import partial

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")
pytest.importorskip("transformers")

import taca  # noqa: E402
from taca.train import train  # noqa: E402

from train_checks import (cache_dir, cached_text, check_adapter_in_pipeline, check_alone_as_in_batch,  # noqa: E402,F401
                          check_batch_independent, check_same_adapter, check_taca_run, checked_family, checkpointed_run,
                          control_run, data_fixture, load, LONG, model_fixture, peft_hits, Record, run_fixture,
                          saved_lora_modules, SHORT, text_cond, train_config, write_captioned_data)

RES = 32  # 2-level VAE (x2) and 2x2 patches: vae_scale_factor 4 -> 8x8 latents of 16 channels -> 64 image tokens
N_LAYERS = 2
TEXT_DIM = 24
LAT = (16, RES // 4, RES // 4)
# tests/test_models_ernie_image.py's tiny transformer, with 16 = 4 x 4 latent channels (the 2x2 patches)
TRANSFORMER = dict(hidden_size=64, num_attention_heads=2, num_layers=N_LAYERS, ffn_hidden_size=64, in_channels=16,
                   out_channels=16, patch_size=1, text_in_dim=TEXT_DIM, rope_axes_dim=(8, 12, 12))
# a static shift (4.0: the official sigmas an MLX port of ERNIE-Image records, 1, 0.9655, ... for 8 steps;
# not checked against the hub's scheduler config here)
SHIFT = 4.0
SCHEDULER = dict(num_train_timesteps=1000, shift=SHIFT)
_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
_FF = ("gate_proj", "up_proj", "linear_fc2")


def _tokenizer():
    from taca.demo import _word_tokenizer

    return _word_tokenizer(["<unk>", "<s>", "</s>", "<pad>"], "<s> $A", pad="<pad>", unk="<unk>", eos="</s>",
                           bos="<s>", max_length=512)[0]


def _transformer(**kw):
    from diffusers import ErnieImageTransformer2DModel

    t = ErnieImageTransformer2DModel(**dict(TRANSFORMER, **kw))
    with torch.no_grad():  # zero-initialized in diffusers: the output would not depend on attention at all
        for p in (t.adaLN_modulation[-1].weight, t.adaLN_modulation[-1].bias, t.final_linear.weight,
                  t.final_linear.bias):
            p.normal_(0.0, 0.2)
    return t.eval()


def build_pipeline(seed=0):
    from diffusers import AutoencoderKLFlux2, ErnieImagePipeline, FlowMatchEulerDiscreteScheduler
    from transformers import Mistral3Config, Mistral3Model, MistralConfig, PixtralVisionConfig

    torch.manual_seed(seed)
    tok = _tokenizer()
    n = len(tok)
    te = Mistral3Model(Mistral3Config(
        text_config=MistralConfig(vocab_size=n, hidden_size=TEXT_DIM, intermediate_size=32, num_hidden_layers=3,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=12,
                                  max_position_embeddings=512),
        vision_config=PixtralVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=16, patch_size=4, head_dim=4),
        image_token_index=n - 1)).eval()
    vae = AutoencoderKLFlux2(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    g = torch.Generator().manual_seed(5)
    vae.bn.running_mean.copy_(torch.randn(16, generator=g) * 0.3)
    var = torch.rand(16, generator=g) * 2 + 0.3
    var[:4] = torch.tensor([0.01, 0.02, 0.005, 0.03])  # small variances: the eps (1e-5 vs the config's 1e-4) matters
    vae.bn.running_var.copy_(var)
    pipe = ErnieImagePipeline(transformer=_transformer(), vae=vae.eval(), text_encoder=te, tokenizer=tok,
                              scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER))
    pipe.set_progress_bar_config(disable=True)
    return pipe


_cfg = partial(train_config, resolution=RES, max_sequence_length=None)  # the pipeline takes no max_sequence_length
model = model_fixture(build_pipeline, "ernie_image")
data = data_fixture(4, write_captioned_data)  # SHORT, LONG and two more: three text lengths, batches mix them
trained = run_fixture(lambda model, data, cache_dir, out: train(_cfg(model, data, out, cache_dir=cache_dir),
                                                                progress=False), where=("runs", "taca"))


def _family(pipe):
    from taca.train.families.ernie_image import ErnieImageFamily

    return checked_family(pipe, ErnieImageFamily, "ernie_image")


def _names(n_layers, parts, where):
    return [f"layers.{i}.{where}.{p}" for i in range(n_layers) for p in parts]




# --- the family and its targets ------------------------------------------------------------------
def test_family_and_targets(model):
    from diffusers import ErnieImagePipeline

    pipe = load(model)
    fam = _family(pipe)
    assert fam.shift() == SHIFT and fam.lora_saver() is ErnieImagePipeline is type(pipe)
    attn = fam.target_modules("attn")
    assert attn == _names(N_LAYERS, _ATTN, "self_attention")
    assert fam.target_modules("attn+ff") == attn + _names(N_LAYERS, _FF, "mlp")
    linear = {n for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(fam.target_modules("attn+ff")) <= linear
    assert fam.target_modules(["to_q"]) == ["to_q"]


def test_targets_on_the_real_config():
    """ERNIE-Image's transformer config (36 layers, 32 heads of 128, FFN 12288, 128 latent channels,
    text_in_dim 3072: the config.json an MLX port records; the class's defaults are smaller), built
    empty: "attn" is exactly every layer's self_attention projections, "attn+ff" adds exactly their
    MLPs (no embedder, AdaLN, text_proj or final layer)."""
    from types import SimpleNamespace

    from accelerate import init_empty_weights
    from diffusers import ErnieImageTransformer2DModel, FlowMatchEulerDiscreteScheduler

    from taca.train.families.ernie_image import ErnieImageFamily

    with init_empty_weights():
        t = ErnieImageTransformer2DModel(hidden_size=4096, num_attention_heads=32, num_layers=36, ffn_hidden_size=12288,
                                         in_channels=128, out_channels=128, patch_size=1, text_in_dim=3072,
                                         rope_theta=256, rope_axes_dim=(32, 48, 48))
    fam = ErnieImageFamily(SimpleNamespace(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), transformer=t))
    linear = {n for n, m in t.named_modules() if isinstance(m, torch.nn.Linear)}
    attn = peft_hits(linear, fam.target_modules("attn"))
    assert attn == {n for n in linear if ".self_attention." in n} and len(attn) == 36 * 4
    ff = peft_hits(linear, fam.target_modules("attn+ff")) - attn
    assert ff == {n for n in linear if ".mlp." in n} and len(ff) == 36 * 3
    assert all(peft_hits(linear, [k]) for k in fam.target_modules("attn+ff"))  # no dead name


# --- training ----------------------------------------------------------------------------------
def test_gamma_on_in_every_training_forward(trained, model):
    """3 steps of batch 2 on captions of three lengths: gamma 1.2 in both layers' joint attention of
    every forward; each caption cached at its own length (the pipeline's encoding of it alone), the
    text only; the adapter on the attention projections."""
    res, calls = trained
    check_taca_run(res, calls, 3 * N_LAYERS)
    assert saved_lora_modules(res.out) == {f"transformer.{n}" for n in _names(N_LAYERS, _ATTN, "self_attention")}
    tok = load(model).tokenizer
    captions = [SHORT, LONG, "a blue circle", "a small green square on a red background"]
    entries = cached_text(res)
    assert all(set(e) == {"prompt_embeds"} for e in entries)
    assert sorted(e["prompt_embeds"].shape[0] for e in entries) == sorted(len(tok(c).input_ids) for c in captions)
    assert len({e["prompt_embeds"].shape[0] for e in entries}) == 3  # 4, 4, 9 and 14 tokens


def test_gradient_checkpointing_recomputes_taca(trained, model, data, cache_dir, tmp_path, monkeypatch):
    """Every layer runs again in the backward, with its gamma (the model passes no attention kwargs:
    the adapter hands the state to the recomputed blocks); the same losses and adapter."""
    res = checkpointed_run(partial(_cfg, model, data, cache_dir=cache_dir), trained[0], tmp_path / "out",
                           monkeypatch, 2 * 3 * N_LAYERS)
    check_same_adapter(trained[0].out, res.out)


def test_control_runs_stock_attention(model, data, cache_dir, tmp_path, monkeypatch):
    res = control_run(partial(_cfg, model, data, cache_dir=cache_dir), tmp_path / "out", monkeypatch, max_steps=2)
    assert len(res.losses) == 2


# --- the pipeline's conventions ------------------------------------------------------------------
@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_predict_is_the_pipelines_denoising_step(model, guidance_scale):
    """ErnieImagePipeline's own loop, 2 steps, prompts of 5 and 15 tokens (with CFG: the batch [the
    negative "" (1 token) x 2, the prompts], padded to its longest), TACA on through the pipeline:
    the family's predict, on the captions as cached and collated, at the scheduler's sigmas, makes
    the pipeline's transformer call (hidden states, timestep = 1000 sigma in float32, the zero-padded
    text, its lengths; nothing else) and returns its output as is; Euler steps on it (guided as the
    pipeline guides) land on the pipeline's latents, and the gammas are the pipeline's."""
    pipe = load(model)
    fam = _family(pipe)
    prompts = [SHORT, LONG]
    cfg = guidance_scale > 1
    captions = ["", ""] + prompts if cfg else prompts
    n = len(captions)
    lat = torch.randn(2, *LAT, generator=torch.Generator().manual_seed(3))
    rec = Record(pipe.transformer)
    with taca.enabled(pipe, gamma=1.2) as h, torch.no_grad():
        gammas = []
        out = pipe(prompt=prompts, latents=lat.clone(), height=RES, width=RES, num_inference_steps=2,
                   guidance_scale=guidance_scale, output_type="latent",
                   callback_on_step_end=lambda p, i, t, kw: gammas.append(h.last_gamma) or {}).images
        sigmas = pipe.scheduler.sigmas
        assert sigmas.tolist() == pytest.approx([1.0, SHIFT * 0.5 / (1 + (SHIFT - 1) * 0.5), 0.0])  # shifted
        cond = text_cond(fam, captions, None)
        lengths = [len(pipe.tokenizer(c).input_ids) for c in captions]
        assert cond["prompt_embeds"].shape == (n, max(lengths), TEXT_DIM) and len(set(lengths)) > 1
        x = lat
        for i in range(2):
            x_in = torch.cat([x, x]) if cfg else x
            v = fam.predict(pipe.transformer, x_in, sigmas[i].expand(n), cond, 1.0)
            gammas.append(h.last_gamma)
            kw, model_out = rec.calls[i]
            mine, mine_out = rec.calls[2 + i]
            assert set(kw) == set(mine) == {"hidden_states", "timestep", "text_bth", "text_lens", "return_dict"}
            assert torch.equal(kw["hidden_states"], x_in) and torch.equal(mine["hidden_states"], x_in)
            assert torch.equal(kw["timestep"], torch.full((n,), float(sigmas[i] * 1000)))  # t = 1000 sigma
            for k in ("timestep", "text_bth", "text_lens"):
                assert mine[k].dtype == kw[k].dtype and torch.equal(mine[k], kw[k]), k
            assert kw["text_lens"].tolist() == lengths
            assert torch.equal(mine_out, v) and torch.equal(v, model_out)  # the velocity, not negated
            if cfg:
                u, c = v.chunk(2)
                v = u + guidance_scale * (c - u)
            x = x + (sigmas[i + 1] - sigmas[i]) * v  # the scheduler's Euler step
    rec.h.remove()
    torch.testing.assert_close(x, out, rtol=0, atol=1e-6)
    # step 0 (sigma 1) is in the window, step 1 (sigma 0.8) is not, for both paths
    full = torch.full((n,), 1.2)
    assert torch.allclose(gammas[0], full) and gammas[1] is None
    assert torch.allclose(gammas[2], full) and gammas[3] is None


def test_predict_in_bf16_is_the_pipelines_call(model):
    """With bf16 weights the pipeline hands the transformer t and the padded text in the weights'
    dtype (t = 1000 sigma computed in float32, then rounded to bf16: at 3 steps sigma_1 = 0.8889 is
    t 888, where bf16(sigma) * 1000 would be 892); predict on the bf16 latents of each step (as
    training hands them) makes the same calls, TACA on, and returns their outputs."""
    pipe = load(model)
    pipe.transformer.to(torch.bfloat16)
    fam = _family(pipe)
    prompts = [SHORT, LONG]
    lat = torch.randn(2, *LAT, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    rec = Record(pipe.transformer)
    with taca.enabled(pipe, gamma=1.2), torch.no_grad():
        pipe(prompt=prompts, latents=lat.clone(), height=RES, width=RES, num_inference_steps=3, guidance_scale=1.0,
             output_type="latent")
        cond = text_cond(fam, prompts, None)
        sigmas = pipe.scheduler.sigmas
        outs = [fam.predict(pipe.transformer, kw["hidden_states"], sigmas[i].expand(2), cond, 1.0)
                for i, (kw, _) in enumerate(rec.calls[:3])]
    rec.h.remove()
    assert [float(kw["timestep"][0]) for kw, _ in rec.calls[:3]] == [1000.0, 888.0, 668.0]
    for (kw, out), (mine, mine_out), v in zip(rec.calls[:3], rec.calls[3:], outs):
        for k in ("hidden_states", "timestep", "text_bth", "text_lens"):
            assert mine[k].dtype == kw[k].dtype and torch.equal(mine[k], kw[k]), k
        assert kw["timestep"].dtype == torch.bfloat16 and kw["text_bth"].dtype == torch.bfloat16
        assert torch.equal(v, out) and v.dtype == torch.bfloat16


def test_latents_are_what_the_pipeline_decodes(model):
    """encode_images = the posterior mode, patchified 2x2, normalized with the batch-norm running
    stats and the pipeline's eps 1e-5 (not the VAE config's 1e-4); put in place of the pipeline's
    last latents they decode, through its own path (x std + mean, unpatchify, vae.decode), to the
    VAE's reconstruction of the mode."""
    pipe = load(model)
    vae = pipe.vae
    fam = _family(pipe)
    assert vae.config.batch_norm_eps == 1e-4 and vae.bn.running_var.min() < 0.01
    px = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(0)) * 2 - 1
    lat = fam.encode_images(px)
    assert lat.shape == (2, *LAT)
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + 1e-5)
    with torch.no_grad():
        mode = vae.encode(px).latent_dist.mode()
        torch.testing.assert_close(lat, (pipe._patchify_latents(mode) - mean) / std, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(pipe._unpatchify_latents(lat * std + mean), mode, rtol=1e-5, atol=1e-6)
        want = pipe.image_processor.postprocess(vae.decode(mode).sample, output_type="pt")
        got = pipe(prompt=["a red square", "a blue circle"], height=RES, width=RES, num_inference_steps=1,
                   guidance_scale=1.0, output_type="pt",
                   callback_on_step_end=lambda p, i, t, kw: {"latents": lat.clone()}).images
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_captions_cached_alone_and_batch_independent(model):
    """encode_prompt encodes each prompt alone: a caption's entry is its own (L, D) embedding, the
    pipeline's, the same alone or next to a longer one; collated, the batch is zero-padded after
    each caption's tokens with the mask of its lengths (the pipeline's _pad_text); predict on it
    equals predict on each caption alone (TACA on)."""
    pipe = load(model)
    fam = _family(pipe)
    n = [len(pipe.tokenizer(c).input_ids) for c in (SHORT, LONG)]
    assert n[0] < n[1]
    _, both, _ = check_alone_as_in_batch(fam, None, n)
    with torch.no_grad():
        for e, c in zip(both, (SHORT, LONG)):
            assert torch.equal(e["prompt_embeds"], pipe.encode_prompt(c, torch.device("cpu"))[0])
    cond = fam.collate(both)
    assert cond["prompt_embeds_mask"].sum(1).tolist() == n and not cond["prompt_embeds"][0, n[0]:].any()
    x = torch.randn(2, *LAT, generator=torch.Generator().manual_seed(1))
    check_batch_independent(fam, pipe.transformer, x, torch.tensor([0.99, 0.975]), both)


# --- bad input -----------------------------------------------------------------------------------
def test_bad_input_is_refused(model, data, tmp_path):
    """--max-sequence-length (the pipeline takes none), images the VAE's factor does not divide, a
    scheduler the pipeline cannot run (dynamic shifting) or whose t is not 1000 sigma, and a VAE
    whose patchified channels are not the transformer's: each a clear error naming it."""
    from diffusers import ErnieImagePipeline, FlowMatchEulerDiscreteScheduler

    from taca.train.config import ConfigError
    from taca.train.families import family_for

    pipe = load(model)
    fam = _family(pipe)
    with pytest.raises(ValueError, match="--max-sequence-length"):
        fam.encode_text(["a cat"], torch.device("cpu"), 16)
    with pytest.raises(ConfigError, match="--max-sequence-length"):
        train(train_config(model, data, tmp_path / "out", resolution=RES, max_sequence_length=16), progress=False)
    with pytest.raises(ValueError, match="--resolution.*divisible by 4"):
        fam.encode_images(torch.zeros(1, 3, 34, 34))
    parts = dict(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    dyn = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        family_for(ErnieImagePipeline(transformer=pipe.transformer, scheduler=dyn, **parts))
    with pytest.raises(ValueError, match="num_train_timesteps=500"):
        family_for(ErnieImagePipeline(transformer=pipe.transformer, scheduler=FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=500, shift=SHIFT), **parts))
    with pytest.raises(ValueError, match="not an ERNIE-Image VAE"):
        family_for(ErnieImagePipeline(transformer=_transformer(in_channels=8, out_channels=8),
                                      scheduler=pipe.scheduler, **parts))


# --- the adapter ---------------------------------------------------------------------------------
def test_adapter_loads_in_diffusers_and_taca(trained, model):
    call = dict(prompt="a red square", height=RES, width=RES, num_inference_steps=2, guidance_scale=1.0,
                output_type="latent")
    check_adapter_in_pipeline(partial(load, model), trained[0].out, call, 4 * N_LAYERS, prefix="layers.")
