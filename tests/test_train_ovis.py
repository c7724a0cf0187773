"""taca train on a tiny OvisImagePipeline (a Qwen3 text encoder with a byte-level BPE Qwen2 tokenizer
whose merges make each word of the pipeline's system prompt and of the captions one token, and
Qwen3's chat template reduced to one user turn; a 2-level AutoencoderKL with FLUX.1's shift and
scale; tests/test_models_ovis.py's 2 + 2-block OvisImageTransformer2DModel with 4 latent channels
and its FLUX.1-dev scheduler), saved with save_pretrained, random weights, CPU: gamma in every joint
attention call of every training forward (with and without gradient checkpointing, which trains the
same adapter), the control run stock; the family's predict is the pipeline's own transformer call
(packing, image ids, the text ids (0, i, i), timestep sigma, no guidance, the output as it is) and
Euler steps with it land on the pipeline's result; the latents are what the pipeline decodes;
captions padded to the fixed length as the pipeline pads them, independent of their batch; bad
max_sequence_length refused; the adapter loads through diffusers (the transformer's
load_lora_adapter: the pipeline has no load_lora_weights) and taca.enable(lora=)."""
from functools import partial

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")
pytest.importorskip("tokenizers")

import taca  # noqa: E402
from taca.train import train  # noqa: E402
from taca.train.config import ConfigError  # noqa: E402

from test_models_ovis import SCHEDULER, TINY  # noqa: E402  (the adapter tests' tiny configs)
from train_checks import (cache_dir, cached_text, check_alone_as_in_batch, check_batch_independent,  # noqa: E402,F401
                          check_flux_vae_latents, check_same_adapter, check_taca_run, check_transformer_loaded_adapter,
                          check_zero_model_decodes, checked_family, checkpointed_run, control_run, data_fixture,
                          flux_attn_names, flux_ff_names, load, LONG, model_fixture, peft_hits, qwen2_bpe_tokenizer,
                          Record, RUN_FILES, run_fixture, saved_lora_modules, SHORT, text_cond, train_config)

RES = 32  # 32x32 images -> 16x16 latents (2-level VAE) -> 2x2 packing -> 64 image tokens
TEXT_LEN = 32  # every caption padded to 32 text tokens (the pipeline tokenizes to 32 + 28)
TRANSFORMER = dict(TINY, in_channels=16, out_channels=16)  # 4 latent channels, packed 2x2; text dim 24
N_DOUBLE, N_SINGLE = TRANSFORMER["num_layers"], TRANSFORMER["num_single_layers"]
N_JOINT = N_DOUBLE + N_SINGLE  # every attention of the model is joint
SYSTEM = ("Describe the image by detailing the color, quantity, text, shape, size, texture, spatial "
          "relationships of the objects and background: ")  # OvisImagePipeline.system_prompt
# Qwen3's chat template, reduced to what the pipeline uses (one user turn, the generation prompt,
# the empty think block of enable_thinking=False)
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
        "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
MESSAGE = "<|im_start|>user\n" + SYSTEM + "{}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def build_pipeline(seed=0):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, OvisImagePipeline, OvisImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tok = qwen2_bpe_tokenizer(MESSAGE)
    tok.chat_template = CHAT
    torch.manual_seed(seed)
    te = Qwen3Model(Qwen3Config(vocab_size=len(tok), hidden_size=TRANSFORMER["joint_attention_dim"],
                                intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=1, head_dim=12, max_position_embeddings=512,
                                pad_token_id=tok.pad_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=RES, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    pipe = OvisImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, text_encoder=te,
                             tokenizer=tok, transformer=OvisImageTransformer2DModel(**TRANSFORMER))
    for m in (te, vae, pipe.transformer):
        m.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _family(pipe):
    from taca.train.families.ovis import OvisImageFamily

    return checked_family(pipe, OvisImageFamily, "ovis")








def _kept_tokens(pipe, caption):
    """How many of the caption's tokens (the template's included) the pipeline keeps after dropping
    the first user_prompt_begin_id, up to TEXT_LEN."""
    n = len(pipe.tokenizer(MESSAGE.format(caption), add_special_tokens=False).input_ids)
    return min(n, TEXT_LEN + pipe.user_prompt_begin_id) - pipe.user_prompt_begin_id


# alpha 8 at rank 4: loading the adapter back must read the scale from the file's metadata
_cfg = partial(train_config, resolution=RES, max_sequence_length=TEXT_LEN, alpha=8.0)
model = model_fixture(build_pipeline, "ovis")
data = data_fixture(4)
trained = run_fixture(lambda model, data, cache_dir, out: train(_cfg(model, data, out, cache_dir=cache_dir),
                                                               progress=False),
                      where=("runs", "taca"))  # one TACA run, kept for the adapter tests


def test_family_and_targets(model):
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, OvisImagePipeline

    from taca.train.families.ovis import OvisImageFamily

    pipe = load(model)
    fam = _family(pipe)
    assert fam.shift() == 1.0  # dynamic shifting: the sampled sigmas are not shifted
    # diffusers 0.42.1: no LoRA loader mixin on OvisImagePipeline; FluxPipeline's saver writes the same format
    assert fam.lora_saver() is (OvisImagePipeline if hasattr(OvisImagePipeline, "save_lora_weights") else FluxPipeline)
    assert fam.text_modules() == [pipe.text_encoder] and fam.image_modules() == [pipe.vae]
    linear = {n for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    attn = peft_hits(linear, fam.target_modules("attn"))
    assert attn == set(flux_attn_names(N_DOUBLE, N_SINGLE))
    assert peft_hits(linear, fam.target_modules("attn+ff")) - attn == flux_ff_names(N_DOUBLE)
    assert fam.target_modules(["to_q"]) == ["to_q"]
    # a scheduler with a static shift (no dynamic shifting) ignores the pipeline's mu: training shifts alike
    static = OvisImageFamily(SimpleNamespace(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0)))
    assert static.shift() == 3.0


def test_targets_on_the_real_config():
    """Ovis-Image-7B's transformer (diffusers' defaults, taken to be its config: 6 double- and 27 single blocks,
    24 heads of 128, text dim 2048, 64 packed channels), built empty: "attn" hits exactly the joint
    attention projections of all 33 blocks, "attn+ff" adds the double blocks' feed-forwards only."""
    from types import SimpleNamespace

    from accelerate import init_empty_weights
    from diffusers import OvisImageTransformer2DModel

    from taca.train.families.ovis import OvisImageFamily

    with init_empty_weights():
        t = OvisImageTransformer2DModel()
    assert (t.config.num_layers, t.config.num_single_layers, t.inner_dim) == (6, 27, 3072)
    fam = OvisImageFamily(SimpleNamespace(scheduler=None, transformer=t))
    linear = {n for n, m in t.named_modules() if isinstance(m, torch.nn.Linear)}
    attn = peft_hits(linear, fam.target_modules("attn"))
    assert attn == set(flux_attn_names(6, 27)) and len(attn) == 6 * 8 + 27 * 3
    assert peft_hits(linear, fam.target_modules("attn+ff")) - attn == flux_ff_names(6)
    assert all(peft_hits(linear, [k]) for k in fam.target_modules("attn+ff"))  # no dead name


def test_gamma_on_in_every_training_forward(trained):
    res, calls = trained
    # every joint attention of every forward: 3 steps x (2 double + 2 single blocks)
    check_taca_run(res, calls, 3 * N_JOINT, files=RUN_FILES[:3])
    assert saved_lora_modules(res.out) == {f"transformer.{n}" for n in flux_attn_names(N_DOUBLE, N_SINGLE)}
    # the text cache: each caption's fixed-length embedding, nothing else (the text ids are rebuilt)
    entries = cached_text(res)
    assert entries and all(set(e) == {"prompt_embeds"} for e in entries)
    assert {tuple(e["prompt_embeds"].shape) for e in entries} == {(TEXT_LEN, TRANSFORMER["joint_attention_dim"])}


def test_gradient_checkpointing_recomputes_taca(trained, model, data, cache_dir, tmp_path, monkeypatch):
    """With checkpointing every block runs twice per step (forward, recompute in the backward), both
    times with gamma; the gradients are the same, so the losses and the adapter are too."""
    res = checkpointed_run(partial(_cfg, model, data, cache_dir=cache_dir), trained[0], tmp_path / "out", monkeypatch,
                           2 * 3 * N_JOINT)
    check_same_adapter(trained[0].out, res.out)


def test_control_runs_stock_attention(model, data, cache_dir, tmp_path, monkeypatch):
    res = control_run(partial(_cfg, model, data, cache_dir=cache_dir), tmp_path / "out", monkeypatch, max_steps=2)
    assert len(res.losses) == 2


def test_predict_is_the_pipelines_denoising_step(model):
    """OvisImagePipeline's own loop (2 steps, no CFG, a batch of 2 prompts of different lengths, a
    non-square 32x48 image, TACA on): the transformer call predict makes on the unpacked latents, the
    scheduler's sigma and the cached text is the pipeline's call (the same packed tokens, image ids,
    text ids (0, i, i), embeddings, timestep, no other argument), its output the pipeline's output,
    and Euler steps with it land on the pipeline's result."""
    from diffusers import OvisImagePipeline

    pipe = load(model)
    fam = _family(pipe)
    t = pipe.transformer
    prompts = [SHORT, LONG]
    H, W = 32, 48
    h, w = H // pipe.vae_scale_factor, W // pipe.vae_scale_factor
    x = torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(3))
    rec = Record(t)
    with taca.enabled(pipe, gamma=1.2), torch.no_grad():
        out = pipe(prompt=prompts, latents=OvisImagePipeline._pack_latents(x, 2, 4, h, w), height=H, width=W,
                   num_inference_steps=2, guidance_scale=1.0, max_sequence_length=TEXT_LEN, output_type="latent").images
        seen = list(rec.calls)
        assert len(seen) == 2
        sigmas = pipe.scheduler.sigmas
        assert float(sigmas[0]) == 1.0 and 0.3 < float(sigmas[1]) < 0.97  # the first step in the window only
        cond = text_cond(fam, prompts, TEXT_LEN)
        for i in range(2):
            v = fam.predict(t, x, sigmas[i].expand(2), cond, 3.5)  # --guidance: no guidance embedding, unused
            kw, model_out = rec.calls[-1]
            pkw, pipe_out = seen[i]
            assert set(kw) == set(pkw) == {"hidden_states", "timestep", "encoder_hidden_states", "txt_ids", "img_ids",
                                           "joint_attention_kwargs", "return_dict"}
            torch.testing.assert_close(kw["hidden_states"], pkw["hidden_states"], rtol=0, atol=0 if i == 0 else 1e-6)
            assert torch.equal(kw["encoder_hidden_states"], pkw["encoder_hidden_states"])  # padded, no mask
            for ids in ("img_ids", "txt_ids"):
                assert torch.equal(kw[ids], pkw[ids]) and kw[ids].dtype == pkw[ids].dtype
            assert torch.equal(kw["txt_ids"][:, 1], torch.arange(TEXT_LEN).float())  # (0, i, i), not FLUX's zeros
            torch.testing.assert_close(kw["timestep"], pkw["timestep"], rtol=0, atol=1e-7)  # t / 1000 = sigma
            # sigma 1 is in the window (gamma 1.2 for both samples), the second step is not, for both paths
            g, pg = kw["joint_attention_kwargs"]["taca_gamma"], pkw["joint_attention_kwargs"]["taca_gamma"]
            if i == 0:
                assert torch.allclose(g, torch.full((2,), 1.2)) and torch.allclose(pg, torch.full((2,), 1.2))
            else:
                assert g is None and pg is None
            torch.testing.assert_close(model_out, pipe_out, rtol=0, atol=1e-6)  # (bit for bit here)
            torch.testing.assert_close(v, OvisImagePipeline._unpack_latents(pipe_out, H, W, pipe.vae_scale_factor),
                                       rtol=0, atol=1e-6)  # the velocity, not negated
            x = x + (sigmas[i + 1] - sigmas[i]) * v  # the scheduler's Euler step
        rec.h.remove()
    torch.testing.assert_close(OvisImagePipeline._pack_latents(x, 2, 4, h, w), out, rtol=0, atol=1e-6)


def test_latents_are_what_the_pipeline_decodes(model, monkeypatch):
    """encode_images is (mode - 0.1159) * 0.3611; packed and handed to the pipeline as its latents
    with a transformer that predicts 0 (the Euler steps keep them), the pipeline's own unpack,
    denormalization and decode give the VAE's reconstruction of the mode."""
    from diffusers import OvisImagePipeline

    pipe = load(model)
    fam = _family(pipe)
    f = pipe.vae_scale_factor
    px = torch.rand(2, 3, RES, RES + 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    lat, mode = check_flux_vae_latents(fam, pipe.vae, px, (2, 4, RES // f, (RES + 16) // f))
    packed = OvisImagePipeline._pack_latents(lat, 2, 4, RES // f, (RES + 16) // f)
    check_zero_model_decodes(pipe, mode, monkeypatch, dict(latents=packed, height=RES, width=RES + 16,
                                                           max_sequence_length=TEXT_LEN))


def test_captions_padded_to_the_fixed_length_and_batch_independent(model):
    """encode_prompt pads every caption's chat message to TEXT_LEN + 28 tokens, zeroes the padding and
    drops the first 28: a caption's entry is its (TEXT_LEN, D) embedding, the same alone or next to a
    longer one, the pipeline's own; predict on a batch equals predict on each caption alone; the same
    caption padded to another length gives another prediction (train at the length you generate with)."""
    pipe = load(model)
    fam = _family(pipe)
    alone, both, _ = check_alone_as_in_batch(fam, TEXT_LEN, [TEXT_LEN, TEXT_LEN])
    n = [_kept_tokens(pipe, c) for c in (SHORT, LONG)]
    assert 0 < n[0] < n[1] < TEXT_LEN
    with torch.no_grad():
        ref = pipe.encode_prompt([SHORT, LONG], do_classifier_free_guidance=False, max_sequence_length=TEXT_LEN)[0]
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
    """None is the pipeline's default, 256; more than 256 (which the pipeline refuses to generate
    with) or a non-positive length is a ConfigError naming --max-sequence-length; latents of odd
    size, or not 4-D, and a pipeline without its text encoder are ValueErrors that say so."""
    pipe = load(model)
    fam = _family(pipe)
    cpu = torch.device("cpu")
    assert fam.encode_text([SHORT], cpu, None)["prompt_embeds"].shape == (1, 256, TRANSFORMER["joint_attention_dim"])
    for bad in (257, 0):
        with pytest.raises(ConfigError, match="--max-sequence-length"):
            fam.encode_text([SHORT], cpu, bad)
    cond = text_cond(fam, [SHORT], TEXT_LEN)
    with pytest.raises(ValueError, match="even height and width"):
        fam.predict(pipe.transformer, torch.zeros(1, 4, 15, 16), torch.tensor([0.99]), cond, 1.0)
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        fam.predict(pipe.transformer, torch.zeros(1, 4, 1, 16, 16), torch.tensor([0.99]), cond, 1.0)
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
