"""``taca generate`` with the models of taca.models beyond FLUX.1 and SD3: the family is told from
a hub id or a folder's model_index.json before loading, the family's rules on arguments apply,
and a tiny saved ChromaPipeline (conftest's chroma_folder) generates end to end."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from taca import cli
from test_cli import _run



@pytest.mark.parametrize("cls,family", [
    ("FluxPipeline", "flux"), ("FluxKontextPipeline", "flux"), ("StableDiffusion3Pipeline", "sd3"),
    ("Flux2Pipeline", "flux2"), ("Flux2KleinPipeline", "flux2"), ("QwenImagePipeline", "qwenimage"),
    ("ChromaPipeline", "chroma"), ("LongCatImagePipeline", "longcat"), ("LongCatImageEditPipeline", None),
    ("OvisImagePipeline", "ovis"), ("BriaPipeline", "bria"), ("BriaFiboPipeline", "bria_fibo"),
    ("HiDreamImagePipeline", "hidream"), ("ZImagePipeline", "zimage"), ("HunyuanImagePipeline", "hunyuanimage"),
    ("CogView3PlusPipeline", "cogview3plus"), ("BriaFibo2Pipeline", "bria_fibo2"),
    ("QwenImage21Pipeline", "qwenimage21"), ("OmniGenPipeline", "omnigen"), ("Ideogram4Pipeline", "ideogram4"),
    ("JoyImageEditPipeline", "joyimage"), ("JoyImageEditPlusPipeline", "joyimage_edit_plus"), ("DDPMPipeline", None),
])
def test_family_from_a_folder(tmp_path, cls, family):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": cls}))
    assert cli._peek_family(str(tmp_path)) == family


def test_family_from_known_hub_ids():
    assert cli._peek_family("black-forest-labs/FLUX.2-dev") == "flux2"
    assert cli._peek_family("black-forest-labs/FLUX.2-klein-4B") == "flux2"
    assert cli._peek_family("Qwen/Qwen-Image") == "qwenimage"
    assert cli._peek_family("lodestones/Chroma1-HD") == "chroma"
    assert cli._peek_family("THUDM/CogView3-Plus-3B") == "cogview3plus"


class _Args:
    def __init__(self, n=None, neg=None):
        self.max_sequence_length, self.negative_prompt = n, neg


def test_family_rules():
    cli._check_family_args(_Args(1024, "blurry"), "qwenimage")
    cli._check_family_args(_Args(512, "blurry"), "chroma")
    cli._check_family_args(_Args(512), "flux2")
    with pytest.raises(cli.UsageError, match="Qwen-Image, Qwen-Image-Edit pipelines take at most 1024 text tokens"):
        cli._check_family_args(_Args(1025), "qwenimage")
    with pytest.raises(cli.UsageError, match="FLUX.2 dev, klein pipelines take at most 512 text tokens, got 513"):
        cli._check_family_args(_Args(513), "flux2")
    for family in ("longcat", "hunyuanimage", "ernie_image", "bria_fibo2"):  # their __call__ has no max_sequence_length
        cli._check_family_args(_Args(None, "blurry"), family)
        with pytest.raises(cli.UsageError, match="--max-sequence-length: .* take no max_sequence_length"):
            cli._check_family_args(_Args(64), family)


def test_every_family_flag_matches_its_pipelines():
    """What the adapters say the CLI may pass is what the pipelines' __call__ takes (diffusers as installed)."""
    import inspect

    import diffusers

    from taca import models

    for a in models.adapters():
        for name in a.pipelines:
            params = inspect.signature(getattr(diffusers, name).__call__).parameters
            assert ("max_sequence_length" in params) == a.takes_max_sequence_length, name
            assert a.guidance_arg in params, name
            if a.negative_prompt:
                assert "negative_prompt" in params, name
    for family in ("flux2", "flux", "flux-schnell"):
        with pytest.raises(cli.UsageError, match=r"--negative-prompt: only SD3, SD3.5; Qwen-Image, Qwen-Image-Edit; "
                                                 r"Chroma; LongCat-Image, LongCat-Image-Edit; Ovis-Image; Bria 3.2; "
                                                 r"Bria FIBO, FIBO Edit; HiDream-I1; Z-Image; HunyuanImage 2.1; AuraFlow; "
                                                 r"CogView4; ERNIE-Image; Krea 2; Lumina-Image 2.0; CogView3-Plus; Bria FIBO 2; "
                                                 r"Qwen-Image 2.1; JoyImage Edit; JoyImage Edit Plus pipelines take a "
                                                 r"negative prompt here"):
            cli._check_family_args(_Args(None, "blurry"), family)


def test_family_of_loaded_pipelines():
    from diffusers import ChromaPipeline, Flux2KleinPipeline, QwenImagePipeline

    for cls, family in ((ChromaPipeline, "chroma"), (Flux2KleinPipeline, "flux2"), (QwenImagePipeline, "qwenimage")):
        assert cli._family(cls.__new__(cls)) == family


def _argv(folder, out, *extra):
    return ["generate", "--model", folder, "--prompt", "a red cube", "--negative-prompt", "blurry", "--guidance", "3",
            "--steps", "2", "--height", "16", "--width", "16", "--max-sequence-length", "8", "--device", "cpu",
            "--out", str(out), *extra]


def test_generate_chroma_at_gamma_one(chroma_folder, tmp_path, capsys, one_thread):
    """A ChromaPipeline folder loads as the chroma family and takes a negative prompt and CFG;
    gamma 1 gives the TACA-off image exactly."""
    import numpy as np
    from PIL import Image

    out = tmp_path / "c.png"
    rc, _, err = _run(_argv(chroma_folder, out, "--gamma", "1", "--compare"), capsys)
    assert rc == 0, err
    assert "ChromaPipeline (chroma)" in err
    a = np.asarray(Image.open(out).convert("RGB"))[20:]
    assert (a[:, :16] == a[:, 16:]).all()


def test_generate_chroma_with_gamma(chroma_folder, tmp_path, capsys, one_thread):
    rc, _, err = _run(_argv(chroma_folder, tmp_path / "g.png", "--gamma", "1.5", "--schedule", "constant"), capsys)
    assert rc == 0, err
    assert "gamma was on in transformer calls [0, 1, 2, 3] of 4" in err  # 2 steps, CFG: 2 calls each
