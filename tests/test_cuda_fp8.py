"""GPU tests of the opt-in FP8 forward (joint_attention(fp8=True), csrc/cuda/taca_fwd_sm90_fp8.cuh). Skipped
without an sm_90 GPU and a CUDA build.

Tolerance rule, the flash-attention rule carried to FP8 (FlashAttention-3 tests its FP8 kernel against a
reference on the same quantized inputs): ref = float32 attention on the kernel's own quantized inputs
(``reference.quantize_fp8`` rebuilds them bit for bit), and for out, lse and text_mass

    max |kernel - ref| <= 2 * max |model - ref| + 1e-5,

model = ``reference.attention_fp8_ref(round_p=True, fp8_matmul=True)`` with out rounded to q's dtype: a float32
model that takes Q8 K8^T from the tensor cores' own FP8 product (torch._scaled_mm, fast accumulation: the rounding of
the kernel's wgmma, relative to the largest term of each sum) and rounds P to e4m3 (as the kernel does, with the row's
final max where the kernel has a running one) and the output to q's dtype. The quantization is the reference's bit
for bit (fp8_diag.py's workspace check reads the kernel's quantized inputs back and compares them).
"""
from __future__ import annotations

import pytest
import torch

import taca
from taca import reference


def _fp8_works() -> bool:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        return False
    try:
        q = torch.randn(1, 1, 8, 128, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            taca.joint_attention(q, q, q, text_len=2, fp8=True)
        return True
    except (RuntimeError, ValueError, AttributeError, NotImplementedError):
        return False


pytestmark = pytest.mark.skipif(not _fp8_works(), reason="needs an sm_90 GPU and taca built for sm_90a")


def _inputs(B, H, N, Nk=None, Hkv=None, dtype=torch.bfloat16, layout="bhnd", seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    Nk = N if Nk is None else Nk
    Hkv = H if Hkv is None else Hkv
    q = torch.randn(B, H, N, 128, device="cuda", generator=g) * 1.5
    k = torch.randn(B, Hkv, Nk, 128, device="cuda", generator=g)
    v = torch.randn(B, Hkv, Nk, 128, device="cuda", generator=g)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if layout == "bnhd":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    return q, k, v


def check_rule(q, k, v, **kw):
    """Runs the kernel and checks the rule; returns the measured (error, allowed) per output."""
    layout = kw.get("layout", "bhnd")
    with torch.no_grad():
        out, lse, tm = taca.joint_attention(q, k, v, fp8=True, return_lse=True, return_text_mass=True, **kw)
    span = {k2: v2 for k2, v2 in kw.items() if k2 != "layout"}
    ref = reference.attention_fp8_ref(q, k, v, round_p=False, layout=layout, **span)
    model = reference.attention_fp8_ref(q, k, v, round_p=True, fp8_matmul=True, layout=layout, **span)
    model = (model[0].to(q.dtype).float(),) + model[1:]
    assert out.dtype == q.dtype and out.shape == q.shape
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(lse).all()) and bool(torch.isfinite(tm).all())
    res = {}
    for name, got, r, m in (("out", out.float(), ref[0], model[0]), ("lse", lse, ref[1], model[1]),
                            ("text_mass", tm, ref[2], model[2])):
        err = float((got - r).abs().max())
        allowed = 2 * float((m - r).abs().max()) + 1e-5
        res[name] = (err, allowed)
        assert err <= allowed, f"{name}: max error {err:.3e} > allowed {allowed:.3e} ({kw})"
    return res


CASES = [
    # B, H, N, Nk, Hkv, span kwargs
    (1, 2, 1024 + 77, None, None, dict(text_len=77, text_first=True, gamma=1.2)),      # FLUX-like, ragged tile
    (2, 2, 333 + 1024, None, None, dict(text_len=333, text_first=False, gamma=1.2)),   # SD3-like, text last
    (1, 2, 512 + 1024, None, None, dict(text_len=512, text_first=True, gamma=1.2)),    # tile-aligned text
    (1, 3, 257, None, None, dict(text_len=0, text_first=True, gamma=1.0)),             # no text
    (1, 2, 1, 300, None, dict(text_len=77, text_first=True, gamma=1.2)),               # one query
    (1, 4, 700, 1001, 2, dict(text_len=100, text_first=True, gamma=1.3, gamma_reverse=0.8)),  # cross, GQA
    (1, 2, 200, 17, None, dict(text_len=5, text_first=False, gamma=1.2, scale=0.05)),  # fewer keys than a group
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_rule(case, dtype):
    B, H, N, Nk, Hkv, kw = CASES[case]
    q, k, v = _inputs(B, H, N, Nk, Hkv, dtype=dtype, seed=case)
    check_rule(q, k, v, **kw)


def test_fp8_per_sample_gamma_and_bnhd():
    q, k, v = _inputs(2, 2, 600, layout="bnhd", seed=11)
    gamma = torch.tensor([1.0, 1.5], device="cuda")
    check_rule(q, k, v, text_len=64, text_first=True, gamma=gamma, layout="bnhd")
    # strided views (the heads of a packed (B, N, 3, H, D) projection) take the same path
    qkv = torch.randn(1, 500, 3, 2, 128, device="cuda", dtype=torch.bfloat16)
    q2, k2, v2 = qkv.unbind(2)
    check_rule(q2, k2, v2, text_len=50, text_first=True, gamma=1.2, layout="bnhd")


def test_fp8_scaled_inputs():
    """Per-tile scales: a tile 30x larger than its neighbours does not wash out the others (one scale per
    tensor would round the small tiles to a handful of e4m3 steps)."""
    q, k, v = _inputs(1, 2, 640, seed=4)
    q[:, :, 128:256] *= 30.0
    k[:, :, 256:384] *= 0.03
    v[..., :8] *= 100.0  # a few loud channels: V's per-channel scales
    check_rule(q, k, v, text_len=128, text_first=True, gamma=1.2)


def test_fp8_error_against_exact_attention():
    """Against the exact attention of the unquantized inputs: the kernel's RMS error is at most twice the float32
    model's (quantized inputs, FP8 products, P rounded to e4m3), i.e. the kernel adds no error of its own beyond
    FP8's; the numbers, with the 16-bit kernel's, are in the message."""
    q, k, v = _inputs(1, 4, 2048 + 512, seed=7)
    kw = dict(text_len=512, text_first=True, gamma=1.2)
    with torch.no_grad():
        o8 = taca.joint_attention(q, k, v, fp8=True, **kw).float()
        o16 = taca.joint_attention(q, k, v, **kw).float()
    ref = reference.attention_ref(q, k, v, upcast=torch.float32, **kw)[0]
    model = reference.attention_fp8_ref(q, k, v, round_p=True, fp8_matmul=True, **kw)[0].to(q.dtype).float()
    rms = lambda x: float(x.pow(2).mean().sqrt())  # noqa: E731
    r8, rm, r16 = rms(o8 - ref) / rms(ref), rms(model - ref) / rms(ref), rms(o16 - ref) / rms(ref)
    assert r8 <= 2 * rm, f"relative RMS error: fp8 kernel {r8:.4f}, fp8 model {rm:.4f}, bf16 kernel {r16:.5f}"


def test_fp8_deterministic_and_compile():
    q, k, v = _inputs(1, 2, 900, seed=9)
    kw = dict(text_len=77, text_first=True, gamma=1.2)
    with torch.no_grad():
        a = taca.joint_attention(q, k, v, fp8=True, **kw)
        b = taca.joint_attention(q, k, v, fp8=True, **kw)
        assert torch.equal(a, b)
        f = torch.compile(lambda q_, k_, v_, g_: taca.joint_attention(q_, k_, v_, fp8=True, text_len=77, gamma=g_),
                          fullgraph=True)
        g = torch.tensor(1.2, device="cuda")
        c = f(q, k, v, g)
    assert torch.equal(a, c)


def test_fp8_grad_refused_on_gpu():
    q, k, v = _inputs(1, 1, 64)
    with pytest.raises(ValueError, match="no backward"):
        taca.joint_attention(q.requires_grad_(), k, v, text_len=8, fp8=True)
