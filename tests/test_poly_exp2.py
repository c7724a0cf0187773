"""The v6 backward's poly_exp2 (item 15, TACA_BWD_V6_PX=1) replayed in float32 with numpy, its coefficients read from
the CUDA source: relative error at most 1.02e-4 against 2^x over [-126, 0.5] (below the 3.9e-3 of the bf16 roundings
P and dS' go through), never negative or NaN, and 2^-126 (not 0) for x < -126 and x = -inf (rows past N: lse2 =
+inf). The kernel itself is tested on a GPU (test_cuda_bwd.py::test_sm90_v6_poly_exp)."""
import os
import re

import numpy as np

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "csrc", "cuda", "taca_bwd_sm90_v6.cu")


def _poly_exp2():
    src = open(SRC).read()
    body = src[src.index("float poly_exp2(float x)"):]
    body = body[:body.index("\n}\n")]
    # fmaf(fmaf(fmaf(c3, f, c2), f, c1), f, 1.f)
    c3, c2, c1 = (np.float32(v) for v in re.search(
        r"fmaf\(fmaf\(fmaf\(([0-9.e+-]+)f, f, ([0-9.e+-]+)f\), f, ([0-9.e+-]+)f\), f, 1\.f\)", body).groups())
    assert "fmaxf(x, -126.f)" in body and "12582912.f" in body and "<< 23" in body

    def f32(v):
        return np.asarray(v, dtype=np.float32)

    def poly(x):
        x = np.maximum(f32(x), np.float32(-126))
        t = f32(x + np.float32(12582912))
        f = f32(x - f32(t - np.float32(12582912)))
        f64 = f.astype(np.float64)  # fmaf: the product is exact in float64, one rounding to float32 after the add
        p = f32(np.float64(c3) * f64 + np.float64(c2))
        p = f32(p.astype(np.float64) * f64 + np.float64(c1))
        p = f32(p.astype(np.float64) * f64 + 1.0)
        bits = (p.view(np.int32).astype(np.int64) + (t.view(np.int32).astype(np.int64) << 23)) & 0xFFFFFFFF
        return bits.astype(np.uint32).view(np.float32)

    return poly


def test_poly_exp2_accuracy_and_edges():
    poly = _poly_exp2()
    x = np.linspace(-126, 0.5, 1_000_001, dtype=np.float32)
    got = poly(x).astype(np.float64)
    rel = np.abs(got / np.exp2(x.astype(np.float64)) - 1)
    assert rel.max() <= 1.02e-4
    assert np.all(got > 0) and not np.isnan(got).any()
    assert np.all(poly(np.array([0, -1, -2, -126], np.float32)) == np.array([1, 0.5, 0.25, 2.0 ** -126], np.float32))
    low = poly(np.array([-126.5, -200, -np.inf], np.float32))
    assert np.all(low == np.float32(2.0 ** -126))
