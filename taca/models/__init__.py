"""Model adapters: everything taca knows about one diffusers transformer family, in one module.

An :class:`Adapter` subclass says

- ``transformer_classes``: the diffusers transformer class names it serves (subclasses too);
- ``joint_modules(transformer)``: the attention modules that get a TACA processor (refiners,
  text-only and image-only blocks left out, or served by a processor that runs them stock);
- ``stock_processors``: the processor class names TACA reproduces exactly at gamma = 1 (any other
  processor on a joint module makes ``taca.enable`` raise TypeError naming it);
- ``processor(name, module)``: the TACA processor for one joint module (a
  :class:`taca.processors.TacaProcessor` subclass reproducing the stock q/k/v and output);
- ``call_state(arg)``: what the forward pre-hook injects into the attention kwargs for one
  transformer call (default: ``taca_text_len`` = ``encoder_hidden_states.shape[1]``), read from
  the transformer's forward arguments (``arg(name)``);
- ``timestep``: how the transformer's ``timestep`` maps to sigma: "sigma" (sigma itself),
  "t1000" (t = 1000 sigma), "1-sigma" (reversed), "1-t1000", "scheduler" (the transformer gets
  the scheduler's unshifted timestep t, plus ``scheduler_t_offset``: sigma is the pipeline's
  ``scheduler.sigmas[i]`` where ``scheduler.timesteps[i] == t``; needs ``taca.enable(pipe)``);
- ``kwargs_name``: the forward argument that carries attention kwargs to the processors; None
  when the model's forward has none that reaches them (LongCat-Image, Bria, HiDream, Z-Image,
  HunyuanImage, ERNIE-Image, Krea 2, Lumina 2, HunyuanVideo, Mochi, HunyuanVideo 1.5, PRX,
  HunyuanVideo Framepack, Motif-Video): then the hook sets the
  call's state as ``processor.taca_call`` (a dict of the same keys) and a forward hook clears it
  after the call;
- ``textless(arg)``: True for a call with no text (no gamma, its timestep not read);
- ``timestep_arg``: the forward argument holding the timestep ("timestep"; HiDream "timesteps",
  Z-Image "t"); ``timestep_value(arg)``: the value read from it (per-token timesteps reduced to the
  noisy target's: Cosmos3, MiniMax-H3); ``batch(arg)``: (batch size, device) of one call, from ``hidden_states`` by default;
- ``current_t_pipelines``: diffusers pipelines whose ``__call__`` sets ``self._current_timestep =
  t`` right before calling the transformer with ``timestep = t.expand(B).to(latents.dtype) /
  1000`` (then the hook may read sigma on the host without a device sync; see taca.pipeline);
- for ``taca generate``: ``pipelines`` (the diffusers pipeline classes of the family that
  generate from a prompt alone; ``serves_pipeline`` may widen this), ``negative_prompt`` (the
  pipelines take one), ``guidance_arg`` (the call argument ``--guidance`` sets),
  ``max_sequence_length`` (the most text tokens the pipelines accept), ``generate_call`` (the
  call's arguments adjusted for the pipelines).

Adding a model: one module here defining a subclass decorated with :func:`register`, its name
added to ``_BUILTIN`` below, and one test (``tests/test_models_<family>.py``).
``taca.enable`` picks the adapter of the most derived registered class in the transformer's MRO.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Tuple, Type

import torch

_BUILTIN = (
    "flux", "sd3", "flux2", "qwenimage", "chroma",
    "longcat", "ovis", "bria", "hidream", "zimage", "hunyuanimage",
    "auraflow", "cogview4", "glm_image", "ernie_image", "krea2", "lumina2",
    "cogvideox", "hunyuan_video", "mochi", "hunyuan_video15", "prx", "nucleusmoe", "cogview3plus", "consisid",
    "easyanimate", "hunyuan_video_framepack", "motif_video", "flux3", "bria_fibo2", "cosmos3", "minimax_h3", "qwenimage21", "omnigen", "ideogram4", "joyimage",
)
_REGISTRY: List[Type["Adapter"]] = []
_loaded = False

TIMESTEP_CONVENTIONS = ("sigma", "t1000", "1-sigma", "1-t1000", "scheduler")


class Adapter:
    """What taca needs to know about one transformer family (see the module docstring)."""

    name: str = ""
    label: str = ""  # for messages: "FluxTransformer2DModel (FLUX.1, FLUX Kontext)"
    transformer_classes: Tuple[str, ...] = ()
    stock_processors: FrozenSet[str] = frozenset()
    timestep: str = "sigma"
    kwargs_name: Optional[str] = "joint_attention_kwargs"
    timestep_arg: str = "timestep"
    current_t_pipelines: FrozenSet[str] = frozenset()
    # pipelines' _current_timestep is 1000 sigma (true for flow-matching pipelines that pass
    # t / 1000 or t): the hook may use it to undo the latents-dtype rounding of the timestep
    pipeline_t_is_1000_sigma: bool = True
    # timestep "scheduler": the transformer gets scheduler.timesteps[i] + this (GLM-Image: -1)
    scheduler_t_offset: float = 0.0
    pipelines: Tuple[str, ...] = ()
    negative_prompt: bool = False
    guidance_arg: str = "guidance_scale"
    max_sequence_length: int = 512
    # the pipelines' __call__ takes max_sequence_length (LongCat-Image, HunyuanImage and ERNIE-Image
    # fix the prompt length themselves)
    takes_max_sequence_length: bool = True

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer

    @classmethod
    def short_label(cls) -> str:
        """The model names inside ``label``'s parentheses ("FLUX.1, FLUX Kontext"), else ``name``."""
        if "(" in cls.label:
            return cls.label[cls.label.index("(") + 1 : cls.label.rindex(")")]
        return cls.name

    @classmethod
    def generate_call(cls, call: Dict[str, Any]) -> Dict[str, Any]:
        """``taca generate``'s pipeline call arguments, adjusted for this family's pipelines
        (Ideogram 4: a guidance scale replaces the default guidance schedule). Default: as given."""
        return call

    @classmethod
    def serves_pipeline(cls, name: str) -> bool:
        """Whether the diffusers pipeline class ``name`` is one of this family's."""
        return name in cls.pipelines

    # --- which modules -------------------------------------------------------------------
    def joint_modules(self) -> Dict[str, torch.nn.Module]:
        """{qualified name: attention module} that get a TACA processor. Default: every module
        with a processor."""
        return attention_modules(self.transformer)

    def processor(self, name: str, module: torch.nn.Module):
        raise NotImplementedError

    def check_processor(self, name: str, module: torch.nn.Module) -> None:
        """Raise TypeError when ``module``'s current processor is not one TACA reproduces."""
        cls = type(module.processor).__name__
        if cls not in self.stock_processors:
            raise TypeError(
                f"taca: {name} uses {cls}; taca.enable replaces only diffusers' stock processors "
                f"({', '.join(sorted(self.stock_processors))}), so it would silently drop what {cls} does "
                f"(e.g. an IP-Adapter); restore the stock processors first"
            )

    # --- per call ------------------------------------------------------------------------
    def batch(self, arg: Callable[[str], Any]) -> Optional[Tuple[int, torch.device]]:
        """(batch size, device) of one transformer call, or None when the input is missing."""
        hs = arg("hidden_states")
        return None if hs is None else (int(hs.shape[0]), hs.device)

    def timestep_value(self, arg: Callable[[str], Any]) -> Any:
        """The timestep of one transformer call that ``timestep`` converts to sigma: a (B,) or
        one-element tensor or a Python number. Default: the ``timestep_arg`` argument as passed.
        Models with per-token timesteps (Cosmos3, MiniMax-H3) reduce them to the noisy target's."""
        return arg(self.timestep_arg)

    def textless(self, arg: Callable[[str], Any]) -> bool:
        """True when this transformer call has no text at all (GLM-Image's condition-image
        KV-cache writes, called at timestep 0 before the pipeline sets its schedule): the hook
        then gives it no gamma without reading its timestep (and counts no step). Default False."""
        return False

    def checkpointed_args(self, block: torch.nn.Module, args: tuple, arg: Callable[[str], Any]) -> tuple:
        """The positional arguments of a block the transformer's forward checkpoints (``args``, as
        that forward passes them to ``_gradient_checkpointing_func``). A model whose checkpointing
        branch drops arguments its plain branch passes (TACA's attention kwargs among them) puts
        them back here; ``arg(name)`` reads the forward's own arguments, TACA's state included.
        Default: unchanged (the hook then leaves the checkpointing function alone)."""
        return args

    def call_state(self, arg: Callable[[str], Any]) -> Dict[str, Any]:
        """The attention kwargs the hook injects for one call (besides ``taca_gamma``)."""
        ehs = arg("encoder_hidden_states")
        if ehs is None:
            raise ValueError("taca: the transformer was called without timestep or encoder_hidden_states")
        return {"taca_text_len": int(ehs.shape[1])}


def attention_modules(transformer: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    return {
        name: m for name, m in transformer.named_modules()
        if hasattr(m, "set_processor") and hasattr(m, "processor")
    }


def register(cls: Type[Adapter]) -> Type[Adapter]:
    """Class decorator: make ``cls`` known to ``taca.enable``."""
    if cls.timestep not in TIMESTEP_CONVENTIONS:
        raise ValueError(f"taca: {cls.__name__}.timestep={cls.timestep!r} is not one of {TIMESTEP_CONVENTIONS}")
    if cls not in _REGISTRY:
        _REGISTRY.append(cls)
    return cls


def adapters() -> List[Type[Adapter]]:
    """The registered adapter classes (built-in ones first, in ``_BUILTIN`` order)."""
    global _loaded
    if not _loaded:
        for mod in _BUILTIN:
            importlib.import_module(f".{mod}", __name__)
        _loaded = True
    return list(_REGISTRY)


def adapter_class(transformer) -> Optional[Type[Adapter]]:
    """The adapter of the most derived diffusers class in ``transformer``'s MRO, or None."""
    by_class = {}
    for a in adapters():
        for c in a.transformer_classes:
            by_class.setdefault(c, a)
    for c in type(transformer).__mro__:
        if c.__name__ in by_class and (c.__module__ or "").startswith("diffusers."):
            return by_class[c.__name__]
    return None


def adapter_for_pipeline(name: str) -> Optional[Type[Adapter]]:
    """The adapter serving the diffusers pipeline class ``name``, or None."""
    for a in adapters():
        if a.serves_pipeline(name):
            return a
    return None


def by_name(name: str) -> Optional[Type[Adapter]]:
    for a in adapters():
        if a.name == name:
            return a
    return None


def supported() -> str:
    """The supported transformers, for messages."""
    return ", ".join(a.label or ", ".join(a.transformer_classes) for a in adapters())


def sigma_of(timestep: float, convention: str) -> Optional[float]:
    """sigma (a Python float) of one transformer ``timestep`` value under ``convention`` (None for
    "scheduler": the value alone does not tell)."""
    x = float(timestep)
    if convention == "scheduler":
        return None  # only the pipeline's scheduler knows (taca.pipeline reads it there)
    return {"sigma": x, "t1000": x / 1000.0, "1-sigma": 1.0 - x, "1-t1000": 1.0 - x / 1000.0}[convention]
