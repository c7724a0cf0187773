"""taca train on a tiny CogView4Pipeline (GLM text encoder with a word-level tokenizer written here that
prefixes "[gMASK]<sop>" and pads on the left as GLM-4's does, a 2-level AutoencoderKL with a
non-trivial scale and a shift the pipeline does not use, a 2-layer CogView4Transformer2DModel, the
dynamic LINEAR time shift), saved with save_pretrained, random weights, CPU: gamma in every joint
attention call of every training forward (with and without gradient checkpointing, which then trains
the same adapter; TACA on the bare transformer, whose "scheduler" timestep convention predict feeds),
the control run stock; the family's predict is the pipeline's own denoising step (the unshifted
timestep, no negation, the size conditions) and its latents the ones the pipeline decodes; captions
cached as the pipeline encodes each one alone (the pipeline's own batch would change a short
caption's embedding), predict per caption length so a batch changes nothing; the adapter loads
through diffusers and taca; the control pipeline is refused."""
from functools import partial

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

import taca  # noqa: E402
from taca.train import train  # noqa: E402

from train_checks import (assert_same_adapters, cached_text, check_adapter_in_pipeline,  # noqa: E402
                          check_batch_independent, check_same_adapter, check_taca_run, checkpointed_run, control_run,
                          data_fixture, GammaCounter, launch_ddp, load, model_fixture, peft_hits, Record, run_fixture,
                          saved_lora_modules, text_cond, train_config, write_captioned_data)

RES = 32  # 32x32 images -> 16x16 latents (2-level VAE) -> 64 image tokens (2x2 patches): mu = 0.625
TEXT_LEN = 48
N_LAYERS = 2
TEXT_DIM = 32
TRANSFORMER = dict(patch_size=2, in_channels=4, out_channels=4, num_layers=N_LAYERS, attention_head_dim=16,
                   num_attention_heads=2, text_embed_dim=TEXT_DIM, time_embed_dim=16, condition_dim=8,
                   pos_embed_max_size=16, sample_size=16, rope_axes_dim=(16, 16))
# THUDM/CogView4-6B's scheduler (scripts/convert_cogview4_to_diffusers.py; tests/test_models_cogview4.py)
SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.25, max_shift=0.75,
                 base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="linear")
SCALE, SHIFT = 0.3611, 0.1159  # CogView4-6B's VAE has 1.0 / 0.0; these tell the conventions apart
_WORDS = ("a an big small red blue green yellow square circle on next to the background and with cat dog "
          "photo of").split()
SHORT = "a red square"  # 3 words + [gMASK] <sop>: 16 tokens after the pipeline's padding
LONGER = "a big yellow square on a green background next to a blue circle and a small red circle with a cat"  # 32


def _tokenizer():
    """GLM-4's conventions on a word-level vocabulary: "[gMASK]<sop>" before the words, the pad
    token <|endoftext|>, padding on the left."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "[gMASK]", "<sop>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + _WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="[gMASK] <sop> $A", special_tokens=[("[gMASK]", vocab["[gMASK]"]), ("<sop>", vocab["<sop>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<|endoftext|>", unk_token="<unk>",
                                   padding_side="left", model_max_length=1024)


def build_pipeline(seed=0):
    from diffusers import AutoencoderKL, CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import GlmConfig, GlmModel

    tok = _tokenizer()
    torch.manual_seed(seed)
    te = GlmModel(GlmConfig(vocab_size=len(tok), hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                            pad_token_id=tok.pad_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=RES, scaling_factor=SCALE,
                        shift_factor=SHIFT)
    transformer = CogView4Transformer2DModel(**TRANSFORMER)
    pipe = CogView4Pipeline(tokenizer=tok, text_encoder=te, vae=vae, transformer=transformer,
                            scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER))
    for m in (te, vae, transformer):
        m.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


_cfg = partial(train_config, resolution=RES, max_sequence_length=TEXT_LEN)
model = model_fixture(build_pipeline, "cogview4")
data = data_fixture(8)  # "a <colour> square on a <colour> background": 16 tokens each
trained = run_fixture(lambda model, data, out: train(_cfg(model, data, out), progress=False), where=("runs", "taca"))


def test_family_and_targets(model):
    from taca.train.families import family_for
    from taca.train.families.cogview4 import CogView4Family

    pipe = load(model)
    fam = family_for(pipe)
    assert isinstance(fam, CogView4Family) and fam.name == "cogview4" and fam.shift() == 1.0  # dynamic shifting
    attn = fam.target_modules("attn")
    assert attn == [f"transformer_blocks.{i}.attn1.{p}" for i in range(N_LAYERS)
                    for p in ("to_q", "to_k", "to_v", "to_out.0")]
    assert fam.target_modules("attn+ff") == attn + [f"transformer_blocks.{i}.ff.net.{k}" for i in range(N_LAYERS)
                                                    for k in ("0.proj", "2")]
    assert fam.target_modules(["to_q"]) == ["to_q"]
    from diffusers import CogView4Pipeline

    assert fam.lora_saver() is CogView4Pipeline


def test_control_pipeline_is_refused(model):
    """CogView4ControlPipeline (a control image's latents concatenated to the noisy ones) is refused
    when its family is made; so is a control transformer (8 input channels for 4) in a CogView4Pipeline."""
    from diffusers import CogView4ControlPipeline, CogView4Pipeline, CogView4Transformer2DModel

    from taca.train.families import family_for

    pipe = load(model)
    parts = dict(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae, scheduler=pipe.scheduler)
    with pytest.raises(ValueError, match="CogView4ControlPipeline conditions on a control image"):
        family_for(CogView4ControlPipeline(transformer=pipe.transformer, **parts))
    control = CogView4Transformer2DModel(**dict(TRANSFORMER, in_channels=8))
    with pytest.raises(ValueError, match="a control model"):
        family_for(CogView4Pipeline(transformer=control, **parts))


def test_targets_on_the_real_config():
    """THUDM/CogView4-6B's transformer config (scripts/convert_cogview4_to_diffusers.py: 28 layers, 32
    heads of 128, text dim 4096, 16 latent channels), built empty: every block's joint attention."""
    from types import SimpleNamespace

    from accelerate import init_empty_weights
    from diffusers import CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler

    from taca.train.families.cogview4 import CogView4Family

    with init_empty_weights():
        t = CogView4Transformer2DModel(patch_size=2, in_channels=16, out_channels=16, num_layers=28,
                                       attention_head_dim=128, num_attention_heads=32, text_embed_dim=4096,
                                       time_embed_dim=512, condition_dim=256, pos_embed_max_size=128,
                                       sample_size=128, rope_axes_dim=(256, 256))
    fam = CogView4Family(SimpleNamespace(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), transformer=t,
                                         vae_scale_factor=8))
    attn, both = fam.target_modules("attn"), fam.target_modules("attn+ff")
    assert len(attn) == 28 * 4 and len(both) == 28 * 6
    linear = {n for n, m in t.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(both) <= linear
    hit = peft_hits(linear, attn)
    assert hit == set(attn) == {n for n in linear if ".attn1." in n}


def test_gamma_on_in_every_training_forward(trained):
    res, calls = trained
    check_taca_run(res, calls, 3 * N_LAYERS)  # every block's joint attention, 3 steps
    assert saved_lora_modules(res.out) == {f"transformer.transformer_blocks.{i}.attn1.{p}" for i in range(N_LAYERS)
                                           for p in ("to_q", "to_k", "to_v", "to_out.0")}


def test_gradient_checkpointing_recomputes_taca(trained, model, data, tmp_path, monkeypatch):
    res = checkpointed_run(partial(_cfg, model, data), trained[0], tmp_path / "out", monkeypatch, 2 * 3 * N_LAYERS)
    check_same_adapter(trained[0].out, res.out)


def test_control_runs_stock_attention(model, data, tmp_path, monkeypatch):
    res = control_run(partial(_cfg, model, data), tmp_path / "out", monkeypatch, max_steps=2)
    assert len(res.losses) == 2


def test_timestep_is_the_unshifted_t():
    """predict's timestep inverts the scheduler's dynamic linear shift: at the shifted sigmas the
    scheduler makes for a 16x16 latent (mu = sqrt(64 / 256) 0.75 + 0.25), the integer t it keeps."""
    from types import SimpleNamespace

    from diffusers import CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler

    from taca.train.families.cogview4 import CogView4Family

    sch = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    fam = CogView4Family(SimpleNamespace(scheduler=sch, transformer=CogView4Transformer2DModel(**TRANSFORMER),
                                         vae_scale_factor=2))
    t = torch.tensor([1000.0, 900.0, 500.0, 250.0, 20.0])
    sch.set_timesteps(timesteps=t.tolist(), sigmas=(t / 1000).tolist(), mu=0.625)
    assert torch.equal(sch.timesteps, t) and sch.sigmas[2] == pytest.approx(0.625 / 1.625)
    torch.testing.assert_close(fam.timestep(sch.sigmas[:5], 16, 16), t, rtol=0, atol=2e-4)
    # 128x128 latents (1024 px): mu = 3.25, sigma 0.97 is t = 909
    assert float(fam.timestep(torch.tensor([0.97]), 128, 128)) == pytest.approx(1000 * 0.97 / (0.97 + 3.25 * 0.03))


def test_predict_is_the_pipelines_denoising_step(model):
    """CogView4Pipeline's own loop (its encode_prompt, unshifted integer timesteps, size conditions,
    Euler steps on the shifted sigmas), 3 steps on 2 prompts, TACA on through the pipeline (sigma from
    its scheduler): every transformer input and output equals the family's predict at the
    scheduler's sigmas (the timestep to float32 rounding of the inverse shift), the gammas too, and
    Euler steps on predict reach the pipeline's latents."""
    from taca.train.families import family_for

    pipe = load(model)
    fam = family_for(pipe)
    prompts = ["a red square", "a big yellow circle on a green background"]  # 16 tokens each, as alone
    lat = pipe.prepare_latents(2, 4, RES, RES, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(3))
    assert lat.shape == (2, 4, RES // 2, RES // 2)
    rec = Record(pipe.transformer)
    with taca.enabled(pipe, gamma=1.2) as h, torch.no_grad():
        gammas = []
        out = pipe(prompt=prompts, latents=lat.clone(), height=RES, width=RES, num_inference_steps=3,
                   guidance_scale=1.0, max_sequence_length=TEXT_LEN, output_type="latent",
                   callback_on_step_end=lambda p, i, t, kw: gammas.append(h.last_gamma) or {}).images
        sigmas, ts = pipe.scheduler.sigmas, pipe.scheduler.timesteps
        assert ts.tolist() == [1000.0, 500.0, 1.0] and sigmas[1] == pytest.approx(0.625 / 1.625)
        cond = text_cond(fam, prompts, TEXT_LEN)
        x = lat
        for i in range(3):
            v = fam.predict(pipe.transformer, x, sigmas[i].expand(2), cond, 1.0)
            gammas.append(h.last_gamma)
            kw, model_out = rec.calls[i]
            mine, mine_out = rec.calls[3 + i]
            assert torch.equal(kw["hidden_states"], x) and torch.equal(mine["hidden_states"], x)
            assert torch.equal(mine["encoder_hidden_states"], kw["encoder_hidden_states"])
            for k in ("original_size", "target_size", "crop_coords"):
                assert torch.equal(mine[k], kw[k]), k
            assert kw["original_size"].tolist() == [[RES, RES]] * 2 and not kw["crop_coords"].any()
            torch.testing.assert_close(mine["timestep"], kw["timestep"], rtol=0, atol=1e-4)
            assert torch.equal(mine_out, v)
            torch.testing.assert_close(v, model_out, rtol=0, atol=1e-5)  # no negation
            x = x + (sigmas[i + 1] - sigmas[i]) * v  # the scheduler's Euler step on the velocity
    rec.h.remove()
    torch.testing.assert_close(x, out, rtol=0, atol=1e-5)
    # step 0 (sigma 1) is in the window, the others (0.38, 6e-4) are not, in both paths
    assert torch.allclose(gammas[0], torch.full((2,), 1.2)) and gammas[1] is None and gammas[2] is None
    assert torch.allclose(gammas[3], torch.full((2,), 1.2)) and gammas[4] is None and gammas[5] is None


def test_latents_are_what_the_pipeline_decodes(model):
    """encode_images = mode * scaling_factor (the pipeline decodes latents / scaling_factor and adds no
    shift back: the VAE's shift 0.1159 is not used); put in place of the pipeline's last latents they
    decode, through its own path, to the VAE's reconstruction of the posterior mode."""
    from taca.train.families import family_for

    pipe = load(model)
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (SCALE, SHIFT)
    fam = family_for(pipe)
    px = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(0)) * 2 - 1
    lat = fam.encode_images(px)
    with torch.no_grad():
        mode = pipe.vae.encode(px).latent_dist.mode()
        assert lat.shape == (2, 4, RES // 2, RES // 2)
        torch.testing.assert_close(lat, mode * SCALE, rtol=0, atol=0)
        want = pipe.image_processor.postprocess(pipe.vae.decode(mode).sample, output_type="pt")
        got = pipe(prompt=["a red square", "a blue circle"], height=RES, width=RES, num_inference_steps=1,
                   guidance_scale=1.0, max_sequence_length=TEXT_LEN, output_type="pt",
                   callback_on_step_end=lambda p, i, t, kw: {"latents": lat.clone()}).images
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_captions_cached_as_alone_and_batch_independent(model):
    """A caption's cache entry is the pipeline's encoding of it alone (its own length, a multiple of
    16), encoded with a longer caption or not; the pipeline's own batch would left-pad the short one
    to the long one's 32 tokens and change its embedding. predict on a batch mixing 16- and 32-token
    captions (one transformer call per length) equals predict on each alone, TACA on the bare
    transformer, gammas recorded per sample."""
    from taca.train.families import family_for

    pipe = load(model)
    fam = family_for(pipe)
    cpu = torch.device("cpu")
    both = fam.split_text(fam.encode_text([SHORT, LONGER, "a cat"], cpu, TEXT_LEN))
    assert [e["prompt_embeds"].shape[0] for e in both] == [16, 32, 16] and set(both[0]) == {"prompt_embeds"}
    with torch.no_grad():
        for e, c in zip(both, [SHORT, LONGER, "a cat"]):
            alone = pipe.encode_prompt(c, do_classifier_free_guidance=False, max_sequence_length=TEXT_LEN)[0][0]
            torch.testing.assert_close(e["prompt_embeds"], alone, rtol=1e-5, atol=1e-6)
        batch = pipe.encode_prompt([SHORT, LONGER], do_classifier_free_guidance=False,
                                   max_sequence_length=TEXT_LEN)[0]
    assert batch.shape[1] == 32 and not torch.allclose(batch[0, 16:], both[0]["prompt_embeds"], atol=1e-3)
    # predict on the left-padded batch = predict on each caption alone
    g = torch.Generator().manual_seed(1)
    t = pipe.transformer
    x = torch.randn(3, 4, RES // 2, RES // 2, generator=g)
    sigma = torch.tensor([0.99, 0.975, 0.5])
    check_batch_independent(fam, t, x, sigma, both, rtol=1e-5, atol=1e-5)
    with taca.enabled(t, gamma=1.2) as h, torch.no_grad():
        fam.predict(t, x, sigma, fam.collate(both), 1.0)
        assert h.last_gamma.tolist() == pytest.approx([1.2, 1.2, 1.0])  # the batch's gammas, in order
        assert h.pipe is None and h.sigma_table is None  # the table predict lent the handle is gone


def test_training_on_captions_of_two_lengths(model, tmp_path, monkeypatch):
    """Captions of 16 and 32 tokens (cached at their own lengths): 3 steps of batch 2 train with
    finite losses, gamma 1.2 in every joint attention call and for every sample of the run's record
    (a batch mixing the lengths makes one call per length)."""
    import os

    d = write_captioned_data(tmp_path / "pairs", n=4)
    for i, c in enumerate([SHORT, LONGER, LONGER, "a cat"]):
        with open(os.path.join(d, f"img{i:02d}.txt"), "w") as f:
            f.write(c)
    gammas = GammaCounter(monkeypatch).gammas
    res = train(_cfg(model, d, tmp_path / "out", seed=1, cache_dir=str(tmp_path / "cache")), progress=False)
    assert sorted(int(e["prompt_embeds"].shape[0]) for e in cached_text(res)) == [16, 16, 32]
    check_taca_run(res, gammas, None)
    assert len(gammas) >= 3 * N_LAYERS and all(torch.allclose(g, torch.full_like(g, 1.2)) for g in gammas)
    assert any(g.shape == (1,) for g in gammas)  # some batch mixed the two lengths


def test_two_processes_with_mixed_lengths_match_one(model, tmp_path):
    """DDP (accelerate launch, 2 gloo CPU processes, batch 2 each) against one process with batch 4, on captions
    of 16, 16, 32 and 48 tokens: every 2 + 2 split of them puts two lengths in one process's batch, so each step
    makes two transformer calls before one backward somewhere; same losses and adapter as one process."""
    import os

    d = write_captioned_data(tmp_path / "pairs", n=4)
    longest = LONGER + " and a big blue square with a dog next to a red circle"  # 34 words: 48 tokens
    for i, c in enumerate([SHORT, LONGER, longest, "a cat"]):
        with open(os.path.join(d, f"img{i:02d}.txt"), "w") as f:
            f.write(c)
    one = train(_cfg(model, d, tmp_path / "one", batch_size=4, seed=1, cache_dir=str(tmp_path / "cache")), progress=False)
    assert sorted(int(e["prompt_embeds"].shape[0]) for e in cached_text(one)) == [16, 16, 32, 48]
    args = ["--model", model, "--data", d, "--resolution", str(RES), "--max-steps", "3", "--mixed-precision", "no",
            "--max-sequence-length", str(TEXT_LEN), "--lr", "1e-3", "--rank", "4", "--report-to", "none",
            "--checkpoint-every", "100", "--device", "cpu", "--seed", "1"]
    two = launch_ddp(args, tmp_path / "two", 29543, batch_size=2)
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one.losses), rtol=1e-4, atol=1e-6)
    assert_same_adapters(tmp_path / "one", tmp_path / "two")


def test_adapter_loads_in_diffusers_and_taca(trained, model):
    call = dict(prompt="a red square", height=RES, width=RES, num_inference_steps=2, guidance_scale=1.0,
                max_sequence_length=TEXT_LEN, output_type="latent")
    check_adapter_in_pipeline(partial(load, model), trained[0].out, call, 4 * N_LAYERS, prefix="transformer_blocks.")
