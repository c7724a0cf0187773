"""What other MM-DiTs need from taca.joint_attention (issue 12): per-sample text spans,
separate query and key token sets, grouped KV heads, SDPA-style masks, float64 exactness.

Every case states its text spans by hand (``k_spans`` / ``q_spans`` per sample), and
``_definition`` writes the rule out row by row from them; the materialized reference is checked
against that once, and every path (split SDPA, the kernels) against the reference. Scalars are
arbitrary float64 values (not float32-representable): float64 inputs must be exact to float64
rounding on every path.
"""
import math
from typing import NamedTuple, Optional

import pytest
import torch
import torch.nn.functional as F

import taca
from taca import ops, reference

GAMMA = 1.2345678901234
GAMMA_REV = 0.8765432109876
SCALE = 0.3141592653589793
EXACT = dict(atol=1e-12, rtol=1e-12)
EXACT_GRAD = dict(atol=1e-11, rtol=1e-10)


class Case(NamedTuple):
    name: str
    B: int
    H: int
    Hkv: int
    Nq: int
    Nk: int
    D: int
    layout: str
    kwargs: dict          # the span arguments of joint_attention (tensors as lists)
    k_spans: list         # per sample (begin, end) of the text keys, stated by hand
    q_spans: list         # per sample (begin, end) of the text queries
    mask: Optional[str]   # None or a mask kind for _make_mask


CASES = [
    Case("per_sample_first", 3, 2, 2, 12, 12, 8, "bhnd", dict(text_len=[3, 0, 5], text_first=True),
         [(0, 3), (0, 0), (0, 5)], [(0, 3), (0, 0), (0, 5)], None),
    Case("per_sample_last", 3, 2, 2, 12, 12, 8, "bnhd", dict(text_len=[2, 4, 12], text_first=False),
         [(10, 12), (8, 12), (0, 12)], [(10, 12), (8, 12), (0, 12)], None),
    Case("per_sample_start", 3, 1, 1, 10, 10, 16, "bhnd", dict(text_len=[3, 2, 6], text_start=[1, 4, 0]),
         [(1, 4), (4, 6), (0, 6)], [(1, 4), (4, 6), (0, 6)], None),
    Case("int_start_registers", 2, 2, 2, 13, 13, 8, "bnhd", dict(text_len=4, text_start=8),
         [(8, 12)] * 2, [(8, 12)] * 2, None),
    Case("image_queries_text_last", 2, 2, 2, 9, 14, 8, "bhnd", dict(text_len=5, text_first=False),
         [(9, 14)] * 2, [(0, 0)] * 2, None),
    Case("image_queries_text_first", 2, 3, 3, 9, 14, 8, "bnhd", dict(text_len=5, text_first=True),
         [(0, 5)] * 2, [(0, 0)] * 2, None),
    Case("flux2_kv", 2, 2, 2, 12, 18, 16, "bnhd", dict(text_len=4, query_text_len=4),
         [(0, 4)] * 2, [(0, 4)] * 2, None),
    Case("cross_per_sample", 2, 2, 2, 7, 11, 8, "bhnd",
         dict(text_len=[3, 5], text_start=[0, 6], query_text_start=[2, 0], query_text_len=[3, 1]),
         [(0, 3), (6, 11)], [(2, 5), (0, 1)], None),
    Case("cross_text_last_query_len", 2, 1, 1, 8, 11, 8, "bhnd",
         dict(text_len=3, text_first=False, query_text_len=2),
         [(8, 11)] * 2, [(6, 8)] * 2, None),
    Case("gqa", 2, 4, 2, 10, 10, 8, "bhnd", dict(text_len=3), [(0, 3)] * 2, [(0, 3)] * 2, None),
    Case("mqa_bnhd_text_last", 2, 3, 1, 10, 10, 8, "bnhd", dict(text_len=4, text_first=False),
         [(6, 10)] * 2, [(6, 10)] * 2, None),
    Case("bool_mask_b11k", 2, 2, 2, 10, 10, 8, "bhnd", dict(text_len=3), [(0, 3)] * 2, [(0, 3)] * 2, "bool_b11k"),
    Case("bool_mask_b1qk", 2, 2, 2, 10, 10, 8, "bnhd", dict(text_len=4, text_first=False),
         [(6, 10)] * 2, [(6, 10)] * 2, "bool_b1qk"),
    Case("float_mask_bhqk", 2, 2, 2, 10, 10, 8, "bhnd", dict(text_len=3), [(0, 3)] * 2, [(0, 3)] * 2, "float_bhqk"),
    Case("chroma_float01", 2, 2, 2, 10, 10, 8, "bnhd", dict(text_len=3), [(0, 3)] * 2, [(0, 3)] * 2, "float01_outer"),
    Case("mask_qk_2d", 2, 2, 2, 10, 10, 8, "bhnd", dict(text_len=3), [(0, 3)] * 2, [(0, 3)] * 2, "bool_qk"),
    Case("fully_masked_rows", 2, 2, 2, 10, 10, 8, "bhnd", dict(text_len=3), [(0, 3)] * 2, [(0, 3)] * 2,
         "bool_dead_rows"),
    Case("float_mask_f32_neg_inf", 2, 2, 2, 10, 10, 8, "bhnd", dict(text_len=3), [(0, 3)] * 2, [(0, 3)] * 2,
         "float32_neginf"),
    Case("everything", 3, 4, 2, 9, 13, 8, "bnhd",
         dict(text_len=[4, 2, 0], text_start=[0, 5, 3], query_text_start=[0, 1, 0], query_text_len=[2, 0, 3]),
         [(0, 4), (5, 7), (3, 3)], [(0, 2), (1, 1), (0, 3)], "bool_b1qk"),
]
NAMES = [c.name for c in CASES]


def _make_mask(kind, B, H, Nq, Nk, dtype):
    g = torch.Generator().manual_seed(7)
    if kind == "bool_b11k":
        m = torch.rand(B, 1, 1, Nk, generator=g) < 0.7
        m[..., 0] = True
        return m
    if kind == "bool_b1qk":
        m = torch.rand(B, 1, Nq, Nk, generator=g) < 0.6
        m[..., 0] = True
        return m
    if kind == "bool_qk":
        m = torch.rand(Nq, Nk, generator=g) < 0.6
        m[:, -1] = True
        return m
    if kind == "float_bhqk":
        return torch.randn(B, H, Nq, Nk, generator=g).to(dtype)
    if kind == "float_bh1k":  # a key mask per head: additive, -inf on a third of the keys (one kept per head)
        m = torch.randn(B, H, 1, Nk, generator=g)
        m[torch.rand(B, H, 1, Nk, generator=g) < 0.3] = -math.inf
        m[..., 0] = 0.0
        return m.to(dtype)
    if kind == "float01_outer":  # Chroma: additive 0/1 outer product of a token mask
        t = (torch.rand(B, Nq, generator=g) < 0.7).to(dtype)
        return (t[:, :, None] * t[:, None, :])[:, None]
    if kind == "bool_dead_rows":
        m = torch.rand(B, H, Nq, Nk, generator=g) < 0.6
        m[..., 0] = True
        m[0, 1, 2] = False  # a visual query row with every key masked
        m[1, :, 1] = False  # a text query row, every head
        return m
    if kind == "bool_pad_text":  # a padded prompt (Qwen-Image): sample B-1's text keys 90..255 masked, the rest kept
        m = torch.ones(B, 1, 1, Nk, dtype=torch.bool)
        m[-1, ..., 90:256] = False
        return m
    if kind == "float32_neginf":
        m = torch.randn(B, 1, Nq, Nk, generator=g)
        m[1, 0, 5] = -math.inf  # fully masked by an additive -inf row
        m[0, 0, :, 2] = -math.inf
        return m
    raise ValueError(kind)


def _tensorize(kw, device="cpu"):
    return {k: (torch.tensor(v, device=device) if isinstance(v, list) else v) for k, v in kw.items()}


def make(case: Case, dtype=torch.float64, requires_grad=False, device="cpu"):
    """q, k, v (in the case's layout), the joint_attention kwargs (spans, mask, scalars)."""
    B, H, Hkv, Nq, Nk, D = case.B, case.H, case.Hkv, case.Nq, case.Nk, case.D
    if case.layout == "bhnd":
        shapes = ((B, H, Nq, D), (B, Hkv, Nk, D))
    else:
        shapes = ((B, Nq, H, D), (B, Nk, Hkv, D))
    q = torch.randn(shapes[0], dtype=dtype, device=device)
    k, v = (torch.randn(shapes[1], dtype=dtype, device=device) for _ in range(2))
    if requires_grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    kw = _tensorize(case.kwargs, device)
    kw.update(gamma=torch.tensor([GAMMA, 0.7, 1.9][:B], dtype=torch.float64, device=device),
              gamma_reverse=GAMMA_REV, scale=SCALE, layout=case.layout)
    if case.mask is not None:
        mdt = torch.float32 if case.mask == "float32_neginf" else dtype
        kw["attn_mask"] = _make_mask(case.mask, B, H, Nq, Nk, mdt).to(device)
    return q, k, v, kw


def _definition(q, k, v, case: Case, kw):
    """The rule written out per (b, h, i) from the hand-stated spans (float64)."""
    bh = (lambda t: t) if case.layout == "bhnd" else (lambda t: t.transpose(1, 2))
    q, k, v = (bh(t).double() for t in (q, k, v))
    B, H, Nq, D = q.shape
    group = H // k.shape[1]
    gamma = kw["gamma"].double()
    mask = kw.get("attn_mask")
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, -math.inf)
        mask = mask.double().expand(B, H, Nq, k.shape[2])
    out = torch.zeros_like(q)
    lse = torch.zeros(B, H, Nq, dtype=torch.float64)
    tm = torch.zeros(B, H, Nq, dtype=torch.float64)
    for b in range(B):
        kb, ke = case.k_spans[b]
        qb, qe = case.q_spans[b]
        key_text = torch.tensor([kb <= j < ke for j in range(k.shape[2])])
        for h in range(H):
            for i in range(Nq):
                query_text = qb <= i < qe
                s = (k[b, h // group] @ q[b, h, i]) * kw["scale"]
                mult = torch.tensor([(1.0 if key_text[j] else kw["gamma_reverse"]) if query_text
                                     else (float(gamma[b]) if key_text[j] else 1.0)
                                     for j in range(k.shape[2])], dtype=torch.float64)
                s = s * mult
                if mask is not None:
                    s = s + mask[b, h, i]
                if torch.isinf(s).all():
                    lse[b, h, i] = -math.inf
                    continue
                p = torch.softmax(s, 0)
                out[b, h, i] = p @ v[b, h // group]
                lse[b, h, i] = torch.logsumexp(s, 0)
                tm[b, h, i] = p[key_text].sum()
    return bh(out), lse, tm


# ---------------------------------------------------------------------------------------
# the reference against the rule written out; the split form against the reference
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_reference_matches_definition(name):
    case = CASES[NAMES.index(name)]
    q, k, v, kw = make(case)
    got = reference.attention_ref(q, k, v, **kw)
    want = _definition(q, k, v, case, kw)
    for a, b, nm in zip(got, want, ("out", "lse", "text_mass")):
        torch.testing.assert_close(a, b, **EXACT, msg=lambda m: f"{nm}: {m}")


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


@pytest.mark.parametrize("name", NAMES)
def test_split_sdpa_float64_exact(name):
    case = CASES[NAMES.index(name)]
    q, k, v, kw = make(case, requires_grad=True)
    out = reference.attention_split_sdpa(q, k, v, **kw)
    ref = reference.attention_ref(q, k, v, **kw)[0]
    torch.testing.assert_close(out, ref, **EXACT)
    dout = torch.randn_like(out)
    for a, b, nm in zip(_grads(out, (q, k, v), dout), _grads(ref, (q, k, v), dout), "qkv"):
        torch.testing.assert_close(a, b, **EXACT_GRAD, msg=lambda m: f"d{nm}: {m}")


@pytest.mark.parametrize("name", ["per_sample_start", "flux2_kv", "cross_per_sample", "mqa_bnhd_text_last",
                                  "float_mask_bhqk", "fully_masked_rows", "everything"])
def test_split_sdpa_gradcheck(name, one_thread):
    case = CASES[NAMES.index(name)]
    q, k, v, kw = make(case, requires_grad=True)
    g = kw.pop("gamma").clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda q, k, v, g: reference.attention_split_sdpa(q, k, v, gamma=g, **kw), (q, k, v, g),
        eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# taca.joint_attention on every path
# ---------------------------------------------------------------------------------------

def _cpu_kernel_covers(case: Case) -> bool:
    q, k, v, kw = make(case)
    spans = reference.resolve_spans(case.Nq, case.Nk, kw["text_len"], kw.get("text_first", True),
                                    kw.get("text_start"), kw.get("query_text_start"), kw.get("query_text_len"))
    return ops.HAVE_KERNELS and ops._feature_refusal(
        "cpu", spans.per_sample, case.Nq != case.Nk, case.H != case.Hkv, kw.get("attn_mask")) is None


BACKENDS = ["auto", "sdpa", "reference", "cpu"]
# The C ABI carries scale and gamma_reverse as double and gamma in the accumulation type
# (taca.h): the kernels are float64-exact too.
KERNEL_F64_EXACT = True
F64_BACKENDS = BACKENDS if KERNEL_F64_EXACT else ["sdpa", "reference"]


@pytest.mark.parametrize("backend", F64_BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_joint_attention_float64_exact(name, backend):
    case = CASES[NAMES.index(name)]
    if backend == "cpu" and not _cpu_kernel_covers(case):
        pytest.skip("the CPU kernel does not cover this case (auto routes it to split SDPA)")
    q, k, v, kw = make(case, requires_grad=True)
    out = taca.joint_attention(q, k, v, backend=backend, **kw)
    ref = reference.attention_ref(q, k, v, **kw)[0]
    assert out.shape == q.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, **EXACT)
    dout = torch.randn_like(out)
    for a, b, nm in zip(_grads(out, (q, k, v), dout), _grads(ref, (q, k, v), dout), "qkv"):
        torch.testing.assert_close(a, b, **EXACT_GRAD, msg=lambda m: f"d{nm}: {m}")
    if backend != "sdpa":
        _, lse, tm = taca.joint_attention(q, k, v, backend=backend, return_lse=True, return_text_mass=True, **kw)
        _, rlse, rtm = reference.attention_ref(q, k, v, **kw)
        torch.testing.assert_close(lse, rlse, **EXACT)
        torch.testing.assert_close(tm, rtm, **EXACT)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["per_sample_last", "flux2_kv", "gqa", "bool_mask_b1qk", "float_mask_bhqk",
                                  "fully_masked_rows", "everything"])
def test_joint_attention_float32(name, backend):
    case = CASES[NAMES.index(name)]
    if backend == "cpu" and not _cpu_kernel_covers(case):
        pytest.skip("the CPU kernel does not cover this case")
    q, k, v, kw = make(case, torch.float32, requires_grad=True)
    out, lse, tm = taca.joint_attention(q, k, v, backend=backend, return_lse=True, return_text_mass=True, **kw)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    kw64 = dict(kw)
    if "attn_mask" in kw and kw["attn_mask"].is_floating_point():
        kw64["attn_mask"] = kw["attn_mask"].double()
    ref, rlse, rtm = reference.attention_ref(q64, k64, v64, **kw64)
    assert out.dtype == lse.dtype == tm.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=0)
    torch.testing.assert_close(lse.double(), rlse, atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(tm.double(), rtm, atol=2e-6, rtol=0)
    out = taca.joint_attention(q, k, v, backend=backend, **kw)
    dout = torch.randn_like(out)
    for a, b, nm in zip(_grads(out, (q, k, v), dout), _grads(ref, (q64, k64, v64), dout.double()), "qkv"):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5, msg=lambda m: f"d{nm}: {m}")


@pytest.mark.parametrize("backend", F64_BACKENDS)
@pytest.mark.parametrize("mask_kind", ["bool_b11k", "bool_b1qk", "float_bhqk", "float01_outer", "bool_dead_rows"])
def test_gamma_one_with_mask_equals_sdpa(mask_kind, backend):
    case = Case("m", 2, 4, 2, 10, 10, 8, "bhnd", dict(text_len=3), [], [], mask_kind)
    if backend == "cpu" and not _cpu_kernel_covers(case):
        pytest.skip("the CPU kernel does not cover this case")
    q, k, v, kw = make(case)
    kw.update(gamma=1.0, gamma_reverse=1.0)
    out = taca.joint_attention(q, k, v, backend=backend, **kw)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=kw["attn_mask"], scale=SCALE, enable_gqa=True)
    torch.testing.assert_close(out, want, **EXACT)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_match_sdpa(backend):
    case = CASES[NAMES.index("fully_masked_rows")]
    if backend == "cpu" and not _cpu_kernel_covers(case):
        pytest.skip("the CPU kernel does not cover this case")
    q, k, v, kw = make(case, torch.float32, requires_grad=True)
    out = taca.joint_attention(q, k, v, backend=backend, **kw)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=kw["attn_mask"])  # what stock SDPA returns
    dead = ~kw["attn_mask"].any(-1)
    assert dead.sum() == 1 + case.H
    assert torch.equal(out[dead], torch.zeros_like(out[dead])) and torch.equal(want[dead], out[dead])
    assert torch.isfinite(out).all()
    _, lse, tm = taca.joint_attention(q, k, v, backend=backend, return_lse=True, return_text_mass=True, **kw)
    assert torch.equal(lse[dead], torch.full_like(lse[dead], -math.inf)) and torch.isfinite(lse[~dead]).all()
    assert torch.equal(tm[dead], torch.zeros_like(tm[dead]))
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.equal(dq[dead], torch.zeros_like(dq[dead]))
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))


@pytest.mark.parametrize("backend", F64_BACKENDS)
def test_per_sample_tensor_equals_per_sample_calls(backend):
    # a (B,) text_len gives each sample what a call with its own int text_len gives it
    q, k, v = (torch.randn(3, 2, 11, 8, dtype=torch.float64) for _ in range(3))
    lens = torch.tensor([0, 4, 11])
    for tf in (True, False):
        got = taca.joint_attention(q, k, v, text_len=lens, text_first=tf, gamma=GAMMA, gamma_reverse=GAMMA_REV,
                                   backend=backend)
        for b in range(3):
            want = taca.joint_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], text_len=int(lens[b]),
                                        text_first=tf, gamma=GAMMA, gamma_reverse=GAMMA_REV, backend=backend)
            torch.testing.assert_close(got[b:b + 1], want, **EXACT)


def test_gqa_equals_repeated_kv():
    q = torch.randn(2, 6, 9, 8, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 9, 8, dtype=torch.float64) for _ in range(2))
    for be in F64_BACKENDS:
        got = taca.joint_attention(q, k, v, text_len=3, gamma=GAMMA, backend=be)
        want = taca.joint_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), text_len=3,
                                    gamma=GAMMA, backend=be)
        torch.testing.assert_close(got, want, **EXACT)


def test_float64_scalars_are_exact_on_the_plain_path():
    # one shared span, equal token sets (the kernels' oldest path): arbitrary float64 gamma,
    # gamma_reverse and scale must not be rounded to float32 anywhere
    q, k, v = (torch.randn(2, 2, 20, 16, dtype=torch.float64) for _ in range(3))
    kw = dict(text_len=7, gamma=torch.tensor([GAMMA, 1.0 / 3.0], dtype=torch.float64),
              gamma_reverse=GAMMA_REV, scale=SCALE)
    ref, rlse, rtm = reference.attention_ref(q, k, v, **kw)
    for be in ["sdpa", "reference"] + (["cpu", "auto"] if ops.HAVE_KERNELS and KERNEL_F64_EXACT else []):
        out = taca.joint_attention(q, k, v, backend=be, **kw)
        torch.testing.assert_close(out, ref, **EXACT, msg=lambda m: f"{be}: {m}")
    for g in (GAMMA, 1.0 / 3.0):  # a float gamma too
        kw1 = dict(kw, gamma=g)
        ref1 = reference.attention_ref(q, k, v, **kw1)[0]
        for be in ["sdpa"] + (["cpu"] if ops.HAVE_KERNELS and KERNEL_F64_EXACT else []):
            torch.testing.assert_close(taca.joint_attention(q, k, v, backend=be, **kw1), ref1, **EXACT)


def test_auto_routes_uncovered_cases_to_split_with_a_log_line(monkeypatch, caplog):
    monkeypatch.setattr(ops, "_KERNEL_FEATURES", {"cpu": (), "cuda": ()})
    case = CASES[NAMES.index("everything")]
    q, k, v, kw = make(case)
    with caplog.at_level("DEBUG", logger="taca"):
        out = taca.joint_attention(q, k, v, **kw)
    torch.testing.assert_close(out, reference.attention_ref(q, k, v, **kw)[0], **EXACT)
    if ops.HAVE_KERNELS:
        assert "does not support per-sample text spans, different query and key token sets, grouped KV heads, " \
               "attn_mask" in caplog.text
        with pytest.raises(RuntimeError, match="backend='cpu' cannot run: the cpu kernel does not support"):
            taca.joint_attention(q, k, v, backend="cpu", **kw)


# ---------------------------------------------------------------------------------------
# bad input: every new argument is checked before dispatch, naming the argument
# ---------------------------------------------------------------------------------------

B_, H_, N_, D_ = 2, 4, 10, 8


def _call(q=None, k=None, v=None, **kw):
    q = torch.randn(B_, H_, N_, D_) if q is None else q
    k = torch.randn(B_, H_, N_, D_) if k is None else k
    v = torch.randn(B_, H_, N_, D_) if v is None else v
    kw.setdefault("text_len", 3)
    return taca.joint_attention(q, k, v, **kw)


BAD = [
    ("text_len_tensor_float", dict(text_len=torch.tensor([1.0, 2.0])), TypeError, "text_len tensor must have an integer dtype"),
    ("text_len_tensor_bool", dict(text_len=torch.tensor([True, False])), TypeError, "text_len tensor must have an integer dtype"),
    ("text_len_tensor_shape", dict(text_len=torch.tensor([1, 2, 3])), ValueError, r"text_len must be an int or a \(2,\) integer tensor.*got shape \(3,\)"),
    ("text_len_tensor_0d", dict(text_len=torch.tensor(3)), ValueError, r"text_len must be an int or a \(2,\) integer tensor"),
    ("text_len_tensor_range", dict(text_len=torch.tensor([3, 11])), ValueError, r"key text span of sample 1, \[0, 11\)"),
    ("text_len_tensor_negative", dict(text_len=torch.tensor([-1, 2])), ValueError, r"key text span of sample 0"),
    ("text_len_tensor_device", dict(text_len=torch.tensor([1, 2], device="meta")), ValueError, "text_len is on meta"),
    ("text_start_float", dict(text_start=1.0), TypeError, "text_start must be an int or a .* or None"),
    ("text_start_range", dict(text_start=8), ValueError, r"key text span \[8, 11\) \(text_start, text_len\) must lie in \[0, 10\]"),
    ("text_start_negative", dict(text_start=-1), ValueError, r"key text span \[-1, 2\)"),
    ("text_start_tensor_range", dict(text_start=torch.tensor([0, 8])), ValueError, r"key text span of sample 1, \[8, 11\)"),
    ("query_text_len_range", dict(query_text_len=11), ValueError, r"query text span \[0, 11\)"),
    ("query_text_start_range", dict(query_text_start=torch.tensor([0, 9])), ValueError, r"query text span of sample 1, \[9, 12\)"),
    ("query_text_start_without_len", dict(k=torch.randn(B_, H_, N_ + 2, D_), v=torch.randn(B_, H_, N_ + 2, D_),
                                          query_text_start=1), ValueError, "query_text_start needs query_text_len"),
    ("kv_token_mismatch", dict(k=torch.randn(B_, H_, N_ + 1, D_)), ValueError, "k and v must have the same shape"),
    ("kv_batch", dict(k=torch.randn(B_ + 1, H_, N_, D_), v=torch.randn(B_ + 1, H_, N_, D_)), ValueError, "q's batch size and head dim"),
    ("kv_head_dim", dict(k=torch.randn(B_, H_, N_, D_ + 1), v=torch.randn(B_, H_, N_, D_ + 1)), ValueError, "q's batch size and head dim"),
    ("gqa_not_divisible", dict(k=torch.randn(B_, 3, N_, D_), v=torch.randn(B_, 3, N_, D_)), ValueError, "4 heads must be a multiple of k and v's 3 heads"),
    ("gqa_more_kv_heads", dict(k=torch.randn(B_, 8, N_, D_), v=torch.randn(B_, 8, N_, D_)), ValueError, "must be a multiple of k and v's 8 heads"),
    ("mask_not_tensor", dict(attn_mask=[[True]]), TypeError, "attn_mask must be None or a torch.Tensor"),
    ("mask_int", dict(attn_mask=torch.ones(B_, 1, 1, N_, dtype=torch.int64)), TypeError, "attn_mask must be bool .* got torch.int64"),
    ("mask_float64_for_float32", dict(attn_mask=torch.zeros(B_, 1, 1, N_, dtype=torch.float64)), TypeError, "attn_mask must be bool"),
    ("mask_bk_2d", dict(attn_mask=torch.ones(B_, N_, dtype=torch.bool)), ValueError,
     r"attn_mask of shape \(2, 10\) does not broadcast to \(B, H, N_q, N_k\) = \(2, 4, 10, 10\).*\(B, 1, 1, N_k\)"),
    ("mask_5d", dict(attn_mask=torch.ones(1, B_, 1, 1, N_, dtype=torch.bool)), ValueError, "does not broadcast"),
    ("mask_wrong_keys", dict(attn_mask=torch.ones(B_, 1, 1, N_ + 1, dtype=torch.bool)), ValueError, "does not broadcast"),
    ("mask_wrong_heads", dict(attn_mask=torch.ones(B_, 3, N_, N_, dtype=torch.bool)), ValueError, "does not broadcast"),
    ("mask_device", dict(attn_mask=torch.ones(B_, 1, 1, N_, dtype=torch.bool, device="meta")), ValueError, "attn_mask is on meta"),
]


@pytest.mark.parametrize("kw,exc,pattern", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
@pytest.mark.parametrize("backend", ["auto", "sdpa", "reference"])
def test_bad_new_arguments(kw, exc, pattern, backend):
    with pytest.raises(exc, match=pattern):
        _call(backend=backend, **kw)


def test_mask_b_nk_is_fine_when_it_broadcasts():
    # (1, N_k) and (N_q, N_k) are SDPA-broadcastable and accepted
    _call(attn_mask=torch.ones(1, N_, dtype=torch.bool))
    _call(attn_mask=torch.zeros(N_, N_))


# ---------------------------------------------------------------------------------------
# the CPU kernel: gradcheck, the portable float32 path, the registered op, torch.compile
# ---------------------------------------------------------------------------------------

requires_ext = pytest.mark.skipif(not ops.HAVE_KERNELS, reason="taca._C extension not built")

SMALL = [Case("s_per_sample_cross_gqa_mask", 2, 2, 1, 5, 7, 4, "bnhd",
              dict(text_len=[2, 3], text_start=[0, 4], query_text_start=[1, 0], query_text_len=[2, 0]),
              [], [], "bool_b1qk"),
         Case("s_float_mask_text_last", 2, 2, 2, 6, 6, 4, "bhnd", dict(text_len=2, text_first=False), [], [],
              "float_bhqk"),
         Case("s_dead_rows", 2, 2, 2, 10, 10, 4, "bhnd", dict(text_len=3), [], [], "bool_dead_rows"),
         Case("s_flux2_kv", 1, 2, 2, 6, 9, 4, "bnhd", dict(text_len=2, query_text_len=2), [], [], None)]


@requires_ext
@pytest.mark.parametrize("case", SMALL, ids=[c.name for c in SMALL])
def test_cpu_kernel_gradcheck(case, one_thread):
    q, k, v, kw = make(case, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: taca.joint_attention(q, k, v, backend="cpu", **kw),
                                    (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


@requires_ext
@pytest.mark.parametrize("name", ["everything", "fully_masked_rows", "float_mask_bhqk", "flux2_kv"])
def test_cpu_portable_float32_path(name, monkeypatch):
    # the float32 path of CPUs without AVX2 (TACA_CPU_PORTABLE=1, read at every call)
    monkeypatch.setenv("TACA_CPU_PORTABLE", "1")
    test_joint_attention_float32(name, "cpu")


def _raw_args(case: Case, dtype=torch.float32, requires_grad=False):
    q, k, v, kw = make(case, dtype, requires_grad)
    bn = (lambda t: t.transpose(1, 2)) if case.layout == "bhnd" else (lambda t: t)
    spans = reference.resolve_spans(case.Nq, case.Nk, kw["text_len"], kw.get("text_first", True),
                                    kw.get("text_start"), kw.get("query_text_start"), kw.get("query_text_len"))
    cols = [x if isinstance(x, torch.Tensor) else torch.full((case.B,), x, dtype=torch.int64) for x in spans]
    mask = kw.get("attn_mask")
    if mask is not None and mask.is_floating_point():
        mask = mask.to(dtype)
    g = kw["gamma"].to(dtype)
    return (bn(q), bn(k), bn(v), g, GAMMA_REV, SCALE, 0, 0, False, 0, 0, torch.stack(cols, 1), mask)


@requires_ext
@pytest.mark.parametrize("name,requires_grad", [("everything", False), ("everything", True),
                                                ("float_mask_bhqk", True), ("gqa", True)])
def test_opcheck_fwd_new_arguments(name, requires_grad, one_thread):
    args = _raw_args(CASES[NAMES.index(name)], requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.taca.fwd.default, args)


@requires_ext
def test_opcheck_fwd_shared_query_span_and_bwd(one_thread):
    case = CASES[NAMES.index("flux2_kv")]
    q, k, v, _, gr, sc, *_ = _raw_args(case)
    g = torch.tensor([GAMMA, 0.7], dtype=torch.float32)
    fwd_args = (q, k, v, g, gr, sc, 0, 4, False, 0, 4, None, None)
    torch.library.opcheck(torch.ops.taca.fwd.default, fwd_args)
    out, lse, _ = torch.ops.taca.fwd(*fwd_args)
    args = _raw_args(CASES[NAMES.index("everything")])
    o2, l2, _ = torch.ops.taca.fwd(*args)
    for bwd_args in ((torch.randn_like(out), q, k, v, out, lse, g, gr, sc, 0, 4, 0, 4, None, None),
                     (torch.randn_like(o2), *args[:3], o2, l2, *args[3:8], *args[9:])):
        torch.library.opcheck(torch.ops.taca.bwd.default, bwd_args)


@requires_ext
def test_raw_op_checks_new_arguments():
    args = list(_raw_args(CASES[NAMES.index("everything")]))
    bad_spans = args[11].clone()
    bad_spans[1, 1] = 99
    with pytest.raises(ValueError, match=r"text_spans\[1\] key span \[5, 99\)"):
        torch.ops.taca.fwd(*args[:11], bad_spans, args[12])
    with pytest.raises(ValueError, match=r"text_spans must be a \(3, 4\) tensor"):
        torch.ops.taca.fwd(*args[:11], args[11][:, :3], args[12])
    with pytest.raises(ValueError, match="attn_mask of shape"):
        torch.ops.taca.fwd(*args[:12], args[12][..., :-1])
    with pytest.raises(ValueError, match=r"query text range \[0, 99\)"):
        torch.ops.taca.fwd(*args[:9], 0, 99, None, None)
    with pytest.raises(TypeError, match="gamma must be float32"):
        torch.ops.taca.fwd(args[0], args[1], args[2], args[3].double(), *args[4:])
    with pytest.raises(ValueError, match="heads must be a multiple of k's"):
        kv3 = torch.randn(3, 13, 3, 8)  # 3 kv heads for 4 query heads
        torch.ops.taca.fwd(args[0], kv3, kv3, *args[3:])


@requires_ext
def test_compiled_features_without_recompiles():
    import torch._dynamo

    torch._dynamo.reset()
    old = torch._dynamo.config.error_on_recompile
    torch._dynamo.config.error_on_recompile = True
    try:
        case = CASES[NAMES.index("everything")]

        def f(q, k, v, gamma, text_len, text_start, qs, ql, mask):
            return taca.joint_attention(q, k, v, text_len=text_len, text_start=text_start, query_text_start=qs,
                                        query_text_len=ql, attn_mask=mask, gamma=gamma, gamma_reverse=GAMMA_REV,
                                        scale=SCALE, layout=case.layout)

        cf = torch.compile(f, fullgraph=True, backend="aot_eager")
        for seed in range(3):
            torch.manual_seed(seed)
            q, k, v, kw = make(case, torch.float32, requires_grad=True)
            lens = torch.randint(0, 5, (case.B,))
            gamma = torch.rand(case.B) + 0.5
            a = (q, k, v, gamma, lens, kw["text_start"], kw["query_text_start"], kw["query_text_len"],
                 kw["attn_mask"])
            got, want = cf(*a), f(*a)
            torch.testing.assert_close(got, want)
            dout = torch.randn_like(got)
            for x, y in zip(torch.autograd.grad(got, (q, k, v), dout), torch.autograd.grad(want, (q, k, v), dout)):
                torch.testing.assert_close(x, y)
    finally:
        torch._dynamo.config.error_on_recompile = old
        torch._dynamo.reset()
