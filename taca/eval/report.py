"""``taca eval report RUN [RUN ...]``: the paper's table, one row per run.

Columns in the TACA paper's order (Color, Shape, Texture, 2D-Spatial, Non-Spatial, Complex), then
T2I-CompBench++'s 3D-Spatial and Numeracy; each cell is the category's standard metric read from
``RUN/<category>/<result folder>/score.json``, 4 decimals. Marks: ``†`` not computed the official
way (see that score.json's ``deviations``), ``*`` fewer images than the run planned. The TACA
paper's published FLUX.1-dev and SD3.5-Medium rows follow for reference.
"""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Any, Dict, List, Optional, Sequence

from .score import OUTPUT_DIRS, PRIMARY_METRIC

COLUMNS = (("color", "Color"), ("shape", "Shape"), ("texture", "Texture"), ("spatial", "2D-Spatial"),
           ("non_spatial", "Non-Spatial"), ("complex", "Complex"), ("3d_spatial", "3D-Spatial"),
           ("numeracy", "Numeracy"))
# TACA README (github.com/Vchitect/TACA), T2I-CompBench standard metrics (B-VQA x3, UniDet, CLIP, 3-in-1);
# the README does not state the split, seeds or images per prompt.
PUBLISHED = (
    ("FLUX.1-Dev (paper)", (0.7678, 0.5064, 0.6756, 0.2066, 0.3035, 0.4359)),
    ("FLUX.1-Dev + TACA r=64 (paper)", (0.7843, 0.5362, 0.6872, 0.2405, 0.3041, 0.4494)),
    ("FLUX.1-Dev + TACA r=16 (paper)", (0.7842, 0.5347, 0.6814, 0.2321, 0.3046, 0.4479)),
    ("SD3.5-Medium (paper)", (0.7890, 0.5770, 0.7328, 0.2087, 0.3104, 0.4441)),
    ("SD3.5-Medium + TACA r=64 (paper)", (0.8074, 0.5938, 0.7522, 0.2678, 0.3106, 0.4470)),
    ("SD3.5-Medium + TACA r=16 (paper)", (0.7984, 0.5834, 0.7467, 0.2374, 0.3111, 0.4505)),
)
MARK_UNOFFICIAL = "†"
MARK_INCOMPLETE = "*"


class ReportError(ValueError):
    pass


def run_label(run_dir: str) -> str:
    """"<folder> (<model>, TACA gamma=..)" from run.json, or the folder name."""
    name = os.path.basename(os.path.normpath(run_dir))
    p = os.path.join(run_dir, "run.json")
    if not os.path.isfile(p):
        return name
    with open(p) as f:
        run = json.load(f)
    model = os.path.basename(os.path.normpath(str(run.get("model", "")))) or "?"
    t = run.get("taca")
    if t is None:
        how = "no TACA"
    else:
        how = f"TACA gamma={t.get('gamma')} {t.get('schedule')}"
        if t.get("lora"):
            how += f" lora={os.path.basename(os.path.normpath(t['lora']))}"
    return f"{name} ({model}, {how})"


def collect(run_dir: str) -> Dict[str, Any]:
    """{"label", "cells": {category: {"mean", "official", "complete", "n_images", "deviations"} or None}}."""
    if not os.path.isdir(run_dir):
        raise ReportError(f"taca eval report: argument RUN: {run_dir} is not a folder")
    cells: Dict[str, Optional[Dict[str, Any]]] = {}
    for cat, _ in COLUMNS:
        p = os.path.join(run_dir, cat, OUTPUT_DIRS[PRIMARY_METRIC[cat]], "score.json")
        if os.path.isfile(p):
            with open(p) as f:
                s = json.load(f)
            cells[cat] = {k: s.get(k) for k in ("mean", "official", "complete", "n_images", "deviations")}
        else:
            cells[cat] = None
    if not any(cells.values()):
        raise ReportError(f"taca eval report: argument RUN: {run_dir} holds no scores (expected "
                          f"<category>/<result folder>/score.json written by `taca eval score`)")
    return {"label": run_label(run_dir), "path": os.path.abspath(run_dir), "cells": cells}


def _cell(c: Optional[Dict[str, Any]]) -> str:
    if c is None:
        return "–"
    s = f"{c['mean']:.4f}"
    if not c.get("official", False):
        s += MARK_UNOFFICIAL
    if c.get("complete") is False:
        s += MARK_INCOMPLETE
    return s


def rows(runs: Sequence[Dict[str, Any]], published: bool = True) -> List[List[str]]:
    out = [[r["label"]] + [_cell(r["cells"][c]) for c, _ in COLUMNS] for r in runs]
    if published:
        for name, vals in PUBLISHED:
            out.append([name] + [f"{v:.4f}" for v in vals] + ["–"] * (len(COLUMNS) - len(vals)))
    return out


def render(run_dirs: Sequence[str], fmt: str = "md", published: bool = True) -> str:
    """The table as Markdown, CSV or JSON (JSON carries the raw values and flags)."""
    runs = [collect(d) for d in run_dirs]
    header = ["Model"] + [h for _, h in COLUMNS]
    if fmt == "json":
        return json.dumps({"columns": [c for c, _ in COLUMNS], "runs": runs,
                           "published": [{"model": n, **dict(zip([c for c, _ in COLUMNS], v))}
                                         for n, v in PUBLISHED] if published else []}, indent=1)
    table = rows(runs, published)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        w.writerows(table)
        return buf.getvalue()
    if fmt != "md":
        raise ReportError(f"taca eval report: argument --format: {fmt!r} is not one of md, csv, json")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(COLUMNS)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in table]
    notes = [f"{MARK_UNOFFICIAL} not computed the official way (see that score.json's deviations); "
             f"{MARK_INCOMPLETE} fewer images than the run planned; – not scored."]
    if published:
        notes.append("Rows marked (paper): the TACA README's published numbers, for reference (its split, seeds and "
                     "images per prompt are not stated).")
    return "\n".join(lines + [""] + notes) + "\n"
