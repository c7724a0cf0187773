"""CUDA backward kernel (csrc/cuda/taca_bwd.cu) against the float32 reference's gradients.

Tolerance rule (STYLE.md): for dq, dk and dv, the kernel's max error against the gradients of
the materialized float32 reference (taca.reference.attention_ref under autograd) is at most
2x the error of PyTorch's own low-precision SDPA (the exact split form
taca.reference.attention_split_sdpa on the same bf16/fp16 inputs) against that reference,
plus 1e-5. The kernel gets out (cast to the input dtype) and lse from the reference, so these
tests check the backward alone; test_public_op_fwd_bwd checks the two kernels together.
On an H100 (sm_90) with an sm_90a build, aligned D = 64 and 72..128 inputs run the wgmma kernel
(csrc/cuda/taca_bwd_sm90.cu); test_mma_sync_path forces the mma.sync kernel on the same cases
with TACA_BWD_SM90=0 so both stay tested, and test_sm90_handoff_modes the wgmma kernel's other
dQ hand-offs (TACA_BWD_SM90_HANDOFF) against the default one, bitwise.
Skipped without CUDA or without the CUDA build of taca._C.
"""
from __future__ import annotations

import zlib

import pytest
import torch

from taca import reference

try:
    from taca import ops

    _HAVE = torch.cuda.is_available() and ops.HAVE_CUDA_KERNEL
except Exception:  # pragma: no cover - extension import problems mean: skip
    _HAVE = False

pytestmark = pytest.mark.skipif(not _HAVE, reason="needs CUDA and taca._C built with CUDA")

BF16, FP16 = torch.bfloat16, torch.float16

# (B, H, text_len, image tokens, D, text_first, dtype, gamma, gamma_reverse, storage)
# storage "bnhd": contiguous (B, N, H, D); "bhnd": (B, N, H, D) views of (B, H, N, D) storage.
CASES = [
    (1, 2, 512, 4096, 128, True, BF16, 1.2, 1.0, "bnhd"),  # FLUX 1024 shape class
    (2, 2, 333, 4096, 64, False, FP16, [1.3, 0.9], 1.1, "bhnd"),  # SD3.5 cfg class
    (1, 3, 77, 1025, 96, True, BF16, 1.25, 0.8, "bhnd"),
    (2, 1, 1, 97, 40, False, FP16, [1.2, 1.5], 1.0, "bnhd"),
    (1, 2, 0, 1025, 128, True, FP16, 1.2, 1.0, "bnhd"),
    (1, 1, 512, 1, 256, False, BF16, 1.4, 1.2, "bhnd"),
    (1, 2, 333, 97, 33, True, BF16, 1.2, 1.0, "bnhd"),  # odd D: scalar load/store paths
    (2, 2, 77, 1, 64, True, BF16, [1.1, 1.6], 0.7, "bhnd"),
    (1, 2, 1, 4096, 64, False, BF16, 1.2, 1.0, "bnhd"),
    (1, 1, 512, 97, 200, True, FP16, 1.3, 1.0, "bnhd"),  # two D-chunks of 128
    (1, 2, 77, 20, 128, False, BF16, 1.3, 0.9, "bnhd"),  # one key tile (no dQ chains), D=128
    (2, 1, 200, 313, 128, True, FP16, [0.8, 1.4], 1.2, "bhnd"),  # N=513: 5 key tiles, tail of 1
    # D = 136..256 on Hopper: the wgmma kernel (taca_bwd_sm90_d256.cu; 64 x 64 tiles): AuraFlow's class (N = 1364:
    # 22 key and 22 query tiles, the skew on), D = 224 zero-filled columns with text last
    (2, 2, 264, 1100, 256, True, BF16, [1.2, 1.3], 1.0, "bhnd"),
    (1, 3, 77, 1000, 224, False, FP16, 1.3, 0.9, "bnhd"),
]


def _ids(c):
    B, H, L, img, D, tf, dt, g, gr, st = c
    return f"B{B}H{H}-L{L}-img{img}-D{D}-{'first' if tf else 'last'}-{str(dt)[6:]}-{st}"


def _make(shape_bnhd, dtype, storage, gen):
    B, N, H, D = shape_bnhd
    if storage == "bnhd":
        x = torch.randn(B, N, H, D, generator=gen, device="cuda", dtype=torch.float32)
    else:
        x = torch.randn(B, H, N, D, generator=gen, device="cuda", dtype=torch.float32).transpose(1, 2)
    return x.to(dtype)


def _poison_allocator(shape, dtype, count=3):
    """Leave NaN-filled blocks of this size in the caching allocator, so outputs that the op
    allocates with empty() most likely start as NaN (the op owns its output allocation)."""
    blocks = [torch.full(shape, float("nan"), device="cuda", dtype=dtype) for _ in range(count)]
    del blocks


def _ref_grads(q, k, v, dout, **kw):
    qf, kf, vf = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    out, lse, _ = reference.attention_ref(qf, kf, vf, layout="bnhd", upcast=torch.float32, **kw)
    out.backward(dout.float())
    return out.detach(), lse.detach(), (qf.grad, kf.grad, vf.grad)


def _sdpa_grads(q, k, v, dout, **kw):
    ql, kl, vl = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    o = reference.attention_split_sdpa(ql, kl, vl, layout="bnhd", **kw)
    o.backward(dout)
    return ql.grad, kl.grad, vl.grad


def _ulp_excess(a, b, ulps=2):
    """How far |a - b| goes beyond `ulps` units in the last place of b's dtype at b's values (eps = one unit at 1),
    plus eps x max|b| x 2^-10 for values near 0; <= 0: within."""
    eps = torch.finfo(b.dtype).eps
    bound = ulps * eps * b.float().abs() + eps * b.float().abs().max() * 2 ** -10
    return ((a.float() - b.float()).abs() - bound).max().item()


def _check_rule(got, sdpa, ref, names=("dq", "dk", "dv")):
    msgs = []
    for name, g, s, r in zip(names, got, sdpa, ref):
        assert torch.isfinite(g).all(), f"{name}: non-finite values (unwritten or NaN)"
        err = (g.float() - r).abs().max().item()
        base = (s.float() - r).abs().max().item()
        msgs.append(f"{name} err={err:.3g} sdpa={base:.3g}")
        assert err <= 2 * base + 1e-5, f"{name}: kernel error {err:.4g} > 2 x SDPA error {base:.4g} + 1e-5"
    return "; ".join(msgs)


def _run_case(case, reps=2):
    """Reference, split-SDPA and `reps` kernel gradients of one CASES entry."""
    B, H, L, img, D, text_first, dtype, gamma, gamma_reverse, storage = case
    N = L + img
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(_ids(case).encode()))
    q, k, v, dout = (_make((B, N, H, D), dtype, storage, gen) for _ in range(4))
    gamma_t = torch.tensor(gamma if isinstance(gamma, list) else [gamma] * B, device="cuda",
                           dtype=torch.float32)
    kw = dict(text_len=L, text_first=text_first, gamma=gamma_t, gamma_reverse=gamma_reverse)
    out_ref, lse_ref, ref = _ref_grads(q, k, v, dout, **kw)
    sdpa = _sdpa_grads(q, k, v, dout, **kw)

    tb, te = reference.text_range(N, L, text_first)
    out = out_ref.to(dtype)
    scale = D ** -0.5
    runs = []
    for _ in range(reps):
        _poison_allocator((B, N, H, D), dtype)
        runs.append(torch.ops.taca.bwd(dout, q, k, v, out, lse_ref, gamma_t, float(gamma_reverse),
                                       scale, tb, te))
    torch.cuda.synchronize()
    for name, a, b in zip(("dq", "dk", "dv"), runs[0], runs[-1]):
        assert torch.equal(a, b), f"{name}: two runs differ (the backward must be deterministic)"
        assert a.shape == (B, N, H, D) and a.dtype == dtype
    _check_rule(runs[0], sdpa, ref)
    return runs[0]


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_bwd_matches_reference(case):
    _run_case(case)


MMA_SYNC_CASES = [c for c in CASES if c[4] in (64, 96, 128) and c[0] * c[1] * (c[2] + c[3]) <= 9000]


@pytest.mark.parametrize("case", MMA_SYNC_CASES, ids=[_ids(c) for c in MMA_SYNC_CASES])
def test_mma_sync_path(case, monkeypatch):
    """TACA_BWD_SM90=0 forces the mma.sync kernel where the wgmma one would run (sm_90a build
    on an H100): it must meet the rule and be deterministic too. (On the H100 the two paths
    gave bitwise-equal gradients: same fp32 operations in the same order, k16 steps, same
    query-tile and chain order. Not asserted: tensor-core rounding inside a k16 step is not
    specified to match between mma.sync and wgmma.)"""
    monkeypatch.setenv("TACA_BWD_SM90", "0")
    _run_case(case)


HANDOFF_CASES = [c for c in MMA_SYNC_CASES if (c[2] + c[3]) > 256]  # several key and query tiles


@pytest.mark.parametrize("mode", ["mbarrier", "mbarrier-eager", "rendezvous", "arrive", "none"])
@pytest.mark.parametrize("case", HANDOFF_CASES, ids=[_ids(c) for c in HANDOFF_CASES])
def test_sm90_handoff_modes(case, mode, monkeypatch):
    """The wgmma kernel's other dQ hand-offs (TACA_BWD_SM90_HANDOFF; the default is "bulk", TMA
    bulk reduce-adds: "mbarrier" = per-thread red.add, "mbarrier-eager" = that releasing each tile
    at once, "rendezvous" / "arrive" = named
    barriers (v4c / v4b), "none" = no writer warpgroup, v4a) meet the rule, are deterministic,
    and give the default path's gradients bitwise: the same fp32 adds in the same chain order.
    (Off sm_90 the knob is ignored.)"""
    monkeypatch.setenv("TACA_BWD_SM90_KERNEL", "v5")  # the hand-offs are v5's (v6 has "bulk" only)
    default = _run_case(case)
    monkeypatch.setenv("TACA_BWD_SM90_HANDOFF", mode)
    got = _run_case(case)
    for name, a, b in zip(("dq", "dk", "dv"), got, default):
        assert torch.equal(a, b), f"{name}: hand-off {mode!r} differs from the default hand-off"


@pytest.mark.parametrize("writer", ["rows", "tensor"])
@pytest.mark.parametrize("case", HANDOFF_CASES, ids=[_ids(c) for c in HANDOFF_CASES])
def test_sm90_v6_kernel(case, writer, monkeypatch):
    """The v6 Hopper kernel (the default; TACA_BWD_SM90_KERNEL=v6 forces it: producer warp, FA3's
    GEMM order, two writer warps) with either dQ writer (TACA_BWD_V6_WRITER: one TMA bulk reduce-add
    per row, the default at D = 72..128, or 2-D tensor reduce-adds, the default at D = 64) meets the
    rule, is deterministic (_run_case checks both, over three runs), and without its skew
    (TACA_BWD_SKEW=0; test_sm90_v6_skew has the default) gives the v5 kernel's gradients bitwise: the
    same fp32 operations in the same order. (Off sm_90 the knobs are ignored.)"""
    monkeypatch.setenv("TACA_BWD_SM90_KERNEL", "v5")
    default = _run_case(case)
    monkeypatch.setenv("TACA_BWD_SM90_KERNEL", "v6")
    monkeypatch.setenv("TACA_BWD_V6_WRITER", writer)
    monkeypatch.setenv("TACA_BWD_SKEW", "0")
    got = _run_case(case, reps=3)
    for name, a, b in zip(("dq", "dk", "dv"), got, default):
        assert torch.equal(a, b), f"{name}: v6 differs from v5"


def _switch_is_bitwise(case, monkeypatch, var, value, what):
    """Gradients of `case` with the timing switch `var`=`value` (one run), then without it (three
    runs: deterministic): bitwise the same; _run_case checks the rule on both."""
    monkeypatch.setenv(var, value)
    switched = _run_case(case)
    monkeypatch.delenv(var)
    got = _run_case(case, reps=3)
    for name, a, b in zip(("dq", "dk", "dv"), got, switched):
        assert torch.equal(a, b), f"{name}: {what}"


PF_CASES = [c for c in CASES if c[4] == 64 or 72 <= c[4] <= 128]


@pytest.mark.parametrize("case", PF_CASES, ids=[_ids(c) for c in PF_CASES])
def test_sm90_v6_read_ahead(case, monkeypatch):
    """v6 at D = 72..128 with the row writer (the default there) reads the text span once before its tile loop and
    each tile's lse2 / delta rows while the tile's S / dP products run (at D = 64, in the default 1-D grid with the
    tensor writer, the span only); TACA_BWD_V6_PF=0 reads them where they are used. Both meet the rule, are
    deterministic and give the same gradients bitwise (the same values, the same operations); so does the tile
    index divided per tile (TACA_BWD_V6_IX=0) instead of stepped on. (Off sm_90 the knobs are ignored.)"""
    _switch_is_bitwise(case, monkeypatch, "TACA_BWD_V6_PF", "0", "the reads ahead changed the gradients")
    _switch_is_bitwise(case, monkeypatch, "TACA_BWD_V6_IX", "0", "the stepped tile index changed the gradients")


@pytest.mark.parametrize("case", PF_CASES, ids=[_ids(c) for c in PF_CASES])
def test_sm90_v6_dq_staged_next_tile(case, monkeypatch):
    """v6's default instances (more than one key tile, no mask) stage each tile's dQ part at the next tile's top,
    while its S product runs, instead of between that tile's dQ and dK waits: the default at D = 72..128
    (TACA_BWD_V6_DS=0 turns it off), a switch at D = 64 (TACA_BWD_V6_DS=1 turns it on). The same values staged in
    the same order: both forms meet the rule, are deterministic and give the same gradients bitwise. (Elsewhere,
    and off sm_90, the knob is ignored.)"""
    value = "0" if 72 <= case[4] <= 128 else "1"  # the form that is not the default
    monkeypatch.setenv("TACA_BWD_V6_DF", "0")  # DS itself at D = 72..128, not DF (the default there, which replaces it)
    _switch_is_bitwise(case, monkeypatch, "TACA_BWD_V6_DS", value, "staging dQ at the next tile changed the gradients")


@pytest.mark.parametrize("case", PF_CASES, ids=[_ids(c) for c in PF_CASES])
def test_sm90_v6_dq_product_next_tile(case, monkeypatch):
    """v6 at D = 72..128 (more than one key tile, no mask) issues each tile's dQ product at the next tile, after its S
    product (DF, the default there; TACA_BWD_V6_DF=1 turns it on at D = 64), so that the two MMA warpgroups meet at
    no CTA barrier in the loop (dS' published by an mbarrier), with warpgroup 1 started after warpgroup 0's first
    exponentials or, with TACA_BWD_V6_DFLEAD=0, at once; TACA_BWD_V6_DF=0 gives the earlier default at D = 72..128
    (DS: the product in its own tile, staged at the next). The same products of the same operands, staged in the same
    order: every form meets the rule, is deterministic and gives the same gradients bitwise. (Elsewhere, and off
    sm_90, the knobs are ignored.)"""
    value = "0" if 72 <= case[4] <= 128 else "1"  # the form that is not the default
    _switch_is_bitwise(case, monkeypatch, "TACA_BWD_V6_DF", value, "the dQ product at the next tile changed the gradients")
    monkeypatch.setenv("TACA_BWD_V6_DF", "1")
    _switch_is_bitwise(case, monkeypatch, "TACA_BWD_V6_DFLEAD", "0", "DF without its lead changed the gradients")


D2_CASES = [c for c in PF_CASES if c[4] == 64]


@pytest.mark.parametrize("case", D2_CASES, ids=[_ids(c) for c in D2_CASES])
def test_sm90_v6_two_ds_buffers(case, monkeypatch):
    """v6 at D = 64 with DF and two dS' buffers (TACA_BWD_V6_D2=1, a switch; more than one key tile, no mask): tile
    it's dS' goes to buffer it & 1, its store waits for tile it - 2's dQ products, so the two MMA warpgroups may drift
    further apart. The same products of the same operands staged in the same order: with and without DF's lead it
    meets the rule, is deterministic and gives the default's gradients bitwise. (Elsewhere, and off sm_90, the knob
    is ignored.)"""
    _switch_is_bitwise(case, monkeypatch, "TACA_BWD_V6_D2", "1", "two dS' buffers changed the gradients")
    monkeypatch.setenv("TACA_BWD_V6_DFLEAD", "0")
    _switch_is_bitwise(case, monkeypatch, "TACA_BWD_V6_D2", "1", "two dS' buffers without the lead changed the gradients")


GRID_CASES = [c for c in HANDOFF_CASES if c[4] == 64]


@pytest.mark.parametrize("case", GRID_CASES, ids=[_ids(c) for c in GRID_CASES])
def test_sm90_v6_grid_1d(case, monkeypatch):
    """v6 at D = 64 runs on a 1-D grid (the default: the CTA decodes its key tile, KV head and
    batch from blockIdx.x); TACA_BWD_V6_GRID=3d forces the 3-D grid. Both meet the rule, are
    deterministic, and give the same gradients bitwise (same CTAs, same work). (Off sm_90 the
    knob is ignored.)"""
    _switch_is_bitwise(case, monkeypatch, "TACA_BWD_V6_GRID", "3d", "the 1-D grid differs from the 3-D grid")


DKV_CASES = [c for c in CASES if c[4] in (64, 96, 128)]


@pytest.mark.parametrize("case", DKV_CASES, ids=[_ids(c) for c in DKV_CASES])
def test_sm90_v6_dkv_by_tma(case, monkeypatch):
    """v6 stores dK and dV either through shared memory with TMA tensor stores (the default;
    a key tile's last rows past Nk and columns past D are clipped by the copy engine) or
    straight from the fragments; TACA_BWD_V6_DKV=tma / frag forces one. Both meet the rule, are
    deterministic, and give the same gradients bitwise (same values, same bf16 / fp16 rounding). (Off
    sm_90 the knob is ignored.)"""
    monkeypatch.setenv("TACA_BWD_SM90_KERNEL", "v6")
    monkeypatch.setenv("TACA_BWD_V6_DKV", "frag")
    frag = _run_case(case)
    monkeypatch.setenv("TACA_BWD_V6_DKV", "tma")
    got = _run_case(case, reps=3)
    for name, a, b in zip(("dq", "dk", "dv"), got, frag):
        assert torch.equal(a, b), f"{name}: dK / dV by TMA differ from the fragment stores"


def test_bwd_in_cuda_graph():
    """The backward captured in a CUDA graph (v6 launches its dQ conversion as a programmatic
    dependent of the main kernel) replays to the eager gradients bitwise, and replays with new
    input values: dout halved in place gives exactly half of every gradient (powers of two
    scale exactly through every product and the bf16 roundings)."""
    B, H, L, img, D = 1, 3, 333, 2048, 128
    N = L + img
    gen = torch.Generator(device="cuda").manual_seed(5)
    q, k, v, dout = (_make((B, N, H, D), BF16, "bnhd", gen) for _ in range(4))
    gamma_t = torch.full((B,), 1.2, device="cuda")
    scale = D ** -0.5
    out, lse = torch.ops.taca.fwd(q, k, v, gamma_t, 1.0, scale, 0, L, False)[:2]

    def bwd():
        return torch.ops.taca.bwd(dout, q, k, v, out, lse, gamma_t, 1.0, scale, 0, L)

    eager = bwd()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            bwd()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static = bwd()
    g.replay()
    torch.cuda.synchronize()
    for name, a, b in zip(("dq", "dk", "dv"), static, eager):
        assert torch.equal(a, b), f"{name}: graph replay differs from eager"
    dout.mul_(0.5)
    g.replay()
    torch.cuda.synchronize()
    for name, a, b in zip(("dq", "dk", "dv"), static, eager):
        assert torch.equal(a, b * 0.5), f"{name}: replay with dout / 2 is not half the gradient"


# (B, H, text_len, image tokens, D): FLUX's class with fewer key-tile CTAs than an H100 or H200 has
# SMs (the conversion starts at once and waits on every tile), the same over several waves, D = 64
OVERLAP_SHAPES = [(1, 2, 512, 4096, 128), (2, 6, 333, 4096, 128), (2, 5, 77, 2048, 64)]


@pytest.mark.parametrize("deterministic", [True, False], ids=["det", "nondet"])
@pytest.mark.parametrize("shape", OVERLAP_SHAPES, ids=["B%dH%d-L%d-img%d-D%d" % s for s in OVERLAP_SHAPES])
def test_sm90_v6_dq_overlap(shape, deterministic, monkeypatch):
    """v6 converts dQ tiles while its main kernel's last wave runs (bwd_dq_convert_tiles, a
    programmatic dependent launch that waits on per-tile counters; the default) instead of after
    the kernel (TACA_BWD_DQ_OVERLAP=0). Deterministic: the same sums in the same order, so dq, dk
    and dv equal the converted-after path's bitwise over three runs. Unordered: dk and dv bitwise
    (no atomics), dq within 2 bf16 / fp16 units in the last place of the deterministic dq (the fp32
    adds run in another order, then one rounding): a tile converted before its last key tile's
    CTA added to it would miss 1 / nk of the sum. (Off sm_90, or where v6 does not run, both
    paths are the same one.)"""
    B, H, L, img, D = shape
    N = L + img
    dtype = BF16
    gen = torch.Generator(device="cuda").manual_seed(101 + D + H)
    q, k, v, dout = (_make((B, N, H, D), dtype, "bnhd", gen) for _ in range(4))
    gamma_t = torch.full((B,), 1.2, device="cuda")
    scale = D ** -0.5
    out, lse = torch.ops.taca.fwd(q, k, v, gamma_t, 1.0, scale, 0, L, False)[:2]

    def grads():
        _poison_allocator((B, N, H, D), dtype)
        return torch.ops.taca.bwd(dout, q, k, v, out, lse, gamma_t, 1.0, scale, 0, L,
                                  deterministic=deterministic)

    monkeypatch.setenv("TACA_BWD_DQ_OVERLAP", "0")
    after = torch.ops.taca.bwd(dout, q, k, v, out, lse, gamma_t, 1.0, scale, 0, L, deterministic=True)
    monkeypatch.delenv("TACA_BWD_DQ_OVERLAP")
    runs = [grads() for _ in range(3)]
    for got in runs:
        for name, a, b in zip(("dq", "dk", "dv"), got, after):
            assert torch.isfinite(a).all(), f"{name}: non-finite values (unwritten or NaN)"
            if deterministic or name != "dq":
                assert torch.equal(a, b), f"{name}: overlapped conversion differs from the converted-after path"
            else:
                excess = _ulp_excess(a, b)
                assert excess <= 0, f"dq: unordered overlapped conversion off by {excess:.3g} beyond 2 ulp"


@pytest.mark.parametrize(
    "L,img,D,text_first,dtype",
    [(512, 1025, 128, True, BF16), (333, 1025, 64, False, FP16)],
)
def test_public_op_fwd_bwd(L, img, D, text_first, dtype):
    """taca.joint_attention(backend="cuda") under autograd: forward kernel + backward kernel."""
    B, H, N = 2, 2, L + img
    gen = torch.Generator(device="cuda").manual_seed(7 + D)
    q, k, v = (_make((B, N, H, D), dtype, "bhnd", gen).transpose(1, 2) for _ in range(3))  # bhnd
    dout = torch.randn(q.shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype)
    gamma_t = torch.tensor([1.25, 0.85], device="cuda")
    kw = dict(text_len=L, text_first=text_first, gamma=gamma_t, gamma_reverse=1.1)
    qc, kc, vc = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    o = ops.joint_attention(qc, kc, vc, layout="bhnd", backend="cuda", **kw)
    o.backward(dout)
    qf, kf, vf = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    of, _, _ = reference.attention_ref(qf, kf, vf, layout="bhnd", upcast=torch.float32, **kw)
    of.backward(dout.float())
    ql, kl, vl = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    reference.attention_split_sdpa(ql, kl, vl, layout="bhnd", **kw).backward(dout)
    _check_rule((qc.grad, kc.grad, vc.grad), (ql.grad, kl.grad, vl.grad), (qf.grad, kf.grad, vf.grad))


@pytest.mark.parametrize("D", [64, 128, 256])
def test_nondeterministic_backward(D):
    """deterministic=False (dQ by unordered atomics) meets the same rule against the fp32
    reference; dk and dv (no atomics) equal the deterministic backward's bitwise."""
    B, H, L, img = 2, 2, 333, 1025
    gen = torch.Generator(device="cuda").manual_seed(11 + D)
    q, k, v = (_make((B, L + img, H, D), BF16, "bnhd", gen) for _ in range(3))
    dout = torch.randn(q.shape, generator=gen, device="cuda").to(BF16)
    kw = dict(text_len=L, gamma=1.2, layout="bnhd", backend="cuda")
    grads = {}
    for det in (True, False):
        qc, kc, vc = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        ops.joint_attention(qc, kc, vc, deterministic=det, **kw).backward(dout)
        grads[det] = (qc.grad, kc.grad, vc.grad)
    qf, kf, vf = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    reference.attention_ref(qf, kf, vf, text_len=L, gamma=1.2, layout="bnhd", upcast=torch.float32)[0].backward(
        dout.float())
    ql, kl, vl = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    reference.attention_split_sdpa(ql, kl, vl, text_len=L, gamma=1.2, layout="bnhd").backward(dout)
    _check_rule(grads[False], (ql.grad, kl.grad, vl.grad), (qf.grad, kf.grad, vf.grad))
    assert torch.equal(grads[False][1], grads[True][1]) and torch.equal(grads[False][2], grads[True][2])


def test_gamma_one_is_plain_attention():
    """gamma = gamma_reverse = 1 gives plain attention's gradients (same tolerance as SDPA)."""
    B, H, N, D, L = 1, 2, 700, 64, 77
    gen = torch.Generator(device="cuda").manual_seed(3)
    q, k, v, dout = (_make((B, N, H, D), BF16, "bnhd", gen) for _ in range(4))
    ones = torch.ones(B, device="cuda")
    out_ref, lse_ref, ref = _ref_grads(q, k, v, dout, text_len=0)
    got = torch.ops.taca.bwd(dout, q, k, v, out_ref.to(BF16), lse_ref, ones, 1.0, D ** -0.5, 0, L)
    sdpa = _sdpa_grads(q, k, v, dout, text_len=0)
    _check_rule(got, sdpa, ref)


# 2 x 24 (batch, head) pairs, 4096 keys (32 key tiles: one chain per 8 would make 4)
CHAIN_CASE = (2, 24, 77, 4019, 128, True, BF16, [1.2, 1.3], 1.0, "bnhd")


def test_dq_chain_counts(monkeypatch):
    """The deterministic dQ chains (taca_bwd.cu layout_of): 3 by default from 48 (batch, head) pairs, 2 in the
    v6 and mma.sync kernels with their skew. Every forced count (TACA_BWD_NSEG = 1, 2, 3, 4, 8) meets the rule and
    is deterministic (_run_case checks both), dK / dV are bitwise the default's (they do not pass through the
    chains; with the skew every count here keeps it, so the query tiles are summed in one order), and the
    default's dQ is bitwise the 2- / 3-chain one's (the same chains summed in the same order: the rule is in
    effect)."""
    monkeypatch.delenv("TACA_BWD_NSEG", raising=False)
    want = 2  # (the skew applies in every kernel here: 16 key tiles per chain, 64 query tiles)
    default = _run_case(CHAIN_CASE)
    for n in (1, 2, 3, 4, 8):
        monkeypatch.setenv("TACA_BWD_NSEG", str(n))
        got = _run_case(CHAIN_CASE)
        for name, a, b in zip(("dk", "dv"), got[1:], default[1:]):
            assert torch.equal(a, b), f"{name}: {n} chains differ from the default's"
        if n == want:
            assert torch.equal(got[0], default[0]), f"dq: the default is not the {want}-chain sum"


# FLUX's class at D = 128 (36 key tiles: 4 chains of 9 links over 72 query tiles), SD3.5's at D = 64 (35 key tiles,
# 4 chains, 35 query tiles of 128: the chains' visits wrap), N = 513 (5 key tiles: one chain over 9 query tiles)
SKEW_CASES = [CASES[0], CASES[1], CASES[11]]


@pytest.mark.parametrize("case", SKEW_CASES, ids=[_ids(c) for c in SKEW_CASES])
def test_sm90_v6_skew(case, monkeypatch):
    """v6's skew (the default where a chain fits the query tiles and half the SMs): the CTA of key tile jt walks the
    query tiles from (-jt) mod tiles on, so each chain link reaches a tile one step after its predecessor, and a
    tile's chain order is the order of those visits. With it and without it (TACA_BWD_SKEW=0) the rule holds and the
    backward is deterministic (_run_case; three runs with it); the two differ only in the order of fp32 sums (dK, dV
    over the query tiles, dQ over a tile's chain), so they agree within 2 units in the last place; on sm_90 dk
    differs bitwise (the skew ran). Elsewhere the knob is ignored."""
    _check_skew(case, monkeypatch, torch.cuda.get_device_capability() == (9, 0))


def _check_skew(case, monkeypatch, ran):
    """Gradients of `case` with the skew (three runs) and without (TACA_BWD_SKEW=0): the rule and determinism
    (_run_case), within 2 ulp of each other, and where `ran`, dk not bitwise equal (the skew ran)."""
    monkeypatch.delenv("TACA_BWD_SKEW", raising=False)
    on = _run_case(case, reps=3)
    monkeypatch.setenv("TACA_BWD_SKEW", "0")
    off = _run_case(case)
    for name, a, b in zip(("dq", "dk", "dv"), on, off):
        excess = _ulp_excess(a, b)
        assert excess <= 0, f"{name}: with and without the skew {excess:.3g} apart beyond 2 ulp"
    if ran:
        assert not torch.equal(on[1], off[1]), "dk: bitwise equal with and without the skew (it did not run)"


@pytest.mark.parametrize("case", SKEW_CASES, ids=[_ids(c) for c in SKEW_CASES])
def test_mma_sync_skew(case, monkeypatch):
    """The mma.sync kernel (what GPUs other than Hopper run; TACA_BWD_SM90=0 forces it on sm_90) takes the same skew
    and the same chains with it (taca_bwd_kernel.cuh apply_skew_rule): as test_sm90_v6_skew, on any GPU."""
    monkeypatch.setenv("TACA_BWD_SM90", "0")
    _check_skew(case, monkeypatch, True)


def test_sm90_v6_skew_mps_share(monkeypatch):
    """Under MPS with CUDA_MPS_ACTIVE_THREAD_PERCENTAGE the skew's SM rule counts that share of the SMs: FLUX's class
    (two chains of 18 key tiles) keeps it on a whole H100 / H200 (2 x 18 <= 132 SMs) but not with 25% of them (33
    SMs), where its gradients are bitwise those with TACA_BWD_SKEW=0. (The variable is read per call by taca; CUDA
    itself reads it only when it connects to an MPS server, so setting it here changes nothing else.)"""
    case = CASES[0]
    monkeypatch.setenv("TACA_BWD_SKEW", "0")
    off = _run_case(case)
    monkeypatch.delenv("TACA_BWD_SKEW")
    monkeypatch.setenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "25")
    share = _run_case(case)
    for name, a, b in zip(("dq", "dk", "dv"), share, off):
        assert torch.equal(a, b), f"{name}: the skew ran on a quarter of the SMs"
    if torch.cuda.get_device_capability() == (9, 0):
        monkeypatch.delenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
        whole = _run_case(case)
        assert not torch.equal(whole[1], off[1]), "dk: the skew did not run on the whole GPU"


D256_CASES = [c for c in CASES if c[4] > 128 and c[2] + c[3] > 128]  # more than one 128-key tile


@pytest.mark.parametrize("case", D256_CASES, ids=[_ids(c) for c in D256_CASES])
def test_sm90_d256_kernel(case, monkeypatch):
    """D = 136..256: the wgmma kernel (TACA_BWD_D256=wgmma; sm_90 with an sm_90a build) and the mma.sync kernel
    (TACA_BWD_D256=mma, what other GPUs run) both meet the rule and are deterministic (_run_case); they sum in other
    orders (64- against 32-row query tiles), so on sm_90 dk differs bitwise: the wgmma kernel ran. Elsewhere the
    switch changes nothing and the two are equal."""
    monkeypatch.setenv("TACA_BWD_D256", "wgmma")
    wg = _run_case(case)
    monkeypatch.setenv("TACA_BWD_D256", "mma")
    mma = _run_case(case)
    if torch.cuda.get_device_capability() == (9, 0):
        assert not torch.equal(wg[1], mma[1]), "dk: bitwise the mma.sync kernel's (the wgmma kernel did not run)"
    else:
        assert all(torch.equal(a, b) for a, b in zip(wg, mma))


# AuraFlow's class: one chain of 22 key tiles of 64 over 22 query tiles (the skew applies)
D256_SKEW_CASES = [c for c in D256_CASES if c[2] == 264]


@pytest.mark.parametrize("case", D256_SKEW_CASES, ids=[_ids(c) for c in D256_SKEW_CASES])
def test_sm90_d256_skew(case, monkeypatch):
    """The D = 256 wgmma kernel's skew (v6's, chains counted in 64-key tiles): as test_sm90_v6_skew."""
    monkeypatch.setenv("TACA_BWD_D256", "wgmma")
    _check_skew(case, monkeypatch, torch.cuda.get_device_capability() == (9, 0))


@pytest.mark.parametrize("case", D256_CASES, ids=[_ids(c) for c in D256_CASES])
def test_sm90_d256_own_half(case, monkeypatch):
    """TACA_BWD_D256_OWN=1 (the D = 256 wgmma kernel with dV / dK over each warpgroup's own 32 queries issued from
    its registers before the warpgroups' barrier, the other 32 from shared memory after it): the rule and determinism
    (_run_case); dq bitwise the default's (its products are unchanged); dk / dv sum the tile's four query steps in
    another order for the second warpgroup's columns, so within 2 ulp of the default's."""
    monkeypatch.setenv("TACA_BWD_D256", "wgmma")
    monkeypatch.delenv("TACA_BWD_D256_OWN", raising=False)
    base = _run_case(case)
    monkeypatch.setenv("TACA_BWD_D256_OWN", "1")
    own = _run_case(case)
    assert torch.equal(own[0], base[0]), "dq: not bitwise the default's"
    for name, a, b in zip(("dk", "dv"), own[1:], base[1:]):
        excess = _ulp_excess(a, b)
        assert excess <= 0, f"{name}: {excess:.3g} beyond 2 ulp of the default's"


@pytest.mark.skipif(not _HAVE or torch.cuda.get_device_capability() != (9, 0), reason="needs sm_90 (the wgmma kernel)")
def test_sm90_d256_trace_instance_and_timing_modes(monkeypatch):
    """The D = 256 wgmma kernel's diagnostic instance (TACA_BWD_D256_TRACE=1) and timing modes: the trace instance's
    gradients are bitwise the plain one's and its slots add up (every CTA traced, the query tiles counted, the 15
    segments summing to the loop's cycles, SM ids in range); TACA_BWD_MODE=skipdq (no dQ written) and =racy (dQ
    parts stored without order) change dk and dv by nothing, bitwise (dq is wrong there on purpose)."""
    import ctypes

    import numpy as np

    import taca._C as C

    case = D256_SKEW_CASES[0]  # AuraFlow's class: 22 key tiles of 64, 22 query tiles, bf16
    B, H, L, img, D, text_first, dtype, gamma, gamma_reverse, storage = case
    N = L + img
    monkeypatch.setenv("TACA_BWD_D256", "wgmma")
    monkeypatch.delenv("TACA_BWD_MODE", raising=False)
    monkeypatch.delenv("TACA_BWD_D256_TRACE", raising=False)
    gen = torch.Generator(device="cuda").manual_seed(7)
    q, k, v, dout = (_make((B, N, H, D), dtype, storage, gen) for _ in range(4))
    gamma_t = torch.tensor(gamma, device="cuda", dtype=torch.float32)
    tb, te = reference.text_range(N, L, text_first)
    out, lse, _ = torch.ops.taca.fwd(q, k, v, gamma_t, float(gamma_reverse), D ** -0.5, tb, te, False)

    def bwd():
        g = torch.ops.taca.bwd(dout, q, k, v, out, lse, gamma_t, float(gamma_reverse), D ** -0.5, tb, te)
        torch.cuda.synchronize()
        return g

    base = bwd()
    lib = ctypes.CDLL(C.__file__)
    lib.taca_bwd256_trace_read.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    slots, nk = 40, -(-N // 64)
    n_ctas = nk * H * B
    buf = np.zeros((n_ctas, slots), dtype=np.uint64)
    assert lib.taca_bwd256_trace_reset() == 0
    monkeypatch.setenv("TACA_BWD_D256_TRACE", "1")
    traced = bwd()
    assert lib.taca_bwd256_trace_read(buf.ctypes.data, buf.nbytes) == 0
    for name, a, b in zip(("dq", "dk", "dv"), traced, base):
        assert torch.equal(a, b), f"{name}: the trace instance's differs from the plain instance's"
    t = buf.astype(np.int64)
    assert (t[:, 1] > 0).all() and (t[:, 2] >= t[:, 33]).all() and (t[:, 33] >= t[:, 1]).all()
    assert (t[:, 5] == nk).all(), "query tiles walked: one KV head per head here, so nq = nk"
    assert (t[:, 0] < torch.cuda.get_device_properties(0).multi_processor_count).all()
    seg_sum = t[:, 6:21].sum(axis=1)
    assert (seg_sum <= t[:, 4]).all() and (t[:, 4] - seg_sum < 2000).all(), "segments do not add up to the loop"
    assert (t[:, 4] > 0).all() and (t[:, 25] > 0).all() and (t[:, 30] > 0).all(), "loop cycles / writers' end"
    ids = t[:, 3]
    assert sorted((ids & 0xFFFF).tolist()) == sorted(list(range(nk)) * H * B), "key tiles"
    monkeypatch.delenv("TACA_BWD_D256_TRACE")
    for mode in ("skipdq", "racy"):
        monkeypatch.setenv("TACA_BWD_MODE", mode)
        g = bwd()
        assert torch.equal(g[1], base[1]) and torch.equal(g[2], base[2]), f"{mode}: dk / dv changed"
