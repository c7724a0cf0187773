"""taca.mini.judge: exact on ground truth, robust to blur and noise, and not a yes-machine."""
import pytest
import torch

from taca.mini import data as D
from taca.mini import judge as J


def _blur(x):
    k = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16
    return torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"),
                                      k[None, None].repeat(3, 1, 1, 1), groups=3)


@pytest.fixture(scope="module")
def gt():
    return D.SceneSampler(seed=11).batch(2000, captions=True)


def test_judge_is_right_on_2000_ground_truth_renders(gt):
    acc = J.accuracy(J.judge(gt.images, gt.captions))
    assert acc["all"]["n"] == 2000
    for cat in D.CATEGORIES:
        assert acc[cat]["n"] >= 300 and acc[cat]["acc"] >= 0.99, (cat, acc[cat])


def test_judge_tolerates_blur_and_noise(gt):
    g = torch.Generator().manual_seed(0)
    x = _blur(gt.images[:500]) + 0.1 * torch.randn(gt.images[:500].shape, generator=g)
    assert J.accuracy(J.judge(x, gt.captions[:500]))["all"]["acc"] >= 0.95


def _swap_colors(spec):
    g0, g1 = spec.groups[0], spec.groups[1]
    return D.Spec((D.Group(g0.count, g1.color, g0.shape), D.Group(g1.count, g0.color, g1.shape)) + spec.groups[2:],
                  spec.relation)


_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}


@pytest.mark.parametrize("category,mutate,field", [
    ("color", _swap_colors, "objects_ok"),
    ("spatial", lambda s: D.Spec(s.groups, _OPPOSITE[s.relation]), "relation_ok"),
    ("count", lambda s: D.Spec((D.Group(s.groups[0].count % 3 + 1, s.groups[0].color, s.groups[0].shape),)), "count_ok"),
    ("shape", lambda s: D.Spec((s.groups[0], D.Group(1, s.groups[0].color,
                                                     next(x for x in D.SHAPES if x not in (s.groups[0].shape, s.groups[1].shape)))),
                               s.relation), "shapes_ok"),
])
def test_judge_rejects_wrong_renders(category, mutate, field):
    s = D.SceneSampler(seed=2, categories=(category,))
    b = s.batch(200, captions=True)
    wrong = [mutate(s.table.specs[i]).caption() for i in b.spec_idx.tolist()]
    right = J.judge(b.images, b.captions)
    bad = J.judge(b.images, wrong)
    assert sum(v.ok for v in right) >= 198
    assert sum(v.ok for v in bad) == 0
    assert sum(getattr(v, field) for v in bad) == 0


def test_judge_rejects_blank_and_extra_objects():
    blank = torch.full((4, 3, 32, 32), -1.0)
    assert not any(v.ok for v in J.judge(blank, ["a red circle"] * 4))
    img = D.render_caption(["two red circles and a blue square"] * 8, seed=3)
    v = J.judge(img, ["a red circle and a blue square"] * 8)
    assert not any(x.ok for x in v) and all(x.colors_ok is False and not x.count_ok for x in v)


def test_judge_takes_pil_uint8_and_floats_alike():
    img = D.render_caption(["a green square below a yellow triangle", "three cyan triangles"], seed=4)
    u8 = D.to_uint8(img)
    from PIL import Image

    pil = [Image.fromarray(u8[k].permute(1, 2, 0).numpy()) for k in range(2)]
    caps = ["a green square below a yellow triangle", "three cyan triangles"]
    for x in (img, u8, pil):
        assert [v.ok for v in J.judge(x, caps)] == [True, True]
    assert J.judge(pil[0], caps[0])[0].ok
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        J.judge(img, caps[:1])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        J.judge(torch.zeros(2, 4, 32, 32), caps)


def test_wilson_interval():
    lo, hi = J.wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = J.wilson(0, 10)
    assert lo == 0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = J.wilson(1000, 1000)
    assert hi == 1 and 0.995 < lo < 1
    with pytest.raises(ValueError, match="successes=3, n=2"):
        J.wilson(3, 2)


def test_judge_rejects_specks_around_a_right_object():
    img = D.render_caption(["a red circle"] * 4, seed=6)
    assert all(v.ok for v in J.judge(img, ["a red circle"] * 4))
    specked = img.clone()
    red = D.palette_tensor()[D.COLORS.index("red")]
    g = torch.Generator().manual_seed(0)
    for b in range(4):
        done = 0
        while done < 20:  # isolated red pixels on background, none touching another colored pixel
            y, x = torch.randint(1, 31, (2,), generator=g).tolist()
            if (specked[b, :, y - 1:y + 2, x - 1:x + 2] > -1).any():
                continue
            specked[b, :, y, x] = red
            done += 1
    v = J.judge(specked, ["a red circle"] * 4)
    assert all(x.objects_ok and not x.clean and not x.ok for x in v)
