"""taca train on a tiny AuraFlowPipeline (a UMT5 encoder with the demo's word-level T5 tokenizer, a
4-level AutoencoderKL (the pipeline's 8x factor) with a scale and a shift_factor the pipeline does
not apply, a 2 + 2-layer AuraFlowTransformer2DModel), saved with save_pretrained, random weights,
CPU: gamma in every joint attention call (MMDiT and single-DiT blocks) of every training forward,
with and without gradient checkpointing (diffusers drops the attention kwargs of AuraFlow's
checkpointed blocks; taca's adapter hands them back), the control run stock; the family's predict
is the pipeline's own denoising step (timestep sigma, the output as it is) and its latents the ones
the pipeline decodes (scale only); captions padded to the fixed length as the pipeline does,
independent of their batch; the adapter loads through diffusers and taca."""
from functools import partial

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

import taca  # noqa: E402
from taca.train import train  # noqa: E402

from train_checks import (check_adapter_in_pipeline, check_alone_as_in_batch, check_batch_independent,  # noqa: E402
                          check_same_adapter, check_taca_run, checked_family, checkpointed_run, control_run,
                          data_fixture, load, LONG, model_fixture, peft_hits, RUN_FILES, run_fixture,
                          saved_lora_modules, SHORT, text_cond, train_config)

RES = 32  # 32x32 images -> 4x4 latents (8x VAE) -> 4 image tokens (2x2 patches)
TEXT_LEN = 16
N_MMDIT, N_SINGLE = 2, 2
N_JOINT = N_MMDIT + N_SINGLE  # every attention of the model is joint
TEXT_DIM = 32
TRANSFORMER = dict(sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=N_MMDIT,
                   num_single_dit_layers=N_SINGLE, attention_head_dim=16, num_attention_heads=2,
                   joint_attention_dim=TEXT_DIM, caption_projection_dim=32, out_channels=4, pos_embed_max_size=64)
# fal/AuraFlow's scheduler as tests/test_models_auraflow.py takes it: static shift 1.73
SCHEDULER = dict(num_train_timesteps=1000, shift=1.73)
SCALE, SHIFT = 0.3611, 0.1159  # the VAE's scaling_factor, and a shift_factor AuraFlowPipeline ignores


def build_pipeline(seed=0):
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    from taca.demo import _t5_tokenizer

    tok, vocab = _t5_tokenizer()
    torch.manual_seed(seed)
    te = UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2,
                                     num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
                                     pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=RES, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=SHIFT, scaling_factor=SCALE)
    transformer = AuraFlowTransformer2DModel(**TRANSFORMER)
    pipe = AuraFlowPipeline(tokenizer=tok, text_encoder=te, vae=vae, transformer=transformer,
                            scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER))
    for m in (te, vae, transformer):
        m.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


_cfg = partial(train_config, resolution=RES, max_sequence_length=TEXT_LEN)
model = model_fixture(build_pipeline, "auraflow")
data = data_fixture(8)
trained = run_fixture(lambda model, data, out: train(_cfg(model, data, out), progress=False),
                      where=("runs", "taca"))  # one TACA run, kept for the adapter tests

_MMDIT_ATTN = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
_SINGLE_ATTN = ("to_q", "to_k", "to_v", "to_out.0")


def _attn_names(n_mmdit, n_single):
    return ([f"joint_transformer_blocks.{i}.attn.{p}" for i in range(n_mmdit) for p in _MMDIT_ATTN]
            + [f"single_transformer_blocks.{i}.attn.{p}" for i in range(n_single) for p in _SINGLE_ATTN])


def _family(pipe):
    from taca.train.families.auraflow import AuraFlowFamily

    return checked_family(pipe, AuraFlowFamily, "auraflow")




def test_family_and_targets(model):
    pipe = load(model)
    fam = _family(pipe)
    assert fam.shift() == pytest.approx(1.73) and fam.lora_saver() is type(pipe)
    linear = {n for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    assert peft_hits(linear, fam.target_modules("attn")) == set(_attn_names(N_MMDIT, N_SINGLE))
    assert fam.target_modules(["to_q"]) == ["to_q"]


def test_targets_on_the_real_config():
    """fal/AuraFlow(-v0.3)'s transformer config (4 MMDiT + 32 single-DiT layers, 12 heads of 256,
    caption dim 2048 -> 3072, 4 latent channels), built empty: "attn" hits exactly the attention
    projections of all 36 blocks (all joint), "attn+ff" adds their feed-forwards (image and context)
    and nothing else (no embedders, norms' linears, registers' projections, proj_out)."""
    from types import SimpleNamespace

    from accelerate import init_empty_weights
    from diffusers import AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler

    from taca.train.families.auraflow import AuraFlowFamily

    with init_empty_weights():
        t = AuraFlowTransformer2DModel(sample_size=64, patch_size=2, in_channels=4, num_mmdit_layers=4,
                                       num_single_dit_layers=32, attention_head_dim=256, num_attention_heads=12,
                                       joint_attention_dim=2048, caption_projection_dim=3072, out_channels=4,
                                       pos_embed_max_size=9216)
    fam = AuraFlowFamily(SimpleNamespace(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), transformer=t))
    linear = {n for n, m in t.named_modules() if isinstance(m, torch.nn.Linear)}
    attn = peft_hits(linear, fam.target_modules("attn"))
    assert attn == set(_attn_names(4, 32)) and len(attn) == 4 * 8 + 32 * 4
    ff = peft_hits(linear, fam.target_modules("attn+ff")) - attn
    want_ff = {f"joint_transformer_blocks.{i}.{f}.{p}" for i in range(4) for f in ("ff", "ff_context")
               for p in ("linear_1", "linear_2", "out_projection")}
    want_ff |= {f"single_transformer_blocks.{i}.ff.{p}" for i in range(32) for p in ("linear_1", "linear_2",
                                                                                    "out_projection")}
    assert ff == want_ff
    # every suffix hits something (no dead name)
    assert all(peft_hits(linear, [k]) for k in fam.target_modules("attn+ff"))


def test_gamma_on_in_every_training_forward(trained):
    res, calls = trained
    # every joint attention of every forward: 3 steps x (2 MMDiT + 2 single-DiT)
    check_taca_run(res, calls, 3 * N_JOINT, files=RUN_FILES[:3])
    assert saved_lora_modules(res.out) == {f"transformer.{n}" for n in _attn_names(N_MMDIT, N_SINGLE)}


def test_gradient_checkpointing_recomputes_taca(trained, model, data, tmp_path, monkeypatch):
    """With checkpointing every block runs twice per step (forward, recompute in the backward), both
    times with gamma (diffusers' checkpointed calls drop attention_kwargs: the adapter's fix); the
    gradients are the same, so the losses and the adapter are too."""
    res = checkpointed_run(partial(_cfg, model, data), trained[0], tmp_path / "out", monkeypatch, 2 * 3 * N_JOINT)
    check_same_adapter(trained[0].out, res.out)


def test_control_runs_stock_attention(model, data, tmp_path, monkeypatch):
    res = control_run(partial(_cfg, model, data), tmp_path / "out", monkeypatch, max_steps=2)
    assert len(res.losses) == 2


def test_predict_is_the_pipelines_denoising_step(model):
    """AuraFlowPipeline's own loop (its encode_prompt with fixed-length padding, prepare_latents,
    timestep t / 1000, Euler step on the output as it is), 2 steps on a batch of 2 prompts of
    different lengths, TACA on: its transformer inputs are the family's, predict with the
    scheduler's sigmas is its transformer output, and stepping with it lands on its result."""
    pipe = load(model)
    fam = _family(pipe)
    prompts = [SHORT, LONG]
    lat = pipe.prepare_latents(2, 4, RES, RES, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(3))
    assert lat.shape == (2, 4, RES // 8, RES // 8)
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, k, o: seen.append((a, k, o[0].clone())),
                                                  with_kwargs=True)
    with taca.enabled(pipe, gamma=1.2) as h, torch.no_grad():
        out = pipe(prompt=list(prompts), latents=lat.clone(), height=RES, width=RES, num_inference_steps=2,
                   guidance_scale=1.0, max_sequence_length=TEXT_LEN, output_type="latent").images
        gammas = [h.last_gamma]
        hook.remove()
        # the pipeline passes no sigmas: the scheduler's own, from 1 to its sigma_min (1e-3 shifted by
        # 1.73 at construction), shifted again by set_timesteps
        shifted = lambda s: 1.73 * s / (1 + 0.73 * s)  # noqa: E731
        sigmas = pipe.scheduler.sigmas
        assert sigmas.tolist() == pytest.approx([1.0, shifted(shifted(1e-3)), 0.0], rel=1e-4)
        cond = text_cond(fam, prompts, TEXT_LEN)
        x = lat
        for i in range(2):
            s = sigmas[i].expand(2)
            v = fam.predict(pipe.transformer, x, s, cond, 1.0)
            gammas.append(h.last_gamma)
            args, kw, model_out = seen[i]
            torch.testing.assert_close(args[0], x, rtol=0, atol=0 if i == 0 else 1e-6)
            torch.testing.assert_close(kw["timestep"], s, rtol=0, atol=1e-7)  # t / 1000 = sigma
            assert torch.equal(kw["encoder_hidden_states"], cond["prompt_embeds"])  # padded, no mask
            assert set(kw) <= {"encoder_hidden_states", "timestep", "return_dict", "attention_kwargs"}
            torch.testing.assert_close(v, model_out, rtol=0, atol=1e-6)  # the velocity, not negated
            x = x + (sigmas[i + 1] - sigmas[i]) * v  # the scheduler's Euler step
    torch.testing.assert_close(x, out, rtol=0, atol=1e-6)
    # the first step (sigma 1) is in the window, the second (~0.003) is not, for both paths
    assert gammas[0] is None and gammas[2] is None and torch.allclose(gammas[1], torch.full((2,), 1.2))


def test_latents_are_what_the_pipeline_decodes(model):
    """encode_images is mode * scaling_factor (no shift, though the VAE config has one: the pipeline
    decodes latents / scaling_factor); put in place of the pipeline's last latents it decodes,
    through the pipeline's own path, to the VAE's reconstruction of the posterior mode."""
    pipe = load(model)
    vae = pipe.vae
    fam = _family(pipe)
    assert (vae.config.shift_factor, vae.config.scaling_factor) == (SHIFT, SCALE)
    px = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        lat = fam.encode_images(px)
        mode = vae.encode(px).latent_dist.mode()
        assert lat.shape == (2, 4, RES // 8, RES // 8)
        torch.testing.assert_close(lat, mode * SCALE, rtol=1e-6, atol=1e-6)
        want = pipe.image_processor.postprocess(vae.decode(mode).sample, output_type="pt")
        got = pipe(prompt=["a red square", "a blue circle"], height=RES, width=RES, num_inference_steps=1,
                   guidance_scale=1.0, max_sequence_length=TEXT_LEN, output_type="pt",
                   callback_on_step_end=lambda p, i, t, kw: {"latents": lat.clone()}).images
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_captions_padded_to_the_fixed_length_and_batch_independent(model):
    """encode_prompt pads to max_sequence_length and zeroes the padding (no mask for the model): a
    caption's entry is its full padded embedding, the same alone or next to a longer one, the
    pipeline's own; predict on a batch equals predict on each caption alone."""
    pipe = load(model)
    fam = _family(pipe)
    alone, both, _ = check_alone_as_in_batch(fam, TEXT_LEN, [TEXT_LEN, TEXT_LEN])
    n = [len(pipe.tokenizer(c).input_ids) for c in (SHORT, LONG)]
    assert n[0] < n[1] < TEXT_LEN
    with torch.no_grad():
        ref = pipe.encode_prompt([SHORT, LONG], do_classifier_free_guidance=False, max_sequence_length=TEXT_LEN)[0]
    for j, e in enumerate(both):
        assert torch.equal(e["prompt_embeds"], ref[j])
        assert e["prompt_embeds"][:n[j]].abs().sum(-1).gt(0).all() and not e["prompt_embeds"][n[j]:].any()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, RES // 8, RES // 8, generator=g)
    check_batch_independent(fam, pipe.transformer, x, torch.tensor([0.99, 0.975]), both)


def test_adapter_loads_in_diffusers_and_taca(trained, model):
    call = dict(prompt="a red square", height=RES, width=RES, num_inference_steps=2, guidance_scale=1.0,
                max_sequence_length=TEXT_LEN, output_type="latent")
    check_adapter_in_pipeline(partial(load, model), trained[0].out, call, 8 * N_MMDIT + 4 * N_SINGLE,
                              prefix=("joint_transformer_blocks.", "single_transformer_blocks."))
