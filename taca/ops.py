"""taca.joint_attention: the one op everything else calls.

The compiled kernels are reached through ``torch.ops.taca.fwd`` / ``torch.ops.taca.bwd``
(csrc/bind_torch.cpp), which take (B, N, H, D) views; this module registers their fake
impls (for torch.compile) and the autograd formula of ``fwd`` (its backward is ``bwd``).

Dispatch (backend="auto"): CPU tensors -> the C kernel; CUDA float16/bfloat16 tensors with
a head dim in ``CUDA_HEAD_DIMS`` and batch / heads within the kernels' grid limits -> the CUDA
kernel (when built; on an H100 its Hopper path for aligned D = 64 / 128); anything else -> the exact
split-SDPA form (``reference.attention_split_sdpa``), or the materialized reference when lse
or text_mass is asked for.
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Tuple, Union

import torch

from . import reference

logger = logging.getLogger("taca")

_LAYOUTS = ("bhnd", "bnhd")
_BACKENDS = ("auto", "cpu", "cuda", "sdpa", "reference")

# Head dims backend="auto" sends to the CUDA kernel (it pads D internally: every D in
# [1, 256] runs; 64 and 128 are the tuned ones). Narrow this to route other D to SDPA.
CUDA_HEAD_DIMS = range(1, 257)

try:
    from . import _C  # noqa: F401  (loads the library: registers torch.ops.taca.*)

    _EXT_ERROR: Optional[BaseException] = None
except ImportError as e:  # extension not built: auto falls back to SDPA
    _C = None
    _EXT_ERROR = e

HAVE_KERNELS: bool = _C is not None and hasattr(torch.ops.taca, "fwd")
HAVE_CUDA_KERNEL: bool = HAVE_KERNELS and bool(getattr(_C, "has_cuda", False))
_warned_no_ext = False


# ---------------------------------------------------------------------------------------
# torch.library registrations for the compiled ops
# ---------------------------------------------------------------------------------------

def _alloc_like(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Mirror of bind_torch.cpp's alloc_like: dense, b/n/h ordered by t's strides, D innermost."""
    perm = sorted(range(3), key=lambda d: -t.stride(d)) + [3]
    inv = [perm.index(d) for d in range(4)]
    return t.new_empty([t.shape[d] for d in perm], dtype=dtype).permute(inv)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


if HAVE_KERNELS:

    @torch.library.register_fake("taca::fwd")
    def _fwd_fake(q, k, v, gamma, gamma_reverse, scale, text_begin, text_end, return_text_mass):
        B, N, H, _ = q.shape
        acc = _acc_dtype(q.dtype)
        out = _alloc_like(q, q.dtype)
        lse = q.new_empty((B, H, N), dtype=acc)
        tm = q.new_empty((B, H, N) if return_text_mass else (0,), dtype=acc)
        return out, lse, tm

    @torch.library.register_fake("taca::bwd")
    def _bwd_fake(dout, q, k, v, out, lse, gamma, gamma_reverse, scale, text_begin, text_end):
        return _alloc_like(q, q.dtype), _alloc_like(k, k.dtype), _alloc_like(v, v.dtype)

    def _fwd_setup_context(ctx, inputs, output):
        q, k, v, gamma, gamma_reverse, scale, text_begin, text_end, _ = inputs
        out, lse, tm = output
        ctx.save_for_backward(q, k, v, out, lse, gamma)
        ctx.args = (gamma_reverse, scale, text_begin, text_end)
        ctx.mark_non_differentiable(lse, tm)

    def _fwd_backward(ctx, dout, dlse, dtm):
        q, k, v, out, lse, gamma = ctx.saved_tensors
        gamma_reverse, scale, text_begin, text_end = ctx.args
        dq, dk, dv = torch.ops.taca.bwd(
            dout, q, k, v, out, lse, gamma, gamma_reverse, scale, text_begin, text_end
        )
        return dq, dk, dv, None, None, None, None, None, None

    torch.library.register_autograd("taca::fwd", _fwd_backward, setup_context=_fwd_setup_context)


# ---------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------

def _validate(q, k, v, text_len, gamma, gamma_reverse, scale, layout, backend):
    if layout not in _LAYOUTS:
        raise ValueError(f"taca: layout={layout!r} is not one of {_LAYOUTS}")
    if backend not in _BACKENDS:
        raise ValueError(f"taca: backend={backend!r} is not one of {_BACKENDS}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            if type(t).__module__ == "numpy":
                raise TypeError(f"taca: {name} is a NumPy array; taca.joint_attention takes torch tensors: "
                                "use taca.numpy.joint_attention for NumPy arrays (same kernel, no torch), or "
                                "torch.from_numpy")
            raise TypeError(f"taca: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"taca: {name} must have 4 dimensions ({'B, H, N, D' if layout == 'bhnd' else 'B, N, H, D'}), "
                f"got shape {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"taca: {name} must be a floating-point tensor, got {t.dtype}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"taca: q, k, v must have the same shape, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"taca: q, k, v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"taca: q, k, v must be on the same device, got {q.device}, {k.device}, {v.device}")
    D = q.shape[-1]
    if D < 1 or D > 256:
        raise ValueError(f"taca: head dim must be in [1, 256], got {D}")
    N = q.shape[2] if layout == "bhnd" else q.shape[1]
    if isinstance(text_len, bool) or not isinstance(text_len, (int, torch.SymInt)):
        raise TypeError(f"taca: text_len must be an int, got {type(text_len).__name__}")
    if text_len < 0 or text_len > N:
        raise ValueError(f"taca: text_len={text_len} must be in [0, {N}] (the sequence length)")
    if isinstance(gamma, torch.Tensor):
        B = q.shape[0]
        if gamma.dim() > 1 or (gamma.dim() == 1 and gamma.shape[0] != B):
            raise ValueError(f"taca: gamma must be a float, a 0-d tensor or a ({B},) tensor, got shape {tuple(gamma.shape)}")
        if not gamma.is_floating_point():
            raise TypeError(f"taca: gamma tensor must be floating point, got {gamma.dtype}")
        if gamma.device != q.device:
            raise ValueError(f"taca: gamma is on {gamma.device} but q is on {q.device}; pass gamma on q's device")
        # Values are checked only where that costs no device sync and no graph break; the
        # CPU kernel checks them itself (also under torch.compile).
        if gamma.device.type == "cpu" and not torch.compiler.is_compiling():
            if not bool(torch.isfinite(gamma).all()) or not bool((gamma > 0).all()):
                raise ValueError(f"taca: gamma={gamma.tolist()} must be finite and > 0")
    else:
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
            raise TypeError(f"taca: gamma must be a float or a tensor, got {type(gamma).__name__}")
        # chained comparisons, not math.isfinite: they also trace under torch.compile
        if not 0 < float(gamma) < math.inf:
            raise ValueError(f"taca: gamma={gamma} must be finite and > 0")
    if not 0 < float(gamma_reverse) < math.inf:
        raise ValueError(f"taca: gamma_reverse={gamma_reverse} must be finite and > 0")
    if scale is not None and not -math.inf < float(scale) < math.inf:
        raise ValueError(f"taca: scale={scale} must be finite")
    return N


# ---------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------

# Grid limits of the CUDA kernels (taca_fwd.cu, taca_bwd.cu): batch and heads index grid
# dimensions y / z (<= 65535; the backward runs D > 128 as two column halves per head), and
# token indices are int32.
_CUDA_GRID_MAX = 65535
_CUDA_SEQ_MAX = 2**31 - 1 - 256


def _kernel_refusal(q: torch.Tensor, gamma, layout: str = "bhnd") -> Optional[str]:
    """Why the compiled kernel cannot take these inputs (None: it can)."""
    if not HAVE_KERNELS:
        return f"the taca._C extension is not available ({_EXT_ERROR})"
    if isinstance(gamma, torch.Tensor) and gamma.requires_grad and torch.is_grad_enabled():
        return "gamma requires grad and the kernels give gamma no gradient"
    dev = q.device.type
    if dev == "cpu":
        return None
    if dev == "cuda":
        if not HAVE_CUDA_KERNEL:
            return "taca._C was built without CUDA kernels"
        if q.dtype not in (torch.float16, torch.bfloat16):
            return f"the CUDA kernel takes float16/bfloat16, got {q.dtype}"
        if q.shape[-1] not in CUDA_HEAD_DIMS:
            return f"head dim {q.shape[-1]} is not in ops.CUDA_HEAD_DIMS"
        B = q.shape[0]
        H, N = (q.shape[1], q.shape[2]) if layout == "bhnd" else (q.shape[2], q.shape[1])
        if B > _CUDA_GRID_MAX or H * (2 if q.shape[-1] > 128 else 1) > _CUDA_GRID_MAX:
            return f"batch {B} x heads {H} exceed the CUDA kernels' grid limit ({_CUDA_GRID_MAX})"
        if N > _CUDA_SEQ_MAX:
            return f"sequence length {N} exceeds the CUDA kernels' int32 token index"
        return None
    return f"no taca kernel for device type {dev!r}"


def _log_fallback(reason: str) -> None:
    global _warned_no_ext
    if torch.compiler.is_compiling():
        return
    if not HAVE_KERNELS and not _warned_no_ext:
        _warned_no_ext = True
        logger.warning("taca: compiled kernels unavailable, using split SDPA: %s", _EXT_ERROR)
    logger.debug("taca: backend='auto' falls back to SDPA: %s", reason)


def _gamma_vector(gamma, batch: int, device: torch.device) -> torch.Tensor:
    """gamma as the kernels take it: a contiguous (B,) float32 tensor on ``device``."""
    if isinstance(gamma, torch.Tensor):
        g = gamma.to(dtype=torch.float32)
        if g.dim() == 0:
            g = g.reshape(1).expand(batch)
        return g.contiguous()
    return torch.full((batch,), float(gamma), dtype=torch.float32, device=device)


def _kernel_forward(q, k, v, text_len, text_first, gamma, gamma_reverse, scale, layout,
                    return_text_mass):
    # The kernels take (B, N, H, D) views: "bhnd" is transposed, never copied.
    qn, kn, vn = ((t.transpose(1, 2) if layout == "bhnd" else t) for t in (q, k, v))
    # A non-unit stride on D is the one layout the kernels refuse: copy it.
    qn, kn, vn = ((t.contiguous() if t.size(-1) > 1 and t.stride(-1) != 1 else t) for t in (qn, kn, vn))
    B, N, _, D = qn.shape
    tb, te = reference.text_range(N, text_len, text_first)
    s = 1.0 / math.sqrt(D) if scale is None else float(scale)
    g = _gamma_vector(gamma, B, q.device)
    out, lse, tm = torch.ops.taca.fwd(qn, kn, vn, g, float(gamma_reverse), s, tb, te, return_text_mass)
    if layout == "bhnd":
        out = out.transpose(1, 2)
    return out, lse, tm


def joint_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    text_len: int,
    text_first: bool = True,
    gamma: Union[float, torch.Tensor] = 1.0,
    gamma_reverse: float = 1.0,
    scale: Optional[float] = None,
    layout: str = "bhnd",
    return_lse: bool = False,
    return_text_mass: bool = False,
    backend: str = "auto",
):
    """Gamma-scaled joint attention (TACA).

    q, k, v: (B, H, N, D) for layout "bhnd" or (B, N, H, D) for "bnhd", same shape, dtype and
    device; any batch/token/head strides (a non-unit stride on D is copied). Text tokens are
    the first ``text_len`` tokens (``text_first=True``, FLUX) or the last (SD3).
    gamma: float, 0-d tensor or (B,) tensor on q's device; multiplies the scaled logits of
    (visual query, text key) pairs. gamma_reverse multiplies those of (text query, visual key)
    pairs. scale defaults to 1/sqrt(D). Pass gamma as a tensor under torch.compile so changing
    its value does not recompile.

    Returns out (same shape, layout and dtype as q); with ``return_lse`` / ``return_text_mass``
    a tuple (out, lse, text_mass) holding the asked ones, lse and text_mass being (B, H, N)
    float32 (float64 for float64 inputs). lse and text_mass carry no gradient.

    backend: "auto" (CPU tensors -> C kernel; CUDA float16/bfloat16 with head dim in
    ``CUDA_HEAD_DIMS`` -> CUDA kernel; otherwise split SDPA, or the materialized float32
    reference when lse/text_mass are asked), "cpu" / "cuda" (force the kernel; error if it
    cannot run), "sdpa" (split SDPA), "reference" (materialized, upcast).

    Gradients: q, k and v get gradients on every backend. The kernels give gamma none, so a
    gamma tensor that requires grad sends backend="auto" to split SDPA, which differentiates it.
    """
    _validate(q, k, v, text_len, gamma, gamma_reverse, scale, layout, backend)
    want_extra = return_lse or return_text_mass

    if backend in ("cpu", "cuda"):
        if q.device.type != backend:
            raise ValueError(f"taca: backend={backend!r} needs q on a {backend} device, got {q.device}")
        reason = _kernel_refusal(q, None, layout)
        if reason is not None:
            raise RuntimeError(f"taca: backend={backend!r} cannot run: {reason}")
        use_kernel = True
    elif backend == "auto":
        reason = _kernel_refusal(q, gamma, layout)
        use_kernel = reason is None
        if not use_kernel:
            _log_fallback(reason)
    else:
        use_kernel = False

    if use_kernel:
        out, lse, tm = _kernel_forward(q, k, v, text_len, text_first, gamma, gamma_reverse,
                                       scale, layout, return_text_mass)
        return _pack(out, lse, tm, return_lse, return_text_mass)
    if backend == "reference" or want_extra:
        upcast = torch.float64 if q.dtype == torch.float64 else torch.float32
        out, lse, tm = reference.attention_ref(
            q, k, v, text_len=text_len, text_first=text_first, gamma=gamma,
            gamma_reverse=gamma_reverse, scale=scale, layout=layout, upcast=upcast,
        )
        return _pack(out.to(q.dtype), lse.detach(), tm.detach(), return_lse, return_text_mass)
    out = reference.attention_split_sdpa(
        q, k, v, text_len=text_len, text_first=text_first, gamma=gamma,
        gamma_reverse=gamma_reverse, scale=scale, layout=layout,
    )
    return out


def _pack(out, lse, tm, return_lse, return_text_mass):
    if not (return_lse or return_text_mass):
        return out
    res: Tuple[torch.Tensor, ...] = (out,)
    if return_lse:
        res += (lse,)
    if return_text_mass:
        res += (tm,)
    return res
