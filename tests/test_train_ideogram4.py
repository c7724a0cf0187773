"""taca train on a tiny Ideogram 4 pipeline (Ideogram4Pipeline: tiny AutoencoderKLFlux2 with non-trivial
batch-norm statistics, tiny 36-layer Qwen3-VL text encoder with a BPE Qwen2Tokenizer and a Qwen-style
chat template written here, tiny conditional and unconditional Ideogram4Transformer2DModel; random
weights, CPU, offline): gamma in every joint attention call of every training forward (also under
gradient checkpointing), none in the control run; ``Ideogram4Family.predict`` feeds the conditional
transformer exactly what the pipeline's own denoising loop feeds it and returns its velocity negated;
padding the text to the batch's longest caption instead of the pipeline's max_sequence_length
changes nothing; the cached latents are what the pipeline's decode path inverts; a caption's cache
entry and prediction do not depend on its batch; the adapter loads through diffusers and taca.enable."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")
pytest.importorskip("tokenizers")

import taca  # noqa: E402
from taca.train import TrainConfig, train  # noqa: E402

from test_models_ideogram4 import N_LAYERS  # noqa: E402
from test_models_ideogram4 import TINY as _TINY  # noqa: E402  (the adapter tests' tiny config)
from test_train_qwenimage import LONG, SHORT, _counting, _Record, _tokenizer, _write_data, cache_dir_of  # noqa: E402

# the pipeline's text encoding calls transformers' layers with an argument they deprecate (diffusers' side)
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

RES = 32  # 32x32 pixels -> 8x8 latents (the tiny VAE's factor 4) -> 4x4 = 16 image tokens of 2x2 patches
TEXT_LEN = 24  # the pipeline raises on longer prompts; the test captions are 9 to 18 tokens
H = 8  # the tiny encoder's width: 13 tapped layers -> 104 features per token
TINY = dict(_TINY, llm_features_dim=13 * H)
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{{ c['text'] }}{% endfor %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT_FORMAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"  # what CHAT renders for one user turn


def _text_encoder(vocab_size):
    from transformers import Qwen3VLConfig, Qwen3VLModel

    n = vocab_size
    # 36 layers: the pipeline taps hidden states 0, 3, ..., 33, 35 (QWEN3_VL_ACTIVATION_LAYERS)
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=n + 4, hidden_size=H, intermediate_size=16, num_hidden_layers=36,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=8, max_position_embeddings=256,
                         pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                          "mrope_section": [2, 1, 1], "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4, out_hidden_size=H,
                           num_position_embeddings=16, deepstack_visual_indexes=[0]),
        vision_start_token_id=n, vision_end_token_id=n + 1, image_token_id=n + 2, video_token_id=n + 3)
    return Qwen3VLModel(config).eval()


def _vae():
    """AutoencoderKLFlux2, 3 levels (factor 4), 4 latent channels (16 after 2x2 patches), non-trivial bn stats."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(block_out_channels=(8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                             down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
    g = torch.Generator().manual_seed(5)
    vae.bn.running_mean.copy_(torch.randn(16, generator=g) * 0.3)
    vae.bn.running_var.copy_(torch.rand(16, generator=g) * 2 + 0.3)
    return vae.eval()


def _pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, Ideogram4Pipeline, Ideogram4Transformer2DModel

    torch.manual_seed(0)
    pipe = Ideogram4Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(), text_encoder=None, tokenizer=None,
                             transformer=Ideogram4Transformer2DModel(**TINY).eval(),
                             unconditional_transformer=Ideogram4Transformer2DModel(**TINY).eval())
    tok = _tokenizer(CHAT_FORMAT)
    tok.chat_template = CHAT
    pipe.register_modules(tokenizer=tok, text_encoder=_text_encoder(len(tok)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _n_tokens(pipe, caption):
    return len(pipe.tokenizer(CHAT_FORMAT.format(caption), add_special_tokens=False).input_ids)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread for the whole module (training runs included): the tiny models' ops cost
    less than waking a second thread, many times over on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("models") / "ideogram4"
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
    from taca.train.families.ideogram4 import Ideogram4Family

    fam = family_for(pipe)
    assert isinstance(fam, Ideogram4Family) and fam.name == "ideogram4"
    return fam


def _grid(tokens, h=4, w=4):
    """The pipeline's (B, h w, 4C) image tokens as the family's (B, 4C, h, w) latent grid."""
    return tokens.reshape(tokens.shape[0], h, w, -1).permute(0, 3, 1, 2)


# --- 1. training --------------------------------------------------------------------------------
def test_gamma_in_every_training_forward(taca_run):
    res, gammas = taca_run
    assert res.steps == 3 and len(res.losses) == 3 and all(torch.isfinite(torch.tensor(res.losses)))
    assert len(res.sigmas) == 3 * 2 and min(res.sigmas) >= 0.97 and max(res.sigmas) <= 1.0
    assert res.gammas == pytest.approx([1.2] * len(res.sigmas))
    # every block's attention is joint: one call per block per forward
    assert len(gammas) == 3 * N_LAYERS
    assert all(g.shape == (2,) and torch.allclose(g, torch.full((2,), 1.2)) for g in gammas)
    for name in ("pytorch_lora_weights.safetensors", "train_config.json", "log.jsonl", "loss.png"):
        assert os.path.isfile(os.path.join(res.out, name)), name
    # the text cache holds each caption at its own length (collate left-pads per batch)
    from taca.train.data import Cache

    text = os.path.join(cache_dir_of(res), "text")
    lengths = set()
    for root, _, files in os.walk(text):
        for f in files:
            e = Cache.read(os.path.join(root, f))
            assert set(e) == {"prompt_embeds"} and e["prompt_embeds"].shape[1] == TINY["llm_features_dim"]
            lengths.add(e["prompt_embeds"].shape[0])
    assert len(lengths) > 1 and max(lengths) <= TEXT_LEN


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
    assert len(gammas) == 2 * 3 * N_LAYERS
    assert all(torch.allclose(g, torch.full((2,), 1.2)) for g in gammas)
    torch.testing.assert_close(torch.tensor(res.losses), torch.tensor(taca_run[0].losses), rtol=1e-5, atol=1e-7)


# --- 2. predict is the pipeline's own forward -----------------------------------------------------
@pytest.mark.parametrize("prompts", [[SHORT, LONG], [SHORT]])
def test_predict_is_the_pipelines_forward(prompts):
    """Ideogram4Pipeline.__call__ (2 steps, 32x32, guidance 1: the conditional velocity only) is
    recorded at the conditional transformer, once with max_sequence_length = the longest caption
    (then predict's batch has the same layout) and once with the default-style longer block: predict
    on the same latents, sigma and prompts (through the cache's split / collate) feeds the transformer
    exactly the first call's kwargs, and returns minus its image positions' output, exactly; against
    the longer block (whose text is padded further), the same prediction to float rounding."""
    pipe = _pipeline()
    fam = _family(pipe)
    t = pipe.transformer
    L = max(_n_tokens(pipe, p) for p in prompts)
    run = dict(prompt=prompts, height=RES, width=RES, num_inference_steps=2, guidance_scale=1.0,
               guidance_schedule=None, output_type="latent")
    with torch.no_grad():
        rec = _Record(t)
        pipe(max_sequence_length=L, generator=torch.Generator().manual_seed(0), **run)
        assert len(rec.calls) == 2
        cond = fam.collate(fam.split_text(fam.encode_text(prompts, torch.device("cpu"), L)))
        assert cond["text_lengths"].tolist() == [_n_tokens(pipe, p) for p in prompts]
        for kw, out in list(rec.calls):
            lat = _grid(kw["hidden_states"][:, L:])
            sigma = 1.0 - kw["timestep"].float()  # the pipeline passes model time 1 - t / 1000
            n = len(rec.calls)
            pred = fam.predict(t, lat, sigma, cond, guidance=1.0)
            mine, mine_out = rec.calls[n]
            assert pred.shape == lat.shape == (len(prompts), 16, 4, 4)
            assert torch.equal(mine_out, out)
            assert torch.equal(pred, -_grid(out[:, L:]))
            for k in ("hidden_states", "timestep", "encoder_hidden_states", "position_ids", "segment_ids",
                      "indicator"):
                assert torch.equal(mine[k], kw[k]), k
        rec.h.remove()
        # the pipeline's default-style block (longer than any caption): the same image prediction
        rec = _Record(t)
        pipe(max_sequence_length=TEXT_LEN, generator=torch.Generator().manual_seed(0), **run)
        assert len(rec.calls) == 2
        for kw, out in list(rec.calls):
            pred = fam.predict(t, _grid(kw["hidden_states"][:, TEXT_LEN:]), 1.0 - kw["timestep"].float(), cond, 1.0)
            torch.testing.assert_close(pred, -_grid(out[:, TEXT_LEN:]), rtol=1e-5, atol=1e-5)
        rec.h.remove()
    assert fam.shift() == 1.0  # the script draws sigma directly, unshifted
    from diffusers import Ideogram4Pipeline

    assert fam.lora_saver() is Ideogram4Pipeline and fam.text_modules() == [pipe.text_encoder]


def test_default_text_length_is_the_pipelines():
    pipe = _pipeline()
    fam = _family(pipe)
    enc = fam.encode_text([SHORT], torch.device("cpu"), None)
    assert enc["prompt_embeds"].shape[1] == 2048 == enc["text_mask"].shape[1]
    (e,) = fam.split_text(enc)
    assert e["prompt_embeds"].shape[0] == _n_tokens(pipe, SHORT)


def test_targets_match_the_real_config():
    """The LoRA target names against Ideogram 4's transformer config (the class defaults: 34 blocks,
    18 heads of 256, 53,248 text features); "attn+ff" is diffusers' script's default list."""
    from accelerate import init_empty_weights
    from diffusers import Ideogram4Transformer2DModel

    with init_empty_weights():
        t = Ideogram4Transformer2DModel()
    assert t.config.num_layers == 34 and t.config.llm_features_dim == 53248
    names = [n for n, m in t.named_modules() if isinstance(m, torch.nn.Linear)]
    from taca.train.families.ideogram4 import Ideogram4Family

    fam = Ideogram4Family.__new__(Ideogram4Family)
    script = ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]
    for spec, per_block in (("attn", 4), ("attn+ff", 7)):
        targets = fam.target_modules(spec)
        hit = [n for n in names if any(n.endswith("." + s) for s in targets)]
        assert len(hit) == 34 * per_block and all(n.startswith("layers.") for n in hit)
        assert all(sum(n.endswith("." + s) for n in names) == 34 for s in targets)
    assert sorted(n for n in names if any(n.endswith("." + s) for s in script)) == \
        sorted(n for n in names if any(n.endswith("." + s) for s in fam.target_modules("attn+ff")))
    assert fam.target_modules(["w2"]) == ["w2"]


# --- 3. latents -------------------------------------------------------------------------------
def test_latents_are_what_the_pipeline_decodes():
    """encode_images = the script's patchify_latents then (x - bn mean) / bn std, as a (B, 4C, h, w)
    grid; its tokens fed to the pipeline as its final latents, the pipeline's own decode path
    (bn-denormalize, unpatchify, vae.decode) gives back vae.decode(mode)."""
    pipe = _pipeline()
    fam = _family(pipe)
    vae = pipe.vae
    g = torch.Generator().manual_seed(3)
    px = torch.rand(2, 3, RES, RES, generator=g) * 2 - 1
    with torch.no_grad():
        lat = fam.encode_images(px)
        mode = vae.encode(px).latent_dist.mode()  # (2, 4, 8, 8)
        assert lat.shape == (2, 16, 4, 4)
        # the script's patchify_latents, then its bn normalization, on the tokens
        z = mode.view(2, 4, 4, 2, 4, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 16)
        mean = vae.bn.running_mean.view(1, 1, -1)
        std = torch.sqrt(vae.bn.running_var + vae.config.batch_norm_eps).view(1, 1, -1)
        tokens = lat.permute(0, 2, 3, 1).reshape(2, 16, 16)
        torch.testing.assert_close(tokens, (z - mean) / std, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(tokens, z, atol=1e-2)  # the normalization is not the identity here

        images = pipe(prompt=[SHORT, SHORT], height=RES, width=RES, num_inference_steps=2, guidance_scale=1.0,
                      guidance_schedule=None, max_sequence_length=TEXT_LEN, output_type="pt",
                      callback_on_step_end=lambda p, i, t, kw: {"latents": tokens}).images
        expect = pipe.image_processor.postprocess(vae.decode(mode).sample, output_type="pt")
    torch.testing.assert_close(images, expect, rtol=1e-5, atol=1e-5)


# --- 4. variable-length prompts ----------------------------------------------------------------
def test_cache_entry_and_prediction_do_not_depend_on_the_batch():
    pipe = _pipeline()
    fam = _family(pipe)
    cpu = torch.device("cpu")
    n_tokens = [_n_tokens(pipe, c) for c in (SHORT, LONG)]
    assert n_tokens[0] == 3 + 8 and n_tokens[1] > n_tokens[0]  # a, red, square + the chat turn's 8 tokens

    with torch.no_grad():
        alone = fam.split_text(fam.encode_text([SHORT], cpu, TEXT_LEN))
        both = fam.split_text(fam.encode_text([SHORT, LONG], cpu, TEXT_LEN))
        long_alone = fam.split_text(fam.encode_text([LONG], cpu, TEXT_LEN))
        tight = fam.split_text(fam.encode_text([SHORT], cpu, n_tokens[0]))  # no padding at all
        assert [e["prompt_embeds"].shape[0] for e in both] == n_tokens and set(both[0]) == {"prompt_embeds"}
        torch.testing.assert_close(both[0]["prompt_embeds"], alone[0]["prompt_embeds"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(both[1]["prompt_embeds"], long_alone[0]["prompt_embeds"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(tight[0]["prompt_embeds"], alone[0]["prompt_embeds"], rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="exceeds max_sequence_length"):  # the pipeline does not truncate
            fam.encode_text([LONG], cpu, n_tokens[1] - 1)

        batch = fam.collate(both)
        assert batch["prompt_embeds"].shape[:2] == (2, n_tokens[1]) and batch["text_lengths"].tolist() == n_tokens
        pad = n_tokens[1] - n_tokens[0]
        assert not bool(batch["prompt_embeds"][0, :pad].any())  # left padding, as the pipeline lays it out
        g = torch.Generator().manual_seed(5)
        noisy = torch.randn(2, 16, 4, 4, generator=g)
        sigma = torch.tensor([0.99, 0.975])
        t = pipe.transformer
        with taca.enabled(t, gamma=1.2, schedule="paper"):
            together = fam.predict(t, noisy, sigma, batch, 1.0)
            for j, e in enumerate(both):
                single = fam.predict(t, noisy[j:j + 1], sigma[j:j + 1], fam.collate([e]), 1.0)
                torch.testing.assert_close(together[j:j + 1], single, rtol=1e-5, atol=1e-5)


# --- 5. the saved adapter ------------------------------------------------------------------------
def test_adapter_loads_in_diffusers_and_taca(model_dir, taca_run):
    from diffusers import DiffusionPipeline, Ideogram4Pipeline

    res = taca_run[0]
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    assert isinstance(pipe, Ideogram4Pipeline)
    pipe.set_progress_bar_config(disable=True)
    t = pipe.transformer
    g = torch.Generator().manual_seed(0)
    pos, seg, ind = Ideogram4Pipeline._prepare_ids([5], 4, 4, 6, "cpu")
    kw = dict(hidden_states=torch.randn(1, 22, TINY["in_channels"], generator=g), timestep=torch.tensor([0.5]),
              encoder_hidden_states=torch.randn(1, 22, TINY["llm_features_dim"], generator=g), position_ids=pos,
              segment_ids=seg, indicator=ind, return_dict=False)
    call = dict(prompt=SHORT, height=RES, width=RES, num_inference_steps=2, guidance_scale=3.0,
                guidance_schedule=None, max_sequence_length=TEXT_LEN, output_type="latent")
    with torch.no_grad():
        stock = t(**kw)[0]
        base = pipe(generator=torch.Generator().manual_seed(0), **call).images
        with taca.enabled(pipe, gamma=1.2, lora=res.out):
            on = pipe(generator=torch.Generator().manual_seed(0), **call).images
        assert torch.isfinite(on).all() and not torch.equal(on, base)
        assert torch.equal(pipe(generator=torch.Generator().manual_seed(0), **call).images, base)
        assert not any("lora" in n for n in t.state_dict())
        fresh = Ideogram4Pipeline.from_pretrained(model_dir)
        fresh.load_lora_weights(res.out)
        ft = fresh.transformer
        lora = [n for n, _ in ft.named_parameters() if "lora_" in n]
        assert lora and all(n.startswith("layers.") and ".attention." in n for n in lora)
        assert {n.split(".attention.")[1].split(".lora_")[0] for n in lora} == {"to_q", "to_k", "to_v", "to_out.0"}
        assert not any("lora_" in n for n, _ in fresh.unconditional_transformer.named_parameters())
        assert not torch.allclose(ft(**kw)[0], stock, atol=1e-7)
