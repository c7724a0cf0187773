"""taca train on a tiny Lumina2Pipeline (Gemma2 text encoder with a BPE Gemma tokenizer written here,
a 4-level AutoencoderKL (the pipeline's fixed 8x factor) with the FLUX VAE's shift / scale, a 2-layer
Lumina2Transformer2DModel), saved with save_pretrained, random weights, CPU: gamma in every joint
attention call of every training forward (with and without gradient checkpointing, which then
trains the same adapter), the control run stock; the family's predict is the pipeline's own
denoising step (system prompt, timestep 1 - sigma, negated output) and its latents the ones the
pipeline decodes; captions cached with their own tokens, independent of their batch; the adapter
loads through diffusers and taca."""
from functools import partial

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

import taca  # noqa: E402
from taca.train import train  # noqa: E402

from train_checks import (RUN_FILES, check_adapter_in_pipeline, check_last_latents_decode,  # noqa: E402
                          check_same_adapter, check_taca_run, checkpointed_run, control_run, data_fixture, load,
                          model_fixture, run_fixture, saved_lora_modules, spelled_out, text_cond, train_config)

RES = 32  # 32x32 images -> 4x4 latents (8x VAE) -> 4 image tokens (2x2 patches)
TEXT_LEN = 64  # the system prompt takes ~40 of them
N_LAYERS = 2
TEXT_DIM = 32
TRANSFORMER = dict(sample_size=16, patch_size=2, in_channels=4, hidden_size=48, num_layers=N_LAYERS,
                   num_refiner_layers=1, num_attention_heads=4, num_kv_heads=2, multiple_of=16,
                   axes_dim_rope=(4, 4, 4), axes_lens=(128, 32, 32), cap_feat_dim=TEXT_DIM)
# Alpha-VLLM/Lumina-Image-2.0's scheduler as tests/test_models_lumina2.py takes it: static shift 6
SCHEDULER = dict(num_train_timesteps=1000, shift=6.0)
SYSTEM = ("You are an assistant designed to generate superior images with the superior degree of image-text "
          "alignment based on textual prompts or user prompts.")
_WORDS = ("a red blue green yellow square on background circle with big small the and of cat dog photo "
          "<Prompt Start>").split() + SYSTEM.replace(".", " .").split()


def _tokenizer():
    """A BPE GemmaTokenizer with byte fallback: Gemma's specials, the 256 byte tokens, the
    characters and merges spelling out _WORDS (with and without the leading "▁"); BOS added."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in sorted(set("".join(_WORDS)) | {"\u2581"}):
        vocab.setdefault(ch, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=spelled_out(_WORDS, "\u2581", vocab), add_bos_token=True)


def build_pipeline(seed=0):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tok = _tokenizer()
    torch.manual_seed(seed)
    te = Gemma2Model(Gemma2Config(vocab_size=len(tok), hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                                  max_position_embeddings=256, sliding_window=64, pad_token_id=0))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=RES, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    transformer = Lumina2Transformer2DModel(**TRANSFORMER)
    pipe = Lumina2Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae,
                           text_encoder=te, tokenizer=tok)
    for m in (te, vae, transformer):
        m.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


_cfg = partial(train_config, resolution=RES, max_sequence_length=TEXT_LEN)
model = model_fixture(build_pipeline, "lumina2")
data = data_fixture(8)
trained = run_fixture(lambda model, data, out: train(_cfg(model, data, out), progress=False),
                      where=("runs", "taca"))  # one TACA run, kept for the adapter tests


def _attn_names(n):
    return [f"layers.{i}.attn.{p}" for i in range(n) for p in ("to_q", "to_k", "to_v", "to_out.0")]


def test_family_and_targets(model):
    from taca.train.families import family_for
    from taca.train.families.lumina2 import Lumina2Family

    fam = family_for(load(model))
    assert isinstance(fam, Lumina2Family) and fam.shift() == 6.0
    attn = fam.target_modules("attn")
    assert attn == _attn_names(N_LAYERS)
    assert fam.target_modules("attn+ff") == attn + [f"layers.{i}.feed_forward.linear_{k}" for i in range(N_LAYERS)
                                                    for k in (1, 2, 3)]
    assert fam.target_modules(["to_q"]) == ["to_q"]


def test_targets_on_the_real_config():
    """Lumina-Image-2.0's transformer config (hidden 2304, 26 layers, 2 refiner layers, 24 / 8 heads,
    caption dim 2304, 16 latent channels), built empty: the 26 joint layers' attention, no refiner."""
    from types import SimpleNamespace

    from accelerate import init_empty_weights
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Transformer2DModel

    from taca.train.families.lumina2 import Lumina2Family

    with init_empty_weights():
        t = Lumina2Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, hidden_size=2304, num_layers=26,
                                      num_refiner_layers=2, num_attention_heads=24, num_kv_heads=8, multiple_of=256,
                                      norm_eps=1e-5, axes_dim_rope=(32, 32, 32), axes_lens=(300, 512, 512),
                                      cap_feat_dim=2304)
    fam = Lumina2Family(SimpleNamespace(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), transformer=t))
    attn, both = fam.target_modules("attn"), fam.target_modules("attn+ff")
    assert attn == _attn_names(26) and len(both) == 26 * 7
    linear = {n for n, m in t.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(both) <= linear
    # PEFT matches a name or a ".name" suffix: exactly the joint layers' attention, no refiner
    hit = {n for n in linear if any(n == k or n.endswith("." + k) for k in attn)}
    assert hit == set(attn) and not any("refiner" in n for n in hit)
    assert {n for n in linear if n.startswith("layers.") and ".attn." in n} == set(attn)


def test_gamma_on_in_every_training_forward(trained):
    res, calls = trained
    # every joint attention of every forward (the refiners are stock): 3 steps x 2 layers
    check_taca_run(res, calls, 3 * N_LAYERS, files=RUN_FILES[:3])
    assert saved_lora_modules(res.out) == {f"transformer.{n}" for n in _attn_names(N_LAYERS)}


def test_gradient_checkpointing_recomputes_taca(trained, model, data, tmp_path, monkeypatch):
    """With checkpointing every joint layer runs twice per step (forward, recompute in the backward),
    both times with gamma; the gradients are the same, so the losses and the adapter are too."""
    res = checkpointed_run(partial(_cfg, model, data), trained[0], tmp_path / "out", monkeypatch, 2 * 3 * N_LAYERS)
    check_same_adapter(trained[0].out, res.out)


def test_control_runs_stock_attention(model, data, tmp_path, monkeypatch):
    res = control_run(partial(_cfg, model, data), tmp_path / "out", monkeypatch, max_steps=2)
    assert len(res.losses) == 2


def test_predict_is_the_pipelines_denoising_step(model):
    """Lumina2Pipeline's own loop (its encode_prompt with the system prompt and fixed-length padding,
    prepare_latents, timesteps, negation, Euler step), 2 steps on a batch of 2 prompts of different
    lengths, TACA on: predict with the scheduler's sigmas is its negated transformer output, and
    stepping with it lands on the pipeline's result."""
    from taca.train.families import family_for

    pipe = load(model)
    fam = family_for(pipe)
    prompts = ["a red square", "a big yellow circle on a green background with a small blue square"]
    lat = pipe.prepare_latents(2, 4, RES, RES, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(3))
    assert lat.shape == (2, 4, RES // 8, RES // 8)
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, k, o: seen.append((k, o[0].clone())), with_kwargs=True)
    with taca.enabled(pipe, gamma=1.2) as h, torch.no_grad():
        out = pipe(prompt=list(prompts), latents=lat.clone(), height=RES, width=RES, num_inference_steps=2,
                   guidance_scale=1.0, max_sequence_length=TEXT_LEN, output_type="latent").images
        gammas = [h.last_gamma]
        hook.remove()
        sigmas = pipe.scheduler.sigmas  # [1, 0.5 shifted by 6, 0]
        assert sigmas.tolist() == pytest.approx([1.0, 6 * 0.5 / (1 + 5 * 0.5), 0.0])
        cond = text_cond(fam, prompts, TEXT_LEN)
        x = lat
        for i in range(2):
            s = sigmas[i].expand(2)
            v = fam.predict(pipe.transformer, x, s, cond, 0.0)
            gammas.append(h.last_gamma)
            kw, model_out = seen[i]
            # (step 0: the same latents; step 1: within the rounding of the text refiner's attention
            # over 64 padded tokens against the batch's longest caption, ~1e-7)
            torch.testing.assert_close(kw["hidden_states"], x, rtol=0, atol=0 if i == 0 else 1e-6)
            torch.testing.assert_close(kw["timestep"], 1.0 - s, rtol=0, atol=1e-7)
            # the pipeline pads to max_sequence_length; the cache keeps each caption's tokens
            m = kw["encoder_attention_mask"]
            assert m.shape == (2, TEXT_LEN) and m.sum(1).tolist() == cond["prompt_attention_mask"].sum(1).tolist()
            for j in range(2):
                n = int(m[j].sum())
                assert torch.equal(kw["encoder_hidden_states"][j, :n], cond["prompt_embeds"][j, :n])
            torch.testing.assert_close(v, -model_out, rtol=0, atol=1e-6)
            x = x + (sigmas[i + 1] - sigmas[i]) * v  # the scheduler's Euler step on the velocity
    torch.testing.assert_close(x, out, rtol=0, atol=1e-6)
    # the first step (sigma 1) is in the window, the second (0.857) is not, for both paths
    assert gammas[0] is None and gammas[2] is None and torch.allclose(gammas[1], torch.full((2,), 1.2))


def test_latents_are_what_the_pipeline_decodes(model):
    """encode_images' latents, put in place of the pipeline's last latents, decode (through the
    pipeline's own un-normalization and VAE decode) to the VAE's reconstruction of the posterior
    mode; with the FLUX VAE's non-trivial shift 0.1159 and scale 0.3611."""
    check_last_latents_decode(load(model), RES, RES // 8,
                              dict(height=RES, width=RES, guidance_scale=1.0, max_sequence_length=TEXT_LEN))


def test_captions_cached_with_the_system_prompt_and_batch_independent(model):
    from taca.train.families import family_for

    pipe = load(model)
    fam = family_for(pipe)
    cpu = torch.device("cpu")
    short, long = "a red square", "a big yellow circle on a green background with a small blue square and a cat"
    alone = fam.split_text(fam.encode_text([short], cpu, TEXT_LEN))[0]
    both = fam.split_text(fam.encode_text([short, long], cpu, TEXT_LEN))
    assert set(alone) == {"prompt_embeds"} and alone["prompt_embeds"].shape == both[0]["prompt_embeds"].shape
    torch.testing.assert_close(both[0]["prompt_embeds"], alone["prompt_embeds"], rtol=1e-5, atol=1e-6)
    # the cached caption: the pipeline's system prompt, " <Prompt Start> ", the caption, BOS first; its tokens only
    ids = pipe.tokenizer(pipe.system_prompt + " <Prompt Start> " + short).input_ids
    assert pipe.system_prompt == SYSTEM and ids[0] == pipe.tokenizer.bos_token_id
    assert alone["prompt_embeds"].shape[0] == len(ids)
    ref, ref_mask, _, _ = pipe.encode_prompt([short, long], do_classifier_free_guidance=False,
                                             max_sequence_length=TEXT_LEN)
    for e, r, m in zip(both, ref, ref_mask):
        assert torch.equal(e["prompt_embeds"], r[m.bool()])
    assert both[0]["prompt_embeds"].shape[0] < both[1]["prompt_embeds"].shape[0] < TEXT_LEN
    # predict on the padded batch (joint sequences of different lengths: the model's key mask) =
    # predict on each caption alone = the pipeline's fixed-length padding
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, RES // 8, RES // 8, generator=g)
    sigma = torch.tensor([0.99, 0.975])
    with taca.enabled(pipe, gamma=1.2), torch.no_grad():
        batch = fam.predict(pipe.transformer, x, sigma, fam.collate(both), 0.0)
        one = [fam.predict(pipe.transformer, x[j:j + 1], sigma[j:j + 1], fam.collate([both[j]]), 0.0) for j in range(2)]
        full = fam.predict(pipe.transformer, x, sigma, {"prompt_embeds": ref, "prompt_attention_mask": ref_mask}, 0.0)
    torch.testing.assert_close(batch, torch.cat(one), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch, full, rtol=1e-5, atol=1e-6)


def test_adapter_loads_in_diffusers_and_taca(trained, model):
    call = dict(prompt="a red square", height=RES, width=RES, num_inference_steps=2, guidance_scale=1.0,
                max_sequence_length=TEXT_LEN, output_type="latent")
    check_adapter_in_pipeline(partial(load, model), trained[0].out, call, 4 * N_LAYERS)
