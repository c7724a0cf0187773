"""`taca demo` on the shipped miniature and `taca eval mini`: real files, judged verdicts, the
text mass per step, and bad input refused before anything runs."""
import json
import os

import pytest

pytest.importorskip("diffusers")

from taca.cli import main  # noqa: E402
from taca.mini import shipped  # noqa: E402


def test_weights_ship():
    for name in ("pipeline", "taca_lora", "control_lora"):
        assert shipped(name) is not None, name
    assert os.path.isfile(os.path.join(os.path.dirname(shipped("pipeline")), "MODEL_CARD.md"))


def test_demo_on_the_miniature(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--prompt", "two purple squares", "--steps", "6"]) == 0
    printed = capsys.readouterr().out
    assert "the miniature" in printed and "two purple squares" in printed
    with open(out / "verdicts.json") as f:
        v = json.load(f)
    assert v["prompts"] == ["two purple squares"] and v["steps"] == 6
    assert set(v["verdicts"]) == {"TACA off", "TACA 1.2", "TACA 1.2 + LoRA"}
    assert all(len(x) == 4 and all(isinstance(b, bool) for b in x) for x in v["verdicts"].values())
    mass = v["text_mass_per_step"]
    assert len(mass["TACA off"]) == 6
    # the paper's rule: gamma in the first steps only (sigma >= 0.97), where it raises the text mass
    import ast
    import re

    on = ast.literal_eval(re.search(r"Gamma was on in steps (\[[0-9, ]*\])", printed).group(1))
    assert on and on == list(range(len(on))) and len(on) < 6
    assert mass["TACA 1.2"][0] > mass["TACA off"][0]
    for f in ("images.png", "text_mass.png"):
        assert (out / f).stat().st_size > 0


def test_demo_refuses_a_prompt_outside_the_grammar(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--prompt", "a dog on a sofa"]) == 2
    err = capsys.readouterr().err
    assert "argument --prompt" in err and "--random-weights" in err


def test_eval_mini(tmp_path, capsys):
    out = tmp_path / "mini"
    args = ["eval", "mini", "--per-category", "1", "--steps", "4", "--mass-prompts", "2", "--out", str(out)]
    assert main(args) == 0
    with open(out / "results.json") as f:
        res = json.load(f)
    assert res["prompts"] == 5 and set(res["conditions"]) == {
        "baseline", "gamma=1.1", "gamma=1.2", "gamma=1.3", "taca-lora", "control-lora", "control-lora+gamma"}
    for row in res["conditions"].values():
        a = row["accuracy"]["all"]
        assert a["n"] == 5 and a["lo"] <= a["acc"] <= a["hi"]
    assert (out / "results.md").read_text().startswith("Miniature, 5 prompts")
    before = (out / "results.json").read_bytes()
    assert main(args) == 2 and "argument --out" in capsys.readouterr().err  # never overwritten silently
    assert (out / "results.json").read_bytes() == before
    assert main(["eval", "mini", "--gammas", "1.2,x", "--out", str(tmp_path / "g")]) == 2
    assert "argument --gammas" in capsys.readouterr().err
    assert main(["eval", "mini", "--pipeline", str(tmp_path / "none"), "--out", str(tmp_path / "p")]) == 2
    assert "argument --pipeline" in capsys.readouterr().err
