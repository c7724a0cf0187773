"""taca.mini.data: the grammar, determinism, rendering, the eval prompt set, the folder writer."""
import os

import numpy as np
import pytest
import torch

from taca.mini import data as D


def test_sampler_is_deterministic_from_seed():
    a = D.SceneSampler(seed=3).batch(64, captions=True)
    b = D.SceneSampler(seed=3).batch(64, captions=True)
    c = D.SceneSampler(seed=4).batch(64, captions=True)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (64, 3, 32, 32) and a.images.dtype == torch.float32
    assert a.images.min() >= -1 and a.images.max() <= 1


def test_sampler_state_round_trip():
    s = D.SceneSampler(seed=0)
    s.batch(8)
    st = s.get_state()
    x = s.batch(8).images
    s.set_state(st)
    assert torch.equal(s.batch(8).images, x)


def test_every_spec_caption_parses_back_and_fits_the_text_length():
    table = D.SpecTable()
    assert {c: sum(1 for s in table.specs if s.category == c) for c in D.CATEGORIES} == {
        c: len(D.category_specs(c)) for c in D.CATEGORIES}
    for spec, cap in zip(table.specs, table.captions):
        assert D.parse_caption(cap) == spec
        assert len(cap.split()) <= D.MAX_WORDS < D.TEXT_LEN
        assert set(cap.split()) <= set(D.VOCAB)
    assert D.parse_caption("a red circle to the left of a blue square").relation == "left"
    assert D.parse_caption("three red circles").n_objects == 3


@pytest.mark.parametrize("bad", ["a red", "a pink circle", "two red circle", "a red circle near a blue square",
                                 "a red hexagon", "a red circle and a blue square above a green triangle"])
def test_parse_rejects_captions_outside_the_grammar(bad):
    with pytest.raises(ValueError, match="not in the miniature's grammar"):
        D.parse_caption(bad)


def test_renders_have_the_objects_colors_and_background():
    caps = ["three red circles", "a blue square to the left of a white triangle"]
    img = D.render_caption(caps, seed=1)
    u = D.to_uint8(img).permute(0, 2, 3, 1).reshape(2, -1, 3)
    for k, want in enumerate([{"red"}, {"blue", "white"}]):
        colors = {tuple(p) for p in u[k].tolist()}
        assert tuple(D.BACKGROUND) in colors
        assert {name for name, rgb in D.PALETTE.items() if tuple(rgb) in colors} == want


def test_layouts_keep_objects_apart_inside_the_image_and_relations_unambiguous():
    s = D.SceneSampler(seed=5, categories=("spatial", "complex", "count"))
    b = s.batch(512)
    L = b.layout
    assert ((L.center - L.r[..., None] >= 0) | ~L.present[..., None]).all()
    assert ((L.center + L.r[..., None] <= 32) | ~L.present[..., None]).all()
    for i in range(3):
        for j in range(i + 1, 3):
            both = L.present[:, i] & L.present[:, j]
            gap = (L.center[:, i] - L.center[:, j]).abs().amax(-1) - L.r[:, i] - L.r[:, j]
            assert (gap[both] >= D.GAP - 1e-5).all()
    rel = s.table.relation[b.spec_idx]
    d = L.center[:, 1] - L.center[:, 0]
    along = torch.stack([d[:, 0], -d[:, 0], d[:, 1], -d[:, 1]], 1).gather(1, rel.clamp(min=0)[:, None])[:, 0]
    assert (along[rel >= 0] > 0).all()


def test_eval_prompts_are_fixed_balanced_and_large_enough():
    p = D.eval_prompts()
    assert len(p) >= 2000 and p == D.eval_prompts()
    assert {c: sum(1 for x in p if x["category"] == c) for c in D.CATEGORIES} == {c: 500 for c in D.CATEGORIES}
    assert len({x["id"] for x in p}) == len(p)
    for x in p[::97]:
        assert D.parse_caption(x["caption"]).category == x["category"]
    assert D.eval_prompts(per_category=10, seed=1) != D.eval_prompts(per_category=10, seed=0)


def test_write_folder_png_and_txt(tmp_path):
    from PIL import Image

    n = D.write_folder(tmp_path, 5, seed=2, jsonl=True)
    assert n == 5
    names = sorted(os.listdir(tmp_path))
    assert names.count("metadata.jsonl") == 1 and len([x for x in names if x.endswith(".png")]) == 5
    ref = D.SceneSampler(seed=2).batch(5, captions=True)
    for k in range(5):
        img = torch.from_numpy(np.array(Image.open(tmp_path / f"{k:06d}.png"))).permute(2, 0, 1)
        assert torch.equal(img, D.to_uint8(ref.images)[k])
        assert (tmp_path / f"{k:06d}.txt").read_text().strip() == ref.captions[k]


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="category="):
        D.category_specs("texture")
    with pytest.raises(ValueError, match="n=0"):
        D.SceneSampler().batch(0)
    with pytest.raises(ValueError, match="size=16"):
        D.render_caption("a red circle", size=16)


def test_committed_eval_prompts_match_the_generator():
    assert D.load_eval_prompts() == D.eval_prompts()


def test_data_cli_writes_a_folder(tmp_path):
    assert D.main(["folder", "--out", str(tmp_path), "--n", "2"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["000000.png", "000000.txt", "000001.png", "000001.txt"]


def test_eval_subset_takes_the_first_prompts_of_each_category():
    sub = D.eval_subset(3)
    assert [p["id"] for p in sub] == [f"{c}_{k:04d}" for c in D.CATEGORIES for k in range(3)]
    with pytest.raises(ValueError, match="per_category=0"):
        D.eval_subset(0)
