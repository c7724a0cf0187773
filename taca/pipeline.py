"""Turn TACA on and off on a diffusers pipeline (or bare transformer) of a supported model.

What a model is (which modules are joint attention, where the text sits, the timestep convention,
the processors to install) comes from its adapter in ``taca.models``; nothing here knows a model
by name. ``taca.enable(pipe)`` installs one TACA processor per joint attention module (keeping the
previous processor objects) and a forward pre-hook on the transformer. On every transformer call
the hook reads ``timestep`` (converted to sigma by the adapter's convention, e.g. FLUX passes
sigma, SD3 t = 1000 sigma) and what the adapter needs of the text layout (the text length, from
``encoder_hidden_states.shape[1]`` by default), evaluates the schedule per sample, and injects
``taca_gamma`` ((B,) float32 on the device, or None when no sample is in the window: then every
processor takes diffusers' stock path) and the adapter's call state (``taca_text_len``) into a
copy of the attention kwargs (``joint_attention_kwargs`` or the adapter's ``kwargs_name``; for
models whose forward carries no attention kwargs to the processors, ``kwargs_name`` None, the
hook sets that state on the TACA processors instead, ``TacaProcessor.taca_call``).
``taca.disable`` puts back the exact previous processor objects, removes the hook and undoes the
LoRA changes.

Host syncs. Deciding whether any sample is in the window needs sigma on the host. The hook reads
it without touching the device (``handle.last_path == "host"``) when it can prove which value the
transformer got:

- the ``timestep`` passed is a view of one element of a 1-D tensor (SD3/SD3.5 pipelines pass
  ``t.expand(B)``, a view into the scheduler's timesteps; so does the FLUX pipelines' ``t``): the
  hook copies that 1-D tensor to the host once (the one sync of a pipeline call; again only if it
  changes in place, which its version counter tells) and reads the element at the view's offset.
  Always right, whoever calls the transformer.
- FLUX-style pipelines pass a fresh ``t.expand(B).to(latents.dtype) / 1000``, so the value comes
  from the pipeline's ``_current_timestep`` (a view as above), trusted only when the transformer is
  called directly from the ``__call__`` of the pipeline given to ``enable``, and that ``__call__``
  is one of the adapter's ``current_t_pipelines`` (diffusers' own FluxPipeline, ...: they set
  ``_current_timestep = t`` right before their transformer calls; the passed bf16/fp16 timestep is
  then always within 2**-7 of t / 1000, so the sync path would pick t / 1000 too). Extra forwards
  in a step (true CFG, SD3 skip-layer guidance, PAG) see the same t. A call from a callback, from
  another pipeline sharing the transformer, or after an interrupted call (stale
  ``_current_timestep``) does not pass this test.
- ``schedule="constant"`` needs no sigma.

A timestep whose sigma (under the adapter's convention) lies outside [0, 1] or is NaN is refused
(ValueError) by every schedule that reads sigma, on either path (``schedule="constant"`` reads none).

Otherwise (``torch.compile`` tracing the hook, ``torch.inference_mode`` tensors (no view or version
tracking), FLUX img2img/inpaint/fill/control pipelines (no ``_current_timestep``), a bare
transformer called with a fresh tensor (training, per-sample timesteps), callable schedules) the
hook does what it always did: the sigma and gamma math on the device and one host sync per call
(``handle.last_path == "sync"``). Both paths give the same gamma: the host path runs the same
torch code on host copies, and rounds t / 1000 as CUDA does (a multiply by the float32 reciprocal;
on other accelerators sigma may differ by 1 ulp, which matters only for a sigma within 1 ulp of a
threshold). ``TACA_HOST_SIGMA=0`` in the environment when ``enable`` is called forces the sync
path (so does ``handle.host_sigma = False``).

LoRA gating (``lora=``): the adapter is active in exactly the transformer calls where some
sample of the batch has gamma != 1 and inactive otherwise. LoRA is per module, not per sample:
with a batch that mixes timesteps (training), the adapter is on for the whole batch if any
sample is in the window. Gating switches only this adapter in each PEFT layer's active set;
other adapters stay as the user set them (a global ``disable_lora()`` still turns all off).
``requires_grad`` of the adapter's weights is left as it was. Toggling LoRA layers changes
torch.compile guards (one more graph per LoRA state).

Known interplay: ``SD3Transformer2DModel.fuse_qkv_projections()`` replaces every processor; if
it runs after ``taca.enable`` the next transformer call raises (call ``taca.enable`` again: the
TACA processors handle fused projections). FLUX's fusion keeps processors and just works.
Processors TACA cannot reproduce (IP-Adapter, custom ones) make ``enable`` raise TypeError
rather than being dropped. A LoRA file's text-encoder part (if any, loaded through the pipeline)
is not gated: the text encoders run once per call, before the denoising loop.

torch.compile: ``transformer.compile_repeated_blocks(fullgraph=True)`` (regional, FLUX) keeps the
hook outside the compiled blocks (and the host path above works); compiling the whole transformer
works with one graph break in the hook (the host sync) and at most two graphs (gamma on / off).
gamma is a tensor, so a changing gamma does not recompile.

Sigma: FLUX pipelines pass t / 1000 in the latents' dtype; when ``enable`` got the pipeline, the
hook uses the pipeline's exact ``_current_timestep`` instead (it must agree within 2**-7).
Supported: diffusers >= 0.35.0 (the first release with ``FluxAttention``).
"""
from __future__ import annotations

import contextlib
import inspect
import os
import sys
import types
from typing import Any, Dict, Iterator, Optional, Union

import torch

from . import models as _models
from . import schedule as _schedule

_ATTR = "_taca_handle"
DEFAULT_ADAPTER = "taca"
# schedules that are plain functions of one sigma (or step) and can run on the host
_HOST_SCHEDULES = (_schedule.PaperSchedule, _schedule.StepSchedule, _schedule.ConstantSchedule)
_HOST_COPIES_KEPT = 4
_HOST_COPY_MAX = 4096  # elements: timestep schedules, not a training batch's worth of data
_TORCH_MODULE_FILE = torch.nn.Module._call_impl.__code__.co_filename


MIN_DIFFUSERS = "0.35.0"  # the first release with FluxAttention and _get_qkv_projections


def _supported() -> str:
    return f"{_models.supported()}, or a pipeline with one of them as .transformer"


def _adapter_class(transformer):
    import diffusers
    from packaging.version import Version

    if Version(diffusers.__version__).release < Version(MIN_DIFFUSERS).release:
        raise ImportError(f"taca: needs diffusers>={MIN_DIFFUSERS} (FluxAttention), found {diffusers.__version__}")
    return _models.adapter_class(transformer)


def _resolve(obj):
    """(pipe or None, transformer, adapter class) for a pipeline or a transformer (compiled or not)."""
    pipe = None
    transformer = obj
    if not isinstance(obj, torch.nn.Module) and hasattr(obj, "components"):
        pipe = obj
        transformer = getattr(obj, "transformer", None)
        if transformer is None:
            names = [k for k, v in obj.components.items() if isinstance(v, torch.nn.Module)]
            raise TypeError(
                f"taca: {type(obj).__name__} has no .transformer (its models: {names}); supported: {_supported()}"
            )
    transformer = getattr(transformer, "_orig_mod", transformer)
    adapter = _adapter_class(transformer) if isinstance(transformer, torch.nn.Module) else None
    if adapter is None:
        raise TypeError(f"taca: {type(transformer).__name__} is not supported; supported: {_supported()}")
    return pipe, transformer, adapter


class TacaHandle:
    """What ``taca.enable`` installed on one transformer. Read-only for users except through
    ``taca.enable`` (update) and ``taca.disable``.

    Attributes: ``adapter`` (the model's :class:`taca.models.Adapter`), ``kind`` (its name:
    "flux", "sd3", ...), ``schedule``, ``gamma_reverse``, ``backend``,
    ``lora_adapter`` (adapter name or None), ``last_gamma`` ((B,) tensor or None: what the last
    transformer call used), ``last_step`` (step index of the last call, step schedules only),
    ``last_path`` ("host": sigma read on the host, no sync; "sync": device math and one host
    sync; see the module docstring; "textless": a call without text, no gamma, its timestep not
    read, see ``Adapter.textless``), ``host_copies`` (device-to-host copies of timestep tensors
    made so far: one per pipeline call on the host path), ``host_sigma`` (False: always "sync").
    """

    def __init__(self, pipe, transformer, adapter: "_models.Adapter"):
        self.pipe = pipe
        self.transformer = transformer
        self.adapter = adapter
        self.kind = adapter.name
        self.modules = adapter.joint_modules()
        self.previous = {name: m.processor for name, m in self.modules.items()}
        self.processors = {name: adapter.processor(name, m) for name, m in self.modules.items()}
        self.schedule: _schedule.Schedule = _schedule.parse(None)
        self.gamma_reverse = 1.0
        self.backend = "auto"
        self.deterministic = True
        self.fp8 = False
        self.lora_adapter: Optional[str] = None
        self._lora_loaded_by_us = False
        self._lora_via_pipe = False
        self._lora_source: Any = None
        self._lora_on: Optional[bool] = None
        self._lora_prev_active: Dict[str, list] = {}
        self.last_gamma: Optional[torch.Tensor] = None
        self.last_step: Optional[int] = None
        self._step = 0
        self._last_sigma: Optional[float] = None
        self.last_path: Optional[str] = None
        self.host_copies = 0
        self.host_sigma = True
        self._host_cache: Dict[int, tuple] = {}
        self._sched_tables: Optional[tuple] = None  # the "scheduler" timestep convention's lookup
        # (timesteps, sigmas) a trainer lends for its own calls of a bare transformer whose adapter reads sigma from
        # the pipeline's scheduler (the "scheduler" convention): used instead of pipe.scheduler while set
        self.sigma_table: Optional[tuple] = None
        self._loop_codes: Dict[type, Any] = {}
        self._hook = None
        self._post = None
        self._params = [p for p in inspect.signature(type(transformer).forward).parameters if p != "self"]

    def _install(self):
        for name, m in self.modules.items():
            p = self.processors[name]
            p.gamma_reverse, p.backend, p.deterministic = self.gamma_reverse, self.backend, self.deterministic
            p.fp8 = self.fp8
            if m.processor is not p:
                old = m.processor
                # keep diffusers' per-module attention backend settings
                p._attention_backend = getattr(old, "_attention_backend", None)
                p._parallel_config = getattr(old, "_parallel_config", None)
                _set_processor(m, p)
        if self._hook is None:
            self._hook = self.transformer.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
            if self.adapter.kwargs_name is None or self._fixes_checkpointing:
                # no attention kwargs reach the processors: the state is set on them for one call;
                # or the checkpointing function is wrapped for one call: both undone after it
                self._post = self.transformer.register_forward_hook(self._clear_state, always_call=True)

    def _uninstall(self):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if getattr(self, "_post", None) is not None:
            self._post.remove()
            self._post = None
            self._clear_state()
        for name, m in self.modules.items():
            _set_processor(m, self.previous[name])

    def _arg(self, name, args, kwargs):
        if name in kwargs:
            return kwargs[name]
        i = self._params.index(name) if name in self._params else None
        return args[i] if i is not None and i < len(args) else None

    def _pre_hook(self, module, args, kwargs):
        for name, m in self.modules.items():
            if m.processor is not self.processors[name]:
                raise RuntimeError(
                    f"taca: the processor of {name} was replaced after taca.enable (now "
                    f"{type(m.processor).__name__}; e.g. by fuse_qkv_projections or set_attn_processor); "
                    f"call taca.enable again to reinstall TACA, or taca.disable"
                )
        arg = lambda name: self._arg(name, args, kwargs)  # noqa: E731
        ts = self.adapter.timestep_value(arg)
        batch = self.adapter.batch(arg)
        if ts is None or batch is None:
            raise ValueError("taca: the transformer was called without timestep or encoder_hidden_states")
        state = self.adapter.call_state(arg)
        B, device = batch
        if self.adapter.textless(arg):
            # nothing to scale: no gamma, and the timestep (which may lie outside the schedule) is not read
            decided = (None, False, None)
            self.last_path = "textless"
        else:
            decided = self._host_decide(ts, B, device) if self.host_sigma else None
            if decided is not None:
                self.last_path = "host"
            else:
                decided = self._sync_decide(ts, B, device)
                self.last_path = "sync"
        gamma, on, step = decided
        self.last_gamma = gamma if on else None
        self.last_step = step
        if self.lora_adapter is not None:
            self._gate_lora(on)

        key = self.adapter.kwargs_name
        if key is None:
            call = dict(state)
            call["taca_gamma"] = gamma if on else None
            for p in self.processors.values():
                p.taca_call = call
            if torch.is_grad_enabled():
                self._keep_state_in_checkpoints(module, call)
            return None
        jak = dict(self._arg(key, args, kwargs) or {})
        jak["taca_gamma"] = gamma if on else None
        jak.update(state)
        i = self._params.index(key) if key not in kwargs and key in self._params else None
        if i is not None and i < len(args):
            args = args[:i] + (jak,) + args[i + 1:]
        else:
            kwargs = dict(kwargs)
            kwargs[key] = jak
        if self._fixes_checkpointing and torch.is_grad_enabled():
            final = lambda name: self._arg(name, args, kwargs)  # noqa: E731
            adapter = self.adapter

            def fix(func):
                def checkpointed(block, *a):
                    return func(block, *adapter.checkpointed_args(block, a, final))

                return checkpointed

            self._wrap_checkpointing(module, fix)
        return args, kwargs

    @property
    def _fixes_checkpointing(self) -> bool:
        return type(self.adapter).checkpointed_args is not _models.Adapter.checkpointed_args

    def _wrap_checkpointing(self, model, wrap) -> bool:
        """For one call: every module's ``_gradient_checkpointing_func`` replaced by ``wrap(func)``
        where the module checkpoints (``_clear_state`` puts them back). False when none does."""
        mods = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)
                and callable(getattr(m, "_gradient_checkpointing_func", None))]
        if not mods:
            return False
        self._ckpt_saved = [(m, m.__dict__.get("_gradient_checkpointing_func")) for m in mods]
        for m in mods:
            m._gradient_checkpointing_func = wrap(m._gradient_checkpointing_func)
        return True

    def _keep_state_in_checkpoints(self, model, call: dict) -> None:
        """Gradient checkpointing with a kwargs-less model: the blocks recomputed in the backward
        pass run after this call's state was cleared, so for this call every module's
        ``_gradient_checkpointing_func`` (diffusers' hook for checkpointing a block) is wrapped to
        run the block with ``call`` set on the processors, in the forward and in the recomputation.
        ``_clear_state`` puts the functions back. (Every diffusers 0.42.1 transformer checkpoints its
        blocks through that function; none calls torch.utils.checkpoint itself.)"""
        procs = list(self.processors.values())

        def wrap(func):
            def checkpointed(block, *args, **kwargs):
                def run(*a, **k):
                    before = [p.taca_call for p in procs]
                    for p in procs:
                        p.taca_call = call
                    try:
                        return block(*a, **k)
                    finally:
                        for p, c in zip(procs, before):
                            p.taca_call = c

                return func(run, *args, **kwargs)

            return checkpointed

        if not self._wrap_checkpointing(model, wrap) and getattr(model, "gradient_checkpointing", False):
            raise NotImplementedError(
                f"taca: {type(model).__name__} checkpoints its blocks without diffusers' "
                f"_gradient_checkpointing_func, so TACA cannot hand its state to the blocks recomputed in the "
                f"backward pass; call transformer.disable_gradient_checkpointing() or run without autograd")

    def _clear_state(self, *_args, **_kw):
        for p in self.processors.values():
            p.taca_call = None
        saved = getattr(self, "_ckpt_saved", None)
        if saved:
            self._ckpt_saved = None
            for m, f in saved:
                if f is None:
                    m.__dict__.pop("_gradient_checkpointing_func", None)
                else:
                    m._gradient_checkpointing_func = f

    def _sigma(self, ts, B: int, device, current_t, like=None) -> torch.Tensor:
        """sigma (B,) float32 on ``device`` from the transformer's ``timestep`` and the pipeline's
        ``_current_timestep``. The host path runs this same math on host copies of both, with
        the rounding of the device ``like``."""
        sigma = torch.as_tensor(ts, device=device).to(torch.float32).reshape(-1)
        if sigma.numel() == 1 and B != 1:
            sigma = sigma.expand(B)
        if self.adapter.timestep == "scheduler":
            return self._scheduler_sigma(sigma)
        sigma = _to_sigma(sigma, self.adapter.timestep, like)
        return _exact_sigma(sigma, current_t, like)

    def _scheduler_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma of the adapter's "scheduler" convention: the transformer got the scheduler's own
        (unshifted) timestep t (plus ``adapter.scheduler_t_offset``); sigma is the scheduler's
        ``sigmas[i]`` where ``timesteps[i] == t`` (first match). The tables are copied to t's
        device once per ``set_timesteps``."""
        if self.sigma_table is not None:
            sch = types.SimpleNamespace(timesteps=self.sigma_table[0], sigmas=self.sigma_table[1])
        else:
            sch = getattr(self.pipe, "scheduler", None) if self.pipe is not None else None
        if sch is None or getattr(sch, "timesteps", None) is None or getattr(sch, "sigmas", None) is None:
            raise ValueError(
                f"taca: {self.adapter.label}: the transformer's timestep is the scheduler's unshifted t, not sigma; "
                f"TACA reads sigma from the pipeline's scheduler (sigmas[i] where timesteps[i] == t): pass the "
                f"pipeline to taca.enable, not the bare transformer, and call the transformer from it"
            )
        ts, sig = sch.timesteps, sch.sigmas
        key = (id(ts), ts._version, id(sig), sig._version, t.device)
        if self._sched_tables is None or self._sched_tables[0] != key or self._sched_tables[1] is not ts:
            n = ts.shape[0]
            tab = ts.detach().to(device=t.device, dtype=torch.float32) + float(self.adapter.scheduler_t_offset)
            self._sched_tables = (key, ts, tab, sig.detach()[:n].to(device=t.device, dtype=torch.float32))
        _, _, tab, sg = self._sched_tables
        hit = t[:, None] == tab[None, :]
        if not bool(hit.any(1).all()):
            raise ValueError(
                f"taca: {self.adapter.label}: timestep {t.tolist()} is not one of the scheduler's timesteps "
                f"{(tab[:8].tolist())}...; TACA reads sigma from the scheduler, so the transformer must be called "
                f"with the pipeline's own timesteps"
            )
        return sg[hit.to(torch.int64).argmax(1)]

    def _current_t(self):
        if self.pipe is None or not self.adapter.pipeline_t_is_1000_sigma:
            return None
        return getattr(self.pipe, "_current_timestep", None)

    def _sync_decide(self, ts, B: int, device):
        """(gamma or None, on, step) with the schedule evaluated on the device: one host sync."""
        sigma = self._sigma(ts, B, device, self._current_t())
        step = None
        if self.schedule.needs_step:
            first, bad = torch.stack([sigma[0], _out_of_range(sigma).to(sigma.dtype)]).tolist()
            self._check_range(ts, bad)
            step = self._track_step(first)
            gamma = self.schedule(sigma, step)
            on = float(gamma[0]) != 1.0  # step rules give one gamma for the batch
        else:
            gamma = self.schedule(sigma, None)
            # the one host sync of this call: is gamma on anywhere, is sigma out of range anywhere
            on, bad = torch.stack([(gamma != 1.0).any(), _out_of_range(sigma)]).tolist()
            if not isinstance(self.schedule, _schedule.ConstantSchedule):  # as the host path: it needs no sigma
                self._check_range(ts, bad)
        return (gamma if on else None), on, step

    def _check_range(self, ts, bad) -> None:
        """Refuse a timestep whose sigma under the adapter's convention is outside [0, 1] or NaN (a bare
        transformer called with t in [0, 1000] where its pipeline passes t / 1000): the schedule would
        read it as always early (or never), silently. (t / 1000 where t is expected is in range: not caught.)"""
        if not bad:
            return
        t = ts.detach().float().reshape(-1)[:4].tolist() if isinstance(ts, torch.Tensor) else ts
        conv = self.adapter.timestep
        unit = {"sigma": "sigma in [0, 1]", "1-sigma": "1 - sigma in [0, 1]",
                "t1000": "t = 1000 * sigma in [0, 1000]", "1-t1000": "1000 * (1 - sigma) in [0, 1000]"}.get(conv, conv)
        raise ValueError(
            f"taca: {self.adapter.label}: timestep {t} is out of range: this transformer takes {unit} "
            f"(the adapter's {conv!r} convention), as its diffusers pipeline passes it; TACA's schedule reads "
            f"sigma from it"
        )

    def _host_decide(self, ts, B: int, device):
        """(gamma or None, on, step) from host values only (no device sync; gamma is filled on the
        device from a Python float), or None when the host value of sigma is not known for sure."""
        if type(self.schedule) not in _HOST_SCHEDULES or torch.compiler.is_compiling():
            return None
        if isinstance(ts, torch.Tensor) and ts.numel() not in (1, B):
            return None
        if isinstance(self.schedule, _schedule.ConstantSchedule):
            sigma = torch.ones(B)  # gamma does not depend on sigma
        else:
            sigma = self._sigma_on_host(ts, B, device)
            if sigma is None:
                return None
        step = None
        if self.schedule.needs_step:
            step = self._track_step(float(sigma[0]))
        g = self.schedule(sigma[:1], step)
        g = float(g[0])
        on = g != 1.0
        gamma = torch.full((B,), g, dtype=torch.float32, device=device) if on else None
        return gamma, on, step

    def _sigma_on_host(self, ts, B: int, device) -> Optional[torch.Tensor]:
        """sigma (B,) float32 on the CPU, equal to what ``_sigma`` computes on the device, or None."""
        ct = self._current_t()
        ct_host = None
        if isinstance(ct, torch.Tensor) and ct.numel() == 1:
            ct_host = self._host_copy(ct)
            if ct_host is None:
                return None  # the sync path would compare with it: unknown here
        if isinstance(ts, torch.Tensor):
            ts_host = self._host_copy(ts)
        elif isinstance(ts, (int, float)):
            ts_host = ts
        else:
            return None
        if ts_host is not None:
            sigma = self._sigma(ts_host, B, "cpu", ct if ct_host is None else ct_host, like=device)
        elif ct_host is not None and ts.dtype in _FLOAT_DTYPES and self._called_from_pipe():
            # FluxPipeline-style loop: ts = t.expand(B).to(dtype) / 1000 with t = _current_timestep.
            # With |t / 1000| <= 1.5, float16/bfloat16 rounding keeps ts within 1.5 * 2**-8 < 2**-7
            # of t / 1000, so the sync path's _exact_sigma takes t / 1000: take it here too.
            exact = _div1000(ct_host.to(torch.float32).reshape(1), device)
            if not bool((exact.abs() <= 1.5).all()):
                return None
            sigma = exact.expand(B)
        else:
            return None
        self._check_range(ts, bool(_out_of_range(sigma)))
        if not bool((sigma == sigma[:1]).all()):
            return None
        return sigma

    def _host_copy(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """x's values on the CPU without a device sync, when x is a view of one element of a 1-D
        tensor: that tensor is copied to the host the first time it is seen (and again only if
        it was changed in place), then every view of it is read from the copy. None otherwise
        (not a view, e.g. a fresh tensor or an inference-mode tensor)."""
        base = x._base
        if base is None or base.dim() != 1 or base.dtype != x.dtype or x.numel() == 0:
            return None
        if base.numel() > _HOST_COPY_MAX:
            return None
        if x.numel() != 1 and any(st != 0 for st in x.stride()):
            return None
        off = x.storage_offset() - base.storage_offset()
        st = base.stride(0)
        if st <= 0 or off % st != 0 or not 0 <= off // st < base.shape[0]:
            return None
        key = id(base)
        entry = self._host_cache.get(key)
        if entry is None or entry[0] is not base or entry[1] != base._version:
            if entry is None and len(self._host_cache) >= _HOST_COPIES_KEPT:
                self._host_cache.pop(next(iter(self._host_cache)))
            entry = (base, base._version, base.detach().to("cpu", copy=True))  # the one sync
            self._host_cache[key] = entry
            self.host_copies += 1
        return entry[2][off // st].expand(x.shape)

    def _called_from_pipe(self) -> bool:
        """True when the transformer call comes straight from the denoising loop of ``self.pipe``'s
        own ``__call__``, and that is one of diffusers' pipelines that set ``_current_timestep`` and
        pass ``t / 1000`` (the adapter's ``current_t_pipelines``)."""
        code = self._loop_code()
        if code is None:
            return False
        f = sys._getframe(1)
        while f is not None and f.f_code.co_filename in _HOOK_FRAME_FILES:
            f = f.f_back
        return f is not None and f.f_code is code and f.f_locals.get("self") is self.pipe

    def _loop_code(self):
        cls = type(self.pipe)
        if cls not in self._loop_codes:
            fn = inspect.unwrap(getattr(cls, "__call__", None))
            ok = (getattr(fn, "__module__", "") or "").startswith("diffusers.pipelines.") and \
                (getattr(fn, "__qualname__", "") or "").split(".")[0] in self.adapter.current_t_pipelines
            self._loop_codes[cls] = getattr(fn, "__code__", None) if ok else None
        return self._loop_codes[cls]

    def _track_step(self, s: float) -> int:
        sch = getattr(self.pipe, "scheduler", None) if self.pipe is not None else None
        new_call = sch is not None and getattr(sch, "step_index", 0) is None
        if new_call or self._last_sigma is None or s > self._last_sigma + 1e-6:
            self._step = 0
        elif s < self._last_sigma - 1e-6:
            self._step += 1
        self._last_sigma = s
        return self._step

    def reset_steps(self) -> None:
        """Start step counting afresh (the next transformer call is step 0)."""
        self._last_sigma = None
        self._step = 0

    # LoRA -----------------------------------------------------------------------------------
    def _lora_layers(self):
        from peft.tuners.tuners_utils import BaseTunerLayer

        for name, m in self.transformer.named_modules():
            if isinstance(m, BaseTunerLayer) and self.lora_adapter in _layer_adapters(m):
                yield name, m

    def _check_no_cache(self) -> None:
        """Gating a LoRA by step is wrong under a diffusers cache (text K / V, first-block, ...): what it
        caches in a step with the adapter on would serve the steps where it is off."""
        cfg = getattr(self.transformer, "_cache_config", None)
        if getattr(self.transformer, "is_cache_enabled", False):
            raise ValueError(
                f"taca: lora=: the transformer has a diffusers cache enabled ({type(cfg).__name__}): what it caches "
                f"in the steps with the adapter on (gamma != 1) would be reused in the steps where it is off; disable "
                f"the cache (transformer.disable_cache()) or load the adapter with load_lora_weights (always on)")

    def _gate_lora(self, on: bool) -> None:
        if self._lora_on is on:
            return
        if self._lora_on is not None:
            self._check_no_cache()  # a cache enabled after taca.enable
        name = self.lora_adapter
        for _, m in self._lora_layers():
            active = [a for a in m.active_adapters if a != name]
            _set_layer_active(m, active + [name] if on else active)
        self._lora_on = on

    def _set_lora(self, lora, adapter_name: str) -> None:
        if lora is None:
            self._drop_lora()
            return
        self._check_no_cache()
        if isinstance(lora, os.PathLike):
            lora = os.fspath(lora)
        if self.lora_adapter is not None and self._lora_source is not None and _same_source(self._lora_source, lora):
            return
        self._drop_lora()
        loaded = set(getattr(self.transformer, "peft_config", {}) or {})
        if isinstance(lora, str) and lora in loaded:
            self.lora_adapter = lora
            self._lora_loaded_by_us = False
            self._lora_prev_active = {n: list(m.active_adapters) for n, m in _tuner_layers(self.transformer)}
        else:
            if isinstance(lora, str) and not os.path.exists(lora) and "/" not in lora:
                raise ValueError(
                    f"taca: lora={lora!r} is neither a loaded adapter (loaded: {sorted(loaded)}) nor an existing path"
                )
            if not isinstance(lora, (str, dict)):
                raise TypeError(f"taca: lora must be a path, a state dict or an adapter name, got {type(lora).__name__}")
            if adapter_name in loaded:
                raise ValueError(f"taca: adapter_name={adapter_name!r} is already loaded; pass lora={adapter_name!r} to use it")
            before = {n: list(m.active_adapters) for n, m in _tuner_layers(self.transformer)}
            grads = {id(p): p.requires_grad for p in self.transformer.parameters()}
            src = dict(lora) if isinstance(lora, dict) else lora  # diffusers pops keys from dicts
            extra = {}
            if isinstance(src, str) and os.path.exists(src):
                # name the file: offline, diffusers does not guess weight names in directories
                src, extra["weight_name"] = _lora_file(src)
            self._lora_via_pipe = self.pipe is not None and loads_transformer_lora(type(self.pipe))
            if not self._lora_via_pipe and not callable(getattr(self.transformer, "load_lora_adapter", None)):
                raise ValueError(
                    f"taca: lora=: {type(self.transformer).__name__} has no LoRA support in this diffusers (no "
                    f"load_lora_adapter){_LORA_SUPPORT_HINT.get(type(self.transformer).__name__, '')}")
            import warnings

            with warnings.catch_warnings():
                # peft warns when a second adapter joins the user's: keeping both is the point here
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute",
                                        category=UserWarning)
                if self._lora_via_pipe:
                    self.pipe.load_lora_weights(src, adapter_name=adapter_name, **extra)
                else:
                    # bare transformer: diffusers-format LoRA files only (other formats need the
                    # pipeline's converters: pass the pipeline)
                    self.transformer.load_lora_adapter(src, prefix="transformer", adapter_name=adapter_name,
                                                       **extra)
            self.lora_adapter = adapter_name
            self._lora_loaded_by_us = True
            # loading makes the new adapter the only active one in every layer: give the user's
            # adapters back their previous activity (and their requires_grad)
            for n, m in _tuner_layers(self.transformer):
                keep = [a for a in before.get(n, []) if a != adapter_name]
                _set_layer_active(m, keep + ([adapter_name] if adapter_name in _layer_adapters(m) else []))
            for p in self.transformer.parameters():
                if id(p) in grads:
                    p.requires_grad_(grads[id(p)])
        self._lora_source = lora
        self._lora_on = None

    def _drop_lora(self) -> None:
        if self.lora_adapter is None:
            return
        name = self.lora_adapter
        # other adapters keep the activity they have now; ours goes back to where it was
        now = {n: [a for a in m.active_adapters if a != name] for n, m in _tuner_layers(self.transformer)}
        if self._lora_loaded_by_us:
            import warnings

            with warnings.catch_warnings():  # peft warns that the deleted adapter was active
                warnings.simplefilter("ignore")
                if self._lora_via_pipe and hasattr(self.pipe, "delete_adapters"):
                    self.pipe.delete_adapters(name)  # also any text-encoder part it loaded
                else:
                    self.transformer.delete_adapters(name)
        for n, m in _tuner_layers(self.transformer):
            keep = [a for a in now.get(n, []) if a in _layer_adapters(m)]
            if not self._lora_loaded_by_us and name in self._lora_prev_active.get(n, []):
                keep.append(name)
            _set_layer_active(m, keep)
        self._lora_prev_active = {}
        self.lora_adapter = None
        self._lora_source = None
        self._lora_on = None


_THIS_FILE = TacaHandle._pre_hook.__code__.co_filename
# Frames between the pipeline's loop and the hook (torch's hook dispatch, this module); a test
# that wraps the hook adds its own file here.
_HOOK_FRAME_FILES = frozenset({_THIS_FILE, _TORCH_MODULE_FILE})
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _set_processor(module, processor) -> None:
    """``module.set_processor`` where the module has one; a plain ``processor`` attribute otherwise
    (Mochi's ``MochiAttention`` is an nn.Module with only that attribute)."""
    if hasattr(module, "set_processor"):
        module.set_processor(processor)
    else:
        module.processor = processor


def _div1000(x: torch.Tensor, like=None) -> torch.Tensor:
    """x / 1000 (float32), rounded as on device ``like`` (default: x's): CUDA divides by a Python
    scalar as a multiply by its float32 reciprocal (1 ulp from a true division at times)."""
    like = x.device if like is None else torch.device(like)
    if like.type == "cuda" and x.device.type != "cuda":
        return x * (torch.ones((), dtype=x.dtype, device=x.device) / 1000.0)
    return x / 1000.0


def _to_sigma(x: torch.Tensor, convention: str, like=None) -> torch.Tensor:
    """sigma from the transformer's timestep under an adapter's ``timestep`` convention."""
    if convention == "sigma":
        return x
    if convention == "t1000":
        return _div1000(x, like)
    if convention == "1-sigma":
        return 1.0 - x
    if convention == "1-t1000":
        return 1.0 - _div1000(x, like)
    raise ValueError(f"taca: unknown timestep convention {convention!r}")


# sigma is in [0, 1] in every flow-matching pipeline; the slack covers t / 1000 rounded to bfloat16 (< 2**-8)
_SIGMA_SLACK = 2.0 ** -7


def _out_of_range(sigma: torch.Tensor) -> torch.Tensor:
    """Whether any sigma lies outside [0, 1] (beyond rounding), or is NaN: a 0-d bool tensor."""
    return ~((sigma >= -_SIGMA_SLACK) & (sigma <= 1.0 + _SIGMA_SLACK)).all()


def _exact_sigma(sigma: torch.Tensor, t, like=None) -> torch.Tensor:
    # FLUX pipelines pass t / 1000 in the latents' dtype (bf16: ~0.004 error near 0.97) but keep
    # the exact t in pipe._current_timestep; use it when it matches what was passed.
    if not isinstance(t, torch.Tensor) or t.numel() != 1:
        return sigma
    exact = _div1000(t.detach().to(device=sigma.device, dtype=torch.float32).reshape(1).expand_as(sigma), like)
    match = ((exact - sigma).abs() <= 2.0 ** -7).all()
    return torch.where(match, exact, sigma)


def _lora_file(path: str):
    """(directory, weight_name) of a LoRA file given as a file or a directory holding one."""
    if os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    names = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if "pytorch_lora_weights.safetensors" in names:
        return path, "pytorch_lora_weights.safetensors"
    if len(names) != 1:
        raise ValueError(f"taca: lora={path!r}: expected one .safetensors LoRA file in the directory, found {names}")
    return path, names[0]


def loads_transformer_lora(pipeline_cls) -> bool:
    """Whether a pipeline class's ``load_lora_weights`` loads a transformer's LoRA (PRXPipeline inherits
    Stable Diffusion's, which wants a UNet; some pipelines have none): else the transformer's own loader."""
    return callable(getattr(pipeline_cls, "load_lora_weights", None)) and \
        "transformer" in (getattr(pipeline_cls, "_lora_loadable_modules", None) or ["transformer"])


# what to do for transformers whose diffusers class lacks the LoRA API
_LORA_SUPPORT_HINT = {
    "PRXTransformer2DModel": "; call taca.train.families.prx.lora_support(pipe) first, which gives it diffusers' "
                             "PeftAdapterMixin",
}


def _set_layer_active(m, names) -> None:
    """Set a PEFT layer's active adapters, keeping every parameter's requires_grad as it was
    (peft's set_adapter would freeze the inactive ones and unfreeze the active ones)."""
    grads = [(p, p.requires_grad) for p in m.parameters()]
    m.set_adapter(list(names))
    for p, rg in grads:
        p.requires_grad_(rg)


def _layer_adapters(m) -> set:
    names = set()
    for attr in getattr(m, "adapter_layer_names", ()):
        d = getattr(m, attr, None)
        if hasattr(d, "keys"):
            names.update(d.keys())
    return names


def _tuner_layers(transformer):
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return []
    return [(n, m) for n, m in transformer.named_modules() if isinstance(m, BaseTunerLayer)]


def _same_source(a, b) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a == b
    return a is b


def enable(
    pipe_or_transformer,
    gamma: float = 1.2,
    schedule: Union[None, str, _schedule.Schedule, _schedule.SigmaFn] = "paper",
    lora: Union[None, str, os.PathLike, Dict[str, torch.Tensor]] = None,
    gamma_reverse: float = 1.0,
    backend: str = "auto",
    adapter_name: str = DEFAULT_ADAPTER,
    deterministic: bool = True,
    fp8: bool = False,
) -> TacaHandle:
    """Turn TACA on for a pipeline or transformer of a supported model (``taca.models``).

    gamma: gamma0, the multiplier of (image query, text key) logits inside the window.
    schedule: "paper" (the default, also what None means: gamma0 where sigma >= 0.97, i.e.
        t >= 970), "paper:<sigma>" (another threshold), "steps:<k>" (first k denoising steps of
        each call), "constant" (every step), a ``taca.schedule.Schedule``, or a callable
        sigma (B,) float32 -> gamma (B,). The names are those of ``taca generate --schedule``;
        "none" is refused as ambiguous. See ``taca.schedule``.
    lora: a TACA LoRA (a file or directory in diffusers' LoRA format, a hub id, a state dict, or
        the name of an adapter already loaded), loaded as ``adapter_name`` and active exactly in
        the transformer calls where gamma != 1.
    gamma_reverse: multiplier of (text query, image key) logits, applied in the same calls.
    backend, deterministic: passed to ``taca.joint_attention`` (deterministic=False: the CUDA
        backward adds dQ with unordered atomics: not bitwise repeatable, and no faster since the backward's skew).
    fp8: every joint attention call of the transformer (inside the gamma window and outside it) through
        ``taca.joint_attention(fp8=True)``, the FP8 forward: inference only, head dim 128 (FLUX.1 and other
        128-dim models), an sm_90 GPU; a call it cannot take raises. Outside the window the output is then
        no longer bit-identical to stock attention.

    Calling it again updates the settings (processors, hook and adapter are not duplicated).
    Returns the :class:`TacaHandle`. Raises TypeError for unsupported models.
    """
    pipe, transformer, adapter_cls = _resolve(pipe_or_transformer)
    sched = _schedule.parse(schedule, gamma)
    gr = float(gamma_reverse)
    if not (gr > 0 and gr < float("inf")):
        raise ValueError(f"taca: gamma_reverse={gamma_reverse} must be finite and > 0")
    if not isinstance(deterministic, bool):
        raise TypeError(f"taca: deterministic must be a bool, got {type(deterministic).__name__}")
    if not isinstance(fp8, bool):
        raise TypeError(f"taca: fp8 must be a bool, got {type(fp8).__name__}")
    if backend not in ("auto", "cpu", "cuda", "sdpa", "reference"):
        raise ValueError(f"taca: backend={backend!r} is not one of ('auto', 'cpu', 'cuda', 'sdpa', 'reference')")
    handle: Optional[TacaHandle] = getattr(transformer, _ATTR, None)
    fresh = handle is None
    ours = set(handle.processors.values()) if handle is not None else set()
    adapter = handle.adapter if handle is not None else adapter_cls(transformer)
    for name, m in adapter.joint_modules().items():
        if m.processor not in ours:
            adapter.check_processor(name, m)
    if fresh:
        handle = TacaHandle(pipe, transformer, adapter)
    elif pipe is not None:
        handle.pipe = pipe
    old = (handle.schedule, handle.gamma_reverse, handle.backend, handle.deterministic, handle.fp8)
    handle.schedule, handle.gamma_reverse, handle.backend, handle.deterministic = sched, gr, backend, deterministic
    handle.fp8 = fp8
    handle.host_sigma = os.environ.get("TACA_HOST_SIGMA", "1") != "0"
    try:
        handle._set_lora(lora, adapter_name)
        handle._install()
    except BaseException:
        if fresh:
            handle._drop_lora()
            handle._uninstall()
        else:
            handle.schedule, handle.gamma_reverse, handle.backend, handle.deterministic, handle.fp8 = old
        raise
    handle.reset_steps()
    setattr(transformer, _ATTR, handle)
    return handle


def disable(pipe_or_transformer) -> None:
    """Turn TACA off: restore the exact previous processors, remove the hook, and unload the
    LoRA that ``enable`` loaded (or give an existing adapter back its previous activity).
    A no-op when TACA is not enabled."""
    _, transformer, _ = _resolve(pipe_or_transformer)
    handle: Optional[TacaHandle] = getattr(transformer, _ATTR, None)
    if handle is None:
        return
    try:
        handle._uninstall()
        handle._drop_lora()
    finally:
        delattr(transformer, _ATTR)


def get_handle(pipe_or_transformer) -> Optional[TacaHandle]:
    """The active :class:`TacaHandle`, or None when TACA is off."""
    _, transformer, _ = _resolve(pipe_or_transformer)
    return getattr(transformer, _ATTR, None)


@contextlib.contextmanager
def enabled(pipe_or_transformer, **kwargs) -> Iterator[TacaHandle]:
    """``with taca.enabled(pipe, gamma=1.2, ...):`` TACA on inside the block (arguments as
    :func:`enable`); on exit TACA is off again, or back to its previous settings if it was on."""
    prev = get_handle(pipe_or_transformer)
    prev_settings = None
    if prev is not None:
        prev_settings = dict(gamma=1.0, schedule=prev.schedule, gamma_reverse=prev.gamma_reverse,
                             backend=prev.backend, lora=prev._lora_source, deterministic=prev.deterministic,
                             fp8=prev.fp8)
    handle = enable(pipe_or_transformer, **kwargs)
    try:
        yield handle
    finally:
        if prev_settings is None:
            disable(pipe_or_transformer)
        else:
            enable(pipe_or_transformer, **prev_settings)
