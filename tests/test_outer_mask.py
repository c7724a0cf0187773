"""Outer-product masks: Chroma's float (B, 1, N, N) mask m_i * m_j for a 0/1 token vector m, run as the key-mask
kernel over every row plus a maskless kernel call over the m_i = 0 rows, and a bool m_i & m_j (an outer-AND), run
as the key-mask kernel with the m_i = 0 rows set to a fully masked row's values (``ops._outer_mask_rows`` /
``ops._outer_mask_attention``; backend="auto" takes them on CUDA). Here on the CPU kernel in float64: exact against
the materialized reference, values and gradients; the detection against masks that are not such products."""
import pytest
import torch

from taca import ops, reference

GAMMA = 1.2345678901234
GAMMA_REV = 0.8765432109876
SCALE = 0.3141592653589793
EXACT = dict(atol=1e-12, rtol=1e-12)
EXACT_GRAD = dict(atol=1e-11, rtol=1e-10)

needs_cpu_kernel = pytest.mark.skipif(not ops.HAVE_KERNELS, reason="the compiled CPU kernel is not built")


def exact_against(got, want, qkv):
    """(out, lse, text_mass) and out's gradients of q, k, v equal the materialized reference's to float64 rounding."""
    for a, b, nm in zip(got, want, ("out", "lse", "text_mass")):
        torch.testing.assert_close(a, b.detach() if nm != "out" else b, **EXACT, msg=lambda s: f"{nm}: {s}")
    dout = torch.randn_like(got[0])
    ga = torch.autograd.grad(got[0], qkv, dout)
    gb = torch.autograd.grad(want[0], qkv, dout)
    for a, b, nm in zip(ga, gb, ("dq", "dk", "dv")):
        torch.testing.assert_close(a, b, **EXACT_GRAD, msg=lambda s: f"{nm}: {s}")


def _tokens(B, N, zero_rows, dtype=torch.float64):
    """m: (B, N) ones with zeros at zero_rows[b] (a list of index lists)."""
    m = torch.ones(B, N, dtype=dtype)
    for b, rows in enumerate(zero_rows):
        m[b, rows] = 0
    return m


def _outer(m):
    return (m[:, :, None] * m[:, None, :])[:, None]


def _inputs(B, H, N, D, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (B, H, N, D) if layout == "bhnd" else (B, N, H, D)
    return tuple(torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))


def test_rows_detected():
    # ChromaPipeline's pattern: text tokens [0, 12) with sample 0's valid up to 5 (one padding token kept valid) and
    # sample 1's up to 2; image tokens all valid
    m = _tokens(2, 40, [list(range(6, 12)), list(range(3, 12))])
    for dt in (torch.float32, torch.bfloat16):
        mask = _outer(m).to(dt)
        kmask, zrows, r0, r1 = ops._outer_mask_rows(mask)
        assert (r0, r1) == (3, 12)
        assert kmask.shape == (2, 1, 1, 40) and kmask.dtype == dt and torch.equal(kmask[:, 0, 0], m.to(dt))
        assert torch.equal(zrows, m[:, 3:12] == 0)


def test_rows_detected_bool():
    m = _tokens(2, 30, [[20, 21, 29], []]) > 0  # HunyuanVideo 1.5: invalid context tokens last
    kmask, zrows, r0, r1 = ops._outer_mask_rows(m[:, None, None, :] & m[:, None, :, None])
    assert (r0, r1) == (20, 30) and kmask.dtype == torch.bool and torch.equal(kmask[:, 0, 0], m)
    assert torch.equal(zrows, ~m[:, 20:30])


def test_rows_no_zero_row_and_broadcast_batch():
    mask = torch.ones(1, 1, 9, 9)
    kmask, zrows, r0, r1 = ops._outer_mask_rows(mask)
    assert r0 == r1 and zrows.shape == (1, 0) and kmask.shape == (1, 1, 1, 9)


@pytest.mark.parametrize("kind", ["not_product", "values_0_2", "bool_not_product", "per_head", "key_mask",
                                  "neg_inf", "rect"])
def test_rows_refused(kind):
    m = _tokens(2, 10, [[7, 8], [9]])
    mask = _outer(m).float()
    if kind == "not_product":
        mask[0, 0, 1, 8] = 1.0  # row 1 (m = 1) adds 1 to key 8 (m = 0)
    elif kind == "values_0_2":
        mask = _outer(2 * m).float()
    elif kind == "bool_not_product":
        mask = mask.bool()
        mask[1, 0, 9, 2] = True  # row 9 (m = 0) keeps key 2
    elif kind == "per_head":
        mask = mask.expand(2, 3, 10, 10).contiguous()
    elif kind == "key_mask":
        mask = mask[:, :, :1]
    elif kind == "neg_inf":
        mask = mask.masked_fill(mask == 0, float("-inf"))
    elif kind == "rect":
        mask = mask[..., :7]
    assert ops._outer_mask_rows(mask) is None


@pytest.mark.parametrize("bad", [None, (0, 1, 8), (1, 9, 3)])  # no fault, one in the first chunk, one in the last
def test_rows_in_chunks(bad, monkeypatch):
    """Compared a few rows at a time (as a 4608-token mask is, in 16M-element chunks), with an early exit after the
    first chunk: the same answers."""
    monkeypatch.setattr(ops, "_OUTER_CHUNK", 30)  # 3 rows of 10 a chunk: 4 chunks a sample
    for dt in (torch.float32, torch.bool):
        m = _tokens(2, 10, [[7, 8], [9]])
        mask = _outer(m).float() if dt == torch.float32 else _outer(m) > 0
        if bad is not None:
            b, i, j = bad
            mask[b, 0, i, j] = 0.5 if dt == torch.float32 else not mask[b, 0, i, j]
        got = ops._outer_mask_rows(mask)
        assert (got is None) == (bad is not None)
        if got is not None:
            assert got[2:] == (7, 10) and torch.equal(got[1], m[:, 7:] == 0)


def test_rows_rechecked_after_inplace_change():
    mask = _outer(_tokens(1, 8, [[5]])).float()
    assert ops._outer_mask_rows(mask) is not None
    assert ops._outer_mask_rows(mask) is not None  # the cached entry
    mask[0, 0, 0, 5] = 0.5  # no longer a product: the version moved, so it is checked again
    assert ops._outer_mask_rows(mask) is None


@needs_cpu_kernel
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("text_first", [True, False])
@pytest.mark.parametrize("pattern", ["chroma", "scattered", "none", "broadcast"])
@pytest.mark.parametrize("kind", ["float", "bool"])
def test_outer_mask_attention_exact(layout, text_first, pattern, kind):
    """out, lse and text_mass, and the gradients of q, k, v, equal the materialized reference's with the same
    (B, 1, N, N) mask to float64 rounding (bool: the m_i = 0 rows fully masked, out 0, lse -inf)."""
    B, H, N, D, L = 2, 3, 23, 8, 9
    txt = list(range(0, L)) if text_first else list(range(N - L, N))
    zero = {"chroma": [txt[5:], txt[2:]],
            "scattered": [[1, 4, 17], [0, 22, 11, 12]],  # image rows too, and holes
            "none": [[], []],
            "broadcast": [txt[4:]]}[pattern]
    m = _tokens(len(zero), N, zero)
    mask = _outer(m) if kind == "float" else _outer(m) > 0
    q, k, v = (t.requires_grad_() for t in _inputs(B, H, N, D, layout))
    kw = dict(text_len=L, text_first=text_first, gamma=torch.tensor([GAMMA, 0.7], dtype=torch.float64),
              gamma_reverse=GAMMA_REV, scale=SCALE, layout=layout)
    outer = ops._outer_mask_rows(mask)
    assert outer is not None
    spans = reference.resolve_spans(N, N, L, text_first)
    got = ops._outer_mask_attention(q, k, v, outer, spans, layout, True, True, gamma=kw["gamma"],
                                    gamma_reverse=GAMMA_REV, scale=SCALE, deterministic=True, backend="cpu")
    want = reference.attention_ref(q, k, v, attn_mask=mask, **kw)
    exact_against(got, want, (q, k, v))
    # only out asked: a tensor, the same values
    only = ops._outer_mask_attention(q.detach(), k.detach(), v.detach(), outer, spans, layout, False, False,
                                     gamma=kw["gamma"], gamma_reverse=GAMMA_REV, scale=SCALE, deterministic=True,
                                     backend="cpu")
    assert isinstance(only, torch.Tensor) and torch.equal(only, got[0].detach())


def test_hint_checks_the_first_mask_of_a_kind_and_takes_the_rest(monkeypatch):
    """``_outer_hint``: the first mask built from a token mask (per block kind, mask shape and dtype) is checked;
    later masks from the same token mask and kind are entered without a read; a mask that is not that token mask's
    product, or a changed token mask, is checked again."""
    calls = []
    orig = ops._outer_mask_rows

    def counting(mask):
        calls.append(mask)
        return orig(mask)

    monkeypatch.setattr(ops, "_outer_mask_rows", counting)
    tok = _tokens(2, 12, [[8, 9, 10, 11], [5, 6, 7, 8, 9, 10, 11]]).float()
    masks = [_outer(tok) for _ in range(3)]  # new tensors, as Chroma's blocks build them
    ops._outer_hint(masks[0], tok, "transformer_blocks")
    assert len(calls) == 1
    ops._outer_hint(masks[1], tok, "transformer_blocks")
    assert len(calls) == 1  # taken on trust
    ops._outer_hint(masks[2], tok, "single_transformer_blocks")
    assert len(calls) == 2  # a new kind: checked
    monkeypatch.setattr(ops, "_outer_mask_rows", orig)
    got = ops._outer_mask_rows(masks[1])  # entered by the hint: no check needed
    assert got is not None and got[2:] == (5, 12) and torch.equal(got[0][:, 0, 0], tok)
    # a product of another token mask: no entry from the hint
    other = _tokens(2, 12, [[0], []]).float()
    wrong = _outer(other)
    monkeypatch.setattr(ops, "_outer_mask_rows", counting)
    ops._outer_hint(wrong, tok, "k2")
    assert len(calls) == 3
    # the token mask changed in place: checked again
    tok[0, 8] = 1.0
    ops._outer_hint(_outer(tok), tok, "transformer_blocks")
    assert len(calls) == 4
    # shapes that do not fit: ignored
    ops._outer_hint(masks[0], tok[:, :5], "transformer_blocks")
    assert len(calls) == 4


@needs_cpu_kernel
@pytest.mark.parametrize("kind", ["float", "bool"])
@pytest.mark.parametrize("want", [(True, False), (False, True)])
def test_outer_mask_attention_returns_what_is_asked(kind, want):
    B, H, N, D, L = 2, 2, 17, 8, 6
    m = _tokens(B, N, [[3, 4, 5], [1, 2, 3, 4, 5]])
    mask = _outer(m) if kind == "float" else _outer(m) > 0
    q, k, v = _inputs(B, H, N, D, "bhnd")
    spans = reference.resolve_spans(N, N, L, True)
    kw = dict(gamma=GAMMA, gamma_reverse=GAMMA_REV, scale=SCALE)
    got = ops._outer_mask_attention(q, k, v, ops._outer_mask_rows(mask), spans, "bhnd", *want, deterministic=True,
                                    backend="cpu", **kw)
    out, lse, tm = reference.attention_ref(q, k, v, attn_mask=mask, text_len=L, **kw)
    assert isinstance(got, tuple) and len(got) == 2
    torch.testing.assert_close(got[0], out, **EXACT)
    torch.testing.assert_close(got[1], lse if want[0] else tm, **EXACT)
