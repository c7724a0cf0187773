"""taca train on a tiny Qwen-Image pipeline (QwenImagePipeline: tiny AutoencoderKLQwenImage, tiny
Qwen2.5-VL text encoder with a BPE Qwen2Tokenizer written here, tiny QwenImageTransformer2DModel;
random weights, CPU, offline): gamma in every joint attention call of every training forward (also
under gradient checkpointing), none in the control run; ``QwenImageFamily.predict`` feeds the
transformer exactly what the pipeline's own denoising loop feeds it; the cached latents are what the
pipeline's decode path inverts; a caption's cache entry and prediction do not depend on its batch;
the adapter loads through diffusers and taca.enable."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")
pytest.importorskip("tokenizers")

import taca  # noqa: E402
import taca.processors  # noqa: E402
from taca.train import TrainConfig, train  # noqa: E402

from test_models_qwenimage import SCHEDULER, TINY  # noqa: E402  (the adapter tests' tiny configs)

RES = 32  # 32x32 pixels -> 8x8 latents (the tiny VAE's factor 4) -> 4x4 = 16 image tokens
TEXT_LEN = 16
LATENTS_MEAN = [0.3, -0.7, 0.1, 1.2]  # non-trivial normalization (Qwen-Image's are per channel too)
LATENTS_STD = [0.5, 2.0, 1.5, 0.8]
SHORT, LONG = "a red square", "a big yellow square on a green background next to a blue circle"
WORDS = "a big small red blue green yellow square circle on next to the background"


def _tokenizer(template):
    """A byte-level BPE Qwen2Tokenizer whose merges make every word of the prompt template and of
    the test's captions one token, as Qwen's real vocabulary does: the template's prefix is then
    34 tokens, the pipeline's drop index, and what encode_prompt drops is the template, no more."""
    import json

    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tk = Tokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([  # Qwen2Tokenizer's own pre-tokenization
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=1000, min_frequency=1, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([template.format(WORDS), WORDS, SHORT, LONG], trainer=trainer)
    model = json.loads(tk.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return Qwen2Tokenizer(vocab=model["vocab"], merges=merges, additional_special_tokens=["<|im_start|>", "<|im_end|>"])


def _text_encoder(vocab_size):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    n = vocab_size
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=n + 4, hidden_size=TINY["joint_attention_dim"], intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                           out_hidden_size=TINY["joint_attention_dim"], fullatt_block_indexes=[0]),
        vision_start_token_id=n, vision_end_token_id=n + 1, image_token_id=n + 2, video_token_id=n + 3)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _pipeline():
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)

    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=LATENTS_MEAN,
                                 latents_std=LATENTS_STD).eval()
    transformer = QwenImageTransformer2DModel(**TINY).eval()
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, text_encoder=None,
                             tokenizer=None, transformer=transformer)
    tok = _tokenizer(pipe.prompt_template_encode)
    pipe.register_modules(tokenizer=tok, text_encoder=_text_encoder(len(tok)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _write_data(folder, n=4, seed=0):
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    captions = [SHORT, LONG, "a blue circle", "a small green square on a red background"]
    for i in range(n):
        arr = np.zeros((40, 36, 3), np.uint8) + rng.integers(0, 256, 3).astype(np.uint8)
        arr[5:25, 8:30] = rng.integers(0, 256, 3).astype(np.uint8)
        Image.fromarray(arr).save(os.path.join(folder, f"img{i:02d}.png"))
        with open(os.path.join(folder, f"img{i:02d}.txt"), "w") as f:
            f.write(captions[i % len(captions)])
    return str(folder)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("models") / "qwenimage"
    _pipeline().save_pretrained(str(d))
    return str(d)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _write_data(tmp_path_factory.mktemp("data") / "pairs")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))  # shared by the training runs: one model, one encoding


def _cfg(model, data, out, cache, **kw):
    base = dict(model=model, data=data, out=str(out), resolution=RES, batch_size=2, max_steps=3, checkpoint_every=100,
                mixed_precision="no", max_sequence_length=TEXT_LEN, lr=1e-3, rank=4, report_to="none", device="cpu",
                cache_dir=cache)
    base.update(kw)
    return TrainConfig(**base)


def _counting(mp, gammas):
    """Wrap the op the TACA processors call (as test_train's _GammaCounter): record every gamma."""
    real = taca.processors.joint_attention

    def counting(*args, **kwargs):
        gammas.append(kwargs["gamma"].detach().clone())
        return real(*args, **kwargs)

    mp.setattr(taca.processors, "joint_attention", counting)


@pytest.fixture(scope="module")
def taca_run(model_dir, data, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    gammas = []
    with pytest.MonkeyPatch.context() as mp:
        _counting(mp, gammas)
        res = train(_cfg(model_dir, data, out, cache_dir), progress=False)
    return res, gammas


def _family(pipe):
    from taca.train.families import family_for
    from taca.train.families.qwenimage import QwenImageFamily

    fam = family_for(pipe)
    assert isinstance(fam, QwenImageFamily) and fam.name == "qwenimage"
    return fam


# --- 1. training --------------------------------------------------------------------------------
def test_gamma_in_every_training_forward(taca_run):
    res, gammas = taca_run
    assert res.steps == 3 and len(res.losses) == 3 and all(torch.isfinite(torch.tensor(res.losses)))
    assert len(res.sigmas) == 3 * 2 and min(res.sigmas) >= 0.97 and max(res.sigmas) <= 1.0
    assert res.gammas == pytest.approx([1.2] * len(res.sigmas))
    # each of the tiny transformer's joint attentions (one per double-stream block) in each forward
    assert len(gammas) == 3 * TINY["num_layers"]
    assert all(g.shape == (2,) and torch.allclose(g, torch.full((2,), 1.2)) for g in gammas)
    for name in ("pytorch_lora_weights.safetensors", "train_config.json", "log.jsonl", "loss.png"):
        assert os.path.isfile(os.path.join(res.out, name)), name
    # the text cache holds each caption at its own length, without a mask (pad_collate rebuilds it)
    from taca.train.data import Cache

    text = os.path.join(cache_dir_of(res), "text")
    lengths = set()
    for root, _, files in os.walk(text):
        for f in files:
            e = Cache.read(os.path.join(root, f))
            assert set(e) == {"prompt_embeds"} and e["prompt_embeds"].shape[1] == TINY["joint_attention_dim"]
            lengths.add(e["prompt_embeds"].shape[0])
    assert len(lengths) > 1 and max(lengths) <= TEXT_LEN


def cache_dir_of(res):
    import json

    with open(os.path.join(res.out, "train_config.json")) as f:
        return json.load(f)["cache_dir"]


def test_control_run_has_no_taca(model_dir, data, cache_dir, tmp_path, monkeypatch):
    gammas = []
    _counting(monkeypatch, gammas)
    res = train(_cfg(model_dir, data, tmp_path / "out", cache_dir, taca=False), progress=False)
    assert gammas == [] and res.gammas == [] and res.steps == 3
    assert all(torch.isfinite(torch.tensor(res.losses))) and min(res.sigmas) >= 0.97


def test_gradient_checkpointing_keeps_gamma(model_dir, data, cache_dir, tmp_path, monkeypatch, taca_run):
    gammas = []
    _counting(monkeypatch, gammas)
    res = train(_cfg(model_dir, data, tmp_path / "out", cache_dir, gradient_checkpointing=True), progress=False)
    # every block runs twice per step (forward, then its recomputation in backward), gamma each time
    assert len(gammas) == 2 * 3 * TINY["num_layers"]
    assert all(torch.allclose(g, torch.full((2,), 1.2)) for g in gammas)
    # recomputation changes nothing numerically: the same losses as without checkpointing
    torch.testing.assert_close(torch.tensor(res.losses), torch.tensor(taca_run[0].losses), rtol=1e-5, atol=1e-7)


# --- 2. predict is the pipeline's own forward -----------------------------------------------------
class _Record:
    def __init__(self, module):
        self.calls = []
        self.h = module.register_forward_hook(
            lambda m, a, kw, out: self.calls.append((dict(kw), out[0].detach().clone())), with_kwargs=True)


@pytest.mark.parametrize("prompts", [[SHORT, LONG], [SHORT]])
def test_predict_is_the_pipelines_forward(prompts):
    """QwenImagePipeline.__call__ (2 steps, 32x32, no CFG) is recorded at the transformer; predict on
    the same latents (unpacked), sigma and prompts (through the cache's split / collate) feeds the
    transformer the same kwargs and returns the pipeline's prediction unpacked, exactly."""
    pipe = _pipeline()
    fam = _family(pipe)
    t = pipe.transformer
    rec = _Record(t)
    with torch.no_grad():
        pipe(prompt=prompts, height=RES, width=RES, num_inference_steps=2, true_cfg_scale=1.0,
             generator=torch.Generator().manual_seed(0), output_type="latent")
        assert len(rec.calls) == 2
        cond = fam.collate(fam.split_text(fam.encode_text(prompts, torch.device("cpu"), None)))
        for kw, out in list(rec.calls):
            lat = pipe._unpack_latents(kw["hidden_states"], RES, RES, pipe.vae_scale_factor)  # (B, C, 1, h, w)
            sigma = kw["timestep"].float()  # the pipeline's t / 1000
            n = len(rec.calls)
            pred = fam.predict(t, lat, sigma, cond, guidance=1.0)
            mine, mine_out = rec.calls[n]
            assert pred.shape == lat.shape
            assert torch.equal(pred, pipe._unpack_latents(out, RES, RES, pipe.vae_scale_factor))
            assert torch.equal(mine_out, out)
            assert torch.equal(mine["hidden_states"], kw["hidden_states"])
            assert torch.equal(mine["timestep"], kw["timestep"])
            assert torch.equal(mine["encoder_hidden_states"], kw["encoder_hidden_states"])
            assert mine["img_shapes"] == kw["img_shapes"] == [[(1, 4, 4)]] * len(prompts)
            assert mine["guidance"] is None and kw["guidance"] is None
            if len(prompts) == 1:  # nothing padded: the pipeline passes no mask, nor does predict
                assert kw["encoder_hidden_states_mask"] is None and mine["encoder_hidden_states_mask"] is None
            else:
                assert torch.equal(mine["encoder_hidden_states_mask"], kw["encoder_hidden_states_mask"].bool())
                assert not bool(kw["encoder_hidden_states_mask"].all())
    rec.h.remove()
    assert fam.shift() == 1.0  # dynamic shifting: training sigmas are not shifted
    from diffusers import QwenImagePipeline

    assert fam.lora_saver() is QwenImagePipeline and fam.text_modules() == [pipe.text_encoder]


def test_targets_match_the_real_config():
    """The LoRA target names against Qwen/Qwen-Image's transformer config (= the class defaults)."""
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel

    real = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56), guidance_embeds=False)
    with init_empty_weights():
        t = QwenImageTransformer2DModel(**real)
    names = [n for n, m in t.named_modules() if isinstance(m, torch.nn.Linear)]
    from taca.train.families.qwenimage import QwenImageFamily

    fam = QwenImageFamily.__new__(QwenImageFamily)
    for spec, per_block in (("attn", 8), ("attn+ff", 12)):
        targets = fam.target_modules(spec)
        hit = [n for n in names if any(n.endswith("." + s) for s in targets)]
        assert len(hit) == 60 * per_block and all(n.startswith("transformer_blocks.") for n in hit)
        assert all(sum(n.endswith("." + s) for n in names) == 60 for s in targets)
    assert fam.target_modules(["attn.add_k_proj"]) == ["attn.add_k_proj"]


def test_edit_pipelines_are_refused():
    from diffusers import QwenImageEditPipeline

    from taca.train.families.qwenimage import QwenImageFamily

    pipe = QwenImageEditPipeline.__new__(QwenImageEditPipeline)
    with pytest.raises(ValueError, match="reference images"):
        QwenImageFamily(pipe)


# --- 3. latents -------------------------------------------------------------------------------
def test_latents_are_what_the_pipeline_decodes():
    """encode_images = (mode - latents_mean) / latents_std per channel, 5-D; fed to the pipeline as
    its final latents, its own decode path (denormalize, vae.decode) gives back vae.decode(mode)."""
    pipe = _pipeline()
    fam = _family(pipe)
    vae = pipe.vae
    g = torch.Generator().manual_seed(3)
    px = torch.rand(2, 3, RES, RES, generator=g) * 2 - 1
    with torch.no_grad():
        lat = fam.encode_images(px)
        mode = vae.encode(px.unsqueeze(2)).latent_dist.mode()
        assert lat.shape == (2, 4, 1, RES // 4, RES // 4) == mode.shape
        mean = torch.tensor(LATENTS_MEAN).view(1, 4, 1, 1, 1)
        std = torch.tensor(LATENTS_STD).view(1, 4, 1, 1, 1)
        torch.testing.assert_close(lat, (mode - mean) / std, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(lat, mode, atol=1e-2)  # the normalization is not the identity here

        # the pipeline's decode path on these latents: packed as its loop keeps them, swapped in at its last step
        packed = pipe._pack_latents(lat[:, :, 0], 2, 4, RES // 4, RES // 4)
        images = pipe(prompt_embeds=torch.zeros(2, 3, TINY["joint_attention_dim"]),
                      prompt_embeds_mask=torch.ones(2, 3, dtype=torch.long), height=RES, width=RES,
                      num_inference_steps=2, true_cfg_scale=1.0, output_type="pt",
                      callback_on_step_end=lambda p, i, t, kw: {"latents": packed}).images
        expect = pipe.image_processor.postprocess(vae.decode(mode).sample[:, :, 0], output_type="pt")
    torch.testing.assert_close(images, expect, rtol=1e-5, atol=1e-5)


# --- 4. variable-length prompts ----------------------------------------------------------------
def test_cache_entry_and_prediction_do_not_depend_on_the_batch():
    pipe = _pipeline()
    fam = _family(pipe)
    cpu = torch.device("cpu")
    tok, drop = pipe.tokenizer, pipe.prompt_template_encode_start_idx
    template = pipe.prompt_template_encode
    # the tiny tokenizer makes the template's prefix exactly the pipeline's drop index: what is
    # dropped is the system prompt and "user" turn, what is kept the caption and the assistant turn
    prefix = tok(template.split("{}")[0]).input_ids
    assert len(prefix) == drop == 34
    n_tokens = [len(tok(template.format(c)).input_ids) - drop for c in (SHORT, LONG)]
    assert n_tokens[0] == 3 + 5 and n_tokens[1] > n_tokens[0]  # a, red, square + <|im_end|> \n <|im_start|> assistant \n

    with torch.no_grad():
        alone = fam.split_text(fam.encode_text([SHORT], cpu, None))
        both = fam.split_text(fam.encode_text([SHORT, LONG], cpu, None))
        long_alone = fam.split_text(fam.encode_text([LONG], cpu, None))
        assert [e["prompt_embeds"].shape[0] for e in both] == n_tokens and set(both[0]) == {"prompt_embeds"}
        torch.testing.assert_close(both[0]["prompt_embeds"], alone[0]["prompt_embeds"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(both[1]["prompt_embeds"], long_alone[0]["prompt_embeds"], rtol=1e-5, atol=1e-6)
        # the max_sequence_length truncation keeps a caption's first tokens
        short8 = fam.split_text(fam.encode_text([LONG], cpu, 8))
        torch.testing.assert_close(short8[0]["prompt_embeds"], long_alone[0]["prompt_embeds"][:8])

        batch = fam.collate(both)
        assert batch["prompt_embeds_mask"].dtype == torch.bool
        assert batch["prompt_embeds_mask"].sum(1).tolist() == n_tokens
        g = torch.Generator().manual_seed(5)
        noisy = torch.randn(2, 4, 1, 8, 8, generator=g)
        sigma = torch.tensor([0.99, 0.975])
        t = pipe.transformer
        with taca.enabled(t, gamma=1.2, schedule="paper"):
            together = fam.predict(t, noisy, sigma, batch, 1.0)
            for j, e in enumerate(both):
                single = fam.predict(t, noisy[j:j + 1], sigma[j:j + 1], fam.collate([e]), 1.0)
                torch.testing.assert_close(together[j:j + 1], single, rtol=1e-5, atol=1e-5)


# --- 5. the saved adapter ------------------------------------------------------------------------
def test_adapter_loads_in_diffusers_and_taca(model_dir, taca_run):
    from diffusers import DiffusionPipeline, QwenImagePipeline

    res = taca_run[0]
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    assert isinstance(pipe, QwenImagePipeline)
    pipe.set_progress_bar_config(disable=True)
    t = pipe.transformer
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, 16, TINY["in_channels"], generator=g),
              encoder_hidden_states=torch.randn(1, 5, TINY["joint_attention_dim"], generator=g),
              timestep=torch.tensor([0.5]), img_shapes=[[(1, 4, 4)]], return_dict=False)
    call = dict(prompt=SHORT, height=RES, width=RES, num_inference_steps=2, true_cfg_scale=1.0,
                max_sequence_length=TEXT_LEN, output_type="latent")
    with torch.no_grad():
        stock = t(**kw)[0]
        base = pipe(generator=torch.Generator().manual_seed(0), **call).images
        # taca.enable with the file: gamma and the adapter at sigma = 1, both off after disable
        with taca.enabled(pipe, gamma=1.2, lora=res.out):
            on = pipe(generator=torch.Generator().manual_seed(0), **call).images
        assert torch.isfinite(on).all() and not torch.equal(on, base)
        assert torch.equal(pipe(generator=torch.Generator().manual_seed(0), **call).images, base)
        assert not any("lora" in n for n in t.state_dict())
        # diffusers' own loader
        fresh = QwenImagePipeline.from_pretrained(model_dir)
        fresh.load_lora_weights(res.out)
        ft = fresh.transformer
        lora = [n for n, _ in ft.named_parameters() if "lora_" in n]
        assert lora and all(n.startswith("transformer_blocks.") and ".attn." in n for n in lora)
        assert {n.split(".attn.")[1].split(".lora_")[0] for n in lora} == {
            "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}
        assert not torch.allclose(ft(**kw)[0], stock, atol=1e-7)
