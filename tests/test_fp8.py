"""The FP8 forward's arithmetic on the CPU (taca.reference.quantize_fp8 / attention_fp8_ref) and
joint_attention(fp8=True)'s argument checks, which all run before any device work. The kernel itself is
tested on a GPU in test_cuda_fp8.py."""
from __future__ import annotations

import pytest
import torch

import taca
from taca import reference

E4M3_REL = 2.0 ** -4    # half the spacing of e4m3's 3-bit mantissa, relative (normal numbers)
E4M3_SUB = 2.0 ** -10   # half the spacing of its subnormals (2^-9), absolute


def _qkv(B=2, H=3, Hkv=None, N=300, Nk=None, D=128, seed=0, layout="bhnd"):
    g = torch.Generator().manual_seed(seed)
    Nk = N if Nk is None else Nk
    Hkv = H if Hkv is None else Hkv
    q = torch.randn(B, H, N, D, generator=g) * 2.0
    k = torch.randn(B, Hkv, Nk, D, generator=g)
    v = torch.randn(B, Hkv, Nk, D, generator=g) * 0.5
    if layout == "bnhd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return q, k, v


def test_quantize_fp8_scales_and_rounding():
    q, k, v = _qkv(N=300, Nk=257)
    f = reference.quantize_fp8(q, k, v)
    assert f.q8.dtype == torch.float8_e4m3fn and f.q8.shape == q.shape
    assert f.q_scale.shape == (2, 3, 3) and f.k_scale.shape == (2, 3, 3) and f.v_scale.shape == (2, 3, 128)
    # one scale per 128-token tile: its amax / 448, so every tile reaches e4m3's largest value
    for t in range(3):
        tile = q[:, :, 128 * t:128 * (t + 1)]
        torch.testing.assert_close(f.q_scale[:, :, t], tile.abs().amax(dim=(2, 3)) / reference.FP8_MAX, rtol=0, atol=0)
        assert torch.equal(f.q8[:, :, 128 * t:128 * (t + 1)].float().abs().amax(dim=(2, 3)),
                           torch.full((2, 3), reference.FP8_MAX))
    torch.testing.assert_close(f.v_scale, v.abs().amax(dim=2) / reference.FP8_MAX, rtol=0, atol=0)
    # round to nearest: x * (448 / amax) within half a step of e4m3 at every element
    def tile_amax(x, n):
        a = torch.nn.functional.pad(x.abs(), (0, 0, 0, 384 - n)).reshape(2, 3, 3, -1).amax(-1)
        return a.repeat_interleave(128, 2)[:, :, :n, None]
    for x, x8, amax in ((q, f.q8, tile_amax(q, 300)), (k, f.k8, tile_amax(k, 257)),
                        (v, f.v8, v.abs().amax(dim=2)[:, :, None, :])):
        y = x.double() * (reference.FP8_MAX / amax.double())
        err = (y - x8.double()).abs()
        assert bool((err <= torch.maximum(E4M3_REL * y.abs(), torch.full_like(y, E4M3_SUB))).all())


def test_quantize_fp8_zero_tile_and_layouts():
    q, k, v = _qkv(B=1, H=2, Hkv=1, N=200, Nk=130)
    q[:, :, 128:] = 0.0  # an all-zero tile: scale 1, zeros
    f = reference.quantize_fp8(q, k, v)
    assert torch.equal(f.q_scale[:, :, 1], torch.ones(1, 2))
    assert not bool(f.q8[:, :, 128:].float().any())
    g = reference.quantize_fp8(*(t.transpose(1, 2) for t in (q, k, v)), layout="bnhd")
    for a, b in zip(f, g):
        assert torch.equal(a.float(), b.float())


@pytest.mark.parametrize("text_first", [True, False])
def test_attention_fp8_ref_models(text_first):
    """round_p=False is the exact softmax of the quantized inputs; rounding P to e4m3 moves out by at most
    half an e4m3 step of each probability times |v| (normal P: 2^-4 relative; subnormal P: 2^-10 absolute, over
    N_k keys, the row sum >= 1 since its largest term is 1)."""
    q, k, v = _qkv(B=1, H=2, N=160, D=128, seed=3)
    kw = dict(text_len=33, text_first=text_first, gamma=1.2)
    f = reference.quantize_fp8(q, k, v)
    qd = f.q8.float() * f.q_scale.repeat_interleave(128, 2)[:, :, :160, None]
    kd = f.k8.float() * f.k_scale.repeat_interleave(128, 2)[:, :, :160, None]
    vd = f.v8.float() * f.v_scale[:, :, None, :]
    ref = reference.attention_ref(qd.double(), kd.double(), vd.double(), **kw)
    out, lse, tm = reference.attention_fp8_ref(q, k, v, round_p=False, **kw)
    torch.testing.assert_close(out, ref[0].float(), rtol=0, atol=2e-6)
    torch.testing.assert_close(lse, ref[1].float(), rtol=0, atol=2e-5)
    torch.testing.assert_close(tm, ref[2].float(), rtol=0, atol=2e-6)
    out_p, lse_p, tm_p = reference.attention_fp8_ref(q, k, v, round_p=True, **kw)
    vmax = vd.abs().amax()
    bound = (E4M3_REL + 160 * E4M3_SUB) * vmax
    assert 0 < float((out_p - out).abs().max()) <= float(bound)
    torch.testing.assert_close(lse_p, lse, rtol=0, atol=2e-5)
    torch.testing.assert_close(tm_p, tm, rtol=0, atol=2e-6)
    # the logits rounded to bfloat16: lse moves by at most half a bf16 step of the largest logit
    out_b, lse_b, _ = reference.attention_fp8_ref(q, k, v, round_p=True, logits_dtype=torch.bfloat16, **kw)
    top = float(reference.attention_fp8_ref(q, k, v, round_p=False, **kw)[1].abs().max())
    assert 0 < float((lse_b - lse).abs().max()) <= 2.0 ** -8 * max(top, 1.0)


def test_attention_fp8_ref_gqa_cross():
    q, k, v = _qkv(B=1, H=4, Hkv=2, N=100, Nk=230, seed=5)
    kw = dict(text_len=40, text_first=True, gamma=1.2, gamma_reverse=0.9)
    out, lse, tm = reference.attention_fp8_ref(q, k, v, round_p=False, **kw)
    ref = reference.attention_ref(q, k, v, **kw)
    assert out.shape == q.shape and lse.shape == (1, 4, 100) and tm.shape == (1, 4, 100)
    # the quantized inputs' attention stays near the exact one (e4m3 inputs: a few percent of |v|)
    assert float((out - ref[0].float()).abs().max()) < 0.1 * float(v.abs().max())


# ---- joint_attention(fp8=True): refused with a message naming what it needs, before any work ----

def _call(q, k, v, **kw):
    return taca.joint_attention(q, k, v, text_len=8, fp8=True, **kw)


def test_fp8_argument_errors():
    q, k, v = (t.to(torch.bfloat16) for t in _qkv(B=1, H=2, N=32))
    with pytest.raises(TypeError, match="fp8 must be a bool"):
        taca.joint_attention(q, k, v, text_len=8, fp8=1)
    with pytest.raises(ValueError, match="backend='sdpa'"):
        _call(q, k, v, backend="sdpa")
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        _call(q.float(), k.float(), v.float())
    with pytest.raises(ValueError, match="head dim 128, got 64"):
        _call(q[..., :64], k[..., :64], v[..., :64])
    with pytest.raises(ValueError, match="no attn_mask"):
        _call(q, k, v, attn_mask=torch.ones(1, 1, 1, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match="per-sample"):
        taca.joint_attention(q, k, v, text_len=torch.tensor([8]), fp8=True)
    qg = q.clone().requires_grad_()
    with pytest.raises(ValueError, match="no backward"):
        _call(qg, k, v)
    with pytest.raises(ValueError, match="CUDA device"):
        with torch.no_grad():
            _call(qg, k, v)
    with pytest.raises(ValueError, match="CUDA device"):
        _call(q, k, v)


def test_fp8_fake_registered():
    """torch.compile traces joint_attention(fp8=True) through the op's fake (shapes of taca::fwd's)."""
    if not taca.ops.HAVE_KERNELS:
        pytest.skip("extension not built")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 300, 4, 128, dtype=torch.bfloat16)
        k = torch.empty(2, 200, 2, 128, dtype=torch.bfloat16)
        g = torch.empty(2)
        out, lse, tm = torch.ops.taca.fwd_fp8(q, k, k, g, 1.0, 0.1, 0, 8, True)
    assert out.shape == q.shape and lse.shape == (2, 4, 300) and tm.shape == (2, 4, 300)
