"""TACA joint attention on numpy arrays, through the C kernels, without torch.

``import taca.numpy`` needs only numpy and the compiled ``taca._numpy_C`` module.

Semantics are those of ``taca.joint_attention`` (``taca.reference.attention_ref`` spells them
out in PyTorch): text tokens are the first ``text_len`` tokens (``text_first=True``, FLUX) or
the last ones (SD3); gamma multiplies the scaled logits of (visual query, text key) pairs,
gamma_reverse those of (text query, visual key) pairs. gamma, gamma_reverse and scale reach the kernel
as float64 for float64 inputs (exact to float64 rounding) and are rounded once to float32 otherwise.
The NumPy binding covers one shared text span on one token set; per-sample spans, separate query
and key token sets, grouped KV heads and masks are in ``taca.joint_attention``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np

from . import _numpy_C

__all__ = ["joint_attention", "joint_attention_backward"]

GammaLike = Union[float, Sequence[float], np.ndarray]


def _kernel_dtype(arrays, names):
    """Common input dtype -> (kernel dtype, dtype to return)."""
    for a, name in zip(arrays, names):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"taca: {name} must be a numpy.ndarray, got {type(a).__name__}")
    dt = arrays[0].dtype
    for a, name in zip(arrays[1:], names[1:]):
        if a.dtype != dt:
            raise TypeError(f"taca: {name} has dtype {a.dtype}, expected {dt} like {names[0]}")
    if dt.kind == "f" and dt.itemsize == 2:
        return np.dtype(np.float32), dt
    if dt.kind == "f" and dt.itemsize in (4, 8):  # any byte order: the C side copies if needed
        return dt, dt
    raise TypeError(f"taca: {names[0]} must be float16, float32 or float64, got {dt}")


def joint_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    text_len: int,
    text_first: bool = True,
    gamma: GammaLike = 1.0,
    gamma_reverse: float = 1.0,
    scale: Optional[float] = None,
    layout: str = "bhnd",
    return_lse: bool = False,
    return_text_mass: bool = False,
    num_threads: int = 0,
):
    """Gamma-scaled joint attention (TACA) on the CPU kernel.

    q, k, v: (B, H, N, D) for ``layout="bhnd"`` or (B, N, H, D) for ``"bnhd"``; float32 or
    float64 (float16 is computed in float32 and cast back); any strides.
    gamma: float or (B,) array-like, > 0. scale defaults to 1/sqrt(D).
    num_threads: OpenMP threads; <= 0 uses the OpenMP default.

    Returns out (same layout and dtype as q) or, when asked, a tuple (out, [lse], [text_mass])
    in that order; lse and text_mass are (B, H, N), float32 (float64 for float64 inputs).
    """
    kdt, odt = _kernel_dtype((q, k, v), ("q", "k", "v"))
    if kdt != odt:
        q, k, v = (x.astype(kdt) for x in (q, k, v))
    out, lse, tm = _numpy_C.forward(
        q, k, v, text_len=text_len, text_first=text_first, gamma=gamma,
        gamma_reverse=gamma_reverse, scale=scale, layout=layout, return_lse=return_lse,
        return_text_mass=return_text_mass, num_threads=num_threads,
    )
    if kdt != odt:
        out = out.astype(odt)
    if not (return_lse or return_text_mass):
        return out
    res: Tuple[np.ndarray, ...] = (out,)
    if return_lse:
        res += (lse,)
    if return_text_mass:
        res += (tm,)
    return res


def joint_attention_backward(
    dout: np.ndarray,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    lse: np.ndarray,
    *,
    text_len: int,
    text_first: bool = True,
    gamma: GammaLike = 1.0,
    gamma_reverse: float = 1.0,
    scale: Optional[float] = None,
    layout: str = "bhnd",
    num_threads: int = 0,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of :func:`joint_attention` with respect to q, k and v.

    dout, q, k, v, out: same shape, layout and dtype (out from the forward, as are the
    arguments after ``lse``). lse: (B, H, N) from ``joint_attention(..., return_lse=True)``.
    Returns (dq, dk, dv) in the input layout and dtype.
    """
    kdt, odt = _kernel_dtype((dout, q, k, v, out), ("dout", "q", "k", "v", "out"))
    if kdt != odt:
        dout, q, k, v, out = (x.astype(kdt) for x in (dout, q, k, v, out))
    grads = _numpy_C.backward(
        dout, q, k, v, out, lse, text_len=text_len, text_first=text_first, gamma=gamma,
        gamma_reverse=gamma_reverse, scale=scale, layout=layout, num_threads=num_threads,
    )
    if kdt != odt:
        grads = tuple(g.astype(odt) for g in grads)
    return grads
