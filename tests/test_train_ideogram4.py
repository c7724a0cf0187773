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
from functools import partial

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")
pytest.importorskip("tokenizers")

from taca.train import train  # noqa: E402
from taca.train.families.ideogram4 import Ideogram4Family  # noqa: E402

from test_models_ideogram4 import N_LAYERS  # noqa: E402
from test_models_ideogram4 import TINY as _TINY  # noqa: E402  (the adapter tests' tiny config)
from train_checks import (LONG, SHORT, Record, cache_dir, cached_text, check_alone_as_in_batch,  # noqa: E402,F401
                          check_batch_independent, check_gated_pipeline, check_lora_layers, check_taca_run,
                          checked_family, checkpointed_run, control_run, data_fixture, load, model_fixture,
                          one_torch_thread, qwen2_bpe_tokenizer, run_fixture, train_config, write_captioned_data)

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
    tok = qwen2_bpe_tokenizer(CHAT_FORMAT)
    tok.chat_template = CHAT
    pipe.register_modules(tokenizer=tok, text_encoder=_text_encoder(len(tok)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _n_tokens(pipe, caption):
    return len(pipe.tokenizer(CHAT_FORMAT.format(caption), add_special_tokens=False).input_ids)


def _family(pipe):
    return checked_family(pipe, Ideogram4Family, "ideogram4")


_cfg = partial(train_config, resolution=RES, max_sequence_length=TEXT_LEN)
model_dir = model_fixture(_pipeline, "ideogram4")
data = data_fixture(4, write_captioned_data)
taca_run = run_fixture(lambda model_dir, data, cache_dir, out: train(_cfg(model_dir, data, out, cache_dir=cache_dir),
                                                                     progress=False))


def _grid(tokens, h=4, w=4):
    """The pipeline's (B, h w, 4C) image tokens as the family's (B, 4C, h, w) latent grid."""
    return tokens.reshape(tokens.shape[0], h, w, -1).permute(0, 3, 1, 2)


# --- 1. training --------------------------------------------------------------------------------
def test_gamma_in_every_training_forward(taca_run):
    res, gammas = taca_run
    # every block's attention is joint: one call per block per forward
    check_taca_run(res, gammas, 3 * N_LAYERS)
    # the text cache holds each caption at its own length (collate left-pads per batch)
    entries = cached_text(res)
    for e in entries:
        assert set(e) == {"prompt_embeds"} and e["prompt_embeds"].shape[1] == TINY["llm_features_dim"]
    lengths = {e["prompt_embeds"].shape[0] for e in entries}
    assert len(lengths) > 1 and max(lengths) <= TEXT_LEN


def test_control_run_has_no_taca(model_dir, data, cache_dir, tmp_path, monkeypatch):
    res = control_run(partial(_cfg, model_dir, data, cache_dir=cache_dir), tmp_path / "out", monkeypatch)
    assert res.steps == 3


def test_gradient_checkpointing_keeps_gamma(model_dir, data, cache_dir, tmp_path, monkeypatch, taca_run):
    # every block runs twice per step (forward, then its recomputation in backward), gamma each time
    checkpointed_run(partial(_cfg, model_dir, data, cache_dir=cache_dir), taca_run[0], tmp_path / "out", monkeypatch,
                     2 * 3 * N_LAYERS)


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
        rec = Record(t)
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
        rec = Record(t)
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
        alone, both, _ = check_alone_as_in_batch(fam, TEXT_LEN, n_tokens)
        tight = fam.split_text(fam.encode_text([SHORT], cpu, n_tokens[0]))  # no padding at all
        torch.testing.assert_close(tight[0]["prompt_embeds"], alone[0]["prompt_embeds"], rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="exceeds max_sequence_length"):  # the pipeline does not truncate
            fam.encode_text([LONG], cpu, n_tokens[1] - 1)

        batch = fam.collate(both)
        assert batch["prompt_embeds"].shape[:2] == (2, n_tokens[1]) and batch["text_lengths"].tolist() == n_tokens
        pad = n_tokens[1] - n_tokens[0]
        assert not bool(batch["prompt_embeds"][0, :pad].any())  # left padding, as the pipeline lays it out
        noisy = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(5))
        check_batch_independent(fam, pipe.transformer, noisy, torch.tensor([0.99, 0.975]), both, schedule="paper")


# --- 5. the saved adapter ------------------------------------------------------------------------
def test_adapter_loads_in_diffusers_and_taca(model_dir, taca_run):
    from diffusers import Ideogram4Pipeline

    res = taca_run[0]
    pipe = load(model_dir)
    assert isinstance(pipe, Ideogram4Pipeline)
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
        check_gated_pipeline(pipe, res.out, call)
        fresh = Ideogram4Pipeline.from_pretrained(model_dir)
        fresh.load_lora_weights(res.out)
        ft = fresh.transformer
        check_lora_layers(ft, "layers.", ".attention.", {"to_q", "to_k", "to_v", "to_out.0"})
        assert not any("lora_" in n for n, _ in fresh.unconditional_transformer.named_parameters())
        assert not torch.allclose(ft(**kw)[0], stock, atol=1e-7)
