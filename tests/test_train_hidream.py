"""taca train on a tiny HiDream-I1 pipeline (HiDreamImagePipeline: two CLIPs with projection, T5,
Llama, random weights, CPU, saved with save_pretrained): gamma in every joint attention call of
every training forward (with diffusers' gradient checkpointing too), the control LoRA runs stock attention,
``HiDreamFamily.predict`` is minus what HiDreamImagePipeline's transformer returns in its own
denoising loop (1000 sigma, unpatched latents), the train-mode layout folds back exactly, the
latents are what the pipeline's decoder inverts, the Llama states (layers, B, L, D) are split and
batched on dim 1, and the adapter loads back."""
from functools import partial

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")
pytest.importorskip("transformers")

import taca  # noqa: E402
from taca.pipeline import get_handle  # noqa: E402
from taca.train import train  # noqa: E402
from taca.train.families import family_for  # noqa: E402

from train_checks import (check_adapter_gates_predict, check_batch_independent,  # noqa: E402
                          check_control_and_checkpointing, check_flux_vae_latents, check_taca_run,
                          check_zero_model_decodes, data_fixture, load, model_fixture, run_fixture, text_cond,
                          train_config)

RES = 32  # one-level VAE: 32x32 latents, patch 2 -> 256 image tokens
TEXT_LEN = 16  # T5 16 + 2 x Llama 16 = 48 text tokens per joint attention
N_DOUBLE, N_SINGLE = 2, 2
N_JOINT = N_DOUBLE + N_SINGLE
TINY = dict(patch_size=2, in_channels=4, out_channels=4, num_layers=N_DOUBLE, num_single_layers=N_SINGLE,
            attention_head_dim=32, num_attention_heads=2, caption_channels=[32, 32], text_emb_dim=16,
            num_routed_experts=2, num_activated_experts=1, axes_dims_rope=(16, 8, 8), max_resolution=(16, 16),
            llama_layers=[0, 1, 2, 3])
# I1-Full's scheduler: UniPC with flow sigmas, flow_shift 3.0 (as tests/test_models_hidream.py)
SCHEDULER = dict(num_train_timesteps=1000, use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")


def _llama_tokenizer():
    from taca.demo import _word_tokenizer

    return _word_tokenizer(["<|begin_of_text|>", "<|end_of_text|>", "<unk>"], "<|begin_of_text|> $A",
                           pad="<|end_of_text|>", unk="<unk>", eos="<|end_of_text|>", bos="<|begin_of_text|>",
                           max_length=128)


def _build(seed=0):
    from diffusers import AutoencoderKL, HiDreamImagePipeline, HiDreamImageTransformer2DModel, UniPCMultistepScheduler
    from transformers import CLIPTextModelWithProjection, LlamaConfig, LlamaForCausalLM, T5EncoderModel

    from taca.demo import _clip_config, _clip_tokenizer, _t5_config, _t5_tokenizer

    clip_tok, clip_vocab = _clip_tokenizer()
    t5_tok, t5_vocab = _t5_tokenizer()
    ll_tok, ll_vocab = _llama_tokenizer()
    torch.manual_seed(seed)
    # pooled: CLIP-L 8 + CLIP-G 8 = text_emb_dim 16
    clip_1 = CLIPTextModelWithProjection(_clip_config(clip_vocab, hidden_size=32, intermediate_size=64, projection_dim=8))
    clip_2 = CLIPTextModelWithProjection(_clip_config(clip_vocab, hidden_size=32, intermediate_size=64, projection_dim=8))
    t5 = T5EncoderModel(_t5_config(t5_vocab, d_model=32, d_kv=8, d_ff=64))
    eos = ll_vocab["<|end_of_text|>"]
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(ll_vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=ll_vocab["<|begin_of_text|>"],
        eos_token_id=eos, pad_token_id=eos, attn_implementation="eager"))
    transformer = HiDreamImageTransformer2DModel(**TINY)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.1159, scaling_factor=0.3611)
    pipe = HiDreamImagePipeline(
        scheduler=UniPCMultistepScheduler(**SCHEDULER), vae=vae, text_encoder=clip_1, tokenizer=clip_tok,
        text_encoder_2=clip_2, tokenizer_2=clip_tok, text_encoder_3=t5, tokenizer_3=t5_tok, text_encoder_4=llama,
        tokenizer_4=ll_tok, transformer=transformer)
    for m in (clip_1, clip_2, t5, llama, transformer, vae):
        m.eval()
    return pipe


def _load(model):
    pipe = load(model)
    # the pipeline rescales every request to the area of default_sample_size latents a side
    pipe.default_sample_size = RES // pipe.vae_scale_factor
    return pipe


_cfg = partial(train_config, resolution=RES, max_sequence_length=TEXT_LEN)
model = model_fixture(_build, "hidream")
data = data_fixture(4)
trained = run_fixture(lambda model, data, out: train(_cfg(model, data, out), progress=False))


def test_family_conventions(model):
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline

    pipe = _load(model)
    fam = family_for(pipe)
    assert type(fam).__name__ == "HiDreamFamily" and fam.name == "hidream"
    assert fam.shift() == 3.0  # UniPC's flow_shift (I1-Full)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=6.0)  # I1-Dev
    assert type(fam)(pipe).shift() == 6.0
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    assert type(fam)(pipe).shift() == 1.0
    assert fam.lora_saver() is HiDreamImagePipeline
    assert fam.text_modules() == [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.text_encoder_4]
    names = [n for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)]

    def matched(spec):
        ts = fam.target_modules(spec)
        return [n for n in names if any(n == t or n.endswith("." + t) for t in ts)]

    # to_q/k/v/out of every attn1 (image stream + single blocks) and the double blocks' text stream *_t
    attn = matched("attn")
    assert len(attn) == 4 * N_JOINT + 4 * N_DOUBLE and all(".attn1.to_" in n for n in attn)
    assert sum(n.endswith("_t") for n in attn) == 4 * N_DOUBLE
    ff = [n for n in matched("attn+ff") if n not in attn]
    # double: ff_i (shared + 2 experts) + ff_t; single: ff_i; 3 linears each
    assert len(ff) == 3 * (N_DOUBLE * 4 + N_SINGLE * 3) and all(".ff_" in n for n in ff)
    assert fam.target_modules(["to_q_t"]) == ["to_q_t"]


def test_text_entries_split_llama_on_dim_1(model):
    """Fixed-length padding, no mask: a caption's entry is the same alone or in a batch; the
    Llama states come back (layers, B, L, D) and are cut / stacked on dim 1."""
    pipe = _load(model)
    fam = family_for(pipe)
    short, long_ = "a red square", "a big red square next to a small blue round mirror on the wall"
    dev = torch.device("cpu")
    enc = fam.encode_text([long_, short], dev, TEXT_LEN)
    assert enc["prompt_embeds_llama3"].shape == (4, 2, TEXT_LEN, 32) and enc["prompt_embeds_t5"].shape == (2, TEXT_LEN, 32)
    assert enc["pooled_prompt_embeds"].shape == (2, 16)
    both = fam.split_text(enc)
    alone = fam.split_text(fam.encode_text([short], dev, TEXT_LEN))[0]
    assert alone["prompt_embeds_llama3"].shape == (4, TEXT_LEN, 32)
    for k in alone:
        torch.testing.assert_close(alone[k], both[1][k], rtol=0, atol=1e-6)
    assert not torch.allclose(both[0]["prompt_embeds_llama3"], both[1]["prompt_embeds_llama3"])
    back = fam.collate(both)
    assert all(torch.equal(back[k], enc[k]) for k in enc)
    x = torch.randn(2, 4, RES, RES, generator=torch.Generator().manual_seed(1))
    check_batch_independent(fam, pipe.transformer, x, torch.tensor([0.99, 0.5]), both, rtol=0, atol=1e-5)


def test_gamma_on_in_every_training_forward(trained):
    res, gammas = trained
    check_taca_run(res, gammas, 3 * N_JOINT)


def test_control_and_gradient_checkpointing(model, data, tmp_path, monkeypatch):
    check_control_and_checkpointing(partial(_cfg, model, data), tmp_path, monkeypatch, N_JOINT)


def test_train_mode_and_checkpointing_compute_the_same_function(model):
    """Train mode (the MoE's differentiable routing, the (B, C, patches, p*p) output layout) gives
    eval mode's prediction; diffusers' checkpointing gives the plain forward's output and LoRA
    gradients with TACA on."""
    from peft import LoraConfig

    pipe = _load(model)
    fam = family_for(pipe)
    t = pipe.transformer
    t.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=fam.target_modules("attn")))
    lora = [p for n, p in t.named_parameters() if "lora_B" in n]
    with torch.no_grad():
        for p in lora:
            p.normal_(0, 0.1)
    cond = text_cond(fam, ["a red square", "a big red square next to a small blue round mirror"], TEXT_LEN)
    x = torch.randn(2, 4, RES, RES, generator=torch.Generator().manual_seed(5))
    sigma = torch.tensor([0.99, 0.98])
    with taca.enabled(t, gamma=1.2):
        with torch.no_grad():
            ev = fam.predict(t, x, sigma, cond, 1.0)
        t.train()
        results = []
        for gc in (False, True):
            t.enable_gradient_checkpointing() if gc else t.disable_gradient_checkpointing()
            out = fam.predict(t, x, sigma, cond, 1.0)
            results.append((out.detach(), torch.autograd.grad(out.square().mean(), lora)))
        assert t.gradient_checkpointing
    torch.testing.assert_close(results[0][0], ev, rtol=0, atol=1e-5)
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=1e-6)
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_predict_is_the_pipelines_transformer_call(model):
    """HiDreamImagePipeline.__call__ (no CFG, 2 steps, TACA on: the first step at t = 1000 gets gamma
    1.2 from the pipeline's raw t = 999, the second, t = 750, is stock): minus what its transformer returns
    for its latents and t equals HiDreamFamily.predict at sigma = t / 1000 on the cached conditioning
    of the same prompt."""
    pipe = _load(model)
    fam = family_for(pipe)
    prompt = "a red square on a blue background"
    x = torch.randn(1, 4, RES, RES, generator=torch.Generator().manual_seed(3))
    seen = []
    hook = pipe.transformer.register_forward_hook(
        lambda m, a, k, o: seen.append((k["hidden_states"].clone(), k["timesteps"].clone(), o[0].clone(),
                                        get_handle(m).last_gamma)), with_kwargs=True)
    with taca.enabled(pipe, gamma=1.2), torch.no_grad():
        pipe(prompt=prompt, latents=x, height=RES, width=RES, num_inference_steps=2, guidance_scale=1.0,
             max_sequence_length=TEXT_LEN, output_type="latent")
        hook.remove()
        # UniPC's integer timesteps: 999 for sigma 1, 750 for sigma 0.75 (flow_shift 3)
        assert [float(ts) for _, ts, _, _ in seen] == [999.0, 750.0]
        cond = text_cond(fam, [prompt], TEXT_LEN)
        for i, (hs, ts, out, gamma) in enumerate(seen):
            if i == 0:
                assert torch.equal(hs, x)
            pred = fam.predict(pipe.transformer, hs, ts / 1000.0, cond, 1.0)
            train_gamma = get_handle(pipe.transformer).last_gamma
            assert (gamma is None) == (train_gamma is None) == (i == 1)
            if i == 0:
                assert torch.allclose(gamma, torch.tensor([1.2])) and torch.allclose(train_gamma, torch.tensor([1.2]))
            assert out.shape == pred.shape == (1, 4, RES, RES)
            torch.testing.assert_close(pred, -out, rtol=0, atol=1e-6)


def test_latents_are_what_the_pipeline_decodes(model, monkeypatch):
    """encode_images handed to HiDreamImagePipeline as its latents with a transformer that predicts
    0 and the Euler scheduler (the steps keep them): the pipeline's own denormalization + decode
    gives the VAE's reconstruction of the image."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = _load(model)
    fam = family_for(pipe)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    px = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(0)) * 2 - 1
    lat, mode = check_flux_vae_latents(fam, pipe.vae, px, (2, 4, RES, RES))
    check_zero_model_decodes(pipe, mode, monkeypatch, dict(latents=lat, height=RES, width=RES,
                                                           max_sequence_length=TEXT_LEN))


def test_adapter_loads(model, trained):
    check_adapter_gates_predict(partial(_load, model), trained[0].out, RES, TEXT_LEN)
