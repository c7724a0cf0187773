"""taca train with reference images on a tiny FLUX.1 Kontext pipeline (``FluxKontextPipeline`` from the
demo's tiny FLUX components, random weights, CPU, saved with save_pretrained), and the data's
reference-image checks.

FluxFamily.predict with a reference is checked against what the pipeline's own ``__call__`` feeds its
transformer (the reference's packed tokens after the target's, ids (1, i, j), the output cut to the
target's tokens); a training run with references has gamma in every joint-attention call, the
reference tokens in every training forward and one cache entry per distinct image; the adapter
loads in the Kontext pipeline; data and models that do not fit are refused before any weights load.
"""
import json
import os
from functools import partial

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from taca.cli import main as cli_main  # noqa: E402
from taca.train import ConfigError, train  # noqa: E402
from taca.train import loop as train_loop  # noqa: E402
from taca.train.data import discover, load_image  # noqa: E402
from taca.train.families import FluxFamily, check_references, family_for  # noqa: E402
from train_checks import (GammaCounter, Record, assert_same_adapters, check_adapter_in_pipeline,  # noqa: E402,F401
                          check_taca_run, control_run, launch_ddp, load, one_torch_thread, record_forwards,
                          train_config)

RES = 32  # 32x32 images: the demo's 1-level VAE -> 32x32 latents -> 16x16 = 256 target tokens, as many reference ones
TEXT_LEN = 16
N_IMG = (RES // 2) ** 2


def _kontext(seed=0):
    """(FluxKontextPipeline, FluxPipeline): the demo's tiny FLUX components, the Kontext one with a
    guidance embedding as FLUX.1-Kontext-dev has."""
    from diffusers import FluxKontextPipeline, FluxTransformer2DModel

    from taca.demo import DEMO_TRANSFORMER, build_tiny_flux_pipeline

    flux = build_tiny_flux_pipeline(seed=seed)
    parts = {k: v for k, v in flux.components.items() if k in (
        "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}
    torch.manual_seed(seed + 1)
    transformer = FluxTransformer2DModel(**dict(DEMO_TRANSFORMER, guidance_embeds=True)).eval()
    return FluxKontextPipeline(transformer=transformer, **parts), flux


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    kontext, flux = _kontext()
    kontext.save_pretrained(str(root / "kontext"))
    flux.save_pretrained(str(root / "flux"))
    return {"kontext": str(root / "kontext"), "flux": str(root / "flux")}


def _png(path, seed, h=RES, w=RES):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = np.zeros((h, w, 3), np.uint8) + rng.integers(0, 256, 3).astype(np.uint8)
    arr[h // 4:h // 2, w // 4:3 * w // 4] = rng.integers(0, 256, 3).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return str(path)


def _write_edits(folder, n=4, refs_per=1):
    """n edits in folder/edits.jsonl: target e<i>.png (40x36, resized and cropped by taca train) from
    reference(s) r<i>_<k>.png; edit 0's first reference is edit 1's target (one cache entry for both)."""
    os.makedirs(folder, exist_ok=True)
    lines = []
    for i in range(n):
        _png(os.path.join(folder, f"e{i}.png"), 100 + i, 40, 36)
        refs = []
        for k in range(refs_per):
            if i == 0 and k == 0:
                refs.append("e1.png")
            else:
                refs.append(_png(os.path.join(folder, f"r{i}_{k}.png"), 200 + 10 * i + k, 36, 44))
        rec = {"image": f"e{i}.png", "caption": f"make the {['red', 'blue', 'green', 'grey'][i % 4]} square round"}
        rec.update({"reference": refs[0]} if refs_per == 1 else {"references": refs})
        lines.append(json.dumps(rec))
    path = os.path.join(folder, "edits.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def edits(tmp_path_factory):
    return _write_edits(tmp_path_factory.mktemp("data") / "edits")


def _cfg(model, data):
    def cfg(out, **kw):
        kw = {"reference_resolution": RES, **kw}  # Kontext's own is 1024 px: too many tokens for a CPU test
        return train_config(model, data, out, resolution=RES, max_sequence_length=TEXT_LEN, **kw)

    return cfg


# --- predict against the pipeline --------------------------------------------------------------------
def test_predict_matches_the_kontext_pipeline(tmp_path):
    """FluxFamily.predict, given the pipeline's first-step latents and sigma, the caption's text
    entry and the reference's latents as taca train caches them (load_image, then encode_images),
    calls the transformer with exactly the pipeline's inputs (target tokens then reference tokens,
    img_ids with the reference's first coordinate 1, timestep, guidance, text) and returns its
    noise prediction for the target's tokens, unpacked."""
    pipe, _ = _kontext()
    pipe.set_progress_bar_config(disable=True)
    fam = family_for(pipe)
    assert isinstance(fam, FluxFamily) and fam.max_references() == 1
    ref_path = _png(tmp_path / "ref.png", 7)
    from PIL import Image

    rec = Record(pipe.transformer)
    with torch.no_grad():
        pipe(prompt="make it round", image=Image.open(ref_path), height=RES, width=RES, max_area=RES * RES,
             _auto_resize=False, num_inference_steps=2, guidance_scale=3.5, max_sequence_length=TEXT_LEN,
             generator=torch.Generator().manual_seed(0), output_type="latent")
    (kw, out), _ = rec.calls
    rec.h.remove()
    assert kw["hidden_states"].shape[1] == 2 * N_IMG  # the reference's tokens follow the target's
    enc = fam.split_text(fam.encode_text(["make it round"], torch.device("cpu"), TEXT_LEN))
    cond = fam.collate(enc)
    unpack = partial(pipe._unpack_latents, height=RES, width=RES, vae_scale_factor=pipe.vae_scale_factor)
    with torch.no_grad():
        # the reference as taca train caches it is the pipeline's own: the same pixels, and the same
        # latents up to the VAE convolutions' rounding (the pipeline's pixels are channels-last in
        # memory, load_image's contiguous: another CPU conv algorithm, |diff| ~ 3e-6 of the latents' range)
        px = pipe.image_processor.preprocess(pipe.image_processor.resize(Image.open(ref_path), RES, RES), RES, RES)
        assert torch.equal(load_image(ref_path, RES)[None], px)
        cached = fam.encode_images(load_image(ref_path, RES)[None])
        assert torch.equal(cached, fam.encode_images(px.contiguous()))
        torch.testing.assert_close(cached, unpack(kw["hidden_states"][:, N_IMG:]), rtol=1e-5, atol=1e-5)
        # ... and given the pipeline's latents, predict's transformer call is the pipeline's, bit for bit
        cond["reference_latents"] = unpack(kw["hidden_states"][:, N_IMG:])[:, None]
        noisy = unpack(kw["hidden_states"][:, :N_IMG])
        rec = Record(pipe.transformer)
        mine = fam.predict(pipe.transformer, noisy, kw["timestep"], cond, 3.5)
    (kw2, out2), = rec.calls
    assert torch.equal(kw2["hidden_states"], kw["hidden_states"])
    assert torch.equal(kw2["img_ids"], kw["img_ids"]) and torch.equal(kw2["txt_ids"], kw["txt_ids"])
    assert kw["img_ids"][N_IMG:, 0].eq(1).all() and kw["img_ids"][:N_IMG, 0].eq(0).all()
    assert kw["guidance"] is not None and kw["guidance"].eq(3.5).all()
    assert torch.equal(kw2["timestep"], kw["timestep"]) and torch.equal(kw2["guidance"], kw["guidance"])
    torch.testing.assert_close(kw2["encoder_hidden_states"], kw["encoder_hidden_states"], rtol=1e-6, atol=1e-6)
    assert torch.equal(out2, out)
    assert torch.equal(mine, unpack(out[:, :N_IMG]))

    # the reference matters: another one changes the target's prediction
    with torch.no_grad():
        other_ref = fam.encode_images(load_image(_png(tmp_path / "o.png", 8), RES)[None])
        other = dict(cond, reference_latents=other_ref[:, None])
        assert not torch.allclose(fam.predict(pipe.transformer, noisy, kw["timestep"], other, 3.5), mine, atol=1e-4)
        # and without one the family predicts text to image (which Kontext also generates)
        t2i = {k: v for k, v in cond.items() if k != "reference_latents"}
        assert fam.predict(pipe.transformer, noisy, kw["timestep"], t2i, 3.5).shape == noisy.shape


# --- a training run ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(models, edits, tmp_path_factory):
    """One 3-step TACA run on the edits: the gammas at the op and the token count of every transformer
    call recorded."""
    from diffusers import FluxTransformer2DModel

    mp = pytest.MonkeyPatch()
    gammas = GammaCounter(mp).gammas
    forwards = record_forwards(mp, FluxTransformer2DModel)
    try:
        res = train(_cfg(models["kontext"], edits)(tmp_path_factory.mktemp("run") / "out"), progress=False)
    finally:
        mp.undo()
    return res, gammas, [f["hidden_states"].shape[1] for f in forwards]


def test_training_with_references(run, models):
    """Gamma 1.2 in every joint-attention call of the 3 training forwards (batch 2), each forward on
    the target's and the reference's tokens, and the loss on the target's alone (predict's output
    has the target's shape, else the loss would not broadcast); the cache holds one latent entry per
    distinct image: 4 targets + 4 references - 1 image that is both."""
    res, gammas, lengths = run
    t = load(models["kontext"]).transformer
    n_joint = len(t.transformer_blocks) + len(t.single_transformer_blocks)
    check_taca_run(res, gammas, 3 * n_joint)
    assert lengths == [2 * N_IMG] * 3
    with open(os.path.join(res.out, "train_config.json")) as f:
        cache = json.load(f)["cache_dir"] or os.path.join(res.out, "cache")  # default: <out>/cache
    assert len(os.listdir(os.path.join(cache, "latents"))) == 7
    assert len(os.listdir(os.path.join(cache, "text"))) == 4


def test_references_at_their_own_size(models, edits, tmp_path, monkeypatch):
    """Kontext feeds a square reference at 1024 px whatever the output size, so that is the default
    reference size; --reference-resolution 48 with 32 px targets: every forward has 256 target and
    24 x 24 = 576 reference tokens, and the image that is a target and a reference is cached at both
    sizes (8 latent entries)."""
    from diffusers import FluxTransformer2DModel

    assert family_for(load(models["kontext"])).reference_resolution(RES) == 1024
    assert family_for(load(models["flux"])).reference_resolution(RES) == RES
    forwards = record_forwards(monkeypatch, FluxTransformer2DModel)
    res = train(_cfg(models["kontext"], edits)(tmp_path / "out", reference_resolution=48, max_steps=2),
                progress=False)
    assert res.steps == 2 and [f["hidden_states"].shape[1] for f in forwards] == [N_IMG + 24 * 24] * 2
    assert len(os.listdir(tmp_path / "out" / "cache" / "latents")) == 8


def test_two_processes_match_one(models, edits, tmp_path):
    """DDP (accelerate launch, 2 gloo CPU processes, batch 1 each) against one process with batch 2, with
    references at 48 px beside 32 px targets: the two ranks split the cache's mixed list (targets and
    references at two sizes, one image both) between them, and the run has the same losses (rtol 1e-4)
    and adapter (1e-3) as one process."""
    one = train(_cfg(models["kontext"], edits)(tmp_path / "one", reference_resolution=48, seed=1), progress=False)
    args = ["--model", models["kontext"], "--data", edits, "--resolution", str(RES), "--reference-resolution", "48",
            "--max-steps", "3", "--mixed-precision", "no", "--max-sequence-length", str(TEXT_LEN), "--lr", "1e-3",
            "--rank", "4", "--report-to", "none", "--checkpoint-every", "100", "--device", "cpu", "--seed", "1"]
    two = launch_ddp(args, tmp_path / "two", 29547, batch_size=1)
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one.losses), rtol=1e-4, atol=1e-6)
    assert_same_adapters(tmp_path / "one", tmp_path / "two")
    assert len(os.listdir(tmp_path / "two" / "cache" / "latents")) == 8


def test_control_run_with_references(models, edits, tmp_path, monkeypatch):
    """The control LoRA (taca=False) trains on the same edits with stock attention."""
    res = control_run(_cfg(models["kontext"], edits), tmp_path / "out", monkeypatch)
    assert res.steps == 3


def test_adapter_loads_in_the_kontext_pipeline(run, models, tmp_path):
    """The adapter gates the Kontext pipeline's edit through taca.enable(lora=) and loads with
    diffusers' load_lora_weights (one lora_A per targeted projection)."""
    from PIL import Image

    res = run[0]
    t = load(models["kontext"]).transformer
    # the double-stream blocks' 8 joint-attention projections, the single-stream blocks' to_q / k / v
    n_lora_a = 8 * len(t.transformer_blocks) + 3 * len(t.single_transformer_blocks)
    call = dict(prompt="make it round", image=Image.open(_png(tmp_path / "ref.png", 9)), height=RES, width=RES,
                max_area=RES * RES, _auto_resize=False, num_inference_steps=2, max_sequence_length=TEXT_LEN,
                output_type="pt")
    check_adapter_in_pipeline(lambda: load(models["kontext"]), res.out, call, n_lora_a, prefix="")


# --- what is refused ---------------------------------------------------------------------------------
def _lines(folder, recs):
    path = os.path.join(folder, "d.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in recs) + "\n")
    return path


def test_bad_reference_data(tmp_path):
    """The JSONL's reference fields: a count that differs between lines, both spellings, an empty
    or non-list "references", a missing file, an unreadable one: each a ConfigError naming --data."""
    for i in range(3):
        _png(tmp_path / f"i{i}.png", i)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    base = {"image": "i0.png", "caption": "a"}
    cases = [
        ([dict(base, reference="i1.png"), {"image": "i2.png", "caption": "b"}],
         "every sample needs the same number of reference images"),
        ([dict(base, reference="i1.png", references=["i2.png"])], '"reference" or "references", not both'),
        ([dict(base, references=[])], '"references" must be a non-empty list'),
        ([dict(base, references="i1.png")], '"references" must be a non-empty list'),
        ([dict(base, references=["i1.png", 3])], "a reference must be an image path"),
        ([dict(base, reference="gone.png")], "reference"),
        ([dict(base, reference="bad.png")], "is not a readable image"),
    ]
    for recs, match in cases:
        with pytest.raises(ConfigError, match="argument --data") as e:
            discover(_lines(tmp_path, recs))
        assert match in str(e.value), (recs, str(e.value))
    ok = discover(_lines(tmp_path, [dict(base, references=["i1.png", "i2.png"])]))
    assert ok[0].references == (str(tmp_path / "i1.png"), str(tmp_path / "i2.png"))


def test_references_a_pipeline_does_not_take_are_refused_before_loading(models, edits, tmp_path, monkeypatch, capsys):
    """References for a FluxPipeline (text to image), or two for Kontext: taca train exits 2 naming
    --data and what takes references, before any weights load (the pipeline class is read from
    model_index.json); a loaded pipeline handed to train() is checked the same way."""
    def no_load(*a, **k):
        raise AssertionError("the pipeline was loaded")

    monkeypatch.setattr(train_loop, "_load_pipeline", no_load)
    two = _write_edits(tmp_path / "two", n=2, refs_per=2)
    for model, data, match in ((models["flux"], edits, "FluxPipeline takes no reference images"),
                               (models["kontext"], two, "FluxKontextPipeline takes at most 1 reference image,")):
        out = tmp_path / "out"
        code = cli_main(["train", "--model", model, "--data", data, "--out", str(out), "--resolution", str(RES),
                         "--mixed-precision", "no", "--report-to", "none"])
        err = capsys.readouterr().err
        assert code == 2 and "argument --data" in err and match in err and "FluxKontextPipeline (1 each)" in err, err
        assert not out.exists()
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="FluxPipeline takes no reference images"):
        train(_cfg(models["flux"], edits)(tmp_path / "out2"), pipeline=load(models["flux"]), progress=False)
    # the miniature (a protocol pipeline) takes none either
    from taca.train.families import ProtocolFamily

    with pytest.raises(ConfigError, match="takes no reference images"):
        check_references(ProtocolFamily, "TinyMMDiTPipeline", 1)
