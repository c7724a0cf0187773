"""taca train on a tiny Qwen-Image 2.1 pipeline (QwenImage21Pipeline: tiny AutoencoderKLQwenImage21 (RGBA,
16x), tiny Qwen3-VL text encoder behind a Qwen3VLProcessor with a BPE Qwen2Tokenizer and chat template
written here, tiny QwenImage21Transformer2DModel; random weights, CPU, offline): gamma in every joint
attention call of every training forward (also under gradient checkpointing), none in the control
run; ``QwenImage21Family.predict`` feeds the transformer exactly what the pipeline's own denoising loop
feeds it without its KV cache, and matches every step with the cache; the cached latents are the
pipeline's own condition-image encoding and what its decode path inverts; a caption's cache entry
and prediction do not depend on its batch; the adapter loads through diffusers and taca.enable.

Not covered here: loading the pipeline from its folder. transformers' Qwen3VLProcessor needs
torchvision for its video processor (to build it, class-checked, and to load it), which this
environment lacks: the processor is built with that class check relaxed, and training is handed
the built pipeline (``train(cfg, pipeline=...)``, cfg.model its saved folder for the cache key)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")
pytest.importorskip("tokenizers")

import taca  # noqa: E402
from taca.train import train  # noqa: E402
from taca.train.families.qwenimage21 import QwenImage21Family  # noqa: E402

from test_models_qwenimage21 import SCHEDULER, TINY  # noqa: E402  (the adapter tests' tiny configs)
from train_checks import (LONG, SHORT, VISION, GammaCounter, Record, cache_dir, cached_text,  # noqa: E402,F401
                          check_alone_as_in_batch, check_batch_independent, check_control, check_gated_pipeline,
                          check_lora_layers, check_taca_run, checked_family, data_fixture, model_fixture,
                          one_torch_thread, qwen3vl_processor, run_fixture, train_config,
                          write_captioned_data)

RES = 64  # 64x64 pixels -> 4x4 latents (16x) -> 16 image tokens, 4 image slots
LATENTS_MEAN = [0.3, -0.7, 0.1, 1.2] * 4  # non-trivial per-channel normalization (16 channels)
LATENTS_STD = [0.5, 2.0, 1.5, 0.8] * 4
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{{ c['text'] }}{% endfor %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
T2I = ("<|im_start|>system\nComprehend and analyze the provided prompt.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
       "<|im_start|>assistant\n")  # QwenImage21Pipeline.prompt_template_t2i


def _processor():
    """A Qwen3VLProcessor around a tiny tokenizer."""
    return qwen3vl_processor(T2I, CHAT)


def _text_encoder(tok):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    ids = tok.convert_tokens_to_ids(VISION)
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=TINY["context_in_dim"], intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=12,
                         max_position_embeddings=256, pad_token_id=0,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4,
                           out_hidden_size=TINY["context_in_dim"], num_position_embeddings=16,
                           deepstack_visual_indexes=[0]),
        vision_start_token_id=ids[0], vision_end_token_id=ids[1], image_token_id=ids[2], video_token_id=ids[3])
    return Qwen3VLForConditionalGeneration(config).eval()


def _pipeline():
    from diffusers import (AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline,
                           QwenImage21Transformer2DModel)

    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage21(base_dim=8, decoder_base_dim=8, z_dim=TINY["in_channels"], dim_mult=[1, 1, 1, 1, 1],
                                   num_res_blocks=1, latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD).eval()
    proc = _processor()
    pipe = QwenImage21Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae,
                               text_encoder=_text_encoder(proc.tokenizer), processor=proc,
                               transformer=QwenImage21Transformer2DModel(**TINY).eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _train(model, data, out, **kw):
    """taca train with a fresh copy of model's pipeline (the folder's processor needs torchvision to load)."""
    return train(train_config(model, data, out, resolution=RES, max_sequence_length=None, **kw), pipeline=_pipeline(),
                 progress=False)


def _family(pipe):
    return checked_family(pipe, QwenImage21Family, "qwenimage21")


model_dir = model_fixture(_pipeline, "qwenimage21")
data = data_fixture(4, write_captioned_data)
taca_run = run_fixture(lambda model_dir, data, cache_dir, out: _train(model_dir, data, out, cache_dir=cache_dir))


# --- 1. training --------------------------------------------------------------------------------
def test_gamma_in_every_training_forward(taca_run):
    res, gammas = taca_run
    check_taca_run(res, gammas, None)
    # per block, the target image's queries against all keys (the text segment's causal call has no
    # gamma); a batch of two captions of unequal lengths is two calls of one sample
    assert sum(g.numel() for g in gammas) == 3 * 2 * TINY["num_layers"] and len(gammas) >= 3 * TINY["num_layers"]
    assert all(torch.allclose(g, torch.full_like(g, 1.2)) for g in gammas)
    entries = cached_text(res)
    for e in entries:
        assert set(e) == {"prompt_embeds"} and e["prompt_embeds"].shape[1] == TINY["context_in_dim"]
    assert len({e["prompt_embeds"].shape[0] for e in entries}) > 1


def test_control_run_has_no_taca(model_dir, data, cache_dir, tmp_path, monkeypatch):
    gammas = GammaCounter(monkeypatch).gammas
    res = _train(model_dir, data, tmp_path / "out", cache_dir=cache_dir, taca=False)
    check_control(res, gammas)
    assert res.steps == 3


def test_gradient_checkpointing_keeps_gamma(model_dir, data, cache_dir, tmp_path, monkeypatch, taca_run):
    gammas = GammaCounter(monkeypatch).gammas
    res = _train(model_dir, data, tmp_path / "out", cache_dir=cache_dir, gradient_checkpointing=True)
    # every block runs twice per step (forward, then its recomputation in backward), gamma each time
    assert sum(g.numel() for g in gammas) == 2 * 3 * 2 * TINY["num_layers"]
    assert len(gammas) == 2 * len(taca_run[1]) and all(torch.allclose(g, torch.full_like(g, 1.2)) for g in gammas)
    torch.testing.assert_close(torch.tensor(res.losses), torch.tensor(taca_run[0].losses), rtol=1e-5, atol=1e-7)


def test_max_sequence_length_and_odd_slot_grids_are_refused():
    from taca.train.families.qwenimage21 import QwenImage21Family

    fam = QwenImage21Family(_pipeline())
    with pytest.raises(ValueError, match="max_sequence_length"):
        fam.encode_text([SHORT], torch.device("cpu"), 16)
    with pytest.raises(ValueError, match="divisible by 32"):  # 48 px: 3x3 latents, not whole 2x2 image slots
        fam.encode_images(torch.zeros(1, 3, 48, 48))


# --- 2. predict is the pipeline's own forward -----------------------------------------------------
def _unpack(pipe, tokens):
    return pipe._unpack_latents(tokens, RES, RES, pipe.vae_scale_factor)  # (B, h w, C) -> (B, C, 1, h, w)


@pytest.mark.parametrize("prompt", [SHORT, LONG])
def test_predict_is_the_pipelines_forward(prompt):
    """QwenImage21Pipeline.__call__ (one prompt, 2 steps, 64x64, no CFG) is recorded at the
    transformer: without its KV cache, predict on the same latents (unpacked), sigma and prompt
    (through the cache's split / collate) feeds the transformer the same kwargs and returns the
    pipeline's velocity (the target tokens of the output) unpacked, exactly; with the cache (the
    pipeline's default: step 0 prefills, later steps decode the target only) predict matches every
    step's velocity."""
    pipe = _pipeline()
    fam = _family(pipe)
    t = pipe.transformer
    h = w = RES // 16
    run = dict(prompt=prompt, height=RES, width=RES, num_inference_steps=2, true_cfg_scale=1.0,
               generator=torch.Generator().manual_seed(0), output_type="latent")
    with torch.no_grad():
        rec = Record(t)
        pipe(use_kv_cache=False, **run)
        assert len(rec.calls) == 2
        cond = fam.collate(fam.split_text(fam.encode_text([prompt], torch.device("cpu"), None)))
        for kw, out in list(rec.calls):
            lat = _unpack(pipe, kw["hidden_states"])
            sigma = kw["timestep"].float()  # the pipeline's t / 1000
            n = len(rec.calls)
            pred = fam.predict(t, lat, sigma, cond, guidance=1.0)
            mine, mine_out = rec.calls[n]
            assert pred.shape == lat.shape == (1, TINY["in_channels"], 1, h, w)
            assert torch.equal(mine_out, out)
            assert torch.equal(pred, _unpack(pipe, out[:, -h * w:]))
            for k in ("hidden_states", "timestep", "encoder_hidden_states", "img_mask"):
                assert torch.equal(mine[k], kw[k]), k
            assert mine["img_shapes"] == kw["img_shapes"] == [[(1, h, w)]]
            assert kw["encoder_hidden_states_mask"] is None and mine["encoder_hidden_states_mask"] is None
            assert kw["kv_cache"] is None and mine.get("kv_cache") is None and kw["kv_cache_mode"] is None
            slots = h * w // 4  # the text has no image slot, the target's 2x2 groups follow it
            assert kw["img_mask"].sum(1).tolist() == [slots] and bool(kw["img_mask"][:, -slots:].all())
        rec.h.remove()

        rec = Record(t)
        pipe(**run)  # use_kv_cache=True
        assert [kw["kv_cache_mode"] for kw, _ in rec.calls] == ["extract", "cached"]
        for kw, out in list(rec.calls):
            pred = fam.predict(t, _unpack(pipe, kw["hidden_states"]), kw["timestep"].float(), cond, 1.0)
            torch.testing.assert_close(pred, _unpack(pipe, out[:, -h * w:]), rtol=1e-5, atol=1e-5)
        rec.h.remove()
    assert fam.shift() == 1.0  # dynamic shifting: training sigmas are not shifted
    from diffusers import QwenImage21Pipeline

    assert fam.lora_saver() is QwenImage21Pipeline and fam.text_modules() == [pipe.text_encoder]


def test_a_padded_batch_is_each_caption_alone():
    """predict on a batch of unequal captions gives each one exactly its prediction alone (one
    transformer call per length, unpadded). The pipeline's own batched call does not: its rotary
    positions count the shorter prompt's padding, which moves that prompt's image."""
    pipe = _pipeline()
    fam = _family(pipe)
    t = pipe.transformer
    h = w = RES // 16
    cpu = torch.device("cpu")
    with torch.no_grad():
        entries = fam.split_text(fam.encode_text([SHORT, LONG], cpu, None))
        batch = fam.collate(entries)
        assert not bool(batch["prompt_embeds_mask"][0].all()) and bool(batch["prompt_embeds_mask"][1].all())
        g = torch.Generator().manual_seed(5)
        noisy = torch.randn(2, TINY["in_channels"], 1, h, w, generator=g)
        sigma = torch.tensor([0.99, 0.975])
        rec = Record(t)
        together = fam.predict(t, noisy, sigma, batch, 1.0)
        # two calls, one per caption, each unpadded and without a text mask
        assert [kw["encoder_hidden_states"].shape[:2] for kw, _ in rec.calls] == \
            [(1, e["prompt_embeds"].shape[0]) for e in entries]
        assert all(kw["encoder_hidden_states_mask"] is None for kw, _ in rec.calls)
        rec.h.remove()
        for j, e in enumerate(entries):
            assert torch.equal(together[j:j + 1], fam.predict(t, noisy[j:j + 1], sigma[j:j + 1], fam.collate([e]), 1.0))
        # what taca train records after the step: each sample's gamma in the batch's order (1 off the window)
        with taca.enabled(t, gamma=1.2, schedule="paper") as handle:
            for sig, expect in (([0.99, 0.5], [1.2, 1.0]), ([0.5, 0.99], [1.0, 1.2]), ([0.5, 0.4], None)):
                fam.predict(t, noisy, torch.tensor(sig), batch, 1.0)
                got = handle.last_gamma
                assert (got is None) if expect is None else got.tolist() == pytest.approx(expect)

        # the pipeline's batched forward: the padded SHORT row differs from SHORT alone, LONG does not
        rec = Record(t)
        pipe(prompt=[SHORT, LONG], height=RES, width=RES, num_inference_steps=2, true_cfg_scale=1.0,
             use_kv_cache=False, latents=pipe._pack_latents(noisy[:, :, 0], 2, TINY["in_channels"], h, w),
             output_type="latent")
        kw, out = rec.calls[0]
        rec.h.remove()
        sig = kw["timestep"].float()
        alone = fam.predict(t, noisy, sig, batch, 1.0)
        theirs = _unpack(pipe, out[:, -h * w:])
        torch.testing.assert_close(theirs[1], alone[1], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(theirs[0], alone[0], atol=1e-3)


def test_targets_match_the_real_config():
    """The LoRA target names against Qwen-Image 2.1's transformer config (the class defaults: 32
    single-stream blocks, 32 heads of 128, 4096 text features; no hub config checked offline)."""
    from accelerate import init_empty_weights
    from diffusers import QwenImage21Transformer2DModel

    with init_empty_weights():
        t = QwenImage21Transformer2DModel()
    assert t.config.num_layers == 32 and t.config.context_in_dim == 4096
    names = [n for n, m in t.named_modules() if isinstance(m, torch.nn.Linear)]
    from taca.train.families.qwenimage21 import QwenImage21Family

    fam = QwenImage21Family.__new__(QwenImage21Family)
    for spec, per_block in (("attn", 4), ("attn+ff", 7)):
        targets = fam.target_modules(spec)
        hit = [n for n in names if any(n.endswith("." + s) for s in targets)]
        assert len(hit) == 32 * per_block and all(n.startswith("transformer_blocks.") for n in hit)
        assert all(sum(n.endswith("." + s) for n in names) == 32 for s in targets)
    assert fam.target_modules(["attn.to_k"]) == ["attn.to_k"]


# --- 3. latents -------------------------------------------------------------------------------
def test_latents_are_the_pipelines_encoding_and_what_it_decodes():
    """encode_images of an RGB image = the pipeline's own condition-image encoding of it (converted
    to RGBA, preprocessed, _encode_vae_image: (mode - mean) / std, 5-D); fed to the pipeline as its
    final latents, its decode path (z * std + mean, vae.decode) gives back vae.decode(mode)."""
    import numpy as np
    from PIL import Image

    pipe = _pipeline()
    fam = _family(pipe)
    vae = pipe.vae
    rng = np.random.default_rng(3)
    imgs = [Image.fromarray(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)) for _ in range(2)]
    px = torch.cat([pipe.image_processor.preprocess(im, width=RES, height=RES) for im in imgs])
    assert px.shape == (2, 3, RES, RES)
    with torch.no_grad():
        lat = fam.encode_images(px)
        assert lat.shape == (2, TINY["in_channels"], 1, RES // 16, RES // 16)
        rgba = torch.cat([pipe.image_processor.preprocess(im.convert("RGBA"), width=RES, height=RES) for im in imgs])
        assert rgba.shape[1] == 4 and bool((rgba[:, 3] == 1).all())
        theirs = pipe._encode_vae_image(rgba.unsqueeze(2), None)
        torch.testing.assert_close(lat, theirs, rtol=1e-6, atol=1e-6)
        mode = vae.encode(rgba.unsqueeze(2)).latent_dist.mode()
        assert not torch.allclose(lat, mode, atol=1e-2)  # the normalization is not the identity here

        packed = pipe._pack_latents(lat, 2, TINY["in_channels"], RES // 16, RES // 16)
        images = pipe(prompt_embeds=torch.zeros(2, 3, TINY["context_in_dim"]), height=RES, width=RES,
                      num_inference_steps=2, true_cfg_scale=1.0, output_type="pt",
                      callback_on_step_end=lambda p, i, t, kw: {"latents": packed}).images
        expect = pipe.image_processor.postprocess(vae.decode(mode).sample[:, :, 0], output_type="pt")
    assert images.shape == (2, 4, RES, RES)  # RGBA out
    torch.testing.assert_close(images, expect, rtol=1e-5, atol=1e-5)


# --- 4. variable-length prompts ----------------------------------------------------------------
def test_cache_entry_and_prediction_do_not_depend_on_the_batch():
    pipe = _pipeline()
    fam = _family(pipe)
    tok = pipe.processor.tokenizer
    # the dropped system turn is the template's, no more: 12 tokens with one token per word here
    assert pipe._drop_idx == len(tok(T2I.split("<|im_start|>user")[0]).input_ids) == 12
    n_tokens = [len(tok(T2I.format(c)).input_ids) - pipe._drop_idx for c in (SHORT, LONG)]
    assert n_tokens[0] == 3 + 8 and n_tokens[1] > n_tokens[0]  # <|im_start|> user \n, 3 words, the end of turns

    with torch.no_grad():
        _, both, _ = check_alone_as_in_batch(fam, None, n_tokens)

        batch = fam.collate(both)
        assert batch["prompt_embeds_mask"].dtype == torch.bool
        assert batch["prompt_embeds_mask"].sum(1).tolist() == n_tokens
        noisy = torch.randn(2, TINY["in_channels"], 1, RES // 16, RES // 16, generator=torch.Generator().manual_seed(5))
        # exactly: one transformer call per caption length, unpadded
        check_batch_independent(fam, pipe.transformer, noisy, torch.tensor([0.99, 0.975]), both, rtol=0, atol=0,
                                schedule="paper")


# --- 5. the saved adapter ------------------------------------------------------------------------
def test_adapter_loads_in_diffusers_and_taca(taca_run):
    res = taca_run[0]
    pipe = _pipeline()  # the trained model's weights (the folder's processor needs torchvision to load)
    t = pipe.transformer
    g = torch.Generator().manual_seed(0)
    n_txt = 5
    kw = dict(hidden_states=torch.randn(1, 16, TINY["in_channels"], generator=g),
              encoder_hidden_states=torch.randn(1, n_txt, TINY["context_in_dim"], generator=g),
              timestep=torch.tensor([0.5]), img_shapes=[[(1, 4, 4)]],
              img_mask=torch.tensor([[False] * n_txt + [True] * 4]), return_dict=False)
    call = dict(prompt=SHORT, height=RES, width=RES, num_inference_steps=2, true_cfg_scale=1.0, output_type="latent")
    with torch.no_grad():
        stock = t(**kw)[0]
        check_gated_pipeline(pipe, res.out, call)
        pipe.load_lora_weights(res.out)
        check_lora_layers(t, "transformer_blocks.", ".attn.", {"to_q", "to_k", "to_v", "to_out.0"})
        assert not torch.allclose(t(**kw)[0], stock, atol=1e-7)
