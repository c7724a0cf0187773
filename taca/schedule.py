"""When TACA's temperature gamma is on: gamma as a function of the noise level (or step).

Noise level: sigma in [0, 1] (FLUX passes sigma to its transformer; SD3 passes t = 1000 sigma,
which ``taca.enable`` divides by 1000). The same names work in Python (``schedule=``) and on the
command line (``--schedule``); ``schedule=None`` in Python is the default, ``"paper"``. Rules:

- ``"paper"`` (default, :class:`PaperSchedule`): gamma0 when t >= 970, i.e. sigma >= 0.97, else 1
  (arXiv 2506.07986, section 3.3). Works per sample, so it is also the rule for training, where
  every sample in a batch has its own t.
- ``"steps:k"`` (:class:`StepSchedule`): gamma0 in the first k denoising steps of each pipeline
  call, else 1 (the authors' inference code: ``i < 3``). The step index is the number of distinct
  decreasing sigmas seen since the call began (see ``taca.pipeline``); every sample of the batch
  gets the same gamma.
- ``"constant"`` (:class:`ConstantSchedule`; ``"always"`` is the same): gamma0 at every step.
- ``"none"`` is refused: it read as "no schedule" (the paper's default) to some and as "no
  window, gamma always" to others. Use ``"constant"`` for gamma at every step, ``"paper"`` for
  the paper's rule, and gamma = 1 (or ``taca.disable``) for TACA off.
- any callable ``f(sigma) -> gamma``: ``sigma`` is a (B,) float32 tensor, the result a (B,)
  tensor or a float (:class:`CallableSchedule`).

Which denoising steps (0-based) get gamma, computed with the real schedulers by
:func:`window_steps` (FLUX.1-dev scheduler config, 1024x1024 = 4096 image tokens, the pipeline's
own sigmas and dynamic shift; SD3/SD3.5 config, static shift 3)::

    rule        model        28 steps     30 steps     50 steps
    paper       FLUX.1-dev   0-2          0-2          0-4
    paper       SD3 shift 3  0-2          0-2          0-4
    steps:3     both         0-2          0-2          0-2
    constant    both         all          all          all

The sigmas right around 0.97: FLUX 28 steps .9762 | .9634, 30 steps .9779 | .9660, 50 steps
.9732 | .9660; SD3 28 steps .9741 | .9601, 30 steps .9760 | .9631, 50 steps .9713 | .9636. The
window of the paper's rule moves with resolution (FLUX's shift depends on the token count), step
count and shift; "steps:k" does not. FLUX pipelines pass the timestep in the latents' dtype
(bf16 rounds sigma near 0.97 to multiples of 1/256); ``taca.enable`` on a pipeline reads the
exact timestep from the pipeline instead when it has one.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Union

import torch

SigmaFn = Callable[[torch.Tensor], Union[torch.Tensor, float]]

PAPER_THRESHOLD = 0.97
# sigma tolerance of the threshold comparison: absorbs float32 rounding of t / 1000 only.
SIGMA_SLACK = 1e-5


class Schedule:
    """Base class. ``gamma0`` is filled in by ``taca.enable(gamma=...)`` when left None.

    ``needs_step``: the rule needs the denoising step index (the hook then tracks it).
    """

    needs_step: bool = False

    def __init__(self, gamma: Optional[float] = None):
        self.gamma0 = None if gamma is None else _check_gamma(gamma, "gamma")

    def with_gamma(self, gamma0: float) -> "Schedule":
        """This schedule, with gamma0 set to ``gamma0`` where it was left None."""
        if self.gamma0 is None:
            self.gamma0 = _check_gamma(gamma0, "gamma")
        return self

    def __call__(self, sigma: torch.Tensor, step: Optional[int] = None) -> torch.Tensor:
        """gamma per sample: sigma (B,) float32 -> (B,) float32 on sigma's device."""
        raise NotImplementedError

    def _g0(self) -> float:
        if self.gamma0 is None:
            raise ValueError("taca: this schedule has no gamma yet; pass gamma= to it or to taca.enable")
        return self.gamma0


class PaperSchedule(Schedule):
    """gamma0 where sigma >= threshold (the paper: t >= 970 of 1000), else 1; per sample."""

    def __init__(self, gamma: Optional[float] = None, threshold: float = PAPER_THRESHOLD):
        super().__init__(gamma)
        if not (0.0 <= float(threshold) <= 1.0):
            raise ValueError(f"taca: threshold={threshold} must be a sigma in [0, 1] (t / 1000)")
        self.threshold = float(threshold)

    def __call__(self, sigma, step=None):
        g0 = self._g0()
        on = sigma >= (self.threshold - SIGMA_SLACK)
        return torch.where(on, torch.full_like(sigma, g0), torch.ones_like(sigma))

    def __repr__(self):
        return f"PaperSchedule(gamma={self.gamma0}, threshold={self.threshold})"


class StepSchedule(Schedule):
    """gamma0 in the first ``k`` denoising steps of each pipeline call, else 1 (the authors' code).

    Limits (the step index comes from the hook in ``taca.pipeline``): steps are counted as
    distinct decreasing sigmas, so extra forwards at the same sigma (true CFG, SD3 skip-layer
    guidance) count once, but multi-stage samplers (Heun, DPM-2) that evaluate intermediate
    sigmas count each evaluation; calls that do not go through a pipeline (training) have no
    meaningful step: use a sigma rule there.
    """

    needs_step = True

    def __init__(self, k: int = 3, gamma: Optional[float] = None):
        super().__init__(gamma)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"taca: steps k={k!r} must be an int >= 0")
        self.k = k

    def __call__(self, sigma, step=None):
        if step is None:
            raise ValueError("taca: StepSchedule needs the denoising step index")
        g = self._g0() if step < self.k else 1.0
        return torch.full_like(sigma, g)

    def __repr__(self):
        return f"StepSchedule(k={self.k}, gamma={self.gamma0})"


class ConstantSchedule(Schedule):
    """gamma0 at every step and noise level."""

    def __call__(self, sigma, step=None):
        return torch.full_like(sigma, self._g0())

    def __repr__(self):
        return f"ConstantSchedule(gamma={self.gamma0})"


class CallableSchedule(Schedule):
    """Wraps ``fn(sigma) -> gamma``; sigma (B,) float32, result (B,) tensor or float."""

    def __init__(self, fn: SigmaFn):
        super().__init__(None)
        if not callable(fn):
            raise TypeError(f"taca: schedule must be callable, got {type(fn).__name__}")
        self.fn = fn

    def with_gamma(self, gamma0):
        return self

    def __call__(self, sigma, step=None):
        g = self.fn(sigma)
        if isinstance(g, torch.Tensor):
            g = g.to(device=sigma.device, dtype=torch.float32)
            if g.dim() == 0:
                g = g.expand(sigma.shape[0])
            if g.shape != sigma.shape:
                raise ValueError(
                    f"taca: schedule returned gamma of shape {tuple(g.shape)}, expected {tuple(sigma.shape)} (one per sample)"
                )
            return g
        return torch.full_like(sigma, _check_gamma(g, "schedule result"))

    def __repr__(self):
        return f"CallableSchedule({self.fn!r})"


def _check_gamma(g, what: str) -> float:
    g = float(g)
    if not math.isfinite(g) or g <= 0:
        raise ValueError(f"taca: {what}={g} must be finite and > 0")
    return g


def parse(spec: Union[None, str, Schedule, SigmaFn], gamma: float = 1.2) -> Schedule:
    """A :class:`Schedule` from a spec: None or "paper" (the default; "paper:0.95" sets the sigma
    threshold), "steps:k", "constant" (alias "always"), a Schedule, or a callable sigma -> gamma.
    ``gamma`` fills in gamma0 where the spec has none. "none" is refused (see the module
    docstring): the error says which name to use instead.
    """
    if spec is None:
        return PaperSchedule().with_gamma(gamma)
    if isinstance(spec, Schedule):
        return spec.with_gamma(gamma)
    if isinstance(spec, str):
        s = spec.strip().lower()
        name, _, arg = s.partition(":")
        if name == "paper":
            try:
                threshold = float(arg) if arg else PAPER_THRESHOLD
            except ValueError:
                raise ValueError(f"taca: schedule={spec!r}: expected 'paper:<sigma>' with a number, "
                                 "e.g. 'paper:0.95'") from None
            return PaperSchedule(threshold=threshold).with_gamma(gamma)
        if name in ("steps", "step"):
            try:
                k = int(arg)
            except ValueError:
                raise ValueError(f"taca: schedule={spec!r}: expected 'steps:<k>' with an integer k") from None
            return StepSchedule(k).with_gamma(gamma)
        if name in ("constant", "always") and not arg:
            return ConstantSchedule().with_gamma(gamma)
        if name in ("none", "off") and not arg:
            raise ValueError(
                f"taca: schedule={spec!r} is ambiguous and not accepted: use 'constant' for gamma at every "
                "step, 'paper' for the paper's rule (the default), or gamma 1 to turn TACA off"
            )
        raise ValueError(
            f"taca: schedule={spec!r} is not one of 'paper', 'paper:<sigma>', 'steps:<k>', 'constant'"
        )
    if callable(spec):
        return CallableSchedule(spec)
    raise TypeError(f"taca: schedule must be None, a str, a Schedule or a callable, got {type(spec).__name__}")


def pipeline_sigmas(model: str, num_steps: int, image_seq_len: int = 4096) -> torch.Tensor:
    """The sigmas (num_steps,) float32 that diffusers' FLUX or SD3 pipeline hands its transformer
    at each step (FLUX.1-dev / SD3 scheduler configs), computed with the real scheduler.

    model: "flux" (uses the FluxPipeline's sigma list and dynamic shift for ``image_seq_len``
    tokens) or "sd3" (static shift 3).
    """
    import numpy as np

    from . import tiny

    if model == "flux":
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        sch = tiny.flux_scheduler()
        c = sch.config
        mu = calculate_shift(image_seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
        ts, _ = retrieve_timesteps(sch, num_steps, "cpu", sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    elif model == "sd3":
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps

        ts, _ = retrieve_timesteps(tiny.sd3_scheduler(), num_steps, "cpu")
    else:
        raise ValueError(f"taca: model={model!r} is not 'flux' or 'sd3'")
    return (ts / 1000).to(torch.float32)


def window_steps(schedule: Union[None, str, Schedule, SigmaFn], model: str, num_steps: int,
                 image_seq_len: int = 4096) -> List[int]:
    """0-based indices of the denoising steps where gamma != 1 (for a batch of one)."""
    sch = parse(schedule, 1.2)
    sig = pipeline_sigmas(model, num_steps, image_seq_len)
    return [i for i in range(num_steps) if float(sch(sig[i : i + 1], i)[0]) != 1.0]
