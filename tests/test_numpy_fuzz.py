"""Fuzzing taca._numpy_C and taca.numpy with random (mostly invalid) arguments.

Runs in-process on purpose: a crash (segfault, abort) kills pytest and fails the suite.
Every call must either raise TypeError/ValueError or return outputs of the right shape and
dtype, finite when the inputs are finite and moderate, and equal to a float64 NumPy
reference of the same call.
"""
import math

import numpy as np
import pytest

from taca import _numpy_C as C
from taca import numpy as tnp

N_CALLS = 4000


def _np_reference(q, k, v, text_len, text_first, gamma, gamma_reverse, scale, layout):
    """Materialized float64 reference of the forward: (out, lse, text_mass)."""
    f64 = np.asarray(q).dtype.itemsize == 8
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    if layout == "bnhd":
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    B, H, N, D = q.shape
    s = 1.0 / math.sqrt(D) if scale is None else scale  # the C default (rounded by the caller for float32)
    if not f64 and scale is None:
        s = float(np.float32(s))
    tb, te = (0, text_len) if text_first else (N - text_len, N)
    is_text = np.zeros(N, bool)
    is_text[tb:te] = True
    g = np.broadcast_to(np.asarray(gamma, dtype=np.float64), (B,)).reshape(B, 1, 1, 1)
    m = np.ones((B, 1, N, N))
    m = np.where((~is_text)[:, None] & is_text[None, :], g, m)
    m = np.where(is_text[:, None] & (~is_text)[None, :], gamma_reverse, m)
    logits = np.einsum("bhid,bhjd->bhij", q, k) * s * m
    mx = logits.max(-1, keepdims=True)
    e = np.exp(logits - mx)
    lse = np.log(e.sum(-1)) + mx[..., 0]
    p = e / e.sum(-1, keepdims=True)
    out = np.einsum("bhij,bhjd->bhid", p, v)
    tm = p[..., tb:te].sum(-1)
    if layout == "bnhd":
        out = out.transpose(0, 2, 1, 3)
    return out, lse, tm


class Gen:
    def __init__(self, seed):
        self.r = np.random.default_rng(seed)
        self.bad = False  # per call: whether invalid arguments may be generated

    def wrong(self, p):
        """True with probability p in a call that may have invalid arguments."""
        return self.bad and self.r.random() < p

    def pick(self, xs):
        return xs[int(self.r.integers(len(xs)))]

    def chance(self, p):
        return self.r.random() < p

    def garbage(self):
        return self.pick([None, "abc", b"x", [1, 2], {"a": 1}, object(), 1j, (), float("nan"),
                          np.array(["a"]), np.zeros(3, dtype=object), slice(1)])

    def base_shape(self):
        B, H, N = (int(self.r.integers(0, 3)), int(self.r.integers(0, 4)), int(self.r.integers(0, 24)))
        D = int(self.pick([1, 3, 8, 16, 24, 33, 64]))
        if self.wrong(0.05):
            D = self.pick([0, 257, 300])
        if self.chance(0.7):
            B, H, N = max(B, 1), max(H, 1), max(N, 1)
        return [B, H, N, D]

    def array(self, shape, dtype):
        """An array of `shape` (maybe perturbed), `dtype`, random strides and values."""
        shape = list(shape)
        if self.wrong(0.05):
            shape = shape[: int(self.r.integers(0, len(shape)))]  # wrong rank
        elif self.wrong(0.03):
            shape = shape + [2]
        elif self.wrong(0.04) and shape:
            i = int(self.r.integers(len(shape)))
            shape[i] += 1  # shape mismatch
        kind = self.pick(["plain", "plain", "transpose", "slice", "neg", "strided_last", "bcast"])
        if kind == "slice":
            big = [s * 2 if i == 1 else s for i, s in enumerate(shape)]
            x = self._fill(big, dtype)
            x = x[:, ::2] if x.ndim > 1 else x
        elif kind == "strided_last" and shape:
            x = self._fill(shape[:-1] + [shape[-1] * 2], dtype)[..., ::2]
        elif kind == "transpose" and len(shape) == 4:
            x = self._fill([shape[0], shape[2], shape[1], shape[3]], dtype).transpose(0, 2, 1, 3)
        elif kind == "neg" and len(shape) >= 3:
            x = self._fill(shape, dtype)[:, :, ::-1]
        elif kind == "bcast" and len(shape) == 4:
            x = np.broadcast_to(self._fill([shape[0], 1, shape[2], shape[3]], dtype), shape)
        else:
            x = self._fill(shape, dtype)
        return x

    def _fill(self, shape, dtype):
        dt = np.dtype(dtype)
        x = self.r.standard_normal(shape)
        if self.chance(0.1) and x.size:
            x.flat[int(self.r.integers(x.size))] = self.pick([np.nan, np.inf, -np.inf, 1e30])
        with np.errstate(all="ignore"):
            if dt.kind == "c":
                return (x + 1j * x).astype(dt)
            if dt.kind == "O":
                return x.astype(object)
            if dt.kind in "iub":
                return np.nan_to_num(x * 3).astype(dt)
            return x.astype(dt)

    def dtype(self):
        if not self.wrong(0.3):
            return self.pick([np.float32, np.float32, np.float64, np.float16])
        return self.pick([np.int32, np.int64, np.uint8, np.bool_, np.complex64, object, ">f4", ">f8"])

    def tensor(self, shape, dtype):
        if self.wrong(0.03):
            return self.garbage()
        if self.wrong(0.03):
            return self.array(shape, np.float64).tolist()
        return self.array(shape, self.dtype() if self.wrong(0.05) else dtype)

    def text_len(self, N):
        if not self.wrong(0.15):
            return int(self.r.integers(-1, N + 2)) if self.wrong(0.3) else int(self.r.integers(0, N + 1))
        return self.pick([2**70, -2**70, 1.5, None, "3", np.int64(1), True, np.float32(1), 2**31, -2**31])

    def real(self, ok):
        if not self.wrong(0.2):
            return ok
        return self.pick([0.0, -1.0, float("nan"), float("inf"), 1e39, 1e-50, 1e30, 3, np.float32(0.5),
                          np.int8(2), True, "1.0", None, [1.0], np.array(1.0), 1j, 10**400])

    def gamma(self, B):
        if not self.wrong(0.3):
            return float(self.r.uniform(0.5, 2.0)) if self.chance(0.5) else list(self.r.uniform(0.5, 2.0, size=B))
        return self.pick([np.array(self.r.uniform(0.5, 2, size=B), dtype=np.float32), [1.0] * (B + 1),
                          np.ones((B, 1)), np.array([1.0 + 1j] * B), np.array([1.0] * B, dtype=object),
                          "1", None, float("nan"), -1.0, [float("nan")] * B, [1.0, "a"], np.array(2.0),
                          [[1.0]], 10**400, [10**400] * B, 1e300])

    def flag(self):
        if not self.wrong(0.2):
            return self.pick([True, False, 0, 1, np.bool_(True)])
        return self.pick([2, "x", None, 1.0])

    def layout(self):
        if not self.wrong(0.1):
            return self.pick(["bhnd", "bnhd"])
        return self.pick(["BHND", "", 3, None, b"bhnd"])

    def threads(self):
        if not self.wrong(0.2):
            return self.pick([0, 1, 2, -3])
        return self.pick([10**6, 1.5, "2", None, 2**80])


def _moderate(x):
    return x is not None and 1e-2 <= abs(float(x)) <= 1e2


def _check_forward_result(res, args, kw, via_wrapper):
    q = args[0]
    if via_wrapper:
        want = 1 + bool(kw.get("return_lse")) + bool(kw.get("return_text_mass"))
        res = (res,) if want == 1 else res
        assert isinstance(res, tuple) and len(res) == want
        out = res[0]
        extra = list(res[1:])
    else:
        assert isinstance(res, tuple) and len(res) == 3
        out, lse, tm = res
        extra = [x for x in (lse, tm) if x is not None]
        assert (lse is not None) == bool(kw.get("return_lse")) and (tm is not None) == bool(kw.get("return_text_mass"))
    assert isinstance(out, np.ndarray) and out.shape == np.shape(q)
    layout = kw.get("layout", "bhnd")
    B, H, N = (q.shape[0], q.shape[1], q.shape[2]) if layout == "bhnd" else (q.shape[0], q.shape[2], q.shape[1])
    for x in extra:
        assert x.shape == (B, H, N)
    inputs_finite = all(np.all(np.isfinite(np.asarray(a, dtype=np.float64))) and np.max(np.abs(a), initial=0) < 1e3
                        for a in args[:3])
    g = kw.get("gamma", 1.0)
    g_ok = all(_moderate(x) for x in np.ravel(np.asarray(g, dtype=np.float64)))
    if (inputs_finite and g_ok and _moderate(kw.get("gamma_reverse", 1.0))
            and (kw.get("scale") is None or _moderate(kw["scale"]))):
        assert np.all(np.isfinite(out))
        for x in extra:
            assert np.all(np.isfinite(x))
        if out.size and q.dtype != np.float16:
            tf = kw.get("text_first", True)
            # the kernel sees gamma_reverse and scale as double for float64 inputs, rounded to
            # float32 otherwise (taca.h)
            rnd = (lambda x: float(x)) if q.dtype.itemsize == 8 else (lambda x: float(np.float32(x)))
            ref_out, ref_lse, ref_tm = _np_reference(
                *args[:3], int(kw["text_len"]), bool(tf), g, rnd(kw.get("gamma_reverse", 1.0)),
                None if kw.get("scale") is None else rnd(kw["scale"]), layout)
            tol = 1e-4 if q.dtype.itemsize == 4 else 1e-9
            np.testing.assert_allclose(out, ref_out, rtol=tol, atol=tol * 10)
    return out, (extra[0] if kw.get("return_lse") else None)


def _one_call(gen):
    """One random forward (and maybe backward) call; returns 'ok' or 'err'."""
    gen.bad = gen.chance(0.5)
    shape = gen.base_shape()
    layout = gen.layout()
    dt = gen.dtype()
    lay_shape = shape if layout != "bnhd" else [shape[0], shape[2], shape[1], shape[3]]
    q, k, v = (gen.tensor(lay_shape, dt) for _ in range(3))
    kw = {"text_len": gen.text_len(shape[2])}
    if gen.chance(0.5):
        kw["text_first"] = gen.flag()
    if gen.chance(0.7):
        g = gen.gamma(shape[0])
        kw["gamma"] = g
    if gen.chance(0.5):
        kw["gamma_reverse"] = gen.real(float(gen.r.uniform(0.5, 2.0)))
    if gen.chance(0.3):
        kw["scale"] = gen.real(float(gen.r.uniform(0.05, 0.5)))
    if gen.chance(0.9):
        kw["layout"] = layout
    if gen.chance(0.5):
        kw["return_lse"] = gen.flag()
    if gen.chance(0.3):
        kw["return_text_mass"] = gen.flag()
    if gen.chance(0.3):
        kw["num_threads"] = gen.threads()
    if gen.wrong(0.03):
        kw.pop("text_len")
    if gen.wrong(0.03):
        kw["bogus"] = 1
    via_wrapper = gen.chance(0.4)
    fn = tnp.joint_attention if via_wrapper else C.forward
    args = [q, k, v]
    if gen.wrong(0.03):
        args = args[: int(gen.r.integers(0, 3))]
    elif gen.wrong(0.03):
        args = args + [q]
    try:
        res = fn(*args, **kw)
    except (TypeError, ValueError):
        return "err"
    # keep the reference's gamma exactly what the kernel sees: float64 for float64 inputs,
    # rounded to float32 otherwise
    f64 = bool(args) and isinstance(args[0], np.ndarray) and args[0].dtype.kind == "f" and args[0].dtype.itemsize == 8
    if isinstance(kw.get("gamma"), list) or isinstance(kw.get("gamma"), np.ndarray):
        kw["gamma"] = np.asarray(kw["gamma"], dtype=np.float64)
        if not f64:
            kw["gamma"] = kw["gamma"].astype(np.float32).astype(np.float64)
    elif "gamma" in kw:
        kw["gamma"] = float(kw["gamma"]) if f64 else float(np.float32(float(kw["gamma"])))
    out, lse = _check_forward_result(res, args, kw, via_wrapper)

    if lse is None and gen.chance(0.3):
        lse = gen.tensor(out.shape[:3], np.float32)
    if lse is None:
        return "ok"
    bkw = {x: kw[x] for x in kw if x not in ("return_lse", "return_text_mass")}
    do = gen.tensor(np.shape(out), out.dtype)
    bargs = [do, q, k, v, out, lse]
    if gen.wrong(0.1):
        bargs[int(gen.r.integers(6))] = gen.garbage()
    if gen.wrong(0.1):
        bkw["text_len"] = gen.text_len(shape[2])
    bfn = tnp.joint_attention_backward if gen.chance(0.4) else C.backward
    try:
        grads = bfn(*bargs, **bkw)
    except (TypeError, ValueError):
        return "err"
    assert isinstance(grads, tuple) and len(grads) == 3
    for gr in grads:
        assert isinstance(gr, np.ndarray) and gr.shape == np.shape(q)
    return "ok"


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("seed", [0, 1])
def test_fuzz_calls_never_crash(seed):
    gen = Gen(seed)
    counts = {"ok": 0, "err": 0}
    for _ in range(N_CALLS):
        counts[_one_call(gen)] += 1
    # the fuzz must exercise both paths substantially
    assert counts["ok"] > N_CALLS // 5 and counts["err"] > N_CALLS // 10, counts


@pytest.mark.parametrize(
    "fn,args",
    [
        (C.forward, ()),
        (C.forward, (None, None, None)),
        (C.backward, (1, 2, 3, 4, 5, 6)),
        (C.forward, (np.zeros((1, 1, 2, 4), np.float32),) * 3),  # text_len missing
    ],
)
def test_direct_garbage(fn, args):
    with pytest.raises((TypeError, ValueError)):
        fn(*args)


def test_wrong_lse_dtype_and_values():
    q = np.random.default_rng(0).standard_normal((1, 2, 6, 8)).astype(np.float32)
    out, lse, _ = C.forward(q, q, q, text_len=2, return_lse=True)
    for bad in (lse.astype(np.int32), lse.astype(object), lse.astype(np.complex64), lse.tolist()):
        with pytest.raises(TypeError, match="lse"):
            C.backward(q, q, q, q, out, bad, text_len=2)
    # float64 lse is accepted for float32 inputs (cast), a NaN lse just yields NaN gradients
    g = C.backward(q, q, q, q, out, lse.astype(np.float64), text_len=2)
    assert all(np.isfinite(x).all() for x in g)
    g = C.backward(q, q, q, q, out, np.full_like(lse, np.nan), text_len=2)
    assert all(np.isnan(x).any() for x in g[:2])
