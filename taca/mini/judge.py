"""A rule-based judge: does an image show what its caption (``taca.mini.data``'s grammar) says?

Per image (batched, vectorized in torch, CPU or GPU):

1. Segmentation: each pixel takes the nearest palette color if it lies within ``color_tol``
   (RGB distance, 0..255 units; the closest palette pair is ~139 apart), else it is background.
2. Objects: 4-connected components of same-color pixels (label propagation), each grown by a
   one-pixel ring of unlabeled neighbours (the anti-aliased or blurred edge). In the component
   and its ring every pixel gets a soft coverage ``alpha``: the projection of its color onto the
   segment background -> object color, clamped to [0, 1]. Components with soft area below
   ``min_area`` pixels are noise, not objects; an image whose noise adds up to more than
   ``max_noise`` pixels is not clean (scattered colored specks do not depict "a red circle").
3. Shape, from the soft mask: width ``w`` = sum over columns of the column's max alpha, height
   ``h`` likewise over rows; fill = area / (w h) (circle pi/4, square 1, upright triangle 1/2);
   asymmetry = (centroid y - center of the row profile) / h (triangle 1/6, circle and square 0).
   triangle if asymmetry > ``tri_asym`` or fill < ``tri_fill``, else square if fill >
   ``square_fill``, else circle.
4. Against the caption's spec: the multiset of detected (color, shape) must equal the spec's
   exactly (nothing missing, nothing extra), the image must be clean, and for a relation the centroids of the two named
   objects must satisfy it on the dominant axis ("left": dx > 0 and |dx| > |dy|).

``Verdict.ok`` is the per-prompt score; per-category accuracy is the mean of ``ok`` over the
prompts of a category (``accuracy``), with Wilson 95% intervals (``wilson``). The partial fields
(``colors_ok``, ``shapes_ok``, ``count_ok``, ``relation_ok``) say what went wrong.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import data as D


@dataclass
class Detected:
    """One detected object: palette color, shape, centroid (x, y) in pixels, soft area, fill, asymmetry."""

    color: str
    shape: str
    x: float
    y: float
    area: float
    fill: float
    asym: float


@dataclass
class Verdict:
    """The judge's answer for one (image, caption).

    ``ok``: the image satisfies the caption (the per-category score). ``objects_ok``: detected
    (color, shape) multiset equals the spec's (color binding + shape + count). ``colors_ok`` /
    ``shapes_ok``: the multisets of colors / shapes alone. ``count_ok``: the number of objects.
    ``relation_ok``: the relation (None when the caption has none). ``clean``: colored specks
    too small to be objects add up to at most ``max_noise`` pixels (``noise_area``).
    """

    caption: str
    category: str
    ok: bool
    objects_ok: bool
    colors_ok: bool
    shapes_ok: bool
    count_ok: bool
    relation_ok: Optional[bool]
    clean: bool = True
    noise_area: float = 0.0
    detected: List[Detected] = field(default_factory=list)


@dataclass
class JudgeConfig:
    color_tol: float = 75.0
    min_area: float = 10.0
    max_noise: float = 12.0
    tri_asym: float = 0.035
    tri_fill: float = 0.6
    square_fill: float = 0.87


def _as_images(images) -> torch.Tensor:
    """(B, 3, H, W) float in [-1, 1] from a tensor (B, 3, H, W) / (3, H, W) in [-1, 1] (float) or
    0..255 (uint8), a PIL image, or a list of PIL images."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        Image = None
    if Image is not None and isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)):
        import numpy as np

        if not images:
            raise ValueError("taca.mini: images is an empty list")
        arr = np.stack([np.asarray(im.convert("RGB")) for im in images])
        images = torch.from_numpy(arr).permute(0, 3, 1, 2)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"taca.mini: images must be a tensor, a PIL image or a list of them, got {type(images).__name__}")
    if images.dim() == 3:
        images = images[None]
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"taca.mini: images must be (B, 3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1
    return images.float()


def _components(lab: torch.Tensor) -> torch.Tensor:
    """4-connected components of equal positive labels. lab: (B, H, W) long, 0 = none.
    Returns (B, H, W) long component ids (max flat pixel index + 1 in the component), 0 = none."""
    B, H, W = lab.shape
    ids = torch.arange(1, H * W + 1, device=lab.device).view(1, H, W).expand(B, H, W)
    comp = torch.where(lab > 0, ids, torch.zeros_like(ids))
    same_r = (lab[:, :, 1:] == lab[:, :, :-1]) & (lab[:, :, 1:] > 0)  # (B, H, W-1)
    same_d = (lab[:, 1:, :] == lab[:, :-1, :]) & (lab[:, 1:, :] > 0)  # (B, H-1, W)
    for _ in range(H * W):
        new = comp.clone()
        new[:, :, 1:] = torch.where(same_r, torch.maximum(new[:, :, 1:], comp[:, :, :-1]), new[:, :, 1:])
        new[:, :, :-1] = torch.where(same_r, torch.maximum(new[:, :, :-1], comp[:, :, 1:]), new[:, :, :-1])
        new[:, 1:, :] = torch.where(same_d, torch.maximum(new[:, 1:, :], comp[:, :-1, :]), new[:, 1:, :])
        new[:, :-1, :] = torch.where(same_d, torch.maximum(new[:, :-1, :], comp[:, 1:, :]), new[:, :-1, :])
        if torch.equal(new, comp):
            break
        comp = new
    return comp


def detect(images, config: Optional[JudgeConfig] = None) -> List[List[Detected]]:
    """Objects in each image. images: (B, 3, H, W) in [-1, 1] (or see ``judge``). Returns B lists."""
    return _detect(images, config or JudgeConfig())[0]


def _detect(images, cfg: JudgeConfig):
    """(B lists of objects, B noise areas)."""
    x = _as_images(images)
    B, _, H, W = x.shape
    dev = x.device
    rgb = (x.clamp(-1, 1) + 1) * 127.5  # (B, 3, H, W) in 0..255
    pal = (D.palette_tensor(dev) + 1) * 127.5  # (K, 3)
    bg = (D.background_tensor(dev) + 1) * 127.5  # (3,)
    K = pal.shape[0]
    dist = torch.cdist(rgb.permute(0, 2, 3, 1).reshape(1, -1, 3), torch.cat([pal, bg[None]])[None])[0]
    dmin, near = dist.min(dim=1)
    near = near.view(B, H, W)
    colored = (near < K) & (dmin.view(B, H, W) <= cfg.color_tol)
    lab = torch.where(colored, near + 1, torch.zeros_like(near))
    comp = _components(lab)  # (B, H, W)
    # one-pixel ring: unlabeled pixels take an 8-neighbour's component (the largest id if several)
    padded = torch.nn.functional.pad(comp[:, None].float(), (1, 1, 1, 1))
    grown = torch.nn.functional.max_pool2d(padded, 3, stride=1)[:, 0].long()
    full = torch.where(comp > 0, comp, grown)
    has = full > 0
    # the component id is its largest flat pixel index + 1: that pixel's label is its color
    color_of = lab.view(B, -1).gather(1, (full - 1).clamp(min=0).view(B, -1)).view(B, H, W) * has  # 1..K, 0 = none
    # soft coverage: projection onto (color - background)
    cvec = pal[(color_of - 1).clamp(min=0)] - bg  # (B, H, W, 3)
    pv = rgb.permute(0, 2, 3, 1) - bg
    alpha = ((pv * cvec).sum(-1) / (cvec * cvec).sum(-1).clamp(min=1e-6)).clamp(0, 1)
    alpha = torch.where(comp > 0, alpha.clamp(min=0.5), alpha) * has
    # compact component index over the batch
    key = torch.arange(B, device=dev)[:, None, None] * (H * W + 1) + full
    keys, inv = torch.unique(key[has], return_inverse=True)
    n = keys.numel()
    out: List[List[Detected]] = [[] for _ in range(B)]
    noise = [0.0] * B
    if n == 0:
        return out, noise
    ys, xs = torch.meshgrid(torch.arange(H, device=dev, dtype=torch.float32) + 0.5,
                            torch.arange(W, device=dev, dtype=torch.float32) + 0.5, indexing="ij")
    a = alpha[has]
    px = xs.expand(B, H, W)[has]
    py = ys.expand(B, H, W)[has]
    z = torch.zeros(n, device=dev)
    area = z.index_add(0, inv, a)
    cx = z.index_add(0, inv, a * px) / area.clamp(min=1e-6)
    cy = z.index_add(0, inv, a * py) / area.clamp(min=1e-6)
    col_idx = inv * W + px.long()
    row_idx = inv * H + py.long()
    colmax = torch.zeros(n * W, device=dev).scatter_reduce(0, col_idx, a, "amax", include_self=True).view(n, W)
    rowmax = torch.zeros(n * H, device=dev).scatter_reduce(0, row_idx, a, "amax", include_self=True).view(n, H)
    w = colmax.sum(1)
    h = rowmax.sum(1)
    prof_c = (rowmax * ys[:, 0]).sum(1) / h.clamp(min=1e-6)
    fill = area / (w * h).clamp(min=1e-6)
    asym = (cy - prof_c) / h.clamp(min=1e-6)
    ccode = torch.zeros(n, dtype=torch.long, device=dev).scatter_reduce(
        0, inv, color_of[has], "amax", include_self=True)
    shape = torch.where((asym > cfg.tri_asym) | (fill < cfg.tri_fill), 2,
                        torch.where(fill > cfg.square_fill, 1, 0))
    b_of = (keys // (H * W + 1)).tolist()
    rows = torch.stack([area, cx, cy, fill, asym], 1).tolist()
    for i, (b, c, s, (ar, x_, y_, f, asy)) in enumerate(zip(b_of, ccode.tolist(), shape.tolist(), rows)):
        if c == 0:
            continue
        if ar < cfg.min_area:
            noise[b] += ar
            continue
        out[b].append(Detected(D.COLORS[c - 1], D.SHAPES[s], x_, y_, ar, f, asy))
    return out, noise


def _relation_holds(a: Detected, b: Detected, relation: str) -> bool:
    dx, dy = b.x - a.x, b.y - a.y
    if relation in ("left", "right"):
        return abs(dx) > abs(dy) and (dx > 0 if relation == "left" else dx < 0)
    return abs(dy) > abs(dx) and (dy > 0 if relation == "above" else dy < 0)


def score(spec: Union[D.Spec, str], detected: List[Detected], noise_area: float = 0.0,
          config: Optional[JudgeConfig] = None) -> Verdict:
    """The verdict for one caption (or spec) given the objects detected in its image and the
    area of the specks too small to be objects."""
    cfg = config or JudgeConfig()
    caption = spec if isinstance(spec, str) else spec.caption()
    sp = D.parse_caption(spec) if isinstance(spec, str) else spec
    want = Counter(sp.objects())
    got = Counter((d.color, d.shape) for d in detected)
    objects_ok = want == got
    colors_ok = Counter(c for c, _ in want.elements()) == Counter(d.color for d in detected)
    shapes_ok = Counter(s for _, s in want.elements()) == Counter(d.shape for d in detected)
    count_ok = sum(want.values()) == len(detected)
    relation_ok = None
    if sp.relation is not None:
        g0, g1 = sp.groups[0], sp.groups[1]
        a = [d for d in detected if (d.color, d.shape) == (g0.color, g0.shape)]
        b = [d for d in detected if (d.color, d.shape) == (g1.color, g1.shape)]
        relation_ok = len(a) == 1 and len(b) == 1 and _relation_holds(a[0], b[0], sp.relation)
    clean = noise_area <= cfg.max_noise
    ok = objects_ok and relation_ok is not False and clean
    return Verdict(caption, sp.category, ok, objects_ok, colors_ok, shapes_ok, count_ok, relation_ok, clean,
                   noise_area, detected)


def judge(images, captions: Union[str, Sequence[str]], config: Optional[JudgeConfig] = None) -> List[Verdict]:
    """Score images against captions.

    images: (B, 3, H, W) float in [-1, 1] or uint8 0..255 (tensor, any device), a PIL image, or a
    list of B PIL images. captions: B captions of ``taca.mini.data``'s grammar (or one str).
    Returns B ``Verdict``s.
    """
    caps = [captions] if isinstance(captions, str) else list(captions)
    specs = [D.parse_caption(c) for c in caps]
    cfg = config or JudgeConfig()
    found, noise = _detect(images, cfg)
    if len(found) != len(specs):
        raise ValueError(f"taca.mini: {len(found)} images but {len(specs)} captions")
    return [score(s, f, z, cfg) for s, f, z in zip(specs, found, noise)]


def wilson(successes: int, n: int, z: float = 1.959963984540054) -> Tuple[float, float]:
    """Wilson score interval (lo, hi) for a binomial proportion (95% for the default z)."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"taca.mini: need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - half), min(1.0, c + half))


def accuracy(verdicts: Sequence[Verdict], field_name: str = "ok") -> Dict[str, Dict[str, float]]:
    """Per-category accuracy of ``field_name`` with Wilson 95% intervals, plus "all".
    Returns {category: {"acc", "lo", "hi", "n"}} (verdicts whose field is None are skipped)."""
    groups: Dict[str, List[bool]] = {}
    for v in verdicts:
        val = getattr(v, field_name)
        if val is None:
            continue
        groups.setdefault(v.category, []).append(bool(val))
        groups.setdefault("all", []).append(bool(val))
    out = {}
    for cat, vals in groups.items():
        k, n = sum(vals), len(vals)
        lo, hi = wilson(k, n)
        out[cat] = {"acc": k / n, "lo": lo, "hi": hi, "n": n}
    return out
