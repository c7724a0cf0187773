"""taca train on a tiny BriaFiboPipeline (a 2-layer SmolLM3 text encoder with the demo's word-level
T5 tokenizer, a Wan 2.2-style AutoencoderKLWan (patch 2, factor 16, 4 channels normalized per
channel), a 2 + 2-block BriaFiboTransformer2DModel reading the text encoder's hidden states, FIBO's
dynamic-shifting scheduler), saved with save_pretrained, random weights, CPU: gamma in every joint
attention call of every training forward (with and without gradient checkpointing), the control
run stock; predict is the pipeline's own transformer call bit for bit (unpatched tokens, image ids,
text ids, per-block text layers, timestep 1000 sigma in the latents' dtype, no guidance, no mask
when nothing is padded, the output as it is), also on a padded batch and the conditional half of
CFG (to rounding); the latents are what the pipeline decodes; captions cached at their own tokens,
independent of their batch; bad inputs, schedulers and the edit pipeline refused; the adapter loads
through load_lora_weights and taca.enable(lora=)."""
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

from test_models_bria import FIBO_SCHEDULER  # noqa: E402
from train_checks import (ADAPTER, check_batch_independent, check_gated_pipeline, check_loaded_predict,  # noqa: E402
                          check_same_adapter, check_taca_run, checked_family, checkpointed_run, control_run,
                          data_fixture, flux_attn_names, load, LONG, model_fixture, peft_hits, record_calls, RUN_FILES,
                          run_fixture, saved_lora_modules, SHORT, text_cond, train_config)

RES = 32  # 32x32 images -> 2x2 latents (factor 16) -> 4 image tokens (no patching)
TEXT_LEN = 16
HID = 16  # the text encoder's hidden size; prompt_embeds are 2 * HID
N_DOUBLE, N_SINGLE = 2, 2
N_JOINT = N_DOUBLE + N_SINGLE
MEAN, STD = [0.3, -0.7, 0.1, 1.2], [0.5, 2.0, 1.5, 0.8]
TINY = dict(patch_size=1, in_channels=4, num_layers=N_DOUBLE, num_single_layers=N_SINGLE, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=2 * HID, axes_dims_rope=[4, 6, 6], text_encoder_dim=HID)


def _vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12,
                            out_channels=12, scale_factor_spatial=16, latents_mean=MEAN, latents_std=STD).eval()


def build_pipeline(seed=0, scheduler=FIBO_SCHEDULER):
    from diffusers import BriaFiboPipeline, BriaFiboTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    from taca.demo import _t5_tokenizer

    tok, _ = _t5_tokenizer()
    torch.manual_seed(seed)
    # vocab > 128000: the pipeline encodes an empty prompt as token 128000
    te = SmolLM3ForCausalLM(SmolLM3Config(vocab_size=128256, hidden_size=HID, intermediate_size=32,
                                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                          max_position_embeddings=256))
    pipe = BriaFiboPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**scheduler), vae=_vae(), text_encoder=te,
                            tokenizer=tok, transformer=BriaFiboTransformer2DModel(**TINY))
    for m in (te, pipe.vae, pipe.transformer):
        m.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _family(pipe):
    from taca.train.families.bria_fibo import BriaFiboFamily

    return checked_family(pipe, BriaFiboFamily, "bria_fibo")






model = model_fixture(build_pipeline, "fibo")
data = data_fixture(4)


def _cfg(model, data, out, **kw):
    return train_config(model, data, out, resolution=RES, max_sequence_length=TEXT_LEN, **kw)


def _train(model, data, out):
    return train(_cfg(model, data, out), progress=False)


trained = run_fixture(_train)


def _n_tokens(pipe, caption):
    return int(pipe.tokenizer([caption], return_tensors="pt").attention_mask.sum())


def test_family_and_targets(model):
    """family_for picks bria_fibo; "attn" hits exactly the joint attention projections of both block
    kinds (not the caption projections), "attn+ff" adds the double blocks' feed-forwards; the static
    shift of a static-shift scheduler is trained, dynamic shifting (FIBO's) is not."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from taca.train.families.bria_fibo import BriaFiboFamily

    pipe = load(model)
    fam = _family(pipe)
    assert fam.lora_saver().__name__ == "BriaFiboPipeline"
    linear = {n for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    attn = peft_hits(linear, fam.target_modules("attn"))
    assert attn == set(flux_attn_names(N_DOUBLE, N_SINGLE))
    ff = {f"transformer_blocks.{i}.{f}.{p}" for i in range(N_DOUBLE) for f in ("ff", "ff_context")
          for p in ("net.0.proj", "net.2")}
    assert peft_hits(linear, fam.target_modules("attn+ff")) - attn == ff
    assert fam.shift() == 1.0  # dynamic shifting
    assert BriaFiboFamily(SimpleNamespace(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))).shift() == 3.0


def test_gamma_on_in_every_training_forward(trained):
    res, calls = trained
    check_taca_run(res, calls, 3 * N_JOINT, files=RUN_FILES[:3])
    assert saved_lora_modules(res.out) == {f"transformer.{n}" for n in flux_attn_names(N_DOUBLE, N_SINGLE)}


def test_gradient_checkpointing_recomputes_taca(trained, model, data, tmp_path, monkeypatch):
    res = checkpointed_run(partial(_cfg, model, data), trained[0], tmp_path / "out", monkeypatch, 2 * 3 * N_JOINT)
    check_same_adapter(trained[0].out, res.out)


def test_control_runs_stock_attention(model, data, tmp_path, monkeypatch):
    res = control_run(partial(_cfg, model, data), tmp_path / "out", monkeypatch, max_steps=2)
    assert len(res.losses) == 2




_KEYS = ("hidden_states", "timestep", "encoder_hidden_states", "txt_ids", "img_ids")


def test_predict_is_the_pipelines_denoising_step(model):
    """BriaFiboPipeline's own loop (3 steps, no CFG, one prompt, a non-square 32x48 image, TACA on,
    FIBO's dynamic-shift scheduler): the transformer call predict makes on the unpacked latents, the
    scheduler's sigma and the cached text is the pipeline's bit for bit (tokens, image ids, text ids,
    prompt_embeds, the per-block text layers (3 hidden states, the last repeated for the 4 blocks),
    timestep 1000 sigma, joint_attention_kwargs {} (nothing padded), no guidance), its output the
    pipeline's, not negated, and Euler steps with it land on the pipeline's result. A padded batch of
    two prompts (the pipeline's bool key mask) and CFG ([negative "", positive]) agree to rounding."""
    from diffusers import BriaFiboPipeline

    pipe = load(model)
    fam = _family(pipe)
    t = pipe.transformer
    H, W = 32, 48
    h, w = H // 16, W // 16
    x = torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(3))
    calls, hook = record_calls(t)
    with taca.enabled(pipe, gamma=1.2), torch.no_grad():
        out = pipe(prompt=[LONG], latents=BriaFiboPipeline._pack_latents_no_patch(x, 1, 4, h, w), height=H, width=W,
                   num_inference_steps=3, guidance_scale=1.0, max_sequence_length=TEXT_LEN,
                   output_type="latent").images
        seen = list(calls)
        assert len(seen) == 3
        sigmas, timesteps = pipe.scheduler.sigmas, pipe.scheduler.timesteps
        cond = text_cond(fam, [LONG], TEXT_LEN)
        for i in range(3):
            pkw, pipe_out, pg = seen[i]
            xi = BriaFiboPipeline._unpack_latents_no_patch(pkw["hidden_states"], H, W, 16)
            torch.testing.assert_close(xi, x, rtol=0, atol=0 if i == 0 else 1e-6)
            v = fam.predict(t, xi, sigmas[i].expand(1), cond, 3.5)  # --guidance unused
            kw, model_out, g = calls[-1]
            assert set(kw) == set(pkw) == set(_KEYS) | {"text_encoder_layers", "joint_attention_kwargs",
                                                       "return_dict"}
            for k in _KEYS:
                assert kw[k].dtype == pkw[k].dtype and torch.equal(kw[k], pkw[k]), k
            assert len(kw["text_encoder_layers"]) == len(pkw["text_encoder_layers"]) == N_JOINT
            assert all(torch.equal(a, b) for a, b in zip(kw["text_encoder_layers"], pkw["text_encoder_layers"]))
            assert torch.equal(pkw["text_encoder_layers"][-1], pkw["text_encoder_layers"][-2])  # repeated last
            # no mask (nothing padded); TACA adds its own state to the dict
            assert {k for k in kw["joint_attention_kwargs"] if not k.startswith("taca_")} == set()
            assert {k for k in pkw["joint_attention_kwargs"] if not k.startswith("taca_")} == set()
            assert torch.equal(kw["timestep"], timesteps[i].expand(1))
            assert torch.equal(model_out, pipe_out)
            assert torch.equal(v, BriaFiboPipeline._unpack_latents_no_patch(pipe_out, H, W, 16))  # not negated
            if i == 0:
                assert torch.allclose(g, torch.full((1,), 1.2)) and torch.allclose(pg, torch.full((1,), 1.2))
            x = x + (sigmas[i + 1] - sigmas[i]) * v
        torch.testing.assert_close(BriaFiboPipeline._pack_latents_no_patch(x, 1, 4, h, w), out, rtol=0, atol=1e-6)

        # a padded batch: the pipeline pads SHORT to LONG's tokens with the bool key mask
        x2 = torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(4))
        calls.clear()
        pipe(prompt=[SHORT, LONG], latents=BriaFiboPipeline._pack_latents_no_patch(x2, 2, 4, h, w), height=H,
             width=W, num_inference_steps=1, guidance_scale=1.0, max_sequence_length=TEXT_LEN, output_type="latent")
        pkw, pipe_out, _ = calls[0]
        both = text_cond(fam, [SHORT, LONG], TEXT_LEN)
        v = fam.predict(t, x2, torch.ones(2), both, 1.0)
        kw = calls[-1][0]
        n = [_n_tokens(pipe, c) for c in (SHORT, LONG)]
        assert n[0] < n[1] and pkw["encoder_hidden_states"].shape[1] == n[1]
        mask = pkw["joint_attention_kwargs"]["attention_mask"]
        assert torch.equal(kw["joint_attention_kwargs"]["attention_mask"], mask) and not mask.all()
        assert torch.equal(kw["timestep"], pkw["timestep"])
        torch.testing.assert_close(kw["encoder_hidden_states"][0, :n[0]], pkw["encoder_hidden_states"][0, :n[0]],
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v, BriaFiboPipeline._unpack_latents_no_patch(pipe_out, H, W, 16),
                                   rtol=1e-5, atol=1e-5)

        # CFG: [negative "" (one token, padded with zeros), positive]: predict is the positive half
        calls.clear()
        pipe(prompt=[SHORT], latents=BriaFiboPipeline._pack_latents_no_patch(x2[:1], 1, 4, h, w), height=H, width=W,
             num_inference_steps=1, guidance_scale=5.0, max_sequence_length=TEXT_LEN, output_type="latent")
        pkw, pipe_out, _ = calls[0]
        one = text_cond(fam, [SHORT], TEXT_LEN)
        v = fam.predict(t, x2[:1], torch.ones(1), one, 1.0)
        assert torch.equal(calls[-1][0]["encoder_hidden_states"], pkw["encoder_hidden_states"][1:])
    hook.remove()
    torch.testing.assert_close(v, BriaFiboPipeline._unpack_latents_no_patch(pipe_out[1:], H, W, 16),
                               rtol=1e-5, atol=1e-5)

    # in bf16: the pipeline's t is the scheduler's t cast to the latents' dtype, image ids in the
    # embeddings' dtype, text ids in the text encoder's (float32 here)
    bf = torch.bfloat16
    got = {}

    class Stub:  # the transformer's structure, a forward that records its inputs
        transformer_blocks, single_transformer_blocks = t.transformer_blocks, t.single_transformer_blocks
        config = t.config

        def __call__(self, **kw):
            got.update(kw)
            return (torch.zeros_like(kw["hidden_states"]),)

    stub = Stub()
    fam.predict(stub, x[:1].to(bf), sigmas[1:2], {k: (v.to(bf) if v.is_floating_point() else v)
                                                  for k, v in one.items()}, 1.0)
    assert got["timestep"].dtype == bf and torch.equal(got["timestep"], timesteps[1:2].to(bf))
    assert got["img_ids"].dtype == bf and got["txt_ids"].dtype == torch.float32


def test_latents_are_what_the_pipeline_decodes(model, monkeypatch):
    """encode_images is (mode - mean) / std per channel on the 16x grid; handed to the pipeline as
    its latents with a transformer that predicts 0, the pipeline's own unpack, denormalization and
    decode give the VAE's reconstruction of the mode."""
    from diffusers import BriaFiboPipeline

    pipe = load(model)
    fam = _family(pipe)
    px = torch.rand(2, 3, RES, RES + 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    lat = fam.encode_images(px)
    with torch.no_grad():
        mode = pipe.vae.encode(px.unsqueeze(2)).latent_dist.mode()
    assert lat.shape == (2, 4, 2, 3)
    mean, std = torch.tensor(MEAN).view(1, 4, 1, 1), torch.tensor(STD).view(1, 4, 1, 1)
    torch.testing.assert_close(lat, (mode[:, :, 0] - mean) / std)
    assert not torch.allclose(lat, mode[:, :, 0], atol=1e-2)
    with torch.no_grad():
        want = pipe.image_processor.postprocess(pipe.vae.decode(mode).sample[:, :, 0], output_type="pt")
        monkeypatch.setattr(pipe.transformer, "forward", lambda hidden_states, **kw: (torch.zeros_like(hidden_states),))
        got = pipe(prompt=["a cat", "a dog"], latents=BriaFiboPipeline._pack_latents_no_patch(lat, 2, 4, 2, 3),
                   height=RES, width=RES + 16, num_inference_steps=2, guidance_scale=1.0,
                   max_sequence_length=TEXT_LEN, output_type="pt").images
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_captions_cached_at_their_own_tokens(model):
    """Each caption is encoded alone: its entry is (its tokens, K, D), the pipeline's own hidden
    states of the caption, the same alone or next to a longer one (bit for bit); an empty caption
    is the pipeline's single BOS token; predict on a padded batch equals predict on each alone;
    --max-sequence-length truncates as the pipeline's tokenizer does."""
    pipe = load(model)
    fam = _family(pipe)
    cpu = torch.device("cpu")
    alone = fam.split_text(fam.encode_text([SHORT], cpu, TEXT_LEN))
    both = fam.split_text(fam.encode_text([SHORT, LONG, ""], cpu, TEXT_LEN))
    n = [_n_tokens(pipe, c) for c in (SHORT, LONG)] + [1]
    assert set(both[0]) == {"text_layers"} and [e["text_layers"].shape for e in both] == \
        [(k, 3, HID) for k in n]  # 3 hidden states (embeddings + 2 layers), fewer than the 4 blocks
    assert torch.equal(both[0]["text_layers"], alone[0]["text_layers"])
    with torch.no_grad():
        _, hidden, _ = pipe.get_prompt_embeds([LONG], max_sequence_length=TEXT_LEN, device=cpu)
    assert torch.equal(both[1]["text_layers"], torch.stack([h[0] for h in hidden], 1))
    x = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    check_batch_independent(fam, pipe.transformer, x, torch.tensor([0.99, 0.975, 0.98]), both)
    assert fam.encode_text([LONG], cpu, 5)["text_layers"].shape[1] == 5
    assert fam.max_sequence_length(None) == 3000


def test_bad_input_and_refusals(model):
    """More than 3000 text tokens or a non-positive length: ConfigError naming --max-sequence-length;
    a DDIM scheduler, invert_sigmas and another num_train_timesteps refused; BriaFiboEditPipeline
    refused by check_config (before weights load) and by the family."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    from taca.train.families.bria_fibo import BriaFiboFamily

    pipe = load(model)
    fam = _family(pipe)
    for bad in (3001, 0):
        with pytest.raises(ConfigError, match="--max-sequence-length"):
            fam.encode_text([SHORT], torch.device("cpu"), bad)
    for sch, msg in ((DDIMScheduler(), "DDIMScheduler"), (FlowMatchEulerDiscreteScheduler(invert_sigmas=True),
                                                          "invert_sigmas"),
                     (FlowMatchEulerDiscreteScheduler(num_train_timesteps=500), "num_train_timesteps=500")):
        with pytest.raises(ValueError, match=msg):
            BriaFiboFamily(SimpleNamespace(scheduler=sch, transformer=pipe.transformer))
    with pytest.raises(ConfigError, match="--model.*BriaFiboEditPipeline is not trained"):
        BriaFiboFamily.check_config(SimpleNamespace(), "BriaFiboEditPipeline")
    BriaFiboFamily.check_config(SimpleNamespace(), "BriaFiboPipeline")
    edit = type("BriaFiboEditPipeline", (), {})()
    edit.transformer, edit.scheduler = pipe.transformer, pipe.scheduler
    with pytest.raises(ValueError, match="BriaFiboEditPipeline is not trained.*mask"):
        BriaFiboFamily(edit)
    pipe.text_encoder = None
    with pytest.raises(ValueError, match="no text_encoder"):
        fam.encode_text([SHORT], torch.device("cpu"), TEXT_LEN)


def test_adapter_loads_in_diffusers_and_taca(trained, model):
    """taca.enable(pipe, lora=) gates the adapter in and out; BriaFiboPipeline.load_lora_weights puts
    LoRA layers on exactly the trained modules and, with TACA on, predict through it equals predict
    under taca.enable(lora=)."""
    out = trained[0].out
    call = dict(prompt="a red square", height=RES, width=RES, num_inference_steps=2, guidance_scale=1.0,
                max_sequence_length=TEXT_LEN, output_type="latent")
    check_gated_pipeline(load(model), out, call)
    fresh = load(model)
    fresh.load_lora_weights(out, weight_name=ADAPTER)
    lora = {n for n, m in fresh.transformer.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    assert lora == set(flux_attn_names(N_DOUBLE, N_SINGLE))
    fam = _family(fresh)
    x = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(2))
    check_loaded_predict(fam, fresh, load(model), out, x, "a red square", TEXT_LEN)
