"""Bad input to taca.joint_attention and torch.ops.taca.*: errors that name the argument,
never a crash; inputs that are odd but valid (non-unit D stride, NaN) behave."""
import math

import numpy as np
import pytest
import torch

import taca
from taca import ops, reference

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
requires_ext = pytest.mark.skipif(not ops.HAVE_KERNELS, reason="taca._C extension not built")

B, H, N, D = 2, 2, 10, 8


def qkv(**over):
    t = {n: torch.randn(B, H, N, D) for n in "qkv"}
    t.update(over)
    return t["q"], t["k"], t["v"]


def call(q=None, k=None, v=None, **kw):
    dq, dk, dv = qkv()
    kw.setdefault("text_len", 3)
    return taca.joint_attention(dq if q is None else q, dk if k is None else k, dv if v is None else v, **kw)


# (id, thunk, exception, message pattern)
BAD = [
    ("k_shape", lambda: call(k=torch.randn(B, H, N + 1, D)), ValueError, "same shape"),
    ("v_heads", lambda: call(v=torch.randn(B, H + 1, N, D)), ValueError, "same shape"),
    ("rank3", lambda: call(q=torch.randn(H, N, D)), ValueError, "q must have 4 dimensions"),
    ("rank5", lambda: call(k=torch.randn(1, B, H, N, D)), ValueError, "k must have 4 dimensions"),
    ("not_tensor", lambda: call(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
    ("numpy_array", lambda: call(k=np.random.randn(B, H, N, D).astype(np.float32)), TypeError,
     r"k is a NumPy array.*taca\.numpy\.joint_attention"),
    ("dtype_mismatch", lambda: call(k=torch.randn(B, H, N, D, dtype=torch.float64)), TypeError, "same dtype"),
    ("device_mismatch", lambda: call(v=torch.randn(B, H, N, D, device="meta")), ValueError, "same device"),
    ("int_tensors", lambda: call(*[torch.randint(0, 3, (B, H, N, D)) for _ in range(3)]), TypeError, "floating-point"),
    ("bool_tensor", lambda: call(q=torch.ones(B, H, N, D, dtype=torch.bool)), TypeError, "q must be a floating-point"),
    ("text_len_negative", lambda: call(text_len=-1), ValueError, r"text_len=-1 must be in \[0, 10\]"),
    ("text_len_too_long", lambda: call(text_len=N + 1), ValueError, r"text_len=11 must be in \[0, 10\]"),
    ("text_len_bnhd_uses_dim1", lambda: call(*qkv(), text_len=H + 1, layout="bnhd"), ValueError, r"text_len=3 must be in \[0, 2\]"),
    ("text_len_float", lambda: call(text_len=3.0), TypeError, "text_len must be an int"),
    ("text_len_bool", lambda: call(text_len=True), TypeError, "text_len must be an int"),
    ("gamma_zero", lambda: call(gamma=0.0), ValueError, "gamma=0.0 must be finite and > 0"),
    ("gamma_negative", lambda: call(gamma=-1.2), ValueError, "gamma=-1.2"),
    ("gamma_nan", lambda: call(gamma=float("nan")), ValueError, "gamma=nan"),
    ("gamma_inf", lambda: call(gamma=math.inf), ValueError, "gamma=inf"),
    ("gamma_str", lambda: call(gamma="1.2"), TypeError, "gamma must be a float or a tensor"),
    ("deterministic_int", lambda: call(deterministic=0), TypeError, "deterministic must be a bool"),
    ("gamma_tensor_nan", lambda: call(gamma=torch.tensor([1.2, float("nan")])), ValueError, "gamma=.* must be finite and > 0"),
    ("gamma_tensor_zero_0d", lambda: call(gamma=torch.tensor(0.0)), ValueError, "must be finite and > 0"),
    ("gamma_tensor_shape", lambda: call(gamma=torch.ones(B + 1)), ValueError, r"gamma must be a float, a 0-d tensor or a \(2,\) tensor"),
    ("gamma_tensor_2d", lambda: call(gamma=torch.ones(B, 1)), ValueError, r"\(2,\) tensor, got shape \(2, 1\)"),
    ("gamma_tensor_int", lambda: call(gamma=torch.ones(B, dtype=torch.int64)), TypeError, "gamma tensor must be floating point"),
    ("gamma_tensor_device", lambda: call(gamma=torch.ones(B, device="meta")), ValueError, "gamma is on meta but q is on cpu"),
    ("gamma_reverse_zero", lambda: call(gamma_reverse=0.0), ValueError, "gamma_reverse=0.0"),
    ("gamma_reverse_nan", lambda: call(gamma_reverse=float("nan")), ValueError, "gamma_reverse=nan"),
    ("scale_nan", lambda: call(scale=float("nan")), ValueError, "scale=nan must be finite"),
    ("scale_inf", lambda: call(scale=math.inf), ValueError, "scale=inf must be finite"),
    ("head_dim_0", lambda: call(*[torch.randn(B, H, N, 0) for _ in range(3)]), ValueError, r"head dim must be in \[1, 256\], got 0"),
    ("head_dim_257", lambda: call(*[torch.randn(1, 1, 2, 257) for _ in range(3)], text_len=1), ValueError, "got 257"),
    ("layout", lambda: call(layout="bshd"), ValueError, "layout='bshd' is not one of"),
    ("backend", lambda: call(backend="flash"), ValueError, "backend='flash' is not one of"),
    ("backend_cuda_on_cpu", lambda: call(backend="cuda"), ValueError, "backend='cuda' needs q on a cuda device"),
]


@pytest.mark.parametrize("thunk,exc,pattern", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
@pytest.mark.parametrize("backend", ["auto", "sdpa", "reference"])
def test_bad_input_raises(thunk, exc, pattern, backend, monkeypatch):
    # Validation comes before dispatch: every backend reports the same error.
    real = taca.joint_attention

    def with_backend(*a, **kw):
        kw.setdefault("backend", backend)
        return real(*a, **kw)

    monkeypatch.setattr(taca, "joint_attention", with_backend)
    with pytest.raises(exc, match=pattern):
        thunk()


# ---- the raw ops check their own arguments (they are public through torch.ops) ----

def _op_args(**over):
    q, k, v = (t.transpose(1, 2) for t in qkv())
    a = dict(q=q, k=k, v=v, gamma=torch.full((B,), 1.2), gamma_reverse=1.0, scale=0.3,
             text_begin=0, text_end=3, return_text_mass=False)
    a.update(over)
    return a


OP_BAD = [
    ("text_range", dict(text_begin=4, text_end=3), ValueError, r"text range \[4, 3\)"),
    ("text_end_past_n", dict(text_end=N + 1), ValueError, "text_end <= N=10"),
    ("gamma_dtype", dict(gamma=torch.ones(B, dtype=torch.float64)), TypeError, "gamma must be float32"),
    ("gamma_shape", dict(gamma=torch.ones(B + 1)), ValueError, r"gamma must be a \(2,\) tensor"),
    ("gamma_value", dict(gamma=torch.tensor([1.0, -2.0])), ValueError, r"gamma\[1\]=-2 must be finite and > 0"),
    ("gamma_reverse", dict(gamma_reverse=-1.0), ValueError, "gamma_reverse=-1 must be finite"),
    ("scale", dict(scale=math.inf), ValueError, "scale=inf must be finite"),
    ("k_shape", dict(k=torch.randn(B, N, H, D + 1)), ValueError, "k has shape"),
    ("v_dtype", dict(v=torch.randn(B, N, H, D, dtype=torch.float64)), TypeError, "v has dtype"),
    ("rank", dict(q=torch.randn(B, N, D)), ValueError, "q must be a 4-d"),
    ("int_q", dict(q=torch.ones(B, N, H, D, dtype=torch.int32)), TypeError, "q must be floating point"),
]


@requires_ext
@pytest.mark.parametrize("over,exc,pattern", [b[1:] for b in OP_BAD], ids=[b[0] for b in OP_BAD])
def test_raw_op_bad_input_raises(over, exc, pattern):
    with pytest.raises(exc, match=pattern):
        torch.ops.taca.fwd(**_op_args(**over))


@requires_ext
def test_raw_bwd_checks_lse():
    a = _op_args()
    out, lse, _ = torch.ops.taca.fwd(**a)
    args = (torch.randn_like(out), a["q"], a["k"], a["v"], out)
    tail = (a["gamma"], 1.0, 0.3, 0, 3)
    with pytest.raises(ValueError, match=r"lse must have shape \(B, H, N\)"):
        torch.ops.taca.bwd(*args, lse.transpose(1, 2), *tail)
    with pytest.raises(TypeError, match="lse must be Float"):
        torch.ops.taca.bwd(*args, lse.double(), *tail)


@requires_ext
def test_gamma_values_checked_inside_compiled_graph():
    # Under torch.compile the Python-side value check is skipped (it would break the graph);
    # the CPU kernel's binding checks the values itself.
    q, k, v = qkv()
    f = torch.compile(lambda q, k, v, g: taca.joint_attention(q, k, v, text_len=3, gamma=g),
                      fullgraph=True, backend="eager")
    f(q, k, v, torch.full((B,), 1.2))
    with pytest.raises(Exception, match="must be finite and > 0"):
        f(q, k, v, torch.tensor([1.2, float("inf")]))


# ---- odd but valid input ----

@pytest.mark.parametrize("backend", ["auto", "sdpa", "reference"] + (["cpu"] if ops.HAVE_KERNELS else []))
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_non_unit_last_stride_is_copied(backend, layout):
    shape = (B, H, N, 2 * D) if layout == "bhnd" else (B, N, H, 2 * D)
    base = [torch.randn(shape) for _ in range(3)]
    q, k, v = (b[..., ::2].detach().requires_grad_() for b in base)  # D stride 2
    qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    kw = dict(text_len=3, gamma=torch.tensor([1.3, 0.8]), gamma_reverse=1.2, layout=layout, backend=backend)
    out, outc = taca.joint_attention(q, k, v, **kw), taca.joint_attention(qc, kc, vc, **kw)
    torch.testing.assert_close(out, outc, atol=1e-6, rtol=1e-6)
    dout = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(outc, (qc, kc, vc), dout)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["auto", "sdpa", "reference"] + (["cpu"] if ops.HAVE_KERNELS else []))
def test_nan_inputs_give_nan_outputs(backend):
    q, k, v = qkv()
    q = q.clone()
    q[0, 1, 4, 2] = float("nan")  # one query row: only its output row is NaN
    out = taca.joint_attention(q, k, v, text_len=3, gamma=1.2, backend=backend)
    if backend == "sdpa" or (backend == "auto" and not ops.HAVE_KERNELS):
        # split SDPA inherits PyTorch's SDPA here: torch 2.11's CPU flash kernel returns 0
        # for a NaN query row, 2.13's returns NaN. It must match plain SDPA, row for row.
        want = torch.isnan(torch.nn.functional.scaled_dot_product_attention(q, k, v)[0, 1, 4])
        assert torch.equal(torch.isnan(out[0, 1, 4]), want)
    else:
        assert torch.isnan(out[0, 1, 4]).all()
    mask = torch.ones(out.shape[:-1], dtype=torch.bool)
    mask[0, 1, 4] = False
    assert torch.isfinite(out[mask]).all()
    v = v.clone()
    v[1, 0, 7, 0] = float("nan")  # one value row: every query of that (b, h) attends to it
    out = taca.joint_attention(qkv()[0], k, v, text_len=3, gamma=1.2, backend=backend)
    assert torch.isnan(out[1, 0, :, 0]).all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[1, 1]).all()


# ---- CUDA ----

@requires_cuda
def test_cuda_gamma_on_other_device():
    q, k, v = (t.cuda() for t in qkv())
    with pytest.raises(ValueError, match="gamma is on cpu but q is on cuda"):
        taca.joint_attention(q, k, v, text_len=3, gamma=torch.ones(B))


@requires_cuda
def test_cuda_mixed_devices():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="same device"):
        taca.joint_attention(q.cuda(), k, v, text_len=3)


@requires_cuda
@pytest.mark.skipif(not ops.HAVE_CUDA_KERNEL, reason="taca._C built without CUDA kernels")
def test_cuda_forced_kernel_rejects_float32():
    q, k, v = (t.cuda() for t in qkv())
    with pytest.raises(RuntimeError, match="float16/bfloat16"):
        taca.joint_attention(q, k, v, text_len=3, backend="cuda")
