"""joint_attention's fast path (ops._FAST_CALLS): the processors' call (int text span, no mask, no per-sample or query
span, not fp8) goes straight to the kernel once a call with the same key passed _validate and the dispatch. The result
is bitwise the full path's; anything _validate would refuse still raises with its message; what the key does not
hold (the scalars, a CPU gamma tensor's values) is checked at every call; a change of any keyed property takes the
full path again."""
import math

import pytest
import torch

import taca
from taca import ops

needs_cpu_kernel = pytest.mark.skipif(not ops.HAVE_KERNELS, reason="the compiled CPU kernel is not built")


@pytest.fixture
def counted(monkeypatch, spy):
    """The full validations (ops._validate calls) made so far, with an empty fast-path table."""
    monkeypatch.setattr(ops, "_FAST_CALLS", {})
    return spy(ops, "_validate")


def _qkv(B=2, H=3, N=20, D=8, layout="bhnd", dtype=torch.float32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    shape = (B, N, H, D) if layout == "bnhd" else (B, H, N, D)
    return tuple(torch.randn(shape, generator=g, dtype=dtype).requires_grad_(grad) for _ in range(3))


@needs_cpu_kernel
@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
@pytest.mark.parametrize("flags", [(False, False), (True, True), (False, True)])
def test_fast_path_is_the_full_path_bitwise(counted, layout, flags):
    q, k, v = _qkv(layout=layout, grad=True)
    kw = dict(text_len=5, text_first=False, gamma=1.3, gamma_reverse=0.9, scale=0.4, layout=layout,
              return_lse=flags[0], return_text_mass=flags[1])
    first = taca.joint_attention(q, k, v, **kw)
    assert len(counted) == 1 and len(ops._FAST_CALLS) == 1
    second = taca.joint_attention(q, k, v, **kw)
    assert len(counted) == 1  # no validation: the fast path
    a = first if isinstance(first, tuple) else (first,)
    b = second if isinstance(second, tuple) else (second,)
    assert len(a) == len(b) == 1 + sum(flags)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    dout = torch.randn_like(a[0])
    for x, y in zip(torch.autograd.grad(a[0], (q, k, v), dout), torch.autograd.grad(b[0], (q, k, v), dout)):
        assert torch.equal(x, y)


@needs_cpu_kernel
def test_every_keyed_property_takes_the_full_path_again(counted):
    q, k, v = _qkv()
    base = dict(text_len=5, gamma=1.2)
    taca.joint_attention(q, k, v, **base)
    n = len(counted)
    others = [
        (_qkv(N=21), base),  # shapes
        (_qkv(dtype=torch.float64), base),  # dtype
        ((q, k, v), dict(base, text_len=6)),  # the span
        ((q, k, v), dict(base, text_first=False)),
        (tuple(t.transpose(1, 2) for t in (q, k, v)), dict(base, layout="bnhd")),
        ((q, k, v), dict(base, backend="cpu")),
    ]
    for (a, b, c), kw in others:
        taca.joint_attention(a, b, c, **kw)
        assert len(counted) == n + 1, kw
        n += 1
    with torch.no_grad():  # grad mode is keyed (a gamma tensor requiring grad goes to split SDPA under grad)
        taca.joint_attention(q, k, v, **base)
    assert len(counted) == n + 1


@needs_cpu_kernel
def test_bad_scalars_still_raise_after_a_cached_call(counted):
    q, k, v = _qkv()
    taca.joint_attention(q, k, v, text_len=5, gamma=1.2)
    for kw, msg in [(dict(gamma=-1.0), "gamma=-1.0 must be finite and > 0"),
                    (dict(gamma=math.inf), "must be finite and > 0"),
                    (dict(gamma=1.2, gamma_reverse=0.0), "gamma_reverse=0.0 must be finite and > 0"),
                    (dict(gamma=1.2, scale=math.nan), "scale=nan must be finite"),
                    (dict(gamma=1.2, scale="x"), None)]:
        with pytest.raises((ValueError, TypeError), match=msg):
            taca.joint_attention(q, k, v, text_len=5, **kw)


@needs_cpu_kernel
def test_not_taken_for_what_the_key_cannot_hold(counted):
    q, k, v = _qkv()
    g = torch.full((2,), 1.2)  # a CPU gamma tensor: its values are checked at every call
    taca.joint_attention(q, k, v, text_len=5, gamma=g)
    taca.joint_attention(q, k, v, text_len=5, gamma=g)
    assert len(counted) == 2 and not ops._FAST_CALLS
    with pytest.raises(ValueError, match="must be finite and > 0"):
        taca.joint_attention(q, k, v, text_len=5, gamma=torch.tensor([1.2, -1.0]))
    n = len(counted)
    for kw in (dict(text_len=torch.tensor([5, 3])), dict(text_len=5, text_start=1), dict(text_len=5, text_first=1),
               dict(text_len=5, attn_mask=torch.ones(2, 1, 1, 20, dtype=torch.bool))):
        taca.joint_attention(q, k, v, gamma=1.2, **kw)
        taca.joint_attention(q, k, v, gamma=1.2, **kw)
        assert len(counted) == n + 2, kw
        n += 2
    # the split-SDPA and reference backends are never entered in the table
    taca.joint_attention(q, k, v, text_len=5, gamma=1.2, backend="sdpa")
    taca.joint_attention(q, k, v, text_len=5, gamma=1.2, backend="sdpa")
    assert len(counted) == n + 2 and not ops._FAST_CALLS


def test_table_is_bounded(monkeypatch, counted):
    monkeypatch.setattr(ops, "_FAST_CALLS_MAX", 3)
    for n in range(8, 16):
        q, k, v = _qkv(N=n)
        taca.joint_attention(q, k, v, text_len=2, gamma=1.2)
        assert len(ops._FAST_CALLS) <= 3


@pytest.mark.skipif(not (torch.cuda.is_available() and ops.HAVE_CUDA_KERNEL), reason="needs a CUDA GPU and kernels")
def test_cuda_processor_call(counted):
    """The processors' call on CUDA (bf16, a (B,) gamma tensor on the device, bnhd): the second call is the fast
    path's, bitwise the first's in out and gradients; a gamma tensor requiring grad under autograd still goes to
    split SDPA (keyed), which differentiates it."""
    q, k, v = (t.cuda().bfloat16().requires_grad_() for t in _qkv(B=2, H=4, N=300, D=64, layout="bnhd"))
    g = torch.tensor([1.2, 1.0], device="cuda")
    kw = dict(text_len=77, text_first=True, gamma=g, layout="bnhd", scale=0.125)
    a = taca.joint_attention(q, k, v, **kw)
    b = taca.joint_attention(q, k, v, **kw)
    assert len(counted) == 1 and torch.equal(a, b)
    dout = torch.randn_like(a)
    for x, y in zip(torch.autograd.grad(a, (q, k, v), dout), torch.autograd.grad(b, (q, k, v), dout)):
        assert torch.equal(x, y)
    gg = g.clone().requires_grad_()
    out = taca.joint_attention(q, k, v, **dict(kw, gamma=gg))
    assert len(counted) == 2
    (dg,) = torch.autograd.grad(out.float().sum(), (gg,))
    assert torch.isfinite(dg).all() and dg.abs().sum() > 0
