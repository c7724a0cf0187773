"""``taca eval score`` / ``report`` end to end with tiny BLIP and CLIP models saved to temporary
folders (built from configs with local tokenizers, loaded through the harness's real loading code),
fake run folders, detections JSONL, and the bad-input cases. CPU, offline."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from taca.cli import main
from taca.eval.tiny_scorers import save_tiny_blip, save_tiny_clip

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorers")
    return save_tiny_blip(str(root / "blip")), save_tiny_clip(str(root / "clip"))


def make_category(root, category, prompts, per_prompt=2, size=(48, 40), seed=0):
    """RUN/<category>/samples/<prompt>_<NNNNNN>.png with random images."""
    rng = np.random.default_rng(seed)
    d = os.path.join(root, category, "samples")
    os.makedirs(d, exist_ok=True)
    for i, p in enumerate(prompts):
        for j in range(per_prompt):
            a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(a).save(os.path.join(d, f"{p}_{i * per_prompt + j:06d}.png"))
    return os.path.join(root, category)


def _load(path):
    with open(path) as f:
        return json.load(f)


# B-VQA ------------------------------------------------------------------------------------------
def hand_blip_p_yes(folder, image, question):
    """BLIP_VQA.vqa_prob written out against the tiny model's submodules (independent of taca)."""
    from transformers import BertTokenizer, BlipForQuestionAnswering

    m = BlipForQuestionAnswering.from_pretrained(folder).eval()
    tok = BertTokenizer.from_pretrained(folder)
    s = m.config.vision_config.image_size
    a = np.asarray(image.convert("RGB").resize((s, s), Image.BICUBIC), np.float32) / 255.0
    px = torch.from_numpy(((a - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)).unsqueeze(0)
    q = tok([question], return_tensors="pt")
    ids = q.input_ids.clone()
    ids[0, 0] = tok.convert_tokens_to_ids("[ENC]")
    with torch.no_grad():
        img = m.vision_model(pixel_values=px).last_hidden_state
        st = m.text_encoder(input_ids=ids, attention_mask=q.attention_mask, encoder_hidden_states=img).last_hidden_state
        bos = torch.tensor([[tok.convert_tokens_to_ids("[DEC]")]])
        logits = m.text_decoder(input_ids=bos, encoder_hidden_states=st,
                                encoder_attention_mask=q.attention_mask).logits[0, 0]
    p = torch.softmax(logits, 0)
    y, n = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    return float(p[y] / (p[y] + p[n]))


def test_blip_vqa_matches_hand_forward(tmp_path, scorers):
    blip, _ = scorers
    prompts = ["a red car and a blue house", "a green bench", "on the left of"]
    cat = make_category(str(tmp_path / "run"), "color", prompts)
    rc = main(["eval", "score", "blip-vqa", cat, "--blip", blip, "--parser", "rules", "--device", "cpu",
               "--batch-size", "4", "--no-progress"])
    assert rc == 0
    out = os.path.join(cat, "annotation_blip")
    res = _load(os.path.join(out, "vqa_result.json"))
    assert [r["question_id"] for r in res] == list(range(6))
    details = [json.loads(ln) for ln in open(os.path.join(out, "details.jsonl"))]
    names = sorted(os.listdir(os.path.join(cat, "samples")), key=lambda n: int(n.split("_")[-1][:-4]))
    for r, d, name in zip(res, details, names):
        prompt = name.split("_")[0]
        want_q = {"a red car and a blue house": ["a red car?", "a blue house?"], "a green bench": ["a green bench?"],
                  "on the left of": []}[prompt]
        assert d["questions"] == want_q
        with Image.open(os.path.join(cat, "samples", name)) as im:
            ps = [hand_blip_p_yes(blip, im, q) for q in want_q]
        np.testing.assert_allclose(d["p_yes"], ps, atol=2e-6)
        prod = np.float32(1.0)
        for p in ps:
            prod = np.float32(prod * np.float32(float(f"{p:.4f}")))
        assert r["answer"] == f"{float(prod):.4f}"             # a string, as the official file
    s = _load(os.path.join(out, "score.json"))
    assert s["metric"] == "blip-vqa" and s["n_images"] == 6 and s["official"] is False
    assert s["mean"] == pytest.approx(np.mean([float(r["answer"]) for r in res]))
    assert any("rule parser" in d for d in s["deviations"]) and any("image size 32" in d for d in s["deviations"])
    assert s["models"]["blip"]["token_ids"]["enc"] == s["models"]["blip"]["token_ids"]["bos"] + 1
    assert len(s["models"]["blip"]["sha256"]["model.safetensors"]) == 64


def test_clip_matches_model_forward(tmp_path, scorers):
    _, clip = scorers
    from transformers import CLIPModel, CLIPTokenizer

    cat = make_category(str(tmp_path / "run"), "non_spatial", ["a man rides a horse", "a dog"], size=(40, 56))
    assert main(["eval", "score", "clip", cat, "--clip", clip, "--device", "cpu", "--no-progress"]) == 0
    res = _load(os.path.join(cat, "annotation_clip", "vqa_result.json"))
    m, tok = CLIPModel.from_pretrained(clip).eval(), CLIPTokenizer.from_pretrained(clip)
    names = sorted(os.listdir(os.path.join(cat, "samples")), key=lambda n: int(n.split("_")[-1][:-4]))
    for r, name in zip(res, names):
        with Image.open(os.path.join(cat, "samples", name)) as im:
            # Resize(32) of the short side (40 -> 32, 56 -> int(32 * 56 / 40) = 44), CenterCrop(32)
            im = im.resize((32, 44), Image.BICUBIC).crop((0, 6, 32, 38))
        a = (np.asarray(im, np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
        px = torch.from_numpy(a.transpose(2, 0, 1)).unsqueeze(0)
        t = tok([name.split("_")[0]], padding="max_length", max_length=77, return_tensors="pt")
        with torch.no_grad():
            out = m(input_ids=t.input_ids, attention_mask=t.attention_mask, pixel_values=px)
        cos = float(out.logits_per_image[0, 0] / m.logit_scale.exp().detach())
        assert r["answer"] == pytest.approx(cos, abs=1e-5)
    s = _load(os.path.join(cat, "annotation_clip", "score.json"))
    assert s["official"] is False and any("clip.load runs fp16" in d for d in s["deviations"])


def test_clip_complex_drops_adjectives(tmp_path, scorers):
    _, clip = scorers
    cat = make_category(str(tmp_path / "run"), "complex", ["The fluffy cat sits on the soft pillow."], per_prompt=1)
    assert main(["eval", "score", "clip", cat, "--clip", clip, "--device", "cpu", "--parser", "rules",
                 "--no-progress"]) == 0
    d = json.loads(open(os.path.join(cat, "annotation_clip", "details.jsonl")).readline())
    assert d["text"] == "The cat sits on the pillow ."


# detections-based metrics --------------------------------------------------------------------------
def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_spatial2d_cli_and_overwrite(tmp_path, capsys):
    cat = make_category(str(tmp_path / "run"), "spatial", ["a cat on the left of a dog"], per_prompt=2)
    det = _write_jsonl(tmp_path / "det.jsonl", [
        {"image": "a cat on the left of a dog_000000.png", "labels": ["cat", "dog"],
         "boxes": [[0, 0, 10, 10], [200, 0, 210, 10]], "scores": [0.9, 0.8]},
        {"image": "a cat on the left of a dog_000001.png", "labels": ["dog"], "boxes": [[0, 0, 10, 10]],
         "scores": [0.9]},
    ])
    args = ["eval", "score", "spatial2d", cat, "--detections", det, "--parser", "rules", "--detector", "unidet-rs200"]
    assert main(args) == 0
    out = os.path.join(cat, "labels", "annotation_obj_detection_2d")
    res = _load(os.path.join(out, "vqa_result.json"))
    assert res == [{"question_id": 0, "answer": pytest.approx(0.925)}, {"question_id": 1, "answer": 0.0}]
    s = _load(os.path.join(out, "score.json"))
    assert s["mean"] == pytest.approx(0.4625)
    assert s["deviations"] == ["prompts parsed by taca's rule parser, not spaCy en_core_web_sm (--parser)"]
    before = open(os.path.join(out, "vqa_result.json")).read()
    capsys.readouterr()
    assert main(args) == 2                                       # a finished score is kept
    assert "--overwrite" in capsys.readouterr().err
    assert open(os.path.join(out, "vqa_result.json")).read() == before
    assert main(args + ["--overwrite"]) == 0


def test_spatial3d_and_numeracy_cli(tmp_path):
    # 479 x 479: already the UniDet frame (short side 479, long <= 480), so the map is not resized
    cat = make_category(str(tmp_path / "run"), "3d_spatial", ["a dog in front of a cat"], per_prompt=1, size=(479, 479))
    name = "a dog in front of a cat_000000.png"
    depth_dir = os.path.join(cat, "labels", "depth", "3d_spatial", "samples")
    os.makedirs(depth_dir)
    d = np.zeros((479, 479), np.uint8)
    d[0:10, :] = 255
    Image.fromarray(d).save(os.path.join(depth_dir, name))
    det = _write_jsonl(tmp_path / "d3.jsonl", [{"image": name, "labels": ["dog", "cat"],
                                                "boxes": [[0, 0, 20, 20], [10, 0, 30, 20]], "scores": [0.8, 0.6]}])
    assert main(["eval", "score", "spatial3d", cat, "--detections", det, "--parser", "rules"]) == 0
    r = _load(os.path.join(cat, "labels", "annotation_obj_detection_3d", "vqa_result.json"))[0]
    # transposed slices: dog = d[0:20, 0:20] (mean 0.5), cat = d[10:30, 0:20] (0): in front; IoU 1/3 -> 2/3
    assert r["answer"] == pytest.approx(0.25 * 0.8 + 0.25 * 0.6 + 0.5 * (2 / 3))

    ncat = make_category(str(tmp_path / "run"), "numeracy", ["two dogs and a cat"], per_prompt=1)
    det = _write_jsonl(tmp_path / "dn.jsonl", [{"image": "two dogs and a cat_000000.png",
                                                "labels": ["dog", "dog", "dog", "cat"],
                                                "boxes": [[0, 0, 99, 99], [1, 1, 99, 99], [300, 0, 399, 99],
                                                          [0, 200, 99, 299]], "scores": [0.9] * 4}])
    assert main(["eval", "score", "numeracy", ncat, "--detections", det, "--parser", "rules"]) == 0
    res = _load(os.path.join(ncat, "annotation_num", "vqa_result.json"))
    assert res == [{"question_id": 0, "answer": 1.0}]           # the duplicate dog merged: 2 dogs, 1 cat


def test_three_in_one_cli(tmp_path):
    prompts = ["the cat is on the table", "a man rides a horse.", "a dog chases a ball"]
    cat = make_category(str(tmp_path / "run"), "complex", prompts, per_prompt=1)
    parts = {"annotation_blip": ["0.6000", "0.6000", "0.6000"],
             os.path.join("labels", "annotation_obj_detection_2d"): [0.2, 0.2, 0.2],
             "annotation_clip": [0.3, 0.3, 0.4]}
    for d, vals in parts.items():
        os.makedirs(os.path.join(cat, d))
        json.dump([{"question_id": i, "answer": v} for i, v in enumerate(vals)],
                  open(os.path.join(cat, d, "vqa_result.json"), "w"))
        json.dump({"official": True, "deviations": []}, open(os.path.join(cat, d, "score.json"), "w"))
    pdir = tmp_path / "prompts"
    pdir.mkdir()
    (pdir / "complex_val_spatial.txt").write_text("The cat is on the table.\r\n")
    (pdir / "complex_val_action.txt").write_text("A man rides a horse\r\n")
    assert main(["eval", "score", "three-in-one", cat, "--prompts", str(pdir)]) == 0
    res = _load(os.path.join(cat, "annotation_3_in_1", "vqa_result.json"))
    assert [r["answer"] for r in res] == [pytest.approx(0.4), pytest.approx(0.45), pytest.approx(0.4)]
    s = _load(os.path.join(cat, "annotation_3_in_1", "score.json"))
    assert s["official"] is True and s["mean"] == pytest.approx(1.25 / 3)


# bad input ----------------------------------------------------------------------------------------------
def test_bad_inputs(tmp_path, scorers, capsys):
    blip, _ = scorers
    run = str(tmp_path / "run")
    cat = make_category(run, "color", ["a red car"], per_prompt=1)

    def err(args):
        capsys.readouterr()
        rc = main(args)
        return rc, capsys.readouterr().err

    rc, e = err(["eval", "score", "blip-vqa", run, "--blip", blip])            # the run, not a category
    assert rc == 2 and "no samples/ folder" in e and os.path.join(run, "color") in e
    other = make_category(str(tmp_path / "x"), "mystuff", ["a red car"], per_prompt=1)
    rc, e = err(["eval", "score", "blip-vqa", other, "--blip", blip])          # folder is no category
    assert rc == 2 and "not a T2I-CompBench category" in e and "--category" in e
    rc, e = err(["eval", "score", "blip-vqa", str(tmp_path / "missing" / "color"), "--blip", blip])
    assert rc == 2 and "does not exist" in e
    rc, e = err(["eval", "score", "blip-vqa", cat, "--blip", str(tmp_path / "no-blip")])   # scorer path
    assert rc == 2 and "--blip" in e and "hf download Salesforce/blip-vqa-capfilt-large" in e
    rc, e = err(["eval", "score", "blip-vqa", cat])
    assert rc == 2 and "was not given" in e
    rc, e = err(["eval", "score", "clip", cat, "--clip", blip])
    assert rc == 2 and "scores the categories non_spatial, complex" in e
    open(os.path.join(cat, "samples", "grid.png"), "wb").close()             # a stray file in samples/
    rc, e = err(["eval", "score", "blip-vqa", cat, "--blip", blip])
    assert rc == 2 and "grid.png" in e
    os.remove(os.path.join(cat, "samples", "grid.png"))

    scat = make_category(run, "spatial", ["a cat on the left of a dog"], per_prompt=1)
    det = _write_jsonl(tmp_path / "det.jsonl", [
        {"image": "a cat on the left of a dog_000000.png", "labels": [], "boxes": [], "scores": []},
        {"image": "a cow_000007.png", "labels": [], "boxes": [], "scores": []}])
    rc, e = err(["eval", "score", "spatial2d", scat, "--detections", det])
    assert rc == 2 and "line 2" in e and "a cow_000007.png" in e
    assert not os.path.exists(os.path.join(scat, "labels"))                 # nothing written
    rc, e = err(["eval", "score", "spatial3d", scat, "--detections", det])
    assert rc == 2 and "scores the categories 3d_spatial" in e
    rc, e = err(["eval", "score", "three-in-one", make_category(run, "complex", ["a b"], per_prompt=1)])
    assert rc == 2 and "taca eval score blip-vqa" in e


# report -------------------------------------------------------------------------------------------------
def _fake_score(run, category, folder, mean, official=True, complete=True):
    d = os.path.join(run, category, folder)
    os.makedirs(d, exist_ok=True)
    json.dump({"mean": mean, "official": official, "complete": complete, "n_images": 3000,
               "deviations": [] if official else ["x"]}, open(os.path.join(d, "score.json"), "w"))


def test_report_two_runs(tmp_path, capsys):
    a, b = str(tmp_path / "base"), str(tmp_path / "taca")
    os.makedirs(a)
    os.makedirs(b)
    json.dump({"model": "/m/FLUX.1-dev", "taca": None}, open(os.path.join(a, "run.json"), "w"))
    json.dump({"model": "/m/FLUX.1-dev", "taca": {"gamma": 1.2, "schedule": "paper", "lora": "/l/r64.safetensors"}},
              open(os.path.join(b, "run.json"), "w"))
    _fake_score(a, "color", "annotation_blip", 0.76781)
    _fake_score(a, "numeracy", "annotation_num", 0.6)
    _fake_score(b, "color", "annotation_blip", 0.78434, official=False)
    _fake_score(b, "spatial", os.path.join("labels", "annotation_obj_detection_2d"), 0.24, complete=False)
    assert main(["eval", "report", a, b]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("| Model | Color | Shape | Texture | 2D-Spatial | Non-Spatial | Complex | 3D-Spatial "
                        "| Numeracy |")
    assert lines[2] == "| base (FLUX.1-dev, no TACA) | 0.7678 | – | – | – | – | – | – | 0.6000 |"
    assert lines[3] == ("| taca (FLUX.1-dev, TACA gamma=1.2 paper lora=r64.safetensors) | 0.7843† | – | – | "
                        "0.2400* | – | – | – | – |")
    assert ("| FLUX.1-Dev + TACA r=64 (paper) | 0.7843 | 0.5362 | 0.6872 | 0.2405 | 0.3041 | 0.4494 | – | – |"
            in lines)
    assert main(["eval", "report", a, b, "--format", "csv", "--no-published"]) == 0
    csv_lines = capsys.readouterr().out.splitlines()
    assert len(csv_lines) == 3 and csv_lines[1].endswith(",0.7678,–,–,–,–,–,–,0.6000")
    assert main(["eval", "report", a, "--format", "json"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["runs"][0]["cells"]["color"]["mean"] == 0.76781 and j["published"][0]["color"] == 0.7678
    assert main(["eval", "report", str(tmp_path / "nothing")]) == 2
    (tmp_path / "table.md").write_text("kept")
    assert main(["eval", "report", a, "--out", str(tmp_path / "table.md")]) == 2
    assert (tmp_path / "table.md").read_text() == "kept"
