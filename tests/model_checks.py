"""Checks shared by the per-model adapter tests (tests/test_models_*.py).

- :func:`paper_attention`: the paper's definition written out, materialized in float64: logits
  ``scale q.k``, times gamma where a visual query meets a text key, then the stock mask (bool:
  False keys removed; float: added to the logits, as SDPA does), softmax, weighted sum of v.
- :class:`Capture`: records every ``taca.joint_attention`` call the processors make (q, k, v,
  keyword arguments, output). With ``shadow=True`` the processors get diffusers' stock attention
  of the same q, k, v back instead, so the rest of the forward is the stock model's and the q, k, v
  of EVERY call can be compared bit for bit with a stock run's.
- :class:`StockCalls`: records the q, k, v of every stock attention call (dispatch_attention_fn).
- :func:`window`: the steps the paper's rule puts in the gamma window, from a pipeline's sigmas.
"""
from __future__ import annotations

import math

import torch

import taca
import taca.processors as tp



def paper_attention(q, k, v, text_len, gamma, attn_mask=None, text_first=True):
    """q, k, v: (B, N, H, D); gamma: (B,); attn_mask: None, bool or float, broadcastable to
    (B, H, N, N). Returns (B, N, H, D) float64."""
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))
    B, H, N, D = q.shape
    logits = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(D)
    text = torch.zeros(N, dtype=torch.bool)
    if text_first:
        text[:text_len] = True
    else:
        text[N - text_len:] = True
    vis_q_text_k = (~text)[:, None] & text[None, :]
    logits = torch.where(vis_q_text_k, logits * gamma.double().view(B, 1, 1, 1), logits)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask.double()
    p = torch.softmax(logits, dim=-1)
    return torch.einsum("bhij,bhjd->bhid", p, v).transpose(1, 2)


class Capture:
    def __init__(self, monkeypatch, shadow: bool = False):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        self.calls = []
        orig = tp.joint_attention

        def wrapped(q, k, v, **kw):
            out = orig(q, k, v, **kw)
            o = out[0] if isinstance(out, tuple) else out
            self.calls.append((q.detach().clone(), k.detach().clone(), v.detach().clone(), dict(kw), o.detach().clone()))
            if shadow:
                return dispatch_attention_fn(q, k, v, attn_mask=kw.get("attn_mask"))
            return out

        monkeypatch.setattr(tp, "joint_attention", wrapped)


class StockCalls:
    """q, k, v of every dispatch_attention_fn call made from ``module`` (a diffusers model file)."""

    def __init__(self, monkeypatch, module):
        self.calls = []
        orig = module.dispatch_attention_fn

        def grab(q, k, v, *a, **kw):
            self.calls.append((q.clone(), k.clone(), v.clone(), kw.get("attn_mask")))
            return orig(q, k, v, *a, **kw)

        monkeypatch.setattr(module, "dispatch_attention_fn", grab)


def check_against_paper(calls, text_len, gamma, masks=None):
    """Every captured call used text_len, text first, the stock scale, and its output equals the
    paper's definition on the same q, k, v (masks: the expected stock mask per call, or None)."""
    assert calls
    for i, (q, k, v, kw, out) in enumerate(calls):
        assert kw["layout"] == "bnhd" and kw["text_first"] is True
        assert kw["text_len"] == text_len, (i, kw["text_len"], text_len)
        assert kw["scale"] == 1 / math.sqrt(q.shape[-1])
        assert torch.equal(kw["gamma"], gamma)
        mask = None if masks is None else masks[i]
        if mask is None:
            assert kw.get("attn_mask") is None
        else:
            assert kw["attn_mask"].dtype == mask.dtype and torch.equal(kw["attn_mask"].expand_as(mask), mask)
        expect = paper_attention(q, k, v, text_len, gamma, mask)
        torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=2e-6)


def processors_of(transformer):
    return {n: m.processor for n, m in transformer.named_modules() if hasattr(m, "set_processor") and hasattr(m, "processor")}


def check_disable_restores(transformer, before):
    after = processors_of(transformer)
    assert after.keys() == before.keys()
    assert all(after[n] is before[n] for n in before)
    assert len(transformer._forward_pre_hooks) == 0
    assert len(transformer._forward_hooks) == 0  # adapters without attention kwargs add a clearing hook


def window(sigmas, threshold=0.97):
    """0-based steps where the paper's rule (sigma >= threshold) turns gamma on."""
    from taca.schedule import PaperSchedule

    sched = PaperSchedule(1.2, threshold)
    s = torch.as_tensor(sigmas, dtype=torch.float32)
    return [i for i in range(len(s)) if float(sched(s[i : i + 1])[0]) != 1.0]


def ranges(steps):
    """[0, 1, 2, 5] -> "0-2, 5"; [] -> "none"."""
    if not steps:
        return "none"
    out, start, prev = [], steps[0], steps[0]
    for s in steps[1:] + [None]:
        if s is not None and s == prev + 1:
            prev = s
            continue
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
        if s is not None:
            start = prev = s
    return ", ".join(out)


# --- text spans that are not the first / last text_len tokens, per-sample spans, image-only
# queries, grouped KV heads (the models2 adapters: AuraFlow, Lumina2, Ernie-Image, ...) ---------



def span_mask(B, N, start, length):
    """(B, N) bool: True on [start[b], start[b] + length[b]) (ints or (B,) tensors)."""
    start = torch.as_tensor(start).reshape(-1).expand(B)
    length = torch.as_tensor(length).reshape(-1).expand(B)
    j = torch.arange(N)[None, :]
    return (j >= start[:, None]) & (j < (start + length)[:, None])


def op_text_masks(kw, B, Nq, Nk):
    """(key text (B, N_k), query text (B, N_q)) bool, as taca.joint_attention reads its span arguments."""
    tl = kw["text_len"]
    ts = kw.get("text_start")
    if ts is None:
        ts = 0 if kw.get("text_first", True) else Nk - torch.as_tensor(tl)
    key = span_mask(B, Nk, ts, tl)
    qs, ql = kw.get("query_text_start"), kw.get("query_text_len")
    if qs is None and ql is None:
        query = key.clone() if Nq == Nk else torch.zeros(B, Nq, dtype=torch.bool)
    else:
        if qs is None:
            qs = 0 if kw.get("text_first", True) else Nq - torch.as_tensor(ql)
        query = span_mask(B, Nq, qs, ql)
    return key, query


def paper_attention_masks(q, k, v, key_text, query_visual, gamma, attn_mask=None, scale=None, layout="bnhd"):
    """The paper's definition with explicit token roles, materialized in float64: q (B, N_q, H, D),
    k, v (B, N_k, H_kv, D) (layout "bnhd"; "bhnd" transposed), H_kv dividing H (query head h reads kv
    head h // (H // H_kv)); logits ``scale q.k``, times gamma[b] where query_visual[b, i] and
    key_text[b, j], then the mask (bool: False removed; float: added), softmax, weighted v. A row
    with every key removed gives 0 (SDPA on CPU). Returns q's layout, float64."""
    if layout == "bnhd":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    q, k, v = (x.double() for x in (q, k, v))
    B, H, Nq, D = q.shape
    rep = H // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scale = 1 / math.sqrt(D) if scale is None else scale
    logits = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    pair = (query_visual[:, :, None] & key_text[:, None, :])[:, None]
    logits = torch.where(pair, logits * gamma.double().view(B, 1, 1, 1), logits)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask.double()
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhij,bhjd->bhid", p, v)
    return out.transpose(1, 2) if layout == "bnhd" else out


def check_spans_against_paper(calls, key_text, query_visual, gamma, masks=None, scale=None, layout="bnhd"):
    """Every captured call put the text where ``key_text`` (B, N_k) says (and visual queries where
    ``query_visual`` (B, N_q) says), used the stock scale and mask, and its output equals
    :func:`paper_attention_masks` on the same q, k, v. key_text / query_visual / masks / scale:
    one value for all calls or a list with one per call."""
    assert calls
    n = len(calls)
    per = lambda x: x if isinstance(x, list) else [x] * n  # noqa: E731
    key_text, query_visual, masks, scale = per(key_text), per(query_visual), per(masks), per(scale)
    for i, (q, k, v, kw, out) in enumerate(calls):
        assert kw["layout"] == layout
        nd = 1 if layout == "bnhd" else 2
        B, Nq, Nk = q.shape[0], q.shape[nd], k.shape[nd]
        kt, qt = op_text_masks(kw, B, Nq, Nk)
        assert torch.equal(kt, key_text[i]), (i, kt, key_text[i])
        assert torch.equal(~qt, query_visual[i]), (i, qt, query_visual[i])
        D = q.shape[-1]
        assert kw["scale"] == (1 / math.sqrt(D) if scale[i] is None else scale[i])
        assert torch.equal(kw["gamma"], gamma)
        mask = masks[i]
        if mask is None:
            assert kw.get("attn_mask") is None
        else:
            got = kw["attn_mask"]
            assert got.dtype == mask.dtype and torch.equal(got.expand_as(mask), mask)
        expect = paper_attention_masks(q, k, v, key_text[i], query_visual[i], gamma, mask, kw["scale"], layout)
        torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=2e-6)


class CaptureSDPA:
    """:class:`Capture` for processors whose stock call is ``F.scaled_dot_product_attention`` on
    their q, k, v (any layout, the stock scale): records every ``taca.joint_attention`` call; with
    ``shadow=True`` hands the processor that stock SDPA result instead (so later calls see the
    stock model's q, k, v bit for bit)."""

    def __init__(self, monkeypatch, shadow: bool = False):
        import torch.nn.functional as F

        self.calls = []
        orig = tp.joint_attention
        sdpa = F.scaled_dot_product_attention

        def wrapped(q, k, v, **kw):
            out = orig(q, k, v, **kw)
            o = out[0] if isinstance(out, tuple) else out
            self.calls.append((q.detach().clone(), k.detach().clone(), v.detach().clone(), dict(kw), o.detach().clone()))
            if shadow:
                t = (lambda x: x.transpose(1, 2)) if kw["layout"] == "bnhd" else (lambda x: x)
                return t(sdpa(t(q), t(k), t(v), attn_mask=kw.get("attn_mask"), scale=kw["scale"]))
            return out

        monkeypatch.setattr(tp, "joint_attention", wrapped)


class StockSDPACalls:
    """q, k, v (as passed: (B, H, N, D)), mask and scale of every F.scaled_dot_product_attention call."""

    def __init__(self, monkeypatch):
        import torch.nn.functional as F

        self.calls = []
        orig = F.scaled_dot_product_attention

        def grab(q, k, v, attn_mask=None, *a, **kw):
            self.calls.append((q.clone(), k.clone(), v.clone(), attn_mask, kw.get("scale")))
            return orig(q, k, v, attn_mask, *a, **kw)

        monkeypatch.setattr(F, "scaled_dot_product_attention", grab)


def check_checkpointing_keeps_state(make_transformer, inputs, gamma: float = 1.3):
    """Gradient checkpointing on a model whose forward carries no attention kwargs (the hook hands
    each call's state to the processors): the blocks recomputed in the backward pass run with TACA's
    state too, so the output and every gradient equal those of the same model without
    checkpointing; stock attention's gradients differ (so a recomputation without gamma would be
    seen); the model's checkpointing function is its own again after the call.

    make_transformer() -> a fresh transformer (same weights each call); inputs: its forward's
    kwargs, with a timestep inside the paper's gamma window."""

    def run(checkpointing: bool, with_taca: bool):
        t = make_transformer()
        t.train()
        if checkpointing:
            t.enable_gradient_checkpointing()
        func = t.__dict__.get("_gradient_checkpointing_func")
        handle = taca.enable(t, gamma=gamma) if with_taca else None
        out = t(**inputs)[0]
        out.float().square().mean().backward()
        if handle is not None:
            assert handle.last_gamma is not None, "the inputs' timestep is outside the gamma window"
            taca.disable(t)
        assert t.__dict__.get("_gradient_checkpointing_func") is func
        grads = {n: p.grad.clone() for n, p in t.named_parameters() if p.grad is not None}
        return out.detach(), grads

    ref_out, ref = run(False, True)
    out, got = run(True, True)
    _, stock = run(False, False)
    assert torch.equal(out, ref_out)
    assert set(got) == set(ref) and len(ref) > 0
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7, msg=n)
    # gamma changes the gradients measurably: a recomputation with stock attention would fail above
    assert any(not torch.allclose(stock[n], ref[n], rtol=1e-4, atol=1e-6) for n in ref)


def check_outer_hint_routes(monkeypatch, spy, target, run, n_calls: int, n_kinds: int):
    """Models whose blocks build an outer-product mask from one token mask (Chroma; CogView4's and GLM-Image's float
    0/1 matrices from [text mask > 0, ones], which their processors name), with the mask routes on the CPU
    (``ops._MASK_ROUTES``, as on CUDA): every joint call takes the outer-product route, a full read of a mask
    (``ops._outer_mask_result``) happens once per block kind over two transformer calls with the same inputs (the
    hint, ``ops._outer_hint``; without it: once per block and call), and the output is the element-wise kernel's
    (routes off) to float32 rounding.

    monkeypatch, spy: the test's fixtures (conftest); target: what ``taca.enabled`` gets; run() -> the transformer's
    output (inputs with the mask, timestep inside the gamma window); n_calls: joint calls per transformer call."""
    from taca import ops

    with taca.enabled(target, gamma=1.3), torch.no_grad():
        ref = run()
    monkeypatch.setattr(ops, "_MASK_ROUTES", ("cuda", "cpu"))
    reads, routed = spy(ops, "_outer_mask_result"), spy(ops, "_outer_mask_attention")
    with taca.enabled(target, gamma=1.3), torch.no_grad():
        outs = [run(), run()]
    assert len(routed) == 2 * n_calls
    assert len(reads) == n_kinds, [args[0].shape for args, _ in reads]
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
