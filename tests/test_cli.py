"""The `taca` command: argument errors (exit 2, argument named), generate on a tiny saved
pipeline folder, the offline message for a hub id, and bench's missing-folder message."""
import os
import subprocess
import sys

import pytest

from taca import cli


def _run(argv, capsys):
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("argv, name", [
    (["generate", "--model", "m", "--prompt", "p", "--gamma", "-1"], "--gamma"),
    (["generate", "--model", "m", "--prompt", "p", "--gamma", "abc"], "--gamma"),
    (["generate", "--model", "m", "--prompt", "p", "--steps", "0"], "--steps"),
    (["generate", "--model", "m", "--prompt", "p", "--schedule", "sometimes"], "--schedule"),
    (["generate", "--model", "m", "--prompt", "p", "--schedule", "steps:x"], "--schedule"),
    (["generate", "--model", "m", "--prompt", "p", "--schedule", "none"], "--schedule"),
    (["generate", "--model", "m", "--prompt", "p", "--dtype", "int8"], "--dtype"),
    (["generate", "--model", "m", "--prompt", "p", "--device", "tpu"], "--device"),
    (["generate", "--prompt", "p"], "--model"),
    (["generate", "--model", "m"], "--prompt"),
    (["generate", "--model", "m", "--prompt", "p", "--bogus"], "--bogus"),
    (["demo", "--gammas", "1.1,abc"], "--gammas"),
    (["demo", "--steps", "-3"], "--steps"),
    ([], "{demo,generate,"),  # no subcommand: the choices are listed
])
def test_argument_errors_exit_2_and_name_the_argument(argv, name, capsys):
    rc, _, err = _run(argv, capsys)
    assert rc == 2
    assert name in err


def test_checks_after_parsing_exit_2(capsys, tmp_path):
    rc, _, err = _run(["generate", "--model", "m", "--prompt", "p", "--height", "100", "--device", "cpu"], capsys)
    assert rc == 2 and "--height" in err and "16" in err
    rc, _, err = _run(["generate", "--model", "m", "--prompt", "p", "--device", "cpu",
                       "--out", str(tmp_path / "no" / "such" / "x.png")], capsys)
    assert rc == 2 and "--out" in err
    rc, _, err = _run(["generate", "--model", str(tmp_path / "nothing"), "--prompt", "p", "--device", "cpu"], capsys)
    assert rc == 2 and "no such folder" in err and "Traceback" not in err
    (tmp_path / "flux1-dev.safetensors").write_bytes(b"x")
    rc, _, err = _run(["generate", "--model", str(tmp_path / "flux1-dev.safetensors"), "--prompt", "p", "--device",
                       "cpu", "--out", str(tmp_path / "x.png")], capsys)
    flat = " ".join(err.split())
    assert rc == 2 and "is a file, not a folder" in flat and "model_index.json" in flat


def test_python_dash_m_taca():
    r = subprocess.run([sys.executable, "-m", "taca", "demo", "--steps", "0"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "--steps" in r.stderr


def test_offline_hub_id_message(capsys, monkeypatch):
    pytest.importorskip("diffusers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = "black-forest-labs/FLUX.1-dev"
    rc, out, err = _run(["generate", "--model", model, "--prompt", "a cat", "--device", "cpu"], capsys)
    assert rc == 2
    assert "Traceback" not in err
    flat = " ".join(err.split())  # the paragraph is wrapped at 100 columns
    assert f"hf download {model} --local-dir ./FLUX.1-dev" in flat
    assert "`hf auth login`" in flat
    assert "huggingface-cli" not in flat  # huggingface_hub >= 1.0 ships only the `hf` command
    assert "not in the local Hugging Face cache" in flat
    assert "--model" in flat
    # wrapped only at spaces: every model id, path and command survives on one line
    words = err.split()
    for m in cli.KNOWN_MODELS + (f"./{model.split('/')[-1]}", "HF_HUB_OFFLINE=1"):
        assert any(m in w for w in words), m
    assert all(not line.endswith("-") for line in err.splitlines())
    assert max(len(line) for line in err.splitlines()) <= 100 or any(len(w) > 100 for w in words)


def test_hf_command_named_in_the_message_exists():
    # the message names `hf download` / `hf auth login`: the installed hub client has them
    hub = pytest.importorskip("huggingface_hub")
    import shutil

    exe = shutil.which("hf") or os.path.join(os.path.dirname(sys.executable), "hf")
    if not os.path.exists(exe):
        pytest.skip(f"huggingface_hub {hub.__version__} installed without its hf command")
    for sub in (["download", "--help"], ["auth", "login", "--help"]):
        r = subprocess.run([exe, *sub], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (sub, r.stderr)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    pytest.importorskip("diffusers")
    from taca.demo import build_tiny_flux_pipeline

    d = tmp_path_factory.mktemp("tinyflux")
    build_tiny_flux_pipeline(seed=0).save_pretrained(str(d))
    return str(d)


def test_generate_on_tiny_saved_pipeline_compare(tiny_folder, tmp_path, capsys, one_thread):
    from PIL import Image

    out = tmp_path / "cmp.png"
    argv = ["generate", "--model", tiny_folder, "--prompt", "a red cube next to a blue sphere", "--steps", "2",
            "--height", "32", "--width", "32", "--max-sequence-length", "16", "--device", "cpu",
            "--schedule", "constant", "--gamma", "1.5", "--out", str(out), "--compare"]
    rc, stdout, err = _run(argv, capsys)
    assert rc == 0, err
    assert str(out) in stdout
    assert "FluxPipeline (flux)" in err  # family detected from the loaded pipeline class
    assert "gamma was on in transformer calls [0, 1] of 2" in err
    img = Image.open(out)
    assert img.size == (64, 32 + 20)  # two 32x32 images side by side under a label strip
    import numpy as np

    a = np.asarray(img.convert("RGB"))[20:]
    assert (a[:, :32] != a[:, 32:]).any()  # TACA changed the image (gamma 1.5 at every step)


def test_generate_gamma_one_equals_off(tiny_folder, tmp_path, capsys, one_thread):
    from PIL import Image
    import numpy as np

    out = tmp_path / "g1.png"
    rc, _, err = _run(["generate", "--model", tiny_folder, "--prompt", "a cat", "--steps", "2", "--height", "32",
                       "--width", "32", "--max-sequence-length", "16", "--device", "cpu", "--gamma", "1",
                       "--schedule", "constant", "--out", str(out), "--compare"], capsys)
    assert rc == 0, err
    a = np.asarray(Image.open(out).convert("RGB"))[20:].astype(int)
    assert np.abs(a[:, :32] - a[:, 32:]).max() <= 1  # 8-bit rounding at most


def test_generate_rejects_non_mmdit_pipeline(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(4, 8), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(str(tmp_path))
    rc, _, err = _run(["generate", "--model", str(tmp_path), "--prompt", "x", "--device", "cpu"], capsys)
    assert rc == 2 and "DDPMPipeline" in err and "FLUX or SD3" in err


def test_bench_missing_folder_and_script(capfd, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "find_benchmarks", lambda: None)
    rc, _, err = _run(["bench", "--quick"], capfd)
    assert rc == 2 and "benchmarks/ folder is not available" in err
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "bench_x.py").write_text("import sys; print('ARGS', sys.argv[1:])\n")
    monkeypatch.setattr(cli, "find_benchmarks", lambda: str(tmp_path / "benchmarks"))
    rc, _, err = _run(["bench", "--script", "nope.py"], capfd)
    assert rc == 2 and "--script" in err and "bench_x.py" in err
    # unknown arguments pass through to the script, which runs with this Python
    capfd.readouterr()
    rc = cli.main(["bench", "--script", "bench_x.py", "--quick", "--rounds", "2"])
    out = capfd.readouterr()
    assert rc == 0, out.err
    assert "ARGS ['--quick', '--rounds', '2']" in out.out


def test_find_benchmarks_in_this_checkout():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isdir(os.path.join(here, "benchmarks")):
        assert cli.find_benchmarks() == os.path.join(here, "benchmarks")


def test_demo_subcommand_custom_args(tmp_path, capsys, one_thread):
    pytest.importorskip("diffusers")
    out = tmp_path / "demo"
    rc, stdout, err = _run(["demo", "--random-weights", "--out", str(out), "--steps", "2", "--gammas", "1.5", "--run-each-gamma",
                            "--prompt", "a red cube on the left of a blue sphere", "--words", "cube,sphere",
                            "--no-plots"], capsys)
    assert rc == 0, err
    assert "Paper rule: gamma 1.2 was on in steps [0] of 2" in stdout
    assert "const 1.5" in stdout and "const 1.2" in stdout and "1.5*" in stdout
    assert (out / "telemetry.json").exists() and (out / "images.png").exists()
    assert not (out / "text_mass.png").exists()


def test_generate_sd35m_folder_cfg_negative_prompt(tmp_path, capsys, one_thread):
    pytest.importorskip("diffusers")
    from PIL import Image

    from taca.demo import build_tiny_sd3_pipeline

    folder = tmp_path / "sd35m"
    build_tiny_sd3_pipeline(seed=0, variant="sd35m").save_pretrained(str(folder))
    out = tmp_path / "sd3.png"
    rc, stdout, err = _run(["generate", "--model", str(folder), "--prompt", "a red cube", "--negative-prompt", "blurry",
                            "--steps", "2", "--height", "16", "--width", "16", "--max-sequence-length", "8",
                            "--device", "cpu", "--schedule", "steps:1", "--out", str(out), "--compare"], capsys)
    assert rc == 0, err
    assert "StableDiffusion3Pipeline (sd3)" in err
    assert "gamma was on in transformer calls [0] of 2" in err
    assert Image.open(out).size == (32, 16 + 20)


def test_generate_negative_prompt_rejected_for_flux(tiny_folder, capsys):
    rc, _, err = _run(["generate", "--model", tiny_folder, "--prompt", "x", "--negative-prompt", "y",
                       "--device", "cpu"], capsys)
    assert rc == 2 and "--negative-prompt" in err


# ---- every argument is checked before anything is loaded (exit 2, one line naming it) ----

def _no_loading(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the pipeline was loaded before the arguments were checked")
    monkeypatch.setattr(cli, "_load_pipeline", boom)


def _lora_file(path, tensors=True, keys=("transformer.x.lora_A.weight", "transformer.x.lora_B.weight")):
    import torch
    from safetensors.torch import save_file

    save_file({k: torch.zeros(2, 2) for k in keys} if tensors else {}, str(path))
    return str(path)


BAD_GENERATE = [
    # (id, extra argv (may use {tmp}), argument named, words in the message)
    ("out_txt", ["--out", "{tmp}/result.txt"], "--out", "Pillow cannot write images with '.txt'"),
    ("out_no_ext", ["--out", "{tmp}/result"], "--out", "no extension"),
    ("out_is_folder", ["--out", "{tmp}"], "--out", "is a folder"),
    ("out_exists", ["--out", "{tmp}/done.png"], "--out", "exists; pass --overwrite"),
    ("backend_cuda_on_cpu", ["--backend", "cuda"], "--backend", "--device cpu"),
    ("offload_on_cpu", ["--offload"], "--offload", "needs --device cuda"),
    ("fp8_on_cpu", ["--fp8"], "--fp8", "needs --device cuda, not cpu"),
    ("lora_missing", ["--lora", "{tmp}/nope.safetensors"], "--lora", "does not exist"),
    ("lora_empty_folder", ["--lora", "{tmp}/emptylora"], "--lora", "holds no .safetensors file"),
    ("lora_two_files", ["--lora", "{tmp}/twolora"], "--lora", "several .safetensors files"),
    ("lora_not_safetensors", ["--lora", "{tmp}/lora.txt"], "--lora", "is not a .safetensors file"),
    ("lora_corrupt", ["--lora", "{tmp}/bad.safetensors"], "--lora", "not a readable safetensors file"),
    ("lora_no_tensors", ["--lora", "{tmp}/empty.safetensors"], "--lora", "holds no tensors"),
    ("lora_not_a_lora", ["--lora", "{tmp}/half.safetensors"], "--lora", "holds no LoRA weights"),
    ("msl_huge_unknown_model", ["--max-sequence-length", "100000"], "--max-sequence-length", "at most 4096"),  # JoyImage pipelines
    ("msl_dev", ["--model", "black-forest-labs/FLUX.1-dev", "--max-sequence-length", "513"],
     "--max-sequence-length", "FLUX.1 pipelines take at most 512"),
    ("msl_schnell", ["--model", "black-forest-labs/FLUX.1-schnell", "--max-sequence-length", "300"],
     "--max-sequence-length", "FLUX.1-schnell take at most 256"),
    ("msl_sd35", ["--model", "stabilityai/stable-diffusion-3.5-large", "--max-sequence-length", "1024"],
     "--max-sequence-length", "SD3/SD3.5 pipelines take at most 512"),
    ("negative_prompt_flux_id", ["--model", "black-forest-labs/FLUX.1-dev", "--negative-prompt", "x"],
     "--negative-prompt", "only SD3"),
    ("width", ["--width", "1000"], "--width", "multiple of 16"),
    ("guidance_nan", ["--guidance", "nan"], "--guidance", "finite"),
    ("seed_negative", ["--seed", "-1"], "--seed", "[0, 2**63)"),
    ("schedule_none", ["--schedule", "none"], "--schedule", "'constant' for gamma at every step"),
]


@pytest.mark.parametrize("extra, arg, words", [b[1:] for b in BAD_GENERATE], ids=[b[0] for b in BAD_GENERATE])
def test_generate_checks_every_argument_before_loading(extra, arg, words, tmp_path, capsys, monkeypatch):
    _no_loading(monkeypatch)
    (tmp_path / "done.png").write_bytes(b"a finished image")
    (tmp_path / "emptylora").mkdir()
    (tmp_path / "emptylora" / "README.md").write_text("no weights here")
    (tmp_path / "twolora").mkdir()
    _lora_file(tmp_path / "twolora" / "a.safetensors")
    _lora_file(tmp_path / "twolora" / "b.safetensors")
    (tmp_path / "lora.txt").write_text("x")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 5)
    _lora_file(tmp_path / "empty.safetensors", tensors=False)
    _lora_file(tmp_path / "half.safetensors", keys=("transformer.x.lora_A.weight",))
    argv = ["generate", "--model", "someone/some-model", "--prompt", "p", "--device", "cpu",
            "--out", str(tmp_path / "ok.png")] + [a.replace("{tmp}", str(tmp_path)) for a in extra]
    rc, _, err = _run(argv, capsys)
    assert rc == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # argparse puts its usage line first; ours is the one line
    assert arg in last and words in last, err
    assert (tmp_path / "done.png").read_bytes() == b"a finished image"


def test_generate_valid_arguments_reach_the_loader(tmp_path, capsys, monkeypatch):
    # the checks above do not refuse good arguments: a LoRA folder with one file, --overwrite
    seen = []
    monkeypatch.setattr(cli, "_load_pipeline", lambda model, dtype: (seen.append(model), (None, "stop here"))[1])
    (tmp_path / "lora").mkdir()
    _lora_file(tmp_path / "lora" / "my_taca.safetensors")
    (tmp_path / "done.png").write_bytes(b"old")
    rc, _, err = _run(["generate", "--model", "black-forest-labs/FLUX.1-schnell", "--prompt", "p", "--device", "cpu",
                       "--lora", str(tmp_path / "lora"), "--max-sequence-length", "256", "--out",
                       str(tmp_path / "done.png"), "--overwrite", "--backend", "cpu" if _have_kernels() else "auto"],
                      capsys)
    assert seen == ["black-forest-labs/FLUX.1-schnell"] and rc == 2 and err.strip() == "stop here"


def _have_kernels():
    from taca import ops

    return ops.HAVE_KERNELS


def test_peek_family_from_folder_configs(tiny_folder, tmp_path):
    import json

    assert cli._peek_family("black-forest-labs/FLUX.1-dev") == "flux"
    assert cli._peek_family("black-forest-labs/FLUX.1-schnell") == "flux-schnell"
    assert cli._peek_family(str(tmp_path)) is None  # nothing to read: only the common bounds apply
    with open(os.path.join(tiny_folder, "transformer", "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(tiny_folder, "model_index.json")) as f:
        index = json.load(f)
    for guidance, want in ((True, "flux"), (False, "flux-schnell")):
        d = tmp_path / want
        (d / "transformer").mkdir(parents=True)
        (d / "model_index.json").write_text(json.dumps(index))
        (d / "transformer" / "config.json").write_text(json.dumps(dict(cfg, guidance_embeds=guidance)))
        assert cli._peek_family(str(d)) == want
    index["_class_name"] = "StableDiffusion3Pipeline"
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert cli._peek_family(str(tmp_path)) == "sd3"


# ---- a finished image is never lost ----

def test_save_image_never_overwrites_and_never_loses(tmp_path, monkeypatch):
    from PIL import Image

    img = Image.new("RGB", (8, 4), "red")
    out = tmp_path / "x.png"
    out.write_bytes(b"user's image")
    path, note, rescued = cli.save_image(img, str(out))
    assert path == str(tmp_path / "x-1.png") and "not replacing" in note and not rescued
    assert out.read_bytes() == b"user's image" and Image.open(path).size == (8, 4)
    path, note, rescued = cli.save_image(img, str(out), overwrite=True)
    assert path == str(out) and note is None and not rescued and Image.open(out).size == (8, 4)
    # the folder vanished while generating: the image lands in the current folder, and we say so
    monkeypatch.chdir(tmp_path)
    path, note, rescued = cli.save_image(img, str(tmp_path / "gone" / "y.png"))
    assert rescued and os.path.dirname(path) == str(tmp_path) and os.path.basename(path).startswith("taca-rescued-")
    assert "--out" in note and "FileNotFoundError" in note and path in note
    assert Image.open(path).size == (8, 4)


def test_generate_rescues_the_image_when_writing_fails(tiny_folder, tmp_path, capsys, monkeypatch, one_thread):
    from PIL import Image
    import shutil

    real_load = cli._load_pipeline
    sub = tmp_path / "sub"
    sub.mkdir()

    def load_then_remove_folder(model, dtype):  # the output folder disappears during the run
        r = real_load(model, dtype)
        shutil.rmtree(sub)
        return r

    monkeypatch.setattr(cli, "_load_pipeline", load_then_remove_folder)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    rc, stdout, err = _run(["generate", "--model", tiny_folder, "--prompt", "a cat", "--steps", "1", "--height",
                            "32", "--width", "32", "--max-sequence-length", "16", "--device", "cpu",
                            "--out", str(sub / "cat.png")], capsys)
    assert rc == 1
    assert "Traceback" not in err and "--out" in err and "the image was saved to" in err
    rescued = list(cwd.glob("taca-rescued-*.png"))
    assert len(rescued) == 1 and str(rescued[0]) in err and str(rescued[0]) in stdout
    assert Image.open(rescued[0]).size == (32, 32)


def test_demo_prints_no_third_party_noise(tmp_path):
    # transformers' note that its image processors fall back to PIL without torchvision (for
    # pipeline parts the demo never uses) is silenced in the demo's import path
    r = subprocess.run([sys.executable, "-m", "taca", "demo", "--steps", "1", "--no-plots", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "torchvision" not in r.stderr and "Warning" not in r.stderr, r.stderr
    assert "taca demo:" in r.stdout


def test_demo_out_must_be_a_creatable_folder(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("mine")
    rc, _, err = _run(["demo", "--out", str(f), "--steps", "1"], capsys)
    assert rc == 2 and "--out" in err and "is a file" in err and "Traceback" not in err
    assert f.read_text() == "mine"
    rc, _, err = _run(["demo", "--out", str(f / "sub"), "--steps", "1"], capsys)
    assert rc == 2 and "--out" in err and "cannot create the folder" in err


def test_bare_taca_prints_the_overview(capsys):
    rc, out, err = _run([], capsys)
    assert rc == 2
    for word in ("demo", "generate", "bench", "taca demo", "Exit codes"):
        assert word in err


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["generate", "--help"], ["bench", "--help"]])
def test_help_exits_0_and_every_option_is_explained(argv, capsys):
    rc, out, err = _run(argv, capsys)
    assert rc == 0 and "usage: taca" in out and not err
    parser = cli.build_parser()
    if len(argv) > 1:
        sub = next(a for a in parser._actions if isinstance(a, cli.argparse._SubParsersAction))
        parser = sub.choices[argv[0]]
    bare = [a.option_strings[-1] for a in parser._actions
            if a.option_strings and a.help in (None, "")]
    assert not bare, f"options without a help line: {bare}"


@pytest.mark.parametrize("which", ["wrong_model", "hub_id_offline"])
def test_generate_lora_that_does_not_load_fails_before_any_image(which, tiny_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if which == "wrong_model":  # a well-formed LoRA for modules this transformer does not have
        lora = _lora_file(tmp_path / "other.safetensors",
                          keys=("transformer.nothere.lora_A.weight", "transformer.nothere.lora_B.weight"))
    else:
        lora = "someone/a-lora"
    out = tmp_path / "x.png"
    rc, _, err = _run(["generate", "--model", tiny_folder, "--prompt", "a cat", "--steps", "1", "--height", "32",
                       "--width", "32", "--max-sequence-length", "16", "--device", "cpu", "--lora", lora,
                       "--out", str(out), "--compare"], capsys)
    assert rc == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("taca generate: argument --lora: cannot load") and lora in last
    if which == "hub_id_offline":
        assert f"hf download {lora}" in last
    assert not out.exists()


def test_generate_compare_interrupted_keeps_the_finished_image(tiny_folder, tmp_path, capsys, monkeypatch, one_thread):
    from PIL import Image

    real_load = cli._load_pipeline
    calls = []

    def load_with_ctrl_c(model, dtype):  # the user presses Ctrl-C during the second (TACA off) run
        pipe, msg = real_load(model, dtype)

        def hook(module, args):
            calls.append(1)
            if len(calls) > 1:
                raise KeyboardInterrupt
        pipe.transformer.register_forward_pre_hook(hook)
        return pipe, msg

    monkeypatch.setattr(cli, "_load_pipeline", load_with_ctrl_c)
    out = tmp_path / "cmp.png"
    rc, _, err = _run(["generate", "--model", tiny_folder, "--prompt", "a cat", "--steps", "1", "--height", "32",
                       "--width", "32", "--max-sequence-length", "16", "--device", "cpu", "--out", str(out),
                       "--compare"], capsys)
    assert rc == 130 and "interrupted" in err
    assert f"the TACA image alone is in {out}" in err
    assert Image.open(out).size == (32, 32)  # the TACA-on image, not a side-by-side
