"""taca train on a tiny BriaPipeline (a T5 encoder with the demo's word-level T5 tokenizer, a 2-level
AutoencoderKL with FLUX.1's shift and scale, tests/test_models_bria.py's 2 + 2-block
BriaTransformer2DModel with 4 latent channels and its static-shift scheduler), saved with
save_pretrained, random weights, CPU: gamma in every joint attention call of every training forward
(with and without gradient checkpointing, which trains the same adapter), the control run stock; the
family's predict is the pipeline's own transformer call (packing, image ids, float32 zero text ids,
timestep 1000 sigma, no guidance, the output as it is; the conditional half of its CFG batch) and
Euler steps with it land on the pipeline's result under a shifted schedule whose shift training
uses too; the latents are what the pipeline decodes; captions zero-padded to the fixed length as
the pipeline pads them, independent of their batch; bad max_sequence_length, schedulers and FIBO
refused; the adapter loads through diffusers (the transformer's load_lora_adapter: the pipeline
has no load_lora_weights) and taca.enable(lora=)."""
from functools import partial
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

import taca  # noqa: E402
from taca.train import train  # noqa: E402
from taca.train.config import ConfigError  # noqa: E402

from test_models_bria import BRIA_SCHEDULER, TINY  # noqa: E402  (the adapter tests' tiny configs)
from train_checks import (check_alone_as_in_batch, check_batch_independent, check_flux_vae_latents,  # noqa: E402
                          check_same_adapter, check_taca_run, check_transformer_loaded_adapter,
                          check_zero_model_decodes, checked_family, checkpointed_run, control_run, data_fixture,
                          flux_attn_names, flux_ff_names, load, LONG, model_fixture, peft_hits, record_calls, RUN_FILES,
                          run_fixture, saved_lora_modules, SHORT, text_cond, train_config)

RES = 32  # 32x32 images -> 16x16 latents (2-level VAE) -> 2x2 packing -> 64 image tokens
TEXT_LEN = 16  # every caption zero-padded to 16 text tokens
TEXT_DIM = TINY["joint_attention_dim"]  # 24
N_DOUBLE, N_SINGLE = TINY["num_layers"], TINY["num_single_layers"]
N_JOINT = N_DOUBLE + N_SINGLE  # every attention of the model is joint


def _vae(shift=0.1159, scale=0.3611):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=RES, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=shift, scaling_factor=scale)


def build_pipeline(seed=0):
    from diffusers import BriaPipeline, BriaTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import T5EncoderModel

    from taca.demo import _t5_config, _t5_tokenizer

    tok, vocab = _t5_tokenizer()
    torch.manual_seed(seed)
    te = T5EncoderModel(_t5_config(vocab, d_model=TEXT_DIM, d_kv=8, d_ff=48))
    pipe = BriaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**BRIA_SCHEDULER), vae=_vae(), text_encoder=te,
                        tokenizer=tok, transformer=BriaTransformer2DModel(**TINY))
    for m in (te, pipe.vae, pipe.transformer):
        m.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _family(pipe):
    from taca.train.families.bria import BriaFamily

    return checked_family(pipe, BriaFamily, "bria")








def _n_tokens(pipe, caption):
    """The caption's T5 tokens (</s> included) as _get_t5_prompt_embeds encodes them."""
    return len(pipe.tokenizer(caption, max_length=TEXT_LEN, truncation=True).input_ids)


# alpha 8 at rank 4: loading the adapter back must read the scale from the file's metadata
_cfg = partial(train_config, resolution=RES, max_sequence_length=TEXT_LEN, alpha=8.0)
model = model_fixture(build_pipeline, "bria")
data = data_fixture(4)
trained = run_fixture(lambda model, data, out: train(_cfg(model, data, out), progress=False),
                      where=("runs", "taca"))  # one TACA run, kept for the adapter tests


def test_family_and_targets(model):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from taca.models import adapter_class
    from taca.train.families.bria import BriaFamily

    pipe = load(model)
    assert adapter_class(pipe.transformer).name == "bria"
    fam = _family(pipe)
    assert fam.shift() == 1.0  # the static shift of the model's scheduler (1 here, as BRIA-3.2's is taken)
    assert callable(fam.lora_saver().save_lora_weights)
    assert fam.text_modules() == [pipe.text_encoder] and fam.image_modules() == [pipe.vae]
    linear = {n for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    attn = peft_hits(linear, fam.target_modules("attn"))
    assert attn == set(flux_attn_names(N_DOUBLE, N_SINGLE))
    assert peft_hits(linear, fam.target_modules("attn+ff")) - attn == flux_ff_names(N_DOUBLE)
    assert fam.target_modules(["to_q"]) == ["to_q"]
    # a static shift is applied to the pipeline's sigmas by set_timesteps: training shifts alike;
    # under dynamic shifting (FLUX.1's mu) the sampled sigmas are not shifted
    assert BriaFamily(SimpleNamespace(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))).shift() == 3.0
    dyn = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    assert BriaFamily(SimpleNamespace(scheduler=dyn)).shift() == 1.0


def test_targets_on_the_real_config():
    """BriaTransformer2DModel's own defaults (19 double- and 38 single-stream blocks, 24 heads of 128,
    text dim 4096, 64 packed channels; briaai/BRIA-3.2's config cannot be read offline), built
    empty: "attn" hits exactly the joint attention projections of all 57 blocks, "attn+ff" adds the
    double blocks' feed-forwards only."""
    from accelerate import init_empty_weights
    from diffusers import BriaTransformer2DModel

    from taca.train.families.bria import BriaFamily

    with init_empty_weights():
        t = BriaTransformer2DModel()
    assert (t.config.num_layers, t.config.num_single_layers, t.inner_dim) == (19, 38, 3072)
    fam = BriaFamily(SimpleNamespace(scheduler=None, transformer=t))
    linear = {n for n, m in t.named_modules() if isinstance(m, torch.nn.Linear)}
    attn = peft_hits(linear, fam.target_modules("attn"))
    assert attn == set(flux_attn_names(19, 38)) and len(attn) == 19 * 8 + 38 * 3
    assert peft_hits(linear, fam.target_modules("attn+ff")) - attn == flux_ff_names(19)
    assert all(peft_hits(linear, [k]) for k in fam.target_modules("attn+ff"))  # no dead name


def test_gamma_on_in_every_training_forward(trained):
    res, calls = trained
    # every joint attention of every forward: 3 steps x (2 double + 2 single blocks)
    check_taca_run(res, calls, 3 * N_JOINT, files=RUN_FILES[:3])
    assert saved_lora_modules(res.out) == {f"transformer.{n}" for n in flux_attn_names(N_DOUBLE, N_SINGLE)}


def test_gradient_checkpointing_recomputes_taca(trained, model, data, tmp_path, monkeypatch):
    """With checkpointing every block runs twice per step (forward, recompute in the backward), both
    times with gamma; the gradients are the same, so the losses and the adapter are too."""
    res = checkpointed_run(partial(_cfg, model, data), trained[0], tmp_path / "out", monkeypatch, 2 * 3 * N_JOINT)
    check_same_adapter(trained[0].out, res.out)


def test_control_runs_stock_attention(model, data, tmp_path, monkeypatch):
    res = control_run(partial(_cfg, model, data), tmp_path / "out", monkeypatch, max_steps=2)
    assert len(res.losses) == 2




def test_predict_is_the_pipelines_denoising_step(model):
    """BriaPipeline's own loop (3 steps, no CFG, a batch of 2 prompts of different lengths, a non-square
    32x48 image, TACA on) with a static-shift-3 scheduler: its sigmas are the training grid's
    (get_original_sigmas) shifted by 3, the family's shift; the transformer call predict makes on the
    unpacked latents, the scheduler's sigma and the cached text is the pipeline's call bit for bit (the
    same packed tokens, image ids, float32 zero text ids, embeddings, float32 timestep 1000 sigma, no
    guidance, no other argument), its output the pipeline's, and Euler steps with it land on the
    pipeline's result. With CFG the pipeline's batch is [zeros, the prompt]: predict is its
    conditional half."""
    from diffusers import BriaPipeline, FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.bria.pipeline_bria import get_original_sigmas

    pipe = load(model)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(**dict(BRIA_SCHEDULER, shift=3.0))
    fam = _family(pipe)
    assert fam.shift() == 3.0
    t = pipe.transformer
    prompts = [SHORT, LONG]
    H, W = 32, 48
    h, w = 2 * (H // pipe.vae_scale_factor), 2 * (W // pipe.vae_scale_factor)  # prepare_latents' grid
    assert (h, w) == (16, 24)
    x = torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(3))
    calls, hook = record_calls(t)
    with taca.enabled(pipe, gamma=1.2), torch.no_grad():
        out = pipe(prompt=prompts, latents=BriaPipeline._pack_latents(x, 2, 4, h, w), height=H, width=W,
                   num_inference_steps=3, guidance_scale=1.0, max_sequence_length=TEXT_LEN,
                   output_type="latent").images
        seen = list(calls)
        assert len(seen) == 3
        sigmas, timesteps = pipe.scheduler.sigmas, pipe.scheduler.timesteps
        s0 = torch.from_numpy(get_original_sigmas(1000, 3))
        torch.testing.assert_close(sigmas[:-1], 3 * s0 / (1 + 2 * s0), rtol=0, atol=1e-7)
        cond = text_cond(fam, prompts, TEXT_LEN)
        for i in range(3):
            pkw, pipe_out, pg = seen[i]
            xi = BriaPipeline._unpack_latents(pkw["hidden_states"], H, W, pipe.vae_scale_factor)
            torch.testing.assert_close(xi, x, rtol=0, atol=0 if i == 0 else 1e-6)  # our Euler steps: theirs
            v = fam.predict(t, xi, sigmas[i].expand(2), cond, 3.5)  # --guidance: no guidance embedding, unused
            kw, model_out, g = calls[-1]
            assert set(kw) == {"hidden_states", "timestep", "encoder_hidden_states", "txt_ids", "img_ids",
                               "return_dict"}
            assert set(pkw) == set(kw) | {"attention_kwargs"} and pkw["attention_kwargs"] is None
            for k in ("hidden_states", "timestep", "encoder_hidden_states", "txt_ids", "img_ids"):
                assert kw[k].dtype == pkw[k].dtype and torch.equal(kw[k], pkw[k]), k
            assert kw["timestep"].dtype == torch.float32 and torch.equal(kw["timestep"], timesteps[i].expand(2))
            assert not kw["txt_ids"].any() and kw["txt_ids"].shape == (TEXT_LEN, 3)
            assert torch.equal(model_out, pipe_out)
            assert torch.equal(v, BriaPipeline._unpack_latents(pipe_out, H, W, pipe.vae_scale_factor))  # not negated
            # sigma 1 is in the window (gamma 1.2 for both samples), the later steps are not, for both paths
            if i == 0:
                assert torch.allclose(g, torch.full((2,), 1.2)) and torch.allclose(pg, torch.full((2,), 1.2))
            else:
                assert g is None and pg is None
            x = x + (sigmas[i + 1] - sigmas[i]) * v  # the scheduler's Euler step
        torch.testing.assert_close(BriaPipeline._pack_latents(x, 2, 4, h, w), out, rtol=0, atol=1e-6)

        # CFG: one step, the pipeline's batch [negative = zeros (no negative prompt), positive]
        calls.clear()
        pipe(prompt=[SHORT], latents=BriaPipeline._pack_latents(x[:1], 1, 4, h, w), height=H, width=W,
             num_inference_steps=1, guidance_scale=5.0, max_sequence_length=TEXT_LEN, output_type="latent")
        pkw, pipe_out, _ = calls[0]
        one = text_cond(fam, [SHORT], TEXT_LEN)
        assert torch.equal(pkw["encoder_hidden_states"], torch.cat([torch.zeros_like(one["prompt_embeds"]),
                                                                      one["prompt_embeds"]]))
        v = fam.predict(t, x[:1], torch.ones(1), one, 1.0)
    hook.remove()
    torch.testing.assert_close(BriaPipeline._pack_latents(v, 1, 4, h, w), pipe_out[1:], rtol=0, atol=1e-5)

    # in bf16 weights the pipeline's dtypes: text ids float32 zeros (encode_prompt), image ids in the
    # embeddings' dtype (prepare_latents), t the scheduler's float32 timestep; predict's the same
    bf = torch.bfloat16
    with torch.no_grad():
        text_ids = pipe.encode_prompt([SHORT], do_classifier_free_guidance=False, max_sequence_length=TEXT_LEN)[2][0]
        _, img_ids = pipe.prepare_latents(1, 4, H, W, bf, torch.device("cpu"), None, latents=torch.zeros(1, 1))
    got = {}
    stub = lambda **kw: (got.update(kw), (torch.zeros_like(kw["hidden_states"]),))[1]  # noqa: E731
    fam.predict(stub, x[:1].to(bf), sigmas[1:2], {"prompt_embeds": one["prompt_embeds"].to(bf)}, 1.0)
    assert got["txt_ids"].dtype == text_ids.dtype == torch.float32 and torch.equal(got["txt_ids"], text_ids)
    assert got["img_ids"].dtype == img_ids.dtype == bf and torch.equal(got["img_ids"], img_ids[0])
    assert got["timestep"].dtype == torch.float32 and torch.equal(got["timestep"], timesteps[1:2])


def test_latents_are_what_the_pipeline_decodes(model, monkeypatch):
    """encode_images is (mode - 0.1159) * 0.3611; packed and handed to the pipeline as its latents
    with a transformer that predicts 0 (the Euler steps keep them), the pipeline's own unpack,
    denormalization and decode give the VAE's reconstruction of the mode. A VAE config without a
    shift_factor: the pipeline sets it to 0, and the latents are mode * scale."""
    from diffusers import BriaPipeline

    pipe = load(model)
    fam = _family(pipe)
    px = torch.rand(2, 3, RES, RES + 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    h, w = 2 * (RES // pipe.vae_scale_factor), 2 * ((RES + 16) // pipe.vae_scale_factor)
    lat, mode = check_flux_vae_latents(fam, pipe.vae, px, (2, 4, h, w))
    assert not torch.allclose(lat, mode, atol=1e-2)
    packed = BriaPipeline._pack_latents(lat, 2, 4, h, w)
    check_zero_model_decodes(pipe, mode, monkeypatch, dict(latents=packed, height=RES, width=RES + 16,
                                                           max_sequence_length=TEXT_LEN))
    torch.manual_seed(1)
    bare = BriaPipeline(scheduler=pipe.scheduler, vae=_vae(shift=None, scale=0.5).eval(), text_encoder=None,
                        tokenizer=None, transformer=pipe.transformer)
    assert bare.vae.config.shift_factor == 0
    with torch.no_grad():
        torch.testing.assert_close(_family(bare).encode_images(px), bare.vae.encode(px).latent_dist.mode() * 0.5)


def test_captions_padded_to_the_fixed_length_and_batch_independent(model):
    """encode_prompt encodes each caption alone and appends zeros up to TEXT_LEN (no mask for the
    model): a caption's entry is its (TEXT_LEN, D) embedding, the same alone or next to a longer one,
    the pipeline's own; predict on a batch equals predict on each caption alone; the same caption
    padded to another length gives another prediction (train at the length you generate with)."""
    pipe = load(model)
    fam = _family(pipe)
    alone, both, _ = check_alone_as_in_batch(fam, TEXT_LEN, [TEXT_LEN, TEXT_LEN])
    n = [_n_tokens(pipe, c) for c in (SHORT, LONG)]
    assert 0 < n[0] < n[1] < TEXT_LEN
    with torch.no_grad():
        ref = pipe.encode_prompt([SHORT, LONG], do_classifier_free_guidance=False, max_sequence_length=TEXT_LEN)[0]
    assert torch.equal(both[0]["prompt_embeds"], alone[0]["prompt_embeds"])  # each caption encoded alone
    for j, e in enumerate(both):
        assert torch.equal(e["prompt_embeds"], ref[j])
        assert e["prompt_embeds"][:n[j]].abs().sum(-1).gt(0).all() and not e["prompt_embeds"][n[j]:].any()
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.99, 0.975])
    check_batch_independent(fam, pipe.transformer, x, sigma, both)
    with torch.no_grad():
        short = fam.predict(pipe.transformer, x[:1], sigma[:1], fam.collate(alone), 1.0)
        longer = fam.predict(pipe.transformer, x[:1], sigma[:1], text_cond(fam, [SHORT], TEXT_LEN + 8), 1.0)
    assert not torch.allclose(short, longer, atol=1e-4)


def test_max_sequence_length_and_bad_input(model):
    """None is the pipeline's default, 128; more than 512 (which the pipeline refuses to generate with)
    or a non-positive length is a ConfigError naming --max-sequence-length; latents of odd size, or
    not 4-D, and a pipeline without its text encoder are ValueErrors that say so; a DDIM scheduler
    (an eps model for BriaPipeline), invert_sigmas and another num_train_timesteps are refused; a
    Bria FIBO transformer has no training family, and this one refuses it naming the pipeline."""
    from diffusers import BriaFiboTransformer2DModel, DDIMScheduler, FlowMatchEulerDiscreteScheduler

    from taca.train.families import family_for
    from taca.train.families.bria import BriaFamily

    pipe = load(model)
    fam = _family(pipe)
    cpu = torch.device("cpu")
    assert fam.encode_text([SHORT], cpu, None)["prompt_embeds"].shape == (1, 128, TEXT_DIM)
    for bad in (513, 0):
        with pytest.raises(ConfigError, match="--max-sequence-length"):
            fam.encode_text([SHORT], cpu, bad)
    cond = text_cond(fam, [SHORT], TEXT_LEN)
    with pytest.raises(ValueError, match="even height and width"):
        fam.predict(pipe.transformer, torch.zeros(1, 4, 15, 16), torch.tensor([0.99]), cond, 1.0)
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        fam.predict(pipe.transformer, torch.zeros(1, 4, 1, 16, 16), torch.tensor([0.99]), cond, 1.0)
    for sch, msg in ((DDIMScheduler(), "DDIMScheduler .*'epsilon'.*FlowMatchEulerDiscreteScheduler"),
                     (FlowMatchEulerDiscreteScheduler(invert_sigmas=True), "invert_sigmas"),
                     (FlowMatchEulerDiscreteScheduler(num_train_timesteps=500), "num_train_timesteps=500")):
        with pytest.raises(ValueError, match=msg):
            BriaFamily(SimpleNamespace(scheduler=sch, transformer=pipe.transformer))
    torch.manual_seed(0)
    fibo = BriaFiboTransformer2DModel(**TINY, text_encoder_dim=20)
    fibo_pipe = type("BriaFiboPipeline", (), {})()
    fibo_pipe.transformer = fibo
    assert type(family_for(fibo_pipe)).__name__ == "BriaFiboFamily"  # FIBO's own family, not this one
    with pytest.raises(ValueError, match="Bria FIBO: structured JSON prompts.*bria_fibo"):
        BriaFamily(SimpleNamespace(scheduler=None, transformer=fibo))
    pipe.text_encoder = None
    with pytest.raises(ValueError, match="no text_encoder"):
        fam.encode_text([SHORT], cpu, TEXT_LEN)


def test_adapter_loads_in_diffusers_and_taca(trained, model):
    """taca.enable(pipe, lora=) gates the adapter in (the pipeline has no load_lora_weights: taca
    loads it through the transformer); diffusers' transformer.load_lora_adapter(prefix="transformer")
    loads the same layers with the trained scale (alpha 8 / rank 4, from the file's metadata), and
    with TACA on both predict the same."""
    call = dict(prompt="a red square", height=RES, width=RES, num_inference_steps=2, guidance_scale=1.0,
                max_sequence_length=TEXT_LEN, output_type="latent")
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    check_transformer_loaded_adapter(partial(load, model), trained[0].out, call, flux_attn_names(N_DOUBLE, N_SINGLE), x,
                                     TEXT_LEN, 2.0)
