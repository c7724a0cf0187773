"""Masks whose query rows all equal one row outside a contiguous range [r0, r1): OmniGen's image rows (every image
query sees every unpadded token), Ideogram 4's segment mask (every row but the left padding's). backend="auto" on
CUDA runs them as the key-mask kernel over every row plus split SDPA over rows [r0, r1) with their own mask rows
(``ops._row_range_mask`` / ``ops._row_range_attention``). Here on the CPU kernel in float64: exact against the
materialized reference with the whole mask, values and gradients; the detection, its cache (views of one mask are
checked once) and what it refuses."""
import pytest
import torch

from taca import ops, reference

from test_outer_mask import EXACT, GAMMA, GAMMA_REV, SCALE, exact_against, needs_cpu_kernel


def _omnigen_mask(pad, L, N, dtype=torch.float64):
    """OmniGen's additive (B, 1, N, N) mask: [left padding (pad[b]), text (L - pad[b]), time token, image]: text and
    time rows causal, image rows see every unpadded key, padded keys hidden from every other row (a padding row sees
    itself, as the stock mask's diagonal keeps it)."""
    B = len(pad)
    m = torch.zeros(B, N, N, dtype=torch.bool)
    causal = torch.ones(L + 1, L + 1, dtype=torch.bool).tril()
    for b, p in enumerate(pad):
        m[b, :L + 1, :L + 1] = causal
        m[b, L + 1:, :] = True
        m[b, :, :p] = False
        m[b, torch.arange(p), torch.arange(p)] = True
    return ((~m).to(dtype) * torch.finfo(dtype).min)[:, None]


def _segment_mask(pad, N):
    """Ideogram 4's bool (B, 1, N, N) segment mask: padding (segment -1) first, then text and image (segment 1)."""
    seg = torch.ones(len(pad), N, dtype=torch.long)
    for b, p in enumerate(pad):
        seg[b, :p] = -1
    return (seg[:, :, None] == seg[:, None, :])[:, None]


def _inputs(B, H, Nq, Nk, D, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    shp = lambda n: (B, H, n, D) if layout == "bhnd" else (B, n, H, D)  # noqa: E731
    return tuple(torch.randn(shp(n), generator=g, dtype=torch.float64).requires_grad_() for n in (Nq, Nk, Nk))


def test_rows_detected():
    L, N = 7, 30
    mask = _omnigen_mask([2, 0], L, N)
    img = mask[:, :, L + 1:]  # the processor's view: the image rows
    kmask, r0, r1 = ops._row_range_mask(img)
    assert (r0, r1) == (0, 0) and kmask.shape == (2, 1, 1, N) and torch.equal(kmask, img[:, :, -1:])
    # the whole mask: the text rows differ from the last (image) row, and they are under half the rows
    kmask, r0, r1 = ops._row_range_mask(mask)
    assert (r0, r1) == (0, L + 1) and torch.equal(kmask, mask[:, :, -1:])
    seg = _segment_mask([3, 5], 20)
    kmask, r0, r1 = ops._row_range_mask(seg)
    assert (r0, r1) == (0, 5) and kmask.dtype == torch.bool and torch.equal(kmask, seg[:, :, -1:])
    # rows equal to the FIRST row but for a range at the end (right padding)
    right = _segment_mask([3], 20).flip(-1).flip(-2)
    kmask, r0, r1 = ops._row_range_mask(right)
    assert (r0, r1) == (17, 20) and torch.equal(kmask, right[:, :, :1])
    # a head dimension and a broadcast batch: one range over every leading index
    hm = torch.zeros(1, 3, 12, 12)
    hm[0, 1, 4, 2] = -1.0
    hm[0, 2, 6, 9] = -5.0
    kmask, r0, r1 = ops._row_range_mask(hm)
    assert (r0, r1) == (4, 7) and kmask.shape == (1, 3, 1, 12)


def test_rows_refused():
    causal = torch.ones(16, 16, dtype=torch.bool).tril()[None, None]
    assert ops._row_range_mask(causal) is None  # every row differs from the first and the last
    nan = torch.zeros(1, 1, 8, 8)
    nan[0, 0, :, 3] = float("nan")  # NaN compares unequal: never a key mask
    assert ops._row_range_mask(nan) is None
    assert ops._row_range_mask(torch.zeros(1, 1, 1, 8)) is None  # already a key mask
    assert ops._row_range_mask(torch.zeros(1, 1, 8, 8, requires_grad=True)) is None


def test_views_of_one_mask_checked_once(spy):
    """A model slicing one mask in every block (OmniGen's processor takes the image rows of the transformer's mask)
    pays one check per mask; a change in place is checked again."""
    L, N = 5, 24
    mask = _omnigen_mask([1, 0], L, N)
    calls = spy(torch.Tensor, "__ne__")
    first = ops._row_range_mask(mask[:, :, L + 1:])
    n = len(calls)
    assert n > 0 and first is not None
    for _ in range(3):
        again = ops._row_range_mask(mask[:, :, L + 1:])  # a new view object each time
        assert again is not None and again[1:] == first[1:]
    assert len(calls) == n
    ops._row_range_mask(mask[:, :, L:])  # another place in the base: its own check
    assert len(calls) > n
    m = len(calls)
    mask[0, 0, -1, 3] = -7.0  # in place: the last image row differs now, so the rows are the first's but that one
    img = mask[:, :, L + 1:]
    got = ops._row_range_mask(img)
    assert len(calls) > m and got is not None and got[1:] == (N - L - 2, N - L - 1)
    assert torch.equal(got[0], img[:, :, :1])


@needs_cpu_kernel
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("case", ["omnigen_image_rows", "omnigen_whole", "segment", "segment_spans", "heads"])
def test_row_range_attention_exact(layout, case):
    """out, lse and text_mass, and the gradients of q, k, v, equal the materialized reference's with the whole mask
    to float64 rounding."""
    B, H, D = 2, 3, 8
    kw = dict(gamma=torch.tensor([GAMMA, 0.7], dtype=torch.float64), gamma_reverse=GAMMA_REV, scale=SCALE)
    if case.startswith("omnigen"):
        L, N = 7, 31
        full = _omnigen_mask([3, 0], L, N)
        if case == "omnigen_image_rows":  # image-only queries against every key: no text query
            mask, Nq = full[:, :, L + 1:], N - L - 1
            spans = dict(text_len=L, text_first=True)
        else:
            mask, Nq = full, N
            spans = dict(text_len=L, text_first=True)
    elif case == "heads":
        N = Nq = 26
        mask = torch.zeros(1, H, N, N, dtype=torch.float64)
        mask[0, 1, 8:11, 2:5] = -3.0
        mask[0, 2, 9, 20] = float("-inf")
        spans = dict(text_len=6, text_first=False)
    else:
        pad = [4, 1]
        N = Nq = 28
        mask = _segment_mask(pad, N)
        if case == "segment":
            spans = dict(text_len=6, text_first=True, text_start=4)
        else:  # Ideogram 4: text right after each row's padding, per-sample spans
            spans = dict(text_len=torch.tensor([6, 9]), text_start=torch.tensor(pad))
    q, k, v = _inputs(B, H, Nq, N, D, layout)
    rowmask = ops._row_range_mask(mask)
    assert rowmask is not None
    tf = spans.get("text_first", True)
    args = (spans["text_len"], spans.get("text_start"), None, None)
    res = reference.resolve_spans(Nq, N, spans["text_len"], tf, spans.get("text_start"), None, None)  # as _validate
    got = ops._row_range_attention(q, k, v, rowmask, mask, res, args, tf, layout, True, True, deterministic=True,
                                   backend="cpu", **kw)
    want = reference.attention_ref(q, k, v, attn_mask=mask, layout=layout, **spans, **kw)
    exact_against(got, want, (q, k, v))
    only = ops._row_range_attention(q.detach(), k.detach(), v.detach(), rowmask, mask, res, args, tf, layout, False,
                                    False, deterministic=True, backend="cpu", **kw)
    assert isinstance(only, torch.Tensor)
    assert torch.equal(only, got[0].detach())  # out does not depend on what else is asked
    one = ops._row_range_attention(q.detach(), k.detach(), v.detach(), rowmask, mask, res, args, tf, layout, False,
                                   True, deterministic=True, backend="cpu", **kw)
    assert isinstance(one, tuple) and len(one) == 2
    torch.testing.assert_close(one[1], want[2].detach(), **EXACT)
