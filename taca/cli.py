"""The ``taca`` command (also ``python -m taca``).

    taca demo      [--out DIR] [--steps N] [--gammas 1.1,1.2,1.3] ...   offline, random weights
    taca generate  --model ID_OR_PATH --prompt TEXT [--gamma 1.2] [--schedule paper] [--compare] ...
    taca bench     [--script bench_attention.py] [ARGS passed to the script]
    taca train     --model ID_OR_PATH --data DIR_OR_JSONL --out DIR [...]   LoRA training with TACA on
    taca eval      generate|score|report ...                              T2I-CompBench

Exit codes: 0 success, 1 failure while running, 2 usage errors and missing models/files.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
from typing import Any, Dict, List, Optional, Sequence

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
KNOWN_MODELS = (
    "black-forest-labs/FLUX.1-dev",
    "black-forest-labs/FLUX.1-schnell",
    "stabilityai/stable-diffusion-3-medium-diffusers",
    "stabilityai/stable-diffusion-3.5-medium",
    "stabilityai/stable-diffusion-3.5-large",
)


def _positive_float(name: str, allow_zero: bool = False):
    def conv(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        if not ((v >= 0 if allow_zero else v > 0) and v < float("inf")):
            raise argparse.ArgumentTypeError(f"must be finite and {'>=' if allow_zero else '>'} 0, got {s}")
        return v
    return conv


def _positive_int(name: str):
    def conv(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"must be >= 1, got {s}")
        return v
    return conv


def _gamma_list(s: str) -> List[float]:
    conv = _positive_float("every gamma")
    vals = [conv(x) for x in s.split(",") if x.strip()]
    if not vals:
        raise argparse.ArgumentTypeError("expected a comma-separated list such as 1.1,1.2,1.3")
    return vals


def _seed(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if not (0 <= v < 2**63):  # torch.Generator.manual_seed's range, without its negative wrap-around
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), got {s}")
    return v


def _schedule_spec(s: str) -> str:
    from . import schedule

    try:
        schedule.parse(s, 1.2)
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(str(e).replace("taca: ", "")) from None
    return s


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="taca",
        description="TACA (Temperature-Adjusted Cross-modal Attention, arXiv 2506.07986) for diffusers' "
                    "multimodal diffusion transformers: FLUX.1, SD3/SD3.5 and the other joint-attention families "
                    "of the README's Models section.",
        epilog="Start with `taca demo` (offline, under a minute on a CPU); `taca COMMAND --help` for each "
               "command. Exit codes: 0 success, 1 failure while running, 2 usage errors and missing models.",
    )
    sub = p.add_subparsers(dest="command", metavar="{demo,generate,train,eval,bench}")
    sub.required = True

    d = sub.add_parser("demo", help="offline demo: the miniature trained here, TACA off and on, judged (< 1 min on CPU)",
                       description="By default: the miniature (a small FLUX-architecture MM-DiT trained here on "
                                   "synthetic compositional scenes, shipped with taca) generates compositional prompts "
                                   "with TACA off, with the paper's rule, and with the paper's rule plus the LoRA "
                                   "trained with TACA on; a rule-based judge says which images match their caption; "
                                   "the text mass of image queries per step is plotted. With --random-weights: the "
                                   "attention mechanism on a FLUX-architecture pipeline with random weights (per "
                                   "block telemetry, attention maps).")
    d.add_argument("--out", default="taca-out", metavar="DIR",
                   help="output folder, created if needed; its plots and images are replaced (default: ./taca-out)")
    d.add_argument("--random-weights", action="store_true",
                   help="the mechanism demo on a random-weight FLUX-architecture pipeline instead of the miniature")
    d.add_argument("--prompt", default=None, metavar="TEXT",
                   help="prompt (miniature: a caption of its grammar, e.g. 'a red circle to the left of a blue "
                        "square'; random weights: words outside the built-in vocabulary become <unk>)")
    d.add_argument("--steps", type=_positive_int("--steps"), default=None, metavar="N",
                   help="denoising steps (default 28 for the miniature, 30 with --random-weights)")
    d.add_argument("--gamma", type=_positive_float("--gamma"), default=1.2, metavar="G",
                   help="gamma of the TACA runs (default 1.2)")
    d.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the noise (and of the random weights)")
    d.add_argument("--gammas", type=_gamma_list, default=[1.1, 1.2, 1.3], metavar="G,G,...",
                   help="--random-weights: gammas evaluated on the baseline's q, k (default 1.1,1.2,1.3)")
    d.add_argument("--words", default=None, metavar="WORD,...",
                   help="--random-weights: prompt words for the attention maps (default: mirror)")
    d.add_argument("--run-each-gamma", action="store_true",
                   help="--random-weights: also run a constant-gamma generation per --gammas value")
    d.add_argument("--no-plots", action="store_true", help="skip the matplotlib plots")
    d.set_defaults(func=cmd_demo)

    g = sub.add_parser("generate", help="generate with a real model: FLUX.1, SD3 / SD3.5 or another supported family "
                                        "(hub id or local folder)",
                       description="Loads a diffusers pipeline (FLUX.1 dev / schnell, SD3 / SD3.5, or another "
                                   "family with a taca adapter whose pipeline generates from a prompt: FLUX.2, "
                                   "Qwen-Image, Chroma, AuraFlow, ...; docs/cli.md lists them) with "
                                   "DiffusionPipeline.from_pretrained and generates with TACA.")
    g.add_argument("--model", required=True, metavar="ID_OR_PATH",
                   help=f"hub id (e.g. {KNOWN_MODELS[0]}) or a local pipeline folder")
    g.add_argument("--prompt", required=True, metavar="TEXT", help="the text prompt")
    g.add_argument("--gamma", type=_positive_float("--gamma"), default=1.2, metavar="G",
                   help="gamma0 (default 1.2, the paper's)")
    g.add_argument("--schedule", type=_schedule_spec, default="paper", metavar="RULE",
                   help="when gamma is on: paper (sigma >= 0.97, i.e. t >= 970; default), paper:<sigma>, "
                        "steps:<k> (the first k steps), constant (every step)")
    g.add_argument("--gamma-reverse", type=_positive_float("--gamma-reverse"), default=1.0, metavar="G",
                   help="multiplier of text-query x image-key logits (default 1: the paper's TACA)")
    g.add_argument("--lora", default=None, metavar="PATH", help="TACA LoRA (file/folder in diffusers' LoRA format, or hub id)")
    g.add_argument("--steps", type=_positive_int("--steps"), default=None, metavar="N",
                   help="denoising steps (default: the pipeline's; 4 for FLUX.1-schnell)")
    g.add_argument("--guidance", type=_positive_float("--guidance", allow_zero=True), default=None, metavar="G", help="guidance scale (default: the pipeline's)")
    g.add_argument("--seed", type=_seed, default=42, metavar="N", help="seed (default 42, the paper's)")
    g.add_argument("--height", type=_positive_int("--height"), default=None, metavar="PX",
                   help="a multiple of 16 (default: the pipeline's, 1024 for FLUX.1 and SD3.5)")
    g.add_argument("--width", type=_positive_int("--width"), default=None, metavar="PX", help="a multiple of 16")
    g.add_argument("--max-sequence-length", type=_positive_int("--max-sequence-length"), default=None, metavar="N",
                   help="T5 tokens (default: the pipeline's; at most 512, 256 for FLUX.1-schnell)")
    g.add_argument("--negative-prompt", default=None, metavar="TEXT", help="negative prompt (SD3/SD3.5)")
    g.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    g.add_argument("--dtype", choices=tuple(_DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    g.add_argument("--offload", action="store_true", help="enable_model_cpu_offload (less GPU memory; --device cuda)")
    g.add_argument("--backend", choices=("auto", "cpu", "cuda", "sdpa", "reference"), default="auto",
                   help="attention backend for TACA (default auto; cuda needs --device cuda, cpu --device cpu)")
    g.add_argument("--fp8", action="store_true",
                   help="FP8 (e4m3) attention in every TACA-processed call, gamma on and off (taca.enable(fp8=True)): "
                        "--device cuda on an sm_90 GPU (H100 / H200), bf16 or fp16, head dim 128 (FLUX.1)")
    g.add_argument("--out", default="taca.png", metavar="FILE",
                   help="output image, any format Pillow writes (.png, .jpg, .webp, ...; default taca.png); "
                        "an existing file is not replaced without --overwrite")
    g.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    g.add_argument("--compare", action="store_true", help="write TACA off and on side by side (same seed)")
    g.set_defaults(func=cmd_generate)

    # training and evaluation define their own arguments (argparse only; heavy imports stay in
    # their command functions)
    from .train.cli import add_parser as add_train_parser
    from .eval.cli import add_parser as add_eval_parser

    add_train_parser(sub)
    add_eval_parser(sub)

    b = sub.add_parser("bench", help="run the repository's attention benchmark (benchmarks/); extra args pass through",
                       description="Runs benchmarks/<script> from the repository with this Python; every "
                                   "argument not listed here is passed to the script.")
    b.add_argument("--script", default="bench_attention.py", help="script in benchmarks/ (default bench_attention.py)")
    b.set_defaults(func=cmd_bench)
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The parsed command line (``args.extra``: what ``taca bench`` passes on to its script).
    Usage errors exit with code 2 and a message naming the argument, as argparse does."""
    parser = build_parser()
    args, extra = parser.parse_known_args(list(argv))
    if args.command != "bench" and extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``taca`` console script. Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # a first try: the overview, not just "the following arguments are required"
        build_parser().print_help(sys.stderr)
        return 2
    args = parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("taca: interrupted", file=sys.stderr)
        return 130


# demo ---------------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    out = os.path.expanduser(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        print(f"taca demo: argument --out: {args.out} is a file; the demo writes several files into a folder",
              file=sys.stderr)
        return 2
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        print(f"taca demo: argument --out: cannot create the folder {args.out} ({e.strerror or e})", file=sys.stderr)
        return 2
    if not os.access(out, os.W_OK):
        print(f"taca demo: argument --out: the folder {args.out} is not writable", file=sys.stderr)
        return 2
    from .mini import shipped

    if not args.random_weights and shipped("pipeline") is not None:
        if args.words is not None or args.run_each_gamma:
            print("taca demo: arguments --words and --run-each-gamma belong to --random-weights", file=sys.stderr)
            return 2
        prompts = None
        if args.prompt is not None:
            from .mini import data as mini_data

            try:
                mini_data.parse_caption(args.prompt)
            except ValueError as e:
                print(f"taca demo: argument --prompt: {str(e).replace('taca.mini: ', '')}; with --random-weights any "
                      f"prompt works", file=sys.stderr)
                return 2
            prompts = [args.prompt]
        from .mini import demo as mini_demo

        kw = {} if prompts is None else {"prompts": prompts, "seeds": tuple(range(args.seed, args.seed + 4))}
        if prompts is None and args.seed:
            kw["seeds"] = (args.seed,)
        mini_demo.run(out_dir=out, steps=args.steps or 28, gamma=args.gamma, plots=not args.no_plots, **kw)
        return 0
    from . import demo

    kw = {}
    if args.prompt is not None:
        kw["prompt"] = args.prompt
    if args.words is not None:
        kw["words"] = [w.strip() for w in args.words.split(",") if w.strip()]
    if not args.random_weights:
        print("taca demo: the miniature's weights are not in this checkout (taca/mini/weights): the random-weight "
              "mechanism demo runs instead", file=sys.stderr)
    demo.run_demo(out_dir=out, steps=args.steps or 30, gammas=args.gammas, paper_gamma=args.gamma,
                  seed=args.seed, run_each_gamma=args.run_each_gamma, plots=not args.no_plots, **kw)
    return 0


# generate -----------------------------------------------------------------------------------
def _looks_like_path(model: str) -> bool:
    if os.path.exists(model):
        return True
    if model.startswith((".", "~", os.sep)) or (os.altsep and model.startswith(os.altsep)):
        return True
    return model.count("/") != 1  # hub ids are "owner/name"


def missing_model_message(model: str, reason: str, command: str = "taca generate",
                          argument: Optional[str] = None) -> str:
    """The one-paragraph message for a model that cannot be loaded without the network, from
    ``command`` (its ``argument``, when named)."""
    prefix = f"{command}: " + (f"argument {argument}: " if argument else "")
    if _looks_like_path(model):
        body = (f"{prefix}cannot load {model!r} as a pipeline folder: {reason}. Pass a folder written by "
                f"diffusers' save_pretrained (it holds model_index.json; e.g. one made with `hf download "
                f"{KNOWN_MODELS[0]} --local-dir ./{KNOWN_MODELS[0].split('/')[-1]}`), or a hub id such as "
                f"{KNOWN_MODELS[0]}.")
    else:
        body = (f"{prefix}the weights of {model!r} are not available here ({reason}). Download them "
                f"while online, e.g. `hf download {model} --local-dir ./{model.split('/')[-1]}` "
                f"(gated models such as FLUX.1-dev and SD3.5 need their license accepted on huggingface.co "
                f"and `hf auth login` first; `hf` comes with huggingface_hub), then pass "
                f"--model ./{model.split('/')[-1]}; or run without HF_HUB_OFFLINE=1 so diffusers can fetch "
                f"and cache them. Supported: {', '.join(KNOWN_MODELS)}.")
    # never split a model id, a path or a command at its hyphens: they must stay copyable
    return textwrap.fill(body, width=100, break_on_hyphens=False, break_long_words=False)


def _family(pipe) -> Optional[str]:
    """The name of the model adapter (``taca.models``) whose pipelines include ``pipe``'s class."""
    from . import models

    a = models.adapter_for_pipeline(type(pipe).__name__)
    return None if a is None else a.name


# pipelines defined in taca, by the class name save_pretrained writes into model_index.json
_TACA_PIPELINES = {"MiniPipeline": ("taca.mini.model", "MiniPipeline")}


def _taca_pipeline_class(folder: str):
    import importlib
    import json

    try:
        with open(os.path.join(folder, "model_index.json")) as f:
            name = json.load(f).get("_class_name")
    except (OSError, ValueError):
        return None
    if name not in _TACA_PIPELINES:
        return None
    mod, attr = _TACA_PIPELINES[name]
    return getattr(importlib.import_module(mod), attr)


def _load_pipeline(model: str, dtype, command: str = "taca generate", argument: Optional[str] = None):
    """(pipe, None) or (None, message); the message names ``command`` (and ``argument``)."""
    def missing(reason):
        return missing_model_message(model, reason, command, argument)

    if _looks_like_path(model):
        path = os.path.expanduser(model)
        if os.path.isfile(path):
            return None, missing("it is a file, not a folder (single-file checkpoints are not supported)")
        if not os.path.isdir(path):
            return None, missing("no such folder")
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            return None, missing("it has no model_index.json")
        model = path
        own = _taca_pipeline_class(path)
        if own is not None:  # a pipeline class of taca's own (the miniature): not in diffusers' namespace
            return own.from_pretrained(path, dtype=dtype), None
    import warnings

    from ._quiet import quiet_imports

    with quiet_imports():
        from diffusers import DiffusionPipeline
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # the hub-connection chatter; our message says what matters
    try:
        with warnings.catch_warnings(), quiet_imports():  # the pipeline class is imported here
            warnings.simplefilter("ignore", FutureWarning)  # torch_dtype -> dtype rename in newer diffusers
            return DiffusionPipeline.from_pretrained(model, torch_dtype=dtype), None
    except (OSError, ValueError) as e:  # huggingface_hub's errors derive from these
        return None, missing(_reason(e))
    finally:
        dlogging.set_verbosity(level)


def _reason(e: BaseException) -> str:
    text = str(e)
    low = text.lower()
    if "offline" in low or "cached" in low or "cache" in low or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return ("they are not in the local Hugging Face cache and the hub cannot be reached "
                "(HF_HUB_OFFLINE=1 or no network)")
    if "gated" in low or "401" in low or "403" in low:
        return "the repository is gated: accept its license on huggingface.co and log in"
    if "404" in low or "not found" in low or "does not exist" in low:
        return "no such repository on the hub"
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return first if len(first) <= 160 else first[:157] + "..."


# The T5 token limits diffusers 0.42.1's FluxPipeline / StableDiffusion3Pipeline.check_inputs
# accept (512), and FLUX.1-schnell's (its T5 was used with 256 tokens: the model card's example).
MAX_SEQUENCE_LENGTH = {"flux": 512, "flux-schnell": 256, "sd3": 512}
_KNOWN_FAMILIES = {
    "black-forest-labs/FLUX.1-dev": "flux",
    "black-forest-labs/FLUX.1-schnell": "flux-schnell",
    "black-forest-labs/FLUX.1-Kontext-dev": "flux",
    "stabilityai/stable-diffusion-3-medium-diffusers": "sd3",
    "stabilityai/stable-diffusion-3.5-medium": "sd3",
    "stabilityai/stable-diffusion-3.5-large": "sd3",
    "stabilityai/stable-diffusion-3.5-large-turbo": "sd3",
    "black-forest-labs/FLUX.2-dev": "flux2",
    "black-forest-labs/FLUX.2-klein-4B": "flux2",
    "black-forest-labs/FLUX.2-klein-9B": "flux2",
    "Qwen/Qwen-Image": "qwenimage",
    "lodestones/Chroma1-HD": "chroma",
    "THUDM/CogView3-Plus-3B": "cogview3plus",
}


# the pipeline classes of the known hub ids whose class tells what they train on (reference images)
_KNOWN_PIPELINES = {
    "black-forest-labs/FLUX.1-dev": "FluxPipeline",
    "black-forest-labs/FLUX.1-schnell": "FluxPipeline",
    "black-forest-labs/FLUX.1-Kontext-dev": "FluxKontextPipeline",
    "black-forest-labs/FLUX.2-dev": "Flux2Pipeline",
    "black-forest-labs/FLUX.2-klein-4B": "Flux2KleinPipeline",
    "black-forest-labs/FLUX.2-klein-9B": "Flux2KleinPipeline",
}


def _peek_pipeline_class(model: str) -> Optional[str]:
    """The pipeline class name of a known hub id or a local folder's model_index.json (None: not
    known before loading)."""
    import json

    if model in _KNOWN_PIPELINES:
        return _KNOWN_PIPELINES[model]
    try:
        with open(os.path.join(os.path.expanduser(model), "model_index.json")) as f:
            cls = json.load(f).get("_class_name")
    except (OSError, ValueError):
        return None
    return cls if isinstance(cls, str) and cls else None


class UsageError(Exception):
    """A user mistake found before anything is loaded: ``str(e)`` is the one-line message."""

    def __init__(self, arg: Optional[str], msg: str, command: str = "taca generate"):
        super().__init__(f"{command}: argument {arg}: {msg}" if arg else f"{command}: {msg}")


def _peek_family(model: str) -> Optional[str]:
    """The family ("flux", "flux-schnell", "sd3", or another adapter's name) from a known hub id
    or a local folder's configs (no weights read), or None when it cannot be told before loading."""
    import json

    from . import models

    if model in _KNOWN_FAMILIES:
        return _KNOWN_FAMILIES[model]
    path = os.path.expanduser(model)
    try:
        with open(os.path.join(path, "model_index.json")) as f:
            cls = json.load(f).get("_class_name", "")
    except (OSError, ValueError):
        return None
    a = models.adapter_for_pipeline(cls)
    if a is None:
        return None
    if a.name != "flux":
        return a.name
    try:
        with open(os.path.join(path, "transformer", "config.json")) as f:
            guidance = json.load(f).get("guidance_embeds", True)
    except (OSError, ValueError):
        guidance = True
    return "flux" if guidance else "flux-schnell"


_FAMILY_WHAT = {"flux": "FLUX.1 pipelines", "flux-schnell": "FLUX.1-schnell", "sd3": "SD3/SD3.5 pipelines"}


def _check_family_args(args, family: Optional[str], command: str = "taca generate") -> None:
    """Checks that need the model family (known before loading for known ids and folders; None:
    not known yet, only the bounds common to every family). ``args``: max_sequence_length and
    negative_prompt (None: not given)."""
    from . import models

    adapter = models.by_name(family) if family is not None else None
    if family in MAX_SEQUENCE_LENGTH:
        limit, what, unit = MAX_SEQUENCE_LENGTH[family], _FAMILY_WHAT[family], "T5 tokens"
    elif adapter is not None:
        limit, what, unit = adapter.max_sequence_length, f"{adapter.short_label()} pipelines", "text tokens"
    else:
        limit = max([*MAX_SEQUENCE_LENGTH.values(), *(a.max_sequence_length for a in models.adapters())])
        what, unit = "the supported pipelines", "text tokens"
    n = args.max_sequence_length
    if n is not None and adapter is not None and not adapter.takes_max_sequence_length:
        raise UsageError("--max-sequence-length", f"{what} set the prompt length themselves and take no "
                                                  f"max_sequence_length; leave it out", command)
    if n is not None and n > limit:
        raise UsageError("--max-sequence-length", f"{what} take at most {limit} {unit}, got {n}", command)
    if args.negative_prompt is not None and family is not None and not (adapter is not None and adapter.negative_prompt):
        takes = [a.short_label() for a in models.adapters() if a.negative_prompt]
        raise UsageError("--negative-prompt", f"only {'; '.join(takes)} pipelines take a negative prompt here",
                         command)


def _is_schnell(pipe, family: Optional[str]) -> bool:
    """Whether a loaded FLUX.1 pipeline is FLUX.1-schnell's (its transformer has no guidance embedding)."""
    transformer = getattr(pipe, "transformer", None)
    return family == "flux" and transformer is not None and not getattr(transformer.config, "guidance_embeds", True)


# the pipeline call's arguments -> the option that sets them (pipeline_call's messages)
_CALL_FLAGS = {"num_inference_steps": "--steps", "max_sequence_length": "--max-sequence-length",
               "negative_prompt": "--negative-prompt", "height": "--height", "width": "--width"}


def pipeline_call(pipe, family: Optional[str], *, steps: Optional[int] = None, guidance: Optional[float] = None,
                  max_sequence_length: Optional[int] = None, height: Optional[int] = None,
                  width: Optional[int] = None, negative_prompt: Optional[str] = None, schnell: bool = False,
                  extra: Optional[Dict[str, str]] = None, command: str = "taca generate") -> Dict[str, Any]:
    """The keyword arguments of ``pipe(prompt=..., generator=..., **call)`` for the command-line
    options (None: the pipeline's default), shared by ``taca generate`` and ``taca eval generate``:
    the guidance scale under the family's argument (``Adapter.guidance_arg``: Qwen-Image's
    ``true_cfg_scale``, HunyuanImage's ``distilled_guidance_scale``, ...), the family's own
    adjustments (``Adapter.generate_call``: Ideogram 4's guidance schedule), FLUX.1-schnell's
    defaults (4 steps, guidance 0, 256 T5 tokens) where ``schnell``. ``extra``: further call
    arguments the caller passes, by the option that sets them (checked alike). Raises UsageError,
    naming the option, for an argument ``pipe.__call__`` does not take, before any image is made."""
    import inspect

    from . import models

    adapter = models.by_name(family) if family is not None else None
    call: Dict[str, Any] = {}
    if steps is not None:
        call["num_inference_steps"] = steps
    elif schnell:
        call["num_inference_steps"] = 4
    if guidance is not None:
        call[adapter.guidance_arg if adapter is not None else "guidance_scale"] = guidance
    elif schnell:
        call["guidance_scale"] = 0.0
    if max_sequence_length is not None:
        call["max_sequence_length"] = max_sequence_length
    elif schnell:
        call["max_sequence_length"] = MAX_SEQUENCE_LENGTH["flux-schnell"]
    for k, v in (("height", height), ("width", width), ("negative_prompt", negative_prompt)):
        if v is not None:
            call[k] = v
    if adapter is not None:
        call = adapter.generate_call(call)
    params = inspect.signature(pipe.__call__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        flags = {**_CALL_FLAGS, **(extra or {})}
        for k in [*call, *(extra or {})]:
            if k not in params:  # caught before any image is made
                raise UsageError(flags.get(k, "--guidance"), f"{type(pipe).__name__} takes no {k}", command)
    return call


def _image_format(path: str) -> str:
    """Pillow's format name for the extension of ``path`` (raises UsageError if Pillow cannot write it)."""
    from PIL import Image

    Image.init()
    ext = os.path.splitext(path)[1].lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        writable = sorted({e for e, f in Image.registered_extensions().items() if f in Image.SAVE}
                          & {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
        got = f"{ext!r}" if ext else "no extension"
        raise UsageError("--out", f"{path}: Pillow cannot write images with {got}; use one of {', '.join(writable)}")
    return fmt


def _check_lora(lora: str) -> None:
    if not _looks_like_path(lora):
        return  # a hub id or an adapter name: checked when it is loaded
    path = os.path.expanduser(lora)
    if not os.path.exists(path):
        raise UsageError("--lora", f"{lora} does not exist")
    if os.path.isdir(path):
        names = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not names:
            raise UsageError("--lora", f"the folder {lora} holds no .safetensors file; pass the LoRA file itself "
                                       "or a folder with one (diffusers' pytorch_lora_weights.safetensors)")
        if len(names) > 1 and "pytorch_lora_weights.safetensors" not in names:
            raise UsageError("--lora", f"the folder {lora} holds several .safetensors files ({', '.join(names)}) "
                                       "and no pytorch_lora_weights.safetensors; pass the file itself")
        path = os.path.join(path, "pytorch_lora_weights.safetensors" if len(names) > 1 else names[0])
    elif not path.endswith(".safetensors"):
        raise UsageError("--lora", f"{lora} is not a .safetensors file")
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # a truncated or foreign file; only the header is read here
        raise UsageError("--lora", f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    if not keys:
        raise UsageError("--lora", f"{path} holds no tensors")
    # diffusers / PEFT (lora_A, lora_B) and kohya (lora_down, lora_up) names; a LoRA has both halves
    if not (any("lora_A" in k or "lora_down" in k for k in keys) and any("lora_B" in k or "lora_up" in k for k in keys)):
        raise UsageError("--lora", f"{path} holds no LoRA weights (no lora_A/lora_B or lora_down/lora_up pairs "
                                   f"among its {len(keys)} tensors, e.g. {keys[0]})")


def validate_generate_args(args) -> str:
    """Every check that needs no model: raises :class:`UsageError`; returns the device."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device", "cuda was given but torch sees no CUDA GPU (torch "
                                     f"{torch.__version__}, CUDA build: {torch.version.cuda}); use --device cpu")
    if args.backend in ("cpu", "cuda") and args.backend != device:
        raise UsageError("--backend", f"{args.backend} runs on {args.backend} tensors but the model runs on "
                                      f"--device {device}; use --backend auto (or --device {args.backend})")
    if args.backend in ("cpu", "cuda"):
        from . import ops

        if not (ops.HAVE_CUDA_KERNEL if args.backend == "cuda" else ops.HAVE_KERNELS):
            raise UsageError("--backend", f"{args.backend}: taca was built without this kernel; use --backend auto")
    if args.fp8:
        if device != "cuda":
            raise UsageError("--fp8", f"runs the FP8 CUDA kernel; it needs --device cuda, not {device}")
        if args.dtype == "fp32":
            raise UsageError("--fp8", "takes bf16 or fp16 models (the kernel quantizes 16-bit q, k, v), not --dtype fp32")
        if args.backend not in ("auto", "cuda"):
            raise UsageError("--fp8", f"runs the CUDA kernel; --backend {args.backend} cannot (use auto or cuda)")
        from . import ops

        if not ops.HAVE_CUDA_KERNEL:
            raise UsageError("--fp8", "taca was built without CUDA kernels")
        if torch.cuda.get_device_capability() != (9, 0):
            raise UsageError("--fp8", f"needs an sm_90 GPU (H100 / H200); this one is "
                                      f"{torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
    if args.offload and device != "cuda":
        raise UsageError("--offload", f"moves models between the GPU and the CPU; it needs --device cuda, not {device}")
    for name in ("height", "width"):
        v = getattr(args, name)
        if v is not None and v % 16:
            raise UsageError(f"--{name}", f"must be a multiple of 16, got {v}")
    out = os.path.abspath(os.path.expanduser(args.out))
    out_dir = os.path.dirname(out)
    if not os.path.isdir(out_dir):
        raise UsageError("--out", f"folder {out_dir} does not exist")
    if os.path.isdir(out):
        raise UsageError("--out", f"{args.out} is a folder; give a file name such as {os.path.join(args.out, 'taca.png')}")
    if not os.access(out_dir, os.W_OK):
        raise UsageError("--out", f"folder {out_dir} is not writable")
    _image_format(out)
    if os.path.exists(out) and not args.overwrite:
        raise UsageError("--out", f"{args.out} exists; pass --overwrite to replace it, or another --out")
    if args.lora is not None:
        _check_lora(args.lora)
    _check_family_args(args, _peek_family(args.model))
    return device


def cmd_generate(args) -> int:
    err = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    try:
        device = validate_generate_args(args)
    except UsageError as e:
        err(str(e))
        return 2
    import torch

    dtype = getattr(torch, _DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")])
    pipe, msg = _load_pipeline(args.model, dtype)
    if pipe is None:
        err(msg)
        return 2
    family = _family(pipe)
    if family is None:
        from . import models

        err(f"taca generate: {args.model} loads as {type(pipe).__name__}, which is not a FLUX or SD3/SD3.5 "
            f"pipeline nor another supported one; TACA supports the pipelines of {models.supported()}")
        return 2
    schnell = _is_schnell(pipe, family)
    try:  # again, with the family the loaded pipeline really has
        _check_family_args(args, "flux-schnell" if schnell else family)
        head_dim = getattr(pipe.transformer.config, "attention_head_dim", None)
        if args.fp8 and isinstance(head_dim, int) and head_dim != 128:
            raise UsageError("--fp8", f"the FP8 kernel takes head dim 128; this {type(pipe).__name__}'s transformer has "
                                      f"{head_dim}")
    except UsageError as e:
        err(str(e))
        return 2
    if args.offload:
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device)

    try:
        call = dict(prompt=args.prompt, **pipeline_call(
            pipe, family, steps=args.steps, guidance=args.guidance, max_sequence_length=args.max_sequence_length,
            height=args.height, width=args.width, negative_prompt=args.negative_prompt, schnell=schnell))
    except UsageError as e:
        err(str(e))
        return 2

    import taca

    def run(on: bool):
        gen = torch.Generator(device="cpu").manual_seed(args.seed)
        if not on:
            return pipe(generator=gen, **call).images[0], None
        import logging

        # diffusers logs a failed LoRA load before raising; the one line below says it instead
        peft_log = logging.getLogger("diffusers.loaders.peft")
        drop = lambda rec: "was unsuccessful with the following error" not in rec.getMessage()  # noqa: E731
        peft_log.addFilter(drop)
        try:
            handle = taca.enable(pipe, gamma=args.gamma, schedule=args.schedule, lora=args.lora,
                                 gamma_reverse=args.gamma_reverse, backend=args.backend, fp8=args.fp8)
        except Exception as e:
            if args.lora is None:
                raise  # nothing the user gave can be at fault: a bug, keep its traceback
            # a LoRA for another model, a hub id while offline: diffusers raises anything here
            if not _looks_like_path(args.lora) and isinstance(e, (OSError, ValueError)):
                why = (f"{_reason(e)}; download it while online (`hf download {args.lora} --local-dir "
                       f"./{args.lora.split('/')[-1]}`) and pass the .safetensors file")
            else:
                why = f"{type(e).__name__}: {str(e).replace('taca: ', '').strip().splitlines()[0][:300]}"
            raise UsageError("--lora", f"cannot load {args.lora} into {type(pipe).__name__}: {why}") from None
        finally:
            peft_log.removeFilter(drop)
        steps_on: List[bool] = []
        hook = pipe.transformer.register_forward_hook(lambda *a: steps_on.append(handle.last_gamma is not None))
        try:
            return pipe(generator=gen, **call).images[0], steps_on
        finally:
            hook.remove()
            taca.disable(pipe)

    print(f"taca generate: {type(pipe).__name__} ({family}) on {device}, {str(dtype).replace('torch.', '')}; "
          f"gamma={args.gamma:g}, schedule={args.schedule}, seed={args.seed}", file=sys.stderr)
    try:  # TACA on first: a LoRA that does not load fails before any image is made
        img, steps_on = run(True)
    except UsageError as e:
        err(str(e))
        return 2
    on_idx = [i for i, s in enumerate(steps_on or []) if s]
    print(f"taca generate: gamma was on in transformer calls {on_idx} of {len(steps_on or [])}", file=sys.stderr)
    images = [(f"TACA gamma={args.gamma:g} ({args.schedule})", img)]
    if args.compare:
        try:
            images.insert(0, ("TACA off", run(False)[0]))
        except BaseException:  # Ctrl-C or a crash in the second run: keep the finished TACA image
            path, note, _ = save_image(img, args.out, overwrite=args.overwrite)
            if note:
                err(note)
            if path is not None:
                err(f"taca generate: the TACA-off run of --compare did not finish; the TACA image alone is in {path}")
            raise
    out = images[0][1] if len(images) == 1 else _side_by_side(images)
    path, note, rescued = save_image(out, args.out, overwrite=args.overwrite)
    if note:
        err(note)
    if path is None:
        return 1
    print(f"taca generate: wrote {path}" + (" (left: TACA off, right: TACA on)" if args.compare else ""))
    return 1 if rescued else 0


def _free_name(path: str) -> str:
    root, ext = os.path.splitext(path)
    i = 1
    while os.path.exists(f"{root}-{i}{ext}"):
        i += 1
    return f"{root}-{i}{ext}"


def save_image(img, out: str, overwrite: bool = False):
    """Write a finished image to ``out``; never lose it. Returns (path written or None, note or
    None, rescued): ``rescued`` is True when ``out`` could not be written and the image went
    elsewhere (path None: nowhere at all).

    ``out`` was checked before generating; if it appeared since and ``overwrite`` is off, the
    image goes to ``name-1.ext`` beside it. If writing fails (disk full, folder removed, ...),
    the image is saved as PNG in the current folder, else in the temp folder, and the note says
    where and why.
    """
    import tempfile
    import time

    out = os.path.abspath(os.path.expanduser(out))
    note = None
    if os.path.exists(out) and not overwrite:
        new = _free_name(out)
        note = f"taca generate: {out} appeared while generating; not replacing it, writing {new} instead"
        out = new
    try:
        img.save(out)
        return out, note, False
    except Exception as e:  # anything Pillow or the OS raises: the image must survive it
        why = f"{type(e).__name__}: {e}"
    name = f"taca-rescued-{time.strftime('%Y%m%d-%H%M%S')}.png"
    for folder in (os.getcwd(), tempfile.gettempdir()):
        cand = _free_name(os.path.join(folder, name)) if os.path.exists(os.path.join(folder, name)) else os.path.join(folder, name)
        try:
            img.save(cand, format="PNG")
        except Exception:
            continue
        return cand, (f"taca generate: argument --out: could not write {out} ({why}); the image was saved to "
                      f"{cand} instead"), True
    return None, (f"taca generate: argument --out: could not write {out} ({why}), nor a copy in {os.getcwd()} "
                  f"or {tempfile.gettempdir()}; the image is lost"), True


def _side_by_side(images):
    from PIL import Image, ImageDraw

    w = sum(im.width for _, im in images)
    h = max(im.height for _, im in images)
    pad = 20
    canvas = Image.new("RGB", (w, h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for label, im in images:
        canvas.paste(im.convert("RGB"), (x, pad))
        draw.text((x + 4, 4), label, fill="black")
        x += im.width
    return canvas


# bench --------------------------------------------------------------------------------------
def find_benchmarks() -> Optional[str]:
    """The repository's benchmarks/ folder (next to the taca package in a source checkout, or
    under the current directory), or None."""
    here = os.path.dirname(os.path.abspath(__file__))
    for root in (os.path.dirname(here), os.getcwd()):
        cand = os.path.join(root, "benchmarks")
        if os.path.isdir(cand):
            return cand
    return None


def cmd_bench(args) -> int:
    import subprocess

    folder = find_benchmarks()
    if folder is None:
        print("taca bench: the benchmarks/ folder is not available (it ships with the repository, not with the "
              "installed package). Clone the taca repository, install it with `pip install --no-build-isolation "
              "-e .`, and run `taca bench` (or `python benchmarks/bench_attention.py`) from there.", file=sys.stderr)
        return 2
    script = os.path.join(folder, args.script)
    if not os.path.isfile(script):
        found = sorted(f for f in os.listdir(folder) if f.endswith(".py"))
        print(f"taca bench: argument --script: {script} does not exist; scripts in {folder}: "
              f"{', '.join(found) or 'none'}", file=sys.stderr)
        return 2
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (no CUDA GPU visible to torch)"
    print(f"taca bench: {script} on {dev}", file=sys.stderr, flush=True)
    return subprocess.call([sys.executable, script, *args.extra], cwd=os.path.dirname(folder))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
