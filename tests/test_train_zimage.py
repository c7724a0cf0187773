"""taca train on a tiny ZImagePipeline (Qwen3 text encoder with a byte-level BPE Qwen2 tokenizer and a
chat template written here, a 2-level AutoencoderKL with Z-Image's shift / scale, a 2-layer
ZImageTransformer2DModel), saved with save_pretrained, random weights, CPU: gamma in every
main-layer attention call of every training forward (with and without gradient checkpointing, which
then trains the same adapter), the control run stock; the family's predict is the pipeline's own
denoising step (timestep 1 - sigma, negated output) and its latents the ones the pipeline decodes;
captions cached unpadded, independent of their batch; the adapter loads through diffusers and taca."""
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

RES = 32  # 32x32 images -> 16x16 latents (2-level VAE) -> 64 image tokens (2x2 patches)
TEXT_LEN = 48
N_LAYERS = 2
TEXT_DIM = 32
TRANSFORMER = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=64, n_layers=N_LAYERS,
                   n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=TEXT_DIM,
                   rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 12, 12], axes_lens=[256, 64, 64])
# Tongyi-MAI/Z-Image-Turbo's scheduler: static shift 3, no dynamic shifting (as tests/test_models_zimage.py)
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
# Qwen3's chat template, reduced to what ZImagePipeline.encode_prompt uses (one user turn, the
# generation prompt; enable_thinking=True adds no empty think block)
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
                 "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
_WORDS = ("a red blue green yellow square on background circle with big small the and of cat dog photo "
          "user assistant").split()


def _tokenizer():
    """A byte-level BPE Qwen2Tokenizer: the 256 byte symbols, merges spelling out _WORDS (with and
    without the leading-space symbol), Qwen's specials, the chat template."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {t: i for i, t in enumerate(sorted(set(bytes_to_unicode().values())))}
    merges = spelled_out(_WORDS, "\u0120", vocab)
    for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab.setdefault(s, len(vocab))
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, extra_special_tokens=["<|im_start|>", "<|im_end|>"],
                         model_max_length=512)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_pipeline(seed=0):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tok = _tokenizer()
    torch.manual_seed(seed)
    te = Qwen3Model(Qwen3Config(vocab_size=len(tok), hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                                pad_token_id=tok.pad_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=RES, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    transformer = ZImageTransformer2DModel(**TRANSFORMER)
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, text_encoder=te,
                          tokenizer=tok, transformer=transformer)
    for m in (te, vae, transformer):
        m.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


_cfg = partial(train_config, resolution=RES, max_sequence_length=TEXT_LEN)
model = model_fixture(build_pipeline, "zimage")
data = data_fixture(8)
trained = run_fixture(lambda model, data, out: train(_cfg(model, data, out), progress=False),
                      where=("runs", "taca"))  # one TACA run, kept for the adapter tests


def test_family_and_targets(model):
    from taca.train.families import family_for
    from taca.train.families.zimage import ZImageFamily

    fam = family_for(load(model))
    assert isinstance(fam, ZImageFamily) and fam.shift() == 3.0
    attn = fam.target_modules("attn")
    assert attn == [f"layers.{i}.attention.{p}" for i in range(N_LAYERS) for p in ("to_q", "to_k", "to_v", "to_out.0")]
    assert fam.target_modules("attn+ff") == attn + [f"layers.{i}.feed_forward.w{k}" for i in range(N_LAYERS)
                                                    for k in (1, 2, 3)]
    assert fam.target_modules(["to_q"]) == ["to_q"]


def test_targets_on_the_real_config():
    """Z-Image-Turbo's transformer config (dim 3840, 30 layers, 2 refiner layers, 30 heads, caption
    dim 2560, 16 latent channels), built empty: the joint attention of the 30 main layers, no refiner."""
    from types import SimpleNamespace

    from accelerate import init_empty_weights
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel

    from taca.train.families.zimage import ZImageFamily

    with init_empty_weights():
        t = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30,
                                     n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True,
                                     cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0, axes_dims=[32, 48, 48],
                                     axes_lens=[1536, 512, 512])
    fam = ZImageFamily(SimpleNamespace(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), transformer=t))
    attn, both = fam.target_modules("attn"), fam.target_modules("attn+ff")
    assert len(attn) == 30 * 4 and len(both) == 30 * 7
    linear = {n for n, m in t.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(both) <= linear
    # PEFT matches a name or a ".name" suffix: nothing outside the main layers' attention / FFN
    hit = {n for n in linear if any(n == k or n.endswith("." + k) for k in attn)}
    assert hit == set(attn) and not any("refiner" in n for n in hit)
    assert {n for n in linear if n.startswith("layers.") and ".attention." in n} == set(attn)


def test_gamma_on_in_every_training_forward(trained):
    res, calls = trained
    # every main-layer attention of every forward (the refiners are stock): 3 steps x 2 layers
    check_taca_run(res, calls, 3 * N_LAYERS, files=RUN_FILES[:3])
    assert saved_lora_modules(res.out) == {f"transformer.layers.{i}.attention.{p}" for i in range(N_LAYERS)
                                           for p in ("to_q", "to_k", "to_v", "to_out.0")}


def test_gradient_checkpointing_recomputes_taca(trained, model, data, tmp_path, monkeypatch):
    """With checkpointing every main layer runs twice per step (forward, recompute in the backward),
    both times with gamma; the gradients are the same, so the losses and the adapter are too."""
    res = checkpointed_run(partial(_cfg, model, data), trained[0], tmp_path / "out", monkeypatch, 2 * 3 * N_LAYERS)
    check_same_adapter(trained[0].out, res.out)


def test_control_runs_stock_attention(model, data, tmp_path, monkeypatch):
    res = control_run(partial(_cfg, model, data), tmp_path / "out", monkeypatch, max_steps=2)
    assert len(res.losses) == 2


def test_predict_is_the_pipelines_denoising_step(model):
    """ZImagePipeline's own loop (its encode_prompt, prepare_latents, timesteps, negation, Euler
    step), 2 steps on a batch of 2 prompts of different lengths, TACA on: its transformer inputs and
    its result equal the family's predict with the scheduler's sigmas."""
    from taca.train.families import family_for

    pipe = load(model)
    fam = family_for(pipe)
    prompts = ["a red square", "a big yellow circle on a green background with a small blue square"]
    lat = pipe.prepare_latents(2, 4, RES, RES, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(3))
    assert lat.shape == (2, 4, RES // 2, RES // 2)
    seen = []
    hook = pipe.transformer.register_forward_hook(
        lambda m, a, k, o: seen.append((a, [x.clone() for x in o[0]])), with_kwargs=True)
    with taca.enabled(pipe, gamma=1.2) as h, torch.no_grad():
        # (encode_prompt writes the chat template into the list it is given: hand it a copy)
        out = pipe(prompt=list(prompts), latents=lat.clone(), height=RES, width=RES, num_inference_steps=2,
                   guidance_scale=0.0, max_sequence_length=TEXT_LEN, output_type="latent").images
        gammas = [h.last_gamma]
        hook.remove()
        sigmas = pipe.scheduler.sigmas  # [1, shifted 0.5 = 0.75, 0]
        assert sigmas.tolist() == pytest.approx([1.0, 0.75, 0.0])
        cond = text_cond(fam, prompts, TEXT_LEN)
        x = lat
        for i in range(2):
            s = sigmas[i].expand(2)
            v = fam.predict(pipe.transformer, x, s, cond, 0.0)
            gammas.append(h.last_gamma)
            # the pipeline's transformer call of step i: same inputs, and predict is its negated output
            args, model_out = seen[i]
            assert torch.equal(torch.stack(args[0]), x.unsqueeze(2))
            torch.testing.assert_close(args[1], (1.0 - s), rtol=0, atol=1e-7)
            assert len(args[2]) == 2 and all(torch.equal(a, b) for a, b in
                                             zip(args[2], [pe[m] for pe, m in zip(cond["prompt_embeds"],
                                                                                 cond["prompt_mask"])]))
            torch.testing.assert_close(v, -torch.stack(model_out).squeeze(2), rtol=0, atol=1e-6)
            x = x + (sigmas[i + 1] - sigmas[i]) * v  # the scheduler's Euler step on the velocity
    torch.testing.assert_close(x, out, rtol=0, atol=1e-6)
    # the first step (sigma 1) is in the window, the second (0.75) is not, for both paths
    assert gammas[0] is None and gammas[2] is None and torch.allclose(gammas[1], torch.full((2,), 1.2))
    assert args[2][0].shape[0] < args[2][1].shape[0]  # the captions kept their own lengths


def test_latents_are_what_the_pipeline_decodes(model):
    """encode_images' latents, put in place of the pipeline's last latents, decode (through the
    pipeline's own un-normalization and VAE decode) to the VAE's reconstruction of the posterior
    mode; with Z-Image's non-trivial shift 0.1159 and scale 0.3611."""
    check_last_latents_decode(load(model), RES, RES // 2,
                              dict(height=RES, width=RES, guidance_scale=0.0, max_sequence_length=TEXT_LEN))


def test_captions_cached_unpadded_and_batch_independent(model):
    from taca.train.families import family_for

    pipe = load(model)
    fam = family_for(pipe)
    cpu = torch.device("cpu")
    short, long = "a red square", "a big yellow circle on a green background with a small blue square and a cat"
    alone = fam.split_text(fam.encode_text([short], cpu, 64))[0]
    both = fam.split_text(fam.encode_text([short, long], cpu, 64))
    assert set(alone) == {"prompt_embeds"} and alone["prompt_embeds"].shape == both[0]["prompt_embeds"].shape
    torch.testing.assert_close(both[0]["prompt_embeds"], alone["prompt_embeds"], rtol=1e-5, atol=1e-6)
    # the cached caption is the pipeline's own, tokens only
    ref = pipe.encode_prompt([short, long], do_classifier_free_guidance=False, max_sequence_length=64)[0]
    for e, r in zip(both, ref):
        torch.testing.assert_close(e["prompt_embeds"], r, rtol=0, atol=0)
    n = [int(e["prompt_embeds"].shape[0]) for e in both]
    assert n[0] < 32 < n[1]  # the model pads them to 32 and 64 tokens: per-sample spans and a key mask
    # predict on the padded batch = predict on each caption alone
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, RES // 2, RES // 2, generator=g)
    sigma = torch.tensor([0.99, 0.975])
    with taca.enabled(pipe, gamma=1.2), torch.no_grad():
        batch = fam.predict(pipe.transformer, x, sigma, fam.collate(both), 0.0)
        one = [fam.predict(pipe.transformer, x[j:j + 1], sigma[j:j + 1], fam.collate([both[j]]), 0.0) for j in range(2)]
    torch.testing.assert_close(batch, torch.cat(one), rtol=1e-5, atol=1e-5)


def test_adapter_loads_in_diffusers_and_taca(trained, model):
    call = dict(prompt="a red square", height=RES, width=RES, num_inference_steps=2, guidance_scale=0.0,
                max_sequence_length=TEXT_LEN, output_type="latent")
    check_adapter_in_pipeline(partial(load, model), trained[0].out, call, 4 * N_LAYERS)


def test_fsdp2_with_gradient_checkpointing_matches_one_process(trained, model, data, tmp_path):
    """Z-Image hands its processors TACA's state outside the attention kwargs: under FSDP2 (2 CPU
    processes, batch 1 each, every block sharded) with gradient checkpointing, the blocks recomputed
    in the backward still get it: losses and adapter equal one process's with the same global batch."""
    import json
    import os

    from safetensors.torch import load_file
    from test_train import _launch_fsdp2

    args = ["--model", model, "--data", data, "--resolution", str(RES), "--max-steps", "3", "--mixed-precision", "no",
            "--max-sequence-length", str(TEXT_LEN), "--lr", "1e-3", "--rank", "4", "--report-to", "none",
            "--device", "cpu", "--gradient-checkpointing"]
    err = _launch_fsdp2(args, tmp_path / "fsdp", 29541)
    n = err.split("FSDP2: ")[1].split(" parameter tensors")[0].split(" of ")
    assert int(n[0]) == int(n[1]) > 0, n
    with open(tmp_path / "fsdp" / "log.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(trained[0].losses), rtol=1e-4, atol=1e-6)
    a = load_file(str(tmp_path / "fsdp" / "pytorch_lora_weights.safetensors"))
    b = load_file(os.path.join(trained[0].out, "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
