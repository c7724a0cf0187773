"""taca train on a tiny Qwen-Image pipeline (QwenImagePipeline: tiny AutoencoderKLQwenImage, tiny
Qwen2.5-VL text encoder with a BPE Qwen2Tokenizer written here, tiny QwenImageTransformer2DModel;
random weights, CPU, offline): gamma in every joint attention call of every training forward (also
under gradient checkpointing), none in the control run; ``QwenImageFamily.predict`` feeds the
transformer exactly what the pipeline's own denoising loop feeds it; the cached latents are what the
pipeline's decode path inverts; a caption's cache entry and prediction do not depend on its batch;
the adapter loads through diffusers and taca.enable."""
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
from taca.train.families.qwenimage import QwenImageFamily  # noqa: E402

from test_models_qwenimage import SCHEDULER, TINY  # noqa: E402  (the adapter tests' tiny configs)
from train_checks import (LONG, SHORT, Record, cache_dir, cached_text, check_alone_as_in_batch,  # noqa: E402,F401
                          check_batch_independent, check_gated_pipeline, check_lora_layers, check_qwenimage_latents,
                          check_taca_run, checked_family, checkpointed_run, control_run, data_fixture, load,
                          model_fixture, qwen2_bpe_tokenizer, qwenimage_vae, run_fixture, train_config,
                          write_captioned_data)

RES = 32  # 32x32 pixels -> 8x8 latents (the tiny VAE's factor 4) -> 4x4 = 16 image tokens
TEXT_LEN = 16


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
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    torch.manual_seed(0)
    vae = qwenimage_vae()
    transformer = QwenImageTransformer2DModel(**TINY).eval()
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, text_encoder=None,
                             tokenizer=None, transformer=transformer)
    tok = qwen2_bpe_tokenizer(pipe.prompt_template_encode)
    pipe.register_modules(tokenizer=tok, text_encoder=_text_encoder(len(tok)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _family(pipe):
    return checked_family(pipe, QwenImageFamily, "qwenimage")


_cfg = partial(train_config, resolution=RES, max_sequence_length=TEXT_LEN)
model_dir = model_fixture(_pipeline, "qwenimage")
data = data_fixture(4, write_captioned_data)
taca_run = run_fixture(lambda model_dir, data, cache_dir, out: train(_cfg(model_dir, data, out, cache_dir=cache_dir),
                                                                     progress=False))


# --- 1. training --------------------------------------------------------------------------------
def test_gamma_in_every_training_forward(taca_run):
    res, gammas = taca_run
    # each of the tiny transformer's joint attentions (one per double-stream block) in each forward
    check_taca_run(res, gammas, 3 * TINY["num_layers"])
    # the text cache holds each caption at its own length, without a mask (pad_collate rebuilds it)
    entries = cached_text(res)
    for e in entries:
        assert set(e) == {"prompt_embeds"} and e["prompt_embeds"].shape[1] == TINY["joint_attention_dim"]
    lengths = {e["prompt_embeds"].shape[0] for e in entries}
    assert len(lengths) > 1 and max(lengths) <= TEXT_LEN


def test_control_run_has_no_taca(model_dir, data, cache_dir, tmp_path, monkeypatch):
    res = control_run(partial(_cfg, model_dir, data, cache_dir=cache_dir), tmp_path / "out", monkeypatch)
    assert res.steps == 3


def test_gradient_checkpointing_keeps_gamma(model_dir, data, cache_dir, tmp_path, monkeypatch, taca_run):
    # every block runs twice per step (forward, then its recomputation in backward), gamma each time;
    # recomputation changes nothing numerically: the same losses as without checkpointing
    checkpointed_run(partial(_cfg, model_dir, data, cache_dir=cache_dir), taca_run[0], tmp_path / "out", monkeypatch,
                     2 * 3 * TINY["num_layers"])


# --- 2. predict is the pipeline's own forward -----------------------------------------------------
@pytest.mark.parametrize("prompts", [[SHORT, LONG], [SHORT]])
def test_predict_is_the_pipelines_forward(prompts):
    """QwenImagePipeline.__call__ (2 steps, 32x32, no CFG) is recorded at the transformer; predict on
    the same latents (unpacked), sigma and prompts (through the cache's split / collate) feeds the
    transformer the same kwargs and returns the pipeline's prediction unpacked, exactly."""
    pipe = _pipeline()
    fam = _family(pipe)
    t = pipe.transformer
    rec = Record(t)
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


# --- 3. latents -------------------------------------------------------------------------------
def test_latents_are_what_the_pipeline_decodes():
    """encode_images = (mode - latents_mean) / latents_std per channel, 5-D; fed to the pipeline as
    its final latents, its own decode path (denormalize, vae.decode) gives back vae.decode(mode)."""
    pipe = _pipeline()
    check_qwenimage_latents(pipe, _family(pipe), RES, lambda callback: pipe(
        prompt_embeds=torch.zeros(2, 3, TINY["joint_attention_dim"]),
        prompt_embeds_mask=torch.ones(2, 3, dtype=torch.long), height=RES, width=RES, num_inference_steps=2,
        true_cfg_scale=1.0, output_type="pt", callback_on_step_end=callback).images)


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
        _, both, long_alone = check_alone_as_in_batch(fam, None, n_tokens)
        # the max_sequence_length truncation keeps a caption's first tokens
        short8 = fam.split_text(fam.encode_text([LONG], cpu, 8))
        torch.testing.assert_close(short8[0]["prompt_embeds"], long_alone[0]["prompt_embeds"][:8])

        batch = fam.collate(both)
        assert batch["prompt_embeds_mask"].dtype == torch.bool
        assert batch["prompt_embeds_mask"].sum(1).tolist() == n_tokens
        noisy = torch.randn(2, 4, 1, 8, 8, generator=torch.Generator().manual_seed(5))
        check_batch_independent(fam, pipe.transformer, noisy, torch.tensor([0.99, 0.975]), both, schedule="paper")


# --- 5. the saved adapter ------------------------------------------------------------------------
def test_adapter_loads_in_diffusers_and_taca(model_dir, taca_run):
    from diffusers import QwenImagePipeline

    res = taca_run[0]
    pipe = load(model_dir)
    assert isinstance(pipe, QwenImagePipeline)
    t = pipe.transformer
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, 16, TINY["in_channels"], generator=g),
              encoder_hidden_states=torch.randn(1, 5, TINY["joint_attention_dim"], generator=g),
              timestep=torch.tensor([0.5]), img_shapes=[[(1, 4, 4)]], return_dict=False)
    call = dict(prompt=SHORT, height=RES, width=RES, num_inference_steps=2, true_cfg_scale=1.0,
                max_sequence_length=TEXT_LEN, output_type="latent")
    with torch.no_grad():
        stock = t(**kw)[0]
        # taca.enable with the file: gamma and the adapter at sigma = 1, both off after disable
        check_gated_pipeline(pipe, res.out, call)
        # diffusers' own loader
        fresh = QwenImagePipeline.from_pretrained(model_dir)
        fresh.load_lora_weights(res.out)
        ft = fresh.transformer
        check_lora_layers(ft, "transformer_blocks.", ".attn.", {
            "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"})
        assert not torch.allclose(ft(**kw)[0], stock, atol=1e-7)
