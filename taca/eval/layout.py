"""T2I-CompBench's file layout and prompt lists.

A run folder holds one folder per category, each with the images the official scripts read::

    RUN/run.json                                  settings of the whole run (taca eval generate)
    RUN/<category>/samples/<prompt>_<NNNNNN>.png  NNNNNN = prompt_index * images_per_prompt + j
    RUN/<category>/manifest.jsonl                 one line per image: prompt index, j, seed, file

The official scripts take the prompt from ``name.split('_')[0]`` and the image index from
``int(name.split('_')[-1].split('.')[0])``; ``samples/`` must hold nothing but these images.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .._util import sha256_file  # noqa: F401  (layout.sha256_file: run files, prompt files)

CATEGORIES: Tuple[str, ...] = (
    "color", "shape", "texture", "spatial", "non_spatial", "complex", "3d_spatial", "numeracy",
)
PROMPTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
# Source of the shipped prompt files (MIT, see prompts/README.md).
PROMPTS_SOURCE = "https://github.com/Karine-Huang/T2I-CompBench"
PROMPTS_COMMIT = "1b7094991a57f3c22abdd4f6e8ba6c1a15517073"
# color_val.txt before commit 3310c2f (2025-09-03), i.e. what TACA (June 2025) was evaluated on.
COLOR_VAL_LEGACY_COMMIT = "7728deac05e17903b3145befd9b7207c7c019573"
PROMPT_SETS = ("current", "7728dea")
_NAME = re.compile(r"^(?P<prompt>[^_/]+)_(?P<index>\d{6,})\.png$")


class LayoutError(ValueError):
    """A run folder, category folder or prompt file that is not in the official layout."""




def image_name(prompt: str, index: int) -> str:
    """``<prompt>_<NNNNNN>.png``: the official sample name (index zero-padded to 6 digits)."""
    return f"{prompt}_{index:06d}.png"


def parse_image_name(name: str) -> Tuple[str, int]:
    """(prompt, index) the way the official scripts read a sample name."""
    m = _NAME.match(name)
    if m is None:
        raise LayoutError(f"{name!r} is not a T2I-CompBench sample name (<prompt>_<NNNNNN>.png)")
    return m.group("prompt"), int(m.group("index"))


@dataclass(frozen=True)
class Sample:
    index: int      # question_id of the official result files
    name: str       # file name in samples/
    prompt: str     # name.split('_')[0]
    path: str


def list_samples(category_dir: str, arg: str = "RUN/<category>") -> List[Sample]:
    """The images of one category folder, sorted by index as the official scripts sort them.

    Raises LayoutError naming ``arg`` when the folder has no ``samples/``, when ``samples/`` holds
    anything but sample images, or when it is empty or has duplicate indices.
    """
    samples_dir = os.path.join(category_dir, "samples")
    if not os.path.isdir(category_dir):
        raise LayoutError(f"taca eval: argument {arg}: {category_dir} does not exist")
    if not os.path.isdir(samples_dir):
        cats = [c for c in CATEGORIES if os.path.isdir(os.path.join(category_dir, c, "samples"))]
        hint = (f" (it looks like a run folder; pass one of its categories, e.g. "
                f"{os.path.join(category_dir, cats[0])})" if cats else "")
        raise LayoutError(f"taca eval: argument {arg}: {category_dir} has no samples/ folder; expected the "
                          f"official layout <category>/samples/<prompt>_<NNNNNN>.png{hint}")
    out, bad = [], []
    for name in os.listdir(samples_dir):
        try:
            prompt, idx = parse_image_name(name)
        except LayoutError:
            bad.append(name)
            continue
        out.append(Sample(idx, name, prompt, os.path.join(samples_dir, name)))
    if bad:
        raise LayoutError(f"taca eval: argument {arg}: {samples_dir} holds {len(bad)} file(s) that are not "
                          f"sample images <prompt>_<NNNNNN>.png (e.g. {sorted(bad)[0]!r}); the official scripts "
                          f"read every file there, so move them out")
    if not out:
        raise LayoutError(f"taca eval: argument {arg}: {samples_dir} is empty")
    out.sort(key=lambda s: s.index)
    seen: Dict[int, str] = {}
    for s in out:
        if s.index in seen:
            raise LayoutError(f"taca eval: argument {arg}: {seen[s.index]!r} and {s.name!r} have the same index")
        seen[s.index] = s.name
    return out


def category_of(category_dir: str) -> Optional[str]:
    """The category named by the folder (its base name), or None."""
    base = os.path.basename(os.path.normpath(category_dir))
    return base if base in CATEGORIES else None


def prompt_file(category: str, prompts_dir: Optional[str] = None, prompt_set: str = "current") -> str:
    """Path of ``<category>_val.txt``: from ``prompts_dir`` or the files shipped with taca
    (``prompt_set="7728dea"`` selects the pre-2025-09 color_val.txt)."""
    if category not in CATEGORIES:
        raise LayoutError(f"taca eval: unknown category {category!r}; known: {', '.join(CATEGORIES)}")
    if prompt_set not in PROMPT_SETS:
        raise LayoutError(f"taca eval: argument --prompt-set: {prompt_set!r} is not one of {PROMPT_SETS}")
    if prompts_dir is not None:
        path = os.path.join(prompts_dir, f"{category}_val.txt")
        if not os.path.isfile(path):
            raise LayoutError(f"taca eval: argument --prompts: {path} does not exist (expected the "
                              f"T2I-CompBench files examples/dataset/<category>_val.txt)")
        return path
    if category == "color" and prompt_set == "7728dea":
        return os.path.join(PROMPTS_DIR, "color_val_7728dea.txt")
    return os.path.join(PROMPTS_DIR, f"{category}_val.txt")


def read_lines(path: str) -> List[str]:
    """Non-empty stripped lines (the files have CRLF endings and no final newline)."""
    with open(path, "r", encoding="utf-8") as f:
        return [ln.strip() for ln in f.read().splitlines() if ln.strip()]


def load_prompts(category: str, prompts_dir: Optional[str] = None, prompt_set: str = "current"
                 ) -> Tuple[List[str], str, str]:
    """(prompts, path, sha256) of a category's val split. Prompts holding '_' or '/' cannot be
    written as official sample names and raise LayoutError."""
    path = prompt_file(category, prompts_dir, prompt_set)
    prompts = read_lines(path)
    for p in prompts:
        if "_" in p or "/" in p or os.sep in p:
            raise LayoutError(f"taca eval: {path}: prompt {p!r} contains '_' or '/', which the official "
                              f"file names cannot hold")
    if not prompts:
        raise LayoutError(f"taca eval: {path} holds no prompts")
    return prompts, path, sha256_file(path)


def data_file(name: str, prompts_dir: Optional[str] = None) -> str:
    """A side file of the benchmark (complex_val_spatial.txt, new_objects.txt, ...): from
    ``prompts_dir`` when given and present there, else the shipped copy."""
    if prompts_dir is not None:
        p = os.path.join(prompts_dir, name)
        if os.path.isfile(p):
            return p
    p = os.path.join(PROMPTS_DIR, name)
    if not os.path.isfile(p):
        raise LayoutError(f"taca eval: {name} not found in {prompts_dir or PROMPTS_DIR}")
    return p


def write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def write_jsonl_atomic(path: str, rows: Sequence[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def read_manifest(category_dir: str) -> Optional[List[dict]]:
    path = os.path.join(category_dir, "manifest.jsonl")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return [json.loads(ln) for ln in f if ln.strip()]
