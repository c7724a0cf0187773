"""taca.numpy (the C CPU kernels through taca._numpy_C) against the float64 reference.

The reference is taca.reference.attention_ref (materialized, float64) and torch autograd of it.
gamma, gamma_reverse and scale are chosen exactly representable in float32 (the C ABI takes
them as float32), so float64 results can be compared tightly.
"""
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from taca import numpy as tnp
from taca.reference import attention_ref

RNG_SEED = 1234


def _f32(x: float) -> float:
    return float(np.float32(x))


def _inputs(shape, dtype, seed, n=4):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(dtype) for _ in range(n)]


def _reference(q, k, v, dout, *, text_len, text_first, gamma, gamma_reverse, scale, layout):
    """(out, lse, text_mass, dq, dk, dv) as float64 numpy arrays."""
    tq, tk, tv = (torch.tensor(np.array(x, dtype=np.float64), requires_grad=True) for x in (q, k, v))
    g = torch.tensor(np.asarray(gamma, dtype=np.float64)) if np.ndim(gamma) else float(gamma)
    out, lse, tm = attention_ref(tq, tk, tv, text_len=text_len, text_first=text_first, gamma=g,
                                 gamma_reverse=gamma_reverse, scale=scale, layout=layout)
    out.backward(torch.tensor(np.array(dout, dtype=np.float64)))
    return [t.detach().numpy() for t in (out, lse, tm, tq.grad, tk.grad, tv.grad)]


def _run(q, k, v, dout, num_threads=0, **kw):
    out, lse, tm = tnp.joint_attention(q, k, v, return_lse=True, return_text_mass=True,
                                       num_threads=num_threads, **kw)
    dq, dk, dv = tnp.joint_attention_backward(dout, q, k, v, out, lse, num_threads=num_threads, **kw)
    return [out, lse, tm, dq, dk, dv]


NAMES = ("out", "lse", "text_mass", "dq", "dk", "dv")


def _assert_close(got, ref, rtol, what=""):
    """Max error relative to the tensor's scale (max |ref|, at least 1)."""
    for name, a, r in zip(NAMES, got, ref):
        assert a.shape == r.shape, (what, name, a.shape, r.shape)
        assert np.all(np.isfinite(a)), (what, name, "non-finite output")
        err = float(np.max(np.abs(a.astype(np.float64) - r))) if a.size else 0.0
        tol = rtol * max(1.0, float(np.max(np.abs(r))) if r.size else 0.0)
        assert err <= tol, f"{what} {name}: max error {err:.3g} > {tol:.3g}"


# (B, H, text_len, image tokens, D, text_first, layout, gamma, gamma_reverse)
GRID = [
    (1, 2, 0, 97, 64, True, "bhnd", 1.25, 1.0),
    (2, 2, 1, 5, 32, False, "bnhd", [1.25, 1.5], 1.0),
    (1, 2, 77, 97, 128, True, "bnhd", 1.5, 0.75),
    (2, 1, 77, 1, 40, False, "bhnd", [0.5, 2.0], 1.25),
    (1, 1, 333, 5, 72, True, "bhnd", 1.25, 1.0),
    (1, 3, 512, 1, 64, False, "bnhd", 1.125, 1.5),
    (1, 1, 512, 97, 33, True, "bhnd", 2.0, 0.5),
    (3, 1, 9, 0, 16, True, "bnhd", 1.5, 1.0),  # text only: text_len == N
    (1, 1, 30, 70, 256, False, "bhnd", 1.5, 1.25),  # the largest head dim
    (2, 2, 2, 3, 1, True, "bnhd", [2.0, 0.5], 1.0),  # D = 1
]


def _shape(B, H, N, D, layout):
    return (B, H, N, D) if layout == "bhnd" else (B, N, H, D)


@pytest.mark.parametrize("case", GRID, ids=[f"L{c[2]}-I{c[3]}-D{c[4]}-{c[6]}" for c in GRID])
def test_float64_matches_reference(case):
    B, H, L, I, D, tf, layout, gamma, gr = case
    N = L + I
    q, k, v, do = _inputs(_shape(B, H, N, D, layout), np.float64, RNG_SEED + N + D)
    kw = dict(text_len=L, text_first=tf, gamma=gamma, gamma_reverse=gr, scale=_f32(1 / math.sqrt(D)),
              layout=layout)
    ref = _reference(q, k, v, do, **kw)
    got = _run(q, k, v, do, **kw)
    for a in got:
        assert a.dtype == np.float64
    _assert_close(got, ref, 1e-10, str(case))


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("case", GRID, ids=[f"L{c[2]}-I{c[3]}-D{c[4]}-{c[6]}" for c in GRID])
def test_float32_matches_float64(case, num_threads):
    B, H, L, I, D, tf, layout, gamma, gr = case
    N = L + I
    q, k, v, do = _inputs(_shape(B, H, N, D, layout), np.float64, RNG_SEED + 7 * N + D)
    kw = dict(text_len=L, text_first=tf, gamma=gamma, gamma_reverse=gr, layout=layout)
    x32 = [x.astype(np.float32) for x in (q, k, v, do)]
    # the reference sees exactly the float32 inputs and the float32 default scale
    ref = _reference(*x32, scale=_f32(1 / math.sqrt(D)), **kw)
    got = _run(*x32, num_threads=num_threads, **kw)
    for a in got:
        assert a.dtype == np.float32
    _assert_close(got, ref, 1e-5, str(case))


@pytest.mark.parametrize("case", [GRID[2], GRID[3], GRID[6]], ids=["D128", "D40", "D33"])
def test_portable_float32_path(case, monkeypatch):
    """The float32 path of CPUs without AVX2 (forced by TACA_CPU_PORTABLE=1)."""
    monkeypatch.setenv("TACA_CPU_PORTABLE", "1")
    B, H, L, I, D, tf, layout, gamma, gr = case
    q, k, v, do = _inputs(_shape(B, H, L + I, D, layout), np.float32, RNG_SEED + D)
    kw = dict(text_len=L, text_first=tf, gamma=gamma, gamma_reverse=gr, layout=layout)
    ref = _reference(q, k, v, do, scale=_f32(1 / math.sqrt(D)), **kw)
    _assert_close(_run(q, k, v, do, num_threads=2, **kw), ref, 1e-5, str(case))


def test_default_scale_and_scalar_gamma():
    q, k, v, do = _inputs((2, 2, 40, 64), np.float64, 3)
    kw = dict(text_len=10, text_first=False, gamma=1.2, gamma_reverse=1.1)
    got = _run(q, k, v, do, **kw)
    ref = _reference(q, k, v, do, scale=None, layout="bhnd", **kw)
    # 1.2, 1.1 and 1/sqrt(64) pass through float32: only the gammas round
    _assert_close(got, ref, 1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gamma_one_is_plain_attention(dtype):
    q, k, v, _ = _inputs((2, 3, 70, 64), dtype, 5)
    out = tnp.joint_attention(q, k, v, text_len=20, gamma=1.0, gamma_reverse=1.0)
    tq, tk, tv = (torch.from_numpy(x).double() for x in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv).numpy()
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, ref, rtol=0, atol=tol)
    plain = tnp.joint_attention(q, k, v, text_len=0, gamma=3.0, gamma_reverse=3.0)
    np.testing.assert_array_equal(out, plain)


def test_gamma_scales_text_attention():
    """gamma > 1 raises the visual queries' attention mass on text keys (the paper's point)."""
    q, k, v, _ = _inputs((1, 2, 120, 64), np.float32, 6)
    _, tm1 = tnp.joint_attention(q, k, v, text_len=30, gamma=1.0, return_text_mass=True)
    _, tm2 = tnp.joint_attention(q, k, v, text_len=30, gamma=2.0, return_text_mass=True)
    vis = slice(30, 120)
    assert tm2[..., vis].mean() > tm1[..., vis].mean()
    np.testing.assert_allclose(tm2[..., :30], tm1[..., :30], rtol=1e-5)  # text queries unchanged


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_noncontiguous_views(dtype):
    rng = np.random.default_rng(8)
    B, N, H, D, L = 2, 50, 4, 64, 13
    base = [rng.standard_normal((B, N, 2 * H, 2 * D)).astype(dtype) for _ in range(4)]
    # (B, N, H, D) storage seen as (B, H, N, D), every other head, D contiguous (no copy)
    views = [x[:, :, ::2, :D].transpose(0, 2, 1, 3) for x in base]
    assert not views[0].flags.c_contiguous
    kw = dict(text_len=L, gamma=[1.5, 0.75], gamma_reverse=1.25, scale=0.125)
    got = _run(*views, **kw)
    ref = _reference(*views, layout="bhnd", text_first=True, **kw)
    _assert_close(got, ref, 1e-5 if dtype == np.float32 else 1e-10)
    # strides that force a copy: strided D, negative token stride, byte-swapped data
    odd = [x[:, :, ::2, ::2].transpose(0, 2, 1, 3) for x in base]
    got = _run(*odd, **kw)
    ref = _reference(*odd, layout="bhnd", text_first=True, **kw)
    _assert_close(got, ref, 1e-5 if dtype == np.float32 else 1e-10)
    rev = [np.ascontiguousarray(x)[:, :, ::-1] for x in views]
    got = _run(*rev, **kw)
    ref = _reference(*rev, layout="bhnd", text_first=True, **kw)
    _assert_close(got, ref, 1e-5 if dtype == np.float32 else 1e-10)
    swapped = [x.astype(x.dtype.newbyteorder(">")) for x in views]
    out = tnp.joint_attention(*swapped[:3], **kw)
    np.testing.assert_array_equal(out, tnp.joint_attention(*views[:3], **kw))


def test_broadcast_zero_strides():
    rng = np.random.default_rng(9)
    q = rng.standard_normal((1, 2, 30, 32))
    k = np.broadcast_to(rng.standard_normal((1, 1, 30, 32)), (1, 2, 30, 32))
    v = np.broadcast_to(rng.standard_normal((1, 2, 1, 32)), (1, 2, 30, 32))
    do = rng.standard_normal((1, 2, 30, 32))
    kw = dict(text_len=7, gamma=1.5, scale=0.25)
    _assert_close(_run(q, k, v, do, **kw), _reference(q, k, v, do, layout="bhnd", text_first=True,
                                                     gamma_reverse=1.0, **kw), 1e-10)


@pytest.mark.parametrize("num_threads,B,H", [(2, 1, 3), (2, 2, 1), (1, 1, 3), (2, 1, 1)])
@pytest.mark.parametrize("D", [64, 40])
def test_backward_schedules(num_threads, B, H, D):
    """B*H not a multiple of the threads takes the split (two-pass) float32 schedule."""
    q, k, v, do = _inputs((B, H, 200, D), np.float64, 10 + D)
    kw = dict(text_len=77, text_first=False, gamma=1.5, gamma_reverse=0.75, layout="bhnd")
    x32 = [x.astype(np.float32) for x in (q, k, v, do)]
    ref = _reference(*x32, scale=_f32(1 / math.sqrt(D)), **kw)
    _assert_close(_run(*x32, num_threads=num_threads, **kw), ref, 1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_deterministic(dtype):
    q, k, v, do = _inputs((1, 3, 150, 64), dtype, 11)
    kw = dict(text_len=50, gamma=1.3)
    a = _run(q, k, v, do, num_threads=2, **kw)
    b = _run(q, k, v, do, num_threads=2, **kw)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    # the forward's tasks do not depend on the thread count: bit-identical for 1 and 3 threads
    c = _run(q, k, v, do, num_threads=1, **kw)
    d = _run(q, k, v, do, num_threads=3, **kw)
    for x, y in zip(c[:3], d[:3]):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_in_nan_out(dtype):
    q, k, v, do = _inputs((1, 2, 60, 32), dtype, 12)
    kw = dict(text_len=10, gamma=1.5, gamma_reverse=1.0, scale=0.25, layout="bhnd", text_first=True)
    q[0, 0, 17, 3] = np.nan  # poisons query row 17 of head 0 only
    k[0, 1, 40, 0] = np.nan  # poisons every row of head 1
    out, lse, tm = tnp.joint_attention(q, k, v, return_lse=True, return_text_mass=True,
                                       **{x: kw[x] for x in kw})
    ref_out, ref_lse, ref_tm = _reference(q, k, v, do, **kw)[:3]
    for got, ref in ((out, ref_out), (lse, ref_lse), (tm, ref_tm)):
        np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
        assert np.isnan(got).any() and not np.isnan(got).all()
    assert np.isnan(out[0, 0, 17]).all() and np.isfinite(np.delete(out[0, 0], 17, axis=0)).all()
    assert np.isnan(out[0, 1]).all()
    dq, dk, dv = tnp.joint_attention_backward(do, q, k, v, out, lse, **kw)
    assert np.isnan(dq[0, 1]).all() and np.isfinite(dq[0, 0, :17]).all()
    # infinities do not hang or crash either
    q[0, 0, 5] = np.inf
    out = tnp.joint_attention(q, k, v, **kw)
    assert out.shape == q.shape


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 2, 0, 32), (0, 2, 5, 32), (2, 0, 5, 32)])
def test_empty(dtype, shape):
    q, k, v, do = _inputs(shape, dtype, 13)
    out, lse, tm = tnp.joint_attention(q, k, v, text_len=0, return_lse=True, return_text_mass=True)
    assert out.shape == shape and lse.shape == (shape[0], shape[1], shape[2]) and tm.shape == lse.shape
    dq, dk, dv = tnp.joint_attention_backward(do, q, k, v, out, lse, text_len=0)
    assert dq.shape == dk.shape == dv.shape == shape


def test_single_token_and_full_text():
    q, k, v, do = _inputs((2, 2, 1, 64), np.float64, 14)
    for L in (0, 1):
        out = tnp.joint_attention(q, k, v, text_len=L, gamma=1.5)
        np.testing.assert_allclose(out, v, rtol=1e-14)


def test_float16_is_upcast():
    q, k, v, do = _inputs((1, 2, 40, 64), np.float16, 15)
    out, lse = tnp.joint_attention(q, k, v, text_len=8, gamma=1.5, return_lse=True)
    assert out.dtype == np.float16 and lse.dtype == np.float32
    ref = _reference(q, k, v, do, text_len=8, text_first=True, gamma=1.5, gamma_reverse=1.0,
                     scale=0.125, layout="bhnd")
    np.testing.assert_allclose(out.astype(np.float64), ref[0], atol=2e-3)
    grads = tnp.joint_attention_backward(do, q, k, v, out, lse, text_len=8, gamma=1.5)
    assert all(g.dtype == np.float16 for g in grads)
    for g, r in zip(grads, ref[3:]):
        np.testing.assert_allclose(g.astype(np.float64), r, atol=5e-3)


def test_return_tuple_order():
    q, k, v, _ = _inputs((1, 1, 10, 8), np.float64, 16)
    out = tnp.joint_attention(q, k, v, text_len=3)
    assert isinstance(out, np.ndarray)
    r = tnp.joint_attention(q, k, v, text_len=3, return_text_mass=True)
    assert len(r) == 2 and r[1].shape == (1, 1, 10) and np.all((r[1] >= 0) & (r[1] <= 1))
    r = tnp.joint_attention(q, k, v, text_len=3, return_lse=True, return_text_mass=True)
    assert len(r) == 3 and np.array_equal(r[0], out)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(text_len=600), ValueError, "text_len=600"),
        (dict(text_len=-1), ValueError, "text_len"),
        (dict(text_len=2**70), ValueError, "text_len"),
        (dict(text_len=1.5), TypeError, "text_len"),
        (dict(text_len=3, gamma=float("nan")), ValueError, "gamma"),
        (dict(text_len=3, gamma=0.0), ValueError, "gamma"),
        (dict(text_len=3, gamma=[1.0, 2.0, 3.0]), ValueError, "gamma"),
        (dict(text_len=3, gamma="big"), TypeError, "gamma"),
        (dict(text_len=3, gamma_reverse=-1.0), ValueError, "gamma_reverse"),
        (dict(text_len=3, scale=float("inf")), ValueError, "scale"),
        (dict(text_len=3, layout="nbhd"), ValueError, "layout"),
        (dict(text_len=3, num_threads=10**6), ValueError, "num_threads"),
        (dict(text_len=3, text_first="yes"), TypeError, "text_first"),
    ],
)
def test_argument_errors(kwargs, exc, match):
    q, k, v, _ = _inputs((2, 2, 10, 16), np.float32, 17)
    with pytest.raises(exc, match=match):
        tnp.joint_attention(q, k, v, **kwargs)


def test_tensor_errors():
    q, k, v, _ = _inputs((2, 2, 10, 16), np.float32, 18)
    with pytest.raises(ValueError, match="k has shape"):
        tnp.joint_attention(q, k[:, :, :5], v, text_len=1)
    with pytest.raises(TypeError, match="v has dtype"):
        tnp.joint_attention(q, k, v.astype(np.float64), text_len=1)
    with pytest.raises(ValueError, match="4 dimensions"):
        tnp.joint_attention(q[0], k[0], v[0], text_len=1)
    with pytest.raises(TypeError, match="q must be"):
        tnp.joint_attention(q.astype(np.int32), k.astype(np.int32), v.astype(np.int32), text_len=1)
    with pytest.raises(TypeError, match="q must be a numpy.ndarray"):
        tnp.joint_attention(q.tolist(), k, v, text_len=1)
    big = np.zeros((1, 1, 2, 300), np.float32)
    with pytest.raises(ValueError, match="head dim"):
        tnp.joint_attention(big, big, big, text_len=1)
    out, lse = tnp.joint_attention(q, k, v, text_len=1, return_lse=True)
    with pytest.raises(ValueError, match="lse must have shape"):
        tnp.joint_attention_backward(q, q, k, v, out, lse[:, :1], text_len=1)


def test_import_does_not_need_torch():
    code = "import sys, taca.numpy; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
