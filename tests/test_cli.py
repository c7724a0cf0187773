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
    (["generate", "--model", "m", "--prompt", "p", "--dtype", "int8"], "--dtype"),
    (["generate", "--model", "m", "--prompt", "p", "--device", "tpu"], "--device"),
    (["generate", "--prompt", "p"], "--model"),
    (["generate", "--model", "m"], "--prompt"),
    (["generate", "--model", "m", "--prompt", "p", "--bogus"], "--bogus"),
    (["demo", "--gammas", "1.1,abc"], "--gammas"),
    (["demo", "--steps", "-3"], "--steps"),
    ([], "demo,generate,bench"),
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
    assert f"huggingface-cli download {model}" in flat
    assert "not in the local Hugging Face cache" in flat
    assert "--model" in flat


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
            "--schedule", "none", "--gamma", "1.5", "--out", str(out), "--compare"]
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
                       "--schedule", "none", "--out", str(out), "--compare"], capsys)
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
    rc, stdout, err = _run(["demo", "--out", str(out), "--steps", "2", "--gammas", "1.5", "--run-each-gamma",
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
