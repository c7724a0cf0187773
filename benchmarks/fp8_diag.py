"""Diagnostic: where the FP8 forward's logit error comes from. For a few of test_cuda_fp8's cases, the kernel's lse
against (a) the exact float64 logits of its quantized inputs, (b) logits from the tensor cores' own FP8 GEMM
(torch._scaled_mm, fast accumulation and not), each through the same float64 softmax. Prints per case the max lse
error of the kernel against each, and the max logit error of each GEMM against the exact product."""
import torch

import taca
from taca import reference

CASES = [  # B, H, N, Nk, text_len, first, gamma, scale, q-tile boost
    (1, 3, 257, 257, 0, True, 1.0, None, None),
    (1, 2, 1101, 1101, 77, True, 1.2, None, None),
    (1, 2, 640, 640, 128, True, 1.2, None, 30.0),
    (1, 2, 200, 17, 5, False, 1.2, 0.05, None),
]


def pad16(x, dim):
    n = x.shape[dim]
    p = (-n) % 16
    if p == 0:
        return x
    shape = list(x.shape)
    shape[dim] = p
    return torch.cat([x, x.new_zeros(shape)], dim)


def main():
    dev = "cuda"
    for ci, (B, H, N, Nk, L, first, gamma, scale, boost), dt in [(i, c, d) for i, c in enumerate(CASES)
                                                                for d in (torch.bfloat16, torch.float16)]:
        g = torch.Generator(device=dev).manual_seed(ci)
        q = (torch.randn(B, H, N, 128, device=dev, generator=g) * 1.5).bfloat16().to(dt)
        k = torch.randn(B, H, Nk, 128, device=dev, generator=g).bfloat16().to(dt)
        v = torch.randn(B, H, Nk, 128, device=dev, generator=g).bfloat16().to(dt)
        if boost:
            q[:, :, 128:256] *= boost
        kw = dict(text_len=L, text_first=first, gamma=gamma, scale=scale)
        with torch.no_grad():
            _, lse_k, _ = taca.joint_attention(q, k, v, fp8=True, return_lse=True, return_text_mass=True, **kw)
        f = reference.quantize_fp8(q, k, v)
        qs = f.q_scale.repeat_interleave(128, 2)[:, :, :N, None].double()
        ks = f.k_scale.repeat_interleave(128, 2)[:, :, :Nk, None].double()
        s = (1.0 / 128 ** 0.5) if scale is None else scale
        mult = reference.logit_multiplier(N, L, first, gamma, 1.0, B, dev, torch.float64, n_k=Nk)
        exact = torch.matmul(f.q8.double(), f.k8.double().transpose(-1, -2))  # in quantized units
        out = {}
        for name, fast in (("scaled_mm_fast", True), ("scaled_mm", False)):
            S = torch.empty_like(exact)
            one = torch.tensor(1.0, device=dev)
            for b in range(B):
                for h in range(H):
                    a = pad16(f.q8[b, h], 0)
                    bb = pad16(f.k8[b, h], 0)
                    r = torch._scaled_mm(a, bb.t(), one, one, out_dtype=torch.float32, use_fast_accum=fast)
                    S[b, h] = r[:N, :Nk].double()
            out[name] = S
        def lse_of(S):
            return torch.logsumexp(S * qs * ks.transpose(-1, -2) * s * mult, dim=-1)
        lse_exact = lse_of(exact)
        print(f"case {ci} {CASES[ci]} {dt}:")
        print(f"  kernel lse vs exact-logit lse: max {float((lse_k.double() - lse_exact).abs().max()):.3e}")
        for name, S in out.items():
            rel = float((S - exact).abs().max() / exact.abs().max())
            print(f"  {name}: max |S - exact| / max|exact| {rel:.2e}; its lse vs exact {float((lse_of(S) - lse_exact).abs().max()):.3e};"
                  f" kernel lse vs its lse {float((lse_k.double() - lse_of(S)).abs().max()):.3e}")
        err = (lse_k.double() - lse_exact).abs()
        per_tile = [float(err[..., t * 128:(t + 1) * 128].max()) for t in range((N + 127) // 128)]
        print("  kernel lse error per query tile: " + " ".join(f"{e:.1e}" for e in per_tile))
        rows = err.flatten().topk(3).indices
        print("  worst rows (flat b,h,row):", [(int(r) // N, int(r) % N) for r in rows])


if __name__ == "__main__":
    main()


def _layout(B, H, Hkv, nq, nk):
    up = lambda x: (x + 1023) // 1024 * 1024  # noqa: E731
    nqt, nkt, nk16 = -(-nq // 128), -(-nk // 128), -(-nk // 16) * 16
    o, L = 0, {}
    for name, size in (("q8", B * H * nq * 128), ("k8", B * Hkv * nk * 128), ("v8", B * Hkv * 128 * nk16),
                       ("qs", B * H * nqt * 4), ("ks", B * Hkv * nkt * 4), ("vs", B * Hkv * 128 * 4)):
        L[name] = (o, size)
        o += up(size)
    return L, o, nqt, nkt, nk16


def workspace_check():
    """The quantization passes' workspace, through the ctypes library, against reference.quantize_fp8 bit for bit."""
    import ctypes
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "cuda_harness"))
    import taca_ctypes

    lib = taca_ctypes.load()
    if lib is None:
        print("workspace_check: no ctypes library")
        return
    lib.taca_fwd_fp8_cuda_variant.argtypes = [ctypes.POINTER(taca_ctypes.FwdParams), ctypes.c_void_p, ctypes.c_size_t,
                                              ctypes.c_void_p, ctypes.c_int]
    lib.taca_fwd_fp8_cuda_variant.restype = ctypes.c_int
    cases = CASES + [(1, 3, 256, 256, 0, True, 1.0, None, None), (1, 3, 384, 384, 0, True, 1.0, None, None),
                     (1, 1, 257, 257, 0, True, 1.0, None, None), (1, 2, 200, 200, 5, False, 1.2, 0.05, None)]
    for ci, (B, H, N, Nk, L, first, gamma, scale, boost) in enumerate(cases):
        if N != Nk:
            continue
        g = torch.Generator(device="cuda").manual_seed(ci)
        q = (torch.randn(B, H, N, 128, device="cuda", generator=g) * 1.5).bfloat16()
        k = torch.randn(B, H, Nk, 128, device="cuda", generator=g).bfloat16()
        v = torch.randn(B, H, Nk, 128, device="cuda", generator=g).bfloat16()
        if boost:
            q[:, :, 128:256] *= boost
        lay, total, nqt, nkt, nk16 = _layout(B, H, H, N, Nk)
        ws = torch.zeros(total, dtype=torch.uint8, device="cuda")
        out = torch.full_like(q, float("nan"))
        lse = torch.full((B, H, N), float("nan"), device="cuda")
        tm = torch.full((B, H, N), float("nan"), device="cuda")
        # build the params as taca_ctypes.fwd_status does, then call the fp8 entry
        captured = {}
        orig = lib.taca_fwd_cuda_variant

        class Grab:
            argtypes = orig.argtypes

            def __call__(self, pp, stream, variant):
                captured["p"] = pp._obj
                return 0
        lib.taca_fwd_cuda_variant = Grab()
        try:
            taca_ctypes.fwd_status(q, k, v, out, lse, tm, text_len=L, text_first=first, gamma=gamma, scale=scale)
        finally:
            lib.taca_fwd_cuda_variant = orig
        p = captured["p"]
        st = lib.taca_fwd_fp8_cuda_variant(ctypes.byref(p), ctypes.c_void_p(ws.data_ptr()), total,
                                           ctypes.c_void_p(torch.cuda.current_stream().cuda_stream), 0)
        torch.cuda.synchronize()
        f = reference.quantize_fp8(q, k, v)
        part = lambda n: ws[lay[n][0]:lay[n][0] + lay[n][1]]  # noqa: E731
        q8 = part("q8").view(B, H, N, 128)
        k8 = part("k8").view(B, H, Nk, 128)
        qs = part("qs").view(torch.float32).view(B, H, nqt)
        ks = part("ks").view(torch.float32).view(B, H, nkt)
        vam = part("vs").view(torch.float32).view(B, H, 128)
        v8 = part("v8").view(B, H, 128, nk16)
        pos = [4 * ((kk >> 1) & 3) + 2 * ((kk >> 3) & 1) + (kk & 1) for kk in range(16)]
        perm = torch.tensor([16 * (kk // 16) + pos[kk % 16] for kk in range(nk16)], device="cuda")
        v8_keys = v8[..., perm][..., :Nk].transpose(-1, -2)  # back to (B, H, Nk, 128) key order
        # lse from the kernel's own quantized inputs (exact float64 logits)
        qsr = qs.repeat_interleave(128, 2)[:, :, :N, None].double()
        ksr = ks.repeat_interleave(128, 2)[:, :, :Nk, None].double()
        S = torch.matmul(q8.view(torch.float8_e4m3fn).double(), k8.view(torch.float8_e4m3fn).double().transpose(-1, -2))
        sc = (1.0 / 128 ** 0.5) if scale is None else scale
        mult = reference.logit_multiplier(N, L, first, gamma, 1.0, B, "cuda", torch.float64, n_k=Nk)
        lse_ws = torch.logsumexp(S * qsr * ksr.transpose(-1, -2) * sc * mult, dim=-1)
        e = (lse.double() - lse_ws).abs()
        print(f"ws case {ci} {cases[ci]}: kernel lse vs exact lse of its own workspace, per q tile: "
              + " ".join(f"{float(e[..., t * 128:(t + 1) * 128].max()):.1e}" for t in range(nqt)))
        print(f"ws case {ci}: status {st}; q8 mismatches {int((q8 != f.q8.view(torch.uint8)).sum())}, "
              f"k8 {int((k8 != f.k8.view(torch.uint8)).sum())}, v8 {int((v8_keys != f.v8.view(torch.uint8)).sum())}, "
              f"qs {int((qs != f.q_scale).sum())}, ks {int((ks != f.k_scale).sum())}, "
              f"v amax/448 vs v_scale max rel {float(((vam / 448) / f.v_scale - 1).abs().max()):.1e}; "
              f"lse vs op: {float((lse - taca.joint_attention(q, k, v, fp8=True, return_lse=True, text_len=L, text_first=first, gamma=gamma, scale=scale)[1]).abs().max()):.2e}")


if __name__ == "__main__":
    workspace_check()
