"""Synthetic compositional scenes: captions, specs and a batched torch renderer.

The grammar (a closed vocabulary of 25 words, captions of at most 11 words)::

    caption := phrase (("and" phrase) | (relation phrase))*
    phrase  := ("a" | "one" | "two" | "three") color shape["s"]
    relation:= "to the left of" | "to the right of" | "above" | "below"

Categories (T2I-CompBench's, in miniature), each a fixed list of specs:

- ``color``:   "a red circle and a blue square" (two objects, different colors and shapes)
- ``shape``:   "a green square and a green triangle" (two objects, one color, different shapes)
- ``spatial``: "a red circle to the left of a blue square" (two different objects, a relation)
- ``count``:   "three red circles" (one to three identical objects)
- ``complex``: "two red circles and a blue square", "a red circle and a blue square and a
  green triangle" (three objects: counts and color/shape binding together)

A spec is what the caption says: a list of groups ``(count, color, shape)`` and an optional
relation between the first two groups. A scene adds a layout: per object a center, a half-extent
``r`` (the object fits in the box ``center +- r``; sizes vary and are not named in captions),
with boxes at least ``GAP`` pixels apart, so objects never touch. Spatial layouts are
unambiguous: along the relation's axis the boxes are separated, across it the centers differ by
at most half the distance along it.

Rendering is batched and vectorized (B scenes at once on any device): per pixel the signed
distance to each object, coverage ``clamp(0.5 - sdf, 0, 1)`` (one-pixel anti-aliasing), objects
composited over a black background. Images are (B, 3, H, W) float in [-1, 1].

Everything is deterministic from a seed: layouts come from a ``torch.Generator`` (one stream
per device type: the same seed gives the same scenes on the same kind of device).
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

# Well separated in RGB (the closest pair, blue-purple, is ~139 apart in 0..255 units).
PALETTE: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 50),
    "blue": (40, 70, 230),
    "yellow": (235, 215, 30),
    "purple": (170, 40, 190),
    "cyan": (30, 200, 210),
    "white": (235, 235, 235),
}
COLORS: Tuple[str, ...] = tuple(PALETTE)
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND: Tuple[int, int, int] = (0, 0, 0)
RELATIONS: Tuple[str, ...] = ("left", "right", "above", "below")
_REL_WORDS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
CATEGORIES: Tuple[str, ...] = ("color", "shape", "spatial", "count", "complex")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}

PAD = "<pad>"
UNK = "<unk>"
VOCAB: Tuple[str, ...] = (
    PAD, UNK, "a", "one", "two", "three", "and", "to", "the", "left", "right", "of", "above", "below",
) + COLORS + SHAPES + tuple(s + "s" for s in SHAPES)
MAX_WORDS = 11  # the longest caption: "a red circle and a blue square and a green triangle"
TEXT_LEN = 12   # token positions the text encoder sees (captions padded with PAD)

IMAGE_SIZE = 32
GAP = 2.0  # minimum distance between two objects' boxes, in pixels
# half-extent ranges (pixels) for scenes with <= 2 and with 3 objects (at IMAGE_SIZE = 32)
R_RANGE_2 = (3.5, 6.5)
R_RANGE_3 = (3.0, 5.0)


@dataclass(frozen=True)
class Group:
    """``count`` identical objects of one color and shape."""

    count: int
    color: str
    shape: str


@dataclass(frozen=True)
class Spec:
    """What a caption asks for: groups of objects and an optional relation (group 0 ``relation``
    group 1, e.g. "left": group 0 is to the left of group 1)."""

    groups: Tuple[Group, ...]
    relation: Optional[str] = None

    @property
    def n_objects(self) -> int:
        """Objects in the scene (sum of the groups' counts)."""
        return sum(g.count for g in self.groups)

    @property
    def category(self) -> str:
        """The category this spec belongs to (``CATEGORIES``)."""
        if self.relation is not None:
            return "spatial"
        if len(self.groups) == 1:
            return "count"
        if len(self.groups) == 2 and self.n_objects == 2:
            return "shape" if self.groups[0].color == self.groups[1].color else "color"
        return "complex"

    def objects(self) -> List[Tuple[str, str]]:
        """Objects as (color, shape), group by group (so objects 0 and 1 are groups 0 and 1 when
        the spec has a relation)."""
        return [(g.color, g.shape) for g in self.groups for _ in range(g.count)]

    def caption(self) -> str:
        """The canonical caption ("one" only in the count category, "a" elsewhere)."""
        parts = []
        for i, g in enumerate(self.groups):
            if i:
                parts.append(_REL_WORDS[self.relation] if (i == 1 and self.relation) else "and")
            det = "a" if g.count == 1 and self.category != "count" else NUMBER_WORDS[g.count]
            parts.append(f"{det} {g.color} {g.shape}{'s' if g.count > 1 else ''}")
        return " ".join(parts)


def parse_caption(caption: str) -> Spec:
    """The spec of a caption of the grammar above. Raises ValueError naming the caption otherwise."""
    if not isinstance(caption, str):
        raise TypeError(f"taca.mini: caption must be a str, got {type(caption).__name__}")
    words = caption.lower().replace(",", " ").split()
    groups: List[Group] = []
    relation = None
    i = 0

    def bad(why: str) -> ValueError:
        return ValueError(f"taca.mini: caption {caption!r} is not in the miniature's grammar ({why})")

    while True:
        if i + 3 > len(words):
            raise bad("expected '<a|one|two|three> <color> <shape>'")
        det, color, shape = words[i:i + 3]
        count = {"a": 1, "one": 1, "two": 2, "three": 3}.get(det)
        if count is None:
            raise bad(f"unknown number {det!r}")
        if color not in PALETTE:
            raise bad(f"unknown color {color!r}")
        plural = shape.endswith("s") and shape[:-1] in SHAPES
        if not plural and shape not in SHAPES:
            raise bad(f"unknown shape {shape!r}")
        if plural != (count > 1):
            raise bad(f"{det!r} with {shape!r}")
        groups.append(Group(count, color, shape[:-1] if plural else shape))
        i += 3
        if i == len(words):
            break
        if words[i] == "and":
            i += 1
        else:
            for rel, phrase in _REL_WORDS.items():
                n = len(phrase.split())
                if words[i:i + n] == phrase.split():
                    if relation is not None or len(groups) != 1:
                        raise bad("a relation is allowed only between the first two objects")
                    relation, i = rel, i + n
                    break
            else:
                raise bad(f"unexpected word {words[i]!r}")
    return Spec(tuple(groups), relation)


def _pairs():
    return [(c, s) for c in COLORS for s in SHAPES]


def category_specs(category: str) -> List[Spec]:
    """Every spec of one category, in a fixed order."""
    if category not in CATEGORIES:
        raise ValueError(f"taca.mini: category={category!r} is not one of {CATEGORIES}")
    out: List[Spec] = []
    if category == "color":
        out = [Spec((Group(1, c1, s1), Group(1, c2, s2))) for c1, s1 in _pairs() for c2, s2 in _pairs()
               if c1 != c2 and s1 != s2]
    elif category == "shape":
        out = [Spec((Group(1, c, s1), Group(1, c, s2))) for c in COLORS for s1 in SHAPES for s2 in SHAPES if s1 != s2]
    elif category == "spatial":
        out = [Spec((Group(1, c1, s1), Group(1, c2, s2)), rel) for c1, s1 in _pairs() for c2, s2 in _pairs()
               if (c1, s1) != (c2, s2) for rel in RELATIONS]
    elif category == "count":
        out = [Spec((Group(n, c, s),)) for n in (1, 2, 3) for c in COLORS for s in SHAPES]
    else:
        out = [Spec((Group(2, c1, s1), Group(1, c2, s2))) for c1, s1 in _pairs() for c2, s2 in _pairs()
               if (c1, s1) != (c2, s2)]
        out += [Spec((Group(1, c1, s1), Group(1, c2, s2), Group(1, c3, s3)))
                for c1 in COLORS for c2 in COLORS for c3 in COLORS if len({c1, c2, c3}) == 3
                for s1 in SHAPES for s2 in SHAPES for s3 in SHAPES if len({s1, s2, s3}) == 3]
    return out


class SpecTable:
    """All specs of the given categories as tensors, for batched sampling and rendering.

    Attributes (S specs): ``specs`` (list of Spec), ``captions`` (list of str), ``category``
    (S,) long index into ``categories``, ``n_obj`` (S,), ``color`` (S, 3) and ``shape`` (S, 3)
    long (-1 where absent), ``relation`` (S,) long index into RELATIONS or -1.
    """

    def __init__(self, categories: Sequence[str] = CATEGORIES):
        self.categories = tuple(categories)
        for c in self.categories:
            if c not in CATEGORIES:
                raise ValueError(f"taca.mini: categories has {c!r}, not one of {CATEGORIES}")
        _fill_table(self, [s for c in self.categories for s in category_specs(c)])
        self.category = torch.tensor([self.categories.index(s.category) for s in self.specs])
        self._by_cat = [torch.nonzero(self.category == k).flatten() for k in range(len(self.categories))]

    def __len__(self) -> int:
        return len(self.specs)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n,) spec indices on the generator's device: a category uniformly, then a spec of it
        uniformly (so small categories are not drowned by large ones)."""
        dev = generator.device
        cat = torch.randint(len(self.categories), (n,), generator=generator, device=dev)
        u = torch.rand(n, generator=generator, device=dev)
        sizes = torch.tensor([len(b) for b in self._by_cat], device=dev)
        offsets = torch.cumsum(torch.cat([sizes.new_zeros(1), sizes[:-1]]), 0)
        flat = torch.cat(self._by_cat).to(dev)
        within = torch.clamp((u * sizes[cat]).long(), max=sizes[cat] - 1)
        return flat[offsets[cat] + within]


@dataclass
class Layout:
    """Per scene up to 3 objects: ``center`` (B, 3, 2) (x, y) in pixels (pixel i covers [i, i+1]),
    ``r`` (B, 3) half-extent, ``color``/``shape`` (B, 3) long, ``present`` (B, 3) bool."""

    center: torch.Tensor
    r: torch.Tensor
    color: torch.Tensor
    shape: torch.Tensor
    present: torch.Tensor


def sample_layouts(table: SpecTable, idx: torch.Tensor, generator: torch.Generator, size: int = IMAGE_SIZE,
                   tries: int = 48) -> Layout:
    """Random layouts for specs ``idx`` (B,): sizes and positions by vectorized rejection sampling
    (``tries`` candidates per scene per round, the first valid one kept)."""
    if size < 24:
        raise ValueError(f"taca.mini: size={size} is too small for three objects (>= 24)")
    dev = generator.device
    idx = idx.to(dev)
    B = idx.numel()
    n_obj = table.n_obj.to(dev)[idx]
    color = table.color.to(dev)[idx]
    shape = table.shape.to(dev)[idx]
    rel = table.relation.to(dev)[idx]
    present = torch.arange(3, device=dev)[None, :] < n_obj[:, None]
    scale = size / IMAGE_SIZE
    lo = torch.where(n_obj >= 3, R_RANGE_3[0], R_RANGE_2[0]) * scale
    hi = torch.where(n_obj >= 3, R_RANGE_3[1], R_RANGE_2[1]) * scale
    center = torch.zeros(B, 3, 2, device=dev)
    r = torch.zeros(B, 3, device=dev)
    todo = torch.arange(B, device=dev)
    for _ in range(1000):
        if todo.numel() == 0:
            break
        T = tries
        n = todo.numel()
        rr = lo[todo, None, None] + (hi - lo)[todo, None, None] * torch.rand(n, T, 3, generator=generator, device=dev)
        u = torch.rand(n, T, 3, 2, generator=generator, device=dev)
        cc = (rr[..., None] + 1) + u * (size - 2 * (rr[..., None] + 1))
        ok = torch.ones(n, T, dtype=torch.bool, device=dev)
        pres = present[todo]
        for i in range(3):
            for j in range(i + 1, 3):
                d = (cc[:, :, i] - cc[:, :, j]).abs().amax(-1) - (rr[:, :, i] + rr[:, :, j])
                both = pres[:, i] & pres[:, j]
                ok &= ~both[:, None] | (d >= GAP * scale)
        # relation between objects 0 and 1: "left" = object 0 left of object 1 (image y grows down)
        rt = rel[todo][:, None]
        dx = cc[:, :, 1, 0] - cc[:, :, 0, 0]
        dy = cc[:, :, 1, 1] - cc[:, :, 0, 1]
        along = torch.where(rt == 0, dx, torch.where(rt == 1, -dx, torch.where(rt == 2, dy, -dy)))
        across = torch.where(rt <= 1, dy, dx).abs()
        need = rr[:, :, 0] + rr[:, :, 1] + GAP * scale
        ok &= (rt < 0) | ((along >= need) & (across <= 0.5 * along))
        first = torch.argmax(ok.int(), dim=1)
        got = ok.any(dim=1)
        ar = torch.arange(n, device=dev)
        sel = todo[got]
        center[sel] = cc[ar, first][got]
        r[sel] = rr[ar, first][got]
        todo = todo[~got]
    if todo.numel():
        raise RuntimeError(f"taca.mini: no valid layout found for {todo.numel()} scenes")
    return Layout(center, r * present, color, shape, present)


def render(layout: Layout, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Render layouts to images (B, 3, size, size) float32 in [-1, 1] on the layout's device."""
    dev = layout.center.device
    B = layout.center.shape[0]
    coords = torch.arange(size, device=dev, dtype=torch.float32) + 0.5
    px = coords[None, None, None, :] - layout.center[:, :, 0, None, None]  # (B, 3, 1, W)
    py = coords[None, None, :, None] - layout.center[:, :, 1, None, None]  # (B, 3, H, 1)
    r = layout.r[:, :, None, None]
    circle = torch.sqrt(px * px + py * py) - r
    qx, qy = px.abs() - r, py.abs() - r
    square = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2) + torch.maximum(qx, qy).clamp(max=0)
    # apex (0, -r), base corners (-r, r), (r, r): the largest outward distance to the three edges
    s5 = 5 ** 0.5
    tri = torch.maximum(py - r, torch.maximum(-(2 * px + py + r) / s5, -(-2 * px + py + r) / s5))
    sh = layout.shape[:, :, None, None]
    sdf = torch.where(sh == 0, circle, torch.where(sh == 1, square, tri))
    alpha = (0.5 - sdf).clamp(0, 1) * layout.present[:, :, None, None]  # (B, 3, H, W)
    pal = palette_tensor(dev)  # (K, 3) in [-1, 1]
    col = pal[layout.color.clamp(min=0)]  # (B, 3 objects, 3 channels)
    bg = background_tensor(dev)
    img = bg[None, :, None, None].expand(B, 3, size, size).clone()
    for k in range(3):  # objects never overlap; compositing in order keeps edges exact
        a = alpha[:, k, None]
        img = img * (1 - a) + col[:, k, :, None, None] * a
    return img


def palette_tensor(device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """The palette as (K, 3) float32 in [-1, 1], K = len(COLORS), in COLORS order."""
    return torch.tensor([PALETTE[c] for c in COLORS], dtype=torch.float32, device=device) / 127.5 - 1


def background_tensor(device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """The background color (3,) float32 in [-1, 1]."""
    return torch.tensor(BACKGROUND, dtype=torch.float32, device=device) / 127.5 - 1


@dataclass
class Batch:
    """A rendered batch: ``images`` (B, 3, H, W) in [-1, 1], ``spec_idx`` (B,) into the table,
    ``captions`` (list of B str, only when asked for), ``layout``."""

    images: torch.Tensor
    spec_idx: torch.Tensor
    layout: Layout
    captions: Optional[List[str]] = None


class SceneSampler:
    """Batches of random scenes, deterministic from ``seed``, rendered on ``device``.

    >>> s = SceneSampler(seed=0)
    >>> b = s.batch(4, captions=True)
    >>> b.images.shape, len(b.captions)
    (torch.Size([4, 3, 32, 32]), 4)
    """

    def __init__(self, seed: int = 0, device: Union[str, torch.device] = "cpu", size: int = IMAGE_SIZE,
                 categories: Sequence[str] = CATEGORIES, table: Optional[SpecTable] = None):
        self.table = table if table is not None else SpecTable(categories)
        self.device = torch.device(device)
        self.size = size
        self.generator = torch.Generator(device=self.device).manual_seed(int(seed))

    def batch(self, n: int, captions: bool = False) -> Batch:
        """n random scenes: images (n, 3, size, size) in [-1, 1] on the device, spec indices (n,),
        layouts, and the captions (list of n str) when ``captions``."""
        if n < 1:
            raise ValueError(f"taca.mini: n={n} must be >= 1")
        idx = self.table.sample(n, self.generator)
        layout = sample_layouts(self.table, idx, self.generator, self.size)
        caps = [self.table.captions[i] for i in idx.tolist()] if captions else None
        return Batch(render(layout, self.size), idx, layout, caps)

    def get_state(self) -> torch.Tensor:
        """The random generator's state (a uint8 tensor), for checkpoints."""
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        """Restore a state from ``get_state``: the next batches repeat."""
        self.generator.set_state(state)


def render_caption(captions: Union[str, Sequence[str]], seed: int = 0, size: int = IMAGE_SIZE,
                   device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """Ground-truth renders of captions (any caption of the grammar), (B, 3, size, size) in [-1, 1]."""
    caps = [captions] if isinstance(captions, str) else list(captions)
    specs = [parse_caption(c) for c in caps]
    table = SpecTable.__new__(SpecTable)
    _fill_table(table, specs)
    g = torch.Generator(device=torch.device(device)).manual_seed(int(seed))
    return render(sample_layouts(table, torch.arange(len(specs)), g, size), size)


def _fill_table(table: SpecTable, specs: List[Spec]) -> None:
    S = len(specs)
    table.specs = specs
    table.captions = [s.caption() for s in specs]
    table.n_obj = torch.tensor([s.n_objects for s in specs])
    table.color = torch.full((S, 3), -1, dtype=torch.long)
    table.shape = torch.full((S, 3), -1, dtype=torch.long)
    for i, s in enumerate(specs):
        for j, (c, sh) in enumerate(s.objects()):
            table.color[i, j] = COLORS.index(c)
            table.shape[i, j] = SHAPES.index(sh)
    table.relation = torch.tensor([RELATIONS.index(s.relation) if s.relation else -1 for s in specs])


def eval_prompts(per_category: int = 500, seed: int = 0,
                 categories: Sequence[str] = CATEGORIES) -> List[Dict[str, object]]:
    """The fixed evaluation prompt set: ``per_category`` prompts of each category (specs drawn
    without replacement while they last, then again), each with its own generation seed.
    Returns dicts {"id", "category", "caption", "seed"}; 5 x 500 = 2500 prompts by default."""
    if per_category < 1:
        raise ValueError(f"taca.mini: per_category={per_category} must be >= 1")
    rng = random.Random(int(seed))
    out: List[Dict[str, object]] = []
    for cat in categories:
        caps = [s.caption() for s in category_specs(cat)]
        chosen: List[str] = []
        while len(chosen) < per_category:
            chosen += rng.sample(caps, min(len(caps), per_category - len(chosen)))
        for k, c in enumerate(chosen):
            out.append({"id": f"{cat}_{k:04d}", "category": cat, "caption": c, "seed": rng.randrange(2 ** 31)})
    return out


def write_folder(out_dir: Union[str, os.PathLike], n: int, seed: int = 0, size: int = IMAGE_SIZE,
                 jsonl: bool = False, batch: int = 256) -> int:
    """Write ``n`` random scenes as ``{i:06d}.png`` with same-named ``.txt`` captions (the format
    ``taca train`` reads); with ``jsonl=True`` also ``metadata.jsonl`` of {"image", "caption"}.
    Returns the number of images written."""
    from PIL import Image

    if n < 1:
        raise ValueError(f"taca.mini: n={n} must be >= 1")
    os.makedirs(out_dir, exist_ok=True)
    sampler = SceneSampler(seed=seed, size=size)
    rows = []
    i = 0
    while i < n:
        b = sampler.batch(min(batch, n - i), captions=True)
        arr = to_uint8(b.images).permute(0, 2, 3, 1).numpy()
        for k in range(arr.shape[0]):
            name = f"{i:06d}"
            Image.fromarray(arr[k]).save(os.path.join(out_dir, name + ".png"))
            with open(os.path.join(out_dir, name + ".txt"), "w") as f:
                f.write(b.captions[k] + "\n")
            rows.append({"image": name + ".png", "caption": b.captions[k]})
            i += 1
    if jsonl:
        with open(os.path.join(out_dir, "metadata.jsonl"), "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return i


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float in [-1, 1] -> uint8 (B, 3, H, W) on the CPU."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


EVAL_PROMPTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval_prompts.json")


def load_eval_prompts(path: Optional[str] = None) -> List[Dict[str, object]]:
    """The committed evaluation prompt set (``eval_prompts.json`` beside this file: the output of
    ``eval_prompts()``, 2500 prompts with ids, categories and seeds)."""
    with open(path or EVAL_PROMPTS_FILE) as f:
        return json.load(f)


def eval_subset(per_category: int) -> List[Dict[str, object]]:
    """The first ``per_category`` (<= 500) prompts of each category of the committed set (a random
    subset of it, since each category's prompts are in random order): quick evaluations."""
    if not 1 <= per_category <= 500:
        raise ValueError(f"taca.mini: per_category={per_category} must be in [1, 500]")
    return [p for p in load_eval_prompts() if int(str(p["id"]).rsplit("_", 1)[1]) < per_category]


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m taca.mini.data folder --out DIR --n N [--seed S] [--jsonl]`` writes a training
    folder; ``python -m taca.mini.data prompts --out FILE`` writes the evaluation prompt set."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m taca.mini.data")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("folder", help="PNG images with same-named .txt captions")
    f.add_argument("--out", required=True)
    f.add_argument("--n", type=int, required=True)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--jsonl", action="store_true", help="also metadata.jsonl of {image, caption}")
    e = sub.add_parser("prompts", help="the evaluation prompt set as JSON")
    e.add_argument("--out", required=True)
    e.add_argument("--per-category", type=int, default=500)
    e.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.cmd == "folder":
        if a.n < 1:
            p.error("--n must be >= 1")
        print(f"wrote {write_folder(a.out, a.n, seed=a.seed, jsonl=a.jsonl)} images to {a.out}")
    else:
        rows = eval_prompts(a.per_category, seed=a.seed)
        with open(a.out, "w") as fh:
            fh.write("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
        print(f"wrote {len(rows)} prompts to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
