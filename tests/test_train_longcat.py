"""taca train on tiny LongCat-Image pipelines (LongCatImagePipeline: text to image;
LongCatImageEditPipeline: one reference image), random weights, CPU, offline: tests/test_models_longcat.py's
2 + 2-block LongCatImageTransformer2DModel (16 latent channels, packed 2x2) and FLUX.1-dev scheduler,
a 2-level AutoencoderKL with FLUX.1's shift and scale and 16 latent channels (the pipelines hardcode
16), a tiny Qwen2.5-VL with its vision tower, a byte-level BPE Qwen2 tokenizer and a Qwen2-VL
processor (images only: its video processor needs torchvision, absent here). Both pipelines need their
``text_processor`` to be saved and reloaded (text to image's is only its prompt rewriter, left out
here), and reloading a Qwen2-VL processor needs the video part: they are trained in memory through
train(pipeline=...).

Checked: the family is picked and its targets are the model's real Linear layers; gamma 1.2 in every
joint-attention call of every training forward (also under gradient checkpointing, same losses), none
in the control run; predict is the pipelines' own transformer call bit for bit (the prompt embedding,
packing, the text ids (0, i, i), image ids (1, 512 + r, 512 + c), reference ids (2, L + r, L + c)
after the target's, timestep sigma, no guidance, the output cut to the target's tokens); the latents
are what the pipeline decodes; a caption's entry and prediction do not depend on its batch; edits'
text entries are keyed by their reference; the adapter loads through the transformer's
load_lora_adapter (the pipelines have no load_lora_weights) and taca.enable(lora=); what does not fit
is refused.
"""
import json
import os
from functools import partial

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import taca  # noqa: E402
from taca.train import ConfigError, train  # noqa: E402
from taca.train.data import load_image, load_pil  # noqa: E402
from taca.train.families import check_references  # noqa: E402
from taca.train.families.longcat import LongCatImageFamily  # noqa: E402

from test_models_longcat import SCHEDULER, TINY  # noqa: E402  (the adapter tests' tiny configs)
from train_checks import (ADAPTER, cache_dir, cached_text, check_alone_as_in_batch,  # noqa: E402,F401
                          check_batch_independent, check_control, check_flux_vae_latents, check_gammas,
                          check_gated_pipeline, check_taca_run, check_zero_model_decodes, checked_family, data_fixture,
                          flux_attn_names, flux_ff_names, GammaCounter, LONG, one_torch_thread, peft_hits,
                          qwen2_bpe_tokenizer, Record, record_forwards, saved_lora_modules, SHORT, text_cond,
                          train_config)

RES = 32  # 32x32 pixels -> 16x16 latents (2-level VAE) -> 8x8 = 64 image tokens
N_IMG = (RES // 4) ** 2
TEXT = 512  # the pipelines pad every caption to 512 tokens (tokenizer_max_length)
N_CALLS = TINY["num_layers"] + TINY["num_single_layers"]  # every attention is joint
VL_PIXELS = 56 * 56  # the processor shows the vision tower at most 56x56 pixels
EDIT_TEXT = 2 + 1 + TEXT  # edits: <|vision_start|>, 1 image token (a 16x16 image shown as 28x28), <|vision_end|>


# --- the tiny pipelines ------------------------------------------------------------------------------
def _text_encoder(n):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=n + 4, hidden_size=TINY["joint_attention_dim"], intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=1024, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                           out_hidden_size=TINY["joint_attention_dim"], fullatt_block_indexes=[0]),
        vision_start_token_id=n, vision_end_token_id=n + 1, image_token_id=n + 2, video_token_id=n + 3)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _tokenizer():
    """qwen2_bpe_tokenizer with the text-to-image template's words as merges, plus the vision tokens."""
    from diffusers import LongCatImagePipeline

    bare = LongCatImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_processor=None,
                                transformer=None)
    tok = qwen2_bpe_tokenizer(bare.prompt_template_encode_prefix + "{}" + bare.prompt_template_encode_suffix)
    n = len(tok)  # the vision tokens take ids n, n + 1, n + 2, as the tiny Qwen2.5-VL's config says
    tok.add_tokens(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"], special_tokens=True)
    return tok, n


def _pipeline(edit=False, seed=0):
    """A tiny LongCatImagePipeline (or LongCatImageEditPipeline): the same weights for a seed."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, LongCatImageEditPipeline,
                           LongCatImagePipeline, LongCatImageTransformer2DModel)
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor

    class Processor(Qwen2VLProcessor):  # no video processor (it needs torchvision)
        def check_argument_for_proper_class(self, name, arg):
            return None if arg is None else super().check_argument_for_proper_class(name, arg)

    tok, n = _tokenizer()
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=16, norm_num_groups=4, sample_size=RES, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611).eval()
    transformer = LongCatImageTransformer2DModel(**TINY).eval()
    te = _text_encoder(n)
    parts = dict(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, text_encoder=te, tokenizer=tok,
                 transformer=transformer)
    if edit:
        proc = Processor(image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=VL_PIXELS),
                         tokenizer=tok)
        pipe = LongCatImageEditPipeline(text_processor=proc, **parts)
    else:  # its text_processor only rewrites prompts (enable_prompt_rewrite), not used here
        pipe = LongCatImagePipeline(text_processor=None, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _family(pipe):
    return checked_family(pipe, LongCatImageFamily, "longcat")


@pytest.fixture
def small_references(monkeypatch):
    """The edit pipeline resizes its input to 1024 x 1024 area (too many tokens for a CPU test): here
    to RES x RES, in the pipeline's module and so in the family's call of it alike."""
    from diffusers.pipelines.longcat_image import pipeline_longcat_image_edit as edit

    monkeypatch.setattr(edit, "calculate_dimensions", lambda area, ratio: (RES, RES))


def _png(path, seed, h=RES, w=RES):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8)).save(path)
    return str(path)


def _unpack(pipe, tokens):
    return pipe._unpack_latents(tokens, RES, RES, pipe.vae_scale_factor)


def _expected_ids(kind, n, start=0):
    """(n, 3) ids as prepare_pos_ids builds them: text (0, i, i); image / reference (m, start + r, start + c)."""
    if kind == "text":
        i = torch.arange(n).float()
        return torch.stack([torch.zeros(n), i, i], 1)
    side = int(n ** 0.5)
    rc = torch.cartesian_prod(torch.arange(side).float(), torch.arange(side).float()) + start
    return torch.cat([torch.full((n, 1), float(kind)), rc], 1)


# --- the family ----------------------------------------------------------------------------------------
def test_family_targets_and_conventions():
    """The family of both pipelines: shift 1 (dynamic shifting) or the scheduler's static one, no
    reference for text to image, one needed for edits at 1024 x 1024 (the edit pipeline's VAE size for
    a square), the text keyed by it; "attn" / "attn+ff" hit exactly the joint-attention projections
    (both streams of the double blocks, the single blocks' q / k / v) and the double blocks'
    feed-forwards of the tiny model and of LongCat-Image's real config (19 + 38 blocks, built empty)."""
    from types import SimpleNamespace

    from accelerate import init_empty_weights
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, LongCatImageTransformer2DModel

    pipe = _pipeline()
    fam = _family(pipe)
    assert fam.shift() == 1.0 and fam.text_modules() == [pipe.text_encoder] and fam.image_modules() == [pipe.vae]
    assert fam.lora_saver() is FluxPipeline and not hasattr(pipe, "load_lora_weights")
    assert (fam.max_references(), fam.text_references(), fam.reference_resolution(RES)) == (0, False, RES)
    edit = _family(_pipeline(edit=True))
    assert (edit.max_references(), edit.text_references(), edit.reference_resolution(RES)) == (1, True, 1024)
    static = type("LongCatImagePipeline", (SimpleNamespace,), {})(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert LongCatImageFamily(static).shift() == 3.0  # no dynamic shifting: the pipeline's mu is ignored

    def hits(t, spec):
        linear = {n for n, m in t.named_modules() if isinstance(m, torch.nn.Linear)}
        keys = fam.target_modules(spec)
        assert all(peft_hits(linear, [k]) for k in keys)  # no dead name
        return peft_hits(linear, keys)

    with init_empty_weights():
        real = LongCatImageTransformer2DModel()  # meituan-longcat/LongCat-Image's config = the class defaults
    for t, nd, ns in ((pipe.transformer, TINY["num_layers"], TINY["num_single_layers"]), (real, 19, 38)):
        attn = hits(t, "attn")
        assert attn == set(flux_attn_names(nd, ns))
        assert hits(t, "attn+ff") - attn == flux_ff_names(nd)
    assert fam.target_modules(["to_q"]) == ["to_q"]


# --- text to image: training ---------------------------------------------------------------------------
data = data_fixture(4)
_cfg = partial(train_config, "tiny/longcat-image", resolution=RES, max_sequence_length=None)


@pytest.fixture(scope="module")
def t2i_run(data, cache_dir, tmp_path_factory):
    """One TACA run (3 steps, batch 2) of the in-memory text-to-image pipeline, every gamma recorded."""
    with pytest.MonkeyPatch.context() as mp:
        counter = GammaCounter(mp)
        res = train(_cfg(data, tmp_path_factory.mktemp("run") / "taca", cache_dir=cache_dir), pipeline=_pipeline(),
                    progress=False)
    return res, counter.gammas


def test_gamma_in_every_training_forward(t2i_run):
    res, gammas = t2i_run
    check_taca_run(res, gammas, 3 * N_CALLS)
    entries = cached_text(res)  # each caption at the pipeline's fixed 512 tokens, no mask
    assert entries and all(set(e) == {"prompt_embeds"} and e["prompt_embeds"].shape == (TEXT, 24) for e in entries)


def test_control_run_and_gradient_checkpointing(data, cache_dir, t2i_run, tmp_path, monkeypatch):
    """The control run (taca=False): no gamma anywhere. With gradient checkpointing: gamma 1.2 in every
    joint call, again where the backward recomputes the blocks, and the losses of the plain run."""
    gammas = GammaCounter(monkeypatch).gammas
    res = train(_cfg(data, tmp_path / "control", cache_dir=cache_dir, taca=False), pipeline=_pipeline(), progress=False)
    check_control(res, gammas)
    assert res.steps == 3
    res = train(_cfg(data, tmp_path / "gc", cache_dir=cache_dir, gradient_checkpointing=True), pipeline=_pipeline(),
                progress=False)
    check_gammas(gammas, 2 * 3 * N_CALLS)
    torch.testing.assert_close(torch.tensor(res.losses), torch.tensor(t2i_run[0].losses), rtol=1e-5, atol=1e-7)


# --- text to image: predict, latents, batches -----------------------------------------------------------
def test_predict_is_the_pipelines_transformer_call():
    """LongCatImagePipeline.__call__ (two prompts, one with quoted text, no CFG, 2 steps, TACA on: the
    first step at sigma 1 gets gamma 1.2 through the pipeline's _current_timestep) recorded at the
    transformer; predict on the same latents (unpacked), sigma and the captions' cache entries feeds it
    the same kwargs (embeddings, text ids (0, i, i), image ids (1, 512 + r, 512 + c) in float32, timestep,
    no guidance) and returns the pipeline's prediction unpacked, bit for bit."""
    pipe = _pipeline()
    fam = _family(pipe)
    t = pipe.transformer
    prompts = [SHORT, 'a sign that says "hi" on a wall']
    rec = Record(t)
    with taca.enabled(pipe, gamma=1.2), torch.no_grad():
        pipe(prompt=prompts, height=RES, width=RES, num_inference_steps=2, guidance_scale=1.0,
             enable_prompt_rewrite=False, generator=torch.Generator().manual_seed(0), output_type="latent")
        calls = list(rec.calls)
        assert len(calls) == 2
        cond = text_cond(fam, prompts, None)
        for i, (kw, out) in enumerate(calls):
            assert torch.equal(cond["prompt_embeds"], kw["encoder_hidden_states"])
            n = len(rec.calls)
            pred = fam.predict(t, _unpack(pipe, kw["hidden_states"]), kw["timestep"].float(), cond, 1.0)
            gamma = taca.pipeline.get_handle(t).last_gamma
            assert (gamma is not None) == (i == 0)
            (mine, mine_out), = rec.calls[n:]
            for k in ("hidden_states", "timestep", "encoder_hidden_states", "txt_ids", "img_ids"):
                assert mine[k].dtype == kw[k].dtype and torch.equal(mine[k], kw[k]), k
            assert mine["guidance"] is None and kw["guidance"] is None
            assert torch.equal(mine_out, out) and torch.equal(pred, _unpack(pipe, out))
    rec.h.remove()
    assert kw["txt_ids"].dtype == torch.float32
    assert torch.equal(kw["txt_ids"], _expected_ids("text", TEXT))
    assert torch.equal(kw["img_ids"], _expected_ids(1, N_IMG, TEXT))
    # training in bf16: the ids stay float32, as the pipeline builds them (bf16 cannot hold 512 + r)
    t.to(torch.bfloat16)
    rec = Record(t)
    with torch.no_grad():
        fam.predict(t, _unpack(pipe, kw["hidden_states"]).bfloat16(), kw["timestep"].float(),
                    {"prompt_embeds": cond["prompt_embeds"].bfloat16()}, 1.0)
    (mine, _), = rec.calls
    for k in ("txt_ids", "img_ids"):
        assert mine[k].dtype == torch.float32 and torch.equal(mine[k], kw[k]), k


def test_latents_are_what_the_pipeline_decodes(monkeypatch):
    """encode_images = (mode - 0.1159) * 0.3611; packed and handed to the pipeline as its latents with a
    transformer that predicts 0, its own unpack, denormalization and decode give the VAE's reconstruction."""
    from diffusers import LongCatImagePipeline

    pipe = _pipeline()
    fam = _family(pipe)
    px = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(0)) * 2 - 1
    lat, mode = check_flux_vae_latents(fam, pipe.vae, px, (2, 16, RES // 2, RES // 2))
    packed = LongCatImagePipeline._pack_latents(lat, 2, 16, RES // 2, RES // 2)
    check_zero_model_decodes(pipe, mode, monkeypatch, dict(latents=packed, height=RES, width=RES,
                                                           enable_prompt_rewrite=False))


def test_cache_entry_and_prediction_do_not_depend_on_the_batch():
    """Every caption is padded to 512 tokens before the encoder (its padding masked there): SHORT's and
    LONG's entries encoded together are each one's alone, and predict on the batch is predict on each."""
    pipe = _pipeline()
    fam = _family(pipe)
    with torch.no_grad():
        _, both, _ = check_alone_as_in_batch(fam, None, [TEXT, TEXT])
        assert not torch.allclose(both[0]["prompt_embeds"], both[1]["prompt_embeds"], atol=1e-3)
    noisy = torch.randn(2, 16, RES // 2, RES // 2, generator=torch.Generator().manual_seed(5))
    check_batch_independent(fam, pipe.transformer, noisy, torch.tensor([0.99, 0.975]), both, schedule="paper")


def test_adapter_loads(t2i_run):
    """taca.enable(pipe, lora=) gates the trained adapter (on at sigma 1, stock after disable); the
    transformer's load_lora_adapter (the pipeline has no load_lora_weights) puts it on exactly the
    joint-attention projections and changes the pipeline's output."""
    res = t2i_run[0]
    call = dict(prompt=SHORT, height=RES, width=RES, num_inference_steps=2, guidance_scale=1.0,
                enable_prompt_rewrite=False, output_type="latent")
    with torch.no_grad():
        base = check_gated_pipeline(_pipeline(), res.out, call)
        fresh = _pipeline()
        fresh.transformer.load_lora_adapter(os.path.join(res.out, ADAPTER), prefix="transformer")
        lora = fresh(generator=torch.Generator().manual_seed(0), **call).images
    nd, ns = TINY["num_layers"], TINY["num_single_layers"]
    want = set(flux_attn_names(nd, ns))
    assert saved_lora_modules(res.out) == {"transformer." + m for m in want}
    assert {n.split(".lora_")[0] for n, _ in fresh.transformer.named_parameters() if "lora_A" in n} == want
    assert torch.isfinite(lora).all() and not torch.allclose(lora, base, atol=1e-6)


# --- edits ---------------------------------------------------------------------------------------------
def test_edit_predict_is_the_pipelines_call(small_references, tmp_path):
    """LongCatImageEditPipeline.__call__ (one reference, no CFG, 2 steps) recorded at the transformer;
    predict given the same latents, sigma, the caption's cache entry (encode_text with the reference as
    taca train loads it) and the reference's latents feeds it the same kwargs bit for bit (the prompt
    embedding with the reference shown to Qwen2.5-VL, the reference's tokens after the target's, ids
    text (0, i, i), target (1, L + r, L + c), reference (2, L + r, L + c) in float64, timestep) and
    returns the pipeline's prediction of the target's tokens; the cached reference latents are the
    pipeline's. Another reference changes the text entry and the prediction, and a batch of two edits
    predicts each as alone."""
    from PIL import Image

    pipe = _pipeline(edit=True)
    fam = _family(pipe)
    path = _png(tmp_path / "r.png", 1)
    rec = Record(pipe.transformer)
    with torch.no_grad():
        pipe(image=Image.open(path), prompt=SHORT, num_inference_steps=2, guidance_scale=1.0,
             generator=torch.Generator().manual_seed(0), output_type="latent")
    (kw, out), _ = rec.calls
    assert kw["hidden_states"].shape[1] == 2 * N_IMG and kw["encoder_hidden_states"].shape[1] == EDIT_TEXT
    assert torch.equal(kw["txt_ids"], _expected_ids("text", EDIT_TEXT))
    assert kw["img_ids"].dtype == torch.float64 and torch.equal(
        kw["img_ids"], torch.cat([_expected_ids(1, N_IMG, EDIT_TEXT), _expected_ids(2, N_IMG, EDIT_TEXT)]).double())
    cpu = torch.device("cpu")
    with torch.no_grad():
        cond = fam.collate(fam.split_text(fam.encode_text([SHORT], cpu, None, references=[[load_pil(path, RES)]])))
        assert torch.equal(cond["prompt_embeds"], kw["encoder_hidden_states"])
        other = fam.encode_text([SHORT], cpu, None, references=[[load_pil(_png(tmp_path / "o.png", 9), RES)]])
        assert not torch.allclose(other["prompt_embeds"], cond["prompt_embeds"], atol=1e-4)

        ref = _unpack(pipe, kw["hidden_states"][:, N_IMG:])
        torch.testing.assert_close(fam.encode_images(load_image(path, RES)[None]), ref, rtol=1e-5, atol=1e-5)
        cond["reference_latents"] = ref[:, None]
        noisy = _unpack(pipe, kw["hidden_states"][:, :N_IMG])
        rec.calls.clear()
        mine_pred = fam.predict(pipe.transformer, noisy, kw["timestep"].float(), cond, 1.0)
        (mine, mine_out), = rec.calls
        for k in ("hidden_states", "timestep", "encoder_hidden_states", "txt_ids", "img_ids"):
            assert mine[k].dtype == kw[k].dtype and torch.equal(mine[k], kw[k]), k
        assert mine["guidance"] is None and kw["guidance"] is None
        assert torch.equal(mine_out, out) and torch.equal(mine_pred, _unpack(pipe, out[:, :N_IMG]))
        swapped = dict(cond, reference_latents=torch.zeros_like(cond["reference_latents"]))
        assert not torch.allclose(fam.predict(pipe.transformer, noisy, kw["timestep"].float(), swapped, 1.0),
                                  mine_pred, atol=1e-5)
        # two edits in one batch (other caption, other reference): each predicted as alone
        both = fam.split_text(fam.encode_text([SHORT, LONG], cpu, None, references=[
            [load_pil(path, RES)], [load_pil(str(tmp_path / "o.png"), RES)]]))
        torch.testing.assert_close(both[0]["prompt_embeds"], cond["prompt_embeds"][0], rtol=0, atol=1e-6)
        x = torch.randn(2, 16, RES // 2, RES // 2, generator=torch.Generator().manual_seed(4))
        refs = torch.randn(2, 1, 16, RES // 2, RES // 2, generator=torch.Generator().manual_seed(6))
        sigma = torch.tensor([0.99, 0.98])
        with taca.enabled(pipe.transformer, gamma=1.2):
            together = fam.predict(pipe.transformer, x, sigma, dict(fam.collate(both), reference_latents=refs), 1.0)
            for j in range(2):
                alone = fam.predict(pipe.transformer, x[j:j + 1], sigma[j:j + 1],
                                    dict(fam.collate([both[j]]), reference_latents=refs[j:j + 1]), 1.0)
                torch.testing.assert_close(together[j:j + 1], alone, rtol=1e-5, atol=1e-5)
    rec.h.remove()


def _edits(folder, n=4):
    """n edits: targets e<i>.png (40x36), references r<i>.png (36x44); edits 0 and 1 share a caption
    with different references."""
    os.makedirs(folder, exist_ok=True)
    lines = []
    for i in range(n):
        _png(os.path.join(folder, f"e{i}.png"), 100 + i, 40, 36)
        _png(os.path.join(folder, f"r{i}.png"), 200 + i, 36, 44)
        caption = SHORT if i < 2 else ["a blue circle", "a big green square"][i % 2]
        lines.append(json.dumps({"image": f"e{i}.png", "caption": caption, "reference": f"r{i}.png"}))
    path = os.path.join(folder, "edits.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


_edit_cfg = partial(train_config, "tiny/longcat-image-edit", resolution=RES, max_sequence_length=None)


@pytest.fixture(scope="module")
def edit_run(tmp_path_factory):
    """3 steps of batch 2 on edits (the reference at the patched pipeline's RES x RES), then the same with
    gradient checkpointing: each run's result, gammas and forwards' token counts."""
    from diffusers import LongCatImageTransformer2DModel
    from diffusers.pipelines.longcat_image import pipeline_longcat_image_edit as edit

    root = tmp_path_factory.mktemp("edit")
    data = _edits(root / "data")
    runs = []
    for gc in (False, True):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(edit, "calculate_dimensions", lambda area, ratio: (RES, RES))
            gammas = GammaCounter(mp).gammas
            calls = record_forwards(mp, LongCatImageTransformer2DModel, ("hidden_states", "encoder_hidden_states"))
            res = train(_edit_cfg(data, root / f"run{int(gc)}", cache_dir=str(root / "cache"),
                                  gradient_checkpointing=gc), pipeline=_pipeline(edit=True), progress=False)
        runs.append((res, gammas, calls))
    return runs


def test_edit_training_with_references(edit_run):
    """Gamma 1.2 in every joint call of every forward (twice per block under checkpointing, same
    losses); every forward on the target's and the reference's tokens with the reference-conditioned
    prompt; one text entry per (caption, reference): the two edits sharing a caption have two."""
    (res, gammas, calls), (gc_res, gc_gammas, gc_calls) = edit_run
    check_taca_run(res, gammas, 3 * N_CALLS)
    check_gammas(gc_gammas, 2 * 3 * N_CALLS)
    torch.testing.assert_close(torch.tensor(gc_res.losses), torch.tensor(res.losses), rtol=1e-5, atol=1e-7)
    for c in calls + gc_calls:
        assert c["hidden_states"].shape == (2, 2 * N_IMG, 64) and c["encoder_hidden_states"].shape[1] == EDIT_TEXT
    assert len(calls) == len(gc_calls) == 3
    with open(os.path.join(res.out, "train_config.json")) as f:
        cache = json.load(f)["cache_dir"]
    assert len(os.listdir(os.path.join(cache, "text"))) == 4
    assert len(os.listdir(os.path.join(cache, "latents"))) == 8


def test_edit_adapter_loads(small_references, edit_run, tmp_path):
    """The trained edit adapter: taca.enable(lora=) gates it in a fresh edit pipeline (stock after
    disable) and the transformer's load_lora_adapter takes it, changing the edit."""
    from PIL import Image

    out = edit_run[0][0].out
    call = dict(image=Image.open(_png(tmp_path / "ref.png", 5)), prompt=SHORT, num_inference_steps=2,
                guidance_scale=1.0, output_type="latent")
    with torch.no_grad():
        base = check_gated_pipeline(_pipeline(edit=True), out, call)
        fresh = _pipeline(edit=True)
        fresh.transformer.load_lora_adapter(os.path.join(out, ADAPTER), prefix="transformer")
        lora = fresh(generator=torch.Generator().manual_seed(0), **call).images
    assert torch.isfinite(lora).all() and not torch.allclose(lora, base, atol=1e-6)


# --- what is refused -----------------------------------------------------------------------------------
def test_what_is_refused(tmp_path):
    """The edit pipeline needs its one reference (data without is refused before --out is written), takes
    no second; text to image takes none; --max-sequence-length other than the pipelines' 512 is
    refused; pipelines of the transformer whose conditioning the family does not know are refused."""
    from diffusers import FluxPipeline

    with pytest.raises(ConfigError, match="argument --data: LongCatImageEditPipeline trains edits: every sample "
                                          "needs 1"):
        check_references(LongCatImageFamily, "LongCatImageEditPipeline", 0)
    with pytest.raises(ConfigError, match="LongCatImageEditPipeline takes at most 1 reference image,"):
        check_references(LongCatImageFamily, "LongCatImageEditPipeline", 2)
    with pytest.raises(ConfigError, match="LongCatImagePipeline takes no reference images"):
        check_references(LongCatImageFamily, "LongCatImagePipeline", 1)
    pipe = _pipeline()
    fam = _family(pipe)
    with pytest.raises(ConfigError, match="argument --max-sequence-length: LongCat-Image pipelines pad every prompt "
                                          "to 512 tokens"):
        fam.encode_text([SHORT], torch.device("cpu"), 256)
    assert fam.encode_text([SHORT], torch.device("cpu"), TEXT)["prompt_embeds"].shape == (1, TEXT, 24)
    with pytest.raises(ValueError, match="LongCatImagePipeline takes no reference images"):
        fam.predict(pipe.transformer, torch.zeros(1, 16, 4, 4), torch.ones(1), {
            "prompt_embeds": torch.zeros(1, 3, 24), "reference_latents": torch.zeros(1, 1, 16, 4, 4)}, 1.0)
    edit = _family(_pipeline(edit=True))
    with pytest.raises(ValueError, match="encodes each caption with its one reference image"):
        edit.encode_text([SHORT], torch.device("cpu"), None)
    with pytest.raises(ValueError, match="takes one reference latent per sample"):
        edit.predict(pipe.transformer, torch.zeros(1, 16, 4, 4), torch.ones(1),
                     {"prompt_embeds": torch.zeros(1, 3, 24)}, 1.0)
    other = FluxPipeline.__new__(FluxPipeline)
    with pytest.raises(ValueError, match="LongCat-Image trains text to image"):
        LongCatImageFamily(other)
    # through train(): a text-to-image data folder for the edit pipeline
    data = tmp_path / "t2i"
    data.mkdir()
    for i, c in enumerate(("a red square", "a blue circle")):
        _png(data / f"{i}.png", i)
        (data / f"{i}.txt").write_text(c)
    with pytest.raises(ConfigError, match="trains edits"):
        train(_edit_cfg(str(data), tmp_path / "out"), pipeline=_pipeline(edit=True), progress=False)
    assert not (tmp_path / "out").exists()
    # a --max-sequence-length for the edit pipeline (not known before loading: the adapter lists only the
    # text-to-image pipeline) is refused once it is loaded, still before --out is written
    edits = _edits(tmp_path / "edits")
    with pytest.raises(ConfigError,
                       match="argument --max-sequence-length: LongCat-Image.* take no max_sequence_length"):
        train(_edit_cfg(edits, tmp_path / "out", max_sequence_length=256), pipeline=_pipeline(edit=True),
              progress=False)
    assert not (tmp_path / "out").exists()
