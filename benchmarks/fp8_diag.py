"""Diagnostic of the FP8 forward (joint_attention(fp8=True)): where its logit error comes from.

1. For each case, the kernel's lse against (a) the exact float64 logits of reference.quantize_fp8's inputs and
   (b) logits from the tensor cores' own FP8 GEMM of those inputs (torch._scaled_mm, fast accumulation and not),
   each through the same float64 softmax; per query tile.
2. Through the ctypes library (TACA_CUDA_LIB), the kernel's workspace read back after a call: its quantized inputs
   and scales against reference.quantize_fp8 element by element, and the kernel's lse against the exact lse of
   its own quantized inputs (square cases only: the harness's params have N_q = N_k).

This is how the nineteenth session found its reference an ulp off the kernel (KERNEL_LOG). Run on an sm_90 GPU:
  TACA_CUDA_LIB=build/libtaca_fwd_ctypes.so python benchmarks/fp8_diag.py
"""
import os
import sys

import torch

import taca
from taca import reference

CASES = [  # B, H, N, Nk, text_len, first, gamma, scale, q-tile boost
    (1, 3, 257, 257, 0, True, 1.0, None, None),
    (1, 2, 1101, 1101, 77, True, 1.2, None, None),
    (1, 2, 640, 640, 128, True, 1.2, None, 30.0),
    (1, 2, 200, 17, 5, False, 1.2, 0.05, None),
    (1, 3, 256, 256, 0, True, 1.0, None, None),
    (1, 3, 384, 384, 0, True, 1.0, None, None),
    (1, 2, 200, 200, 5, False, 1.2, 0.05, None),
]


def inputs(ci, dtype=torch.bfloat16):
    B, H, N, Nk, L, first, gamma, scale, boost = CASES[ci]
    g = torch.Generator(device="cuda").manual_seed(ci)
    q = (torch.randn(B, H, N, 128, device="cuda", generator=g) * 1.5).bfloat16().to(dtype)
    k = torch.randn(B, H, Nk, 128, device="cuda", generator=g).bfloat16().to(dtype)
    v = torch.randn(B, H, Nk, 128, device="cuda", generator=g).bfloat16().to(dtype)
    if boost:
        q[:, :, 128:256] *= boost
    return q, k, v, dict(text_len=L, text_first=first, gamma=gamma, scale=scale)


def exact_lse(q8, qs, k8, ks, kw, prod=None):
    """float64 lse of the logits of quantized inputs (q8, k8 e4m3 (B, H, N, 128); qs, ks per 128-token tile)."""
    N, Nk = q8.shape[2], k8.shape[2]
    if prod is None:
        prod = torch.matmul(q8.double(), k8.double().transpose(-1, -2))
    qr = qs.repeat_interleave(128, 2)[:, :, :N, None].double()
    kr = ks.repeat_interleave(128, 2)[:, :, :Nk, None].double()
    s = (1.0 / 128 ** 0.5) if kw["scale"] is None else kw["scale"]
    m = reference.logit_multiplier(N, kw["text_len"], kw["text_first"], kw["gamma"], 1.0, q8.shape[0], "cuda",
                                   torch.float64, n_k=Nk)
    return torch.logsumexp(prod.double() * qr * kr.transpose(-1, -2) * s * m, dim=-1)


def per_tile(err):
    return " ".join(f"{float(err[..., t:t + 128].max()):.1e}" for t in range(0, err.shape[-1], 128))


def against_reference():
    for ci in range(len(CASES)):
        for dt in (torch.bfloat16, torch.float16):
            q, k, v, kw = inputs(ci, dt)
            with torch.no_grad():
                lse = taca.joint_attention(q, k, v, fp8=True, return_lse=True, **kw)[1].double()
            f = reference.quantize_fp8(q, k, v)
            ref = exact_lse(f.q8, f.q_scale, f.k8, f.k_scale, kw)
            print(f"case {ci} {CASES[ci]} {dt}: kernel lse vs exact, per query tile: {per_tile((lse - ref).abs())}")
            for fast in (True, False):
                hw = exact_lse(f.q8, f.q_scale, f.k8, f.k_scale, kw, reference._fp8_products(f.q8, f.k8, fast))
                print(f"  torch._scaled_mm (fast_accum={fast}): its lse vs exact {float((hw - ref).abs().max()):.3e};"
                      f" kernel lse vs its lse {float((lse - hw).abs().max()):.3e}")


def workspace_check():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "cuda_harness"))
    import taca_ctypes

    if taca_ctypes.load() is None:
        print("workspace_check: no ctypes library (set TACA_CUDA_LIB)")
        return
    for ci, (B, H, N, Nk, *_rest) in enumerate(CASES):
        if N != Nk:
            continue
        q, k, v, kw = inputs(ci)
        up = lambda x: (x + 1023) // 1024 * 1024  # noqa: E731  (taca_fwd::fp8_layout)
        nqt, nk16 = -(-N // 128), -(-Nk // 16) * 16
        sizes = dict(q8=B * H * N * 128, k8=B * H * Nk * 128, v8=B * H * 128 * nk16, qs=B * H * nqt * 4,
                     ks=B * H * -(-Nk // 128) * 4, vs=B * H * 128 * 4)
        offs, o = {}, 0
        for name, size in sizes.items():
            offs[name], o = (o, size), o + up(size)
        ws = torch.zeros(o, dtype=torch.uint8, device="cuda")
        lse = torch.full((B, H, N), float("nan"), device="cuda")
        st = taca_ctypes.fwd_fp8_status(q, k, v, torch.empty_like(q), lse, None, ws, **kw)
        torch.cuda.synchronize()
        part = lambda n: ws[offs[n][0]:offs[n][0] + offs[n][1]]  # noqa: E731
        q8 = part("q8").view(B, H, N, 128).view(torch.float8_e4m3fn)
        k8 = part("k8").view(B, H, Nk, 128).view(torch.float8_e4m3fn)
        qs, ks = part("qs").view(torch.float32).view(B, H, -1), part("ks").view(torch.float32).view(B, H, -1)
        v8 = part("v8").view(B, H, 128, nk16)
        pos = [4 * ((j >> 1) & 3) + 2 * ((j >> 3) & 1) + (j & 1) for j in range(16)]  # key j's place in its group
        perm = torch.tensor([16 * (j // 16) + pos[j % 16] for j in range(nk16)], device="cuda")
        v8_keys = v8[..., perm][..., :Nk].transpose(-1, -2)  # back to (B, H, N_k, 128) in key order
        f = reference.quantize_fp8(q, k, v)
        bad = lambda a, b: int((a.view(torch.uint8) != b.view(torch.uint8)).sum())  # noqa: E731
        vmax = part("vs").view(torch.float32).view(B, H, 128)
        print(f"ws case {ci}: status {st}; mismatches q8 {bad(q8, f.q8)}, k8 {bad(k8, f.k8)}, v8 {bad(v8_keys, f.v8)}, "
              f"qs {int((qs != f.q_scale).sum())}, ks {int((ks != f.k_scale).sum())}, "
              f"v amax / 448 vs v_scale {int(((vmax.double() / 448).float() != f.v_scale).sum())}; kernel lse vs the "
              f"exact lse of its own workspace, per query tile: {per_tile((lse - exact_lse(q8, qs, k8, ks, kw)).abs())}")


if __name__ == "__main__":
    against_reference()
    workspace_check()
