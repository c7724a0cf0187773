"""taca.joint_attention: the one op everything else calls.

The compiled kernels are reached through ``torch.ops.taca.fwd`` / ``torch.ops.taca.bwd``
(csrc/bind_torch.cpp), which take (B, N, H, D) views; this module registers their fake
impls (for torch.compile); the autograd of ``fwd`` (its backward is ``bwd``) is a C++ function in the
extension (less host time per call than a Python one).
``torch.ops.taca.fwd_fp8`` is the opt-in FP8 forward (``joint_attention(fp8=True)``; CUDA only, no autograd).

Dispatch (backend="auto"): CPU tensors -> the C kernel; CUDA float16/bfloat16 tensors with a
head dim in ``CUDA_HEAD_DIMS``, batch / heads within the kernels' grid limits and at least one key
-> the CUDA kernel (when built; on an H100/H200 its Hopper path for aligned D = 64, 72..128). Both
kernels cover every feature of the op: per-sample spans, N_q != N_k, grouped KV heads, masks;
on CUDA, auto runs outer-product masks (Chroma's float m_i * m_j, a bool m_i & m_j) as the key-mask
kernel plus, for the m_i = 0 rows, a maskless one (float) or a fully masked row's values (bool), and
sends other masks that vary over queries (not (B, H, 1, N_k) key masks) to split SDPA, which runs them
faster than the kernels' element-wise path, except masks whose rows all equal one row outside a few
(``_row_range_mask``: that row as a key mask, the few rows on split SDPA). Anything else -> the exact
split-SDPA form (``reference.attention_split_sdpa``), or the materialized reference when lse or
text_mass is asked for. ``_KERNEL_FEATURES`` lists what each kernel covers.
"""
from __future__ import annotations

import collections
import logging
import math
import threading
import weakref
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
    def _fwd_fake(q, k, v, gamma, gamma_reverse, scale, text_begin, text_end, return_text_mass,
                  q_text_begin=-1, q_text_end=-1, text_spans=None, attn_mask=None, deterministic=True):
        B, N, H, _ = q.shape
        acc = _acc_dtype(q.dtype)
        out = _alloc_like(q, q.dtype)
        lse = q.new_empty((B, H, N), dtype=acc)
        tm = q.new_empty((B, H, N) if return_text_mass else (0,), dtype=acc)
        return out, lse, tm

    if hasattr(torch.ops.taca, "fwd_fp8"):

        @torch.library.register_fake("taca::fwd_fp8")
        def _fwd_fp8_fake(q, k, v, gamma, gamma_reverse, scale, text_begin, text_end, return_text_mass,
                          q_text_begin=-1, q_text_end=-1):
            return _fwd_fake(q, k, v, gamma, gamma_reverse, scale, text_begin, text_end, return_text_mass)

    @torch.library.register_fake("taca::bwd")
    def _bwd_fake(dout, q, k, v, out, lse, gamma, gamma_reverse, scale, text_begin, text_end,
                  q_text_begin=-1, q_text_end=-1, text_spans=None, attn_mask=None, deterministic=True):
        return _alloc_like(q, q.dtype), _alloc_like(k, k.dtype), _alloc_like(v, v.dtype)


# ---------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------

def _span_arg(name, x, batch: int, q: torch.Tensor, allow_none: bool):
    """An int (or SymInt), None where allowed, or a (B,) integer tensor -> int64 on q's device."""
    if x is None and allow_none:
        return None
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
            raise TypeError(f"taca: {name} tensor must have an integer dtype, got {x.dtype}")
        if x.dim() != 1 or x.shape[0] != batch:
            raise ValueError(f"taca: {name} must be an int or a ({batch},) integer tensor (one value per "
                             f"sample), got shape {tuple(x.shape)}")
        if x.device != q.device and x.device.type != "cpu":
            raise ValueError(f"taca: {name} is on {x.device} but q is on {q.device}; pass it on q's device or the CPU")
        return x.to(device=q.device, dtype=torch.int64)
    if isinstance(x, bool) or not isinstance(x, (int, torch.SymInt)):
        what = "an int or a (B,) integer tensor" + (" or None" if allow_none else "")
        raise TypeError(f"taca: {name} must be {what}, got {type(x).__name__}")
    return x


def _check_span(spans: "reference.Spans", n_q: int, n_k: int, given) -> None:
    """0 <= begin <= end <= N for the key span (N_k) and the query span (N_q)."""
    checks = (("key", spans.k_begin, spans.k_end, n_k, given["text_start"], "text_start", "text_len"),
              ("query", spans.q_begin, spans.q_end, n_q, given["query_text_start"], "query_text_start",
               "query_text_len"))
    for which, b, e, n, start_given, start_name, len_name in checks:
        if not isinstance(b, torch.Tensor) and not isinstance(e, torch.Tensor):
            if b < 0 or e < b or e > n:
                if start_given is None and which == "key":
                    raise ValueError(f"taca: text_len={e - b} must be in [0, {n}] (the key sequence length)")
                raise ValueError(f"taca: {which} text span [{b}, {e}) ({start_name}, {len_name}) must lie in "
                                 f"[0, {n}] with a length >= 0 ({which} tokens: {n})")
            continue
        if torch.compiler.is_compiling():
            continue  # no value checks inside a graph (the CPU kernel checks spans itself)
        bt = b if isinstance(b, torch.Tensor) else torch.full_like(e, b)
        et = e if isinstance(e, torch.Tensor) else torch.full_like(b, e)
        ok = (bt >= 0) & (et >= bt) & (et <= n)
        if not bool(ok.all()):  # a device sync for CUDA tensors: pass ints to avoid it
            i = int((~ok).nonzero()[0, 0])
            raise ValueError(f"taca: {which} text span of sample {i}, [{int(bt[i])}, {int(et[i])}) "
                             f"({start_name}, {len_name}), must lie in [0, {n}] with a length >= 0")


# Span arguments given as tensors whose values were checked, so a model passing the same (B,) tensors to
# every attention layer pays the check's device sync once per set of tensors, not once per layer (on an
# H200 the sync made a FLUX-sized call's host time 1.2 ms against 0.13 ms with ints,
# benchmarks/results/KERNEL_LOG.md 2026-12-04 sixteenth session). An entry holds weak references, and each
# tensor's version counter: an in-place change, or a new tensor at a reused id, is checked again.
_CHECKED_SPANS: "collections.OrderedDict" = collections.OrderedDict()
_CHECKED_SPANS_MAX = 64
_CHECKED_SPANS_LOCK = threading.Lock()


def _tensor_key(t: torch.Tensor) -> tuple:
    """A tensor's identity in the caches below: a new tensor at a reused id, or an in-place change, differs."""
    return id(t), t._version, t.data_ptr(), t.device


def _cache_get(cache, lock, key):
    with lock:
        return cache.get(key)


def _cache_put(cache, lock, key, value, limit: int) -> None:
    with lock:  # threads sharing the module: no eviction between the insert and the move
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > limit:
            cache.popitem(last=False)


def _spans_key(args, n_q: int, n_k: int, text_first: bool):
    """(key, tensors) for the checked-span cache; None when no argument is a tensor."""
    tensors = tuple(x for x in args if isinstance(x, torch.Tensor))
    if not tensors:
        return None
    key = (n_q, n_k, bool(text_first)) + tuple(
        _tensor_key(x) if isinstance(x, torch.Tensor) else x for x in args)
    return key, tensors


def _spans_checked(entry) -> bool:
    refs = _cache_get(_CHECKED_SPANS, _CHECKED_SPANS_LOCK, entry[0])
    return refs is not None and all(r() is t for r, t in zip(refs, entry[1]))


def _remember_spans(entry) -> None:
    refs = tuple(weakref.ref(t) for t in entry[1])
    _cache_put(_CHECKED_SPANS, _CHECKED_SPANS_LOCK, entry[0], refs, _CHECKED_SPANS_MAX)


def _check_mask(attn_mask, q: torch.Tensor, target) -> None:
    if attn_mask is None:
        return
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"taca: attn_mask must be None or a torch.Tensor, got {type(attn_mask).__name__}")
    if attn_mask.dtype not in (torch.bool, torch.float32, q.dtype):
        raise TypeError(f"taca: attn_mask must be bool (True = attend) or a float mask of dtype float32 or "
                        f"q's dtype {q.dtype} (added to the logits), got {attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise ValueError(f"taca: attn_mask is on {attn_mask.device} but q is on {q.device}")
    shape = tuple(attn_mask.shape)
    if len(shape) > 4 or any(s != 1 and s != t for s, t in zip(reversed(shape), reversed(target))):
        hint = ""
        if len(shape) == 2 and shape == (target[0], target[3]):
            hint = "; a (B, N_k) key padding mask must be reshaped to (B, 1, 1, N_k)"
        raise ValueError(f"taca: attn_mask of shape {shape} does not broadcast to (B, H, N_q, N_k) = "
                         f"{tuple(target)} as F.scaled_dot_product_attention broadcasts it{hint}")


def _check_scalars(gamma, gamma_reverse, scale) -> None:
    """gamma (a number; None: a tensor, checked elsewhere) and gamma_reverse finite and > 0, scale None or finite.
    Chained comparisons, not math.isfinite: they also trace under torch.compile."""
    if gamma is not None and not 0 < float(gamma) < math.inf:
        raise ValueError(f"taca: gamma={gamma} must be finite and > 0")
    if not 0 < float(gamma_reverse) < math.inf:
        raise ValueError(f"taca: gamma_reverse={gamma_reverse} must be finite and > 0")
    if scale is not None and not -math.inf < float(scale) < math.inf:
        raise ValueError(f"taca: scale={scale} must be finite")


def _validate(q, k, v, text_len, gamma, gamma_reverse, scale, layout, backend, text_start=None,
              query_text_start=None, query_text_len=None, attn_mask=None, text_first=True):
    """Checks every argument; returns (N_q, N_k, H_kv, spans, per-sample span args normalized)."""
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
    hdim, ndim = (1, 2) if layout == "bhnd" else (2, 1)
    if v.shape != k.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(
            f"taca: k and v must have the same shape, with q's batch size and head dim (their token count "
            f"and head count may differ from q's), got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    H, Hkv = q.shape[hdim], k.shape[hdim]
    if Hkv == 0 and H != 0 or Hkv != 0 and H % Hkv != 0:
        raise ValueError(f"taca: q's {H} heads must be a multiple of k and v's {Hkv} heads (grouped "
                         f"KV heads: query head h reads kv head h // (H // H_kv)), got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"taca: q, k, v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"taca: q, k, v must be on the same device, got {q.device}, {k.device}, {v.device}")
    D = q.shape[-1]
    if D < 1 or D > 256:
        raise ValueError(f"taca: head dim must be in [1, 256], got {D}")
    B, Nq, Nk = q.shape[0], q.shape[ndim], k.shape[ndim]
    raw_spans = (text_len, text_start, query_text_start, query_text_len)  # as given: the checked-span cache's key
    if isinstance(text_len, torch.Tensor):
        text_len = _span_arg("text_len", text_len, B, q, False)
    elif isinstance(text_len, bool) or not isinstance(text_len, (int, torch.SymInt)):
        raise TypeError(f"taca: text_len must be an int or a ({B},) integer tensor, got {type(text_len).__name__}")
    text_start = _span_arg("text_start", text_start, B, q, True)
    query_text_start = _span_arg("query_text_start", query_text_start, B, q, True)
    query_text_len = _span_arg("query_text_len", query_text_len, B, q, True)
    given = dict(text_start=text_start, query_text_start=query_text_start)
    spans = reference.resolve_spans(Nq, Nk, text_len, text_first, text_start, query_text_start, query_text_len)
    entry = None
    if not torch.compiler.is_compiling():
        entry = _spans_key(raw_spans, Nq, Nk, text_first)
    if entry is None or not _spans_checked(entry):
        _check_span(spans, Nq, Nk, given)
        if entry is not None:
            _remember_spans(entry)
    _check_mask(attn_mask, q, (B, H, Nq, Nk))
    if isinstance(gamma, torch.Tensor):
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
    _check_scalars(None if isinstance(gamma, torch.Tensor) else gamma, gamma_reverse, scale)
    return Nq, Nk, Hkv, spans, (text_len, text_start, query_text_start, query_text_len)


# ---------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------

# Grid limits of the CUDA kernels (taca_fwd.cu, taca_bwd.cu): batch and heads index grid
# dimensions y / z (<= 65535; the backward runs D > 128 as two column halves per head), and
# token indices are int32.
_CUDA_GRID_MAX = 65535
_CUDA_SEQ_MAX = 2**31 - 1 - 256


def _kernel_refusal(q: torch.Tensor, gamma, layout: str = "bhnd", k: Optional[torch.Tensor] = None) -> Optional[str]:
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
        if k is not None:
            Nk = k.shape[2] if layout == "bhnd" else k.shape[1]
            if Nk == 0:
                return "the CUDA kernels need at least one key token (N_k = 0)"
            if Nk > _CUDA_SEQ_MAX:
                return f"key sequence length {Nk} exceeds the CUDA kernels' int32 token index"
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


def _feature_refusal(device_type: str, per_sample: bool, cross: bool, gqa: bool, mask) -> Optional[str]:
    """Why the kernel of ``device_type`` cannot run these features (None: it can)."""
    feats = []
    if per_sample:
        feats.append("per-sample text spans")
    if cross:
        feats.append("different query and key token sets")
    if gqa:
        feats.append("grouped KV heads")
    if mask is not None:
        feats.append("attn_mask")
    supported = _KERNEL_FEATURES.get(device_type, ())
    missing = [f for f in feats if f not in supported]
    if missing:
        return f"the {device_type} kernel does not support {', '.join(missing)}"
    return None


# What each kernel covers beyond one shared text span on one token set with equal heads.
_KERNEL_FEATURES = {
    "cpu": ("per-sample text spans", "different query and key token sets", "grouped KV heads", "attn_mask"),
    "cuda": ("per-sample text spans", "different query and key token sets", "grouped KV heads", "attn_mask"),
}


def _per_query_mask(attn_mask) -> bool:
    """True for a mask with more than one row over the queries (not a key mask)."""
    return attn_mask is not None and attn_mask.dim() >= 2 and attn_mask.shape[-2] > 1


# Outer-product masks: a float mask with mask[b, 0, i, j] = m[b, i] * m[b, j] for a 0/1 token vector m, added to the
# logits (Chroma), or a bool mask m_i & m_j (an outer-AND, as HunyuanVideo 1.5's; its adapter runs it as a key mask
# itself). Row i with m_i = 1 adds m_j to key j /
# keeps the keys with m_j: a KEY mask, which the kernels take per key tile (nearly free). Row i with m_i = 0 adds 0
# (float: no mask) / has every key masked (bool: out 0, lse -inf, text_mass 0, zero gradients, as the op defines a
# fully masked row). So the op runs as the key-mask kernel over every row, and (float) again without a mask over
# the rows [r0, r1) that hold every m_i = 0 row of the batch, whose outputs replace those rows; (bool) those rows
# are set to the fully masked row's values. The kernels' element-wise path or split SDPA ran Chroma's 4.5x /
# 1.2x slower forward and 3x slower forward + backward than plain SDPA with the mask (README, features table).
# Whether a mask is such a product is checked once per mask tensor (a device sync; a model that builds its mask anew
# in every block names the token mask instead: ``_outer_hint``). An entry holds a weak reference and the tensor's
# version: an in-place change is checked again.
_OUTER_MASKS: "collections.OrderedDict" = collections.OrderedDict()
_OUTER_MASKS_MAX = 16
_OUTER_MASKS_LOCK = threading.Lock()
_OUTER_CHUNK = 1 << 24  # mask elements compared at a time (bounds the check's temporaries)


def _outer_mask_rows(attn_mask: torch.Tensor):
    """(key mask (B', 1, 1, N) in the mask's dtype, zero rows (B', r1 - r0) bool, r0, r1) when ``attn_mask`` is a
    (B', 1, N, N) mask equal to m_i * m_j for a 0/1 vector m (float) or to m_i & m_j (bool), else None; r0 == r1:
    no m_i = 0 row."""
    if (torch.compiler.is_compiling() or attn_mask.dim() != 4 or attn_mask.shape[1] != 1
            or attn_mask.shape[2] != attn_mask.shape[3] or attn_mask.shape[2] == 0):
        return None
    if attn_mask.is_cuda and torch.cuda.is_current_stream_capturing():
        return None  # no sync inside a CUDA graph capture: such a call keeps split SDPA
    hit = _cache_get(_OUTER_MASKS, _OUTER_MASKS_LOCK, _tensor_key(attn_mask))
    if hit is not None and hit[0]() is attn_mask:
        return hit[1]
    m = torch.diagonal(attn_mask[:, 0], dim1=-2, dim2=-1)  # (B', N): m_i * m_i = m_i for m in {0, 1}
    is_bool = attn_mask.dtype == torch.bool
    ok = torch.ones((), dtype=torch.bool, device=m.device) if is_bool else ((m == 0) | (m == 1)).all()
    n = m.shape[-1]
    rows = max(1, _OUTER_CHUNK // n)
    chunks = [(b, i) for b in range(m.shape[0]) for i in range(0, n, rows)]
    for c, (b, i) in enumerate(chunks):
        mi, blk = m[b, i:i + rows, None], attn_mask[b, 0, i:i + rows]
        ok = ok & (blk == ((mi & m[b, None, :]) if is_bool else mi * m[b, None, :])).all()
        if c == 0 and len(chunks) > 1 and not bool(ok):  # a mask of another kind: one chunk read, not all
            res = None
            break
    else:
        res = _outer_mask_result(m, is_bool, ok, n)
    _remember_outer(attn_mask, res)
    return res


# Masks a model builds anew in every block from one (B, N) token mask (Chroma's blocks each compute
# m[:, None, None, :] * m[:, None, :, None] from the transformer's attention_mask): the adapter's processor names the
# token mask (``_outer_hint``), the first mask of each block kind is checked, and the later ones of that kind built
# from the same token mask are taken as its outer product without being read or synced on.
_TOKEN_MASKS: "collections.OrderedDict" = collections.OrderedDict()


def _outer_hint(attn_mask: torch.Tensor, token_mask: torch.Tensor, kind: str = "") -> None:
    """Tells backend="auto" that ``attn_mask`` (B, 1, N, N) is the outer product of ``token_mask`` (B, N) (float
    m_i * m_j or bool m_i & m_j) built by the formula of the blocks of ``kind``: checked for the first mask of a
    (token mask, kind, mask shape and dtype), taken for the later ones. Nothing happens where the check cannot run
    (torch.compile, a CUDA graph capture) or for a mask that is not such a product of this token mask."""
    if (torch.compiler.is_compiling() or not isinstance(token_mask, torch.Tensor) or attn_mask.dim() != 4
            or attn_mask.shape[1] != 1 or attn_mask.shape[2] != attn_mask.shape[3] or token_mask.dim() != 2
            or tuple(token_mask.shape) != (attn_mask.shape[0], attn_mask.shape[3])
            or (attn_mask.is_cuda and torch.cuda.is_current_stream_capturing())):
        return
    tkey = _tensor_key(token_mask) + (kind, tuple(attn_mask.shape), attn_mask.dtype, attn_mask.device)
    hit = _cache_get(_TOKEN_MASKS, _OUTER_MASKS_LOCK, tkey)
    if hit is not None and hit[0]() is token_mask:
        outer = hit[1]
    else:
        outer = _outer_mask_rows(attn_mask)  # the check (a sync)
        if outer is not None and not torch.equal(outer[0][:, 0, 0], token_mask.to(attn_mask.dtype)):
            outer = None  # a product, but not of this token mask: this mask keeps its own entry only
        _cache_put(_TOKEN_MASKS, _OUTER_MASKS_LOCK, tkey, (weakref.ref(token_mask), outer), _OUTER_MASKS_MAX)
    if outer is not None:
        _remember_outer(attn_mask, outer)


def _remember_outer(attn_mask: torch.Tensor, outer) -> None:
    _cache_put(_OUTER_MASKS, _OUTER_MASKS_LOCK, _tensor_key(attn_mask), (weakref.ref(attn_mask), outer),
               _OUTER_MASKS_MAX)


def _outer_mask_result(m, is_bool, ok, n):
    """_outer_mask_rows's answer from the diagonal m (B', n) and the comparisons' ``ok`` (a device bool)."""
    zero = ~m if is_bool else m == 0
    idx = torch.arange(n, device=m.device)
    anyz = zero.any(0)
    r0 = torch.where(anyz, idx, n).min()
    r1 = torch.where(anyz, idx + 1, 0).max()
    ok, r0, r1 = (int(x) for x in torch.stack([ok.to(torch.int64), r0, r1]).tolist())  # the sync
    if not ok:
        return None
    r1 = max(r1, r0)
    return m[:, None, None, :].contiguous(), zero[:, r0:r1].contiguous(), r0, r1


def _outer_mask_attention(q, k, v, outer, spans, layout, return_lse, return_text_mass, **kw):
    """joint_attention with an outer-product mask (``_outer_mask_rows``'s ``outer``) as the key-mask call over every
    row and, for rows [r0, r1), a maskless call (float) or the fully masked row's values (bool), spliced by the rows'
    m_i (int spans; N_q == N_k). kw: gamma, gamma_reverse, scale, deterministic, backend (the kernel's). Only what
    is asked for is computed (the kernels' text mass costs time)."""
    kmask, zrows, r0, r1 = outer
    flags = dict(return_lse=return_lse, return_text_mass=return_text_mass)
    kspan = dict(text_start=spans.k_begin, text_len=spans.k_end - spans.k_begin)

    res = _as_list(joint_attention(q, k, v, layout=layout, attn_mask=kmask, query_text_start=spans.q_begin,
                                query_text_len=spans.q_end - spans.q_begin, **flags, **kspan, **kw))
    if r1 > r0:
        tok = 2 if layout == "bhnd" else 1
        dims = [tok] + [2] * (len(res) - 1)  # out's token dim; lse and text_mass are (B, H, N_q)
        if kmask.dtype == torch.bool:  # the m_i = 0 rows have every key masked: what the op gives such a row
            fills = [0.0] + ([-math.inf] if return_lse else []) + ([0.0] if return_text_mass else [])
            sub = [x.new_full((), f).expand_as(x.narrow(d, r0, r1 - r0)) for x, d, f in zip(res, dims, fills)]
        else:
            qs = q.narrow(tok, r0, r1 - r0)
            qb, qe = min(max(spans.q_begin - r0, 0), r1 - r0), min(max(spans.q_end - r0, 0), r1 - r0)
            sub = _as_list(joint_attention(qs, k, v, layout=layout, query_text_start=qb, query_text_len=max(qe - qb, 0),
                                        **flags, **kspan, **kw))
        sels = [zrows[:, None, :, None] if layout == "bhnd" else zrows[:, :, None, None]] + [zrows[:, None, :]] * 2
        for i, (a, s_, d) in enumerate(zip(res, sub, dims)):
            res[i] = _splice(a, d, r0, r1, torch.where(sels[i], s_, a.narrow(d, r0, r1 - r0)))
    return tuple(res) if len(res) > 1 else res[0]


def _as_list(res) -> list:
    """joint_attention's result (out, or a tuple of the asked outputs) as a list."""
    return list(res) if isinstance(res, tuple) else [res]


def _splice(a: torch.Tensor, d: int, r0: int, r1: int, mid: torch.Tensor) -> torch.Tensor:
    """``a`` with its rows [r0, r1) along dim ``d`` replaced by ``mid``."""
    if r0 == 0 and r1 == a.shape[d]:
        return mid
    return torch.cat([a.narrow(d, 0, r0), mid, a.narrow(d, r1, a.shape[d] - r1)], dim=d)


# Device types on which backend="auto" decomposes masks that vary over queries (the outer products above, the row
# ranges below) into key-mask kernel calls: CUDA, where the kernels take a key mask per key tile and any other mask
# element by element (or split SDPA). The CPU kernel reads every mask element by element at no loss; tests add "cpu"
# to run the decompositions through whole models on it.
_MASK_ROUTES = ("cuda",)

# Masks whose query rows all equal one row outside a contiguous range [r0, r1): OmniGen's image rows (every image
# query sees every unpadded token; its processor passes those rows of the model's (B, 1, N, N) mask), Ideogram 4's
# segment mask (every row but the left padding's). Outside [r0, r1) the mask is that row broadcast, a KEY mask, which
# the kernels take per key tile; the rows [r0, r1) run apart with their own rows of the mask (split SDPA) and replace
# those rows. Checked once per mask (a read of it and a device sync); a view is known by its base tensor and its place
# in it, so a model that slices one mask in every block is checked once per mask, not per block.
_ROW_MASKS: "collections.OrderedDict" = collections.OrderedDict()


def _mask_identity(t: torch.Tensor):
    """(cache key, tensor to hold weakly): a view by its base and its place in it (views share the version counter)."""
    base = t if t._base is None else t._base
    return _tensor_key(base) + (t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype), base


def _row_range_mask(attn_mask: torch.Tensor):
    """(key mask (..., 1, N_k), r0, r1) when every query row of ``attn_mask`` (..., N_q, N_k) outside rows [r0, r1)
    equals its last row (or else its first) in every leading index, [r0, r1) being at most half the rows
    (r0 == r1: every row equal); else None. NaN compares unequal (no key mask then)."""
    if (torch.compiler.is_compiling() or attn_mask.requires_grad or attn_mask.dim() < 2 or attn_mask.shape[-2] < 2
            or attn_mask.shape[-1] == 0):
        return None
    if attn_mask.is_cuda and torch.cuda.is_current_stream_capturing():
        return None  # no sync inside a CUDA graph capture: such a call keeps split SDPA
    key, base = _mask_identity(attn_mask)
    hit = _cache_get(_ROW_MASKS, _OUTER_MASKS_LOCK, key)
    if hit is not None and hit[0]() is base:
        found = hit[1]
    else:
        found = None
        n = attn_mask.shape[-2]
        per_row = max(1, attn_mask[..., :1, :].numel())
        rows = max(1, _OUTER_CHUNK // per_row)
        refs = (n - 1, 0)  # the last row first (left padding apart), then the first (right padding apart)
        diffs = [[] for _ in refs]
        for i in range(0, n, rows):
            blk = attn_mask[..., i:i + rows, :]
            for ref, parts in zip(refs, diffs):
                d = (blk != attn_mask[..., ref:ref + 1, :]).any(-1)  # (..., rows): a row differs somewhere
                parts.append(d.reshape(-1, d.shape[-1]).any(0))
        idx = torch.arange(n, device=attn_mask.device)
        ends = []
        for parts in diffs:
            diff = torch.cat(parts)
            ends += [torch.where(diff, idx, n).min(), torch.where(diff, idx + 1, 0).max()]
        ends = [int(x) for x in torch.stack(ends).tolist()]  # the sync (one for both references)
        for j, ref in enumerate(refs):
            r0, r1 = ends[2 * j], ends[2 * j + 1]
            if r1 <= r0:  # no row differs
                r0 = r1 = 0
            if r1 - r0 <= n // 2:
                found = (ref, r0, r1)
                break
        _cache_put(_ROW_MASKS, _OUTER_MASKS_LOCK, key, (weakref.ref(base), found), _OUTER_MASKS_MAX)
    if found is None:
        return None
    ref, r0, r1 = found
    return attn_mask[..., ref:ref + 1, :], r0, r1


def _row_range_attention(q, k, v, rowmask, attn_mask, spans, span_args, text_first, layout, return_lse,
                         return_text_mass, **kw):
    """joint_attention with ``_row_range_mask``'s answer: the key-mask kernel over every row, and the rows [r0, r1)
    again with their own rows of ``attn_mask`` (split SDPA; lse / text_mass, where asked, from the materialized
    reference), spliced in. spans, span_args: _validate's resolved spans and its normalized (text_len, text_start,
    query_text_start, query_text_len); kw:
    gamma, gamma_reverse, scale, deterministic, backend (the kernel's)."""
    kmask, r0, r1 = rowmask
    text_len, text_start, qts, qtl = span_args
    flags = dict(return_lse=return_lse, return_text_mass=return_text_mass)
    span_kw = dict(text_len=text_len, text_first=text_first, text_start=text_start, query_text_start=qts,
                   query_text_len=qtl)
    res = joint_attention(q, k, v, layout=layout, attn_mask=kmask, **flags, **span_kw, **kw)
    if r1 == r0:
        return res
    res = _as_list(res)
    tok = 2 if layout == "bhnd" else 1
    # the query text span within rows [r0, r1) (ints or per-sample tensors)
    qb = (spans.q_begin - r0).clamp(0, r1 - r0) if isinstance(spans.q_begin, torch.Tensor) else \
        min(max(spans.q_begin - r0, 0), r1 - r0)
    qe = (spans.q_end - r0).clamp(0, r1 - r0) if isinstance(spans.q_end, torch.Tensor) else \
        min(max(spans.q_end - r0, 0), r1 - r0)
    sub_mask = attn_mask.narrow(-2, r0, r1 - r0) if attn_mask.shape[-2] > 1 else attn_mask
    # joint_attention's split-SDPA / reference fallback itself (the spans were checked by the call above: new span
    # tensors here would be checked again, a device sync per call)
    sub_kw = dict(gamma=kw["gamma"], gamma_reverse=kw["gamma_reverse"], scale=kw["scale"], layout=layout,
                  text_len=spans.k_end - spans.k_begin, text_start=spans.k_begin, query_text_start=qb,
                  query_text_len=qe - qb, attn_mask=sub_mask)
    qs = q.narrow(tok, r0, r1 - r0)
    sub = [reference.attention_split_sdpa(qs, k, v, **sub_kw)]  # out the same whatever else is asked
    if return_lse or return_text_mass:
        upcast = torch.float64 if q.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            _, lse, tm = reference.attention_ref(qs, k, v, upcast=upcast, **sub_kw)
        sub += ([lse] if return_lse else []) + ([tm] if return_text_mass else [])
    dims = [tok] + [2] * (len(res) - 1)  # out's token dim; lse and text_mass are (B, H, N_q)
    for i, (a, s_, d) in enumerate(zip(res, sub, dims)):
        res[i] = _splice(a, d, r0, r1, s_.to(a.dtype))
    return tuple(res) if len(res) > 1 else res[0]


# The processors' call (int text span, no mask, no per-sample or query span, not fp8) repeats with the same shapes in
# every block: once such a call passed _validate and went to a kernel, its key (every property _validate and the
# dispatch read, apart from the scalars, which _check_scalars checks at every call) maps to its spans and the next
# such call goes to the kernel directly. _validate and the dispatch cost ~30 us a call on the GPU machine's host
# (benchmarks/bench_host_cost.py: joint_attention 49.8 us a forward against the op's 18.5), which a training step at
# batch 1 pays in full (KERNEL_LOG, forty-fifth session). Not under torch.compile, not for tensor subclasses or a gamma
# tensor on the CPU (its values are checked at every call).
_FAST_CALLS: dict = {}
_FAST_CALLS_MAX = 256


def _fast_key(q, k, v, text_len, text_first, gamma, layout, backend):
    if type(q) is not torch.Tensor or type(k) is not torch.Tensor or type(v) is not torch.Tensor:
        return None
    if type(text_first) is not bool or torch.compiler.is_compiling():
        return None
    if type(gamma) is float:
        g = None
    elif type(gamma) is torch.Tensor and gamma.device.type != "cpu":
        g = (gamma.shape, gamma.dtype, gamma.device, gamma.requires_grad)
    else:
        return None
    return (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, text_len, text_first,
            layout, backend, g, torch.is_grad_enabled())


def _gamma_vector(gamma, batch: int, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """gamma as the kernels take it: a contiguous (B,) tensor of the accumulation type."""
    if isinstance(gamma, torch.Tensor):
        g = gamma.to(dtype=dtype)
        if g.dim() == 0:
            g = g.reshape(1).expand(batch)
        return g.contiguous()
    return torch.full((batch,), float(gamma), dtype=dtype, device=device)


def _check_fp8(q, k, v, gamma, layout, backend, spans, attn_mask) -> None:
    """joint_attention(fp8=True)'s preconditions, each refused with what it needs, before any work."""
    if backend not in ("auto", "cuda"):
        raise ValueError(f"taca: fp8=True runs the CUDA kernel; backend={backend!r} cannot (use 'auto' or 'cuda')")
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"taca: fp8=True takes float16 or bfloat16 q, k, v, got {q.dtype}")
    if q.shape[-1] != 128:
        raise ValueError(f"taca: fp8=True takes head dim 128, got {q.shape[-1]}")
    if attn_mask is not None:
        raise ValueError("taca: fp8=True takes no attn_mask (the FP8 kernel has no mask path)")
    if spans.per_sample:
        raise ValueError("taca: fp8=True takes int span arguments (text_len, text_start, ...), not per-sample tensors")
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (q, k, v, gamma)):
        raise ValueError("taca: fp8=True is an inference forward with no backward: call it under torch.no_grad() "
                         "or torch.inference_mode(), or drop fp8 for training")
    if q.device.type != "cuda":
        raise ValueError(f"taca: fp8=True runs on a CUDA device (an sm_90 GPU), got q on {q.device}")
    reason = _kernel_refusal(q, None, layout, k)  # the extension and its CUDA kernels present, grid limits, N_k > 0
    if reason is not None:
        raise RuntimeError(f"taca: fp8=True cannot run: {reason}")


def _kernel_forward(q, k, v, spans, gamma, gamma_reverse, scale, layout, return_text_mass,
                    attn_mask=None, deterministic=True, fp8=False):
    # The kernels take (B, N, H, D) views: "bhnd" is transposed, never copied.
    if layout == "bhnd":
        qn, kn, vn = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    else:
        qn, kn, vn = q, k, v
    # A non-unit stride on D is the one layout the kernels refuse: copy it.
    if qn.stride(-1) != 1 or kn.stride(-1) != 1 or vn.stride(-1) != 1:
        qn, kn, vn = ((t.contiguous() if t.size(-1) > 1 and t.stride(-1) != 1 else t) for t in (qn, kn, vn))
    B, _, _, D = qn.shape
    s = 1.0 / math.sqrt(D) if scale is None else float(scale)
    g = _gamma_vector(gamma, B, q.device, _acc_dtype(q.dtype))
    if fp8:
        out, lse, tm = torch.ops.taca.fwd_fp8(qn, kn, vn, g, float(gamma_reverse), s, spans.k_begin, spans.k_end,
                                              return_text_mass, spans.q_begin, spans.q_end)
    elif spans.per_sample:
        cols = [x if isinstance(x, torch.Tensor) else torch.full((B,), x, dtype=torch.int64, device=q.device)
                for x in spans]
        out, lse, tm = torch.ops.taca.fwd(qn, kn, vn, g, float(gamma_reverse), s, 0, 0, return_text_mass,
                                          0, 0, torch.stack(cols, dim=1), attn_mask, deterministic)
    elif attn_mask is None and spans.q_begin is spans.k_begin and spans.q_end is spans.k_end and deterministic:
        out, lse, tm = torch.ops.taca.fwd(qn, kn, vn, g, float(gamma_reverse), s, spans.k_begin, spans.k_end,
                                          return_text_mass)
    else:
        out, lse, tm = torch.ops.taca.fwd(qn, kn, vn, g, float(gamma_reverse), s, spans.k_begin, spans.k_end,
                                          return_text_mass, spans.q_begin, spans.q_end, None, attn_mask,
                                          deterministic)
    if layout == "bhnd":
        out = out.transpose(1, 2)
    return out, lse, tm


def joint_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    text_len: Union[int, torch.Tensor],
    text_first: bool = True,
    gamma: Union[float, torch.Tensor] = 1.0,
    gamma_reverse: float = 1.0,
    scale: Optional[float] = None,
    layout: str = "bhnd",
    return_lse: bool = False,
    return_text_mass: bool = False,
    backend: str = "auto",
    text_start: Optional[Union[int, torch.Tensor]] = None,
    query_text_start: Optional[Union[int, torch.Tensor]] = None,
    query_text_len: Optional[Union[int, torch.Tensor]] = None,
    attn_mask: Optional[torch.Tensor] = None,
    deterministic: bool = True,
    fp8: bool = False,
):
    """Gamma-scaled joint attention (TACA).

    q: (B, H, N_q, D) for layout "bhnd" or (B, N_q, H, D) for "bnhd"; k, v: (B, H_kv, N_k, D) or
    (B, N_k, H_kv, D), same shape as each other; q, k, v of one dtype and device, any
    batch/token/head strides (a non-unit stride on D is copied). N_q may differ from N_k
    (image-only queries against [text, image] keys; cached keys). H % H_kv == 0: query head h
    reads kv head h // (H // H_kv), as SDPA's ``enable_gqa=True`` (no K/V copies on the kernels).

    Text spans (each argument an int shared by the batch or a (B,) integer tensor, per sample):
    key text tokens of sample b are [text_start[b], text_start[b] + text_len[b]); text_start None
    means 0 with ``text_first=True`` (FLUX) and N_k - text_len with ``text_first=False`` (SD3).
    Text queries are [query_text_start, query_text_start + query_text_len): by default the key
    span when N_q == N_k (one token set), and no text query at all when N_q != N_k;
    query_text_len given without query_text_start starts at 0 (text_first) or N_q - len.
    Span tensors' values are checked once per set of tensors (for CUDA tensors that check is a
    device sync): pass the same tensors to every layer; an in-place change is checked again.

    The logit of query i and key j is scale * (q_i . k_j) * m_ij (+ mask), with m_ij = gamma[b]
    for (visual query, text key), gamma_reverse for (text query, visual key), 1 otherwise.
    gamma: float, 0-d tensor or (B,) tensor on q's device. scale defaults to 1/sqrt(D). Pass
    gamma as a tensor under torch.compile so changing its value does not recompile.

    attn_mask: None, a bool tensor (True = attend) or a float tensor (float32 or q's dtype)
    added to the logits after scale and gamma, broadcastable to (B, H, N_q, N_k) exactly as
    ``F.scaled_dot_product_attention`` takes it (so a (B, N_k) padding mask must be passed as
    (B, 1, 1, N_k)). A query row with every key masked returns out = 0 (what torch's SDPA
    returns on CPU), lse = -inf, text_mass = 0, and zero gradients. On CUDA, backend="auto" runs a
    key mask on the kernel's per-tile path; a (B, 1, N, N) mask that is an outer product of a 0/1
    token mask m (float m_i * m_j, as Chroma's, or bool m_i & m_j) as that key mask with the m_i = 0
    rows apart (checked once per mask tensor: one read of it and a device sync); a mask whose query
    rows all equal one row outside a contiguous range of at most half of them (OmniGen's image rows,
    Ideogram 4's segment mask) as that row's key mask with the range's rows on split SDPA (checked
    once per mask; a view by its base tensor); any other mask that varies over queries on split SDPA.

    Returns out (q's shape, layout and dtype); with ``return_lse`` / ``return_text_mass`` a
    tuple (out, lse, text_mass) holding the asked ones, lse and text_mass being (B, H, N_q)
    float32 (float64 for float64 inputs), probabilities after masking. They carry no gradient.

    backend: "auto" (CPU tensors -> C kernel; CUDA float16/bfloat16 with head dim in
    ``CUDA_HEAD_DIMS`` -> CUDA kernel; anything a kernel does not cover -> split SDPA, or the
    materialized reference when lse/text_mass are asked; a debug log line says why), "cpu" /
    "cuda" (force the kernel; error if it cannot run), "sdpa" (split SDPA), "reference"
    (materialized, upcast). Float64 inputs are exact to float64 rounding on every backend.

    Gradients: q, k and v get gradients on every backend. The kernels give gamma none, so a
    gamma tensor that requires grad sends backend="auto" to split SDPA, which differentiates it.
    deterministic: True (default): the CUDA backward adds each query tile's dQ parts in a fixed
    order, so gradients are bitwise repeatable. False: unordered float32 atomics (FlashAttention-2's
    way; faster, last-bit run-to-run differences in dq). The CPU kernel and split SDPA ignore it, and so
    do the rows that backend="auto" sends to split SDPA beside a kernel call (a mask's few differing
    rows, see attn_mask): torch's SDPA backward with a mask adds its parts in no fixed order.

    fp8: True runs the opt-in FP8 (e4m3) forward, for inference: q and k are quantized with one scale
    per 128-token tile, v with one per channel, the attention probabilities in e4m3 too, products
    accumulated in float32 (``reference.quantize_fp8`` / ``attention_fp8_ref`` are its arithmetic).
    Faster than the 16-bit kernel, less exact (benchmarks/results/KERNEL_LOG.md gives both, measured).
    Needs a CUDA float16/bfloat16 q on an sm_90 GPU with a build for sm_90a, head dim 128, no attn_mask,
    span arguments that are ints, and no gradient (under torch.no_grad() or torch.inference_mode(), or
    inputs that do not require grad): anything else raises rather than silently running another path.
    """
    fast = None
    if (type(text_len) is int and text_start is None and query_text_start is None and query_text_len is None
            and attn_mask is None and fp8 is False and type(deterministic) is bool):
        fast = _fast_key(q, k, v, text_len, text_first, gamma, layout, backend)
        if fast is not None:
            spans = _FAST_CALLS.get(fast)
            if spans is not None:
                _check_scalars(None if isinstance(gamma, torch.Tensor) else gamma, gamma_reverse, scale)  # (no key)
                out, lse, tm = _kernel_forward(q, k, v, spans, gamma, gamma_reverse, scale, layout,
                                               return_text_mass, None, deterministic)
                return _pack(out, lse, tm, return_lse, return_text_mass)
    if not isinstance(deterministic, bool):
        raise TypeError(f"taca: deterministic must be a bool, got {type(deterministic).__name__}")
    if not isinstance(fp8, bool):
        raise TypeError(f"taca: fp8 must be a bool, got {type(fp8).__name__}")
    Nq, Nk, Hkv, spans, span_args = _validate(
        q, k, v, text_len, gamma, gamma_reverse, scale, layout, backend, text_start,
        query_text_start, query_text_len, attn_mask, text_first)
    if fp8:
        _check_fp8(q, k, v, gamma, layout, backend, spans, attn_mask)
        out, lse, tm = _kernel_forward(q, k, v, spans, gamma, gamma_reverse, scale, layout,
                                       return_text_mass, fp8=True)
        return _pack(out, lse, tm, return_lse, return_text_mass)
    text_len, text_start, query_text_start, query_text_len = span_args
    H = q.shape[1] if layout == "bhnd" else q.shape[2]
    want_extra = return_lse or return_text_mass
    feats = (spans.per_sample, Nq != Nk, Hkv != H, attn_mask)

    if backend in ("cpu", "cuda"):
        if q.device.type != backend:
            raise ValueError(f"taca: backend={backend!r} needs q on a {backend} device, got {q.device}")
        reason = _kernel_refusal(q, None, layout, k) or _feature_refusal(backend, *feats)
        if reason is not None:
            raise RuntimeError(f"taca: backend={backend!r} cannot run: {reason}")
        use_kernel = True
    elif backend == "auto":
        reason = _kernel_refusal(q, gamma, layout, k)
        if reason is None:
            reason = _feature_refusal(q.device.type, *feats)
        if reason is None and q.device.type in _MASK_ROUTES and _per_query_mask(attn_mask):
            # outer-product masks (Chroma's float one, bool outer-ANDs): the key-mask kernel, the m_i = 0 rows apart
            if Nq == Nk and not spans.per_sample:
                outer = _outer_mask_rows(attn_mask)
                if outer is not None:
                    return _outer_mask_attention(
                        q, k, v, outer, spans, layout, return_lse, return_text_mass, gamma=gamma,
                        gamma_reverse=gamma_reverse, scale=scale, deterministic=deterministic,
                        backend=q.device.type)
            # rows all equal outside a few (OmniGen's image rows, Ideogram 4's segment mask): the key-mask kernel
            rowmask = _row_range_mask(attn_mask)
            if rowmask is not None:
                return _row_range_attention(
                    q, k, v, rowmask, attn_mask, spans, span_args, text_first, layout, return_lse, return_text_mass,
                    gamma=gamma, gamma_reverse=gamma_reverse, scale=scale, deterministic=deterministic,
                    backend=q.device.type)
            # Other masks that vary over queries: the kernels read them element by element on every tile; split
            # SDPA (its memory-efficient backend) was 3-4x faster on such a (B, 1, N, N) mask on an H200
            # (benchmarks/results/features_*.json). Key masks (B, 1, 1, N_k) stay on the kernel.
            reason = "a mask that varies over queries runs faster on split SDPA than on the CUDA kernel"
        use_kernel = reason is None
        if not use_kernel:
            _log_fallback(reason)
    else:
        use_kernel = False

    if use_kernel:
        out, lse, tm = _kernel_forward(q, k, v, spans, gamma, gamma_reverse, scale, layout,
                                       return_text_mass, attn_mask, deterministic)
        if fast is not None:  # validated and sent to the kernel: the next call like it goes straight there
            if len(_FAST_CALLS) >= _FAST_CALLS_MAX:
                _FAST_CALLS.clear()
            _FAST_CALLS[fast] = spans
        return _pack(out, lse, tm, return_lse, return_text_mass)
    span_kw = dict(text_len=text_len, text_first=text_first, text_start=text_start,
                   query_text_start=query_text_start, query_text_len=query_text_len, attn_mask=attn_mask)
    if backend == "reference" or want_extra:
        upcast = torch.float64 if q.dtype == torch.float64 else torch.float32
        out, lse, tm = reference.attention_ref(
            q, k, v, gamma=gamma, gamma_reverse=gamma_reverse, scale=scale, layout=layout,
            upcast=upcast, **span_kw,
        )
        return _pack(out.to(q.dtype), lse.detach(), tm.detach(), return_lse, return_text_mass)
    out = reference.attention_split_sdpa(
        q, k, v, gamma=gamma, gamma_reverse=gamma_reverse, scale=scale, layout=layout, **span_kw,
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
