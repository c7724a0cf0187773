"""The CPU float32 path's AVX-512F GEMM micro-kernel (csrc/taca_cpu_common.h, taca_gemm_f32_512): chosen per call
where the CPU has AVX-512F, it computes every output element as the same chain of fused multiply-adds as the AVX2
kernel, so outputs, lse, text mass and gradients must be bitwise those with TACA_CPU_AVX512=0 (the AVX2 kernel),
on shapes that reach every block of it (6 x 32 blocks, 16- and 8-column masked tails, single-row tails) and on the
feature cases of test_ops_features (spans, masks, grouped KV heads). Skipped on CPUs without AVX-512F, where the two
settings run the same code."""
from __future__ import annotations

import os
import sys

import pytest
import torch

import taca
from taca import ops

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from bench_attention import has_avx512f  # noqa: E402  (the benchmark's taca_avx2 row asks the same)

pytestmark = [pytest.mark.skipif(not ops.HAVE_KERNELS, reason="taca._C extension not built"),
              pytest.mark.skipif(not has_avx512f(), reason="the CPU has no AVX-512F: one micro-kernel only")]


def _run(q, k, v, kw, mode, monkeypatch):
    """out, lse, text mass and dq, dk, dv with TACA_CPU_AVX512=mode (read per call)."""
    monkeypatch.setenv("TACA_CPU_AVX512", mode)
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse, tm = taca.joint_attention(qg, kg, vg, backend="cpu", return_lse=True, return_text_mass=True, **kw)
    g = torch.Generator().manual_seed(1)
    out.backward(torch.randn(out.shape, generator=g, dtype=out.dtype))
    return [out.detach(), lse, tm, qg.grad, kg.grad, vg.grad]


# (B, H, N, D, text_len): D = 40 (Dp 40: one 32-column block + an 8-column tail), 200 (6 blocks + 8), 128 (4 blocks),
# 24 (16 + 8), N = 197 / 301 (ragged query and key tiles of 96: 6-row and single-row tails)
SHAPES = [(2, 3, 197, 40, 33), (1, 2, 301, 128, 77), (1, 1, 150, 200, 20), (2, 2, 120, 24, 0)]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{s[0]}H{s[1]}N{s[2]}D{s[3]}L{s[4]}" for s in SHAPES])
def test_avx512_gemm_bitwise_equal_to_avx2(shape, monkeypatch, one_thread):
    B, H, N, D, L = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, N, H, D, generator=g) for _ in range(3))
    kw = dict(text_len=L, gamma=torch.tensor([1.2, 0.8][:B]), gamma_reverse=1.1, layout="bnhd")
    a = _run(q, k, v, kw, "1", monkeypatch)
    b = _run(q, k, v, kw, "0", monkeypatch)
    for name, x, y in zip(("out", "lse", "text_mass", "dq", "dk", "dv"), a, b):
        assert torch.equal(x, y), f"{name}: the AVX-512 kernel's differs from the AVX2 kernel's"


def test_avx512_gemm_bitwise_on_feature_cases(monkeypatch):
    """Every float32 feature case of test_ops_features that the CPU kernel covers (masks, spans, GQA, N_q != N_k)."""
    import test_ops_features as tf

    ran = 0
    for case in tf.CASES:
        if not tf._cpu_kernel_covers(case):
            continue
        torch.manual_seed(3)
        q, k, v, kw = tf.make(case, torch.float32)
        a = _run(q, k, v, kw, "1", monkeypatch)
        b = _run(q, k, v, kw, "0", monkeypatch)
        for name, x, y in zip(("out", "lse", "text_mass", "dq", "dk", "dv"), a, b):
            assert torch.equal(x, y), f"{case.name} {name}: the AVX-512 kernel's differs from the AVX2 kernel's"
        ran += 1
    assert ran >= 10
