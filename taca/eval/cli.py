"""Arguments of ``taca eval`` (generate / score / report). argparse only at import time; the
command functions import the heavy parts.

Exit codes: 0 success, 1 failure while running, 2 usage errors and missing models/files.
"""
from __future__ import annotations

import sys

from ..cli import _positive_int

_CATS = "color,shape,texture,spatial,non_spatial,complex,3d_spatial,numeracy"
_METRICS = ("blip-vqa", "clip", "spatial2d", "spatial3d", "numeracy", "three-in-one")

_pos_int = _positive_int("N")  # an integer >= 1


def add_parser(sub) -> None:
    e = sub.add_parser("eval", help="T2I-CompBench(++): generate, score with the official metrics, report",
                       description="T2I-CompBench(++) evaluation: `generate` the benchmark images in the official "
                                   "layout, `score` them with the official metrics (scorer models from local "
                                   "folders only), `report` the paper's table. See docs/eval.md.")
    esub = e.add_subparsers(dest="eval_command", metavar="{generate,score,report,mini}")
    esub.required = True

    g = esub.add_parser("generate", help="images for T2I-CompBench categories (resumable; accelerate launch shards)",
                        description="Generates 10 images per prompt (seeds 42..51) of each category's *_val.txt "
                                    "into RUN/<category>/samples/<prompt>_<NNNNNN>.png with manifest.jsonl and "
                                    "run.json. Existing images are kept. `accelerate launch -m taca eval generate "
                                    "...` splits the prompts over processes and writes the same files.")
    g.add_argument("--model", required=True,
                   help="hub id or local diffusers pipeline folder (FLUX.1, SD3 / SD3.5 or another family "
                        "`taca generate` takes)")
    g.add_argument("--out", required=True, help="run folder RUN")
    g.add_argument("--categories", default=_CATS, help=f"comma-separated (default: all eight: {_CATS})")
    g.add_argument("--prompts", default=None, metavar="DIR",
                   help="folder with <category>_val.txt (default: the files shipped with taca, T2I-CompBench @1b70949)")
    g.add_argument("--prompt-set", choices=("current", "7728dea"), default="current",
                   help="shipped color_val.txt version: current (default) or 7728dea (before the 2025-09 fix, "
                        "what the TACA paper used)")
    g.add_argument("--images-per-prompt", type=_pos_int, default=10, help="default 10 (the benchmark's)")
    g.add_argument("--seed", type=int, default=42, help="image j of each prompt uses seed+j (default 42)")
    tg = g.add_mutually_exclusive_group(required=True)
    tg.add_argument("--taca", nargs="?", const="", default=None, metavar="SPEC",
                    help="TACA on: gamma=1.2,schedule=paper[,lora=PATH][,gamma_reverse=1][,backend=auto] "
                         "(bare --taca: gamma 1.2, paper schedule)")
    tg.add_argument("--no-taca", action="store_true", help="baseline (TACA off)")
    g.add_argument("--steps", type=_pos_int, default=None, help="denoising steps (default: the pipeline's)")
    g.add_argument("--guidance", type=float, default=None,
                   help="guidance scale (default: the pipeline's; the family's argument, e.g. Qwen-Image's "
                        "true_cfg_scale)")
    g.add_argument("--height", type=_pos_int, default=None)
    g.add_argument("--width", type=_pos_int, default=None)
    g.add_argument("--max-sequence-length", type=_pos_int, default=None)
    g.add_argument("--negative-prompt", default=None, metavar="TEXT",
                   help="negative prompt, for the families that take one (Qwen-Image's true CFG needs one: "
                        "its reference inference passes \" \"); default: none")
    g.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default bf16 on GPU, fp32 on CPU")
    g.add_argument("--batch-size", type=_pos_int, default=1, help="images of one prompt per pipeline call")
    g.add_argument("--limit-prompts", type=_pos_int, default=None,
                   help="only the first N prompts per category (smoke tests; recorded in run.json)")
    g.add_argument("--no-progress", action="store_true")
    g.set_defaults(func=cmd_generate)

    s = esub.add_parser("score", help="score RUN/<category> with one metric",
                        description="Scores the images of one category folder and writes the official result "
                                    "file plus score.json and details.jsonl. Metrics: blip-vqa (color, shape, "
                                    "texture, complex), clip (non_spatial; complex uses --complex), spatial2d "
                                    "(spatial, complex), spatial3d (3d_spatial), numeracy, three-in-one (complex).")
    s.add_argument("metric", choices=_METRICS, metavar="METRIC", help=" | ".join(_METRICS))
    s.add_argument("category_dir", metavar="RUN/<category>")
    s.add_argument("--category", default=None, help="category when the folder name is not one")
    s.add_argument("--blip", default=None, metavar="DIR", help="local Salesforce/blip-vqa-capfilt-large folder")
    s.add_argument("--clip", default=None, metavar="DIR", help="local openai/clip-vit-base-patch32 folder")
    s.add_argument("--detections", default=None, metavar="FILE", help="detector output, JSONL, one line per image")
    s.add_argument("--depth", default=None, metavar="DIR",
                   help="8-bit depth maps <image name>.png (default RUN/3d_spatial/labels/depth/3d_spatial/samples)")
    s.add_argument("--detector", default=None,
                   help="which detector made --detections (unidet-rs200 / unidet-r50 count as official)")
    s.add_argument("--complex", action="store_true", default=None,
                   help="the 3-in-1 variants (default on for the complex category, the only one it applies to)")
    s.add_argument("--parser", choices=("auto", "spacy", "rules"), default="auto",
                   help="prompt analysis: spaCy en_core_web_sm (official) or the rule parser "
                        "(default: spaCy if installed)")
    s.add_argument("--prompts", default=None, metavar="DIR", help="folder with complex_val_*.txt / new_objects.txt")
    s.add_argument("--device", default=None, help="default: cuda if available")
    s.add_argument("--batch-size", type=_pos_int, default=32)
    s.add_argument("--np-num", type=_pos_int, default=8, help="B-VQA noun phrases per prompt (default 8, official)")
    s.add_argument("--image-size", type=_pos_int, default=None, help="B-VQA input size (default 480, official)")
    s.add_argument("--clip-dtype", choices=("fp16", "fp32"), default=None,
                   help="default fp16 on CUDA (as clip.load), fp32 on CPU")
    s.add_argument("--overwrite", action="store_true", help="replace existing results of this metric")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_score)

    r = esub.add_parser("report", help="the paper's table for one or more runs",
                        description="One row per run in the paper's column order, 4 decimals, marks on scores "
                                    "not computed the official way, and the published TACA rows for reference.")
    r.add_argument("runs", nargs="+", metavar="RUN")
    r.add_argument("--format", choices=("md", "csv", "json"), default="md")
    r.add_argument("--no-published", action="store_true", help="leave out the paper's rows")
    r.add_argument("--out", default=None, metavar="FILE", help="write the table here (refuses an existing file)")
    r.set_defaults(func=cmd_report)

    m = esub.add_parser("mini", help="the miniature's benchmark: the judge's accuracy with TACA off and on (CPU, minutes)",
                        description="The quick version of the benchmark, on the miniature trained here (shipped with "
                                    "taca): each condition (baseline, gamma 1.1/1.2/1.3 by the paper's rule, the TACA "
                                    "LoRA, the control LoRA) generates the same prompts with the same seeds and the "
                                    "rule-based judge scores them, with 95%% intervals. The full run is "
                                    "--per-category 500 (2500 prompts; minutes on a GPU).")
    m.add_argument("--per-category", type=_pos_int, default=4, metavar="N",
                   help="prompts per category (default 4 = 20 prompts, a few minutes on a CPU; 500 = the full set)")
    m.add_argument("--steps", type=_pos_int, default=28, metavar="N", help="denoising steps (default 28)")
    m.add_argument("--guidance", type=float, default=3.0, metavar="G", help="classifier-free guidance (default 3)")
    m.add_argument("--gammas", default="1.1,1.2,1.3", metavar="LIST", help="training-free gammas (default 1.1,1.2,1.3)")
    m.add_argument("--pipeline", default=None, metavar="DIR", help="a MiniPipeline folder (default: the shipped one)")
    m.add_argument("--taca-lora", default=None, metavar="DIR", help="default: the shipped TACA LoRA")
    m.add_argument("--control-lora", default=None, metavar="DIR", help="default: the shipped control LoRA")
    m.add_argument("--mass-prompts", type=int, default=8, metavar="N", help="prompts for the text-mass figure (0: none)")
    m.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    m.add_argument("--out", default="taca-out/eval-mini", metavar="DIR", help="results folder (default taca-out/eval-mini)")
    m.add_argument("--overwrite", action="store_true", help="replace the results an earlier run wrote in --out")
    m.set_defaults(func=cmd_mini)


def _fail(msg: str, code: int) -> int:
    print(msg, file=sys.stderr)
    return code


def cmd_generate(args) -> int:
    from .generate import GenerateConfig, UsageError, generate, parse_taca_spec

    try:
        taca = None if args.no_taca else parse_taca_spec(args.taca)
        cfg = GenerateConfig(
            model=args.model, out=args.out, categories=[c.strip() for c in args.categories.split(",") if c.strip()],
            prompts_dir=args.prompts, prompt_set=args.prompt_set, images_per_prompt=args.images_per_prompt,
            seed=args.seed, taca=taca, steps=args.steps, guidance=args.guidance, height=args.height,
            width=args.width, max_sequence_length=args.max_sequence_length,
            negative_prompt=args.negative_prompt, dtype=args.dtype,
            batch_size=args.batch_size, limit_prompts=args.limit_prompts, progress=not args.no_progress)
        generate(cfg)
    except UsageError as e:
        return _fail(str(e), 2)
    except Exception as e:  # noqa: BLE001 (a failure while running: say what, exit 1)
        return _fail(f"taca eval generate: failed: {type(e).__name__}: {e}", 1)
    return 0


def cmd_score(args) -> int:
    from .generate import UsageError
    from .models import ScorerMissing
    from .score import ScoreOptions, run_score

    opts = ScoreOptions(
        metric=args.metric, category_dir=args.category_dir, category=args.category, complex=args.complex,
        overwrite=args.overwrite, blip=args.blip, clip=args.clip, detections=args.detections, depth=args.depth,
        detector=args.detector, parser=args.parser, prompts_dir=args.prompts, device=args.device,
        batch_size=args.batch_size, np_num=args.np_num, image_size=args.image_size, clip_dtype=args.clip_dtype,
        progress=not args.no_progress)
    try:
        run_score(opts)
    except (UsageError, ScorerMissing) as e:
        return _fail(str(e), 2)
    except Exception as e:  # noqa: BLE001
        return _fail(f"taca eval score: failed: {type(e).__name__}: {e}", 1)
    return 0


def cmd_report(args) -> int:
    import os

    from .report import ReportError, render

    if args.out is not None and os.path.exists(args.out):
        return _fail(f"taca eval report: argument --out: {args.out} exists; it is kept (choose another name)", 2)
    try:
        text = render(args.runs, args.format, published=not args.no_published)
    except ReportError as e:
        return _fail(str(e), 2)
    if args.out is None:
        sys.stdout.write(text)
    else:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"taca eval report: wrote {args.out}", file=sys.stderr)
    return 0


def cmd_mini(args) -> int:
    import os

    from ..mini import shipped

    paths = {}
    for name in ("pipeline", "taca_lora", "control_lora"):
        v = getattr(args, name) or shipped(name)
        if v is None or not os.path.exists(v):
            return _fail(f"taca eval mini: argument --{name.replace('_', '-')}: "
                         f"{v or 'the shipped ' + name.replace('_', ' ')} does not exist", 2)
        paths[name] = v
    try:
        gammas = [float(x) for x in args.gammas.split(",") if x.strip()]
    except ValueError:
        return _fail(f"taca eval mini: argument --gammas: expected numbers such as 1.1,1.2,1.3, got {args.gammas!r}", 2)
    if not gammas or any(not (g > 0 and g < float("inf")) for g in gammas):
        return _fail(f"taca eval mini: argument --gammas: every gamma must be finite and > 0, got {args.gammas!r}", 2)
    if os.path.isfile(os.path.join(args.out, "results.json")) and not args.overwrite:
        return _fail(f"taca eval mini: argument --out: {args.out} holds an earlier run's results; pass --overwrite "
                     f"or another folder", 2)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        return _fail("taca eval mini: argument --device: cuda was given but torch sees no CUDA GPU", 2)
    from argparse import Namespace

    from ..mini.experiment import run

    run(Namespace(pipeline=paths["pipeline"], taca_lora=paths["taca_lora"], control_lora=paths["control_lora"],
                  gammas=gammas, per_category=args.per_category, steps=args.steps, guidance=args.guidance,
                  batch=100, mass_prompts=args.mass_prompts, device=device, out=args.out))
    return 0
