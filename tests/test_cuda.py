"""GPU tests of the fused CUDA forward (csrc/cuda/taca_fwd.cu). Skipped without CUDA.

Tolerance rule (STYLE.md): max |kernel - ref_fp32| <= 2 * max |sdpa_bf16 - ref_fp32| + 1e-5, where
sdpa_bf16 is PyTorch's own SDPA on the same low-precision inputs with gamma applied through the
exact split form, for out, lse and text_mass (SDPA's lse through the flash / efficient aten ops;
its text_mass as exp(lse over text keys - lse over all keys)).

The kernel is reached through the public op (taca.joint_attention(backend="cuda")) when the torch
binding has it, and always through the ctypes harness (tests/cuda_harness) when TACA_CUDA_LIB
names a built library: the harness lets the tests poison outputs, pass unaligned pointers and
check status codes.
"""
from __future__ import annotations

import math
import os
import re
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "cuda_harness"))
import taca_ctypes  # noqa: E402
from sanitize_fwd_split import split_heads  # noqa: E402

from taca import reference  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _public_op_works() -> bool:
    if not torch.cuda.is_available():
        return False
    import taca

    try:
        q = torch.randn(1, 1, 8, 64, device="cuda", dtype=torch.bfloat16)
        taca.joint_attention(q, q, q, text_len=2, backend="cuda")
        return True
    except (NotImplementedError, RuntimeError, AttributeError):
        return False


_PUBLIC = _public_op_works()
_CTYPES = torch.cuda.is_available() and taca_ctypes.load() is not None
IMPLS = [i for i, ok in (("op", _PUBLIC), ("ctypes", _CTYPES)) if ok]
if torch.cuda.is_available() and not IMPLS:
    pytest.skip("no CUDA kernel reachable (binding without CUDA and TACA_CUDA_LIB unset)",
                allow_module_level=True)


def run_kernel(impl, q, k, v, *, text_len, text_first, gamma, gamma_reverse=1.0, scale=None,
               layout="bhnd", variant=0):
    """(out, lse, text_mass) from the CUDA kernel through the chosen path (variant: ctypes only)."""
    if impl == "ctypes":
        return taca_ctypes.fwd(q, k, v, text_len=text_len, text_first=text_first, gamma=gamma,
                               gamma_reverse=gamma_reverse, scale=scale, layout=layout, variant=variant)
    assert variant == 0, "tiling variants are reachable through the ctypes harness only"
    import taca

    return taca.joint_attention(q, k, v, text_len=text_len, text_first=text_first, gamma=gamma,
                                gamma_reverse=gamma_reverse, scale=scale, layout=layout,
                                return_lse=True, return_text_mass=True, backend="cuda")


def _sdpa_out_lse(q, k, v, scale):
    """(out, lse) of PyTorch's low-precision SDPA; q, k, v (B, H, N, D). D is zero-padded to a
    multiple of 8 (exact: padding changes neither q.k nor the kept output columns)."""
    D = q.shape[-1]
    pad = (-D) % 8
    if pad:
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
    try:
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)[:2]
    except RuntimeError:
        o, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, scale=scale)[:2]
        lse = lse[..., : q.shape[2]]
    return o[..., :D], lse


def sdpa_baseline(q, k, v, *, text_len, text_first, gamma, gamma_reverse, scale):
    """SDPA's out, lse, text_mass with gamma via the exact split form; (B, H, N, D) inputs."""
    B, H, N, D = q.shape
    s = D ** -0.5 if scale is None else scale
    tb, te = reference.text_range(N, text_len, text_first)
    g = reference.gamma_vector(gamma, B, q.device, q.dtype).view(B, 1, 1, 1)
    is_txt = torch.zeros(N, dtype=torch.bool, device=q.device)
    is_txt[tb:te] = True
    out = torch.empty_like(q)
    lse = torch.empty(B, H, N, device=q.device)
    tm = torch.zeros(B, H, N, device=q.device)
    for rows_txt in (False, True):
        rows = is_txt if rows_txt else ~is_txt
        if not rows.any():
            continue
        mult_txt, mult_vis = (1.0, gamma_reverse) if rows_txt else (g, 1.0)
        kk = torch.where(is_txt.view(1, 1, N, 1), k * mult_txt, k * mult_vis).to(q.dtype)
        o, l_all = _sdpa_out_lse(q[:, :, rows], kk, v, s)
        out[:, :, rows] = o
        lse[:, :, rows] = l_all.float()
        if is_txt.any():
            _, l_txt = _sdpa_out_lse(q[:, :, rows], kk[:, :, is_txt], v[:, :, is_txt], s)
            tm[:, :, rows] = torch.exp(l_txt.float() - l_all.float())
    return out, lse, tm


def check_case(impl, B, H, L, n_img, D, text_first, dtype, layout="bhnd", gamma=1.2,
               gamma_reverse=1.0, per_sample=True, noncontig=False, seed=0, variant=0, edit=None):
    """The kernel's (out, lse, text_mass) against the fp32 reference by the tolerance rule, on random inputs (edit:
    a function applied in place to (q, k, v) first); returns q, k, v, out, gamma."""
    N = L + n_img
    gen = torch.Generator(device="cuda").manual_seed(seed)
    def rnd():
        if noncontig and layout == "bnhd":  # (B, N, H, D) slice of wider storage
            return torch.randn(B, N, H, D + 24, device="cuda", generator=gen).to(dtype)[..., :D]
        if noncontig:  # (B, H, N, D) view of (B, N, H, D) storage, as diffusers passes it
            return torch.randn(B, N, H, D, device="cuda", generator=gen).to(dtype).transpose(1, 2)
        shape = (B, H, N, D) if layout == "bhnd" else (B, N, H, D)
        return torch.randn(*shape, device="cuda", generator=gen).to(dtype)
    q, k, v = rnd(), rnd(), rnd()
    if edit is not None:
        edit(q, k, v)
    if per_sample:
        gamma = torch.linspace(0.8, 1.6, B, device="cuda") if B > 1 else torch.tensor([gamma], device="cuda")
    ref_out, ref_lse, ref_tm = reference.attention_ref(
        q, k, v, text_len=L, text_first=text_first, gamma=gamma, gamma_reverse=gamma_reverse,
        layout=layout, upcast=torch.float32)
    to_bhnd = (lambda x: x.transpose(1, 2)) if layout == "bnhd" else (lambda x: x)
    so, slse, stm = sdpa_baseline(to_bhnd(q), to_bhnd(k), to_bhnd(v), text_len=L,
                                  text_first=text_first, gamma=gamma, gamma_reverse=gamma_reverse,
                                  scale=None)
    so = so.transpose(1, 2) if layout == "bnhd" else so
    out, lse, tm = run_kernel(impl, q, k, v, text_len=L, text_first=text_first, gamma=gamma,
                              gamma_reverse=gamma_reverse, layout=layout, variant=variant)
    torch.cuda.synchronize()
    assert out.shape == q.shape and out.dtype == q.dtype
    for name, got, ref, base in (("out", out, ref_out, so), ("lse", lse, ref_lse, slse),
                                 ("text_mass", tm, ref_tm, stm)):
        assert torch.isfinite(got).all(), f"{name}: non-finite (unwritten) elements"
        err = (got.float() - ref.float()).abs().max().item()
        tol = 2 * (base.float() - ref.float()).abs().max().item() + 1e-5
        assert err <= tol, f"{name}: max err {err:.3e} > tol {tol:.3e}"
    return q, k, v, out, gamma


# A covering subset of text lengths x image tokens x head dims x orders x dtypes x layouts.
CASES = [
    # B, H, L, n_img, D, text_first, dtype, layout, noncontig
    (1, 2, 512, 4096, 128, True, torch.bfloat16, "bnhd", True),   # FLUX-like
    (2, 2, 333, 4096, 64, False, torch.bfloat16, "bhnd", True),   # SD3-like, diffusers view
    (1, 2, 200, 1000, 128, True, torch.bfloat16, "bhnd", False),  # boundary mid-tile on an 8-key group
    (2, 3, 77, 1025, 128, True, torch.float16, "bhnd", False),
    (2, 3, 77, 1025, 64, False, torch.float16, "bnhd", False),
    (1, 2, 0, 1025, 64, True, torch.bfloat16, "bhnd", False),
    (1, 2, 1, 97, 128, False, torch.bfloat16, "bnhd", True),
    (2, 2, 512, 1, 64, True, torch.float16, "bhnd", False),
    (1, 2, 333, 97, 96, True, torch.bfloat16, "bhnd", False),
    (2, 2, 77, 97, 96, False, torch.float16, "bnhd", True),
    # D = 72..120 on the D = 128 warp-specialized kernel, zero-filled (Lumina 2's 96 at FLUX 1024's item count: the
    # tail split; several key tiles, boundaries mid-tile)
    (1, 24, 512, 4096, 96, True, torch.bfloat16, "bnhd", True),
    (2, 3, 77, 1025, 72, False, torch.float16, "bhnd", False),
    (1, 2, 200, 1000, 80, True, torch.bfloat16, "bnhd", True),
    (2, 2, 333, 1025, 120, True, torch.bfloat16, "bhnd", False),
    (1, 2, 1, 1, 128, True, torch.bfloat16, "bhnd", False),
    (1, 2, 512, 97, 40, True, torch.bfloat16, "bhnd", False),
    (2, 2, 333, 1025, 256, False, torch.bfloat16, "bnhd", False),
    (1, 2, 77, 97, 256, True, torch.float16, "bhnd", False),
    (2, 2, 264, 700, 256, True, torch.bfloat16, "bhnd", True),    # AuraFlow-like: Hopper D = 256
    (1, 2, 77, 400, 224, False, torch.bfloat16, "bnhd", False),   # zero-filled to 256 on Hopper
    (1, 2, 0, 97, 32, False, torch.float16, "bhnd", False),
    (1, 2, 77, 1025, 160, True, torch.bfloat16, "bhnd", False),
    (1, 2, 77, 97, 192, False, torch.bfloat16, "bnhd", True),
    (1, 2, 333, 97, 33, True, torch.bfloat16, "bhnd", False),     # odd D: element-wise path
    (1, 1, 77, 1, 8, False, torch.float16, "bhnd", False),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"L{c[2]}-img{c[3]}-D{c[4]}-{'tf' if c[5] else 'tl'}-{str(c[6])[6:]}-{c[7]}{'-view' if c[8] else ''}")
def test_forward_matches_reference(impl, case):
    B, H, L, n_img, D, tf, dtype, layout, nc = case
    check_case(impl, B, H, L, n_img, D, tf, dtype, layout=layout, noncontig=nc)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("var, value, dims", [("TACA_FWD_PAD", "0", (96, 72)), ("TACA_FWD_PAD", "1", (96, 72)),
                                              ("TACA_FWD_D256", "cp", (256, 208)), ("TACA_FWD_D256", "ws", (256, 208))],
                         ids=["pad0", "pad1", "d256cp", "d256ws"])
def test_forward_head_dim_routes(impl, var, value, dims, monkeypatch):
    # Both forward routes of the padded head dims, each by the tolerance rule through the default variant (the public op
    # too): D = 72..120 on the warp-specialized D = 128 forward zero-filled (default) or the cp.async one (TACA_FWD_PAD=0,
    # the route before, kept as a timing switch); D = 200..256 on the warp-specialized D = 256 forward (TACA_FWD_D256=ws)
    # or the cp.async one (cp). A strided (B, N, H, D) view, then fp16 at the smaller (zero-filled) dim, text last
    monkeypatch.setenv(var, value)
    check_case(impl, 2, 3, 333, 1500, dims[0], True, torch.bfloat16, layout="bnhd", noncontig=True)
    check_case(impl, 1, 2, 77, 1025, dims[1], False, torch.float16)


@pytest.mark.parametrize("impl", IMPLS)
def test_text_len_equals_n(impl):
    check_case(impl, 2, 2, 300, 0, 64, True, torch.bfloat16)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("text_first", [True, False])
def test_gamma_reverse(impl, text_first):
    check_case(impl, 2, 2, 77, 1025, 128, text_first, torch.bfloat16, gamma_reverse=0.7)
    check_case(impl, 1, 2, 333, 97, 64, text_first, torch.float16, gamma_reverse=1.5, per_sample=False)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("D", [64, 128])
def test_gamma_one_equals_sdpa(impl, D):
    q, k, v = (torch.randn(2, 3, 1100, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out, _, _ = run_kernel(impl, q, k, v, text_len=77, text_first=False, gamma=1.0)
    sd = F.scaled_dot_product_attention(q, k, v)
    ref = reference.attention_ref(q, k, v, text_len=77, text_first=False, upcast=torch.float32)[0]
    base = (sd.float() - ref).abs().max().item()
    assert (out.float() - ref).abs().max().item() <= 2 * base + 1e-5
    assert (out.float() - sd.float()).abs().max().item() <= 3 * base + 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_deterministic_bitwise(impl):
    q, k, v = (torch.randn(2, 4, 1500, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    g = torch.tensor([1.2, 0.9], device="cuda")
    a = run_kernel(impl, q, k, v, text_len=333, text_first=True, gamma=g)
    b = run_kernel(impl, q, k, v, text_len=333, text_first=True, gamma=g)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


SPLIT_CASES = [
    # B, L, n_img, text_first, dtype, layout, noncontig, TACA_FWD_SPLIT, TACA_FWD_SPLIT_FORM
    (1, 512, 4096, True, torch.bfloat16, "bnhd", True, "auto", "one"),  # FLUX-like, diffusers' view
    (1, 512, 4096, True, torch.bfloat16, "bnhd", True, "auto", "two"),
    (1, 512, 4096, True, torch.bfloat16, "bhnd", False, "2", "one"),
    (2, 333, 4000, False, torch.float16, "bhnd", False, "3", "one"),  # ragged last tiles, text last, per-sample gamma
    (2, 333, 4000, False, torch.float16, "bhnd", False, "3", "two"),
    (1, 77, 1025, True, torch.bfloat16, "bhnd", False, "7", "one"),  # 9 key tiles in 7 uneven ranges
    (1, 77, 1025, True, torch.bfloat16, "bhnd", False, "16", "two"),  # clamped to 9: one key tile a range
    (1, 512, 4096, True, torch.bfloat16, "bnhd", True, "range", "one"),  # one range of the tail's tiles per CTA
    (2, 333, 4000, False, torch.float16, "bhnd", False, "range", "two"),
    (1, 77, 1025, True, torch.bfloat16, "bhnd", False, "range", "one"),
    (1, 512, 4096, True, torch.bfloat16, "bnhd", True, "", "one"),  # unset: the default (the range form where it pays)
    (2, 333, 4000, False, torch.float16, "bhnd", False, "", "one"),
]


def _check_split(split, plain, B, H, N, layout="bhnd", expect_split=True):
    """The tail split's checks against the unsplit kernel (TACA_FWD_SPLIT=0): split, two calls' (out, lse, text_mass),
    bitwise equal (the merge's order is fixed); every whole item (items w = query tile + nqt * (head + H * batch), the
    first items - items % SMs) bitwise the unsplit kernel's; on sm_90 the split items' lse differs from it (the
    merge's rounding: the path ran), or, with expect_split False, lse equal everywhere."""
    for name, a, b in zip(("out", "lse", "text_mass"), *split):
        assert torch.equal(a, b), f"{name}: two split calls differ"
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    nqt = -(-N // 128)
    first = nqt * H * B - (nqt * H * B) % sms
    rows = (torch.arange(nqt * H * B, device="cuda") < first).view(B, H, nqt).repeat_interleave(128, dim=2)[..., :N]
    to_bhnd = (lambda x: x.transpose(1, 2)) if layout == "bnhd" else (lambda x: x)
    for name, a, b in zip(("out", "lse", "text_mass"), split[0], plain):
        a, b = (to_bhnd(a), to_bhnd(b)) if name == "out" else (a, b)
        assert torch.equal(a[rows], b[rows]), f"{name}: a whole item differs from the unsplit kernel's"
    if not expect_split:
        assert torch.equal(split[0][1], plain[1]), "the split ran where it should not"
    elif torch.cuda.get_device_capability() == (9, 0):
        assert not torch.equal(split[0][1][~rows], plain[1][~rows]), "the split did not run (lse equal everywhere)"


@pytest.mark.skipif(not _PUBLIC, reason="the public op has no CUDA kernel (the split takes its workspace)")
@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: f"L{c[1]}-img{c[2]}-B{c[0]}-{c[5]}-split{c[7] or 'default'}-{c[8]}")
def test_forward_tail_split(case, monkeypatch):
    """The tail split (TACA_FWD_SPLIT; unset: the range form where ceil(tail key tiles / SMs) + 10 is under the key
    tiles; 0: off): the D = 128 Hopper forward runs the partial last wave's items as key ranges spread
    over every SM, merged by the range that finishes last. The tolerance rule against the fp32 reference (out, lse,
    text_mass), bitwise the same over repeated calls (the merge's order is fixed), and every whole item bitwise the
    unsplit kernel's; on sm_90 the split items' lse differs from the unsplit kernel's (the merge's rounding: the
    path ran). Other GPUs ignore the switch (all equal). Both forms: one launch, or the whole items by the default
    kernel and then the ranges by a second launch (TACA_FWD_SPLIT_FORM=two); and TACA_FWD_SPLIT=range (one contiguous
    range of the tail's key tiles per CTA, an item merged from the ranges covering it)."""
    B, L, n_img, tf, dtype, layout, nc, parts, form = case
    N = L + n_img
    H = split_heads(N, B, range_form=parts == "range", default=not parts)
    assert H is not None
    if parts:
        monkeypatch.setenv("TACA_FWD_SPLIT", parts)
    else:
        monkeypatch.delenv("TACA_FWD_SPLIT", raising=False)
    monkeypatch.setenv("TACA_FWD_SPLIT_FORM", form)
    q, k, v, out, gamma = check_case("op", B, H, L, n_img, 128, tf, dtype, layout=layout, noncontig=nc)
    split = [run_kernel("op", q, k, v, text_len=L, text_first=tf, gamma=gamma, layout=layout) for _ in range(2)]
    monkeypatch.setenv("TACA_FWD_SPLIT", "0")
    plain = run_kernel("op", q, k, v, text_len=L, text_first=tf, gamma=gamma, layout=layout)
    assert torch.equal(split[0][0], out)
    _check_split(split, plain, B, H, N, layout)


OVERLAP_CASES = [
    # B, H, L, n_img, text_first, dtype, layout, noncontig
    (1, 24, 512, 4096, True, torch.bfloat16, "bnhd", True),  # FLUX 1024's shape, diffusers' view: the tail split
    (2, 3, 333, 4000, False, torch.float16, "bhnd", False),  # ragged last tiles, text last, per-sample gamma
    (1, 2, 77, 15284, True, torch.bfloat16, "bhnd", False),  # 15361 keys: overlapped (the limit before PVW)
    (1, 1, 512, 16384, True, torch.bfloat16, "bhnd", False),  # FLUX 2048's key count
]


def _kernel_names():
    """Whether the tests check the names of the kernels launched (sm_90's forms): not under compute-sanitizer, where the
    profiler records no kernels (benchmarks/gpu_fwd_modes.sh sets TACA_TEST_KERNEL_NAMES=0 there)."""
    return torch.cuda.get_device_capability() == (9, 0) and os.environ.get("TACA_TEST_KERNEL_NAMES", "1") != "0"


def _fwd_ws_flags(fn):
    """The D = 128 warp-specialized forward kernels fn launched: their WsCfg's (OVERLAP, FORM) arguments (a bool, an
    int), from the CUDA kernel names the profiler records (demangled or mangled; FORM is WsCfg's last argument)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    flags = []
    for e in prof.events():
        m = re.search(r"WsCfg<2, (true|false), true, 128, true, 128, 2, (\d+)>", e.name) or re.search(
            r"WsCfgILi2ELb([01])ELb1ELi128ELb1ELi128ELi2ELi(\d+)E", e.name)
        if m and "fwd" in e.name:
            flags.append((m.group(1) in ("true", "1"), int(m.group(2))))
    return flags


def _fwd_overlap_flags(fn):
    """The D = 128 warp-specialized forward kernels fn launched: their WsCfg's OVERLAP argument (True / False)."""
    return [ov for ov, _ in _fwd_ws_flags(fn)]


def _fwd_form_flags(fn):
    """The D = 128 warp-specialized forward kernels fn launched: their WsCfg's FORM argument (an int)."""
    return [f for _, f in _fwd_ws_flags(fn)]


def _check_env_forms(call, default, var, wants, kernel_flags, monkeypatch):
    """call() with the environment variable `var` at each (value, want) of `wants` (value None: unset): (out, lse,
    text_mass) bitwise `default`, and on sm_90 (_kernel_names) every flag kernel_flags(call) reports (one per D = 128
    forward kernel launched) equal to want."""
    hopper = _kernel_names()
    for env, want in wants:
        if env is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, env)
        for name, a, b in zip(("out", "lse", "text_mass"), call(), default):
            assert torch.equal(a, b), f"{name}: {var}={env} differs from the default"
        if hopper:
            flags = kernel_flags(call)
            assert flags and all(f == want for f in flags), f"{var}={env}: kernels {flags}, want {want}"


def _check_overlap_forms(call, default, default_overlaps, monkeypatch):
    """call() with TACA_FWD_OVERLAP=1, =0 and unset: (out, lse, text_mass) bitwise `default`, and on sm_90 the D = 128
    forward kernels launched with the form asked for (unset: `default_overlaps`)."""
    _check_env_forms(call, default, "TACA_FWD_OVERLAP", (("1", True), ("0", False), (None, default_overlaps)),
                     _fwd_overlap_flags, monkeypatch)


@pytest.mark.skipif(not _PUBLIC, reason="the public op has no CUDA kernel")
@pytest.mark.parametrize("case", OVERLAP_CASES, ids=lambda c: f"B{c[0]}-H{c[1]}-N{c[2] + c[3]}-{c[6]}")
def test_forward_overlap(case, monkeypatch):
    """The D = 128 default's intra-warpgroup overlap (the softmax of key tile j while P V of tile j - 1 runs; on by
    default without a key mask, TACA_FWD_OVERLAP=0 / 1 forces it off / on): the tolerance rule against the fp32
    reference by default, the outputs (out, lse, text_mass) of both forced forms bitwise the default's (the same fp32
    operations in the same order), and on sm_90 the kernels launched carry the form asked for."""
    B, H, L, n_img, tf, dtype, layout, nc = case
    monkeypatch.delenv("TACA_FWD_OVERLAP", raising=False)
    q, k, v, out, gamma = check_case("op", B, H, L, n_img, 128, tf, dtype, layout=layout, noncontig=nc)

    def call():
        return run_kernel("op", q, k, v, text_len=L, text_first=tf, gamma=gamma, layout=layout)

    default = call()
    assert torch.equal(default[0], out)
    _check_overlap_forms(call, default, True, monkeypatch)


@pytest.mark.skipif(not _PUBLIC, reason="the public op has no CUDA kernel")
@pytest.mark.parametrize("shape", [(2, 24, 4608, 128), (4, 16, 4096, 128), (2, 24, 4352, 96), (2, 24, 4429, 64)],
                         ids=lambda s: "x".join(map(str, s)))
def test_forward_turn_across_items(shape, monkeypatch):
    """TACA_FWD_TURN=1: the persistent forward's consumers pass their ping-pong turn on across a CTA's items (WsCfg's
    TURN bit, instances of their own: the D = 128 default's PVW form as FORM 9, D = 64's three-consumer default as 8).
    Only the order in which the consumers issue changes: out, lse and text_mass bitwise the default's, and on sm_90 the
    D = 128 kernels launched carry the form asked for. Several items per CTA: FLUX 1024 CFG (1728 items),
    FlashAttention-3's 4k shape (2048), D = 96 zero-filled, SD3.5-M CFG at D = 64; at D >= 96 with the tail split
    (these shapes leave a partial wave; TURN passes the turn between its whole items) and without (TACA_FWD_SPLIT=0)."""
    B, H, N, D = shape
    monkeypatch.setenv("TACA_FWD_SPLIT", "0")
    gen = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(B, N, H, D, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(3))
    gamma = torch.linspace(1.2, 1.5, B, device="cuda")

    def call():
        return run_kernel("op", q, k, v, text_len=333, text_first=True, gamma=gamma, layout="bnhd")

    monkeypatch.delenv("TACA_FWD_TURN", raising=False)
    default = call()
    assert torch.isfinite(default[0]).all()
    if D == 64:
        monkeypatch.setenv("TACA_FWD_TURN", "1")
        for name, a, b in zip(("out", "lse", "text_mass"), call(), default):
            assert torch.equal(a, b), f"{name}: TACA_FWD_TURN=1 differs from the default"
    else:
        _check_env_forms(call, default, "TACA_FWD_TURN", (("1", 9), ("0", 1), (None, 1)), _fwd_form_flags, monkeypatch)
        monkeypatch.delenv("TACA_FWD_SPLIT")
        split = call()
        _check_env_forms(call, split, "TACA_FWD_TURN", (("1", 9), (None, 1)), _fwd_form_flags, monkeypatch)


@pytest.mark.skipif(not _PUBLIC, reason="the public op has no CUDA kernel")
@pytest.mark.parametrize("H, L, n_img", [(24, [512, 300], 4096), (3, [333, 100], 4000)], ids=["split", "unsplit"])
def test_forward_overlap_spans(H, L, n_img, monkeypatch):
    """Per-sample spans (the forward's FEAT instances) take the overlap as the plain default does: outputs with
    TACA_FWD_OVERLAP=0 / 1 bitwise the default's, and on sm_90 the kernels launched carry the form asked for (the
    tolerance rule for these instances: test_forward_tail_split_features, which runs the default)."""
    import taca

    B, N = 2, max(L) + n_img
    gen = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(B, H, N, 128, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(3))

    def call():
        return taca.joint_attention(q, k, v, text_len=torch.tensor(L, device="cuda"), text_first=True,
                                    gamma=torch.linspace(1.2, 1.5, B, device="cuda"), backend="cuda",
                                    return_lse=True, return_text_mass=True)

    monkeypatch.delenv("TACA_FWD_OVERLAP", raising=False)
    _check_overlap_forms(call, call(), True, monkeypatch)


@pytest.mark.skipif(not _PUBLIC, reason="the public op has no CUDA kernel")
@pytest.mark.parametrize("B, H, mk, split", [(2, 8, "bool", "range"), (2, 3, "bool", None), (1, 2, "float", "3")],
                         ids=["bool-split", "bool-unsplit", "float-3ranges"])
def test_forward_overlap_keymask(B, H, mk, split, monkeypatch):
    """A key mask's D = 128 instances (MK_KEY with every consumer thread arriving) take the overlap only when
    TACA_FWD_OVERLAP=1 (opt-in until timed): outputs with TACA_FWD_OVERLAP=1 / 0 bitwise the default's (unset: no
    overlap), out by the tolerance rule against the fp32 reference, and on sm_90 the kernels launched carry the form
    asked for; in the tail split's ranges (forced: a key mask's instances split only when asked) and unsplit."""
    import taca

    for var in ("TACA_FWD_MASK", "TACA_FWD_KT_ARRIVE", "TACA_FWD_OVERLAP", "TACA_FWD_SPLIT", "TACA_FWD_SPLIT_FORM"):
        monkeypatch.delenv(var, raising=False)
    if split is not None:
        monkeypatch.setenv("TACA_FWD_SPLIT", split)
    q, k, v, kw = _feat_inputs(B, H, 512, 4096, True, mk, seed=5)

    def call():
        return taca.joint_attention(q, k, v, backend="cuda", return_lse=True, return_text_mass=True, **kw)

    monkeypatch.setenv("TACA_FWD_OVERLAP", "1")
    _check_feat_ref(call(), q, k, v, kw)
    monkeypatch.delenv("TACA_FWD_OVERLAP")
    _check_overlap_forms(call, call(), False, monkeypatch)


PVW_DEFAULT = 1  # the D = 128 default's form when TACA_FWD_PVW is unset (1: PVW)
FORM_CASES = [
    # B, H, L, n_img, text_first, dtype, layout, noncontig, TACA_FWD_OVERLAP (None: the default by key count)
    (1, 24, 512, 4096, True, torch.bfloat16, "bnhd", True, None),  # FLUX 1024, diffusers' view: overlap + tail split
    (2, 3, 333, 4000, False, torch.float16, "bhnd", False, "0"),  # ragged last tiles, text last, per-sample gamma
    (1, 2, 77, 15284, True, torch.bfloat16, "bhnd", False, None),  # past the overlap's key count
    (1, 3, 40, 100, True, torch.bfloat16, "bhnd", False, "1"),  # one partial key tile
    (2, 2, 300, 1000, True, torch.bfloat16, "bhnd", False, "0"),  # 300 text keys: uniform text tiles and mixed ones
]


@pytest.mark.skipif(not _PUBLIC, reason="the public op has no CUDA kernel")
@pytest.mark.parametrize("case", FORM_CASES, ids=lambda c: f"B{c[0]}-H{c[1]}-N{c[2] + c[3]}-{c[5]}-ov{c[8]}")
def test_forward_forms(case, monkeypatch):
    """The D = 128 default's forms (WsCfg's FORM): PVW (P V as one m64n128k16 wgmma per 16 keys over both column blocks
    of V; TACA_FWD_PVW=1, and unset PVW_DEFAULT) and TACA_FWD_PVW=0 (two m64n64k16): the tolerance rule against the fp32
    reference by default, (out, lse, text_mass) of both forms bitwise the default's (the same fp32 operations on every
    value), and on sm_90 the kernels launched carry the form asked for. TACA_FWD_LZ=1 (the lazy running max): the
    tolerance rule, with and without keys that move the max late, and bitwise across TACA_FWD_PVW=1 / 0 / unset
    (forms 7, 6)."""
    B, H, L, n_img, tf, dtype, layout, nc, ov = case
    for name in ("TACA_FWD_PVW", "TACA_FWD_LZ"):
        monkeypatch.delenv(name, raising=False)
    if ov is None:
        monkeypatch.delenv("TACA_FWD_OVERLAP", raising=False)
    else:
        monkeypatch.setenv("TACA_FWD_OVERLAP", ov)
    q, k, v, out, gamma = check_case("op", B, H, L, n_img, 128, tf, dtype, layout=layout, noncontig=nc)

    def call():
        return run_kernel("op", q, k, v, text_len=L, text_first=tf, gamma=gamma, layout=layout)

    default = call()
    assert torch.equal(default[0], out)
    _check_env_forms(call, default, "TACA_FWD_PVW", (("0", 0), ("1", 1), (None, PVW_DEFAULT)), _fwd_form_flags,
                     monkeypatch)
    # TACA_FWD_LZ=1 (IL with the lazy running max, forms 6 and 7): not bitwise the default (its exponentials are taken
    # against a stale max), so the tolerance rule; a run of large keys late in the sequence moves the max past the
    # threshold mid-row (the rescale branch), the first tile always does
    monkeypatch.setenv("TACA_FWD_LZ", "1")

    def late_keys(q_, k_, v_):
        n = k_.shape[1] if layout == "bnhd" else k_.shape[2]
        sl = slice(n - 40, n - 30)
        (k_[:, sl] if layout == "bnhd" else k_[:, :, sl]).mul_(6.0)

    for edit in (None, late_keys):
        # (rebinds q, k, v, gamma: call() runs on this case's inputs)
        q, k, v, _, gamma = check_case("op", B, H, L, n_img, 128, tf, dtype, layout=layout, noncontig=nc, edit=edit)
        # LZ with and without PVW (forms 7 and 6): the same exponentials and sums, only P V's wgmma shape differs
        _check_env_forms(call, call(), "TACA_FWD_PVW", (("1", 7), ("0", 6), (None, 6 + PVW_DEFAULT)), _fwd_form_flags,
                         monkeypatch)


def _feat_inputs(B, H, L, n_img, tf, mk, seed):
    """Random bf16 (B, H, N, 128) q, k, v and the op's keyword arguments for the feature instances: text_len (a list:
    per-sample spans), text_first, per-sample gamma, and attn_mask by `mk`: None; "bool", a (B, 1, 1, N) key mask
    padding sample 1's text keys from the 151st (text first) or the 41st (text last) on; "float", a -1.5 bias on every
    7th key and a -inf run; "elem", a random per-query (B, 1, N, N) bool mask (key 0 always attended)."""
    Lmax = max(L) if isinstance(L, list) else L
    N = Lmax + n_img
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, 128, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(3))
    kw = dict(text_len=torch.tensor(L, device="cuda") if isinstance(L, list) else L, text_first=tf,
              gamma=torch.linspace(1.2, 1.5, B, device="cuda"))
    if mk == "bool":
        m = torch.ones(B, 1, 1, N, dtype=torch.bool, device="cuda")
        if B > 1:
            m[1, ..., (150 if tf else N - Lmax + 40):(Lmax if tf else N)] = False  # sample 1's padded text
        kw["attn_mask"] = m
    elif mk == "float":
        m = torch.zeros(B, 1, 1, N, device="cuda")
        m[..., ::7] = -1.5
        m[..., 500:520] = float("-inf")
        kw["attn_mask"] = m
    elif mk == "elem":
        m = torch.rand(B, 1, N, N, device="cuda", generator=gen) > 0.1
        m[..., 0] = True
        kw["attn_mask"] = m
    return q, k, v, kw


def _check_feat_ref(got, q, k, v, kw):
    """The op's (out, lse, text_mass) against the fp32 reference: out by the tolerance rule (split SDPA's error), lse
    finite and within 2e-3, text_mass within 5e-3 (the feature tests' bounds)."""
    qf, kf, vf = (t.float() for t in (q, k, v))
    ref, lse_r, tm_r = reference.attention_ref(qf, kf, vf, upcast=torch.float32, **kw)
    tor = reference.attention_split_sdpa(q, k, v, **kw)
    out, lse, tm = got
    err, base = (out.float() - ref).abs().max().item(), (tor.float() - ref).abs().max().item()
    assert err <= 2 * base + 1e-5, f"out: {err:.3g} > 2 x {base:.3g} + 1e-5"
    assert torch.isfinite(lse).all() and (lse - lse_r).abs().max().item() < 2e-3
    assert (tm - tm_r).abs().max().item() < 5e-3


SPLIT_FEAT_CASES = [
    # B, text_len (per sample: a list), n_img, text_first, key mask (None, "bool": sample 1's text padded, "float":
    # a -1.5 bias on every 7th key and a -inf run), TACA_FWD_SPLIT ("": unset, the default), TACA_FWD_SPLIT_FORM
    (2, [512, 300], 4096, True, None, "range", "one"),  # per-sample spans (FLUX-like, padding-free prompts)
    (2, 512, 4096, True, "bool", "range", "one"),  # a padded prompt's key mask: the per-tile terms (MK_KEY)
    (2, 512, 4096, True, "bool", "", "one"),  # unset: a key mask's instances do not split (opt-in: slower)
    (2, [512, 300], 4096, True, None, "", "one"),  # unset: per-sample spans split where the model expects a gain
    (1, 333, 4000, False, "float", "range", "two"),
    (2, [77, 200], 1025, False, "bool", "3", "one"),  # spans and a key mask, 9 key tiles in 3 ranges
]


@pytest.mark.skipif(not _PUBLIC, reason="the public op has no CUDA kernel (the split takes its workspace)")
@pytest.mark.parametrize("case", SPLIT_FEAT_CASES,
                         ids=lambda c: f"B{c[0]}-img{c[2]}-{c[4] or 'spans'}-split{c[5] or 'default'}-{c[6]}")
def test_forward_tail_split_features(case, monkeypatch):
    """The tail split in the D = 128 forward's feature instances: per-sample spans (unset: where the plain kernel's
    model splits), and a key mask's per-tile terms (a (B, 1, 1, N) mask; opt-in, TACA_FWD_SPLIT set; unset, unsplit). Against the fp32 reference:
    out by the tolerance rule (split SDPA's error), lse and text_mass within the feature tests' bounds; two calls
    bitwise equal; every whole item bitwise the unsplit kernel's (TACA_FWD_SPLIT=0) and, on sm_90, the split items'
    lse not (the path ran; a key mask unset: equal everywhere)."""
    import taca

    B, L, n_img, tf, mk, parts, form = case
    Lmax = max(L) if isinstance(L, list) else L
    N = Lmax + n_img
    H = split_heads(N, B, range_form=parts == "range", default=not parts)
    assert H is not None
    for var in ("TACA_FWD_MASK", "TACA_FWD_KT_ARRIVE"):
        monkeypatch.delenv(var, raising=False)
    q, k, v, kw = _feat_inputs(B, H, L, n_img, tf, mk, seed=7)

    def run():
        return taca.joint_attention(q, k, v, backend="cuda", return_lse=True, return_text_mass=True, **kw)

    if parts:
        monkeypatch.setenv("TACA_FWD_SPLIT", parts)
    else:
        monkeypatch.delenv("TACA_FWD_SPLIT", raising=False)
    monkeypatch.setenv("TACA_FWD_SPLIT_FORM", form)
    split = [run() for _ in range(2)]
    monkeypatch.setenv("TACA_FWD_SPLIT", "0")
    plain = run()
    _check_feat_ref(split[0], q, k, v, kw)
    _check_split(split, plain, B, H, N, expect_split=bool(parts) or mk is None)  # unset: a key mask's items whole


PVW_FEAT_CASES = [
    # B, H, text_len (a list: per-sample spans), n_img, text_first, mask (None; "bool": sample 1's text padded, a key
    # mask's per-tile terms; "float": a bias and a -inf run on keys; "elem": a per-query (B, 1, N, N) mask, read per
    # element), env (TACA_FWD_OVERLAP / TACA_FWD_SPLIT / TACA_FWD_MASK / TACA_FWD_KT_ARRIVE settings)
    (2, 3, [512, 300], 1500, True, None, {}),  # spans, the overlapped instance (the default)
    (2, 3, [512, 300], 1500, True, None, {"TACA_FWD_OVERLAP": "0"}),  # spans, not overlapped
    (2, 3, [77, 200], 1025, False, None, {"TACA_FWD_SPLIT": "range"}),  # spans, the tail split's key ranges
    (2, 3, 512, 1500, True, "bool", {}),  # a padded prompt: MK_KEY with the per-tile arrive (KTA)
    (2, 3, 512, 1500, True, "bool", {"TACA_FWD_KT_ARRIVE": "lane0", "TACA_FWD_SPLIT": "0"}),  # MK_KEY, lane 0
    (1, 2, 333, 1200, False, "float", {"TACA_FWD_SPLIT": "3"}),  # a float key mask, split into 3 ranges
    (2, 2, 300, 700, True, "elem", {}),  # a per-query mask: MK_ANY
]


@pytest.mark.skipif(not _PUBLIC, reason="the public op has no CUDA kernel")
@pytest.mark.parametrize("case", PVW_FEAT_CASES,
                         ids=lambda c: f"B{c[0]}-img{c[3]}-{c[5] or 'spans'}-" + "-".join(f"{k[9:]}{v}" for k, v in c[6].items()))
def test_forward_pvw_features(case, monkeypatch):
    """PVW (P V as m64n128k16 wgmmas, the D = 128 default's form) in the instances with per-sample spans or a mask
    (TACA_FWD_PVW=1; unset, PVW_DEFAULT as the plain instances'): out by the tolerance rule against the fp32 reference,
    lse and text_mass within the feature tests' bounds; every output bitwise the m64n64k16 form's (TACA_FWD_PVW=0: the
    same fp32 operations) and the unset default's; on sm_90 the kernels launched carry FORM 1 with TACA_FWD_PVW=1, 0
    with TACA_FWD_PVW=0, PVW_DEFAULT unset."""
    import taca

    B, H, L, n_img, tf, mk, env = case
    for var in ("TACA_FWD_MASK", "TACA_FWD_KT_ARRIVE", "TACA_FWD_OVERLAP", "TACA_FWD_SPLIT", "TACA_FWD_SPLIT_FORM",
                "TACA_FWD_PVW", "TACA_FWD_LZ"):
        monkeypatch.delenv(var, raising=False)
    for var, val in env.items():
        monkeypatch.setenv(var, val)
    q, k, v, kw = _feat_inputs(B, H, L, n_img, tf, mk, seed=11)

    def run():
        return taca.joint_attention(q, k, v, backend="cuda", return_lse=True, return_text_mass=True, **kw)

    monkeypatch.setenv("TACA_FWD_PVW", "1")
    pvw = run()
    _check_feat_ref(pvw, q, k, v, kw)
    _check_env_forms(run, pvw, "TACA_FWD_PVW", (("1", 1), ("0", 0), (None, PVW_DEFAULT)), _fwd_form_flags, monkeypatch)


@pytest.mark.skipif(not _CTYPES, reason="TACA_CUDA_LIB not built")
def test_unaligned_pointers_and_strides():
    # base pointer 2 bytes off 16-byte alignment and odd token strides: the element-wise path
    B, N, H, D = 2, 700, 3, 64
    bufs = [torch.randn(B * N * (H * D + 1) + 1, device="cuda").to(torch.bfloat16) for _ in range(3)]
    q, k, v = (b[1:].view(B, N, H * D + 1)[..., : H * D].view(B, N, H, D) for b in bufs)
    assert q.data_ptr() % 16 != 0 and q.stride(1) % 8 != 0
    out, lse, tm = taca_ctypes.fwd(q, k, v, text_len=77, text_first=True, gamma=1.3, layout="bnhd")
    ref, rlse, rtm = reference.attention_ref(q, k, v, text_len=77, gamma=1.3, layout="bnhd",
                                             upcast=torch.float32)
    so = reference.attention_split_sdpa(q, k, v, text_len=77, gamma=1.3, layout="bnhd")
    tol = 2 * (so.float() - ref).abs().max().item() + 1e-5
    assert (out.float() - ref).abs().max().item() <= tol
    assert (lse - rlse).abs().max().item() < 1e-3 and (tm - rtm).abs().max().item() < 1e-3


@pytest.mark.skipif(not _CTYPES, reason="TACA_CUDA_LIB not built")
def test_poisoned_output_outside_view_untouched():
    # out is a strided view into a poisoned buffer: every element of the view is written and
    # nothing between the rows is.
    B, N, H, D = 1, 513, 2, 128
    q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=torch.float16) for _ in range(3))
    big = torch.full((B, N, H, D + 64), float("nan"), device="cuda", dtype=torch.float16)
    out = big[..., :D]
    taca_ctypes.fwd(q, k, v, text_len=1, text_first=False, gamma=2.0, layout="bnhd", out=out)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    assert torch.isnan(big[..., D:]).all()


@pytest.mark.skipif(not _CTYPES, reason="TACA_CUDA_LIB not built")
# 1..5: mma.sync tilings; 6: the mma.sync default (the default path off Hopper); 0, 7..14: the
# Hopper wgmma tilings where the device runs sm_90a code (otherwise they fall back to mma.sync);
# at D = 128 and 64, 0 = 10 (persistent), 11, 12 and 14 (one CTA per item) are the warp-specialized
# TMA kernels, 13 the cp.async one; 15 and 16 the warp-specialized kernel with wider key tiles (160 / 192
# keys at D = 128, 192 / 160 at D = 64); 17 three consumer warpgroups (the D = 64 default), 18 D = 64's two-consumer
# kernel with the key tile by count.
@pytest.mark.parametrize("variant", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("text_first", [False, True])
def test_tiling_variants(variant, D, text_first):
    q, k, v = (torch.randn(2, 2, 1111, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    g = torch.tensor([1.2, 1.5], device="cuda")
    out, lse, tm = taca_ctypes.fwd(q, k, v, text_len=333, text_first=text_first, gamma=g, variant=variant)
    ref, rlse, rtm = reference.attention_ref(q, k, v, text_len=333, text_first=text_first, gamma=g,
                                             upcast=torch.float32)
    so = reference.attention_split_sdpa(q, k, v, text_len=333, text_first=text_first, gamma=g)
    assert (out.float() - ref).abs().max().item() <= 2 * (so.float() - ref).abs().max().item() + 1e-5
    assert (lse - rlse).abs().max().item() < 1e-3 and (tm - rtm).abs().max().item() < 1e-3


# The warp-specialized kernels (variants 10..12 and 14..16 at D = 128 and 64, where 0 = 10 is the
# default, persistent: one CTA per SM walks the (query tile, head, batch) items, the K / V ring and
# the ping-pong turns continue across items, two Q buffers; 14 is one CTA per item): TMA maps over
# arbitrary strides, mbarrier ring, turns that must pair up for any number of key tiles. The D = 64
# and 128 cases above plus the edges that stress them: one key tile, N one past a tile, text only,
# 3 heads x 3 samples (per-sample gamma; 315 items: on a 132-SM H100 / H200 some CTAs take 3, so
# a Q buffer is reused), strided views of both layouts.
def _ws_case_id(c):
    return f"B{c[0]}H{c[1]}-L{c[2]}-img{c[3]}-D{c[4]}-{'tf' if c[5] else 'tl'}-{str(c[6])[6:]}-{c[7]}{'-view' if c[8] else ''}"


WS_CASES = [c for c in CASES if c[4] in (64, 128)] + [
    (1, 2, 0, 128, D, True, torch.bfloat16, "bhnd", False) for D in (64, 128)] + [
    (1, 2, 77, 52, D, False, torch.float16, "bnhd", True) for D in (64, 128)] + [
    (3, 3, 333, 4096, D, False, torch.bfloat16, "bhnd", True) for D in (64, 128)] + [
    (2, 1, 512, 257, D, True, torch.float16, "bnhd", True) for D in (64, 128)] + [
    (1, 2, 300, 0, 128, False, torch.bfloat16, "bhnd", False),
] + [
    # text / image boundary mid-tile on an 8-key group and a ragged last tile (TILE_GROUP) at every key tile
    (2, 2, 200, 1000, D, tf, dt, lay, nc) for D in (64, 128)
    for tf, dt, lay, nc in ((True, torch.bfloat16, "bhnd", False), (False, torch.float16, "bnhd", True))
]


@pytest.mark.skipif(not _CTYPES, reason="TACA_CUDA_LIB not built")
@pytest.mark.parametrize("variant", [0, 10, 11, 12, 14, 15, 16, 17, 18])  # 0 (= 17 at D = 64): three consumers; 18: two, key tile by count
@pytest.mark.parametrize("case", WS_CASES, ids=_ws_case_id)
def test_ws_variants_match_reference(variant, case):
    B, H, L, n_img, D, tf, dtype, layout, nc = case
    check_case("ctypes", B, H, L, n_img, D, tf, dtype, layout=layout, noncontig=nc, variant=variant)


@pytest.mark.skipif(not _CTYPES, reason="TACA_CUDA_LIB not built")
@pytest.mark.parametrize("variant", [0, 10, 11, 12, 14, 15, 16, 17, 18])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("text_first", [True, False])
def test_ws_variants_gamma_reverse(variant, D, text_first):
    check_case("ctypes", 2, 2, 77, 1025, D, text_first, torch.bfloat16, gamma_reverse=0.7, variant=variant)
    check_case("ctypes", 1, 2, 333, 97, D, text_first, torch.float16, gamma_reverse=1.5, per_sample=False,
               variant=variant)
    check_case("ctypes", 2, 2, 200, 1000, D, text_first, torch.bfloat16, gamma_reverse=0.7, variant=variant)


# The warp-specialized kernel at D = 256 (ctypes variant 10, opt-in since the forty-seventh session; aligned 200..248
# zero-filled): two consumers of 64 rows, 64-key tiles, one CTA per item. The D = 256 / 224 cases above and the WS
# edges: one key tile, fewer keys than a tile, text only, many key tiles and items in a strided view, a zero-filled
# head dim in a (B, N, H, D) slice of wider storage.
WS256_CASES = [c for c in CASES if c[4] in (224, 256)] + [
    (1, 2, 0, 64, 256, True, torch.bfloat16, "bhnd", False),
    (1, 2, 77, 52, 256, False, torch.float16, "bnhd", True),
    (1, 2, 300, 0, 256, False, torch.bfloat16, "bhnd", False),
    (3, 3, 333, 4096, 256, False, torch.bfloat16, "bhnd", True),
    (2, 2, 200, 1000, 208, True, torch.bfloat16, "bnhd", True),
]


@pytest.mark.skipif(not _CTYPES, reason="TACA_CUDA_LIB not built")
@pytest.mark.parametrize("case", WS256_CASES, ids=_ws_case_id)
def test_ws_d256_matches_reference(case):
    B, H, L, n_img, D, tf, dtype, layout, nc = case
    check_case("ctypes", B, H, L, n_img, D, tf, dtype, layout=layout, noncontig=nc, variant=10)


@pytest.mark.skipif(not _CTYPES, reason="TACA_CUDA_LIB not built")
@pytest.mark.parametrize("text_first", [True, False])
def test_ws_d256_gamma_reverse(text_first):
    check_case("ctypes", 2, 2, 77, 1025, 256, text_first, torch.bfloat16, gamma_reverse=0.7, variant=10)
    check_case("ctypes", 1, 2, 333, 97, 256, text_first, torch.float16, gamma_reverse=1.5, per_sample=False, variant=10)


@pytest.mark.skipif(not _CTYPES, reason="TACA_CUDA_LIB not built")
@pytest.mark.parametrize("scale", [-0.05, 0.0, 0.3])
@pytest.mark.parametrize("L", [77, 80])
def test_scale_sign(scale, L):
    # negative / zero scale: uniform key tiles must fall back to the explicit-multiply path; L = 80 puts
    # the boundary mid-tile on an 8-key group and N = 900 leaves the last tile ragged (TILE_GROUP at scale 0:
    # the keys past N are -inf times a zero multiplier there)
    q, k, v = (torch.randn(2, 2, 900, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    g = torch.tensor([1.2, 1.5], device="cuda")
    out, lse, tm = taca_ctypes.fwd(q, k, v, text_len=L, text_first=True, gamma=g, scale=scale)
    ref, rlse, rtm = reference.attention_ref(q, k, v, text_len=L, gamma=g, scale=scale,
                                             upcast=torch.float32)
    # The fused SDPA backends return NaN for scale <= 0 (seen on H100, torch 2.11: they take
    # the row max of the unscaled scores), so the baseline here is SDPA's math backend.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        so = reference.attention_split_sdpa(q, k, v, text_len=L, gamma=g, scale=scale)
    base = (so.float() - ref).abs().max().item()
    assert math.isfinite(base)
    assert (out.float() - ref).abs().max().item() <= 2 * base + 1e-5
    assert (lse - rlse).abs().max().item() < 1e-3 and (tm - rtm).abs().max().item() < 1e-3


@pytest.mark.skipif(not _CTYPES, reason="TACA_CUDA_LIB not built")
def test_status_codes():
    q = torch.randn(1, 2, 64, 64, device="cuda")
    o = torch.empty_like(q)
    lse = torch.empty(1, 2, 64, device="cuda")
    assert taca_ctypes.fwd_status(q, q, q, o, lse, None, text_len=3) == 7  # F32: TACA_ERR_DTYPE
    qh = q.half()
    assert taca_ctypes.fwd_status(qh, qh, qh, o.half(), lse, None, text_len=3, gamma_reverse=-1.0) == 5
    assert taca_ctypes.fwd_status(qh, qh, qh, o.half(), lse, None, text_len=3) == 0
    assert taca_ctypes.load().taca_last_cuda_error() is not None
