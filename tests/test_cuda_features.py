"""Issue 12 features on CUDA tensors (skipped without a GPU; run on the H200).

The CUDA kernels cover every feature of the op (taca.h): per-sample spans, N_q != N_k, grouped
KV heads and masks, on the Hopper kernels (D = 64 / 128 aligned) and the mma.sync kernels alike.
What must hold on the GPU:
- auto on float16/bfloat16 feature cases (the CPU suite's small cases, now on the kernel) and
  forced backend="cuda" on multi-tile cases at the models' head dims meet the tolerance rule
  (STYLE.md) against the float32 reference, forward and backward (deterministic), with lse and
  text_mass, and fully masked rows are 0 with zero gradients;
- float64 CUDA tensors (split SDPA) are exact to 1e-12 with arbitrary float64 scalars;
- the plain kernel path still meets the tolerance rule with arbitrary float64 scalars (the ABI
  now carries them as double and the launchers round them once);
- N_k = 0 (every row fully masked) is refused by the CUDA op by name.
"""
import pytest
import torch

import taca
from taca import ops, reference

from test_ops_features import CASES, NAMES, EXACT, GAMMA, GAMMA_REV, SCALE, make

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
requires_kernel = pytest.mark.skipif(not ops.HAVE_CUDA_KERNEL, reason="taca._C built without CUDA kernels")

FEATURES = ["per_sample_last", "per_sample_start", "image_queries_text_last", "flux2_kv", "cross_per_sample",
            "gqa", "bool_mask_b11k", "float_mask_bhqk", "chroma_float01", "fully_masked_rows", "everything"]


def _rule(err_kernel, err_torch, what):
    assert err_kernel <= 2 * err_torch + 1e-5, f"{what}: {err_kernel:.3g} > 2 x {err_torch:.3g} + 1e-5"


def _grads_by_rule_and_repeatable(out, out2, qkv, ref, qkv_f, tor, dout, grads_repeatable=True):
    """dq, dk, dv of ``out`` finite and by the tolerance rule against the float32 reference's (``ref`` of ``qkv_f``)
    and split SDPA's (``tor``); ``out`` and (``grads_repeatable``) its gradients bitwise those of the same call made
    again (``out2``). Not for a route whose backward runs torch's SDPA: the memory-efficient backward with a mask adds
    its parts in no fixed order (the forty-sixth session's H100 run of the row-range route: dq differed between two
    identical calls at Ideogram 4's segment mask)."""
    g = torch.autograd.grad(out, qkv, dout)
    for nm, a, r, t in zip(("dq", "dk", "dv"), g, torch.autograd.grad(ref, qkv_f, dout.float()),
                           torch.autograd.grad(tor, qkv, dout)):
        assert torch.isfinite(a).all(), nm
        _rule((a.float() - r).abs().max().item(), (t.float() - r).abs().max().item(), nm)
    g2 = torch.autograd.grad(out2, qkv, dout)
    for nm, a, b in list(zip(("out", "dq", "dk", "dv"), (out,) + g, (out2,) + g2))[:4 if grads_repeatable else 1]:
        assert torch.equal(a, b), f"{nm} not bitwise repeatable"


def _to(kw, device, dtype=None):
    out = {}
    for key, val in kw.items():
        if isinstance(val, torch.Tensor):
            val = val.to(device)
            if dtype is not None and key == "attn_mask" and val.is_floating_point():
                val = val.to(dtype)
        out[key] = val
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", FEATURES)
def test_cuda_auto_features_tolerance_rule(name, dtype):
    case = CASES[NAMES.index(name)]
    q, k, v, kw = make(case, torch.float32)
    kw = _to(kw, "cuda", dtype)
    kw["gamma"] = kw["gamma"].float()
    ql, kl, vl = (t.cuda().to(dtype).requires_grad_() for t in (q, k, v))
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (ql, kl, vl))
    kw32 = dict(kw)
    if "attn_mask" in kw and kw["attn_mask"].is_floating_point():
        kw32["attn_mask"] = kw["attn_mask"].float()
    out = taca.joint_attention(ql, kl, vl, **kw)
    ref = reference.attention_ref(qf, kf, vf, upcast=torch.float32, **kw32)[0]
    tor = reference.attention_split_sdpa(ql, kl, vl, **kw)
    # torch's own low-precision error: SDPA with the multiplier folded into K, same dtype
    _rule((out.float() - ref).abs().max().item(), (tor.float() - ref).abs().max().item(), "out")
    dout = torch.randn_like(out)
    g_k = torch.autograd.grad(out, (ql, kl, vl), dout)
    g_r = torch.autograd.grad(ref, (qf, kf, vf), dout.float())
    g_t = torch.autograd.grad(reference.attention_split_sdpa(ql, kl, vl, **kw), (ql, kl, vl), dout)
    for nm, a, r, t in zip(("dq", "dk", "dv"), g_k, g_r, g_t):
        assert torch.isfinite(a).all()
        _rule((a.float() - r).abs().max().item(), (t.float() - r).abs().max().item(), nm)
    if case.mask == "bool_dead_rows":
        dead = ~kw["attn_mask"].any(-1)
        assert torch.equal(out[dead], torch.zeros_like(out[dead]))


@pytest.mark.parametrize("name", NAMES)
def test_cuda_float64_features_exact(name):
    case = CASES[NAMES.index(name)]
    q, k, v, kw = make(case, torch.float64, device="cuda")
    out = taca.joint_attention(q, k, v, **kw)
    ref = reference.attention_ref(q, k, v, **kw)[0]
    torch.testing.assert_close(out, ref, **EXACT)


@requires_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("text_first", [True, False])
def test_cuda_kernel_float64_scalars(dtype, text_first):
    # gamma 1.2345678901234 etc. reach the launchers as double and are rounded once to float
    q, k, v = (torch.randn(2, 4, 333, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    kw = dict(text_len=77, text_first=text_first, gamma=torch.tensor([GAMMA, 0.7], device="cuda"),
              gamma_reverse=GAMMA_REV, scale=SCALE)
    out = taca.joint_attention(q, k, v, backend="cuda", **kw)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = reference.attention_ref(qf, kf, vf, upcast=torch.float32, **kw)[0]
    tor = reference.attention_split_sdpa(q, k, v, **kw)
    _rule((out.float() - ref).abs().max().item(), (tor.float() - ref).abs().max().item(), "out")
    dout = torch.randn_like(out)
    for nm, a, r, t in zip(("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), dout),
                           torch.autograd.grad(ref, (qf, kf, vf), dout.float()),
                           torch.autograd.grad(tor, (q, k, v), dout)):
        _rule((a.float() - r).abs().max().item(), (t.float() - r).abs().max().item(), nm)


# Multi-tile cases at the models' head dims: D = 64 / 128 aligned take the Hopper kernels on an
# H100/H200 (their FEAT instances with per-sample spans or a mask; D = 256 too), D = 96 / 72 the mma.sync
# kernels (72: the unaligned element-wise path). Spans are written per sample as in the models
# (text first with padding-free per-sample lengths, text last, image-only queries, FLUX.2 KV).
BIG = {
    # name: (B, H, Hkv, Nq, Nk, D, layout, span kwargs, mask kind or None)
    "spans_first_d64": (3, 2, 2, 300, 300, 64, "bnhd", dict(text_len=[77, 0, 200]), None),
    "spans_last_d128": (3, 2, 2, 333, 333, 128, "bhnd", dict(text_len=[10, 150, 333], text_first=False), None),
    "image_queries_d128": (2, 3, 3, 256, 333, 128, "bnhd", dict(text_len=77, text_first=False), None),
    # 2 query tiles against 16 key tiles (two dQ chains of 8): longer chains than query tiles, so no v6 skew
    "cross_many_keys_d128": (1, 2, 2, 100, 2000, 128, "bnhd", dict(text_len=77, text_first=False), None),
    "flux2_kv_d128": (2, 2, 2, 300, 450, 128, "bnhd", dict(text_len=64, query_text_len=64), None),
    "gqa_d128": (2, 8, 2, 300, 300, 128, "bhnd", dict(text_len=77), None),
    # D = 64: v6's dK / dV by TMA stores with key rows past Nk = 450 clipped, grouped KV heads
    "gqa_kv_d64": (2, 8, 2, 300, 450, 64, "bnhd", dict(text_len=64, query_text_len=64), None),
    "gqa_d96_lumina": (2, 6, 2, 270, 270, 96, "bnhd", dict(text_len=[40, 90]), "bool_b11k"),
    "key_mask_d128": (2, 4, 4, 300, 300, 128, "bnhd", dict(text_len=77, text_first=False), "bool_b11k"),
    "float_mask_d64": (2, 2, 2, 200, 200, 64, "bhnd", dict(text_len=50), "float_bhqk"),
    # a float key mask per head (mask.h != 0) with grouped KV heads and N_q != N_k: v6's key-mask path
    "float_keys_gqa_d64": (2, 8, 2, 300, 450, 64, "bnhd", dict(text_len=64, query_text_len=64), "float_bh1k"),
    "chroma_d128": (2, 2, 2, 260, 260, 128, "bnhd", dict(text_len=64), "float01_outer"),
    "dead_rows_d64": (2, 2, 2, 200, 200, 64, "bhnd", dict(text_len=50), "bool_dead_rows"),
    "everything_d128": (3, 4, 2, 290, 333, 128, "bnhd",
                        dict(text_len=[64, 20, 0], text_start=[0, 200, 7], query_text_start=[0, 3, 0],
                             query_text_len=[64, 0, 30]), "bool_b1qk"),
    # a padded prompt on enough keys for unmasked tiles beside masked ones (the forward's per-tile key terms)
    "padded_text_d128": (2, 4, 4, 1100, 1100, 128, "bnhd", dict(text_len=256), "bool_pad_text"),
    "padded_text_gqa_d64": (2, 4, 2, 1100, 1100, 64, "bhnd", dict(text_len=256), "bool_pad_text"),
    "spans_mask_d256": (2, 2, 2, 300, 300, 256, "bnhd", dict(text_len=[60, 7], text_start=[0, 40]), "bool_b11k"),
    # D = 256 with spans alone (Ideogram 4's per-sample text) and a per-query float mask, D = 224 zero-filled
    "spans_d256": (2, 3, 3, 700, 700, 256, "bhnd", dict(text_len=[170, 512], text_first=True), None),
    "float_mask_d224": (2, 2, 1, 200, 260, 224, "bnhd", dict(text_len=50), "float_bhqk"),
    # for the D = 256 backward kernels (the wgmma one with TACA_BWD_D256=wgmma, as gpu_d256_bwd_run.sh runs these):
    # grouped KV heads with N_q != N_k (FLUX.2-style KV text), per-sample spans at D = 208 with text last
    "gqa_kv_d256": (2, 4, 2, 300, 700, 256, "bnhd", dict(text_len=64, query_text_len=64), None),
    "gqa_spans_d208": (2, 6, 2, 333, 333, 208, "bhnd", dict(text_len=[77, 200], text_first=False), None),
    "everything_d72": (3, 4, 2, 150, 170, 72, "bhnd",
                       dict(text_len=[30, 20, 0], text_start=[0, 100, 7], query_text_len=[30, 0, 10]),
                       "float32_neginf"),
}


def _big(name, dtype, seed=0):
    from test_ops_features import _make_mask, _tensorize
    B, H, Hkv, Nq, Nk, D, layout, spans, mask = BIG[name]
    torch.manual_seed(seed)
    if layout == "bhnd":
        shapes = ((B, H, Nq, D), (B, Hkv, Nk, D))
    else:
        shapes = ((B, Nq, H, D), (B, Nk, Hkv, D))
    q = torch.randn(shapes[0], device="cuda").to(dtype)
    k, v = (torch.randn(shapes[1], device="cuda").to(dtype) for _ in range(2))
    kw = _tensorize(spans, "cuda")
    kw.update(gamma=torch.tensor([GAMMA, 0.7, 1.9][:B], device="cuda"), gamma_reverse=GAMMA_REV,
              scale=SCALE, layout=layout)
    if mask is not None:
        m = _make_mask(mask, B, H, Nq, Nk, torch.float32)
        if mask == "float_bhqk":
            m = m.to(dtype)  # a mask in q's dtype, as models pass it
        kw["attn_mask"] = m.cuda()
    return q, k, v, kw


@requires_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(BIG))
def test_cuda_kernel_features_tolerance_rule(name, dtype):
    q, k, v, kw = _big(name, dtype)
    ql, kl, vl = (t.requires_grad_() for t in (q, k, v))
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (ql, kl, vl))
    kw32 = dict(kw)
    if "attn_mask" in kw and kw["attn_mask"].is_floating_point():
        kw32["attn_mask"] = kw["attn_mask"].float()
    out, lse, tm = taca.joint_attention(ql, kl, vl, backend="cuda", return_lse=True, return_text_mass=True, **kw)
    ref, lse_r, tm_r = reference.attention_ref(qf, kf, vf, upcast=torch.float32, **kw32)
    live = torch.isfinite(lse_r)  # (B, H, N_q); dead: fully masked rows
    assert torch.equal(torch.isfinite(lse), live)  # lse = -inf on exactly those rows
    assert (lse[live] - lse_r[live]).abs().max().item() < 2e-3
    assert (tm - tm_r.detach()).abs().max().item() < 5e-3
    # torch's own low-precision error comes from split SDPA, which returns NaN on fully masked
    # rows (CUDA SDPA backends): it gets those rows unmasked, and dout is 0 there for every
    # method, so no method's gradients depend on them (dS = P (dP - delta) = 0 on them).
    kw_t = dict(kw)
    live_rows = live if kw["layout"] == "bhnd" else live.transpose(1, 2)
    if not live.all():
        B, H, Nq, Nk = live.shape + (kl.shape[2] if kw["layout"] == "bhnd" else kl.shape[1],)
        m = kw["attn_mask"].expand(B, H, Nq, Nk).clone()
        m[~live] = True if m.dtype == torch.bool else 0.0
        kw_t["attn_mask"] = m
    tor = reference.attention_split_sdpa(ql, kl, vl, **kw_t)
    _rule((out.float() - ref)[live_rows].abs().max().item(), (tor.float() - ref)[live_rows].abs().max().item(), "out")
    # auto takes the same kernel (bitwise the same output), except for masks that vary over queries: an outer
    # product (Chroma) runs as the key-mask kernel plus a maskless one over its m_i = 0 rows
    # (test_cuda_outer_mask_auto), any other such mask goes to split SDPA (faster there)
    auto = taca.joint_attention(ql.detach(), kl.detach(), vl.detach(), **kw)
    mask = kw.get("attn_mask")
    per_sample = any(isinstance(kw.get(a), torch.Tensor)
                     for a in ("text_len", "text_start", "query_text_start", "query_text_len"))
    tok = 2 if kw["layout"] == "bhnd" else 1
    if (ops._per_query_mask(mask) and ql.shape[tok] == kl.shape[tok] and not per_sample
            and ops._outer_mask_rows(mask)):
        _rule((auto.float() - ref)[live_rows].abs().max().item(), (tor.float() - ref)[live_rows].abs().max().item(),
              "auto out")
    elif ops._per_query_mask(mask):
        assert torch.equal(auto, reference.attention_split_sdpa(ql.detach(), kl.detach(), vl.detach(), **kw))
    else:
        assert torch.equal(auto, out.detach())
    dout = torch.randn_like(out) * live_rows[..., None]
    g_k = torch.autograd.grad(out, (ql, kl, vl), dout)
    g_r = torch.autograd.grad(ref, (qf, kf, vf), dout.float())
    g_t = torch.autograd.grad(reference.attention_split_sdpa(ql, kl, vl, **kw_t), (ql, kl, vl), dout)
    for nm, a, r, t in zip(("dq", "dk", "dv"), g_k, g_r, g_t):
        assert torch.isfinite(a).all(), nm
        _rule((a.float() - r).abs().max().item(), (t.float() - r).abs().max().item(), nm)
    # deterministic backward: a second run is bitwise equal
    out2 = taca.joint_attention(ql, kl, vl, backend="cuda", **kw)
    for nm, a, b in zip(("dq", "dk", "dv"), g_k, torch.autograd.grad(out2, (ql, kl, vl), dout)):
        assert torch.equal(a, b), f"{nm} not bitwise repeatable"


def _grads_by_switch(name, var, values, monkeypatch):
    """dq, dk, dv of BIG case `name` (bf16), one set per value of the environment switch `var`, from the same
    inputs and dout."""
    q, k, v, kw = _big(name, torch.bfloat16)
    ql, kl, vl = (t.requires_grad_() for t in (q, k, v))
    dout, grads = None, []
    for val in values:
        monkeypatch.setenv(var, val)
        out = taca.joint_attention(ql, kl, vl, backend="cuda", **kw)
        dout = torch.randn_like(out) if dout is None else dout
        grads.append(torch.autograd.grad(out, (ql, kl, vl), dout))
    return grads


@requires_kernel
@pytest.mark.parametrize("name", ["gqa_kv_d64", "spans_first_d64", "gqa_d128", "everything_d128", "key_mask_d128",
                                  "float_mask_d64", "dead_rows_d64", "float_keys_gqa_d64"])
def test_cuda_kernel_dkv_by_tma_bitwise(name, monkeypatch):
    """Hopper v6 stores dK / dV by TMA (the default) or by fragment stores;
    TACA_BWD_V6_DKV=tma / frag forces one: with grouped KV heads, N_q != N_k, per-sample spans and
    masks, bitwise the same gradients. (Off sm_90 the knob is ignored and the runs are trivially equal.)"""
    g_tma, g_frag = _grads_by_switch(name, "TACA_BWD_V6_DKV", ("tma", "frag"), monkeypatch)
    for nm, a, b in zip(("dq", "dk", "dv"), g_tma, g_frag):
        assert torch.isfinite(a).all(), nm
        assert torch.equal(a, b), f"{nm}: dK / dV by TMA differ from the fragment stores"


@requires_kernel
@pytest.mark.parametrize("name", ["cross_many_keys_d128", "image_queries_d128", "gqa_d128", "everything_d128",
                                  "padded_text_gqa_d64", "key_mask_d128", "spans_d256"])
def test_cuda_kernel_bwd_skew(name, monkeypatch):
    """Hopper v6's skew (each key tile's CTA starts at another query tile; TACA_BWD_SKEW=0 turns it off) with
    grouped KV heads, N_q != N_k, per-sample spans and masks: the gradients with and without it agree within 2 units
    in the last place (only the order of fp32 sums differs), and where a dQ chain has more links than there are query
    tiles (cross_many_keys_d128) the skew does not apply: bitwise equal. (Off sm_90 the knob is ignored.)"""
    from test_cuda_bwd import _ulp_excess

    g_on, g_off = _grads_by_switch(name, "TACA_BWD_SKEW", ("", "0"), monkeypatch)
    for nm, a, b in zip(("dq", "dk", "dv"), g_on, g_off):
        assert torch.isfinite(a).all(), nm
        if name == "cross_many_keys_d128":
            assert torch.equal(a, b), f"{nm}: the skew ran where its chains are longer than the query tiles"
        else:
            excess = _ulp_excess(a, b)
            assert excess <= 0, f"{nm}: with and without the skew {excess:.3g} apart beyond 2 ulp"


@requires_kernel
@pytest.mark.parametrize("kernel", ["default", "v5", "mma_sync"])
@pytest.mark.parametrize("name", ["key_mask_d128", "gqa_d96_lumina", "float_keys_gqa_d64", "float_mask_d64"])
def test_cuda_kernel_key_mask_per_tile_bitwise(name, kernel, monkeypatch):
    """A key mask (the same for every query row: (B, 1, 1, N_k) bool, (B, H, 1, N_k) float with grouped KV
    heads) takes the backward kernels' per-tile path, each thread's two key terms read once per query tile;
    TACA_BWD_MASK=elem forces the per-element path of general masks. Bitwise the same gradients (the same
    sums), in the default kernel (v6 on Hopper), Hopper's v5 and the mma.sync kernel (TACA_BWD_SM90=0, what
    other GPUs run). float_mask_d64, a (B, H, N_q, N_k) mask, runs the per-element path under both."""
    if kernel == "v5":
        monkeypatch.setenv("TACA_BWD_SM90_KERNEL", "v5")
    elif kernel == "mma_sync":
        monkeypatch.setenv("TACA_BWD_SM90", "0")
    g_tile, g_elem = _grads_by_switch(name, "TACA_BWD_MASK", ("tile", "elem"), monkeypatch)
    for nm, a, b in zip(("dq", "dk", "dv"), g_tile, g_elem):
        assert torch.isfinite(a).all(), nm
        assert torch.equal(a, b), f"{nm}: the key mask's per-tile path differs from the per-element one"


@requires_kernel
@pytest.mark.parametrize("name", ["key_mask_d128", "gqa_d96_lumina", "float_keys_gqa_d64", "padded_text_d128",
                                  "padded_text_gqa_d64", "float_mask_d64", "spans_mask_d256"])
def test_cuda_forward_key_mask_per_tile_bitwise(name, monkeypatch):
    """Hopper's forward takes a key mask as per-tile terms (each lane reads four keys of the tile, shuffled to
    the lanes whose columns they are); TACA_FWD_MASK=elem forces the per-element path. Bitwise the same out,
    lse and text_mass (the same sums). float_mask_d64 (per query) and D = 256 run the per-element path under
    both; other GPUs ignore the switch. At D = 64 the terms run in the three-consumer kernel by default (192-row CTAs
    over the same 128-key tiles, so the same per-row sums) and TACA_FWD_MASK=tile takes the two-consumer one; both
    again with TACA_FWD_KT_ARRIVE=lane0 (lane 0 of each warp arrives on the key-term barriers after a __syncwarp; the
    default has every lane arrive, which compute-sanitizer racecheck can check)."""
    q, k, v, kw = _big(name, torch.bfloat16)
    res = []
    for val, arrive in (("", ""), ("elem", ""), ("tile", ""), ("", "lane0"), ("tile", "lane0")):
        monkeypatch.setenv("TACA_FWD_MASK", val)
        monkeypatch.setenv("TACA_FWD_KT_ARRIVE", arrive)
        res.append(taca.joint_attention(q, k, v, backend="cuda", return_lse=True, return_text_mass=True, **kw))
    for nm, a, b, c, d, e in zip(("out", "lse", "text_mass"), *res):
        assert torch.equal(a, b), f"{nm}: the forward's per-tile key terms differ from the per-element path"
        assert torch.equal(a, c), f"{nm}: the two- and three-consumer kernels' per-tile key terms differ"
        assert torch.equal(a, d) and torch.equal(a, e), f"{nm}: the lane-0-arrival instances differ"
    assert torch.isfinite(res[0][0]).all()


@requires_kernel
@pytest.mark.parametrize("route", ["cp", "ws"])
@pytest.mark.parametrize("name", ["spans_mask_d256", "spans_d256", "float_mask_d224"])
def test_cuda_d256_forward_routes(name, route, monkeypatch):
    """D = 200..256 on both Hopper forwards (TACA_FWD_D256: the warp-specialized kernel's FEAT instances, spans alone, a
    key mask's per-tile terms, a per-query mask; or the cp.async kernel), each by the tolerance rule with its
    gradients (other GPUs ignore the switch)."""
    monkeypatch.setenv("TACA_FWD_D256", route)
    test_cuda_kernel_features_tolerance_rule(name, torch.bfloat16)


@requires_kernel
def test_cuda_kernel_dead_rows_are_zero():
    q, k, v, kw = _big("dead_rows_d64", torch.bfloat16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = taca.joint_attention(q, k, v, backend="cuda", **kw)
    dead = ~kw["attn_mask"].any(-1)
    assert dead.any()
    assert torch.equal(out[dead], torch.zeros_like(out[dead]))
    dq = torch.autograd.grad(out, q, torch.randn_like(out))[0]
    assert torch.equal(dq[dead], torch.zeros_like(dq[dead]))


@requires_kernel
def test_cuda_raw_op_refuses_no_keys():
    q = torch.randn(2, 10, 4, 64, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(2, 0, 2, 64, device="cuda", dtype=torch.bfloat16)
    g = torch.ones(2, device="cuda")
    with pytest.raises(ValueError, match="at least one key token"):
        torch.ops.taca.fwd(q, kv, kv, g, 1.0, 0.125, 0, 0, False, 0, 0, None, None)
    assert "N_k = 0" in ops._kernel_refusal(q, None, "bnhd", kv)


def test_cuda_tensor_spans_are_checked():
    q, k, v = (torch.randn(2, 2, 10, 16, device="cuda") for _ in range(3))
    with pytest.raises(ValueError, match=r"key text span of sample 1, \[0, 11\)"):
        taca.joint_attention(q, k, v, text_len=torch.tensor([3, 11], device="cuda"))


@requires_kernel
@pytest.mark.parametrize("kind", ["float", "bool"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout,text_first,D", [("bnhd", True, 128), ("bhnd", False, 64), ("bnhd", True, 96)])
def test_cuda_outer_mask_auto(layout, text_first, D, dtype, kind, monkeypatch):
    """Outer-product masks under backend="auto": Chroma's float (B, 1, N, N) m_i * m_j as the key-mask kernel over
    every row and a maskless one over the rows with m_i = 0, HunyuanVideo 1.5's bool m_i & m_j as the key-mask
    kernel with those rows fully masked (out 0, lse -inf, text_mass 0, no gradient) (ops._outer_mask_attention),
    never split SDPA; out, lse, text_mass and the gradients by the tolerance rule against the float32 reference
    with the same mask on the live rows; bitwise repeatable."""
    B, H, N, L = 2, 4, 1100, 256
    torch.manual_seed(0)
    shape = (B, H, N, D) if layout == "bhnd" else (B, N, H, D)
    q, k, v = (torch.randn(shape, device="cuda").to(dtype).requires_grad_() for _ in range(3))
    txt = torch.arange(L) if text_first else torch.arange(N - L, N)
    m = torch.ones(B, N)
    m[0, txt[100:]] = 0  # a prompt's padding tokens (Chroma keeps the first valid), text only
    m[1, txt[7:]] = 0
    mask = (m[:, :, None] * m[:, None, :])[:, None].cuda()
    mask = mask.to(dtype) if kind == "float" else mask > 0
    kw = dict(text_len=L, text_first=text_first, gamma=torch.tensor([GAMMA, 0.7], device="cuda"),
              gamma_reverse=GAMMA_REV, scale=SCALE, layout=layout, attn_mask=mask)

    def no_split(*a, **k):
        raise AssertionError("split SDPA ran")

    monkeypatch.setattr(reference, "attention_split_sdpa", no_split)
    out, lse, tm = taca.joint_attention(q, k, v, return_lse=True, return_text_mass=True, **kw)
    out2 = taca.joint_attention(q, k, v, **kw)
    monkeypatch.undo()
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    kw32 = dict(kw, attn_mask=mask.float() if kind == "float" else mask)
    ref, lse_r, tm_r = reference.attention_ref(qf, kf, vf, upcast=torch.float32, **kw32)
    live = torch.isfinite(lse_r)  # (B, H, N): bool's m_i = 0 rows are dead
    assert torch.equal(torch.isfinite(lse), live) and (kind == "float") == bool(live.all())
    rows = live if layout == "bhnd" else live.transpose(1, 2)
    assert torch.equal(out[~rows], torch.zeros_like(out[~rows])) and torch.equal(tm[~live], torch.zeros_like(tm[~live]))
    kw_t = dict(kw)  # split SDPA gives NaN on fully masked rows: it gets them unmasked (dout is 0 there)
    if kind == "bool":
        kw_t["attn_mask"] = mask | (m == 0).cuda()[:, None, :, None]
    tor = reference.attention_split_sdpa(q, k, v, **kw_t)
    _rule((out.float() - ref)[rows].abs().max().item(), (tor.float() - ref)[rows].abs().max().item(), "out")
    assert (lse - lse_r)[live].abs().max().item() < 2e-3
    assert (tm - tm_r)[live].abs().max().item() < 5e-3
    dout = torch.randn_like(out) * rows[..., None]
    _grads_by_rule_and_repeatable(out, out2, (q, k, v), ref, (qf, kf, vf), tor, dout)


@requires_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case,layout,D", [("omnigen", "bhnd", 64), ("omnigen", "bnhd", 128),
                                           ("segment_spans", "bnhd", 128), ("segment_spans", "bhnd", 64)])
def test_cuda_row_range_mask_auto(case, layout, D, dtype, monkeypatch, spy):
    """Masks whose rows all equal one row outside a few under backend="auto": OmniGen's image rows (image-only queries,
    every row the same key mask) and Ideogram 4's segment mask (per-sample spans, the left padding's rows differ) run
    as the key-mask kernel plus split SDPA over the differing rows (ops._row_range_attention), once per call; out,
    lse, text_mass and the gradients by the tolerance rule against the float32 reference with the whole mask; out
    bitwise repeatable (the gradients of the rows on split SDPA are torch's mask backward's: not in a fixed order)."""
    from test_row_range_mask import _omnigen_mask, _segment_mask

    B, H = 2, 4
    torch.manual_seed(0)
    if case == "omnigen":
        L, N = 77, 1100
        full = _omnigen_mask([20, 0], L, N, torch.float32).cuda()
        mask, Nq = full[:, :, L + 1:].to(dtype), N - L - 1
        spans = dict(text_len=L, text_first=True)
    else:
        pad = [40, 3]
        N = Nq = 1100
        mask = _segment_mask(pad, N).cuda()
        spans = dict(text_len=torch.tensor([100, 250], device="cuda"), text_start=torch.tensor(pad, device="cuda"))
    shp = lambda n: (B, H, n, D) if layout == "bhnd" else (B, n, H, D)  # noqa: E731
    q = torch.randn(shp(Nq), device="cuda").to(dtype).requires_grad_()
    k, v = (torch.randn(shp(N), device="cuda").to(dtype).requires_grad_() for _ in range(2))
    kw = dict(gamma=torch.tensor([GAMMA, 0.7], device="cuda"), gamma_reverse=GAMMA_REV, scale=SCALE, layout=layout,
              attn_mask=mask, **spans)
    calls = spy(ops, "_row_range_attention")
    out, lse, tm = taca.joint_attention(q, k, v, return_lse=True, return_text_mass=True, **kw)
    out2 = taca.joint_attention(q, k, v, **kw)
    monkeypatch.undo()
    assert len(calls) == 2
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    kw32 = dict(kw, attn_mask=mask.float() if mask.dtype != torch.bool else mask)
    ref, lse_r, tm_r = reference.attention_ref(qf, kf, vf, upcast=torch.float32, **kw32)
    tor = reference.attention_split_sdpa(q, k, v, **kw)
    _rule((out.float() - ref).abs().max().item(), (tor.float() - ref).abs().max().item(), "out")
    assert (lse - lse_r).abs().max().item() < 2e-3
    assert (tm - tm_r).abs().max().item() < 5e-3
    dout = torch.randn_like(out)
    _grads_by_rule_and_repeatable(out, out2, (q, k, v), ref, (qf, kf, vf), tor, dout, grads_repeatable=False)
