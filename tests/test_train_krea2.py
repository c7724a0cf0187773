"""taca train on a tiny Krea 2 pipeline (Krea2Pipeline: tiny AutoencoderKLQwenImage, tiny Qwen3-VL
text encoder with a BPE Qwen2Tokenizer written here, tiny Krea2Transformer2DModel; random weights,
CPU, offline): gamma in every joint attention call of every training forward (also under gradient
checkpointing), none in the control run; ``Krea2Family.predict`` gives exactly what the pipeline's
own denoising loop gets from the transformer, from the same kwargs (the cached text block rebuilt
with zeros where the encoder had padding, which the model never reads); the cached latents are what
the pipeline's decode path inverts; a caption's cache entry and prediction do not depend on its
batch; the adapter loads through diffusers and taca.enable."""
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
from taca.train.families.krea2 import Krea2Family  # noqa: E402

from test_models_krea2 import SCHEDULER, TINY  # noqa: E402  (the adapter tests' tiny configs)
from train_checks import (LONG, SHORT, Record, cache_dir, cached_text, check_batch_independent,  # noqa: E402,F401
                          check_gated_pipeline, check_lora_layers, check_qwenimage_latents, check_taca_run,
                          checked_family, checkpointed_run, control_run, data_fixture, load, model_fixture,
                          one_torch_thread, qwen2_bpe_tokenizer, qwenimage_vae, run_fixture, train_config,
                          write_captioned_data)

RES = 32  # 32x32 pixels -> 8x8 latents (the tiny VAE's factor 4) -> 4x4 = 16 image tokens (2x2 patches)
TEXT_LEN = 16  # the pipeline's fixed text block: caption tokens, padding, 5 suffix tokens
SELECT = (1, 2, 3)  # the tiny encoder's tapped hidden states (TINY's num_text_layers = 3)


def _text_encoder(vocab_size):
    from transformers import Qwen3VLConfig, Qwen3VLModel

    n = vocab_size
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=n + 4, hidden_size=TINY["text_hidden_dim"], intermediate_size=48,
                         num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=12,
                         max_position_embeddings=256, pad_token_id=0,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4,
                           out_hidden_size=TINY["text_hidden_dim"], num_position_embeddings=16,
                           deepstack_visual_indexes=[0]),
        vision_start_token_id=n, vision_end_token_id=n + 1, image_token_id=n + 2, video_token_id=n + 3)
    return Qwen3VLModel(config).eval()


def _pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, Krea2Pipeline, Krea2Transformer2DModel

    torch.manual_seed(0)
    vae = qwenimage_vae()
    transformer = Krea2Transformer2DModel(**TINY).eval()
    pipe = Krea2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, text_encoder=None,
                         tokenizer=None, transformer=transformer, text_encoder_select_layers=SELECT)
    # Krea 2's prefix is Qwen-Image's template prefix (34 tokens with one token per word), its suffix 5 tokens
    tok = qwen2_bpe_tokenizer(pipe.prompt_template_encode_prefix + "{}" + pipe.prompt_template_encode_suffix)
    pipe.register_modules(tokenizer=tok, text_encoder=_text_encoder(len(tok)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _family(pipe):
    return checked_family(pipe, Krea2Family, "krea2")


_cfg = partial(train_config, resolution=RES, max_sequence_length=TEXT_LEN)
model_dir = model_fixture(_pipeline, "krea2")
data = data_fixture(4, write_captioned_data)
taca_run = run_fixture(lambda model_dir, data, cache_dir, out: train(_cfg(model_dir, data, out, cache_dir=cache_dir),
                                                                     progress=False))


# --- 1. training --------------------------------------------------------------------------------
def test_gamma_in_every_training_forward(taca_run):
    res, gammas = taca_run
    # each joint block's attention in each forward; the text-fusion blocks' text-only ones never
    check_taca_run(res, gammas, 3 * TINY["num_layers"])
    # the text cache holds each caption's valid tokens only, with their places in the fixed block
    entries = cached_text(res)
    for e in entries:
        assert set(e) == {"prompt_embeds", "text_positions", "text_len"} and int(e["text_len"]) == TEXT_LEN
        n = e["prompt_embeds"].shape[0]
        assert e["prompt_embeds"].shape[1:] == (TINY["num_text_layers"], TINY["text_hidden_dim"])
        # the caption's tokens from the start, the 5 suffix tokens at the block's end
        pos = e["text_positions"].tolist()
        assert pos == list(range(n - 5)) + list(range(TEXT_LEN - 5, TEXT_LEN))
    lengths = {e["prompt_embeds"].shape[0] for e in entries}
    assert len(lengths) > 1 and max(lengths) <= TEXT_LEN


def test_control_run_has_no_taca(model_dir, data, cache_dir, tmp_path, monkeypatch):
    res = control_run(partial(_cfg, model_dir, data, cache_dir=cache_dir), tmp_path / "out", monkeypatch)
    assert res.steps == 3


def test_gradient_checkpointing_keeps_gamma(model_dir, data, cache_dir, tmp_path, monkeypatch, taca_run):
    # every block runs twice per step (forward, then its recomputation in backward), gamma each time
    checkpointed_run(partial(_cfg, model_dir, data, cache_dir=cache_dir), taca_run[0], tmp_path / "out", monkeypatch,
                     2 * 3 * TINY["num_layers"])


# --- 2. predict is the pipeline's own forward -----------------------------------------------------
@pytest.mark.parametrize("prompts", [[SHORT, LONG], [SHORT]])
def test_predict_is_the_pipelines_forward(prompts):
    """Krea2Pipeline.__call__ (2 steps, 32x32, no CFG) is recorded at the transformer; predict on the
    same latents (unpacked), sigma and prompts (through the cache's split / collate) feeds the
    transformer the same kwargs, bar the padded text lanes (encoder outputs there, zeros here, masked
    out by both), and returns the pipeline's prediction unpacked, exactly."""
    pipe = _pipeline()
    fam = _family(pipe)
    t = pipe.transformer
    rec = Record(t)
    with torch.no_grad():
        pipe(prompt=prompts, height=RES, width=RES, num_inference_steps=2, guidance_scale=0.0,
             max_sequence_length=TEXT_LEN, generator=torch.Generator().manual_seed(0), output_type="latent")
        assert len(rec.calls) == 2
        cond = fam.collate(fam.split_text(fam.encode_text(prompts, torch.device("cpu"), TEXT_LEN)))
        for kw, out in list(rec.calls):
            lat = pipe._unpack_latents(kw["hidden_states"], RES, RES)  # (B, C, 1, h, w)
            sigma = kw["timestep"].float()  # the pipeline's t / 1000
            n = len(rec.calls)
            pred = fam.predict(t, lat, sigma, cond, guidance=1.0)
            mine, mine_out = rec.calls[n]
            assert pred.shape == lat.shape == (len(prompts), 4, 1, 8, 8)
            assert torch.equal(mine_out, out)
            assert torch.equal(pred, pipe._unpack_latents(out, RES, RES))
            assert torch.equal(mine["hidden_states"], kw["hidden_states"])
            assert torch.equal(mine["timestep"], kw["timestep"])
            assert torch.equal(mine["position_ids"], kw["position_ids"])
            assert mine["position_ids"].shape == (TEXT_LEN + 16, 3)
            m = kw["encoder_attention_mask"]
            assert m.dtype == torch.bool and m.shape == (len(prompts), TEXT_LEN) and not bool(m.all())
            assert torch.equal(mine["encoder_attention_mask"], m)  # passed even when nothing else is padded
            assert torch.equal(mine["encoder_hidden_states"][m], kw["encoder_hidden_states"][m])
            assert not bool(mine["encoder_hidden_states"][~m].any())
            assert bool(kw["encoder_hidden_states"][~m].abs().sum() > 0)  # the encoder's lanes there are not zero
    rec.h.remove()
    assert fam.shift() == 1.0  # dynamic shifting: training sigmas are not shifted
    from diffusers import Krea2Pipeline

    assert fam.lora_saver() is Krea2Pipeline and fam.text_modules() == [pipe.text_encoder]


def test_default_text_length_is_the_pipelines():
    pipe = _pipeline()
    fam = _family(pipe)
    enc = fam.encode_text([SHORT], torch.device("cpu"), None)
    assert enc["prompt_embeds"].shape[1] == 512 == enc["prompt_embeds_mask"].shape[1]
    (e,) = fam.split_text(enc)
    assert int(e["text_len"]) == 512 and e["text_positions"].tolist()[-5:] == list(range(507, 512))


def test_targets_match_the_real_config():
    """The LoRA target names against Krea 2's transformer config (the class defaults: 28 blocks,
    48 q / 12 kv heads; diffusers' docs give no hub repo for it yet)."""
    from accelerate import init_empty_weights
    from diffusers import Krea2Transformer2DModel

    with init_empty_weights():
        t = Krea2Transformer2DModel()
    assert t.config.num_layers == 28 and t.config.num_key_value_heads == 12
    names = [n for n, m in t.named_modules() if isinstance(m, torch.nn.Linear)]
    from taca.train.families.krea2 import Krea2Family

    class _Pipe:  # what Krea2Family reads of a pipeline
        transformer, scheduler, patch_size, config = t, None, 2, {}

    fam = Krea2Family(_Pipe())
    for spec, per_block in (("attn", 5), ("attn+ff", 8)):
        targets = fam.target_modules(spec)
        hit = [n for n in names if any(n == s or n.endswith("." + s) for s in targets)]
        assert len(hit) == 28 * per_block == len(targets) and all(n.startswith("transformer_blocks.") for n in hit)
    # the bare names would also hit the text-fusion blocks' (text-only) attention: not used for "attn"
    assert any(n.startswith("text_fusion.") and n.endswith(".attn.to_k") for n in names)
    assert {n.split(".attn.")[1] for n in fam.target_modules("attn")} == {"to_q", "to_k", "to_v", "to_gate", "to_out.0"}
    assert fam.target_modules(["to_q", "to_gate"]) == ["to_q", "to_gate"]


# --- 3. latents -------------------------------------------------------------------------------
def test_latents_are_what_the_pipeline_decodes():
    """encode_images = (mode - latents_mean) / latents_std per channel, 5-D; fed to the pipeline as
    its final latents, its own decode path (denormalize, vae.decode) gives back vae.decode(mode)."""
    pipe = _pipeline()
    d = TINY["text_hidden_dim"]
    check_qwenimage_latents(pipe, _family(pipe), RES, lambda callback: pipe(
        prompt_embeds=torch.zeros(2, 3, TINY["num_text_layers"], d),
        prompt_embeds_mask=torch.ones(2, 3, dtype=torch.bool), height=RES, width=RES, num_inference_steps=2,
        guidance_scale=0.0, output_type="pt", callback_on_step_end=callback).images)


# --- 4. variable-length prompts ----------------------------------------------------------------
def test_cache_entry_and_prediction_do_not_depend_on_the_batch():
    pipe = _pipeline()
    fam = _family(pipe)
    cpu = torch.device("cpu")
    tok = pipe.tokenizer
    assert len(tok(pipe.prompt_template_encode_prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34
    assert len(tok(pipe.prompt_template_encode_suffix).input_ids) == pipe.prompt_template_encode_num_suffix_tokens
    n_caption = [len(tok(c).input_ids) for c in (SHORT, LONG)]
    assert n_caption[0] == 3 and n_caption[1] > TEXT_LEN - 5  # a, red, square; LONG is cut at TEXT_LEN
    L = 24  # long enough for both captions to be padded
    n_tokens = [n + 5 for n in n_caption]

    with torch.no_grad():
        alone = fam.split_text(fam.encode_text([SHORT], cpu, L))
        both = fam.split_text(fam.encode_text([SHORT, LONG], cpu, L))
        long_alone = fam.split_text(fam.encode_text([LONG], cpu, L))
        assert [e["prompt_embeds"].shape[0] for e in both] == n_tokens
        for a, b in ((both[0], alone[0]), (both[1], long_alone[0])):
            assert torch.equal(a["text_positions"], b["text_positions"]) and int(a["text_len"]) == L
            torch.testing.assert_close(a["prompt_embeds"], b["prompt_embeds"], rtol=1e-5, atol=1e-6)
        # the max_sequence_length truncation keeps a caption's first tokens (the encoder is causal and
        # the pipeline's positions count valid tokens only), then the suffix at the block's end
        (cut,) = fam.split_text(fam.encode_text([LONG], cpu, TEXT_LEN))
        keep = TEXT_LEN - 5
        assert cut["text_positions"].tolist() == list(range(TEXT_LEN))
        torch.testing.assert_close(cut["prompt_embeds"][:keep], long_alone[0]["prompt_embeds"][:keep])
        # collate rebuilds the pipeline's block and mask on the valid lanes
        pe, mask = pipe.encode_prompt([SHORT, LONG], max_sequence_length=L)
        batch = fam.collate(both)
        assert torch.equal(batch["prompt_embeds_mask"], mask)
        assert torch.equal(batch["prompt_embeds"][mask], pe[mask])

        noisy = torch.randn(2, 4, 1, 8, 8, generator=torch.Generator().manual_seed(5))
        check_batch_independent(fam, pipe.transformer, noisy, torch.tensor([0.99, 0.975]), both, schedule="paper")


# --- 5. the saved adapter ------------------------------------------------------------------------
def test_adapter_loads_in_diffusers_and_taca(model_dir, taca_run):
    from diffusers import Krea2Pipeline

    res = taca_run[0]
    pipe = load(model_dir)
    assert isinstance(pipe, Krea2Pipeline) and pipe.text_encoder_select_layers == SELECT
    t = pipe.transformer
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, 16, TINY["in_channels"], generator=g),
              encoder_hidden_states=torch.randn(1, 5, TINY["num_text_layers"], TINY["text_hidden_dim"], generator=g),
              timestep=torch.tensor([0.5]), position_ids=Krea2Pipeline.prepare_position_ids(5, 4, 4, "cpu"),
              return_dict=False)
    call = dict(prompt=SHORT, height=RES, width=RES, num_inference_steps=2, guidance_scale=0.0,
                max_sequence_length=TEXT_LEN, output_type="latent")
    with torch.no_grad():
        stock = t(**kw)[0]
        check_gated_pipeline(pipe, res.out, call)
        fresh = Krea2Pipeline.from_pretrained(model_dir)
        fresh.load_lora_weights(res.out)
        ft = fresh.transformer
        check_lora_layers(ft, "transformer_blocks.", ".attn.", {"to_q", "to_k", "to_v", "to_gate", "to_out.0"})
        assert not torch.allclose(ft(**kw)[0], stock, atol=1e-7)
