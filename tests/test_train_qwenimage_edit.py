"""taca train on tiny Qwen-Image-Edit pipelines (QwenImageEditPipeline: one reference;
QwenImageEditPlusPipeline: several), random weights, CPU: the tiny Qwen-Image transformer and VAE of
tests/test_train_qwenimage.py, a tiny Qwen2.5-VL with its vision tower, and a Qwen2-VL processor
(images only: its video processor needs torchvision, absent here, so the pipelines are trained in
memory through train(pipeline=...) rather than saved and reloaded).

Checked: predict with references is the pipelines' own transformer call (the reference tokens after
the target's, img_shapes listing both, the prompt encoded with the references shown to the
vision-language encoder); a caption's cache entry depends on its references (the cache keys it by
them); a training run has gamma in every joint-attention call and the reference tokens in every
forward; the adapter loads in the edit pipeline; data without references, too many references, and
the Edit Inpaint / Layered pipelines are refused.
"""
import json
import os
from functools import partial

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")
pytest.importorskip("transformers")

import taca  # noqa: E402
from taca.train import ConfigError, train  # noqa: E402
from taca.train.data import load_image, load_pil  # noqa: E402
from taca.train.families import check_references, family_for  # noqa: E402
from taca.train.families.qwenimage import QwenImageFamily  # noqa: E402
from test_train_qwenimage import SCHEDULER, TINY, _text_encoder  # noqa: E402
from train_checks import (GammaCounter, Record, check_taca_run, one_torch_thread, qwen2_bpe_tokenizer,  # noqa: E402,F401
                          qwenimage_vae, record_forwards, train_config)

RES = 32  # 32x32 pixels -> 8x8 latents (the tiny VAE's factor 4) -> 4x4 = 16 image tokens
N_IMG = (RES // 4 // 2) ** 2
VL_PIXELS = 56 * 56  # the processor shows the vision tower at most 56x56 pixels: 4 patches of 28 -> 1 token


def _pipeline(plus=False, seed=0):
    from diffusers import (FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImageEditPlusPipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor

    class Processor(Qwen2VLProcessor):  # no video processor (it needs torchvision)
        def check_argument_for_proper_class(self, name, arg):
            return None if arg is None else super().check_argument_for_proper_class(name, arg)

    torch.manual_seed(seed)
    cls = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=qwenimage_vae(), text_encoder=None,
               tokenizer=None, processor=None, transformer=QwenImageTransformer2DModel(**TINY).eval())
    tok = qwen2_bpe_tokenizer(pipe.prompt_template_encode)
    n = len(tok)  # the vision tokens take ids n, n + 1, n + 2, as the tiny Qwen2.5-VL's config says
    tok.add_tokens(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"], special_tokens=True)
    proc = Processor(image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=VL_PIXELS), tokenizer=tok)
    pipe.register_modules(tokenizer=tok, processor=proc, text_encoder=_text_encoder(n))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def small_references(monkeypatch):
    """The pipelines resize a reference to 1024 x 1024 area for the VAE (too many tokens for a CPU test):
    here to RES x RES, in the pipelines' module and so in the family's call of them alike."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    monkeypatch.setattr(edit, "calculate_dimensions", lambda area, ratio: (RES, RES, None))
    monkeypatch.setattr(plus, "VAE_IMAGE_SIZE", RES * RES)


def _png(path, seed, h=RES, w=RES):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8)).save(path)
    return str(path)


# --- predict against the pipelines -------------------------------------------------------------------
@pytest.mark.parametrize("plus", [False, True], ids=["edit", "edit_plus"])
def test_predict_is_the_pipelines_call(plus, small_references, tmp_path):
    """The pipeline's first transformer call (one reference for Edit, two for Edit Plus) against
    predict given the same latents, sigma, the caption's cache entry (encode_text with the
    references as taca train loads them) and the reference latents: the same prompt embeddings (to
    1e-6: the caption alone in a batch of 1), hidden states, img_shapes and timestep, and the
    pipeline's prediction of the target's tokens, unpacked. The text entry changes with the
    reference, and so does the prediction."""
    from PIL import Image

    pipe = _pipeline(plus)
    fam = family_for(pipe)
    assert isinstance(fam, QwenImageFamily) and fam.text_references()
    assert fam.reference_resolution(RES) == 1024 and fam.max_references() == (1 << 16 if plus else 1)
    paths = [_png(tmp_path / f"r{i}.png", i) for i in range(2 if plus else 1)]
    refs = [Image.open(p) for p in paths]
    rec = Record(pipe.transformer)
    with torch.no_grad():
        pipe(prompt="a red square", image=refs if plus else refs[0], height=RES, width=RES, num_inference_steps=2,
             true_cfg_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="latent")
    kw, out = rec.calls[0]
    rec.h.remove()
    assert kw["hidden_states"].shape[1] == (1 + len(paths)) * N_IMG
    assert kw["img_shapes"] == [[(1, RES // 8, RES // 8)] * (1 + len(paths))]
    cpu = torch.device("cpu")
    with torch.no_grad():
        enc = fam.encode_text(["a red square"], cpu, None, references=[[load_pil(p, RES) for p in paths]])
        cond = fam.collate(fam.split_text(enc))
        torch.testing.assert_close(cond["prompt_embeds"], kw["encoder_hidden_states"], rtol=1e-6, atol=1e-6)
        other = fam.encode_text(["a red square"], cpu, None, references=[[load_pil(_png(tmp_path / "o.png", 9), RES)]
                                                                         + [load_pil(p, RES) for p in paths[1:]]])
        assert not torch.allclose(other["prompt_embeds"], enc["prompt_embeds"], atol=1e-4)

        unpack = partial(pipe._unpack_latents, height=RES, width=RES, vae_scale_factor=pipe.vae_scale_factor)
        ref_lat = [unpack(kw["hidden_states"][:, (1 + r) * N_IMG:(2 + r) * N_IMG]) for r in range(len(paths))]
        for p, lat in zip(paths, ref_lat):  # the cached reference latents are the pipeline's
            torch.testing.assert_close(fam.encode_images(load_image(p, RES)[None]), lat, rtol=1e-5, atol=1e-5)
        cond = dict(cond, prompt_embeds=kw["encoder_hidden_states"], reference_latents=torch.stack(ref_lat, 1))
        noisy = unpack(kw["hidden_states"][:, :N_IMG])
        rec = Record(pipe.transformer)
        mine = fam.predict(pipe.transformer, noisy, kw["timestep"].float(), cond, 1.0)
    (kw2, out2), = rec.calls
    assert torch.equal(kw2["hidden_states"], kw["hidden_states"]) and kw2["img_shapes"] == kw["img_shapes"]
    assert torch.equal(kw2["timestep"], kw["timestep"])
    assert kw["encoder_hidden_states_mask"] is None and kw2["encoder_hidden_states_mask"] is None
    assert torch.equal(out2, out) and torch.equal(mine, unpack(out[:, :N_IMG]))
    with torch.no_grad():
        swapped = dict(cond, reference_latents=torch.flip(cond["reference_latents"], [1]) if plus
                       else torch.zeros_like(cond["reference_latents"]))
        assert not torch.allclose(fam.predict(pipe.transformer, noisy, kw["timestep"].float(), swapped, 1.0), mine,
                                  atol=1e-5)


# --- training ----------------------------------------------------------------------------------------
def _edits(folder, refs_per=1, n=4):
    """n edits: targets e<i>.png (40x36), references r<i>_<k>.png; edits 0 and 1 share a caption
    with different references."""
    os.makedirs(folder, exist_ok=True)
    lines = []
    for i in range(n):
        _png(os.path.join(folder, f"e{i}.png"), 100 + i, 40, 36)
        refs = [_png(os.path.join(folder, f"r{i}_{k}.png"), 200 + 10 * i + k, 36, 44) for k in range(refs_per)]
        caption = "a red square" if i < 2 else ["a blue circle", "a big green square"][i % 2]
        lines.append(json.dumps({"image": f"e{i}.png", "caption": caption,
                                 "references": [os.path.basename(r) for r in refs]}))
    path = os.path.join(folder, "edits.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _train(pipe, data, out, monkeypatch, **kw):
    """train(pipeline=pipe) with the transformer's token count per forward and the gammas recorded."""
    from diffusers import QwenImageTransformer2DModel

    gammas = GammaCounter(monkeypatch).gammas
    forwards = record_forwards(monkeypatch, QwenImageTransformer2DModel)
    cfg = train_config("tiny/qwen-image-edit", data, out / "run", resolution=RES, reference_resolution=RES,
                       max_sequence_length=None, **kw)
    return train(cfg, pipeline=pipe, progress=False), gammas, [f["hidden_states"].shape[1] for f in forwards]


@pytest.mark.parametrize("plus", [False, True], ids=["edit", "edit_plus"])
def test_training_with_references(plus, tmp_path, monkeypatch):
    """3 steps of batch 2: gamma 1.2 in every joint-attention call, every forward on the target's and
    the references' tokens; the text cache holds one entry per (caption, references), so the two
    edits that share a caption but not their reference have two; one latent entry per image."""
    refs_per = 2 if plus else 1
    res, gammas, lengths = _train(_pipeline(plus), _edits(tmp_path / "data", refs_per), tmp_path, monkeypatch)
    check_taca_run(res, gammas, 3 * TINY["num_layers"])
    assert lengths == [(1 + refs_per) * N_IMG] * 3
    cache = tmp_path / "run" / "cache"
    assert len(os.listdir(cache / "text")) == 4
    assert len(os.listdir(cache / "latents")) == 4 * (1 + refs_per)


def test_adapter_loads_in_the_edit_pipeline(small_references, tmp_path, monkeypatch):
    """The trained adapter: diffusers' load_lora_weights takes it into a fresh Edit pipeline, whose edit
    then differs from the stock one; taca.enable(lora=) gates it the same way."""
    from PIL import Image

    res, _, _ = _train(_pipeline(), _edits(tmp_path / "data"), tmp_path, monkeypatch, max_steps=2, lr=1e-2)
    call = dict(prompt="a red square", image=Image.open(_png(tmp_path / "ref.png", 5)), height=RES, width=RES,
                num_inference_steps=2, true_cfg_scale=1.0, output_type="latent")
    pipe = _pipeline()
    with torch.no_grad():
        base = pipe(generator=torch.Generator().manual_seed(0), **call).images
        with taca.enabled(pipe, gamma=1.2, lora=res.out):
            gated = pipe(generator=torch.Generator().manual_seed(0), **call).images
        assert torch.isfinite(gated).all() and not torch.allclose(gated, base, atol=1e-6)
        assert torch.equal(pipe(generator=torch.Generator().manual_seed(0), **call).images, base)
        fresh = _pipeline()
        fresh.load_lora_weights(res.out)
        assert any("lora_A" in n for n, _ in fresh.transformer.named_parameters())
        lora = fresh(generator=torch.Generator().manual_seed(0), **call).images
    assert torch.isfinite(lora).all() and not torch.allclose(lora, base, atol=1e-6)


# --- what is refused ---------------------------------------------------------------------------------
def test_what_the_edit_pipelines_refuse(tmp_path):
    """An Edit pipeline trains edits: data without references is refused (ConfigError naming --data,
    before --out is written), as are two references for Edit; Edit Plus takes any number, the
    text-to-image pipeline none; the Edit Inpaint and Layered pipelines are refused (a mask, layers)."""
    from diffusers import QwenImageEditInpaintPipeline, QwenImageLayeredPipeline

    with pytest.raises(ConfigError, match="argument --data: QwenImageEditPipeline trains edits: every sample needs 1"):
        check_references(QwenImageFamily, "QwenImageEditPipeline", 0)
    with pytest.raises(ConfigError, match="QwenImageEditPipeline takes at most 1 reference image,"):
        check_references(QwenImageFamily, "QwenImageEditPipeline", 2)
    check_references(QwenImageFamily, "QwenImageEditPlusPipeline", 3)
    with pytest.raises(ConfigError, match="QwenImagePipeline takes no reference images"):
        check_references(QwenImageFamily, "QwenImagePipeline", 1)
    for cls in (QwenImageEditInpaintPipeline, QwenImageLayeredPipeline):
        with pytest.raises(ValueError, match="a mask or layers"):
            QwenImageFamily(cls.__new__(cls))
    # through train(): a text-to-image data folder for an Edit pipeline
    data = tmp_path / "t2i"
    data.mkdir()
    _png(data / "a.png", 1)
    (data / "a.txt").write_text("a red square")
    _png(data / "b.png", 2)
    (data / "b.txt").write_text("a blue circle")
    with pytest.raises(ConfigError, match="trains edits"):
        train(train_config("tiny/qwen-image-edit", str(data), tmp_path / "out", resolution=RES,
                           max_sequence_length=None), pipeline=_pipeline(), progress=False)
    assert not (tmp_path / "out").exists()
    # a pipeline the family refuses, handed to train(): one ConfigError naming --model (the CLI's one line)
    layered = QwenImageLayeredPipeline.__new__(QwenImageLayeredPipeline)
    object.__setattr__(layered, "transformer", _pipeline().transformer)
    with pytest.raises(ConfigError, match="argument --model: QwenImageLayeredPipeline conditions on what taca train"):
        train(train_config("tiny/qwen-image-edit", str(data), tmp_path / "out", resolution=RES,
                           max_sequence_length=None), pipeline=layered, progress=False)
    assert not (tmp_path / "out").exists()
