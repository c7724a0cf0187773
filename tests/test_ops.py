"""taca.joint_attention and torch.ops.taca.{fwd,bwd} against the materialized reference.

One ``sample_inputs`` list (extension-cpp style) feeds the forward, backward, opcheck,
backend-agreement and finiteness tests. The kernels take gamma, gamma_reverse and scale as
float64 for float64 inputs (taca.h), so float64 comparisons give the reference the values
unchanged; lower precisions round them to float32 once.
"""
import math
from typing import List, NamedTuple

import pytest
import torch
import torch.nn.functional as F

import taca
from taca import ops, reference

pytestmark = pytest.mark.skipif(not ops.HAVE_KERNELS, reason="taca._C extension not built")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class Sample(NamedTuple):
    name: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kwargs: dict  # text_len, text_first, gamma, gamma_reverse, scale, layout


# name, B, H, text tokens, image tokens, D, text_first, layout, storage, gamma, gamma_reverse, scale
_CASES = [
    ("text0", 2, 2, 0, 17, 32, True, "bhnd", "contiguous", 1.3, 1.0, None),
    ("text1_last", 2, 2, 1, 16, 64, False, "bnhd", "fused", 1.2, 1.0, None),
    ("text77_per_sample", 2, 2, 77, 20, 64, True, "bnhd", "fused", "per_sample", 0.9, None),
    ("text77_last_d128", 1, 2, 77, 9, 128, False, "bhnd", "fused", "0d", 1.0, None),
    ("text333", 1, 1, 333, 5, 64, True, "bhnd", "contiguous", 1.2, 1.0, None),
    ("text333_last_strided", 1, 1, 333, 3, 32, False, "bnhd", "strided", 1.2, 1.1, None),
    ("odd_d13", 2, 3, 5, 24, 13, True, "bnhd", "strided", 1.4, 1.4, 0.3),
    ("all_text", 2, 1, 12, 0, 16, True, "bhnd", "contiguous", 1.5, 0.7, None),
    ("one_token", 1, 1, 0, 1, 8, True, "bhnd", "contiguous", 1.2, 1.0, None),
    ("d256_last", 1, 1, 3, 6, 256, False, "bhnd", "fused", 0.8, 1.0, None),
]


def make_qkv(B, H, N, D, layout, storage, dtype, device, requires_grad=False):
    """q, k, v in ``layout`` with the storage diffusers produces.

    contiguous: three separate tensors. fused: views of one (B, N, 3, H, D) projection (FLUX,
    SD3); "bhnd" is their transpose, as diffusers passes to SDPA. strided: every other token
    of a longer buffer (non-unit token stride beyond the fused case).
    """
    if storage == "contiguous":
        shape = (B, H, N, D) if layout == "bhnd" else (B, N, H, D)
        ts = [torch.randn(shape, dtype=dtype, device=device) for _ in range(3)]
    else:
        if storage == "fused":
            ts = list(torch.randn(B, N, 3, H, D, dtype=dtype, device=device).unbind(2))
        elif storage == "strided":
            base = torch.randn(3, B, 2 * N, H, D, dtype=dtype, device=device)
            ts = [base[i][:, ::2] for i in range(3)]
        else:
            raise ValueError(storage)
        if layout == "bhnd":
            ts = [t.transpose(1, 2) for t in ts]
    if requires_grad:
        ts = [t.detach().requires_grad_() for t in ts]
    return ts


def sample_inputs(device="cpu", dtype=torch.float32, requires_grad=False, cases=None) -> List[Sample]:
    out = []
    for (name, B, H, L, img, D, first, layout, storage, gamma, gr, scale) in _CASES:
        if cases is not None and name not in cases:
            continue
        q, k, v = make_qkv(B, H, L + img, D, layout, storage, dtype, device, requires_grad)
        if gamma == "per_sample":
            gamma = torch.tensor([1.1, 1.6][:B], device=device)
        elif gamma == "0d":
            gamma = torch.tensor(1.25, device=device)
        kw = dict(text_len=L, text_first=first, gamma=gamma, gamma_reverse=gr, scale=scale, layout=layout)
        out.append(Sample(name, q, k, v, kw))
    return out


def _ids(samples):
    return [s.name for s in samples]


_NAMES = [c[0] for c in _CASES]


def _f32(x: float) -> float:
    return float(torch.tensor(float(x), dtype=torch.float32))


def _as_kernel_sees(kw, head_dim):
    """kwargs with gamma, gamma_reverse and scale rounded to float32 as the kernels get them."""
    kw = dict(kw)
    if not isinstance(kw["gamma"], torch.Tensor):
        kw["gamma"] = _f32(kw["gamma"])
    kw["gamma_reverse"] = _f32(kw["gamma_reverse"])
    kw["scale"] = _f32(1.0 / math.sqrt(head_dim) if kw["scale"] is None else kw["scale"])
    return kw


def _one(name, dtype=torch.float32, requires_grad=False):
    return sample_inputs(dtype=dtype, requires_grad=requires_grad, cases=[name])[0]


def _ref(s: Sample, upcast=torch.float64, kernel_scalars=True):
    rounded = kernel_scalars and s.q.dtype != torch.float64  # float64 inputs: exact scalars
    kw = _as_kernel_sees(s.kwargs, s.q.shape[-1]) if rounded else s.kwargs
    return reference.attention_ref(s.q, s.k, s.v, upcast=upcast, **kw)


def _bhnd(t, layout):
    return t.transpose(1, 2) if layout == "bnhd" else t


# ---------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", _NAMES)
def test_forward_float64_matches_reference(name):
    s = _one(name, torch.float64)
    out, lse, tm = taca.joint_attention(s.q, s.k, s.v, backend="cpu", return_lse=True,
                                        return_text_mass=True, **s.kwargs)
    ref_out, ref_lse, ref_tm = _ref(s)
    assert out.shape == s.q.shape and out.dtype == torch.float64
    assert lse.dtype == torch.float64 and tm.dtype == torch.float64
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(tm, ref_tm, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", _NAMES)
def test_forward_float32_close_to_float64(name):
    s = _one(name, torch.float32)
    out, lse, tm = taca.joint_attention(s.q, s.k, s.v, backend="cpu", return_lse=True,
                                        return_text_mass=True, **s.kwargs)
    ref_out, ref_lse, ref_tm = _ref(s)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32 and tm.dtype == torch.float32
    assert lse.shape == tm.shape == (s.q.shape[0], *((s.q.shape[1], s.q.shape[2]) if s.kwargs["layout"] == "bhnd" else (s.q.shape[2], s.q.shape[1])))
    torch.testing.assert_close(out.double(), ref_out, atol=2e-6, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(tm.double(), ref_tm, atol=2e-6, rtol=0)


@pytest.mark.parametrize("name", ["text0", "text1_last", "text77_last_d128", "odd_d13", "all_text"])
def test_gamma_one_equals_sdpa(name):
    s = _one(name)
    kw = dict(s.kwargs, gamma=1.0, gamma_reverse=1.0)
    out = taca.joint_attention(s.q, s.k, s.v, backend="cpu", **kw)
    lay = kw["layout"]
    want = F.scaled_dot_product_attention(_bhnd(s.q, lay), _bhnd(s.k, lay), _bhnd(s.v, lay), scale=kw["scale"])
    torch.testing.assert_close(_bhnd(out, lay), want, atol=2e-6, rtol=0)


def test_text_mass_edges():
    q, k, v = make_qkv(2, 2, 9, 16, "bhnd", "contiguous", torch.float32, "cpu")
    _, tm0 = taca.joint_attention(q, k, v, text_len=0, gamma=1.3, return_text_mass=True, backend="cpu")
    _, tmn = taca.joint_attention(q, k, v, text_len=9, gamma=1.3, return_text_mass=True, backend="cpu")
    assert torch.equal(tm0, torch.zeros_like(tm0))
    torch.testing.assert_close(tmn, torch.ones_like(tmn), atol=1e-6, rtol=0)
    # gamma > 1 pulls visual queries' mass towards text (the paper's point), here monotonically
    _, tm1 = taca.joint_attention(q, k, v, text_len=3, gamma=1.0, return_text_mass=True, backend="cpu")
    _, tm2 = taca.joint_attention(q, k, v, text_len=3, gamma=2.0, return_text_mass=True, backend="cpu")
    # a visual row whose text logits are all positive must gain text mass as gamma grows
    text_logits = torch.einsum("bhnd,bhmd->bhnm", q, k)[..., 3:, :3]
    pos = (text_logits > 0).all(-1)
    assert pos.any()
    assert (tm2[..., 3:][pos] > tm1[..., 3:][pos]).all()


def _tolerance_rule(err_kernel, err_torch, what):
    # STYLE.md: at most 2x PyTorch's own low-precision error against the same reference, + 1e-5.
    assert err_kernel <= 2 * err_torch + 1e-5, f"{what}: kernel error {err_kernel:.3g} > 2 x torch {err_torch:.3g} + 1e-5"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["text1_last", "text77_per_sample", "odd_d13", "d256_last"])
def test_low_precision_cpu_upcast_tolerance_rule(name, dtype):
    s = _one(name, dtype, requires_grad=True)
    out = taca.joint_attention(s.q, s.k, s.v, backend="cpu", **s.kwargs)
    assert out.dtype == dtype and out.shape == s.q.shape
    torch_out = reference.attention_split_sdpa(s.q, s.k, s.v, **s.kwargs)
    ref_out = reference.attention_ref(s.q, s.k, s.v, upcast=torch.float32, **s.kwargs)[0]
    dout = torch.randn_like(out)
    g_k = torch.autograd.grad(out, (s.q, s.k, s.v), dout)
    g_t = torch.autograd.grad(torch_out, (s.q, s.k, s.v), dout)
    g_r = torch.autograd.grad(ref_out, (s.q, s.k, s.v), dout.float())
    _tolerance_rule((out.float() - ref_out).abs().max().item(), (torch_out.float() - ref_out).abs().max().item(), "out")
    for nm, a, b, r in zip(("dq", "dk", "dv"), g_k, g_t, g_r):
        assert a.dtype == dtype
        _tolerance_rule((a.float() - r).abs().max().item(), (b.float() - r).abs().max().item(), nm)


# ---------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", _NAMES)
def test_backward_float64_matches_reference(name):
    s = _one(name, torch.float64, requires_grad=True)
    out = taca.joint_attention(s.q, s.k, s.v, backend="cpu", **s.kwargs)
    ref_out = _ref(s)[0]
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (s.q, s.k, s.v), dout)
    want = torch.autograd.grad(ref_out, (s.q, s.k, s.v), dout)
    for g, w, nm in zip(got, want, ("dq", "dk", "dv")):
        assert g.shape == w.shape, nm
        torch.testing.assert_close(g, w, atol=1e-11, rtol=1e-10, msg=lambda m: f"{nm}: {m}")


@pytest.mark.parametrize("name", ["text1_last", "text77_per_sample", "text333_last_strided", "odd_d13", "all_text"])
def test_backward_float32_close_to_float64(name):
    s = _one(name, torch.float32, requires_grad=True)
    out = taca.joint_attention(s.q, s.k, s.v, backend="cpu", **s.kwargs)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (s.q, s.k, s.v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (s.q, s.k, s.v))
    ref_out = _ref(Sample(s.name, q64, k64, v64, s.kwargs))[0]
    want = torch.autograd.grad(ref_out, (q64, k64, v64), dout.double())
    for g, w, nm in zip(got, want, ("dq", "dk", "dv")):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5, msg=lambda m: f"{nm}: {m}")


@pytest.mark.parametrize(
    "layout,text_first,storage,gamma,gamma_reverse",
    [("bhnd", True, "contiguous", "per_sample", 0.8), ("bnhd", False, "strided", 1.7, 1.3)],
)
def test_gradcheck(layout, text_first, storage, gamma, gamma_reverse, one_thread):
    q, k, v = make_qkv(2, 2, 6, 4, layout, storage, torch.float64, "cpu", requires_grad=True)
    g = torch.tensor([1.3, 0.6]) if gamma == "per_sample" else gamma

    def f(q, k, v):
        return taca.joint_attention(q, k, v, text_len=2, text_first=text_first, gamma=g,
                                    gamma_reverse=gamma_reverse, layout=layout, backend="cpu")

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# the registered ops
# ---------------------------------------------------------------------------------------

def _op_args(s: Sample, return_text_mass=True):
    qn, kn, vn = (_bhnd(t, s.kwargs["layout"]) .transpose(1, 2) for t in (s.q, s.k, s.v))
    B, N, _, D = qn.shape
    tb, te = reference.text_range(N, s.kwargs["text_len"], s.kwargs["text_first"])
    g = reference.gamma_vector(s.kwargs["gamma"], B, qn.device).contiguous()
    scale = 1.0 / math.sqrt(D) if s.kwargs["scale"] is None else s.kwargs["scale"]
    return (qn, kn, vn, g, float(s.kwargs["gamma_reverse"]), scale, tb, te, return_text_mass)


@pytest.mark.parametrize("name,requires_grad", [("text77_per_sample", False), ("odd_d13", True)])
def test_opcheck_fwd(name, requires_grad, one_thread):
    s = _one(name, torch.float32, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.taca.fwd.default, _op_args(s, return_text_mass=not requires_grad))


@pytest.mark.parametrize("name", ["text1_last"])
def test_opcheck_bwd(name, one_thread):
    s = _one(name, torch.float32)
    args = _op_args(s, return_text_mass=False)
    out, lse, _ = torch.ops.taca.fwd(*args)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.taca.bwd.default, (dout, *args[:3], out, lse, *args[3:8]))


def test_fake_impl_strides_match_real():
    for s in sample_inputs():
        args = _op_args(s)
        real = torch.ops.taca.fwd(*args)
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode() as mode:
            fargs = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
            fake = torch.ops.taca.fwd(*fargs)
        for r, f in zip(real, fake):
            assert r.shape == f.shape and r.stride() == f.stride() and r.dtype == f.dtype, s.name


# ---------------------------------------------------------------------------------------
# backends, edges, outputs
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["text0", "text77_per_sample", "text333_last_strided", "odd_d13"])
def test_backends_agree(name):
    s = _one(name, torch.float32, requires_grad=True)
    dout = None
    results = {}
    for be in ("auto", "cpu", "sdpa", "reference"):
        out = taca.joint_attention(s.q, s.k, s.v, backend=be, **s.kwargs)
        if dout is None:
            dout = torch.randn_like(out)
        results[be] = (out, *torch.autograd.grad(out, (s.q, s.k, s.v), dout))
    for be in ("auto", "sdpa", "reference"):
        for a, b, nm in zip(results[be], results["cpu"], ("out", "dq", "dk", "dv")):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{be} {nm}: {m}")


def _poison_heap(nbytes):
    # The op allocates its outputs; freeing a NaN block of the same size first makes the
    # allocator likely to hand it back, so an element the kernel forgot stays NaN.
    torch.full((max(nbytes // 4, 1),), float("nan"), dtype=torch.float32)


@pytest.mark.parametrize("name", _NAMES)
def test_every_output_element_finite(name):
    s = _one(name, torch.float32, requires_grad=True)
    _poison_heap(s.q.numel() * 4)
    out, lse, tm = taca.joint_attention(s.q, s.k, s.v, backend="cpu", return_lse=True,
                                        return_text_mass=True, **s.kwargs)
    _poison_heap(s.q.numel() * 4)
    grads = torch.autograd.grad(out, (s.q, s.k, s.v), torch.randn_like(out))
    for t, nm in zip((out, lse, tm, *grads), ("out", "lse", "text_mass", "dq", "dk", "dv")):
        assert torch.isfinite(t).all(), f"{nm} has non-finite elements"


@pytest.mark.parametrize("backend", ["auto", "cpu", "sdpa", "reference"])
@pytest.mark.parametrize("B,N", [(2, 0), (0, 5)])
def test_empty(backend, B, N):
    q, k, v = make_qkv(B, 2, N, 8, "bhnd", "contiguous", torch.float32, "cpu", requires_grad=True)
    out, lse = taca.joint_attention(q, k, v, text_len=0, gamma=1.2, backend=backend, return_lse=True)
    assert out.shape == q.shape and lse.shape == (B, 2, N)
    out2 = taca.joint_attention(q, k, v, text_len=N, gamma=torch.full((B,), 1.2), backend=backend)
    (out.sum() + out2.sum()).backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


def test_lse_and_text_mass_need_no_grad():
    s = _one("text77_per_sample", requires_grad=True)
    out, lse, tm = taca.joint_attention(s.q, s.k, s.v, return_lse=True, return_text_mass=True, **s.kwargs)
    assert out.requires_grad and not lse.requires_grad and not tm.requires_grad


# ---------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------

def test_auto_uses_cpu_kernel(monkeypatch):
    calls = []
    real = ops._kernel_forward
    monkeypatch.setattr(ops, "_kernel_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    s = _one("text1_last")
    taca.joint_attention(s.q, s.k, s.v, **s.kwargs)
    assert calls == [1]
    taca.joint_attention(s.q, s.k, s.v, backend="sdpa", **s.kwargs)
    assert calls == [1]


def test_gamma_requiring_grad_goes_to_sdpa_and_gets_its_gradient(caplog):
    s = _one("text77_per_sample", torch.float64, requires_grad=True)
    g = torch.tensor([1.1, 1.6], dtype=torch.float64, requires_grad=True)
    kw = dict(s.kwargs, gamma=g)
    with caplog.at_level("DEBUG", logger="taca"):
        out = taca.joint_attention(s.q, s.k, s.v, **kw)
    assert "gamma requires grad" in caplog.text
    ref = reference.attention_ref(s.q, s.k, s.v, **kw)[0]
    dout = torch.randn_like(out)
    (gg,) = torch.autograd.grad(out, (g,), dout)
    (gr,) = torch.autograd.grad(ref, (g,), dout)
    torch.testing.assert_close(gg, gr, atol=1e-10, rtol=1e-10)


def test_missing_extension_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(ops, "HAVE_KERNELS", False)
    monkeypatch.setattr(ops, "_warned_no_ext", False)
    s = _one("text77_per_sample")
    want = reference.attention_split_sdpa(s.q, s.k, s.v, **s.kwargs)
    with caplog.at_level("WARNING", logger="taca"):
        out = taca.joint_attention(s.q, s.k, s.v, **s.kwargs)
        out2, lse = taca.joint_attention(s.q, s.k, s.v, return_lse=True, **s.kwargs)
    assert torch.equal(out, want)
    torch.testing.assert_close(lse.double(), _ref(s, kernel_scalars=False)[1], atol=2e-6, rtol=1e-6)
    assert caplog.text.count("compiled kernels unavailable") == 1
    with pytest.raises(RuntimeError, match="backend='cpu' cannot run"):
        taca.joint_attention(s.q, s.k, s.v, backend="cpu", **s.kwargs)


# ---------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ---------------------------------------------------------------------------------------

@requires_cuda
@pytest.mark.skipif(not ops.HAVE_CUDA_KERNEL, reason="taca._C built without CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["text0", "text1_last", "text77_per_sample", "text333_last_strided", "odd_d13", "all_text", "d256_last"])
def test_cuda_kernel_tolerance_rule(name, dtype):
    s = _one(name, dtype)
    s = Sample(s.name, *(t.detach().cuda().requires_grad_() for t in (s.q, s.k, s.v)),
               {**s.kwargs, "gamma": s.kwargs["gamma"].cuda() if isinstance(s.kwargs["gamma"], torch.Tensor) else s.kwargs["gamma"]})
    out, lse, tm = taca.joint_attention(s.q, s.k, s.v, backend="cuda", return_lse=True, return_text_mass=True, **s.kwargs)
    torch_out = reference.attention_split_sdpa(s.q, s.k, s.v, **s.kwargs)
    ref_out, ref_lse, ref_tm = reference.attention_ref(s.q, s.k, s.v, upcast=torch.float32, **s.kwargs)
    _tolerance_rule((out.float() - ref_out).abs().max().item(), (torch_out.float() - ref_out).abs().max().item(), "out")
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(tm, ref_tm, atol=1e-3, rtol=0)
    dout = torch.randn_like(out)
    g_k = torch.autograd.grad(out, (s.q, s.k, s.v), dout)
    g_t = torch.autograd.grad(torch_out, (s.q, s.k, s.v), dout)
    g_r = torch.autograd.grad(ref_out, (s.q, s.k, s.v), dout.float())
    for nm, a, b, r in zip(("dq", "dk", "dv"), g_k, g_t, g_r):
        _tolerance_rule((a.float() - r).abs().max().item(), (b.float() - r).abs().max().item(), nm)


@requires_cuda
def test_cuda_float32_auto_falls_back_and_forced_cuda_refuses():
    q, k, v = make_qkv(2, 2, 40, 64, "bhnd", "contiguous", torch.float32, "cuda")
    out = taca.joint_attention(q, k, v, text_len=7, gamma=torch.full((2,), 1.2, device="cuda"))
    want = reference.attention_ref(q, k, v, text_len=7, gamma=1.2, upcast=torch.float64)[0]
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=0)
    with pytest.raises(RuntimeError, match="float16/bfloat16"):
        taca.joint_attention(q, k, v, text_len=7, gamma=1.2, backend="cuda")


@requires_cuda
def test_cuda_small_head_backward_shape_class():
    # DESIGN.md pitfall: bf16 (256, 8, 266, 32) as (B, H, N, D) views of (B, N, H, D) storage;
    # cuDNN's SDPA backward failed there on torch 2.11 / CUDA 13. Every backend must run it.
    base = torch.randn(256, 266, 3, 8, 32, device="cuda", dtype=torch.bfloat16)
    q, k, v = (t.transpose(1, 2).detach().requires_grad_() for t in base.unbind(2))
    g = torch.full((256,), 1.2, device="cuda")
    for be in ("auto", "sdpa"):
        out = taca.joint_attention(q, k, v, text_len=10, gamma=g, backend=be)
        out.float().square().mean().backward()
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
        q.grad = k.grad = v.grad = None


def test_cuda_grid_limits_route_auto_to_sdpa(monkeypatch):
    # The CUDA kernels index batch and heads by grid dimensions (<= 65535; the backward runs
    # D > 128 as two column halves per head): auto must fall back instead of failing there.
    # The decision needs no GPU: shape, dtype and device type are all it reads.
    from types import SimpleNamespace

    monkeypatch.setattr(ops, "HAVE_KERNELS", True)
    monkeypatch.setattr(ops, "HAVE_CUDA_KERNEL", True)

    def fake(shape):
        return SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16, shape=shape)

    assert ops._kernel_refusal(fake((65535, 24, 64, 128)), None, "bhnd") is None
    assert "grid limit" in ops._kernel_refusal(fake((65536, 24, 64, 128)), None, "bhnd")
    assert ops._kernel_refusal(fake((2, 64, 65535, 64)), None, "bnhd") is None
    assert "grid limit" in ops._kernel_refusal(fake((2, 64, 65536, 64)), None, "bnhd")  # H = 65536
    assert ops._kernel_refusal(fake((2, 65536, 64, 64)), None, "bnhd") is None  # N = 65536, H = 64
    assert "grid limit" in ops._kernel_refusal(fake((1, 40000, 8, 256)), None, "bhnd")  # 2 halves per head
    assert ops._kernel_refusal(fake((1, 40000, 8, 128)), None, "bhnd") is None
