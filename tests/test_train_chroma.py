"""taca train on a tiny Chroma pipeline (ChromaPipeline, random weights, CPU, saved with
save_pretrained): gamma in every joint attention call of every training forward (with and without
gradient checkpointing), the control LoRA runs stock attention, ``ChromaFamily.predict`` is what
ChromaPipeline's own denoising loop feeds its transformer (packing, ids, sigma, the additive text
mask over the fixed-length padding), the latents are what the pipeline's decoder inverts, a
caption's cache entry does not depend on its batch, and the adapter loads back."""
from functools import partial

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

import taca  # noqa: E402
from taca.train import train  # noqa: E402
from taca.train.families import family_for  # noqa: E402

from train_checks import (check_adapter_gates_predict, check_batch_independent,  # noqa: E402
                          check_control_and_checkpointing, check_flux_vae_latents, check_taca_run,
                          check_zero_model_decodes, data_fixture, load, model_fixture, run_fixture, text_cond,
                          train_config)

RES = 32  # one-level VAE: 32x32 latents, 2x2 packing -> 256 image tokens
TEXT_LEN = 16
TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6), approximator_num_channels=16,
            approximator_hidden_dim=32, approximator_layers=1)
# FLUX.1's scheduler (dynamic shifting), as Chroma1-HD's
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096)
N_JOINT = TINY["num_layers"] + TINY["num_single_layers"]


def _build(seed=0):
    from diffusers import (AutoencoderKL, ChromaPipeline, ChromaTransformer2DModel,
                           FlowMatchEulerDiscreteScheduler)
    from transformers import T5EncoderModel

    from taca.demo import _t5_config, _t5_tokenizer

    tok, vocab = _t5_tokenizer()
    torch.manual_seed(seed)
    t5 = T5EncoderModel(_t5_config(vocab, d_model=32, d_kv=8, d_ff=64))
    transformer = ChromaTransformer2DModel(**TINY)
    # FLUX.1's VAE normalization (Chroma uses FLUX's VAE): non-trivial shift and scale
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.1159, scaling_factor=0.3611)
    pipe = ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, text_encoder=t5,
                          tokenizer=tok, transformer=transformer)
    for m in (t5, transformer, vae):
        m.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


_cfg = partial(train_config, resolution=RES, max_sequence_length=TEXT_LEN)
model = model_fixture(_build, "chroma")
data = data_fixture(4)
# one TACA run (3 steps, batch 2), its joint-attention gammas counted through the processors
trained = run_fixture(lambda model, data, out: train(_cfg(model, data, out), progress=False))


def test_family_conventions(model):
    from diffusers import ChromaPipeline

    pipe = load(model)
    fam = family_for(pipe)
    assert type(fam).__name__ == "ChromaFamily" and fam.name == "chroma"
    assert fam.shift() == 1.0  # dynamic shifting: sampled sigmas are not shifted
    assert fam.lora_saver() is ChromaPipeline
    assert fam.text_modules() == [pipe.text_encoder] and fam.image_modules() == [pipe.vae]
    # the joint attention of the double blocks (8 projections) and of the single blocks (q, k, v)
    names = [n for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    attn = [n for n in names if any(n.endswith(t) for t in fam.target_modules("attn"))]
    assert len(attn) == 8 * TINY["num_layers"] + 3 * TINY["num_single_layers"]
    ff = [n for n in names if any(n.endswith(t) for t in fam.target_modules("attn+ff"))]
    assert len(ff) == len(attn) + 4 * TINY["num_layers"]
    assert fam.target_modules(["to_q"]) == ["to_q"]


def test_gamma_on_in_every_training_forward(trained):
    res, gammas = trained
    check_taca_run(res, gammas, 3 * N_JOINT)


def test_control_and_gradient_checkpointing(model, data, tmp_path, monkeypatch):
    check_control_and_checkpointing(partial(_cfg, model, data), tmp_path, monkeypatch, N_JOINT)


def test_gradient_checkpointing_computes_the_same_function(model, monkeypatch):
    """diffusers' ChromaTransformer2DModel drops joint_attention_kwargs (TACA's gamma) and the
    single blocks' attention_mask in its checkpointed calls; taca.enable and ChromaFamily.predict
    hand them back: with TACA on, the checkpointed forward and its gradients equal the plain ones;
    the control's checkpointed forward equals its plain one."""
    from peft import LoraConfig

    pipe = load(model)
    fam = family_for(pipe)
    t = pipe.transformer
    t.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=fam.target_modules("attn")))
    t.train()
    cond = text_cond(fam, ["a red square", "a big red square next to a small blue round mirror"], TEXT_LEN)
    x = torch.randn(2, 4, RES, RES, generator=torch.Generator().manual_seed(5))
    sigma = torch.tensor([0.99, 0.98])
    lora = [p for n, p in t.named_parameters() if "lora_B" in n]
    with torch.no_grad():
        for p in lora:
            p.normal_(0, 0.1)
    results = []
    with taca.enabled(t, gamma=1.2):
        for gc in (False, True):
            t.enable_gradient_checkpointing() if gc else t.disable_gradient_checkpointing()
            out = fam.predict(t, x, sigma, cond, 1.0)
            grads = torch.autograd.grad(out.square().mean(), lora)
            results.append((out.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=1e-6)
    # the control LoRA (no taca.enable, which puts the arguments back on TACA runs itself): the
    # family's fix alone gives the single blocks their mask; without it the checkpointed forward
    # is another function
    import contextlib

    import taca.train.families.chroma as chroma

    control = []
    for gc in (False, True):
        t.enable_gradient_checkpointing() if gc else t.disable_gradient_checkpointing()
        control.append(fam.predict(t, x, sigma, cond, 1.0).detach())
    monkeypatch.setattr(chroma, "_full_checkpoint_args", lambda model: contextlib.nullcontext())
    unfixed = fam.predict(t, x, sigma, cond, 1.0).detach()
    torch.testing.assert_close(control[1], control[0], rtol=0, atol=1e-6)
    assert not torch.allclose(unfixed, control[0], atol=1e-4)
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_predict_is_the_pipelines_transformer_call(model):
    """ChromaPipeline.__call__ (no CFG, 2 steps, TACA on: the first step at sigma 1 gets gamma
    1.2 through the pipeline's _current_timestep, the second is stock): what its transformer
    returns for its own packed latents, ids, timestep and mask equals ChromaFamily.predict on
    the unpacked latents, the sigma and the cached conditioning of the same prompt."""
    from diffusers import ChromaPipeline

    pipe = load(model)
    fam = family_for(pipe)
    prompt = "a red square on a blue background"
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, RES, RES, generator=g)
    seen = []
    hook = pipe.transformer.register_forward_hook(
        lambda m, a, k, o: seen.append((k["hidden_states"].clone(), k["timestep"].clone(), k["attention_mask"].clone(),
                                        o[0].clone(), taca.pipeline.get_handle(m).last_gamma)), with_kwargs=True)
    packed = ChromaPipeline._pack_latents(x, 1, 4, RES, RES)
    with taca.enabled(pipe, gamma=1.2), torch.no_grad():
        pipe(prompt=prompt, latents=packed, height=RES, width=RES, num_inference_steps=2, guidance_scale=1.0,
             max_sequence_length=TEXT_LEN, output_type="latent")
        hook.remove()
        assert len(seen) == 2
        cond = text_cond(fam, [prompt], TEXT_LEN)
        n_tok = len(pipe.tokenizer(prompt).input_ids)
        assert cond["attention_mask"].shape == (1, TEXT_LEN) and int(cond["attention_mask"].sum()) == n_tok + 1
        for i, (hs, ts, mask, out, gamma) in enumerate(seen):
            assert torch.equal(mask[0, :TEXT_LEN], cond["attention_mask"][0])
            noisy = ChromaPipeline._unpack_latents(hs, RES, RES, pipe.vae_scale_factor)
            if i == 0:
                assert torch.equal(noisy, x) and float(ts) == 1.0
            pred = fam.predict(pipe.transformer, noisy, ts.float(), cond, 1.0)
            train_gamma = taca.pipeline.get_handle(pipe.transformer).last_gamma
            assert (gamma is None) == (train_gamma is None) == (i == 1)
            if i == 0:
                assert torch.allclose(gamma, torch.tensor([1.2])) and torch.allclose(train_gamma, torch.tensor([1.2]))
            want = ChromaPipeline._unpack_latents(out, RES, RES, pipe.vae_scale_factor)
            torch.testing.assert_close(pred, want, rtol=0, atol=1e-6)
        # why the fixed-length padding is cached: the padding tokens are not masked out (the mask
        # is added, +1 / 0), so the same prompt padded to another length changes the output
        longer = fam.predict(pipe.transformer, x, torch.tensor([1.0]), text_cond(fam, [prompt], TEXT_LEN + 8), 1.0)
        first = ChromaPipeline._unpack_latents(seen[0][3], RES, RES, pipe.vae_scale_factor)
        assert not torch.allclose(longer, first, atol=1e-4)


def test_latents_are_what_the_pipeline_decodes(model, monkeypatch):
    """encode_images, packed and handed to ChromaPipeline as its latents with a transformer that
    predicts 0 (the Euler steps keep them): the pipeline's own unpack + denormalization + decode
    gives the VAE's reconstruction of the image."""
    from diffusers import ChromaPipeline

    pipe = load(model)
    fam = family_for(pipe)
    px = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(0)) * 2 - 1
    lat, mode = check_flux_vae_latents(fam, pipe.vae, px, (2, 4, RES, RES))
    check_zero_model_decodes(pipe, mode, monkeypatch, dict(latents=ChromaPipeline._pack_latents(lat, 2, 4, RES, RES),
                                                           height=RES, width=RES, max_sequence_length=TEXT_LEN))


def test_cache_entry_and_predict_do_not_depend_on_the_batch(model):
    pipe = load(model)
    fam = family_for(pipe)
    short, long_ = "a red square", "a big red square next to a small blue round mirror on the wall"
    dev = torch.device("cpu")
    alone = fam.split_text(fam.encode_text([short], dev, TEXT_LEN))[0]
    both = fam.split_text(fam.encode_text([long_, short], dev, TEXT_LEN))
    assert set(alone) == {"prompt_embeds", "attention_mask"} and alone["attention_mask"].dtype == torch.float32
    assert int(alone["attention_mask"].sum()) < int(both[0]["attention_mask"].sum())
    assert torch.equal(alone["attention_mask"], both[1]["attention_mask"])
    torch.testing.assert_close(alone["prompt_embeds"], both[1]["prompt_embeds"], rtol=0, atol=1e-6)
    x = torch.randn(2, 4, RES, RES, generator=torch.Generator().manual_seed(1))
    check_batch_independent(fam, pipe.transformer, x, torch.tensor([0.99, 0.5]), both, rtol=0, atol=1e-5)


def test_adapter_loads(model, trained):
    check_adapter_gates_predict(partial(load, model), trained[0].out, RES, TEXT_LEN)
