"""``taca eval score METRIC RUN/<category>``: the official metrics, the official result files.

Every metric writes, in the folder where the official script writes its ``vqa_result.json``:

- ``vqa_result.json``: ``[{"question_id": i, "answer": ...}]`` exactly as the official script
  (B-VQA answers are '{:.4f}' strings, the others floats);
- ``score.json``: category, metric, mean, n_images, official (true only when every part of the
  computation is the official one; ``deviations`` lists what is not), the scorer weights' sha256,
  the parser, the prompt-file hash of the run;
- ``details.jsonl``: one line per image (questions and per-question values, matched boxes, ...).

Existing results are never overwritten: without ``--overwrite`` a folder that already holds a
``score.json`` or ``vqa_result.json`` is refused before any model is loaded.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import layout, rules
from .generate import UsageError

METRICS = ("blip-vqa", "clip", "spatial2d", "spatial3d", "numeracy", "three-in-one")
# metric -> (result folder relative to RUN/<category>, categories it scores)
OUTPUT_DIRS: Dict[str, str] = {
    "blip-vqa": "annotation_blip",
    "clip": "annotation_clip",
    "spatial2d": os.path.join("labels", "annotation_obj_detection_2d"),
    "spatial3d": os.path.join("labels", "annotation_obj_detection_3d"),
    "numeracy": "annotation_num",
    "three-in-one": "annotation_3_in_1",
}
METRIC_CATEGORIES: Dict[str, Tuple[str, ...]] = {
    "blip-vqa": ("color", "shape", "texture", "complex"),
    "clip": ("non_spatial", "complex"),
    "spatial2d": ("spatial", "complex"),
    "spatial3d": ("3d_spatial",),
    "numeracy": ("numeracy",),
    "three-in-one": ("complex",),
}


@dataclass
class ScoreOptions:
    metric: str
    category_dir: str
    category: Optional[str] = None          # default: the folder's name
    complex: Optional[bool] = None          # default: category == "complex"
    overwrite: bool = False
    blip: Optional[str] = None
    clip: Optional[str] = None
    detections: Optional[str] = None
    depth: Optional[str] = None
    detector: Optional[str] = None
    parser: str = "auto"
    prompts_dir: Optional[str] = None
    device: Optional[str] = None
    batch_size: int = 32
    np_num: int = 8
    image_size: Optional[int] = None
    clip_dtype: Optional[str] = None
    progress: bool = True


@dataclass
class Result:
    answers: List[Dict[str, Any]]                  # the official vqa_result.json
    values: List[float]                            # per image, for the mean
    details: List[Dict[str, Any]]
    deviations: List[str] = field(default_factory=list)
    models: Dict[str, Any] = field(default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict)


def _err(arg: str, msg: str) -> UsageError:
    return UsageError(f"taca eval score: argument {arg}: {msg}")


def output_dir(opts: ScoreOptions) -> str:
    return os.path.join(opts.category_dir, OUTPUT_DIRS[opts.metric])


def validate(opts: ScoreOptions) -> Tuple[str, List[layout.Sample]]:
    """Cheap checks before any model is loaded. Returns (category, samples)."""
    if opts.metric not in METRICS:
        raise _err("METRIC", f"{opts.metric!r} is not one of {', '.join(METRICS)}")
    try:
        samples = layout.list_samples(opts.category_dir, "RUN/<category>")
    except layout.LayoutError as e:
        raise UsageError(str(e).replace("taca eval:", "taca eval score:")) from None
    cat = opts.category or layout.category_of(opts.category_dir)
    if cat is None:
        raise _err("RUN/<category>", f"the folder name {os.path.basename(os.path.normpath(opts.category_dir))!r} is "
                   f"not a T2I-CompBench category ({', '.join(layout.CATEGORIES)}); rename it or pass --category")
    if cat not in layout.CATEGORIES:
        raise _err("--category", f"{cat!r} is not one of {', '.join(layout.CATEGORIES)}")
    if cat not in METRIC_CATEGORIES[opts.metric]:
        raise _err("METRIC", f"{opts.metric} scores the categories {', '.join(METRIC_CATEGORIES[opts.metric])}, "
                   f"not {cat} (the benchmark's metric for {cat} is {PRIMARY_METRIC[cat]})")
    if opts.complex is None:
        opts.complex = cat == "complex"
    elif opts.complex and cat != "complex":
        raise _err("--complex", f"is for the complex category's 3-in-1 parts, not {cat}")
    out = output_dir(opts)
    existing = [f for f in ("score.json", "vqa_result.json", "details.jsonl") if os.path.isfile(os.path.join(out, f))]
    if existing and not opts.overwrite:
        raise _err("--overwrite", f"{out} already holds {', '.join(existing)}; they are kept. Pass --overwrite to "
                   f"replace them, or move them away")
    if opts.prompts_dir is not None and not os.path.isdir(opts.prompts_dir):
        raise _err("--prompts", f"{opts.prompts_dir} is not a folder")
    if opts.metric in ("spatial2d", "spatial3d", "numeracy"):
        if not opts.detections:
            raise _err("--detections", f"{opts.metric} needs the detector's output as JSONL (one line per image: "
                       '{"image": NAME, "labels": [...], "boxes": [[x0, y0, x1, y1], ...], "scores": [...]})')
        if not os.path.isfile(opts.detections):
            raise _err("--detections", f"{opts.detections} does not exist")
    if opts.metric == "spatial3d":
        d = opts.depth or default_depth_dir(opts.category_dir, cat)
        if not os.path.isdir(d):
            raise _err("--depth", f"{d} does not exist; spatial3d needs one 8-bit depth map per image "
                       f"(<image name>.png, larger = nearer, as the official MiDaS step writes them under "
                       f"labels/depth/<category>/samples/)")
        opts.depth = d
    if opts.batch_size < 1 or opts.np_num < 1:
        raise _err("--batch-size/--np-num", "must be >= 1")
    return cat, samples


PRIMARY_METRIC = {"color": "blip-vqa", "shape": "blip-vqa", "texture": "blip-vqa", "spatial": "spatial2d",
                  "non_spatial": "clip", "complex": "three-in-one", "3d_spatial": "spatial3d",
                  "numeracy": "numeracy"}


def default_depth_dir(category_dir: str, category: str) -> str:
    return os.path.join(category_dir, "labels", "depth", os.path.basename(os.path.normpath(category_dir)), "samples")


def load_detections(path: str, samples: Sequence[layout.Sample]) -> Dict[str, rules.Detections]:
    """Parse and check the detections JSONL against the samples (every error names the line)."""
    names = {s.name for s in samples}
    out: Dict[str, rules.Detections] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {n}"
            try:
                row = json.loads(line)
            except ValueError as e:
                raise _err("--detections", f"{where} is not JSON ({e})") from None
            if not isinstance(row, dict) or not {"image", "labels", "boxes", "scores"} <= set(row):
                raise _err("--detections", f"{where} needs the keys image, labels, boxes, scores")
            name = os.path.basename(str(row["image"]))
            if name not in names:
                raise _err("--detections", f"{where} is for {name!r}, which is not an image of "
                           f"{os.path.dirname(samples[0].path)}")
            if name in out:
                raise _err("--detections", f"{where}: a second line for {name!r}")
            try:
                boxes = [[float(v) for v in b] for b in row["boxes"]]
                det = rules.Detections([str(x) for x in row["labels"]], boxes, [float(s) for s in row["scores"]])
            except (TypeError, ValueError) as e:
                raise _err("--detections", f"{where}: {e}") from None
            if any(len(b) != 4 for b in boxes):
                raise _err("--detections", f"{where}: every box must be [x0, y0, x1, y1]")
            out[name] = det
    missing = sorted(names - set(out))
    if missing:
        raise _err("--detections", f"{path} has no line for {len(missing)} image(s), e.g. {missing[0]!r} (write a "
                   f'line with empty lists for an image without detections)')
    return out


def load_depth(depth_dir: str, sample: layout.Sample, frame_size: Optional[Tuple[int, int]]):
    """An 8-bit depth map → (H, W) float32 / 255 in the detector frame: resized like the image
    (short side 479, long side <= 480, bilinear) unless it already has that size."""
    from PIL import Image

    p = os.path.join(depth_dir, sample.name)
    if not os.path.isfile(p):
        raise _err("--depth", f"{p} does not exist (one depth map per image, same file name)")
    im = Image.open(p).convert("L")
    size = frame_size or unidet_frame(im.size)
    if im.size != size:
        im = im.resize(size, Image.BILINEAR)
    import numpy as np

    return np.asarray(im, dtype=np.float32) / 255.0


def unidet_frame(size: Tuple[int, int], short: int = 479, max_size: int = 480) -> Tuple[int, int]:
    """(W, H) of torchvision's Resize(479, max_size=480) for an image of size (W, H)."""
    w, h = size
    s, l = (w, h) if w <= h else (h, w)
    ns, nl = short, int(short * l / s)
    if nl > max_size:
        ns, nl = int(max_size * ns / nl), max_size
    return (ns, nl) if w <= h else (nl, ns)


# metrics ---------------------------------------------------------------------------------------
def _images(samples):
    from PIL import Image

    for s in samples:
        with Image.open(s.path) as im:
            yield s, im.convert("RGB")


def _device(opts: ScoreOptions) -> str:
    if opts.device:
        return opts.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _bar(opts, total, desc):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not opts.progress)


def score_blip(opts: ScoreOptions, samples, parser) -> Result:
    from .models import BlipVQA, weights_sha256
    from .parse import blip_questions, pre_question

    model = BlipVQA(opts.blip, _device(opts), opts.image_size)
    qs = {s.index: blip_questions(parser, s.prompt) for s in samples}
    answers: Dict[int, List[Optional[float]]] = {}
    bar = _bar(opts, len(samples), "taca eval score blip-vqa")
    for k in range(0, len(samples), opts.batch_size):
        chunk = list(_images(samples[k:k + opts.batch_size]))
        emb = model.image_embeds(model.pixel_values([im for _, im in chunk]))
        pairs = [(b, j, pre_question(q)) for b, (s, _) in enumerate(chunk)
                 for j, q in enumerate(qs[s.index][:opts.np_num])]
        probs = model.yes_prob(emb[[b for b, _, _ in pairs]], [q for _, _, q in pairs]) if pairs else []
        for b, (s, _) in enumerate(chunk):
            answers[s.index] = [None] * min(len(qs[s.index]), opts.np_num)
        for (b, j, _), p in zip(pairs, probs):
            answers[chunk[b][0].index][j] = float(p)
        bar.update(len(chunk))
    bar.close()
    res = Result([], [], [], list(model.deviations))
    for qid, s in enumerate(samples):  # question_id = position in the sorted listing (BLIP_vqa.py's cnt)
        a = rules.blip_image_score(answers[s.index], opts.np_num)
        res.answers.append({"question_id": qid, "answer": a})
        res.values.append(float(a))
        res.details.append({"question_id": qid, "image": s.name, "prompt": s.prompt, "questions": qs[s.index],
                            "p_yes": answers[s.index], "rounded": [rules.round4(v) for v in answers[s.index]],
                            "answer": a})
    res.models["blip"] = {"path": os.path.abspath(model.folder), "sha256": weights_sha256(model.folder),
                          "image_size": model.image_size, "interpolate_pos_encoding": model.interpolate,
                          "token_ids": {"yes": model.yes_id, "no": model.no_id, "bos": model.bos_id,
                                        "enc": model.enc_id}}
    return res


def score_clip(opts: ScoreOptions, samples, parser) -> Result:
    from .models import ClipScorer, weights_sha256
    from .parse import drop_adjectives

    model = ClipScorer(opts.clip, _device(opts), opts.clip_dtype)
    texts = {s.index: (drop_adjectives(parser, s.prompt) if opts.complex else s.prompt) for s in samples}
    res = Result([], [], [], list(model.deviations))
    bar = _bar(opts, len(samples), "taca eval score clip")
    vals: Dict[int, float] = {}
    for k in range(0, len(samples), opts.batch_size):
        chunk = list(_images(samples[k:k + opts.batch_size]))
        cos = model.cosine([im for _, im in chunk], [texts[s.index] for s, _ in chunk])
        for (s, _), c in zip(chunk, cos):
            vals[s.index] = float(c)
        bar.update(len(chunk))
    bar.close()
    for qid, s in enumerate(samples):
        res.answers.append({"question_id": qid, "answer": vals[s.index]})
        res.values.append(vals[s.index])
        res.details.append({"question_id": qid, "image": s.name, "prompt": s.prompt, "text": texts[s.index],
                            "cosine": vals[s.index]})
    res.models["clip"] = {"path": os.path.abspath(model.folder), "sha256": weights_sha256(model.folder),
                          "dtype": str(model.dtype).replace("torch.", ""), "image_size": model.image_size}
    return res


def _detector_deviation(opts: ScoreOptions, want: str) -> List[str]:
    d = (opts.detector or "").lower()
    if d.startswith("unidet"):
        return []
    return [f"detections from {opts.detector or 'an undeclared detector'} (official: UniDet {want}; pass "
            f"--detector unidet-{want.lower()} for UniDet output)"]


def score_spatial2d(opts: ScoreOptions, samples, parser) -> Result:
    from .parse import complex_objects, first_last_nouns

    dets = load_detections(opts.detections, samples)
    res = Result([], [], [], _detector_deviation(opts, "RS200"))
    for s in samples:
        o1, o2 = complex_objects(parser, s.prompt) if opts.complex else first_last_nouns(parser, s.prompt)
        r = rules.spatial2d_score(s.prompt, o1, o2, dets[s.name])
        res.answers.append({"question_id": s.index, "answer": r.score})
        res.values.append(r.score)
        res.details.append({"question_id": s.index, "image": s.name, "prompt": s.prompt, "relation": r.relation,
                            "objects": [r.obj1, r.obj2], "matched": [r.idx1, r.idx2], "position": r.position,
                            "score": r.score})
    res.extra["detections_sha256"] = layout.sha256_file(opts.detections)
    return res


def score_spatial3d(opts: ScoreOptions, samples, parser) -> Result:
    from .parse import first_last_nouns

    dets = load_detections(opts.detections, samples)
    res = Result([], [], [], _detector_deviation(opts, "R50"))
    from PIL import Image

    for s in samples:
        with Image.open(s.path) as im:
            frame = unidet_frame(im.size)
        depth = load_depth(opts.depth, s, frame)
        o1, o2 = first_last_nouns(parser, s.prompt)
        r = rules.spatial3d_score(s.prompt, o1, o2, dets[s.name], depth)
        res.answers.append({"question_id": s.index, "answer": r.score})
        res.values.append(r.score)
        res.details.append({"question_id": s.index, "image": s.name, "prompt": s.prompt, "relation": r.relation,
                            "objects": [r.obj1, r.obj2], "matched": [r.idx1, r.idx2], "position": r.position,
                            "depth_diff": r.depth_diff, "notes": r.notes, "score": r.score})
    res.extra["detections_sha256"] = layout.sha256_file(opts.detections)
    res.extra["depth_dir"] = os.path.abspath(opts.depth)
    return res


def score_numeracy(opts: ScoreOptions, samples, parser) -> Result:
    objects_file = layout.data_file("new_objects.txt", opts.prompts_dir)
    singulars, plurals = rules.load_objects(layout.read_lines(objects_file))
    dets = load_detections(opts.detections, samples)
    res = Result([], [], [], _detector_deviation(opts, "R50"))
    for s in samples:
        targets, counts = rules.numeracy_targets(parser.words(s.prompt), singulars, plurals)
        r = rules.numeracy_score(targets, counts, dets[s.name])
        res.answers.append({"question_id": s.index, "answer": r.score})
        res.values.append(r.score)
        res.details.append({"question_id": s.index, "image": s.name, "prompt": s.prompt, "targets": targets,
                            "counts": counts, "kept_labels": r.kept_labels, "per_target": r.per_target,
                            "notes": r.notes, "score": r.score})
    res.extra["detections_sha256"] = layout.sha256_file(opts.detections)
    res.extra["new_objects_sha256"] = layout.sha256_file(objects_file)
    return res


def _read_part(opts: ScoreOptions, metric: str, n: int) -> Tuple[List[float], Dict[str, Any]]:
    d = os.path.join(opts.category_dir, OUTPUT_DIRS[metric])
    p = os.path.join(d, "vqa_result.json")
    if not os.path.isfile(p):
        raise _err("RUN/<category>", f"{p} does not exist; run `taca eval score {metric} {opts.category_dir}` first "
                   f"(3-in-1 combines B-VQA, UniDet 2D --complex and CLIP --complex)")
    with open(p) as f:
        rows = json.load(f)
    if len(rows) != n:
        raise _err("RUN/<category>", f"{p} has {len(rows)} answers for {n} images; re-score it")
    meta: Dict[str, Any] = {}
    sp = os.path.join(d, "score.json")
    if os.path.isfile(sp):
        with open(sp) as f:
            meta = json.load(f)
    return [float(r["answer"]) for r in rows], meta


def score_three_in_one(opts: ScoreOptions, samples, parser) -> Result:
    n = len(samples)
    blip, mb = _read_part(opts, "blip-vqa", n)
    spatial, ms = _read_part(opts, "spatial2d", n)
    clip, mc = _read_part(opts, "clip", n)
    sp_file = layout.data_file("complex_val_spatial.txt", opts.prompts_dir)
    ac_file = layout.data_file("complex_val_action.txt", opts.prompts_dir)
    sp_lines, ac_lines = layout.read_lines(sp_file), layout.read_lines(ac_file)
    manifest = layout.read_manifest(opts.category_dir)
    by_index = {r["index"]: r["prompt"] for r in manifest} if manifest else {}
    res = Result([], [], [])
    for part, meta in (("blip-vqa", mb), ("spatial2d", ms), ("clip", mc)):
        if not meta:
            res.deviations.append(f"{part}: no score.json beside its vqa_result.json (provenance unknown)")
        elif not meta.get("official", False):
            res.deviations += [f"{part}: {d}" for d in meta.get("deviations", ["not official"])]
    # The official script reads the three lists by position (sorted by index) and takes the prompt
    # of image i from line i // 10 of complex_val.txt; the manifest gives the same prompt per index.
    for pos, s in enumerate(samples):
        prompt = by_index.get(s.index, s.prompt)
        v, branch = rules.three_in_one(prompt, blip[pos], spatial[pos], clip[pos], sp_lines, ac_lines)
        res.answers.append({"question_id": pos, "answer": v})
        res.values.append(v)
        res.details.append({"question_id": pos, "image": s.name, "prompt": prompt, "branch": branch,
                            "blip_vqa": blip[pos], "spatial2d": spatial[pos], "clip": clip[pos], "score": v})
    res.extra["split_files_sha256"] = {os.path.basename(sp_file): layout.sha256_file(sp_file),
                                       os.path.basename(ac_file): layout.sha256_file(ac_file)}
    return res


_SCORERS = {"blip-vqa": score_blip, "clip": score_clip, "spatial2d": score_spatial2d,
            "spatial3d": score_spatial3d, "numeracy": score_numeracy, "three-in-one": score_three_in_one}
_NEEDS_PARSER = {"blip-vqa", "spatial2d", "spatial3d", "numeracy"}


def run_score(opts: ScoreOptions) -> Dict[str, Any]:
    """Score one category folder; writes the three output files and returns score.json's content.
    Raises UsageError (bad input, found before loading models) or models.ScorerMissing."""
    from .models import check_folder
    from .parse import get_parser

    cat, samples = validate(opts)
    if opts.metric == "blip-vqa":
        check_folder("blip", opts.blip)
    if opts.metric == "clip":
        check_folder("clip", opts.clip)
    try:
        parser = get_parser(opts.parser)
    except ValueError as e:
        raise UsageError(str(e)) from None
    uses_parser = opts.metric in _NEEDS_PARSER or (opts.metric == "clip" and opts.complex)
    res = _SCORERS[opts.metric](opts, samples, parser)
    deviations = list(res.deviations)
    if uses_parser and not parser.official:
        deviations.append("prompts parsed by taca's rule parser, not spaCy en_core_web_sm (--parser)")
    run = _run_info(opts.category_dir)
    expected = None
    if run is not None:
        info = run.get("prompts", {}).get(cat)
        if info is not None:
            expected = info.get("n_prompts", 0) * run.get("images_per_prompt", 10)
            if info.get("limited"):
                deviations.append(f"only the first {info.get('n_prompts')} prompts were generated")
    if cat == "color" and run is not None:
        sha = run.get("prompts", {}).get("color", {}).get("sha256")
        res.extra["color_prompts"] = {"1634259756dbc77d13093d907d414480080ec9790a8c97ad09efaea7b2534f2d":
                                      "current (after 3310c2f)",
                                      "1e37a12c1861bf6b11623eaffb0bf6d6eeea9702caf45b95d040f1721bba7f4f":
                                      "7728dea (before 3310c2f)"}.get(sha, "other")
    mean = sum(res.values) / len(res.values)
    summary = dict(
        category=cat, metric=opts.metric, mean=mean, n_images=len(samples), expected_images=expected,
        complete=expected is None or expected == len(samples), official=not deviations, deviations=deviations,
        parser=(getattr(parser, "version", parser.name) if uses_parser else None), models=res.models,
        detector=opts.detector if opts.metric in ("spatial2d", "spatial3d", "numeracy") else None,
        complex=bool(opts.complex), run=_run_summary(run, cat), created=datetime.datetime.now(
            datetime.timezone.utc).isoformat(), taca_version=_taca_version(), **res.extra)
    out = output_dir(opts)
    os.makedirs(out, exist_ok=True)
    # the official file first; score.json last, so its presence means a finished score
    with open(os.path.join(out, "vqa_result.json.tmp"), "w") as f:
        json.dump(res.answers, f)
    os.replace(os.path.join(out, "vqa_result.json.tmp"), os.path.join(out, "vqa_result.json"))
    layout.write_jsonl_atomic(os.path.join(out, "details.jsonl"), res.details)
    layout.write_json_atomic(os.path.join(out, "score.json"), summary)
    print(f"taca eval score: {opts.metric} {cat}: {mean:.4f} over {len(samples)} images"
          f"{'' if not deviations else ' (official: false; see score.json deviations)'} -> {out}", file=sys.stderr)
    return summary


def _run_info(category_dir: str) -> Optional[Dict[str, Any]]:
    p = os.path.join(os.path.dirname(os.path.abspath(os.path.normpath(category_dir))), "run.json")
    if os.path.isfile(p):
        try:
            with open(p) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None
    return None


def _run_summary(run, cat):
    if run is None:
        return None
    return {"model": run.get("model"), "taca": run.get("taca"), "prompts": run.get("prompts", {}).get(cat)}


def _taca_version() -> Optional[str]:
    try:
        import importlib.metadata as md

        return md.version("taca")
    except Exception:  # noqa: BLE001 (a source checkout without metadata)
        return None
