"""``taca eval generate`` on a tiny FLUX pipeline folder written by ``save_pretrained`` (tiny CLIP
and T5 text encoders and word-level tokenizers, so the CLI path is the user's): official layout,
manifest, run.json, resume, refusing other settings, TACA on, two-process sharding through
``accelerate launch`` writing the same files as one process, and bad input. CPU, offline."""
import json
import os
import re
import subprocess
import sys

import pytest

from taca.cli import main

PROMPTS = ["a red car and a blue house", "a green bench", "a bird on the left of a cat"]
ARGS = ["--categories", "color", "--images-per-prompt", "2", "--steps", "2", "--height", "32", "--width", "32",
        "--no-progress"]


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    from taca.demo import build_tiny_flux_pipeline

    d = tmp_path_factory.mktemp("pipe") / "tiny-flux"
    build_tiny_flux_pipeline().save_pretrained(str(d))
    return str(d)


@pytest.fixture(scope="module")
def prompts_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("prompts")
    (d / "color_val.txt").write_bytes("\r\n".join(PROMPTS).encode())   # CRLF, no final newline, as upstream
    return str(d)


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, pipe_dir, prompts_dir):
    out = str(tmp_path_factory.mktemp("runs") / "A")
    assert main(["eval", "generate", "--model", pipe_dir, "--out", out, "--prompts", prompts_dir, "--no-taca"]
                + ARGS) == 0
    return out


def _names():
    return sorted(f"{p}_{i * 2 + j:06d}.png" for i, p in enumerate(PROMPTS) for j in range(2))


def test_layout_manifest_run_json(run_a, prompts_dir):
    import hashlib

    samples = os.path.join(run_a, "color", "samples")
    assert sorted(os.listdir(samples)) == _names()
    assert sorted(os.listdir(os.path.join(run_a, "color"))) == ["manifest.jsonl", "samples"]   # no temp files left
    rows = [json.loads(ln) for ln in open(os.path.join(run_a, "color", "manifest.jsonl"))]
    assert [(r["prompt_index"], r["image_index"], r["index"], r["seed"]) for r in rows] == \
        [(i, j, 2 * i + j, 42 + j) for i in range(3) for j in range(2)]
    assert rows[5]["file"] == "samples/a bird on the left of a cat_000005.png"
    run = json.load(open(os.path.join(run_a, "run.json")))
    sha = hashlib.sha256(open(os.path.join(prompts_dir, "color_val.txt"), "rb").read()).hexdigest()
    assert run["prompts"]["color"]["sha256"] == sha and run["prompts"]["color"]["n_prompts"] == 3
    assert run["taca"] is None and run["pipeline_args"] == {"num_inference_steps": 2, "height": 32, "width": 32}
    assert run["images_per_prompt"] == 2 and run["seed"] == 42 and run["versions"]["diffusers"]
    assert run["dtype"] == "fp32"  # resolved (CPU), not null
    from PIL import Image

    with Image.open(os.path.join(samples, _names()[0])) as im:
        assert im.size == (32, 32)


def test_resume_and_refuse_other_settings(tmp_path, pipe_dir, prompts_dir, run_a, capsys):
    import shutil

    out = str(tmp_path / "R")
    shutil.copytree(run_a, out)
    samples = os.path.join(out, "color", "samples")
    gone = _names()[3]
    before = open(os.path.join(samples, gone), "rb").read()
    os.remove(os.path.join(samples, gone))
    mtimes = {n: os.stat(os.path.join(samples, n)).st_mtime_ns for n in os.listdir(samples)}
    capsys.readouterr()
    assert main(["eval", "generate", "--model", pipe_dir, "--out", out, "--prompts", prompts_dir, "--no-taca"]
                + ARGS) == 0
    err = capsys.readouterr().err
    assert re.search(r"generated 1 in [0-9.]+ s \([0-9.]+ img/s, model loading excluded\), kept 5", err), err
    assert open(os.path.join(samples, gone), "rb").read() == before          # same seed, same image
    assert {n: os.stat(os.path.join(samples, n)).st_mtime_ns for n in mtimes} == mtimes   # others untouched
    # a smaller --limit-prompts run on top: nothing to do, run.json and the manifest keep all 3 prompts
    manifest = open(os.path.join(out, "color", "manifest.jsonl")).read()
    assert main(["eval", "generate", "--model", pipe_dir, "--out", out, "--prompts", prompts_dir, "--no-taca",
                 "--limit-prompts", "1"] + ARGS) == 0
    assert "nothing to do (2 image(s) already there)" in capsys.readouterr().err
    assert open(os.path.join(out, "color", "manifest.jsonl")).read() == manifest
    assert json.load(open(os.path.join(out, "run.json")))["prompts"]["color"]["n_prompts"] == 3
    # other settings into the same folder: refused before loading the model, nothing touched
    run_before = open(os.path.join(out, "run.json")).read()
    rc = main(["eval", "generate", "--model", pipe_dir, "--out", out, "--prompts", prompts_dir, "--taca"] + ARGS)
    assert rc == 2 and "other settings" in capsys.readouterr().err
    assert open(os.path.join(out, "run.json")).read() == run_before


def test_taca_on_changes_images_and_is_recorded(tmp_path, pipe_dir, prompts_dir, run_a):
    out = str(tmp_path / "T")
    assert main(["eval", "generate", "--model", pipe_dir, "--out", out, "--prompts", prompts_dir,
                 "--taca", "gamma=2.0,schedule=constant", "--limit-prompts", "1"] + ARGS) == 0
    run = json.load(open(os.path.join(out, "run.json")))
    assert run["taca"] == {"gamma": 2.0, "schedule": "constant"} and run["prompts"]["color"]["limited"] is True
    name = "a red car and a blue house_000000.png"
    assert sorted(os.listdir(os.path.join(out, "color", "samples"))) == [name, "a red car and a blue house_000001.png"]
    on = open(os.path.join(out, "color", "samples", name), "rb").read()
    off = open(os.path.join(run_a, "color", "samples", name), "rb").read()
    assert on != off


def test_accelerate_two_processes_write_the_same_files(tmp_path, pipe_dir, prompts_dir, run_a):
    out = str(tmp_path / "B")
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    # --multi_gpu is accelerate's torchrun launcher; without CUDA taca asks accelerate for gloo on the CPU
    # (`accelerate launch --cpu` alone starts one process unless mpirun is set up).
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", "29617", "-m", "taca", "eval", "generate",
           "--model", pipe_dir, "--out", out, "--prompts", prompts_dir, "--no-taca"] + ARGS
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "[process 0] generated 4" in p.stderr and "[process 1] generated 2" in p.stderr
    for sub in ("", "color", os.path.join("color", "samples")):
        listing = sorted(f for f in os.listdir(os.path.join(out, sub)))
        assert listing == sorted(os.listdir(os.path.join(run_a, sub)))
    for n in _names():
        assert open(os.path.join(out, "color", "samples", n), "rb").read() == \
            open(os.path.join(run_a, "color", "samples", n), "rb").read(), n
    assert open(os.path.join(out, "color", "manifest.jsonl")).read() == \
        open(os.path.join(run_a, "color", "manifest.jsonl")).read()
    a, b = (json.load(open(os.path.join(d, "run.json"))) for d in (run_a, out))
    a.pop("created"), b.pop("created")
    assert a == b


def test_generate_bad_input(tmp_path, pipe_dir, prompts_dir, capsys):
    def err(extra):
        capsys.readouterr()
        rc = main(["eval", "generate", "--out", str(tmp_path / "X")] + extra)
        return rc, capsys.readouterr().err

    rc, e = err(["--model", pipe_dir, "--no-taca", "--categories", "colour"])
    assert rc == 2 and "unknown category 'colour'" in e
    rc, e = err(["--model", pipe_dir, "--no-taca", "--categories", "shape", "--prompts", prompts_dir])
    assert rc == 2 and "--prompts" in e and "shape_val.txt" in e
    rc, e = err(["--model", pipe_dir, "--taca", "gama=1.2"])
    assert rc == 2 and "unknown key 'gama'" in e
    rc, e = err(["--model", pipe_dir, "--taca", "schedule=sometimes"])
    assert rc == 2 and "--taca" in e
    rc, e = err(["--model", str(tmp_path / "nope"), "--no-taca", "--categories", "color", "--prompts", prompts_dir])
    assert rc == 2 and "--model" in e and "no such folder" in e and "hf download" in e
    rc, e = err(["--model", "black-forest-labs/FLUX.1-dev", "--no-taca", "--categories", "color", "--prompts",
                 prompts_dir])                                   # hub id, offline (conftest sets HF_HUB_OFFLINE)
    flat = " ".join(e.split())  # the paragraph is wrapped at 100 columns (never inside a word)
    assert rc == 2 and "hf download black-forest-labs/FLUX.1-dev --local-dir ./FLUX.1-dev" in flat
    rc, e = err(["--model", pipe_dir, "--no-taca", "--categories", "color", "--prompts", prompts_dir,
                 "--height", "40"])
    assert rc == 2 and "multiple of 16" in e
    with pytest.raises(SystemExit) as ex:       # --taca or --no-taca is required
        main(["eval", "generate", "--model", pipe_dir, "--out", str(tmp_path / "X")])
    assert ex.value.code == 2
    assert not os.path.exists(tmp_path / "X")


def test_shipped_prompts_and_fast_help():
    from taca.eval.layout import load_prompts

    for cat in ("color", "shape", "texture", "spatial", "non_spatial", "complex", "3d_spatial", "numeracy"):
        prompts, _, sha = load_prompts(cat)
        assert len(prompts) == 300, cat
    assert load_prompts("color")[2].startswith("1634259756db")
    assert load_prompts("color", prompt_set="7728dea")[2].startswith("1e37a12c1861")
    code = ("import sys, taca.cli as c; p = c.build_parser(); "
            "p.parse_args(['eval', 'report', 'x']); "
            "print(sorted(m for m in ('diffusers', 'transformers', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_python_pipe_and_batch_size_give_the_same_images(tmp_path, prompts_dir, run_a):
    from taca.demo import build_tiny_flux_pipeline
    from taca.eval.generate import GenerateConfig, generate

    # the in-memory pipeline (same seed as the saved folder), two images per call: per-image generators
    cfg = GenerateConfig(model="tiny-flux (in memory)", out=str(tmp_path / "P"), categories=["color"],
                         prompts_dir=prompts_dir, images_per_prompt=2, steps=2, height=32, width=32, batch_size=2,
                         progress=False)
    assert generate(cfg, pipe=build_tiny_flux_pipeline()) == {"generated": 6, "skipped": 0}
    for n in _names():
        assert open(os.path.join(cfg.out, "color", "samples", n), "rb").read() == \
            open(os.path.join(run_a, "color", "samples", n), "rb").read(), n


# --- families beyond FLUX.1 and SD3 (the rules of taca generate) ---------------------------------------------------

CHROMA_ARGS = ["--categories", "color", "--images-per-prompt", "1", "--steps", "2", "--height", "16", "--width", "16",
               "--max-sequence-length", "8", "--guidance", "3", "--no-progress"]


def test_chroma_folder_generates_with_and_without_taca(tmp_path, chroma_folder, prompts_dir, capsys):
    """Another family's pipeline (Chroma: CFG with a negative prompt of its own) runs the same command: the
    official layout, TACA on changing images, the family's limit on --max-sequence-length checked before any
    folder is made."""
    off, on = str(tmp_path / "off"), str(tmp_path / "on")
    assert main(["eval", "generate", "--model", chroma_folder, "--out", off, "--prompts", prompts_dir, "--no-taca"]
                + CHROMA_ARGS) == 0
    assert main(["eval", "generate", "--model", chroma_folder, "--out", on, "--prompts", prompts_dir,
                 "--taca", "gamma=1.5,schedule=constant"] + CHROMA_ARGS) == 0
    names = sorted(f"{p}_{i:06d}.png" for i, p in enumerate(PROMPTS))
    for run in (off, on):
        assert sorted(os.listdir(os.path.join(run, "color", "samples"))) == names
        settings = json.load(open(os.path.join(run, "run.json")))
        assert settings["model"] == chroma_folder and settings["pipeline_args"]["guidance_scale"] == 3
    same = [open(os.path.join(off, "color", "samples", n), "rb").read() ==
            open(os.path.join(on, "color", "samples", n), "rb").read() for n in names]
    assert not all(same), "gamma 1.5 at every step changed no image"
    # a negative prompt (Chroma takes one): recorded with the pipeline arguments, and it changes the images
    neg = str(tmp_path / "neg")
    assert main(["eval", "generate", "--model", chroma_folder, "--out", neg, "--prompts", prompts_dir, "--no-taca",
                 "--negative-prompt", "blurry"] + CHROMA_ARGS) == 0
    assert json.load(open(os.path.join(neg, "run.json")))["pipeline_args"]["negative_prompt"] == "blurry"
    assert any(open(os.path.join(off, "color", "samples", n), "rb").read() !=
               open(os.path.join(neg, "color", "samples", n), "rb").read() for n in names)
    capsys.readouterr()
    bad = str(tmp_path / "bad")
    rc = main(["eval", "generate", "--model", chroma_folder, "--out", bad, "--prompts", prompts_dir, "--no-taca"]
              + [a if a != "8" else "600" for a in CHROMA_ARGS])
    err = capsys.readouterr().err
    assert rc == 2 and "taca eval generate: argument --max-sequence-length" in err and "at most 512" in err, err
    assert not os.path.exists(bad)


def test_family_call_arguments():
    """The call a family's pipeline gets from the shared options (taca.cli.pipeline_call), checked against the
    installed diffusers pipelines' __call__ (bare instances: no weights)."""
    import diffusers

    from taca import cli
    from taca.eval.generate import GenerateConfig, UsageError, pipeline_call

    def bare(name):
        cls = getattr(diffusers, name)
        return cls.__new__(cls)

    assert cli.pipeline_call(bare("QwenImagePipeline"), "qwenimage", steps=3, guidance=4.0) == \
        {"num_inference_steps": 3, "true_cfg_scale": 4.0}
    assert cli.pipeline_call(bare("Ideogram4Pipeline"), "ideogram4", guidance=5.0) == \
        {"guidance_scale": 5.0, "guidance_schedule": None}
    assert cli.pipeline_call(bare("FluxPipeline"), "flux", schnell=True) == \
        {"num_inference_steps": 4, "guidance_scale": 0.0, "max_sequence_length": 256}
    # a run records its options as given: no schnell defaults in eval, FLUX.1's call is the options themselves
    flux_cfg = GenerateConfig(model="m", out="o", steps=2, guidance=0.0, height=32, width=32)
    assert pipeline_call(flux_cfg, bare("FluxPipeline")) == \
        {"num_inference_steps": 2, "guidance_scale": 0.0, "height": 32, "width": 32}
    joy = bare("JoyImageEditPlusPipeline")  # its __call__ has no num_images_per_prompt
    assert pipeline_call(GenerateConfig(model="m", out="o", steps=2), joy) == {"num_inference_steps": 2}
    with pytest.raises(UsageError, match="taca eval generate: argument --batch-size: JoyImageEditPlusPipeline "
                                         "takes no num_images_per_prompt"):
        pipeline_call(GenerateConfig(model="m", out="o", batch_size=2), joy)
    with pytest.raises(UsageError, match="argument --max-sequence-length: .* take no max_sequence_length"):
        pipeline_call(GenerateConfig(model="m", out="o", max_sequence_length=64), bare("LongCatImagePipeline"))
    # a FLUX.1 transformer without a guidance embedding is FLUX.1-schnell's: its 256 T5 tokens, as taca generate
    from taca.demo import build_tiny_flux_pipeline

    with pytest.raises(UsageError, match="FLUX.1-schnell take at most 256 T5 tokens, got 300"):
        pipeline_call(GenerateConfig(model="m", out="o", max_sequence_length=300), build_tiny_flux_pipeline())
    # Qwen-Image's true CFG: the guidance under true_cfg_scale with the negative prompt its reference passes
    assert pipeline_call(GenerateConfig(model="m", out="o", guidance=4.0, negative_prompt=" "),
                         bare("QwenImagePipeline")) == {"true_cfg_scale": 4.0, "negative_prompt": " "}
    with pytest.raises(UsageError, match="taca eval generate: argument --negative-prompt: only .*Qwen-Image"):
        pipeline_call(GenerateConfig(model="m", out="o", negative_prompt="blurry"), bare("FluxPipeline"))
