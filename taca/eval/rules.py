"""T2I-CompBench's scoring arithmetic, as pure functions (no models, no files).

Each function re-implements one formula of the official scripts (Karine-Huang/T2I-CompBench at
commit 1b70949) including its quirks, which are part of the benchmark's definition; the quirks are
named in the docstrings. Boxes are ``[x0, y0, x1, y1]`` in the detector's input pixel frame
(UniDet: the image resized to a short side of 479 px, long side at most 480).

Where the official script would raise (an empty box union, a numeracy prompt without a target) we
return the value a user would expect and say so in the function's notes, since a crash gives no
score to be faithful to.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

Box = Sequence[float]

# Relation lists in the official order: the first one found in the prompt wins.
SPATIAL_2D_RELATIONS: Tuple[str, ...] = (
    "on side of", "next to", "near", "on the left of", "on the right of", "on the bottom of", "on the top of",
    "on top of",
)
SPATIAL_3D_RELATIONS: Tuple[str, ...] = ("in front of", "behind", "hidden")
# Prepositions of the `--complex` object extraction of 2D_spatial_eval.py.
COMPLEX_PREPOSITIONS: Tuple[str, ...] = (
    "on top of", "on bottom of", "on the left", "on the right", "next to", "on side of", "near",
)
PERSON_WORDS: Tuple[str, ...] = ("girl", "boy", "man", "woman")
NUMBER_WORDS: Tuple[str, ...] = ("a", "an", "one", "two", "three", "four", "five", "six", "seven", "eight")
_W2N = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8}
NUMERACY_SYNONYMS: Dict[str, str] = {
    "boy": "person", "girl": "person", "man": "person", "woman": "person",
    "ship": "boat", "telivision": "tv", "goldfish": "fish", "painting": "picture",
}


def find_relation(prompt: str, relations: Sequence[str]) -> Optional[str]:
    """The first relation of ``relations`` (in list order, not prompt order) that occurs in the
    prompt as a substring, or None (then the position term is 0)."""
    for r in relations:
        if r in prompt:
            return r
    return None


def box_iou_2d(box1: Box, box2: Box) -> float:
    """IoU without the +1-pixel convention, as ``determine_position``. An empty union (two
    zero-area boxes; the official script raises ZeroDivisionError) gives 0."""
    xo = max(0.0, min(box1[2], box2[2]) - max(box1[0], box2[0]))
    yo = max(0.0, min(box1[3], box2[3]) - max(box1[1], box2[1]))
    inter = xo * yo
    a1 = (box1[2] - box1[0]) * (box1[3] - box1[1])
    a2 = (box2[2] - box2[0]) * (box2[3] - box2[1])
    union = a1 + a2 - inter
    return inter / union if union != 0 else 0.0


def _centers_delta(box1: Box, box2: Box) -> Tuple[float, float]:
    c1 = ((box1[0] + box1[2]) / 2, (box1[1] + box1[3]) / 2)
    c2 = ((box2[0] + box2[2]) / 2, (box2[1] + box2[3]) / 2)
    return c2[0] - c1[0], c2[1] - c1[1]


def position_score_2d(relation: Optional[str], box1: Box, box2: Box, iou_threshold: float = 0.1,
                      distance_threshold: float = 150.0) -> float:
    """``determine_position`` of 2D_spatial_eval.py. box1 is the first object of the prompt, box2
    the last; dx, dy = center2 - center1 (image y grows downwards, so "on the top of" wants box2
    below box1's center... i.e. dy > 0, exactly as the official code has it).

    - near / next to / on side of: 1 if |dx| < 150 or |dy| < 150, else 150 / max(|dx|, |dy|);
    - on the left of: dx > 0 and |dx| > |dy|: 1 if IoU < 0.1 else 0.1 / IoU; otherwise 0;
      on the right of: the same with dx < 0;
    - on the top of: dy > 0 and |dy| > |dx| (same IoU rule); on the bottom of: dy < 0;
    - anything else ("on top of", no relation): 0.
    """
    dx, dy = _centers_delta(box1, box2)
    iou = box_iou_2d(box1, box2)
    if relation in ("next to", "on side of", "near"):
        if abs(dx) < distance_threshold or abs(dy) < distance_threshold:
            return 1.0
        return distance_threshold / max(abs(dx), abs(dy))
    directional = {
        "on the right of": (dx < 0, abs(dx) > abs(dy)),
        "on the left of": (dx > 0, abs(dx) > abs(dy)),
        "on the bottom of": (dy < 0, abs(dy) > abs(dx)),
        "on the top of": (dy > 0, abs(dy) > abs(dx)),
    }
    if relation in directional:
        sign_ok, dominant = directional[relation]
        if sign_ok and dominant:
            return 1.0 if iou < iou_threshold else iou_threshold / iou
        return 0.0
    return 0.0


def mean_depth_transposed(depth: np.ndarray, box: Box) -> float:
    """Mean of ``depth[int(x0):int(x1), int(y0):int(y1)]``: the official 3D script indexes the
    (H, W) depth map with x first (a transposition kept for parity). An empty slice gives NaN,
    which then fails every comparison (score 0), as torch's mean of an empty tensor does."""
    sl = depth[int(box[0]):int(box[2]), int(box[1]):int(box[3])]
    if sl.size == 0:
        return float("nan")
    return float(np.asarray(sl, dtype=np.float32).mean(dtype=np.float32))


def position_score_3d(relation: Optional[str], box1: Box, box2: Box, depth: np.ndarray,
                      iou_threshold_3d: float = 0.5) -> Tuple[float, Optional[float]]:
    """The 3D branch of ``determine_position`` in 3D_spatial_eval.py.

    depth: (H, W) float map in [0, 1], larger = nearer (MiDaS inverse depth), in the boxes' frame.
    diff = mean depth of box1 - mean depth of box2 (transposed indexing, see
    :func:`mean_depth_transposed`). "in front of" wants diff > 0, "behind" / "hidden" diff < 0:
    IoU > 0.5 → 1; 0 < IoU < 0.5 → IoU / 0.5; IoU == 0 or exactly 0.5 → 0. Returns (score, diff).
    """
    if relation not in SPATIAL_3D_RELATIONS:
        return 0.0, None
    iou = box_iou_2d(box1, box2)
    diff = mean_depth_transposed(depth, box1) - mean_depth_transposed(depth, box2)
    ok = diff > 0 if relation == "in front of" else diff < 0
    if iou > iou_threshold_3d:
        return (1.0 if ok else 0.0), diff
    if 0 < iou < iou_threshold_3d:
        return (iou / iou_threshold_3d if ok else 0.0), diff
    return 0.0, diff


@dataclass
class Detections:
    """One image's detections, in the detector's order (UniDet/detectron2: descending score)."""
    labels: List[str]
    boxes: List[List[float]]
    scores: List[float]

    def __post_init__(self):
        if not (len(self.labels) == len(self.boxes) == len(self.scores)):
            raise ValueError(f"labels, boxes and scores have different lengths "
                             f"({len(self.labels)}, {len(self.boxes)}, {len(self.scores)})")


def person(word: Optional[str]) -> Optional[str]:
    """girl/boy/man/woman → person (the detector's class), else the word itself."""
    return "person" if word in PERSON_WORDS else word


@dataclass
class SpatialResult:
    score: float
    relation: Optional[str]
    obj1: Optional[str]
    obj2: Optional[str]
    idx1: Optional[int] = None
    idx2: Optional[int] = None
    position: Optional[float] = None
    depth_diff: Optional[float] = None
    notes: List[str] = field(default_factory=list)


def spatial2d_score(prompt: str, obj1: Optional[str], obj2: Optional[str], det: Detections) -> SpatialResult:
    """Image score of 2D_spatial_eval.py.

    obj1, obj2: the prompt's first and last NOUN (or, with ``--complex``, the two objects around
    the preposition; None when that extraction did not find exactly two). Labels match by
    **exact** equality (``obj.index``: the first, i.e. highest-scoring, detection).
    score = 0.25 s1 + 0.25 s2 + 0.5 pos with both found, 0.25 s_i with one, 0 with none; then
    **score < 0.5 → 0** (so one object alone never scores).
    """
    relation = find_relation(prompt, SPATIAL_2D_RELATIONS)
    o1, o2 = person(obj1), person(obj2)
    i1 = det.labels.index(o1) if o1 in det.labels else None
    i2 = det.labels.index(o2) if o2 in det.labels else None
    res = SpatialResult(0.0, relation, o1, o2, i1, i2)
    if i1 is not None and i2 is not None:
        res.position = position_score_2d(relation, det.boxes[i1], det.boxes[i2])
        score = 0.25 * det.scores[i1] + 0.25 * det.scores[i2] + res.position / 2
    elif i1 is not None:
        score = 0.25 * det.scores[i1]
    elif i2 is not None:
        score = 0.25 * det.scores[i2]
    else:
        score = 0.0
    res.score = 0.0 if score < 0.5 else score
    return res


def spatial3d_score(prompt: str, obj1: Optional[str], obj2: Optional[str], det: Detections,
                    depth: np.ndarray) -> SpatialResult:
    """Image score of 3D_spatial_eval.py (no 0.5 cut-off).

    Objects match by **substring**: first ``obj in " ".join(labels)``, then the index loop of the
    official script, which keeps overwriting obj1's index until both objects have been seen (so
    with labels [dog, dog, cat] and objects dog, cat, dog's index is 1, not 0).
    depth: (H, W) map in the boxes' frame, see :func:`position_score_3d`.
    """
    relation = find_relation(prompt, SPATIAL_3D_RELATIONS)
    o1, o2 = person(obj1), person(obj2)
    joined = " ".join(det.labels)
    found1 = o1 is not None and o1 in joined
    found2 = o2 is not None and o2 in joined
    res = SpatialResult(0.0, relation, o1, o2)
    if found1 and found2:
        i1 = i2 = None
        for i, lab in enumerate(det.labels):
            if o1 in lab:
                i1 = i
            if o2 in lab:
                i2 = i
            if i1 is not None and i2 is not None:
                break
        if i1 is None or i2 is None:  # matched only across the join's space; the official script raises
            res.notes.append("object matched only across two joined labels (official script raises)")
            return res
        res.idx1, res.idx2 = i1, i2
        res.position, res.depth_diff = position_score_3d(relation, det.boxes[i1], det.boxes[i2], depth)
        res.score = 0.25 * det.scores[i1] + 0.25 * det.scores[i2] + res.position / 2
    elif found1 or found2:
        o = o1 if found1 else o2
        i = next((k for k, lab in enumerate(det.labels) if o in lab), None)
        if i is None:
            res.notes.append("object matched only across two joined labels (official script raises)")
            return res
        if found1:
            res.idx1 = i
        else:
            res.idx2 = i
        res.score = 0.25 * det.scores[i]
    return res


def numeracy_duplicate(box1: Box, box2: Box) -> bool:
    """``calculate_iou`` of numeracy_eval.py: +1-pixel areas; duplicates when IoU > 0.9 or the
    intersection covers > 0.9 of either box."""
    ix = max(0.0, min(box1[2], box2[2]) - max(box1[0], box2[0]) + 1)
    iy = max(0.0, min(box1[3], box2[3]) - max(box1[1], box2[1]) + 1)
    inter = ix * iy
    a1 = (box1[2] - box1[0] + 1) * (box1[3] - box1[1] + 1)
    a2 = (box2[2] - box2[0] + 1) * (box2[3] - box2[1] + 1)
    iou = inter / float(a1 + a2 - inter)
    return iou > 0.9 or inter / float(a1) > 0.9 or inter / float(a2) > 0.9


def merge_duplicates(det: Detections) -> Tuple[List[str], List[List[float]]]:
    """Numeracy's de-duplication: a detection is dropped when a kept detection of the same label
    is its duplicate (:func:`numeracy_duplicate`). Returns (labels, boxes) kept, in order."""
    labels: List[str] = []
    boxes: List[List[float]] = []
    for lab, box in zip(det.labels, det.boxes):
        if not any(numeracy_duplicate(box, kb) and lab == kl for kl, kb in zip(labels, boxes)):
            labels.append(lab)
            boxes.append(list(box))
    return labels, boxes


def load_objects(lines: Sequence[str]) -> Tuple[List[str], List[str]]:
    """``new_objects.txt`` lines "singular - plural" → (singulars, plurals), lower-cased."""
    s, p = [], []
    for line in lines:
        if not line.strip():
            continue
        a, b = line.split(" - ")[:2]
        s.append(a.strip().lower())
        p.append(b.strip().lower())
    return s, p


def _w2n(word: str) -> Optional[int]:
    # word2number's word_to_num on the official number list: "a"/"an" raise (caught and skipped).
    return _W2N.get(word)


def numeracy_targets(tokens: Sequence[str], singulars: Sequence[str], plurals: Sequence[str]
                     ) -> Tuple[List[str], List[int]]:
    """The official target parsing of numeracy_eval.py over the prompt's tokens.

    A number word (a, an, one..eight) followed by a 2-token object (checked first) or a 1-token
    object of new_objects.txt. Plural objects after two..eight become (singular, n); after
    a/an/one the 2-token object is kept as written with count 1. Quirk kept: for "a"/"an" before a
    plural 1-token object the count is not appended (word2number raises, the script passes), so
    the counts list can be shorter than and misaligned with the objects list.
    Returns (objects, counts).
    """
    objs: List[str] = []
    nums: List[int] = []
    n = len(tokens)
    for i, tok in enumerate(tokens):
        if tok not in NUMBER_WORDS or i + 1 >= n:
            continue
        two = tokens[i + 1] + " " + tokens[i + 2] if i < n - 2 else None
        if two is not None and (two in singulars or two in plurals):
            if two in plurals and tok not in ("a", "an", "one"):
                objs.append(singulars[plurals.index(two)])
                v = _w2n(tok)
                if v is not None:
                    nums.append(v)
            else:
                nums.append(1)
                objs.append(two)
        elif tokens[i + 1] in singulars or tokens[i + 1] in plurals:
            one = tokens[i + 1]
            if one in singulars and tok in ("a", "an", "one"):
                nums.append(1)
                objs.append(one)
            else:
                # the official script looks the word up among the plurals (a singular after
                # two..eight raises ValueError there; we keep the word itself)
                objs.append(singulars[plurals.index(one)] if one in plurals else one)
                v = _w2n(tok)
                if v is not None:
                    nums.append(v)
    return objs, nums


@dataclass
class NumeracyResult:
    score: float
    targets: List[str]
    counts: List[int]
    kept_labels: List[str]
    per_target: List[Dict[str, object]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


def numeracy_score(targets: Sequence[str], counts: Sequence[int], det: Detections) -> NumeracyResult:
    """Image score of numeracy_eval.py: sum_i (1/K) (0.5 [present_i] + 0.5 [count_i == n_i]).

    Duplicates are merged first (:func:`merge_duplicates`); targets get the synonyms (boy/girl/man/
    woman → person, ship → boat, telivision → tv, goldfish → fish, painting → picture); a target
    that is no kept label renames, in place, every kept label containing it as a substring (the
    renames persist for later targets). No targets (the official script divides by zero) → 0.
    """
    labels, _ = merge_duplicates(det)
    res = NumeracyResult(0.0, list(targets), list(counts), list(labels))
    if not targets:
        res.notes.append("no numeracy target parsed from the prompt (the official script raises ZeroDivisionError)")
        return res
    w = 1.0 / len(targets)
    score = 0.0
    for i, t in enumerate(targets):
        t = NUMERACY_SYNONYMS.get(t, t)
        if t not in labels:
            for j, lab in enumerate(labels):
                if t in lab:
                    labels[j] = t
        entry: Dict[str, object] = {"object": t, "present": t in labels}
        if t in labels:
            score += 0.5 * w
            n_det = labels.count(t)
            want = counts[i] if i < len(counts) else None
            entry.update(detected=n_det, wanted=want)
            if want is None:
                res.notes.append(f"no count for target {i} (official script raises IndexError)")
            elif n_det == want:
                score += 0.5 * w
        res.per_target.append(entry)
    res.kept_labels = labels
    res.score = score
    return res


def round4(x: float) -> float:
    """``float('{:.4f}'.format(x))``: the official scripts' rounding."""
    return float("{:.4f}".format(x))


def blip_image_score(answers: Sequence[Optional[float]], np_num: int = 8) -> str:
    """Image score of BLIP_vqa.py from the per-question P(yes) / (P(yes) + P(no)) values.

    answers: one value per noun phrase (None for a question slot without a phrase, up to np_num;
    missing slots score 1). Each value is first written as '{:.4f}', read back and stored in a
    float32 tensor, multiplied left to right in float32, and the product is written as '{:.4f}'.
    Returns that string (the official ``answer`` field).
    """
    vals = list(answers)[:np_num] + [None] * max(0, np_num - len(answers))
    prod = np.float32(1.0)
    first = True
    for v in vals:
        f = np.float32(1.0) if v is None else np.float32(round4(float(v)))
        prod = f if first else np.float32(prod * f)
        first = False
    return "{:.4f}".format(float(prod))


def three_in_one(prompt: str, blip: float, spatial: float, clip: float, spatial_prompts: Sequence[str],
                 action_prompts: Sequence[str]) -> Tuple[float, str]:
    """3_in_1.py for one image. Prompts are compared after ``.split('.')[0].lower()``.

    In complex_val_spatial: (B-VQA + UniDet) / 2; else in complex_val_action: (B-VQA + CLIP) / 2;
    else (B-VQA + UniDet + CLIP) / 3. Returns (score, branch).
    """
    key = normalise_3in1(prompt)
    if key in {normalise_3in1(p) for p in spatial_prompts}:
        return (spatial + blip) * 0.5, "spatial"
    if key in {normalise_3in1(p) for p in action_prompts}:
        return (clip + blip) * 0.5, "action"
    return (blip + spatial + clip) / 3, "spatial+action"


def normalise_3in1(line: str) -> str:
    return line.strip("\n").split(".")[0].lower()
